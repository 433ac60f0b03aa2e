//! State that outlives requests and packs: sliding windows, user profiles and
//! idempotency records.
//!
//! The interface is narrow on purpose: the engine hands over all of one
//! request's window keys at once ([`WindowPlan`] + the request) and gets all of
//! their values back at once. In memory that is one shard lock per key; a
//! Redis backend answers the same call with one round trip.

pub mod kept;
pub mod memory;
pub mod profile;
pub mod redis;
pub mod snapshot;
pub mod window;

use std::sync::Arc;

pub use memory::{Claim, KeptDecision, MemoryStore, Settled, StoreStats};
pub use profile::ProfileView;
pub use redis::RedisStore;

use crate::decision::Action;
use crate::model::{Facts, Field, OutcomeKind};
use window::Shape;

/// Whether an outcome takes its request's reservation back out of the
/// `allowed` windows: a payment that failed after an allow or a challenge
/// (a block released its own when it was decided), or a failed challenge.
/// A request is released at most once, however many such outcomes arrive
/// (a failed challenge, then the failed payment): both stores keep a mark.
pub fn releases(kind: OutcomeKind, decided: Action) -> bool {
    match kind {
        OutcomeKind::Failed => decided != Action::Block,
        OutcomeKind::ChallengeFailed => decided == Action::Challenge,
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Count,
    Sum,
    Distinct(Field),
}

/// What a window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    /// Every evaluated recharge (not dry runs, not replays).
    Attempts,
    /// Recharges not blocked: reserved while the request is evaluated, released
    /// when it is blocked, fails, or fails its challenge.
    Allowed,
    Succeeded,
    Failed,
    Chargeback,
    ChallengeFailed,
    LoginSucceeded,
    LoginFailed,
}

impl Counts {
    pub fn parse(text: &str) -> Option<Counts> {
        Some(match text {
            "attempts" => Counts::Attempts,
            "allowed" => Counts::Allowed,
            "succeeded" => Counts::Succeeded,
            "failed" => Counts::Failed,
            "chargeback" => Counts::Chargeback,
            "challenge_failed" => Counts::ChallengeFailed,
            "login_succeeded" => Counts::LoginSucceeded,
            "login_failed" => Counts::LoginFailed,
            _ => return None,
        })
    }

    pub fn is_login(self) -> bool {
        matches!(self, Counts::LoginSucceeded | Counts::LoginFailed)
    }

    pub(crate) fn of_outcome(kind: OutcomeKind) -> Option<Counts> {
        match kind {
            OutcomeKind::Succeeded => Some(Counts::Succeeded),
            OutcomeKind::Failed => Some(Counts::Failed),
            OutcomeKind::Chargeback => Some(Counts::Chargeback),
            OutcomeKind::ChallengeFailed => Some(Counts::ChallengeFailed),
            OutcomeKind::ChallengePassed => None,
        }
    }
}

/// One window of a pack, resolved.
#[derive(Debug, Clone)]
pub struct Window {
    pub name: String,
    /// Identity of the definition: state survives a reload for windows whose
    /// definition did not change.
    pub sig: u64,
    pub shape: Shape,
    pub aggregate: Aggregate,
    pub counts: Counts,
    /// Only recharges of at least this amount count (0: all).
    pub min_amount: i64,
    /// Index into [`WindowPlan::groups`].
    pub group: usize,
}

/// Windows that share one key (e.g. every `user_id` window) live under one
/// stored key, so one request takes one lock per distinct key.
#[derive(Debug, Clone)]
pub struct KeyGroup {
    pub fields: Vec<Field>,
    /// The key's prefix, e.g. "user_id+target+amount".
    pub prefix: String,
    pub windows: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct WindowPlan {
    pub windows: Vec<Window>,
    pub groups: Vec<KeyGroup>,
    /// How far back located events count towards usual regions.
    pub profile_span_ms: i64,
}

/// What `begin` hands the rules.
#[derive(Debug, Clone, Default)]
pub struct Begun {
    /// One value per window, in plan order, this request included.
    pub windows: Vec<i64>,
    pub profile: ProfileView,
}

/// The state backend. An enum, not a trait object: dispatch stays static and
/// allocation-free on the hot path. The engine matches on it where the two
/// differ in kind (in memory, concurrent retries wait on one in-process cell;
/// in Redis they find the shared record), and calls the shared methods below
/// where they do not.
#[derive(Clone)]
pub enum Store {
    Memory(Arc<MemoryStore>),
    Redis(Arc<RedisStore>),
}

impl Store {
    /// Drops idle keys and expired records; run periodically. Redis expires
    /// its keys by itself (every key carries a TTL).
    pub fn expire(&self, now_ms: i64, profile_span_ms: i64) {
        match self {
            Store::Memory(m) => m.expire(now_ms, profile_span_ms),
            Store::Redis(_) => {}
        }
    }

    pub fn stats(&self) -> StoreStats {
        match self {
            Store::Memory(m) => m.stats(),
            Store::Redis(_) => StoreStats::default(),
        }
    }

    /// Whether state can be reached now (memory: always).
    pub fn is_available(&self) -> bool {
        match self {
            Store::Memory(_) => true,
            Store::Redis(r) => r.is_available(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Store::Memory(_) => "memory".to_string(),
            Store::Redis(r) => r.describe(),
        }
    }
}

/// Shared state could not be read or written in time.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    #[error("state did not answer within {0} ms")]
    Timeout(i64),
    #[error("state unavailable: {0}")]
    Unavailable(String),
}

/// How one request touches one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Touch {
    /// Add to the window and read it back, in one step.
    Record(i64),
    /// Read, counting this request in without recording it (dry run).
    Include(i64),
    /// Read only.
    Read,
}

impl Touch {
    /// How an evaluated recharge touches `w`: attempts and allowed money are
    /// recorded (or, for a dry run, only counted in); the rest is read.
    pub(crate) fn of_recharge(w: &Window, facts: &Facts, record: bool) -> Touch {
        if !matches!(w.counts, Counts::Attempts | Counts::Allowed) || facts.amount < w.min_amount {
            Touch::Read
        } else if record {
            Touch::Record(w.delta(facts))
        } else {
            Touch::Include(w.delta(facts))
        }
    }
}

impl Window {
    /// What one request adds to the window: 1 for counts, the amount for
    /// sums, the hash of the field for distinct counts.
    pub fn delta(&self, facts: &Facts) -> i64 {
        match self.aggregate {
            Aggregate::Count => 1,
            Aggregate::Sum => facts.amount,
            Aggregate::Distinct(field) => match facts.text(field) {
                Some(text) => fnv1a(&[text.as_bytes()]) as i64,
                None => fnv1a(&[&facts.amount.to_le_bytes()]) as i64,
            },
        }
    }

    /// Whether a released reservation comes back out of this window.
    pub fn releases(&self, facts: &Facts) -> bool {
        self.counts == Counts::Allowed
            && !matches!(self.aggregate, Aggregate::Distinct(_))
            && facts.amount >= self.min_amount
    }
}

impl KeyGroup {
    /// Builds the group's key ("user_id\x1fu1") into `key`; false when a
    /// field of the key is empty, and the group does not apply.
    pub fn key(&self, facts: &Facts, key: &mut String) -> bool {
        key.clear();
        key.push_str(&self.prefix);
        for &field in &self.fields {
            key.push('\x1f');
            if !facts.write(field, key) {
                return false;
            }
        }
        true
    }
}

/// The request id was used before for a different request.
#[derive(Debug, thiserror::Error)]
#[error("request_id `{0}` was already used for a different request")]
pub struct Conflict(pub String);

/// A fixed, fast 64-bit hash (FNV-1a) for values that need a stable identity
/// but no secrecy (window signatures, distinct values, fingerprints).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
