//! The embedded in-memory store (the default): dashmap shards, a request's
//! keys looked up together under their shards' locks, bounded by a cap on
//! tracked keys.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::LocalKey;

use dashmap::DashMap;
use riskgate_alloc::{prefetch, prefetch_slice};
use smallvec::SmallVec;

use super::kept::{KeptFacts, PackedRecord};
use super::profile::{Profile, ProfileView};
use super::snapshot::{self, Put, Section, SnapshotError, SnapshotStats};
use super::window::{Distinct, Series, Shape};
use super::{fnv1a, Aggregate, Begun, Conflict, Counts, KeyGroup, Touch, Window, WindowPlan};
use crate::decision::{Action, Decision};
use crate::geo::Location;
use crate::model::{Facts, Field, Login, OutcomeKind, Recharge};

/// Limits of the in-memory store.
#[derive(Debug, Clone)]
pub struct MemoryLimits {
    /// Most keys held at once (a user's profile lives in the user's key);
    /// past it the least recently used are evicted.
    pub max_tracked_keys: usize,
    /// Most idempotency records held at once (least recently used evicted).
    pub max_idempotency_records: usize,
    /// How long a decision is remembered for replays and outcomes.
    pub idempotency_ttl_ms: i64,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        MemoryLimits {
            max_tracked_keys: 2_000_000,
            max_idempotency_records: 2_000_000,
            idempotency_ttl_ms: 24 * 3_600_000,
        }
    }
}

/// A decided request, kept for replays and outcomes.
#[derive(Debug)]
pub struct Settled {
    pub decision: Arc<Decision>,
    pub facts: Facts,
    pub location: Option<Arc<Location>>,
}

/// A decided request as its idempotency record keeps it: the answer to
/// replay, and what its outcomes need, the decision and the facts packed
/// into one block ([`PackedRecord`]): records live for a day, per request.
#[derive(Debug)]
pub struct KeptDecision {
    /// Packed, not shared with the reply (see [`PackedRecord`]).
    record: PackedRecord,
    pub location: Option<Arc<Location>>,
}

impl KeptDecision {
    pub fn new(settled: &Settled) -> KeptDecision {
        KeptDecision {
            record: PackedRecord::pack(&settled.decision, &settled.facts),
            location: settled.location.clone(),
        }
    }

    /// The decision, unpacked (replays).
    pub fn decision(&self) -> Decision {
        self.record.decision()
    }

    /// The decided action, without unpacking the rest.
    pub fn action(&self) -> Action {
        self.record.action()
    }

    /// The request's facts, read in place.
    pub fn facts(&self) -> KeptFacts<'_> {
        self.record.facts()
    }

    /// The decision with its facts unpacked (outcomes).
    pub fn settled(&self) -> Settled {
        Settled {
            decision: Arc::new(self.decision()),
            facts: self.facts().facts(),
            location: self.location.clone(),
        }
    }
}

/// An idempotency record. The call that creates it (see
/// [`MemoryStore::claim`]) decides and fills `settled`; concurrent retries of
/// the same id wait for it instead of deciding again, so a retry storm can
/// never double-count.
///
/// A std `OnceLock`, not tokio's `OnceCell`: deciding in memory never
/// awaits, so the creator decides synchronously and sets the cell, with no
/// semaphore per record and no future holding the request across an await.
#[derive(Debug)]
pub struct IdemEntry {
    pub fingerprint: u64,
    pub created_ms: i64,
    pub settled: OnceLock<KeptDecision>,
    /// Outcome bits ([`OutcomeKind::bit`]), [`RELEASED`] and [`ABANDONED`].
    flags: AtomicU8,
}

/// The creator of a record gave up before settling it (it panicked): the
/// next claim of the id decides afresh, and waiters stop waiting.
const ABANDONED: u8 = 0x80;

/// An outcome took the request's reservation back (see
/// [`super::releases`]): no later one does it again.
const RELEASED: u8 = 0x40;

/// What marking an outcome on a record found ([`IdemEntry::mark_outcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeMark {
    /// This call marked the outcome. `release`: it also took the request's
    /// one release, and must take the reservation back.
    Fresh { release: bool },
    /// The outcome was marked before: nothing to apply.
    Seen,
    /// An outcome marked before contradicts this one
    /// ([`OutcomeKind::contradicts`]): refused.
    Contradicts(OutcomeKind),
}

impl IdemEntry {
    /// Marks an outcome as applied, in one atomic step with the checks:
    /// seen before, contradicted by an earlier outcome, and (for an outcome
    /// that `release`s) whether the request's reservation is still held.
    pub fn mark_outcome(&self, kind: OutcomeKind, release: bool) -> OutcomeMark {
        let mut found = OutcomeMark::Seen;
        let _ = self
            .flags
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |flags| {
                if flags & kind.bit() != 0 {
                    found = OutcomeMark::Seen;
                    return None;
                }
                let earlier = OutcomeKind::ALL
                    .into_iter()
                    .find(|k| flags & k.bit() != 0 && kind.contradicts(*k));
                if let Some(earlier) = earlier {
                    found = OutcomeMark::Contradicts(earlier);
                    return None;
                }
                let release = release && flags & RELEASED == 0;
                found = OutcomeMark::Fresh { release };
                Some(flags | kind.bit() | if release { RELEASED } else { 0 })
            });
        found
    }

    /// Marks the record as given up by its creator, unless it was settled.
    pub fn abandon(&self) {
        if self.settled.get().is_none() {
            self.flags.fetch_or(ABANDONED, Ordering::AcqRel);
        }
    }

    pub fn is_abandoned(&self) -> bool {
        self.flags.load(Ordering::Acquire) & ABANDONED != 0
    }
}

pub struct Claim {
    pub entry: Arc<IdemEntry>,
    /// The record was created by this claim.
    pub fresh: bool,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StoreStats {
    /// Keys held: window keys, a user's key holding the profile among them.
    pub window_keys: usize,
    /// User profiles (each inside its user's key).
    pub profiles: usize,
    pub idempotency_records: usize,
    pub evicted: u64,
}

pub struct MemoryStore {
    /// Window keys; a user's key ("user_id\x1fU") also holds the user's
    /// profile, so a request that reads the user's windows finds the profile
    /// under the same lock, with no lookup of its own, and the windows of
    /// groups keyed by the user and more fields (see [`Home`]).
    windows: Bounded<Slot>,
    requests: Bounded<Option<Arc<IdemEntry>>>,
    limits: MemoryLimits,
    /// One snapshot write at a time (the periodic one and the final one).
    snapshotting: Mutex<()>,
}

/// All windows of one key, and for a user's key the user's profile.
#[derive(Debug, Default)]
struct Slot {
    /// (window signature, span in ms, state): only windows this key has
    /// recorded into; a window that is only read holds nothing.
    windows: Vec<(u64, i64, Agg)>,
    /// Boxed: most keys are not users' keys, and 8 bytes keep a map entry
    /// small (72 bytes with its key, see [`INLINE`]).
    profile: Option<Box<Profile>>,
}

/// The prefix of a user's key, where the profile lives: the key of a window
/// group on `user_id` alone, so a pack with such windows (the shipped one
/// has several) reads them and the profile in one lookup.
const USER_PREFIX: &str = "user_id";

thread_local! {
    /// This thread's buffer for building map keys. Every request builds
    /// several keys; a fresh `String` for each was an allocation apiece.
    static KEY: Cell<String> = const { Cell::new(String::new()) };
    /// This thread's buffer for a request's keys side by side (see
    /// [`MemoryStore::touch_windows`]).
    static KEYS: Cell<String> = const { Cell::new(String::new()) };
}

/// Runs `f` with one of this thread's buffers (taken, not borrowed: a
/// nested call just starts a buffer of its own).
fn with_buffer<R>(buffer: &'static LocalKey<Cell<String>>, f: impl FnOnce(&mut String) -> R) -> R {
    let mut text = buffer.take();
    let out = f(&mut text);
    buffer.set(text);
    out
}

/// Runs `f` with this thread's key buffer.
fn with_key<R>(f: impl FnOnce(&mut String) -> R) -> R {
    with_buffer(&KEY, f)
}

/// A user's key ("user_id\x1fU") into `key`.
fn user_key(user_id: &str, key: &mut String) {
    key.clear();
    key.push_str(USER_PREFIX);
    key.push('\x1f');
    key.push_str(user_id);
}

impl Marked for Slot {
    fn is_marked(&self) -> bool {
        self.profile.is_some()
    }
}

impl Marked for Option<Arc<IdemEntry>> {}

#[derive(Debug)]
enum Agg {
    Series(Series),
    Distinct(Distinct),
}

impl Agg {
    fn prefetch(&self) {
        match self {
            Agg::Series(s) => s.prefetch(),
            Agg::Distinct(d) => d.prefetch(),
        }
    }

    /// Whether the window (of span `span_ms`) reads 0 from `now_ms` on.
    fn is_idle(&self, span_ms: i64, now_ms: i64) -> bool {
        match self {
            Agg::Series(s) => s.is_idle(Shape::new(span_ms), now_ms),
            Agg::Distinct(d) => d.is_idle(Shape::new(span_ms), now_ms),
        }
    }
}

impl Slot {
    /// The state kept under signature `sig` (see [`Home`]).
    fn find(&mut self, sig: u64) -> Option<&mut Agg> {
        self.windows
            .iter_mut()
            .find(|(s, _, _)| *s == sig)
            .map(|(_, _, agg)| agg)
    }

    /// The state of window `w` kept under `sig`, created when absent.
    fn agg(&mut self, w: &Window, sig: u64) -> &mut Agg {
        let at = match self.windows.iter().position(|(s, _, _)| *s == sig) {
            Some(at) => at,
            None => {
                let agg = match w.aggregate {
                    Aggregate::Distinct(_) => Agg::Distinct(Distinct::default()),
                    _ => Agg::Series(Series::default()),
                };
                if self.windows.len() == self.windows.capacity() {
                    // A step at a time (see `make_room` for new keys).
                    self.windows.reserve_exact((self.windows.len() / 2).max(1));
                }
                self.windows.push((sig, w.shape.span_ms, agg));
                self.windows.len() - 1
            }
        };
        &mut self.windows[at].2
    }

    /// A new key gets room for the `n` windows it is about to record into in
    /// one allocation, not one growth step per window.
    fn make_room(&mut self, n: usize) {
        if self.windows.is_empty() {
            self.windows.reserve_exact(n);
        }
    }

    /// Keeps a user's slot within [`SLOT_WINDOWS`] entries with room for
    /// `room` more: the user's own windows (`own`) always stay; of the rest
    /// (one per order, see [`Home`], and windows of older packs), first the
    /// idle ones go, then the oldest. A user who sends order after distinct
    /// order would otherwise grow the list, and the scan every request of
    /// theirs makes under the shard lock, without bound; with the cap only
    /// the oldest orders' windows are forgotten, and none of the windows the
    /// user is judged by (amounts, bursts) can be pushed out.
    fn shed(&mut self, own: impl Fn(u64) -> bool, now_ms: i64, room: usize) {
        self.windows
            .retain(|(sig, span, agg)| own(*sig) || !agg.is_idle(*span, now_ms));
        while self.windows.len() + room > SLOT_WINDOWS {
            match self.windows.iter().position(|(sig, _, _)| !own(*sig)) {
                Some(oldest) => self.windows.remove(oldest),
                None => break,
            };
        }
    }

    /// The first of two steps that ask for a slot's state ahead (see
    /// [`MemoryStore::touch_windows`]): every line of the window list, and
    /// the profile's box.
    fn prefetch_lists(&self) {
        prefetch_slice(&self.windows);
        if let Some(p) = self.profile.as_deref() {
            prefetch(p);
        }
    }

    /// The second: what the list and the profile point to (each window's
    /// buckets, the profile's recent regions), once they are in.
    fn prefetch_state(&self) {
        for (_, _, agg) in &self.windows {
            agg.prefetch();
        }
        if let Some(p) = self.profile.as_deref() {
            p.prefetch();
        }
    }

    fn profile(&mut self) -> &mut Profile {
        self.profile.get_or_insert_default()
    }

    fn view(slot: Option<&Slot>, ts: i64, span: i64, loc: Option<&Location>) -> ProfileView {
        match slot.and_then(|s| s.profile.as_deref()) {
            Some(p) => p.view(ts, span, loc),
            None => Profile::default().view(ts, span, loc),
        }
    }

    /// Drops the windows that are idle at `now_ms` (every one of them
    /// reads 0 by then) and says whether nothing live is left. A user's
    /// slot needs the first part: it lives as long as the profile, and
    /// gathers a window per order of its user (see [`Home`]).
    fn expire(&mut self, now_ms: i64, profile_span_ms: i64) -> bool {
        self.windows
            .retain(|(_, span, agg)| !agg.is_idle(*span, now_ms));
        if self.windows.capacity() > 2 * self.windows.len() + 4 {
            self.windows.shrink_to_fit();
        }
        self.windows.is_empty()
            && self
                .profile
                .as_ref()
                .is_none_or(|p| p.is_idle(now_ms, profile_span_ms))
    }
}

impl MemoryStore {
    pub fn new(limits: MemoryLimits) -> MemoryStore {
        MemoryStore {
            windows: Bounded::new(limits.max_tracked_keys),
            requests: Bounded::new(limits.max_idempotency_records),
            limits,
            snapshotting: Mutex::new(()),
        }
    }

    /// Finds or creates the record of `request_id`. The caller that created
    /// it (`fresh`) must decide and set `settled`, or [`IdemEntry::abandon`]
    /// it; an abandoned record is replaced by the next claim.
    pub fn claim(&self, request_id: &str, fingerprint: u64) -> Result<Claim, Conflict> {
        let now = crate::now_ms();
        let mut fresh = false;
        // Most ids are new: one lookup that inserts, not a read first.
        let entry = self.requests.upsert(request_id, |slot| match slot {
            Some(e) if !e.is_abandoned() => e.clone(),
            _ => {
                fresh = true;
                slot.insert(Arc::new(IdemEntry {
                    fingerprint,
                    created_ms: now,
                    settled: OnceLock::new(),
                    flags: AtomicU8::new(0),
                }))
                .clone()
            }
        });
        if entry.fingerprint != fingerprint {
            return Err(Conflict(request_id.to_string()));
        }
        Ok(Claim { entry, fresh })
    }

    pub fn find(&self, request_id: &str) -> Option<Arc<IdemEntry>> {
        self.requests
            .read(request_id, |slot| slot.and_then(|s| s.clone()))
    }

    pub fn begin(
        &self,
        plan: &WindowPlan,
        recharge: &Recharge,
        location: Option<&Location>,
        record: bool,
    ) -> Begun {
        let facts = &recharge.facts;
        let (ts, span) = (facts.timestamp_ms, plan.profile_span_ms);
        let mut values = vec![0i64; plan.windows.len()];
        let mut profile = None;
        let on_user = |slot: Option<&mut Slot>| {
            profile = Some(Slot::view(slot.as_deref(), ts, span, location));
        };
        self.touch_windows(
            plan,
            facts,
            &mut values,
            |w| Touch::of_recharge(w, facts, record),
            on_user,
        );
        // A pack with no window on `user_id` alone: the profile's own lookup.
        let profile = profile.unwrap_or_else(|| {
            with_key(|key| {
                user_key(&facts.user_id, key);
                self.windows
                    .read(key, |slot| Slot::view(slot, ts, span, location))
            })
        });
        Begun {
            windows: values,
            profile,
        }
    }

    /// `learn`: the request may teach the user's profile its region (an
    /// allow with no location anomaly behind it).
    pub fn settle(
        &self,
        plan: &WindowPlan,
        facts: &Facts,
        action: Action,
        learn: bool,
        location: Option<&Location>,
    ) {
        if action == Action::Block {
            self.release(plan, facts);
        }
        if let Some(loc) = location {
            let ts = facts.timestamp_ms;
            self.update_profile(&facts.user_id, |p| {
                p.saw(ts, loc);
                if learn {
                    p.learn(ts, loc);
                }
            });
        }
    }

    pub fn record_login(&self, plan: &WindowPlan, login: &Login, location: Option<&Location>) {
        let want = if login.succeeded {
            Counts::LoginSucceeded
        } else {
            Counts::LoginFailed
        };
        let facts = login.facts();
        let mut values = vec![0i64; plan.windows.len()];
        let how = |w: &Window| {
            if w.counts == want {
                Touch::Record(w.delta(&facts))
            } else {
                Touch::Read
            }
        };
        self.touch_windows(plan, &facts, &mut values, how, |_| {});
        if login.succeeded {
            let (ts, span) = (login.timestamp_ms, plan.profile_span_ms);
            self.update_profile(&login.user_id, |p| p.login(ts, span, location));
        } else if let Some(loc) = location {
            self.update_profile(&login.user_id, |p| p.saw(login.timestamp_ms, loc));
        }
    }

    /// Applies an outcome that [`IdemEntry::mark_outcome`] marked;
    /// `release` as it said.
    pub fn apply_outcome(
        &self,
        plan: &WindowPlan,
        settled: &Settled,
        kind: OutcomeKind,
        ts_ms: i64,
        release: bool,
    ) {
        let facts = &settled.facts;
        let decided = settled.decision.action;
        if release {
            self.release(plan, facts);
        }
        // A challenge outcome of a request that was never challenged is a
        // caller's mistake: it must not count against the user.
        let challenge_kind = matches!(
            kind,
            OutcomeKind::ChallengeFailed | OutcomeKind::ChallengePassed
        );
        if challenge_kind && decided != Action::Challenge {
            return;
        }
        if let Some(want) = Counts::of_outcome(kind) {
            let at = Facts {
                timestamp_ms: ts_ms,
                ..facts.clone()
            };
            let mut values = vec![0i64; plan.windows.len()];
            let how = |w: &Window| {
                if w.counts == want && facts.amount >= w.min_amount {
                    Touch::Record(w.delta(&at))
                } else {
                    Touch::Read
                }
            };
            self.touch_windows(plan, &at, &mut values, how, |_| {});
        }
        if kind == OutcomeKind::ChallengePassed {
            if let Some(loc) = settled.location.as_deref() {
                self.update_profile(&facts.user_id, |p| p.learn(facts.timestamp_ms, loc));
            }
        }
    }

    /// Runs `f` on the user's profile, creating it (and the user's key)
    /// when absent.
    fn update_profile(&self, user_id: &str, f: impl FnOnce(&mut Profile)) {
        with_key(|key| {
            user_key(user_id, key);
            self.windows.update(key, |slot| f(slot.profile()));
        })
    }

    /// Takes a request's reservation back out of every `allowed` window.
    fn release(&self, plan: &WindowPlan, facts: &Facts) {
        with_key(|key| {
            for_each_home(plan, facts, key, |key, held, _| {
                let releases = |i: usize| plan.windows[i].releases(facts);
                if !held.indices().any(releases) {
                    return;
                }
                self.windows.read_mut(key, |slot| {
                    let Some(slot) = slot else { return };
                    for (i, sig) in held.windows().filter(|&(i, _)| releases(i)) {
                        let w = &plan.windows[i];
                        if let Some(Agg::Series(s)) = slot.find(sig) {
                            s.remove(w.shape, facts.timestamp_ms, w.delta(facts));
                        }
                    }
                });
            })
        })
    }

    /// Visits every key the request's windows live under, all under their
    /// shards' locks at once ([`Bounded::visit_many`]; one key at a time when
    /// two share a shard), recording and/or reading each window there as
    /// `how` says. Under the user's key, `on_user` sees the slot too.
    fn touch_windows(
        &self,
        plan: &WindowPlan,
        facts: &Facts,
        values: &mut [i64],
        how: impl Fn(&Window) -> Touch,
        mut on_user: impl FnMut(Option<&mut Slot>),
    ) {
        let ts = facts.timestamp_ms;
        // One key's windows: `records` of them record (so an absent key is
        // created for them), the rest are read.
        let mut visit = |mut slot: Option<&mut Slot>,
                         held: &Held<'_>,
                         user: bool,
                         records: usize,
                         values: &mut [i64]| {
            if let Some(slot) = slot.as_deref_mut() {
                if slot.windows.len() + records > SLOT_WINDOWS {
                    slot.shed(|sig| held.owns(sig), ts, records);
                }
                slot.make_room(records);
            }
            for (i, sig) in held.windows() {
                let w = &plan.windows[i];
                values[i] = touch(slot.as_deref_mut(), w, sig, how(w), ts);
            }
            if user {
                on_user(slot);
            }
        };
        // This thread's buffers: every request builds several keys.
        with_key(|key| {
            with_buffer(&KEYS, |all| {
                // Every key first, then all of them under their locks at once
                // (see `Bounded::visit_many`).
                let mut homes: SmallVec<[Visit<'_>; MANY]> = SmallVec::new();
                all.clear();
                for_each_home(plan, facts, key, |key, held, user| {
                    let records = held
                        .indices()
                        .filter(|&i| matches!(how(&plan.windows[i]), Touch::Record(_)))
                        .count();
                    let start = all.len();
                    all.push_str(key);
                    homes.push(Visit {
                        at: start..all.len(),
                        held,
                        user,
                        records,
                    });
                });
                let keys: SmallVec<[(&str, bool); MANY]> = homes
                    .iter()
                    .map(|v| (&all[v.at.clone()], v.records > 0))
                    .collect();
                let together = self.windows.visit_many(&keys, |slots| {
                    // Each slot's window list and the user's profile are more
                    // misses, and so is what they point to (a window's
                    // buckets on the heap, the profile's regions): ask for
                    // them all, a level at a time, before the work on the
                    // first, so they overlap too.
                    for slot in slots.iter().flatten() {
                        slot.prefetch_lists();
                    }
                    for slot in slots.iter().flatten() {
                        slot.prefetch_state();
                    }
                    for (v, slot) in homes.iter().zip(slots) {
                        visit(slot.as_deref_mut(), &v.held, v.user, v.records, values);
                    }
                });
                if together.is_some() {
                    return;
                }
                // Two keys on one shard (or more keys than `MANY`): one at a time.
                for (v, (key, _)) in homes.iter().zip(&keys) {
                    let (held, user, records) = (&v.held, v.user, v.records);
                    if records > 0 {
                        self.windows
                            .update(key, |slot| visit(Some(slot), held, user, records, values));
                    } else {
                        self.windows
                            .read_mut(key, |slot| visit(slot, held, user, records, values));
                    }
                }
            })
        })
    }

    /// Drops idle keys and expired idempotency records. Run periodically.
    pub fn expire(&self, now_ms: i64, profile_span_ms: i64) {
        self.windows
            .retain_mut(|slot| !slot.expire(now_ms, profile_span_ms));
        let ttl = self.limits.idempotency_ttl_ms;
        self.requests
            .retain(|e| e.as_ref().is_some_and(|e| e.created_ms + ttl > now_ms));
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            window_keys: self.windows.len(),
            profiles: self.windows.marked(),
            idempotency_records: self.requests.len(),
            evicted: self.windows.evicted() + self.requests.evicted(),
        }
    }

    /// Writes every window key, profile and idempotency record to `path`
    /// (see [`snapshot`] for the format and how the file is replaced).
    /// Serving goes on meanwhile: one shard is read-locked at a time.
    pub fn save_snapshot(&self, path: &Path) -> Result<SnapshotStats, SnapshotError> {
        let _one = self.snapshotting.lock().unwrap_or_else(|e| e.into_inner());
        let started = std::time::Instant::now();
        let mut out = snapshot::Writer::create(path)?;

        let clock = self.windows.clock();
        out.section(Section::Windows, clock)?;
        for e in self.windows.map.iter() {
            if e.value.windows.is_empty() {
                continue; // a user's key holding only the profile
            }
            out.record(|enc| {
                // "user_id\x1fu1": the prefix is shared by many keys.
                let key = e.key().as_str();
                let at = key.find('\x1f').unwrap_or(key.len());
                enc.sym(&key[..at]);
                enc.b.put_str(&key[at..]);
                enc.b.put_var(clock.saturating_sub(e.touched));
                put_slot(enc, &e.value);
            })?;
        }

        // Profiles by user id, as the format has them (their keys' clock).
        out.section(Section::Profiles, clock)?;
        for e in self.windows.map.iter() {
            let Some(profile) = &e.value.profile else {
                continue;
            };
            let key = e.key().as_str();
            let user_id = key.strip_prefix(USER_PREFIX).unwrap_or(key);
            out.record(|enc| {
                enc.b
                    .put_str(user_id.strip_prefix('\x1f').unwrap_or(user_id));
                enc.b.put_var(clock.saturating_sub(e.touched));
                snapshot::put_profile(enc, profile);
            })?;
        }

        let clock = self.requests.clock();
        out.section(Section::Requests, clock)?;
        for e in self.requests.map.iter() {
            let Some(entry) = &e.value else { continue };
            out.record(|enc| {
                let key = e.key().as_str();
                enc.b.put_str(key);
                enc.b.put_var(clock.saturating_sub(e.touched));
                put_idem(enc, key, entry);
            })?;
        }

        let mut stats = out.finish()?;
        stats.millis = started.elapsed().as_millis() as u64;
        Ok(stats)
    }

    /// Loads a snapshot written by [`MemoryStore::save_snapshot`] into this
    /// store (meant for an empty one, at start). The whole file is checked
    /// (end marker, checksum) before anything is loaded; the caps hold, the
    /// least recently used records going first. Idle keys and expired
    /// records are left to the next sweep.
    pub fn load_snapshot(&self, path: &Path) -> Result<SnapshotStats, SnapshotError> {
        let started = std::time::Instant::now();
        let mut r = snapshot::Reader::open(path)?;
        let evicted_before = self.stats().evicted;
        let mut stats = SnapshotStats::default();
        while let Some((section, clock)) = r.section()? {
            while r.record()? {
                let key = match section {
                    Section::Windows => {
                        let prefix = r.sym()?;
                        let rest = r.string()?;
                        let mut key = String::with_capacity(prefix.len() + rest.len());
                        key.push_str(&prefix);
                        key.push_str(&rest);
                        key.into_boxed_str()
                    }
                    _ => r.string()?.into_boxed_str(),
                };
                let touched = clock.saturating_sub(r.var()?);
                match section {
                    Section::Windows => {
                        let windows = get_windows(&mut r)?;
                        self.windows
                            .restore(&key, touched, |slot| slot.windows = windows);
                        stats.window_keys += 1;
                    }
                    Section::Profiles => {
                        let profile = Box::new(snapshot::get_profile(&mut r)?);
                        let mut user = String::new();
                        user_key(&key, &mut user);
                        self.windows
                            .restore(&user, touched, |slot| slot.profile = Some(profile));
                        stats.profiles += 1;
                    }
                    Section::Requests => {
                        let entry = Some(Arc::new(get_idem(&mut r, &key)?));
                        self.requests.restore(&key, touched, |slot| *slot = entry);
                        stats.idempotency_records += 1;
                    }
                }
            }
        }
        r.finish()?;
        stats.bytes = std::fs::metadata(path).map_or(0, |m| m.len());
        stats.evicted = self.stats().evicted - evicted_before;
        stats.millis = started.elapsed().as_millis() as u64;
        Ok(stats)
    }
}

/// A window key's slot: per window, its definition (signature, span, kind)
/// and state; bucket indexes as deltas from the snapshot's own bucket.
fn put_slot(enc: &mut snapshot::Enc, slot: &Slot) {
    enc.b.put_var(slot.windows.len() as u64);
    for (sig, span, agg) in &slot.windows {
        match agg {
            Agg::Series(s) => {
                enc.def(*sig, *span, 0);
                let buckets = s.buckets();
                enc.b.put_var(buckets.len() as u64);
                let mut prev = Shape::new(*span).bucket(enc.base());
                for &(bucket, value) in buckets {
                    enc.b.put_i64(bucket.wrapping_sub(prev));
                    enc.b.put_i64(value);
                    prev = bucket;
                }
            }
            Agg::Distinct(d) => {
                enc.def(*sig, *span, 1);
                enc.b.put_var(d.len() as u64);
                for (value, ts) in d.seen() {
                    enc.b.put_u64(value);
                    enc.time(ts);
                }
            }
        }
    }
}

fn get_windows(r: &mut snapshot::Reader) -> Result<Vec<(u64, i64, Agg)>, SnapshotError> {
    // A window is at least 2 bytes: a definition reference and a count.
    let n = r.count(2)?;
    let mut windows = Vec::with_capacity(n);
    for _ in 0..n {
        let (sig, span, kind) = r.def()?;
        if span <= 0 {
            return Err(r.corrupt(format!("window span {span}")));
        }
        let agg = match kind {
            0 => {
                let m = r.count(2)?;
                let mut buckets = Vec::with_capacity(m);
                let mut prev = Shape::new(span).bucket(r.base());
                for _ in 0..m {
                    let bucket = prev.wrapping_add(r.i64()?);
                    buckets.push((bucket, r.i64()?));
                    prev = bucket;
                }
                Agg::Series(
                    Series::from_buckets(buckets)
                        .ok_or_else(|| r.corrupt("window buckets out of order"))?,
                )
            }
            1 => {
                let m = r.count(9)?;
                let mut seen = Vec::with_capacity(m);
                for _ in 0..m {
                    seen.push((r.u64()?, r.time()?));
                }
                Agg::Distinct(Distinct::from_seen(seen))
            }
            other => return Err(r.corrupt(format!("unknown window kind {other}"))),
        };
        windows.push((sig, span, agg));
    }
    Ok(windows)
}

/// An idempotency record: a settled one with its decision, facts and
/// location; one still being decided (or an event id, which never settles)
/// as a bare claim, so a retry after a restart is checked against it.
fn put_idem(enc: &mut snapshot::Enc, key: &str, e: &IdemEntry) {
    enc.b.put_u64(e.fingerprint);
    enc.time(e.created_ms);
    enc.b.put_u8(e.flags.load(Ordering::Acquire));
    match e.settled.get() {
        None => enc.b.put_u8(0),
        Some(s) => {
            enc.b.put_u8(1);
            snapshot::put_decision(enc, &s.decision(), key);
            snapshot::put_facts(enc, &s.facts());
            enc.place(s.location.as_deref());
        }
    }
}

fn get_idem(r: &mut snapshot::Reader, key: &str) -> Result<IdemEntry, SnapshotError> {
    let fingerprint = r.u64()?;
    let created_ms = r.time()?;
    let flags = r.u8()?;
    let settled = match r.u8()? {
        0 => None,
        1 => Some(KeptDecision::new(&Settled {
            decision: Arc::new(snapshot::get_decision(r, key)?),
            facts: snapshot::get_facts(r)?,
            location: r.place()?,
        })),
        other => return Err(r.corrupt(format!("settled flag {other}"))),
    };
    // A request still being decided when the snapshot was written: its
    // decider went with the process. Abandoned, so that a retry decides
    // afresh instead of waiting for a decision that never comes. (Keys that
    // start with a control character are not request ids, which cannot hold
    // one: a login's event id never holds a decision, and stays as it was.)
    let flags = match &settled {
        None if !key.starts_with('\u{1e}') => flags | ABANDONED,
        _ => flags,
    };
    let cell = OnceLock::new();
    if let Some(settled) = settled {
        let _ = cell.set(settled);
    }
    Ok(IdemEntry {
        fingerprint,
        created_ms,
        settled: cell,
        flags: AtomicU8::new(flags),
    })
}

/// Where a group's windows live in memory.
///
/// Most groups have a key of their own: "ip\x1f192.0.2.1" holds every window
/// on `ip`. A group led by `user_id` with more fields after it (the shipped
/// `same_order_10m` on user, target and amount) lives in the user's slot
/// instead, each of its windows under a signature of the window's and the
/// rest of the key's: such a key is new on nearly every request (one per
/// order), and as a key of its own each cost a map insert, a heap key and
/// a slot, where in the user's slot, already locked for the user's windows,
/// it costs an entry in a short list. Expiry drops the entry once idle,
/// and [`Slot::shed`] keeps the list short for a user who floods orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    Own,
    User,
}

impl Home {
    fn of(group: &KeyGroup) -> Home {
        if group.fields.first() == Some(&Field::UserId) {
            Home::User
        } else {
            Home::Own
        }
    }
}

/// The windows one key holds for one request: per group, its windows and
/// the hash of the rest of its key (0 for a group with a key of its own,
/// whose windows go by their own signatures; see [`Home`]).
struct Held<'p> {
    plan: &'p WindowPlan,
    parts: SmallVec<[(&'p [usize], u64); 4]>,
}

/// One key a request visits ([`MemoryStore::touch_windows`]): where its text
/// lies in the buffer of the request's keys, the windows it holds, whether
/// it is the user's key, and how many of its windows record.
struct Visit<'p> {
    at: std::ops::Range<usize>,
    held: Held<'p>,
    user: bool,
    records: usize,
}

/// Most windows one slot holds (see [`Slot::shed`]): far more than a pack
/// has windows per key, and than the distinct orders an honest user places
/// within an order window's span.
const SLOT_WINDOWS: usize = 64;

impl<'p> Held<'p> {
    /// Whether `sig` is a window of a group stored under its own signature
    /// (not one of many orders).
    fn owns(&self, sig: u64) -> bool {
        self.parts.iter().any(|&(windows, rest)| {
            rest == 0 && windows.iter().any(|&i| self.plan.windows[i].sig == sig)
        })
    }

    /// The index in the plan of each window held (no signatures computed).
    fn indices(&self) -> impl Iterator<Item = usize> + use<'_, 'p> {
        self.parts
            .iter()
            .flat_map(|&(windows, _)| windows.iter().copied())
    }

    /// (index in the plan, signature in the slot) of each window held.
    fn windows(&self) -> impl Iterator<Item = (usize, u64)> + use<'_, 'p> {
        self.parts.iter().flat_map(move |&(windows, rest)| {
            windows.iter().map(move |&i| {
                let sig = self.plan.windows[i].sig;
                match rest {
                    0 => (i, sig),
                    _ => (i, fnv1a(&[&sig.to_le_bytes(), &rest.to_le_bytes()])),
                }
            })
        })
    }
}

/// Calls `visit(key, held, user)` once per key that holds windows of the
/// plan, for the request's facts; `user` is true for the user's key (which
/// [`Home::User`] groups share, see [`Home`]). Groups with an empty field
/// do not apply. `key` is the buffer the keys are built in.
fn for_each_home<'p>(
    plan: &'p WindowPlan,
    facts: &Facts,
    key: &mut String,
    mut visit: impl FnMut(&str, Held<'p>, bool),
) {
    let mut user = Held {
        plan,
        parts: SmallVec::new(),
    };
    for group in &plan.groups {
        if !group.key(facts, key) {
            continue;
        }
        let windows = group.windows.as_slice();
        if Home::of(group) == Home::Own {
            let mut parts = SmallVec::new();
            parts.push((windows, 0));
            visit(key, Held { plan, parts }, false);
        } else if group.fields.len() == 1 {
            user.parts.push((windows, 0));
        } else {
            // Never 0 in practice, and 1 in its place would do as well.
            let rest = fnv1a(&[key.as_bytes()]).max(1);
            user.parts.push((windows, rest));
        }
    }
    if !user.parts.is_empty() {
        user_key(&facts.user_id, key);
        visit(key, user, true);
    }
}

/// Records into and/or reads one window of one key, kept there under `sig`
/// (see [`Home`]). Reads of a window the key never recorded into create
/// nothing.
fn touch(slot: Option<&mut Slot>, w: &Window, sig: u64, how: Touch, ts: i64) -> i64 {
    let distinct = matches!(w.aggregate, Aggregate::Distinct(_));
    match (slot, how) {
        (Some(slot), Touch::Record(d)) => match slot.agg(w, sig) {
            Agg::Series(s) => s.add(w.shape, ts, d),
            Agg::Distinct(s) => s.add(w.shape, ts, d as u64),
        },
        (Some(slot), Touch::Include(d)) => match slot.find(sig) {
            Some(Agg::Series(s)) => s.value(w.shape, ts) + d,
            Some(Agg::Distinct(s)) => s.value_with(w.shape, ts, Some(d as u64)),
            None if distinct => 1,
            None => d,
        },
        (Some(slot), Touch::Read) => match slot.find(sig) {
            Some(Agg::Series(s)) => s.value(w.shape, ts),
            Some(Agg::Distinct(s)) => s.value(w.shape, ts),
            None => 0,
        },
        // Nothing stored for the key: only an included request counts.
        (None, Touch::Include(_)) if distinct => 1,
        (None, Touch::Include(d)) => d,
        (None, _) => 0,
    }
}

/// Shards per map (a power of two). A shard that grows rehashes every key
/// it holds in one go, under its lock: a cache miss per key, which the
/// requests queued behind it on that core wait for. With 2,048 shards a
/// map of two million keys grows in steps of about a thousand keys, a
/// quarter of what 512 shards took (open loop at 55,000 requests/s on a
/// fresh server: p99 1.81-2.09 ms with 512, 1.61-1.67 ms with 2,048).
/// Sizing the maps for their caps at the start instead, which avoids the
/// steps altogether, spread a small store over the whole table: every
/// lookup a miss, and the whole table resident within minutes.
const SHARDS: usize = 2048;

/// Keys a shard holds at the cap, on average, from which a map past its
/// cap evicts from one shard ([`Bounded::evict`]): a cap of 32,768 keys and
/// more. Below, a shard is too small a sample of the map's ages (at 16, the
/// oldest of a shard is about as good a choice as Redis's default sample of
/// five gives), and a walk of every key is short anyway.
const SHARD_EVICTION_MIN: usize = 16;

/// Most shards one over-cap insert evicts from before it walks every key
/// ([`Bounded::evict`]): at [`SHARD_EVICTION_MIN`] keys a shard, one shard
/// may give up a single key, and a request creates up to [`MANY`].
const EVICT_SHARDS: usize = 2 * MANY;

/// Key bytes held inline: with the tag and length, a [`Key`] is 32 bytes.
///
/// 30, not the 22 that a 24-byte key holds: a key is its group's prefix
/// and a separator before the id ("user_id\x1f", 8 bytes; "device_id\x1f",
/// 10), so 22 bytes left room for ids of 12 to 14 characters, and real ids
/// are longer (a 19-digit account number, a 16-hex-digit Android id, most
/// IPv6 addresses). A key on the heap costs every lookup a second dependent
/// cache miss, to compare it: with loadgen's 16-character ids, the three
/// keys of a request inline took a fresh server from 78,400-79,600 to
/// 79,700-79,800 requests/s. Ids that fitted before cost 8 bytes more a
/// slot (1,000,000 users: 701.5 MiB against 670.9).
const INLINE: usize = 30;

/// A map key: up to [`INLINE`] bytes in place (most user, device and address
/// keys), longer ones (a UUID) on the heap. At millions of keys, the
/// allocation (and its allocator overhead) each short key saves is most of a
/// key's cost. Always built from a `str`; looked up by its bytes.
#[derive(Clone)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl Key {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Heap(s) => s.as_bytes(),
        }
    }

    /// The key as text (snapshots).
    fn as_str(&self) -> &str {
        // Built from a `str`, so always UTF-8.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        if s.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Key::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(Box::from(s))
        }
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Hashes exactly as the borrowed `[u8]` does, as `Borrow` requires.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

/// What [`Bounded`] counts apart among its entries (users' keys that hold a
/// profile), so the count needs no walk over the map.
trait Marked {
    fn is_marked(&self) -> bool {
        false
    }
}

/// A dashmap with a cap on entries, evicting the least recently used.
///
/// Recency is a stamp from the map's clock on every touch. Threads take
/// stamps a lease ([`LEASE`]) at a time, so that cores do not fight over the
/// clock's cache line on every request: stamps stay unique, and in order to
/// within a lease per thread, which is all picking the oldest tenth needs.
/// When an insert takes the map over its cap, the inserting thread evicts
/// the oldest tenth of the shard it inserted into ([`Bounded::evict`]),
/// under that shard's lock, so that the cap holds strictly and a request
/// waits for one shard (at most a few) rather than a walk of every key.
struct Bounded<V> {
    map: DashMap<Key, Stamped<V>, foldhash::fast::RandomState>,
    /// Tells this map's lease apart from other maps' (see [`Bounded::tick`]).
    id: u64,
    len: AtomicUsize,
    /// Entries that are [`Marked::is_marked`].
    marked: AtomicUsize,
    cap: usize,
    clock: AtomicU64,
    evicted: AtomicU64,
    /// One walk of every key at a time ([`Bounded::evict_all`], for small
    /// maps): a std `Mutex`, never held across an await. A thread that
    /// finds the map over its cap waits for the walk in progress and checks
    /// again.
    evicting: Mutex<()>,
    /// Buffers [`Bounded::evict_shard`] reuses.
    drained: Mutex<Drained<V>>,
}

/// The stamp of the `n`th oldest (from 1) of `stamps`, which is not empty:
/// evicting every stamp up to it evicts the `n` oldest.
fn nth_oldest(stamps: &mut [u64], n: usize) -> u64 {
    *stamps.select_nth_unstable(n - 1).1
}

/// An entry of a [`Bounded`] map as its shard's table holds it.
type Entry<V> = (Key, dashmap::SharedValue<Stamped<V>>);

/// A shard's entries, drained for an eviction, and their stamps.
///
/// Kept from one eviction to the next, so that an eviction allocates
/// nothing (a shard's entries are tens of kilobytes). Saturated at the
/// cap, throughput was the same either way (BENCHMARKS.md, session 14): the
/// cost there is in the allocations of the keys that replace the evicted.
struct Drained<V> {
    entries: Vec<Entry<V>>,
    stamps: Vec<u64>,
}

impl<V> Default for Drained<V> {
    fn default() -> Self {
        Drained {
            entries: Vec::new(),
            stamps: Vec::new(),
        }
    }
}

/// Most keys [`Bounded::visit_many`] takes at once: a request's homes (the
/// user's key and one per other key group; the shipped pack has three).
const MANY: usize = 4;

/// How many control bytes hashbrown's probe reads at once (its SSE2 group);
/// a group may span two cache lines.
const GROUP: usize = 16;

/// Stamps a thread takes from a map's clock at once.
const LEASE: u64 = 64;

/// Ids of maps, for [`Lease::map`] (0 is no map).
static MAP_IDS: AtomicU64 = AtomicU64::new(1);

/// A thread's run of stamps on one map's clock.
#[derive(Clone, Copy)]
struct Lease {
    map: u64,
    next: u64,
    end: u64,
}

thread_local! {
    static LEASES: Cell<[Lease; 2]> = const {
        Cell::new([Lease { map: 0, next: 0, end: 0 }; 2])
    };
}

struct Stamped<V> {
    touched: u64,
    value: V,
}

impl<V: Default + Marked> Bounded<V> {
    fn new(cap: usize) -> Bounded<V> {
        Bounded {
            // Many small shards ([`SHARDS`]): the sweeper and the evictor
            // lock one shard at a time, so a request waits at most for one
            // small shard's walk (the default, a few shards per core,
            // stalled requests for tens of milliseconds at a few hundred
            // thousand keys). foldhash: a fast hash, seeded per map, so
            // keys chosen by an attacker cannot be made to collide.
            map: DashMap::with_hasher_and_shard_amount(Default::default(), SHARDS),
            id: MAP_IDS.fetch_add(1, Ordering::Relaxed),
            len: AtomicUsize::new(0),
            marked: AtomicUsize::new(0),
            cap: cap.max(1),
            clock: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            evicting: Mutex::new(()),
            drained: Mutex::default(),
        }
    }

    /// The next recency stamp, from this thread's lease on the clock.
    fn tick(&self) -> u64 {
        LEASES.with(|leases| {
            let mut all = leases.get();
            // A store's two maps have consecutive ids: each its own slot.
            let lease = &mut all[(self.id % 2) as usize];
            if lease.map != self.id || lease.next == lease.end {
                let start = self.clock.fetch_add(LEASE, Ordering::Relaxed);
                *lease = Lease {
                    map: self.id,
                    next: start,
                    end: start + LEASE,
                };
            }
            let stamp = lease.next;
            lease.next += 1;
            leases.set(all);
            stamp
        })
    }

    fn clock(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Fills in an entry from a snapshot (`fill` may be one of several
    /// parts of it), keeping its most recent stamp; the cap holds as for any
    /// insert.
    fn restore(&self, key: &str, touched: u64, fill: impl FnOnce(&mut V)) {
        self.clock
            .fetch_max(touched.saturating_add(1), Ordering::Relaxed);
        let mut inserted = false;
        {
            let mut e = self.map.entry(Key::from(key)).or_insert_with(|| {
                inserted = true;
                Stamped {
                    touched,
                    value: V::default(),
                }
            });
            e.touched = e.touched.max(touched);
            self.marking(&mut e.value, fill);
        }
        if inserted && self.len.fetch_add(1, Ordering::AcqRel) + 1 > self.cap {
            self.evict(self.shard_of(key));
        }
    }

    /// Runs `f` on `value`, keeping the count of marked entries.
    fn marking<R>(&self, value: &mut V, f: impl FnOnce(&mut V) -> R) -> R {
        let was = value.is_marked();
        let out = f(value);
        if value.is_marked() != was {
            if was {
                self.marked.fetch_sub(1, Ordering::Relaxed);
            } else {
                self.marked.fetch_add(1, Ordering::Relaxed);
            }
        }
        out
    }

    /// Runs `f` on the entry for `key`, creating it when absent.
    fn update<R>(&self, key: &str, f: impl FnOnce(&mut V) -> R) -> R {
        // Most keys exist: a lookup by the borrowed key builds no `Key`.
        if let Some(mut e) = self.map.get_mut(key.as_bytes()) {
            e.touched = self.tick();
            return self.marking(&mut e.value, f);
        }
        self.upsert(key, f)
    }

    /// [`Bounded::update`] in one lookup, for keys that are mostly new.
    fn upsert<R>(&self, key: &str, f: impl FnOnce(&mut V) -> R) -> R {
        let now = self.tick();
        let mut inserted = false;
        let out = {
            let mut e = self.map.entry(Key::from(key)).or_insert_with(|| {
                inserted = true;
                Stamped {
                    touched: now,
                    value: V::default(),
                }
            });
            e.touched = now;
            self.marking(&mut e.value, f)
        };
        if inserted && self.len.fetch_add(1, Ordering::AcqRel) + 1 > self.cap {
            self.evict(self.shard_of(key));
        }
        out
    }

    /// Runs `f` on the entries of several keys at once, holding all their
    /// shards' locks, taken in shard order. A key `(key, true)` is created
    /// when absent, as by [`Bounded::update`]; for `(key, false)` `f` sees
    /// `None` when absent, as from [`Bounded::read_mut`]. Returns `None`,
    /// having done nothing, when two keys share a shard or there are more
    /// than [`MANY`]: the caller then goes one key at a time.
    ///
    /// Why: a key's lookup is a chain of cache misses (the shard's lock, the
    /// control bytes, the bucket), and on x86 taking a lock orders every
    /// load after it. One key at a time, each key's chain waits for the one
    /// before. Here each link of every key's chain is asked for ahead
    /// ([`prefetch`]: the locks' lines, then each table's control bytes and
    /// likeliest bucket), so the misses of all the keys overlap (BENCHMARKS.md,
    /// session 25, for what it measured to). Taking locks in shard order
    /// cannot deadlock with another caller doing the same; every other path
    /// holds one shard at a time, or (dashmap's iterators, in snapshots and
    /// evictions) takes the next shard before letting go of the last, also
    /// in ascending order.
    fn visit_many<R>(
        &self,
        keys: &[(&str, bool)],
        f: impl FnOnce(&mut [Option<&mut V>]) -> R,
    ) -> Option<R> {
        if keys.len() > MANY {
            return None;
        }
        // (shard, hash, index in `keys`), in shard order.
        let mut at: SmallVec<[(usize, u64, usize); MANY]> = keys
            .iter()
            .enumerate()
            .map(|(i, (key, _))| {
                let hash = self.map.hash_usize(&key.as_bytes()) as u64;
                (self.map.determine_shard(hash as usize), hash, i)
            })
            .collect();
        at.sort_unstable_by_key(|&(shard, _, _)| shard);
        if at.windows(2).any(|p| p[0].0 == p[1].0) {
            return None;
        }
        let shards = self.map.shards();
        // Each miss of the chain asked for ahead, for every key at once:
        // first the shards' locks (2,048 padded shards, 256 KiB, are not
        // all in cache under load, and a lock's atomic waits for its line).
        for &(s, _, _) in &at {
            prefetch(&shards[s]);
        }
        let mut guards: SmallVec<[_; MANY]> =
            at.iter().map(|&(s, _, _)| shards[s].write()).collect();
        // Then each table's control bytes where the probe starts, and the
        // bucket there, where a key most often sits: hashbrown puts it at the
        // first free place from that position on.
        for (table, &(_, hash, _)) in guards.iter().zip(&at) {
            let start = hash as usize & (table.buckets() - 1);
            let end = table.data_end().as_ptr();
            let control = end.cast::<u8>().wrapping_add(start);
            prefetch(control);
            prefetch(control.wrapping_add(GROUP - 1));
            let bucket = end.wrapping_sub(start + 1);
            prefetch(bucket);
            prefetch(end.wrapping_sub(start).cast::<u8>().wrapping_sub(1));
        }
        let rehash = |e: &Entry<V>| self.hash_of(e);
        // How many keys this visit created, and the shard of the last.
        let (mut inserted, mut shard) = (0, 0);
        let mut entries: SmallVec<[Option<&mut Stamped<V>>; MANY]> =
            keys.iter().map(|_| None).collect();
        for (table, &(s, hash, i)) in guards.iter_mut().zip(&at) {
            let (key, create) = keys[i];
            let eq =
                |(k, _): &(Key, dashmap::SharedValue<Stamped<V>>)| k.as_bytes() == key.as_bytes();
            entries[i] = if create && table.get(hash, eq).is_none() {
                let fresh = Stamped {
                    touched: 0,
                    value: V::default(),
                };
                (inserted, shard) = (inserted + 1, s);
                let (_, v) = table.insert_entry(
                    hash,
                    (Key::from(key), dashmap::SharedValue::new(fresh)),
                    rehash,
                );
                Some(v.get_mut())
            } else {
                table.get_mut(hash, eq).map(|(_, v)| v.get_mut())
            };
            if let (Some(e), true) = (entries[i].as_deref_mut(), create) {
                e.touched = self.tick();
            }
        }
        let was: SmallVec<[bool; MANY]> = entries
            .iter()
            .map(|e| e.as_ref().is_some_and(|e| e.value.is_marked()))
            .collect();
        let mut values: SmallVec<[Option<&mut V>; MANY]> = entries
            .iter_mut()
            .map(|e| e.as_deref_mut().map(|e| &mut e.value))
            .collect();
        let out = f(&mut values);
        for (v, was) in values.iter().zip(was) {
            match (v.as_ref().is_some_and(|v| v.is_marked()), was) {
                (true, false) => self.marked.fetch_add(1, Ordering::Relaxed),
                (false, true) => self.marked.fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
        }
        drop(values);
        drop(entries);
        drop(guards);
        if inserted > 0 && self.len.fetch_add(inserted, Ordering::AcqRel) + inserted > self.cap {
            self.evict(shard);
        }
        Some(out)
    }

    /// Runs `f` on the entry for `key` if there is one; creates nothing.
    /// (`f` may change what it finds, but not whether it is marked.)
    fn read_mut<R>(&self, key: &str, f: impl FnOnce(Option<&mut V>) -> R) -> R {
        match self.map.get_mut(key.as_bytes()) {
            Some(mut e) => f(Some(&mut e.value)),
            None => f(None),
        }
    }

    fn read<R>(&self, key: &str, f: impl FnOnce(Option<&V>) -> R) -> R {
        match self.map.get(key.as_bytes()) {
            Some(e) => f(Some(&e.value)),
            None => f(None),
        }
    }

    /// Brings the map back under its cap after an insert into `shard` took
    /// it over: evicts the least recently used tenth of that shard, under
    /// its lock, inline, and of the next shards while the map is still over
    /// (a request that created several keys, or inserts on other threads
    /// counted and not yet evicted for). A big map never waits for a walk of
    /// every key (a quarter of a second at two million), and there is
    /// nothing to do in the background: at the default cap, one insert in
    /// about a hundred pays for one shard (about a thousand keys).
    ///
    /// The oldest of one shard stand for the oldest of the map: keys fall
    /// into shards by a seeded hash, so every shard holds a fair sample of
    /// the map's ages, much as Redis evicts the oldest of a sample of keys.
    /// A small map (fewer than [`SHARD_EVICTION_MIN`] keys a shard) walks
    /// every key instead, which at that size is short; so does a big map
    /// still over its cap after [`EVICT_SHARDS`] shards, which takes a
    /// flood of inserts on many threads at once.
    fn evict(&self, shard: usize) {
        if self.cap / SHARDS >= SHARD_EVICTION_MIN {
            for next in 0..EVICT_SHARDS {
                if self.len() <= self.cap {
                    return;
                }
                self.evict_shard((shard + next) % SHARDS);
            }
        }
        if self.len() > self.cap {
            self.evict_all();
        }
    }

    /// Evicts the oldest tenth (at least one) of `shard`'s keys, while the
    /// map is over its cap.
    ///
    /// A drain, not a walk in place: dashmap's shards are hashbrown
    /// `RawTable`s, whose iterators are `unsafe`, and this crate forbids
    /// unsafe code. Draining keeps the table's allocation; the survivors go
    /// back into it, rehashed, all of it a few tens of microseconds for a
    /// thousand keys held in one shard's lock.
    fn evict_shard(&self, shard: usize) {
        let mut table = self.map.shards()[shard].write();
        if self.len() <= self.cap || table.is_empty() {
            return;
        }
        // Another thread evicting at the same time gets buffers of its own.
        let mut spare = Drained::default();
        let mut reused = self.drained.try_lock();
        let Drained { entries, stamps } = match reused.as_deref_mut() {
            Ok(drained) => drained,
            Err(_) => &mut spare,
        };
        entries.extend(table.drain());
        stamps.clear();
        stamps.extend(entries.iter().map(|(_, v)| v.get().touched));
        let drop = (stamps.len() / 10).max(1);
        let threshold = nth_oldest(stamps, drop);
        let rehash = |e: &Entry<V>| self.hash_of(e);
        let (mut removed, mut marked) = (0, 0);
        for entry in entries.drain(..) {
            let stamped = entry.1.get();
            if stamped.touched <= threshold {
                removed += 1;
                marked += usize::from(stamped.value.is_marked());
            } else {
                table.insert(rehash(&entry), entry, rehash);
            }
        }
        self.forget(removed, marked);
    }

    /// Evicts down to nine tenths of the cap, the oldest first, walking
    /// every key: for small maps, where a shard is too small a sample.
    fn evict_all(&self) {
        let _walk = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        if self.len() <= self.cap {
            return;
        }
        let keep = self.cap - self.cap / 10;
        let mut stamps: Vec<u64> = self.map.iter().map(|e| e.touched).collect();
        let drop = stamps.len().saturating_sub(keep);
        if drop == 0 {
            return;
        }
        let threshold = nth_oldest(&mut stamps, drop);
        self.remove_where(|e| e.touched <= threshold);
    }

    /// An entry's hash, as dashmap computes it for lookups by the key's
    /// bytes (a table that grows, or takes entries back, rehashes them).
    fn hash_of(&self, (key, _): &Entry<V>) -> u64 {
        self.map.hash_usize(&key.as_bytes()) as u64
    }

    /// The shard `key` lives in.
    fn shard_of(&self, key: &str) -> usize {
        self.map
            .determine_shard(self.map.hash_usize(&key.as_bytes()))
    }

    fn retain(&self, keep: impl Fn(&V) -> bool) {
        self.remove_where(|e| !keep(&e.value));
    }

    /// [`Bounded::retain`] where `keep` may also trim what it keeps (but
    /// not change whether it is marked).
    fn retain_mut(&self, keep: impl Fn(&mut V) -> bool) {
        self.remove_where(|e| !keep(&mut e.value));
    }

    fn remove_where(&self, remove: impl Fn(&mut Stamped<V>) -> bool) {
        let (mut removed, mut marked) = (0usize, 0usize);
        self.map.retain(|_, e| {
            let gone = remove(e);
            removed += usize::from(gone);
            marked += usize::from(gone && e.value.is_marked());
            !gone
        });
        self.forget(removed, marked);
    }

    /// Counts `removed` entries (`marked` of them marked) as gone.
    fn forget(&self, removed: usize, marked: usize) {
        self.len.fetch_sub(removed, Ordering::AcqRel);
        self.marked.fetch_sub(marked, Ordering::Relaxed);
        self.evicted.fetch_add(removed as u64, Ordering::Relaxed);
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn marked(&self) -> usize {
        self.marked.load(Ordering::Relaxed)
    }

    fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Field;
    use crate::state::KeyGroup;

    impl Marked for u32 {}

    impl MemoryStore {
        fn with_slot<R>(&self, key: &str, f: impl FnOnce(Option<&Slot>) -> R) -> R {
            self.windows.read(key, f)
        }
    }

    #[test]
    fn a_record_is_released_once_and_contradictions_are_refused() {
        let store = MemoryStore::new(MemoryLimits::default());
        let entry = store.claim("r1", 1).unwrap().entry;
        // A failed challenge takes the reservation back...
        assert_eq!(
            entry.mark_outcome(OutcomeKind::ChallengeFailed, true),
            OutcomeMark::Fresh { release: true }
        );
        assert_eq!(
            entry.mark_outcome(OutcomeKind::ChallengeFailed, true),
            OutcomeMark::Seen
        );
        assert_eq!(
            entry.mark_outcome(OutcomeKind::ChallengePassed, false),
            OutcomeMark::Contradicts(OutcomeKind::ChallengeFailed)
        );
        // ...and the failed payment after it is marked, but releases nothing.
        assert_eq!(
            entry.mark_outcome(OutcomeKind::Failed, true),
            OutcomeMark::Fresh { release: false }
        );
        for later in [OutcomeKind::Succeeded, OutcomeKind::Chargeback] {
            assert_eq!(
                entry.mark_outcome(later, false),
                OutcomeMark::Contradicts(OutcomeKind::Failed)
            );
        }
    }

    fn plan() -> WindowPlan {
        WindowPlan {
            windows: vec![Window {
                name: "per_user".into(),
                sig: 1,
                shape: Shape::new(600_000),
                aggregate: Aggregate::Count,
                counts: Counts::Attempts,
                min_amount: 0,
                group: 0,
            }],
            groups: vec![KeyGroup {
                fields: vec![Field::UserId],
                prefix: "user_id".into(),
                windows: vec![0],
            }],
            profile_span_ms: 30 * 86_400_000,
        }
    }

    fn recharge(user: &str, ts: i64) -> Recharge {
        Recharge {
            request_id: "r".into(),
            facts: Facts {
                user_id: user.into(),
                amount: 100,
                timestamp_ms: ts,
                ..Facts::default()
            },
            ip: "192.0.2.1".parse().unwrap(),
            account: Default::default(),
            attributes: Default::default(),
            dry_run: false,
        }
    }

    #[test]
    fn idle_keys_expire_after_their_span() {
        let store = MemoryStore::new(MemoryLimits::default());
        let plan = plan();
        assert_eq!(
            store.begin(&plan, &recharge("old", 0), None, true).windows,
            [1]
        );
        assert_eq!(
            store
                .begin(&plan, &recharge("new", 1_000_000), None, true)
                .windows,
            [1]
        );
        assert_eq!(
            store
                .begin(&plan, &recharge("new", 1_000_001), None, true)
                .windows,
            [2]
        );
        assert_eq!(store.stats().window_keys, 2);
        // At 1,200 s the old key (last seen at 0, span 600 s) is idle.
        store.expire(1_200_000, 30 * 86_400_000);
        assert_eq!(store.stats().window_keys, 1);
        let read = store.begin(&plan, &recharge("new", 1_100_000), None, false);
        assert_eq!(read.windows, [3], "the live key kept its count");
    }

    #[test]
    fn a_claim_is_fresh_once_and_again_after_its_creator_gave_up() {
        let store = MemoryStore::new(MemoryLimits::default());
        let first = store.claim("r1", 7).unwrap();
        assert!(first.fresh);
        assert!(!store.claim("r1", 7).unwrap().fresh, "a retry waits for it");
        assert!(store.claim("r1", 8).is_err(), "another request, same id");
        first.entry.abandon();
        let again = store.claim("r1", 7).unwrap();
        assert!(again.fresh, "the next claim decides afresh");
        assert!(!Arc::ptr_eq(&again.entry, &first.entry));
        assert_eq!(store.stats().idempotency_records, 1);
    }

    #[test]
    fn the_profile_lives_in_the_users_key_with_or_without_user_windows() {
        let store = MemoryStore::new(MemoryLimits::default());
        let span = 30 * 86_400_000;
        let beijing = Location::new("CN".into(), "Beijing".into(), "".into(), 39.9, 116.4);
        let with_windows = plan();
        let without = WindowPlan {
            profile_span_ms: span,
            ..WindowPlan::default()
        };
        let first = recharge("u1", 1_000);
        store.begin(&with_windows, &first, Some(&beijing), true);
        store.settle(
            &with_windows,
            &first.facts,
            Action::Allow,
            true,
            Some(&beijing),
        );
        let stats = store.stats();
        assert_eq!(
            (stats.window_keys, stats.profiles),
            (1, 1),
            "one key for both"
        );

        // Read under the windows' lock, or by its own lookup: the same profile.
        let next = recharge("u1", 2_000);
        for plan in [&with_windows, &without] {
            let seen = store.begin(plan, &next, Some(&beijing), false).profile;
            assert_eq!((seen.located_events, seen.usual_region), (1, true));
        }
        assert_eq!(
            store
                .begin(&without, &recharge("u2", 2_000), None, false)
                .profile
                .located_events,
            0
        );

        // The key outlives its windows while the profile is live...
        store.expire(1_000 + 3_600_000, span);
        let stats = store.stats();
        assert_eq!((stats.window_keys, stats.profiles), (1, 1));
        let later = recharge("u1", 1_000 + 3_600_000);
        let seen = store.begin(&with_windows, &later, Some(&beijing), false);
        assert_eq!(
            (seen.windows[0], seen.profile.located_events),
            (1, 1),
            "windows idle"
        );
        // ...and goes with it.
        store.expire(1_000 + span + 1, span);
        let stats = store.stats();
        assert_eq!((stats.window_keys, stats.profiles), (0, 0));
    }

    /// A plan with a window on (user, target) and one on the user alone.
    fn plan_with_orders() -> WindowPlan {
        let window = |name: &str, sig, span_ms, group| Window {
            name: name.into(),
            sig,
            shape: Shape::new(span_ms),
            aggregate: Aggregate::Count,
            counts: Counts::Allowed,
            min_amount: 0,
            group,
        };
        WindowPlan {
            windows: vec![
                window("same_order", 7, 600_000, 0),
                window("per_user", 1, 3_600_000, 1),
            ],
            groups: vec![
                KeyGroup {
                    fields: vec![Field::UserId, Field::Target],
                    prefix: "user_id+target".into(),
                    windows: vec![0],
                },
                KeyGroup {
                    fields: vec![Field::UserId],
                    prefix: "user_id".into(),
                    windows: vec![1],
                },
            ],
            profile_span_ms: 30 * 86_400_000,
        }
    }

    fn order(user: &str, target: &str, ts: i64) -> Recharge {
        let mut r = recharge(user, ts);
        r.facts.target = target.into();
        r
    }

    #[test]
    fn windows_led_by_the_user_live_in_the_users_key() {
        let store = MemoryStore::new(MemoryLimits::default());
        let plan = plan_with_orders();
        let begin = |r: &Recharge| store.begin(&plan, r, None, true).windows;
        assert_eq!(begin(&order("u1", "phone-1", 0)), [1, 1]);
        assert_eq!(begin(&order("u1", "phone-1", 1_000)), [2, 2]);
        assert_eq!(
            begin(&order("u1", "phone-2", 2_000)),
            [1, 3],
            "another order"
        );
        assert_eq!(
            begin(&order("u2", "phone-1", 3_000)),
            [1, 1],
            "another user"
        );
        assert_eq!(store.stats().window_keys, 2, "one key per user, no more");

        // A block takes the reservation back out of both windows.
        let third = order("u1", "phone-1", 4_000);
        assert_eq!(begin(&third), [3, 4]);
        store.settle(&plan, &third.facts, Action::Block, false, None);
        let read = store.begin(&plan, &order("u1", "phone-1", 5_000), None, false);
        assert_eq!(read.windows, [3, 4], "2 + this one; 3 + this one");

        // An empty field: the (user, target) window does not apply.
        assert_eq!(begin(&order("u3", "", 6_000)), [0, 1]);

        // Past the order window's span its entries go, the user's stay.
        store.expire(700_000, plan.profile_span_ms);
        assert_eq!(store.stats().window_keys, 3);
        let read = store.begin(&plan, &order("u1", "phone-1", 700_000), None, false);
        assert_eq!(read.windows, [1, 4]);
        store.with_slot("user_id\x1fu1", |slot| {
            assert_eq!(slot.map(|s| s.windows.len()), Some(1), "only per_user left");
        });
    }

    #[test]
    fn a_flood_of_distinct_orders_keeps_the_users_slot_bounded() {
        let store = MemoryStore::new(MemoryLimits::default());
        let plan = plan_with_orders();
        let n = SLOT_WINDOWS as i64 * 3;
        for i in 0..n {
            store.begin(&plan, &order("u1", &format!("t{i}"), i), None, true);
        }
        store.with_slot("user_id\x1fu1", |slot| {
            assert!(slot.unwrap().windows.len() <= SLOT_WINDOWS);
        });
        let read = |r: &Recharge| store.begin(&plan, r, None, false).windows;
        assert_eq!(
            read(&order("u1", &format!("t{}", n - 1), n)),
            [2, n + 1],
            "the user's own window kept every order; the newest order is remembered"
        );
        assert_eq!(read(&order("u1", "t0", n))[0], 1, "the oldest order went");
    }

    #[test]
    fn dry_runs_create_no_keys() {
        let store = MemoryStore::new(MemoryLimits::default());
        let got = store.begin(&plan(), &recharge("u", 0), None, false);
        assert_eq!(got.windows, [1], "a dry run counts itself in");
        assert_eq!(store.stats().window_keys, 0);
    }

    #[test]
    fn short_keys_inline_long_keys_on_the_heap_one_map() {
        assert_eq!(std::mem::size_of::<Key>(), 32);
        let map: Bounded<u32> = Bounded::new(100);
        let keys = [
            "",
            "u",
            &"x".repeat(INLINE),
            &"y".repeat(INLINE + 1),
            &"é".repeat(40),
        ];
        for (i, k) in keys.iter().enumerate() {
            assert!(matches!(Key::from(*k), Key::Inline { .. }) == (k.len() <= INLINE));
            assert_eq!(Key::from(*k).as_str(), *k);
            map.update(k, |v| *v = i as u32 + 1);
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.read(k, |v| v.copied()), Some(i as u32 + 1), "{k:?}");
        }
        assert_eq!(map.read(&"x".repeat(INLINE - 1), |v| v.copied()), None);
        assert_eq!(map.len(), keys.len());
    }

    /// `{prefix}{i}` for the first `i` that lands on the same shard of `map`
    /// as `key` (`same`), or on another. Each map has its own seed, so this
    /// holds for `map` only.
    fn key_by_shard<V: Default + Marked>(
        map: &Bounded<V>,
        key: &str,
        prefix: &str,
        same: bool,
    ) -> String {
        let shard = |k: &str| map.map.determine_map(k.as_bytes());
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|k| (shard(k) == shard(key)) == same)
            .expect("some key lands there")
    }

    #[test]
    fn many_keys_at_once_create_read_and_are_found_one_by_one() {
        let map: Bounded<u32> = Bounded::new(100);
        map.update("old", |v| *v = 7);
        // Three keys on three shards of this map.
        let a = key_by_shard(&map, "old", "a", false);
        let shard = |k: &str| map.map.determine_map(k.as_bytes());
        let b = (0..)
            .map(|i| format!("b{i}"))
            .find(|b| shard(b) != shard("old") && shard(b) != shard(&a))
            .expect("a third shard");
        let (a, b) = (a.as_str(), b.as_str());
        let seen = map.visit_many(&[(a, true), (b, false), ("old", false)], |slots| {
            let seen: Vec<_> = slots.iter().map(|s| s.as_deref().copied()).collect();
            if let Some(a) = slots[0].as_deref_mut() {
                *a = 1;
            }
            if let Some(old) = slots[2].as_deref_mut() {
                *old += 1;
            }
            seen
        });
        // Created, absent (a read creates nothing), found.
        assert_eq!(seen, Some(vec![Some(0), None, Some(7)]));
        assert_eq!(map.len(), 2);
        // dashmap's own lookups find what the shards' tables were given.
        assert_eq!(map.read(a, |v| v.copied()), Some(1));
        assert_eq!(map.read(b, |v| v.copied()), None);
        assert_eq!(map.read("old", |v| v.copied()), Some(8));
        map.update(a, |v| *v += 1);
        assert_eq!(map.map.len(), 2, "no second entry for a");
        assert_eq!(
            map.visit_many(&[(a, false)], |s| s[0].as_deref().copied()),
            Some(Some(2))
        );
    }

    #[test]
    fn keys_made_many_at_once_survive_their_tables_growing() {
        // Enough keys that every shard's table grows several times, moving
        // what `visit_many` put there by the hash it gave the table.
        let map: Bounded<u32> = Bounded::new(1_000_000);
        let keys: Vec<String> = (0..40_000).map(|i| format!("key{i}")).collect();
        let value = |k: &str| k[3..].parse::<u32>().expect("a number") + 1;
        let mut together = 0;
        for pair in keys.chunks(2) {
            let batch: Vec<(&str, bool)> = pair.iter().map(|k| (k.as_str(), true)).collect();
            let set = |slots: &mut [Option<&mut u32>]| {
                for (slot, (k, _)) in slots.iter_mut().zip(&batch) {
                    if let Some(v) = slot.as_deref_mut() {
                        *v = value(k);
                    }
                }
            };
            if map.visit_many(&batch, set).is_some() {
                together += 1;
            } else {
                for k in pair {
                    map.update(k, |v| *v = value(k));
                }
            }
        }
        assert!(together > 19_000, "{together} pairs visited together");
        assert_eq!((map.len(), map.map.len()), (keys.len(), keys.len()));
        for k in &keys {
            assert_eq!(map.read(k, |v| v.copied()), Some(value(k)), "{k}");
        }
    }

    #[test]
    fn many_keys_on_one_shard_are_left_to_the_caller() {
        let map: Bounded<u32> = Bounded::new(100);
        let mate = key_by_shard(&map, "a", "mate", true);
        assert_eq!(map.visit_many(&[("a", true), (&mate, true)], |_| ()), None);
        let five: Vec<_> = (0..=MANY).map(|i| (format!("k{i}"), true)).collect();
        let five: Vec<_> = five.iter().map(|(k, c)| (k.as_str(), *c)).collect();
        assert_eq!(map.visit_many(&five, |_| ()), None);
        assert_eq!(map.len(), 0, "nothing created");
    }

    #[test]
    fn many_keys_at_once_keep_the_cap() {
        let map: Bounded<u32> = Bounded::new(10);
        for i in 0..20 {
            let (a, b) = (format!("a{i}"), format!("b{i}"));
            if map.visit_many(&[(&a, true), (&b, true)], |_| ()).is_none() {
                map.update(&a, |_| ());
                map.update(&b, |_| ());
            }
            assert!(map.len() <= 10, "{}", map.len());
        }
        assert!(map.evicted() >= 30);
    }

    #[test]
    fn keys_on_one_shard_count_as_keys_on_many() {
        // Windows on the user and on the device, one request after another:
        // once with the two keys on different shards (visited together),
        // once on the same shard (visited one by one).
        let window = |sig, group| Window {
            name: format!("w{sig}"),
            sig,
            shape: Shape::new(600_000),
            aggregate: Aggregate::Count,
            counts: Counts::Attempts,
            min_amount: 0,
            group,
        };
        let plan = WindowPlan {
            windows: vec![window(1, 0), window(2, 1)],
            groups: vec![
                KeyGroup {
                    fields: vec![Field::UserId],
                    prefix: "user_id".into(),
                    windows: vec![0],
                },
                KeyGroup {
                    fields: vec![Field::DeviceId],
                    prefix: "device_id".into(),
                    windows: vec![1],
                },
            ],
            profile_span_ms: 30 * 86_400_000,
        };
        let user_key = "user_id\x1fu1";
        for same in [false, true] {
            let store = MemoryStore::new(MemoryLimits::default());
            // The device is chosen against this store's own seed.
            let key = key_by_shard(&store.windows, user_key, "device_id\x1fd", same);
            let pair = [(user_key, false), (key.as_str(), false)];
            let together = store.windows.visit_many(&pair, |_| ()).is_some();
            assert_eq!(together, !same, "{key:?}");
            let mut r = recharge("u1", 1_000);
            r.facts.device_id = key["device_id\x1f".len()..].to_string();
            for n in 1..=3 {
                r.facts.timestamp_ms += 1_000;
                let begun = store.begin(&plan, &r, None, true);
                assert_eq!(begun.windows, [n, n], "{key:?}");
            }
            assert_eq!(store.stats().window_keys, 2);
            assert!(store.windows.read(&key, |s| s.is_some()), "{key:?}");
        }
    }

    #[test]
    fn cap_holds_and_recent_keys_survive() {
        let map: Bounded<u32> = Bounded::new(100);
        map.update("hot", |v| *v += 1);
        for i in 0..1000 {
            map.update(&format!("k{i}"), |v| *v += 1);
            map.update("hot", |v| *v += 1);
            assert!(map.len() <= 100);
        }
        assert!(map.map.len() <= 100);
        assert_eq!(map.read("hot", |v| v.copied()), Some(1001));
        assert!(map.evicted() >= 900);
    }

    #[test]
    fn a_small_map_evicts_the_oldest_tenth_of_all_its_keys() {
        let map: Bounded<u32> = Bounded::new(1000);
        for i in 0..1000 {
            map.update(&format!("k{i}"), |v| *v += 1);
        }
        assert_eq!((map.len(), map.evicted()), (1000, 0), "at the cap");
        map.update("k0", |v| *v += 1);
        map.update("k1000", |v| *v += 1);
        // Down to nine tenths, the oldest first: k0 was just used again.
        assert_eq!(map.len(), 900);
        assert_eq!(map.read("k0", |v| v.copied()), Some(2));
        assert_eq!(map.read("k1", |v| v.copied()), None);
        assert_eq!(map.read("k1000", |v| v.copied()), Some(1));
        // The next 100 inserts stay under the cap without evicting.
        let evicted = map.evicted();
        for i in 0..100 {
            map.update(&format!("n{i}"), |v| *v += 1);
        }
        assert_eq!((map.len(), map.evicted()), (1000, evicted));
    }

    /// A cap with 32 keys a shard, past [`SHARD_EVICTION_MIN`].
    const BIG: usize = SHARDS * 32;

    #[test]
    fn a_big_map_past_its_cap_evicts_from_one_shard() {
        let map: Bounded<u32> = Bounded::new(BIG);
        for i in 0..BIG {
            map.update(&format!("k{i}"), |v| *v += 1);
        }
        assert_eq!((map.len(), map.evicted()), (BIG, 0));
        map.update("one more", |v| *v += 1);
        // A tenth of one shard (about 32 keys), not a tenth of the map
        // (6,553 keys) as a walk of every key would evict.
        let evicted = map.evicted() as usize;
        assert!((1..=10).contains(&evicted), "evicted {evicted}");
        assert_eq!(map.len(), BIG + 1 - evicted);
        assert_eq!(map.map.len(), map.len());
        assert_eq!(map.read("one more", |v| v.copied()), Some(1));
        // Every key evicted was in the shard "one more" went into.
        let shard = map.shard_of("one more");
        let gone: Vec<usize> = (0..BIG)
            .filter(|i| map.read(&format!("k{i}"), |v| v.is_none()))
            .map(|i| map.shard_of(&format!("k{i}")))
            .collect();
        assert_eq!(gone.len(), evicted);
        assert!(gone.iter().all(|&s| s == shard), "{gone:?} not all {shard}");
    }

    /// A value that counts as marked when it says so.
    #[derive(Default)]
    struct Flag(bool);

    impl Marked for Flag {
        fn is_marked(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn evicting_a_shard_keeps_the_count_of_marked_entries() {
        let map: Bounded<Flag> = Bounded::new(BIG);
        for i in 0..BIG + 1_000 {
            map.update(&format!("k{i}"), |v| v.0 = i % 2 == 0);
        }
        assert!(map.evicted() >= 1_000);
        assert_eq!(map.len(), map.map.len());
        let marked = map.map.iter().filter(|e| e.value.0).count();
        assert_eq!(map.marked(), marked);
    }

    #[test]
    fn a_request_that_creates_keys_at_the_cap_evicts_no_more_than_a_few_shards() {
        // A cap of 16 keys a shard: one shard may give up a single key.
        let cap = SHARDS * SHARD_EVICTION_MIN;
        let map: Bounded<u32> = Bounded::new(cap);
        for i in 0..cap {
            map.update(&format!("k{i}"), |v| *v += 1);
        }
        for round in 0..100 {
            let (a, b) = (format!("a{round}"), format!("b{round}"));
            // Two keys on one shard are left to the caller, one at a time.
            if map.visit_many(&[(&a, true), (&b, true)], |_| ()).is_none() {
                map.update(&a, |v| *v += 1);
                map.update(&b, |v| *v += 1);
            }
            assert!(map.len() <= cap);
        }
        // 200 keys created: a walk of every key would have evicted a tenth
        // of the map (3,276 keys) at least once.
        let evicted = map.evicted() as usize;
        assert!((200..1_000).contains(&evicted), "evicted {evicted}");
    }

    #[test]
    fn a_big_map_at_its_cap_keeps_its_recently_used_keys() {
        let map: Bounded<u32> = Bounded::new(BIG);
        for i in 0..BIG {
            map.update(&format!("k{i}"), |v| *v += 1);
        }
        // The first 2,000 keys are used again: now the most recent of the
        // old keys.
        let hot = 2_000;
        for i in 0..hot {
            map.update(&format!("k{i}"), |v| *v += 1);
        }
        let new = BIG / 10;
        for i in 0..new {
            map.update(&format!("n{i}"), |v| *v += 1);
            assert!(map.len() <= BIG);
        }
        assert_eq!(map.map.len(), map.len());
        let kept = |keys: &mut dyn Iterator<Item = String>| {
            keys.filter(|k| map.read(k, |v| v.is_some())).count()
        };
        let hot_kept = kept(&mut (0..hot).map(|i| format!("k{i}")));
        let new_kept = kept(&mut (0..new).map(|i| format!("n{i}")));
        let cold_kept = kept(&mut (hot..BIG).map(|i| format!("k{i}")));
        // Each shard gave up its oldest: the keys not used again. (Per
        // shard, not over the whole map, so a few of the others may go
        // too, in a shard that was asked often.)
        assert!(hot_kept * 100 >= hot * 99, "hot kept {hot_kept} of {hot}");
        assert!(new_kept * 100 >= new * 99, "new kept {new_kept} of {new}");
        let evicted = map.evicted() as usize;
        assert_eq!(hot_kept + new_kept + cold_kept, BIG + new - evicted);
        assert!(evicted >= new, "evicted {evicted}");
        assert!(
            (BIG - hot - cold_kept) * 100 >= evicted * 99,
            "evicted {evicted}, of them old and unused {}",
            BIG - hot - cold_kept
        );
    }
}
