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

/// Distinct values with their last-seen times; exact up to [`MAX_DISTINCT`].
#[derive(Debug, Default, Clone)]
pub struct Distinct {
    seen: Entries<(u64, i64)>,
}

impl Distinct {
    /// Records `value` (a hash of the field) at `ts_ms` and returns the number of
    /// distinct values seen within the span as of `ts_ms`, this one included.
    pub fn add(&mut self, shape: Shape, ts_ms: i64, value: u64) -> i64 {
        match self.seen.iter_mut().find(|(v, _)| *v == value) {
            Some((_, last)) => *last = (*last).max(ts_ms),
            None => {
                if self.seen.len() >= MAX_DISTINCT {
                    self.prune(ts_ms - shape.span_ms);
                }
                if self.seen.len() >= MAX_DISTINCT {
                    if let Some(oldest) = (0..self.seen.len()).min_by_key(|&i| self.seen[i].1) {
                        self.seen.swap_remove(oldest);
                    }
                }
                push_small(&mut self.seen, (value, ts_ms));
            }
        }
        self.value(shape, ts_ms)
    }

    /// The distinct values seen within the span as of `ts_ms`. A value absent so
    /// far can be counted in with `extra` (a dry run, or a read that includes the
    /// current request without recording it).
    pub fn value_with(&mut self, shape: Shape, ts_ms: i64, extra: Option<u64>) -> i64 {
        let from = ts_ms - shape.span_ms;
        if self.seen.iter().any(|(_, t)| *t < from) && self.is_current(ts_ms) {
            self.prune(from);
        }
        let mut n = self
            .seen
            .iter()
            .filter(|(_, t)| *t >= from && *t <= ts_ms)
            .count() as i64;
        if let Some(x) = extra {
            if !self
                .seen
                .iter()
                .any(|(v, t)| *v == x && *t >= from && *t <= ts_ms)
            {
                n += 1;
            }
        }
        n
    }

    pub fn value(&mut self, shape: Shape, ts_ms: i64) -> i64 {
        self.value_with(shape, ts_ms, None)
    }

    fn is_current(&self, ts_ms: i64) -> bool {
        self.seen.iter().all(|(_, t)| *t <= ts_ms)
    }

    fn prune(&mut self, from: i64) {
        self.seen.retain(|(_, t)| *t >= from);
    }

    pub fn is_idle(&self, shape: Shape, now_ms: i64) -> bool {
        self.seen.iter().all(|(_, t)| *t < now_ms - shape.span_ms)
    }

    pub fn heap_bytes(&self) -> usize {
        heap_bytes(&self.seen)
    }

    /// The remembered (value, last seen) pairs (snapshots).
    pub fn seen(&self) -> &[(u64, i64)] {
        &self.seen
    }

    /// Rebuilds from remembered values (snapshots), keeping the most recent
    /// [`MAX_DISTINCT`].
    pub fn from_seen(mut seen: Vec<(u64, i64)>) -> Distinct {
        if seen.len() > MAX_DISTINCT {
            seen.sort_unstable_by_key(|(_, t)| std::cmp::Reverse(*t));
            seen.truncate(MAX_DISTINCT);
        }
        Distinct {
            seen: Entries::from_vec(seen),
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
