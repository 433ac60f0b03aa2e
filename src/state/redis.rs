//! Shared state in Redis: every instance pointed at one Redis (with one key
//! prefix) sees the same windows, profiles and idempotency records, so a burst
//! split across instances, or a restart, gives a fraudster no clean slate.
//!
//! One evaluation waits for one round trip: `touch.lua` (loaded once, then
//! called by its SHA) claims the request id, records the request into its
//! windows and returns every window value and the user's profile. After the
//! answer is sent, `settle.lua` stores the decision for retries, takes a
//! blocked request's reservations back out, and updates the profile by
//! compare-and-set.
//!
//! Keys, all under the hash tag `{prefix}` (a script may only touch keys of
//! one Redis Cluster slot, and one request's keys are shared with other
//! users' requests through an IP or a device, so the whole keyspace of one
//! prefix is one slot):
//! - `{prefix}:w:<group key>` (e.g. `user_id\x1fu1`): one hash for the
//!   series windows of that key, fields `<window tag>:<bucket>` -> sum; TTL
//!   the longest span of its windows plus one bucket.
//! - `{prefix}:w:<group key>\x1e<window tag>`: a distinct window of that key,
//!   a sorted set (member the value, score its last-seen ms), so that a key
//!   thousands of users share costs O(log n) a request, not a read of every
//!   value; same TTL.
//! - `{prefix}:p:<user>`: the profile ([`Profile::encode`]); TTL the profile span.
//! - `{prefix}:r:<request id>`: a hash, `fp` (fingerprint), `d` (the decision),
//!   `o<kind>` (outcome marks), `rel` (its reservation was released); TTL the idempotency TTL ([`PENDING_TTL_MS`]
//!   while the decision is being made, so a crashed instance's claim lapses).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::memory::{OutcomeMark, Settled};
use super::profile::Profile;
use super::{releases, Aggregate, Begun, Counts, StateError, Touch, Window, WindowPlan};
use crate::decision::{Action, Decision};
use crate::geo::Location;
use crate::model::{Facts, Login, OutcomeKind, Recharge};

/// How long a claimed but undecided request id holds: past it, a retry
/// decides again (only after an instance died mid-decision).
pub const PENDING_TTL_MS: i64 = 10_000;

/// How the Redis store is reached.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`.
    pub url: String,
    /// Key prefix and hash tag.
    pub prefix: String,
    /// Deadline of one request's state access.
    pub timeout_ms: i64,
    /// How long decisions are kept for retries and outcomes.
    pub idempotency_ttl_ms: i64,
    /// Settle before answering (a second round trip on the answer's path).
    /// Off in the server; on where one event must see the last one's
    /// settlement, as scenario tests do.
    pub inline_settle: bool,
}

pub struct RedisStore {
    conn: ConnectionManager,
    /// The URL without credentials, for logs.
    shown: String,
    /// `{prefix}:`
    prefix: String,
    timeout: Duration,
    idempotency_ttl_ms: i64,
    touch: Script,
    settle: Script,
    inline_settle: bool,
    /// The last call's fate: health reports it.
    available: AtomicBool,
    failures: AtomicU64,
}

/// What opening a request found.
pub enum Opened {
    /// A new decision to make, on these values; `profile` is what was read
    /// (its bytes are the compare-and-set token of [`RedisStore::settle`]).
    Decide {
        begun: Begun,
        profile: Option<Vec<u8>>,
    },
    /// Decided before: the stored answer.
    Replay(Box<Settled>),
    /// The id was used for a different request.
    Conflict,
    /// Another call is deciding this id right now.
    Pending,
}

/// What recording a login did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logged {
    Recorded,
    /// The event id was recorded before: nothing was counted again.
    Seen,
    /// The event id was recorded before for another user.
    Conflict,
}

/// The outcome marks of a request record.
fn outcome_field(kind: OutcomeKind) -> String {
    format!("o{}", kind.bit())
}

/// What `touch.lua` does with the record (its first key) before it touches
/// the windows; each carries the fingerprint of the request or event.
#[derive(Clone, Copy)]
enum Guard {
    /// Nothing: windows only.
    None,
    /// Reads what is recorded under a request id, claiming nothing (a dry
    /// run).
    Peek(u64),
    /// Claims a request id for a new decision, or finds it decided, being
    /// decided, or used by another request.
    Claim(u64),
    /// Claims a login's event id, or finds it seen.
    Event(u64),
    /// Marks an outcome on an existing record, unless it was marked before
    /// or an outcome marked before contradicts it: the mark and what the
    /// outcome counts land together or not at all.
    Outcome(OutcomeKind),
}

/// The decision as stored in a request record.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredDecision {
    decision: Decision,
    facts: Facts,
    location: Option<Location>,
}

/// The window keys of one request and their script arguments: per key, its
/// TTL and window count, then six arguments per window.
struct WindowOps {
    keys: Vec<String>,
    args: Vec<String>,
    /// Plan index of each window, in argument order.
    index: Vec<usize>,
}

/// The prefix of a window's fields in its key's hash: eight hex digits of the
/// window's signature, so windows of one key (and of older packs) never mix.
fn field_tag(w: &Window) -> String {
    format!("{:08x}", w.sig as u32)
}

impl RedisStore {
    /// Connects (lazily: a Redis that is down at start is retried, and the
    /// pack's `on_state_unavailable` decides meanwhile).
    pub async fn connect(config: RedisConfig) -> Result<RedisStore, StateError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StateError::Unavailable(format!("bad redis url: {e}")))?;
        let timeout = Duration::from_millis(config.timeout_ms.max(1) as u64);
        let manager = ConnectionManagerConfig::new()
            // The request deadline is enforced around each call; these bound
            // a connection attempt and a stuck reply underneath it.
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| StateError::Unavailable(e.to_string()))?;
        let store = RedisStore {
            conn,
            shown: hide_password(&config.url),
            prefix: format!("{{{}}}:", config.prefix),
            timeout,
            idempotency_ttl_ms: config.idempotency_ttl_ms,
            inline_settle: config.inline_settle,
            touch: Script::new(include_str!("lua/touch.lua")),
            settle: Script::new(include_str!("lua/settle.lua")),
            available: AtomicBool::new(false),
            failures: AtomicU64::new(0),
        };
        match store.ping(Duration::from_secs(2)).await {
            Ok(()) => tracing::info!(redis = %store.shown, "shared state connected"),
            Err(e) => {
                tracing::warn!(redis = %store.shown, error = %e, "shared state unavailable at start; retrying in the background")
            }
        }
        Ok(store)
    }

    pub fn describe(&self) -> String {
        format!("redis {} (prefix {})", self.shown, self.prefix)
    }

    /// See [`RedisConfig::inline_settle`].
    pub fn settles_inline(&self) -> bool {
        self.inline_settle
    }

    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    /// Calls that failed or timed out since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Checks Redis and loads the scripts; updates [`Self::is_available`].
    pub async fn ping(&self, within: Duration) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let check = async {
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            self.touch.load_async(&mut conn).await?;
            self.settle.load_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(())
        };
        self.watch(within, check).await
    }

    /// Runs one call under a deadline, keeping [`Self::is_available`] current.
    async fn watch<T>(
        &self,
        within: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StateError> {
        let result = match tokio::time::timeout(within, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StateError::Unavailable(e.to_string())),
            Err(_) => Err(StateError::Timeout(within.as_millis() as i64)),
        };
        let up = result.is_ok();
        if self.available.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(redis = %self.shown, "shared state is back");
            } else if let Err(e) = &result {
                tracing::warn!(redis = %self.shown, error = %e, "shared state unavailable");
            }
        }
        if !up {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn key(&self, kind: &str, rest: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + kind.len() + rest.len() + 1);
        k.push_str(&self.prefix);
        k.push_str(kind);
        k.push(':');
        k.push_str(rest);
        k
    }

    fn request_key(&self, request_id: &str) -> String {
        self.key("r", request_id)
    }

    fn profile_key(&self, user_id: &str) -> String {
        self.key("p", user_id)
    }

    /// The window keys of `facts` (one per key group) with their script
    /// arguments.
    fn window_ops(
        &self,
        plan: &WindowPlan,
        facts: &Facts,
        how: impl Fn(&Window) -> Touch,
    ) -> WindowOps {
        let mut ops = WindowOps {
            keys: Vec::with_capacity(plan.groups.len()),
            args: Vec::with_capacity(plan.windows.len() * 6 + plan.groups.len() * 2),
            index: Vec::with_capacity(plan.windows.len()),
        };
        let mut group_key = String::with_capacity(64);
        let ts = facts.timestamp_ms;
        for group in &plan.groups {
            if !group.key(facts, &mut group_key) {
                continue;
            }
            ops.keys.push(self.key("w", &group_key));
            // The key lives as long as its longest window needs it.
            let ttl = group
                .windows
                .iter()
                .map(|&i| plan.windows[i].shape)
                .map(|s| s.span_ms + s.bucket_ms)
                .max()
                .unwrap_or(1);
            ops.args.push(ttl.to_string());
            ops.args.push(group.windows.len().to_string());
            for &i in &group.windows {
                let w = &plan.windows[i];
                let (op, delta) = match how(w) {
                    Touch::Record(d) => ("r", d),
                    Touch::Include(d) => ("i", d),
                    Touch::Read => ("g", 0),
                };
                let tag = field_tag(w);
                match w.aggregate {
                    Aggregate::Distinct(_) => ops.args.extend([
                        "d".into(),
                        op.into(),
                        (delta as u64).to_string(),
                        (ts - w.shape.span_ms).to_string(),
                        ts.to_string(),
                        tag,
                    ]),
                    _ => ops.args.extend([
                        "s".into(),
                        op.into(),
                        delta.to_string(),
                        w.shape.first_bucket(ts).to_string(),
                        w.shape.bucket(ts).to_string(),
                        tag,
                    ]),
                }
                ops.index.push(i);
            }
        }
        ops
    }

    /// One call of `touch.lua`: `guard` on the record at `record_key`, then
    /// the window operations.
    async fn run_touch(
        &self,
        guard: Guard,
        record_key: &str,
        profile_key: &str,
        ops: &WindowOps,
    ) -> Result<Vec<Value>, StateError> {
        let mut call = self.touch.prepare_invoke();
        call.key(record_key).key(profile_key);
        for k in &ops.keys {
            call.key(k);
        }
        match guard {
            Guard::None => call.arg("none").arg("").arg(0),
            Guard::Peek(fp) => call.arg("peek").arg(fp.to_string()).arg(0),
            Guard::Claim(fp) => call.arg("claim").arg(fp.to_string()).arg(PENDING_TTL_MS),
            Guard::Event(fp) => call
                .arg("event")
                .arg(fp.to_string())
                .arg(self.idempotency_ttl_ms),
            Guard::Outcome(kind) => {
                let contradicting: Vec<String> = OutcomeKind::ALL
                    .into_iter()
                    .filter(|k| kind.contradicts(*k))
                    .map(outcome_field)
                    .collect();
                call.arg("outcome")
                    .arg(outcome_field(kind))
                    .arg(contradicting.join(" "))
            }
        };
        for a in &ops.args {
            call.arg(a);
        }
        let mut conn = self.conn.clone();
        self.watch(self.timeout, call.invoke_async::<Vec<Value>>(&mut conn))
            .await
    }

    /// Claims (or, for a dry run, peeks at) the request id, records the
    /// request and reads its windows and profile: one round trip.
    pub async fn open(
        &self,
        plan: &WindowPlan,
        recharge: &Recharge,
        location: Option<&Location>,
        fingerprint: u64,
        record: bool,
    ) -> Result<Opened, StateError> {
        let facts = &recharge.facts;
        let ops = self.window_ops(plan, facts, |w| Touch::of_recharge(w, facts, record));
        let reply = self
            .run_touch(
                if record {
                    Guard::Claim(fingerprint)
                } else {
                    Guard::Peek(fingerprint)
                },
                &self.request_key(&recharge.request_id),
                &self.profile_key(&facts.user_id),
                &ops,
            )
            .await?;
        match status(&reply) {
            "conflict" => return Ok(Opened::Conflict),
            "pending" => return Ok(Opened::Pending),
            "replay" => {
                return stored(reply.get(1))
                    .map(|s| Opened::Replay(Box::new(s)))
                    .ok_or_else(|| bad_reply("a stored decision that does not parse"))
            }
            "new" => {}
            other => return Err(bad_reply(other)),
        }
        let profile_bytes = bytes(reply.get(2));
        let profile = decode_profile(profile_bytes.as_deref());
        let mut windows = vec![0i64; plan.windows.len()];
        for (n, &i) in ops.index.iter().enumerate() {
            windows[i] = int(reply.get(3 + n));
        }
        let ts = facts.timestamp_ms;
        Ok(Opened::Decide {
            begun: Begun {
                windows,
                profile: profile.view(ts, plan.profile_span_ms, location),
            },
            profile: profile_bytes,
        })
    }

    /// Finds a decided request: its decision and whether it is still being
    /// decided elsewhere (`Ok(None)`: unknown).
    pub async fn find(&self, request_id: &str) -> Result<Option<Settled>, StateError> {
        let mut conn = self.conn.clone();
        let key = self.request_key(request_id);
        let found: Option<Vec<u8>> = self
            .watch(
                self.timeout,
                redis::cmd("HGET").arg(&key).arg("d").query_async(&mut conn),
            )
            .await?;
        match found {
            None => Ok(None),
            Some(b) => stored(Some(&Value::BulkString(b)))
                .map(Some)
                .ok_or_else(|| bad_reply("a stored decision that does not parse")),
        }
    }

    /// Stores a decision, releases a block's reservations and teaches the
    /// profile. Runs after the answer is sent; safe to retry (the record is
    /// written whole, a release happens once, the profile by compare-and-set).
    pub async fn settle(
        &self,
        plan: &WindowPlan,
        settled: &Settled,
        fingerprint: u64,
        learn: bool,
        profile_read: Option<Vec<u8>>,
    ) -> Result<(), StateError> {
        let facts = &settled.facts;
        let stored = serde_json::to_vec(&StoredDecision {
            decision: (*settled.decision).clone(),
            facts: facts.clone(),
            location: settled.location.as_deref().cloned(),
        })
        .map_err(|e| bad_reply(&e.to_string()))?;
        let release = settled.decision.action == Action::Block;
        let location = settled.location.as_deref();
        self.write(
            plan,
            &settled.decision.request_id,
            Some((stored, fingerprint)),
            facts,
            release,
            profile_read,
            |p| {
                if let Some(loc) = location {
                    p.saw(facts.timestamp_ms, loc);
                    if learn {
                        p.learn(facts.timestamp_ms, loc);
                    }
                }
                location.is_some()
            },
        )
        .await
        .map(|_| ())
    }

    /// `settle.lua`, retried on a lost compare-and-set of the profile with
    /// the profile as it is now. `decision`: the decision to store in the
    /// record, with its request's fingerprint. `release`: take the request's
    /// reservations back, unless that was done before (the record keeps a
    /// mark). `change` edits the profile and says whether it changed
    /// anything. Returns whether this call released.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        plan: &WindowPlan,
        request_id: &str,
        mut decision: Option<(Vec<u8>, u64)>,
        facts: &Facts,
        release: bool,
        mut profile_read: Option<Vec<u8>>,
        change: impl Fn(&mut Profile) -> bool,
    ) -> Result<bool, StateError> {
        let (mut release_keys, mut release_args) = (Vec::new(), Vec::new());
        if release {
            let mut group_key = String::with_capacity(64);
            for group in &plan.groups {
                if !group.key(facts, &mut group_key) {
                    continue;
                }
                for &i in &group.windows {
                    let w = &plan.windows[i];
                    if w.releases(facts) {
                        release_keys.push(self.key("w", &group_key));
                        let bucket = w.shape.bucket(facts.timestamp_ms);
                        release_args.push(format!("{}:{bucket}", field_tag(w)));
                        release_args.push(w.delta(facts).to_string());
                    }
                }
            }
        }
        let record_key = self.request_key(request_id);
        let profile_key = self.profile_key(&facts.user_id);
        let mut released = false;
        for _ in 0..8 {
            let mut profile = decode_profile(profile_read.as_deref());
            let changed = change(&mut profile);
            let mut new = Vec::new();
            if changed {
                profile.encode(&mut new);
            }
            let mut call = self.settle.prepare_invoke();
            call.key(&record_key).key(&profile_key);
            for k in &release_keys {
                call.key(k);
            }
            let (stored, fingerprint) = match &decision {
                Some((stored, fp)) => (stored.as_slice(), fp.to_string()),
                None => (&[][..], String::new()),
            };
            call.arg(stored)
                .arg(self.idempotency_ttl_ms)
                .arg(if changed { "cas" } else { "keep" })
                .arg(profile_read.as_deref().unwrap_or_default())
                .arg(&new)
                .arg(plan.profile_span_ms.max(1))
                .arg(fingerprint);
            for a in &release_args {
                call.arg(a);
            }
            let mut conn = self.conn.clone();
            let reply = self
                .watch(self.timeout, call.invoke_async::<Vec<Value>>(&mut conn))
                .await?;
            released |= int(reply.get(2)) == 1;
            if int(reply.first()) == 1 {
                return Ok(released);
            }
            // Someone else updated the profile first: the decision and the
            // releases are done; apply the change to the profile as it is now.
            decision = None;
            release_keys.clear();
            release_args.clear();
            profile_read = bytes(reply.get(1)).filter(|b| !b.is_empty());
        }
        Err(StateError::Unavailable(
            "the profile kept changing under eight compare-and-set attempts".into(),
        ))
    }

    /// Records a login, unless its event id was seen before.
    pub async fn record_login(
        &self,
        plan: &WindowPlan,
        login: &Login,
        location: Option<&Location>,
        event_fingerprint: u64,
    ) -> Result<Logged, StateError> {
        let want = if login.succeeded {
            Counts::LoginSucceeded
        } else {
            Counts::LoginFailed
        };
        let facts = login.facts();
        let ops = self.window_ops(plan, &facts, |w| {
            if w.counts == want {
                Touch::Record(w.delta(&facts))
            } else {
                Touch::Read
            }
        });
        let event_key = self.key("e", &login.event_id);
        let reply = self
            .run_touch(
                if login.event_id.is_empty() {
                    Guard::None
                } else {
                    Guard::Event(event_fingerprint)
                },
                &event_key,
                &self.profile_key(&login.user_id),
                &ops,
            )
            .await?;
        match status(&reply) {
            "seen" => return Ok(Logged::Seen),
            "conflict" => return Ok(Logged::Conflict),
            _ => {}
        }
        let (ts, span) = (login.timestamp_ms, plan.profile_span_ms);
        let profile_read = bytes(reply.get(2));
        self.write(plan, "", None, &facts, false, profile_read, |p| {
            if login.succeeded {
                p.login(ts, span, location);
                true
            } else if let Some(loc) = location {
                p.saw(ts, loc);
                true
            } else {
                false
            }
        })
        .await?;
        Ok(Logged::Recorded)
    }

    /// Applies an outcome of the request at `request_id`, decided as
    /// `settled`, as the in-memory store does. `None`: the record is gone.
    ///
    /// Two calls, each safe to retry. The first marks the outcome and
    /// records what it counts in one script, so a timeout either did both or
    /// neither. The second takes the reservation back (a failed payment, a
    /// failed challenge) under the record's release mark, and runs again on
    /// a retry that finds the outcome marked, so a release that failed is
    /// done by the retry and never twice. Learning the region from a passed
    /// challenge happens only in the call that marked it: if that write
    /// fails, the profile does without this one region.
    pub async fn apply_outcome(
        &self,
        plan: &WindowPlan,
        request_id: &str,
        settled: &Settled,
        kind: OutcomeKind,
        ts_ms: i64,
    ) -> Result<Option<OutcomeMark>, StateError> {
        let facts = &settled.facts;
        let decided = settled.decision.action;
        let challenge_kind = matches!(
            kind,
            OutcomeKind::ChallengeFailed | OutcomeKind::ChallengePassed
        );
        let counts =
            Counts::of_outcome(kind).filter(|_| !challenge_kind || decided == Action::Challenge);
        let at = Facts {
            timestamp_ms: ts_ms,
            ..facts.clone()
        };
        let ops = self.window_ops(plan, &at, |w| match counts {
            Some(want) if w.counts == want && facts.amount >= w.min_amount => {
                Touch::Record(w.delta(&at))
            }
            _ => Touch::Read,
        });
        let record_key = self.request_key(request_id);
        let reply = self
            .run_touch(
                Guard::Outcome(kind),
                &record_key,
                &self.profile_key(""),
                &ops,
            )
            .await?;
        let fresh = match status(&reply) {
            "gone" => return Ok(None),
            "seen" => false,
            "contradicts" => {
                let field = bytes(reply.get(1)).unwrap_or_default();
                let earlier = OutcomeKind::ALL
                    .into_iter()
                    .find(|k| outcome_field(*k).as_bytes() == field.as_slice())
                    .ok_or_else(|| bad_reply("an unknown outcome mark"))?;
                return Ok(Some(OutcomeMark::Contradicts(earlier)));
            }
            "new" => true,
            other => return Err(bad_reply(other)),
        };
        let release = releases(kind, decided);
        let learn_from = settled.location.as_deref().filter(|_| {
            fresh && kind == OutcomeKind::ChallengePassed && decided == Action::Challenge
        });
        let mut released = false;
        if release || learn_from.is_some() {
            let profile = match learn_from {
                Some(_) => self.read_profile(&facts.user_id).await?,
                None => None,
            };
            released = self
                .write(
                    plan,
                    request_id,
                    None,
                    facts,
                    release,
                    profile,
                    |p| match learn_from {
                        Some(loc) => {
                            p.learn(facts.timestamp_ms, loc);
                            true
                        }
                        None => false,
                    },
                )
                .await?;
        }
        Ok(Some(if fresh || released {
            OutcomeMark::Fresh { release: released }
        } else {
            OutcomeMark::Seen
        }))
    }

    async fn read_profile(&self, user_id: &str) -> Result<Option<Vec<u8>>, StateError> {
        let mut conn = self.conn.clone();
        self.watch(
            self.timeout,
            redis::cmd("GET")
                .arg(self.profile_key(user_id))
                .query_async(&mut conn),
        )
        .await
    }
}

fn status(reply: &[Value]) -> &str {
    match reply.first() {
        Some(Value::BulkString(b)) => std::str::from_utf8(b).unwrap_or("?"),
        Some(Value::SimpleString(s)) => s,
        _ => "?",
    }
}

fn bytes(v: Option<&Value>) -> Option<Vec<u8>> {
    match v {
        Some(Value::BulkString(b)) => Some(b.clone()),
        _ => None,
    }
}

fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Int(n)) => *n,
        Some(Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn stored(v: Option<&Value>) -> Option<Settled> {
    let Some(Value::BulkString(b)) = v else {
        return None;
    };
    let s: StoredDecision = serde_json::from_slice(b).ok()?;
    Some(Settled {
        decision: Arc::new(s.decision),
        facts: s.facts,
        location: s.location.map(Arc::new),
    })
}

/// A profile from its stored bytes; an unreadable one (another version)
/// counts as none rather than failing the request.
fn decode_profile(bytes: Option<&[u8]>) -> Profile {
    bytes
        .filter(|b| !b.is_empty())
        .and_then(Profile::decode)
        .unwrap_or_default()
}

fn bad_reply(what: &str) -> StateError {
    StateError::Unavailable(format!("unexpected reply from redis: {what}"))
}

/// `redis://user:secret@host/0` -> `redis://user:***@host/0`.
fn hide_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            hide_password("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(hide_password("redis://h:6379/0"), "redis://h:6379/0");
    }
}
