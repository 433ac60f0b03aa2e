//! State that outlives requests and packs: sliding windows, user profiles and
//! idempotency records.
//!
//! The interface is narrow on purpose: the engine hands over all of one
//! request's window keys at once ([`WindowPlan`] + the request) and gets all of
//! their values back at once. In memory that is one shard lock per key; a
//! Redis backend answers the same call with one round trip.

pub mod memory;
pub mod profile;
pub mod window;

use std::sync::Arc;

pub use memory::{Claim, MemoryStore, Settled, StoreStats};
pub use profile::ProfileView;

use crate::decision::Action;
use crate::geo::Location;
use crate::model::{Facts, Field, Login, OutcomeKind, Recharge};
use window::Shape;

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

    fn of_outcome(kind: OutcomeKind) -> Option<Counts> {
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
/// allocation-free on the hot path, and a Redis variant slots in beside it.
#[derive(Clone)]
pub enum Store {
    Memory(Arc<MemoryStore>),
}

impl Store {
    /// Claims `request_id` for a new decision, or finds the earlier one.
    pub async fn claim(&self, request_id: &str, fingerprint: u64) -> Result<Claim, Conflict> {
        match self {
            Store::Memory(m) => m.claim(request_id, fingerprint),
        }
    }

    /// Finds a decided request without claiming it (dry runs, outcomes).
    pub async fn find(&self, request_id: &str) -> Option<Arc<memory::IdemEntry>> {
        match self {
            Store::Memory(m) => m.find(request_id),
        }
    }

    /// Records the request in its windows (unless `record` is false) and reads
    /// every window value and the user's profile, in one step.
    pub async fn begin(
        &self,
        plan: &WindowPlan,
        recharge: &Recharge,
        location: Option<&Location>,
        record: bool,
    ) -> Begun {
        match self {
            Store::Memory(m) => m.begin(plan, recharge, location, record),
        }
    }

    /// Settles a decided request: releases reservations of a block, and,
    /// when `learn`, teaches the user's profile the request's region.
    pub async fn settle(
        &self,
        plan: &WindowPlan,
        facts: &Facts,
        action: Action,
        learn: bool,
        location: Option<&Location>,
    ) {
        match self {
            Store::Memory(m) => m.settle(plan, facts, action, learn, location),
        }
    }

    pub async fn record_login(
        &self,
        plan: &WindowPlan,
        login: &Login,
        location: Option<&Location>,
    ) {
        match self {
            Store::Memory(m) => m.record_login(plan, login, location),
        }
    }

    pub async fn apply_outcome(
        &self,
        plan: &WindowPlan,
        settled: &Settled,
        kind: OutcomeKind,
        ts_ms: i64,
    ) {
        match self {
            Store::Memory(m) => m.apply_outcome(plan, settled, kind, ts_ms),
        }
    }

    /// Drops idle keys and expired records; run periodically.
    pub fn expire(&self, now_ms: i64, profile_span_ms: i64) {
        match self {
            Store::Memory(m) => m.expire(now_ms, profile_span_ms),
        }
    }

    pub fn stats(&self) -> StoreStats {
        match self {
            Store::Memory(m) => m.stats(),
        }
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
