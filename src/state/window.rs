//! Sliding-window arithmetic for one key of one window.
//!
//! A window of span `S` is split into buckets of width `w = S / 60` (at least
//! one second). Only non-empty buckets are stored, oldest first, with a running
//! total, so recording and reading are O(1) amortised and a key that saw one
//! event costs one bucket.
//!
//! Accuracy: a read at time `t` covers the buckets that overlap `[t - S, t]`,
//! so every event within the span counts, and an event up to one bucket older
//! than the span may still count. Windows therefore err on the side of seeing
//! slightly more, never less, which is the safe side for velocity checks.
//! Distinct counts are exact: each value keeps its own last-seen time (up to
//! [`MAX_DISTINCT`] values per key; past that the oldest values are forgotten).

use smallvec::SmallVec;

/// Buckets per span.
pub const BUCKETS_PER_SPAN: i64 = 60;
/// Most distinct values remembered per key of a distinct window.
pub const MAX_DISTINCT: usize = 4096;

/// The fixed shape of a window: its span and bucket width, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub span_ms: i64,
    pub bucket_ms: i64,
}

impl Shape {
    pub fn new(span_ms: i64) -> Shape {
        let span_ms = span_ms.max(1000);
        Shape {
            span_ms,
            bucket_ms: (span_ms / BUCKETS_PER_SPAN).max(1000),
        }
    }

    pub fn bucket(&self, ts_ms: i64) -> i64 {
        ts_ms.div_euclid(self.bucket_ms)
    }

    /// The oldest bucket a read at `ts_ms` still covers.
    pub fn first_bucket(&self, ts_ms: i64) -> i64 {
        self.bucket(ts_ms - self.span_ms)
    }
}

/// A window's entries: one held in place, more on the heap.
///
/// Most keys of most windows hold one entry (one bucket, one distinct
/// value): in place it costs no allocation, and no pointer to chase (a cache
/// miss at millions of keys) when it is read. The same 24 bytes as a `Vec`.
pub(crate) type Entries<T> = SmallVec<[T; 1]>;

/// Pushes without the default doubling: state for millions of keys is
/// mostly short lists, and doubling would leave most of the heap empty.
pub(crate) fn push_small<T>(v: &mut Entries<T>, item: T) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.len() / 2).max(1));
    }
    v.push(item);
}

/// Asks for the first line of `v`'s entries when they are on the heap (see
/// [`riskgate_alloc::prefetch`]); in place, they came with their owner.
pub(crate) fn prefetch_spilled<T>(v: &Entries<T>) {
    if v.spilled() {
        riskgate_alloc::prefetch(v.as_ptr());
    }
}

/// Heap bytes behind `v` (none while its one entry is held in place).
pub(crate) fn heap_bytes<T>(v: &Entries<T>) -> usize {
    if v.spilled() {
        v.capacity() * std::mem::size_of::<T>()
    } else {
        0
    }
}

/// Counts or sums over time, bucketed.
///
/// A plain list, not a ring: most keys hold one or two buckets, a list
/// grown a step at a time keeps them in one small allocation (or none, see
/// [`Entries`]), and dropping expired buckets from the front moves at most
/// 60 pairs.
#[derive(Debug, Default, Clone)]
pub struct Series {
    buckets: Entries<(i64, i64)>,
    total: i64,
}

impl Series {
    /// Asks for the buckets' line when they are on the heap.
    pub(crate) fn prefetch(&self) {
        prefetch_spilled(&self.buckets);
    }

    /// Adds `delta` at `ts_ms` and returns the window's value as of `ts_ms`
    /// (this delta included): the read and the write are one step.
    pub fn add(&mut self, shape: Shape, ts_ms: i64, delta: i64) -> i64 {
        let b = shape.bucket(ts_ms);
        match self.buckets.last_mut() {
            Some((last, v)) if *last == b => *v += delta,
            Some((last, _)) if *last > b => {
                // Out of order (a late event): insert in place. Rare.
                let at = self.buckets.partition_point(|(x, _)| *x < b);
                match self.buckets.get_mut(at) {
                    Some((x, v)) if *x == b => *v += delta,
                    _ => self.buckets.insert(at, (b, delta)),
                }
            }
            _ => push_small(&mut self.buckets, (b, delta)),
        }
        self.total += delta;
        self.value(shape, ts_ms)
    }

    /// The window's value as of `ts_ms`.
    pub fn value(&mut self, shape: Shape, ts_ms: i64) -> i64 {
        let first = shape.first_bucket(ts_ms);
        let newest = match self.buckets.last() {
            Some((b, _)) => *b,
            None => return 0,
        };
        if newest <= shape.bucket(ts_ms) {
            // The common case: `ts_ms` is the newest time seen, so everything
            // older than the window can go for good.
            let expired = self.buckets.partition_point(|(b, _)| *b < first);
            if expired > 0 {
                self.total -= self.buckets[..expired].iter().map(|(_, v)| v).sum::<i64>();
                self.buckets.drain(..expired);
            }
            self.total
        } else {
            // A read in the past (a late event): sum the covered buckets.
            let last = shape.bucket(ts_ms);
            self.buckets
                .iter()
                .filter(|(b, _)| *b >= first && *b <= last)
                .map(|(_, v)| v)
                .sum()
        }
    }

    /// Takes `delta` back out of the bucket it was added to at `ts_ms`, if that
    /// bucket is still held (a released reservation, a failed charge).
    pub fn remove(&mut self, shape: Shape, ts_ms: i64, delta: i64) {
        let b = shape.bucket(ts_ms);
        let at = self.buckets.partition_point(|(x, _)| *x < b);
        if let Some((x, v)) = self.buckets.get_mut(at) {
            if *x == b {
                *v -= delta;
                self.total -= delta;
            }
        }
    }

    /// True when nothing newer than `ts_ms - span` is held.
    pub fn is_idle(&self, shape: Shape, now_ms: i64) -> bool {
        self.buckets
            .last()
            .is_none_or(|(b, _)| *b < shape.first_bucket(now_ms))
    }

    /// Heap bytes held (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        heap_bytes(&self.buckets)
    }

    /// The held buckets, (bucket index, value), oldest first (snapshots).
    pub fn buckets(&self) -> &[(i64, i64)] {
        &self.buckets
    }

    /// Rebuilds a series from its buckets (snapshots); `None` unless the
    /// bucket indexes strictly increase.
    pub fn from_buckets(buckets: Vec<(i64, i64)>) -> Option<Series> {
        if buckets.windows(2).any(|p| p[0].0 >= p[1].0) {
            return None;
        }
        let total = buckets
            .iter()
            .map(|(_, v)| *v)
            .fold(0i64, i64::wrapping_add);
        Some(Series {
            buckets: Entries::from_vec(buckets),
            total,
        })
    }
}

/// Values a [`Distinct`] keeps in a plain list (scanned) before it moves
/// them to a hash map. Most keys hold one or two, where a scan beats any
/// hashing and costs no allocation.
const LIST_MAX: usize = 16;

/// Distinct values with their last-seen times; exact up to [`MAX_DISTINCT`].
///
/// Every operation is O(1) amortised, whatever the number of values: a key
/// many users share (a shop terminal, a campus address, an emulator farm
/// reusing one device id) holds thousands of them, and scanning them on
/// every request cost more than the rest of the decision, under the key's
/// lock (8.8 us an add at 4,096 live values, 17.9 us at the bound, before).
#[derive(Debug, Clone)]
pub struct Distinct {
    repr: Repr,
}

#[derive(Debug, Clone)]
enum Repr {
    /// Up to [`LIST_MAX`] values, (value, last seen), scanned.
    List(Entries<(u64, i64)>),
    /// More: boxed, so a key with a few values stays small.
    Map(Box<Many>),
}

impl Default for Distinct {
    fn default() -> Distinct {
        Distinct {
            repr: Repr::List(Entries::new()),
        }
    }
}

/// Many distinct values: each value's last-seen time, and a log of
/// (time, value) in time order, so the values that leave the span are found
/// at the log's front instead of by a scan.
///
/// Invariants: the log is sorted by time; every value of `last` has its
/// entry (last seen, value) in the log; every other entry of the log is
/// older than its value's last-seen time (stale, skipped when it reaches
/// the front). The newest entry is therefore the newest time held.
#[derive(Debug, Clone, Default)]
struct Many {
    /// Seeded per process: values are hashes of fields a caller chooses.
    last: std::collections::HashMap<u64, i64, foldhash::fast::RandomState>,
    log: std::collections::VecDeque<(i64, u64)>,
}

impl Many {
    fn newest(&self) -> Option<i64> {
        self.log.back().map(|(t, _)| *t)
    }

    /// Logs `value` seen at `ts` (its new last-seen time), in time order.
    fn log(&mut self, ts: i64, value: u64) {
        match self.log.back() {
            Some((t, _)) if *t > ts => {
                // A late event: in place. Rare.
                let at = self.log.partition_point(|(t, _)| *t <= ts);
                self.log.insert(at, (ts, value));
            }
            _ => self.log.push_back((ts, value)),
        }
        // A value seen again leaves its older entry behind: past twice the
        // live entries, rebuild the log from the map (O(n log n) once per
        // n pushes at least).
        if self.log.len() > 2 * self.last.len() + LIST_MAX {
            self.rebuild_log();
        }
    }

    /// The log made afresh from the map: one entry per value, in time order.
    fn rebuild_log(&mut self) {
        let mut log: Vec<(i64, u64)> = self.last.iter().map(|(v, t)| (*t, *v)).collect();
        log.sort_unstable();
        self.log = log.into();
    }

    /// Forgets every value last seen before `from` (front of the log).
    fn expire(&mut self, from: i64) {
        while let Some(&(t, v)) = self.log.front() {
            if t >= from {
                break;
            }
            self.log.pop_front();
            if self.last.get(&v) == Some(&t) {
                self.last.remove(&v);
            }
        }
    }

    /// Forgets the value seen least recently.
    fn forget_oldest(&mut self) {
        while let Some((t, v)) = self.log.pop_front() {
            if self.last.get(&v) == Some(&t) {
                self.last.remove(&v);
                return;
            }
        }
    }

    fn add(&mut self, shape: Shape, ts_ms: i64, value: u64) {
        match self.last.get_mut(&value) {
            Some(last) if *last >= ts_ms => {}
            Some(last) => {
                *last = ts_ms;
                self.log(ts_ms, value);
            }
            None => {
                if self.last.len() >= MAX_DISTINCT {
                    // Whatever left the span as of this event has left it
                    // as of the newest too.
                    self.expire(ts_ms - shape.span_ms);
                    if self.last.len() >= MAX_DISTINCT {
                        self.forget_oldest();
                    }
                }
                self.last.insert(value, ts_ms);
                self.log(ts_ms, value);
            }
        }
    }

    fn value_with(&mut self, shape: Shape, ts_ms: i64, extra: Option<u64>) -> i64 {
        let from = ts_ms - shape.span_ms;
        let within = |t: i64| t >= from && t <= ts_ms;
        let n = if self.newest().is_none_or(|t| t <= ts_ms) {
            // The common case: nothing newer than this read, so whatever
            // left the span goes for good and the rest is all within it.
            self.expire(from);
            self.last.len()
        } else {
            // A read in the past (a late event): count the covered values.
            self.last.values().filter(|t| within(**t)).count()
        };
        let extra_new = extra.is_some_and(|x| !self.last.get(&x).is_some_and(|t| within(*t)));
        (n + usize::from(extra_new)) as i64
    }
}

impl Distinct {
    /// Asks for the values' first line when they are on the heap (see
    /// [`riskgate_alloc::prefetch`]).
    pub(crate) fn prefetch(&self) {
        match &self.repr {
            Repr::List(values) => prefetch_spilled(values),
            Repr::Map(many) => riskgate_alloc::prefetch(&**many),
        }
    }

    /// Records `value` (a hash of the field) at `ts_ms` and returns the number of
    /// distinct values seen within the span as of `ts_ms`, this one included.
    pub fn add(&mut self, shape: Shape, ts_ms: i64, value: u64) -> i64 {
        match &mut self.repr {
            Repr::List(seen) => match seen.iter_mut().find(|(v, _)| *v == value) {
                Some((_, last)) => *last = (*last).max(ts_ms),
                None => {
                    if seen.len() >= LIST_MAX && seen.iter().all(|(_, t)| *t <= ts_ms) {
                        seen.retain(|(_, t)| *t >= ts_ms - shape.span_ms);
                    }
                    if seen.len() < LIST_MAX {
                        push_small(seen, (value, ts_ms));
                        return self.value(shape, ts_ms);
                    }
                    let mut many = Many::default();
                    for &(v, t) in seen.iter() {
                        many.add(shape, t, v);
                    }
                    many.add(shape, ts_ms, value);
                    self.repr = Repr::Map(Box::new(many));
                }
            },
            Repr::Map(many) => many.add(shape, ts_ms, value),
        }
        self.value(shape, ts_ms)
    }

    /// The distinct values seen within the span as of `ts_ms`. A value absent so
    /// far can be counted in with `extra` (a dry run, or a read that includes the
    /// current request without recording it).
    pub fn value_with(&mut self, shape: Shape, ts_ms: i64, extra: Option<u64>) -> i64 {
        let seen = match &mut self.repr {
            Repr::List(seen) => seen,
            Repr::Map(many) => {
                let n = many.value_with(shape, ts_ms, extra);
                if many.last.len() <= LIST_MAX / 4 {
                    // Back to a list once most values have left the span.
                    let mut seen: Entries<(u64, i64)> =
                        many.last.iter().map(|(v, t)| (*v, *t)).collect();
                    seen.sort_unstable_by_key(|(_, t)| *t);
                    self.repr = Repr::List(seen);
                }
                return n;
            }
        };
        let from = ts_ms - shape.span_ms;
        if seen.iter().any(|(_, t)| *t < from) && seen.iter().all(|(_, t)| *t <= ts_ms) {
            seen.retain(|(_, t)| *t >= from);
        }
        let within = |t: i64| t >= from && t <= ts_ms;
        let mut n = seen.iter().filter(|(_, t)| within(*t)).count() as i64;
        if let Some(x) = extra {
            if !seen.iter().any(|(v, t)| *v == x && within(*t)) {
                n += 1;
            }
        }
        n
    }

    pub fn value(&mut self, shape: Shape, ts_ms: i64) -> i64 {
        self.value_with(shape, ts_ms, None)
    }

    pub fn is_idle(&self, shape: Shape, now_ms: i64) -> bool {
        let cutoff = now_ms - shape.span_ms;
        match &self.repr {
            Repr::List(seen) => seen.iter().all(|(_, t)| *t < cutoff),
            Repr::Map(many) => many.newest().is_none_or(|t| t < cutoff),
        }
    }

    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::List(seen) => heap_bytes(seen),
            Repr::Map(many) => {
                std::mem::size_of::<Many>()
                    // hashbrown: a (value, time) and a control byte a bucket.
                    + many.last.capacity() * (std::mem::size_of::<(u64, i64)>() + 1)
                    + many.log.capacity() * std::mem::size_of::<(i64, u64)>()
            }
        }
    }

    /// How many values are remembered.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::List(seen) => seen.len(),
            Repr::Map(many) => many.last.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The remembered (value, last seen) pairs, in no particular order
    /// (snapshots).
    pub fn seen(&self) -> impl Iterator<Item = (u64, i64)> + '_ {
        let (list, map) = match &self.repr {
            Repr::List(seen) => (Some(seen.iter().copied()), None),
            Repr::Map(many) => (None, Some(many.last.iter().map(|(v, t)| (*v, *t)))),
        };
        list.into_iter().flatten().chain(map.into_iter().flatten())
    }

    /// Rebuilds from remembered values (snapshots), keeping the most recent
    /// [`MAX_DISTINCT`].
    pub fn from_seen(mut seen: Vec<(u64, i64)>) -> Distinct {
        seen.sort_unstable_by_key(|(_, t)| *t);
        if seen.len() > MAX_DISTINCT {
            seen.drain(..seen.len() - MAX_DISTINCT);
        }
        if seen.len() <= LIST_MAX {
            return Distinct {
                repr: Repr::List(Entries::from_vec(seen)),
            };
        }
        let mut many = Many::default();
        for (v, t) in seen {
            let last = many.last.entry(v).or_insert(t);
            *last = (*last).max(t);
        }
        many.rebuild_log();
        Distinct {
            repr: Repr::Map(Box::new(many)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn counts_within_span_and_forgets_after() {
        let shape = Shape::new(10 * MIN);
        let mut s = Series::default();
        for i in 0..5 {
            assert_eq!(s.add(shape, i * MIN, 1), i + 1);
        }
        // Ten minutes after the first event it is still (conservatively) inside.
        assert_eq!(s.value(shape, 10 * MIN), 5);
        // Past span + one bucket the first event is gone.
        assert_eq!(s.value(shape, 10 * MIN + shape.bucket_ms + 1), 4);
        assert_eq!(s.value(shape, 30 * MIN), 0);
        assert!(s.is_idle(shape, 30 * MIN));
    }

    #[test]
    fn every_event_within_the_span_counts() {
        // No event younger than the span is ever dropped, wherever the bucket
        // edges fall.
        let shape = Shape::new(10 * MIN);
        for offset in [0, 1, 999, 5_000, 9_999] {
            let mut s = Series::default();
            s.add(shape, offset, 1);
            assert_eq!(s.value(shape, offset + 10 * MIN), 1, "offset {offset}");
        }
    }

    #[test]
    fn sums_and_removes() {
        let shape = Shape::new(24 * 60 * MIN);
        let mut s = Series::default();
        s.add(shape, 0, 300_000);
        assert_eq!(s.add(shape, MIN, 250_000), 550_000);
        s.remove(shape, 0, 300_000);
        assert_eq!(s.value(shape, 2 * MIN), 250_000);
    }

    #[test]
    fn late_events_land_in_their_bucket() {
        let shape = Shape::new(10 * MIN);
        let mut s = Series::default();
        s.add(shape, 20 * MIN, 1);
        // A late event from 15 minutes earlier: as of its own time only it counts.
        assert_eq!(s.add(shape, 5 * MIN, 1), 1);
        // Read at 14 min: the late event is in, the 20-min one is still ahead.
        assert_eq!(s.value(shape, 14 * MIN), 1);
        assert_eq!(s.add(shape, 14 * MIN, 1), 2);
        // At 20 min the 5-min event has left the window.
        assert_eq!(s.value(shape, 20 * MIN), 2);
    }

    #[test]
    fn distinct_counts_values_once() {
        let shape = Shape::new(60 * MIN);
        let mut d = Distinct::default();
        assert_eq!(d.add(shape, 0, 1), 1);
        assert_eq!(d.add(shape, MIN, 2), 2);
        assert_eq!(d.add(shape, 2 * MIN, 1), 2);
        assert_eq!(d.value_with(shape, 3 * MIN, Some(3)), 3);
        assert_eq!(d.value_with(shape, 3 * MIN, Some(2)), 2);
        // Value 2 was last seen at 1 min; value 1 at 2 min.
        assert_eq!(d.value(shape, 61 * MIN + 1), 1);
    }

    /// The reference: every value with its last-seen time in a list, each
    /// operation a scan (the implementation before the map, kept to check
    /// the map against).
    #[derive(Default)]
    struct Model(Vec<(u64, i64)>);

    impl Model {
        fn add(&mut self, shape: Shape, ts: i64, value: u64) -> i64 {
            match self.0.iter_mut().find(|(v, _)| *v == value) {
                Some((_, last)) => *last = (*last).max(ts),
                None => {
                    if self.0.len() >= MAX_DISTINCT {
                        self.0.retain(|(_, t)| *t >= ts - shape.span_ms);
                    }
                    if self.0.len() >= MAX_DISTINCT {
                        let oldest = (0..self.0.len()).min_by_key(|&i| self.0[i].1).unwrap();
                        self.0.remove(oldest);
                    }
                    self.0.push((value, ts));
                }
            }
            self.value_with(shape, ts, None)
        }

        fn value_with(&mut self, shape: Shape, ts: i64, extra: Option<u64>) -> i64 {
            let from = ts - shape.span_ms;
            if self.0.iter().all(|(_, t)| *t <= ts) {
                self.0.retain(|(_, t)| *t >= from);
            }
            let within = |t: i64| t >= from && t <= ts;
            let n = self.0.iter().filter(|(_, t)| within(*t)).count();
            let new = extra.is_some_and(|x| !self.0.iter().any(|(v, t)| *v == x && within(*t)));
            (n + usize::from(new)) as i64
        }
    }

    /// xorshift64: a fixed stream, no dependency.
    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut x = seed;
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    #[test]
    fn distinct_agrees_with_a_scan_of_every_value() {
        // Few values and many, in and out of the span, late events, reads in
        // the past and reads that count a value in: every answer, and the
        // values kept, as the plain scan has them.
        // The last: a 10-hour span over 10,000 values, at the bound.
        let cases = [
            (1, 3, 10),
            (2, 12, 10),
            (3, 40, 10),
            (4, 300, 10),
            (5, 2_000, 10),
            (6, 10_000, 600),
        ];
        for (seed, domain, span_min) in cases {
            let shape = Shape::new(span_min * MIN);
            let mut next = rng(0x9e37_79b9_7f4a_7c15 ^ seed);
            let (mut d, mut model) = (Distinct::default(), Model::default());
            let (mut now, mut peak) = (0i64, 0usize);
            for step in 0..20_000 {
                now += 1 + next(4_000) as i64;
                // One event in ten is late, by up to a span and a half.
                let late = next(10) == 0;
                let ts = if late {
                    now - next(15 * MIN as u64) as i64
                } else {
                    now
                };
                let value = next(domain);
                let (got, want) = match next(4) {
                    0 => (d.value(shape, ts), model.value_with(shape, ts, None)),
                    1 => (
                        d.value_with(shape, ts, Some(value)),
                        model.value_with(shape, ts, Some(value)),
                    ),
                    _ => (d.add(shape, ts, value), model.add(shape, ts, value)),
                };
                assert_eq!(got, want, "seed {seed} step {step}: ts {ts} value {value}");
                assert_eq!(d.len(), model.0.len(), "seed {seed} step {step}");
                peak = peak.max(d.len());
            }
            // Each case reaches the regime it is there for.
            assert!(
                peak > LIST_MAX.min(domain as usize - 1),
                "seed {seed}: peak {peak}"
            );
            if domain > MAX_DISTINCT as u64 {
                assert_eq!(peak, MAX_DISTINCT, "seed {seed}");
            }
            let mut kept: Vec<_> = d.seen().collect();
            kept.sort_unstable();
            model.0.sort_unstable();
            assert_eq!(kept, model.0, "seed {seed}");
        }
    }

    #[test]
    fn many_values_use_a_map_and_few_go_back_to_a_list() {
        let shape = Shape::new(10 * MIN);
        let mut d = Distinct::default();
        for v in 0..100u64 {
            d.add(shape, v as i64 * 1_000, v);
        }
        assert!(matches!(d.repr, Repr::Map(_)));
        assert_eq!(d.value(shape, 100_000), 100);
        // An hour on, only what is recorded now is within the span.
        assert_eq!(d.add(shape, 60 * MIN, 7), 1);
        assert!(matches!(d.repr, Repr::List(_)));
        assert_eq!(d.heap_bytes(), 0, "one value is held in place");
    }

    #[test]
    fn a_busy_value_does_not_grow_the_log() {
        // Two thousand values, then one of them recorded again and again:
        // the log of a value seen again is rebuilt, not left to grow.
        let shape = Shape::new(60 * MIN);
        let mut d = Distinct::default();
        for v in 0..2_000u64 {
            d.add(shape, v as i64, v);
        }
        for i in 0..100_000i64 {
            assert_eq!(d.add(shape, 2_000 + i, 5), 2_000);
        }
        let Repr::Map(many) = &d.repr else {
            panic!("a map")
        };
        assert!(
            many.log.len() <= 2 * 2_000 + LIST_MAX,
            "log {}",
            many.log.len()
        );
    }

    #[test]
    fn snapshot_pairs_rebuild_the_same_counts() {
        let shape = Shape::new(10 * MIN);
        for n in [3u64, 200] {
            let mut d = Distinct::default();
            for v in 0..n {
                d.add(shape, v as i64 * 100, v);
            }
            let mut back = Distinct::from_seen(d.seen().collect());
            assert_eq!(back.len(), d.len());
            for ts in [n as i64 * 100, 5 * MIN, 10 * MIN + 5_000, 11 * MIN] {
                assert_eq!(
                    back.value(shape, ts),
                    d.clone().value(shape, ts),
                    "n {n} at {ts}"
                );
            }
        }
    }

    #[test]
    fn distinct_is_bounded() {
        let shape = Shape::new(60 * MIN);
        let mut d = Distinct::default();
        for i in 0..(MAX_DISTINCT as u64 + 100) {
            d.add(shape, i as i64, i);
        }
        assert_eq!(
            d.value(shape, MAX_DISTINCT as i64 + 100),
            MAX_DISTINCT as i64
        );
    }
}
