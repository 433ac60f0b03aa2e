//! The pipeline for one request:
//!
//! features (location, lists, windows, profile) -> rules (pure) -> decision
//! (combine) -> record (settle the windows, remember the decision).
//!
//! The engine owns no I/O beyond the state interface, which is what lets the
//! same code serve gRPC, tests and (later) backtests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::decision::{combine, Action, Decision, Reason};
use crate::decision_log::{self, DecisionLog, Record};
use crate::geo::{GeoDb, Location};
use crate::model::{Login, Outcome, OutcomeKind, Recharge};
use crate::pack::manifest::{Policy, StateFailure};
use crate::pack::script::Ctx;
use crate::pack::Pack;
use crate::state::memory::{IdemEntry, OutcomeMark};
use crate::state::profile::Profile;
use crate::state::redis::{Logged, Opened};
use crate::state::{
    fnv1a, releases, Begun, Conflict, KeptDecision, MemoryStore, RedisStore, Settled, StateError,
    Store,
};

/// The code of the reason a decision made without state carries.
pub const STATE_UNAVAILABLE: &str = "STATE_UNAVAILABLE";

/// The pauses between attempts at a settle that failed: about 3 s in all,
/// well inside the claim's [`crate::state::redis::PENDING_TTL_MS`].
const SETTLE_PAUSES_MS: [u64; 6] = [50, 100, 200, 400, 800, 1600];

/// How long a retry waits for another instance to finish deciding its id.
pub const IN_FLIGHT_WAIT: Duration = Duration::from_secs(2);

/// A cheap `Clone` handle over the shared engine.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

struct Shared {
    /// Swapped whole on reload; a request loads it once and decides on it.
    pack: ArcSwap<Pack>,
    store: Store,
    geo: GeoDb,
    /// Where decisions, logins and outcomes are logged, when enabled.
    log: Option<DecisionLog>,
    /// Settles of shared state that the answers did not wait for (see
    /// [`Engine::finish_settles`]).
    settles: tokio_util::task::TaskTracker,
}

/// A decision, and whether it is the stored answer to an earlier request.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub decision: Arc<Decision>,
    pub replayed: bool,
}

/// An evaluation begun by [`Engine::start`]: decided, or to be awaited.
pub enum Evaluation<'a> {
    Ready(Result<Evaluated, EngineError>),
    Pending(Pin<Box<dyn Future<Output = Result<Evaluated, EngineError>> + Send + 'a>>),
}

impl Evaluation<'_> {
    /// The decision, once it is made.
    pub async fn finish(self) -> Result<Evaluated, EngineError> {
        match self {
            Evaluation::Ready(result) => result,
            Evaluation::Pending(pending) => pending.await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("no decision is known for request_id `{0}` (never evaluated, a dry run, or expired)")]
    UnknownRequest(String),
    #[error("user_id `{given}` does not match the user `{decided}` of request_id `{request_id}`")]
    UserMismatch {
        request_id: String,
        given: String,
        decided: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("request_id `{0}` is still being decided by another call; retry it")]
    InFlight(String),
    #[error("event_id `{0}` was already used for another user's event")]
    EventConflict(String),
    /// A second outcome that cannot be true with one reported before
    /// ([`OutcomeKind::contradicts`]).
    #[error("request_id `{request_id}` was already reported {earlier}, which contradicts {kind}")]
    Contradicts {
        request_id: String,
        kind: &'static str,
        earlier: &'static str,
    },
}

impl Engine {
    pub fn new(pack: Arc<Pack>, store: Store, geo: GeoDb, log: Option<DecisionLog>) -> Engine {
        Engine {
            shared: Arc::new(Shared {
                pack: ArcSwap::new(pack),
                store,
                geo,
                log,
                settles: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    pub fn decision_log(&self) -> Option<&DecisionLog> {
        self.shared.log.as_ref()
    }

    /// The pack serving now.
    pub fn pack(&self) -> Arc<Pack> {
        self.shared.pack.load_full()
    }

    /// Puts a new pack in service; requests in flight finish on the old one.
    pub fn swap_pack(&self, pack: Arc<Pack>) -> Arc<Pack> {
        self.shared.pack.swap(pack)
    }

    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    pub fn geo(&self) -> &GeoDb {
        &self.shared.geo
    }

    /// Waits, up to `within`, for the settles of shared state still in
    /// flight (answered decisions whose record and releases are being
    /// written), so that a server that stops leaves none half done. Returns
    /// how many were still running when it gave up.
    pub async fn finish_settles(&self, within: Duration) -> usize {
        let settles = &self.shared.settles;
        settles.close();
        let _ = tokio::time::timeout(within, settles.wait()).await;
        settles.len()
    }

    /// Scores one recharge. A request id seen before with the same content gets
    /// the stored decision back and records nothing.
    pub async fn evaluate(&self, recharge: Recharge) -> Result<Evaluated, EngineError> {
        self.start(recharge).finish().await
    }

    /// [`Engine::evaluate`], begun without a future of its own: in memory
    /// the decision is nearly always made here, synchronously, and only
    /// what has to wait (shared state, a retry of an id still being
    /// decided) is a future, boxed. Why: the gRPC handler's future is
    /// boxed and moved on every call, and holding this call's state in it
    /// (the recharge, the pack, the Redis path's futures) made it
    /// kilobytes where the handler needs a few hundred bytes.
    pub fn start(&self, recharge: Recharge) -> Evaluation<'_> {
        let pack = self.pack();
        let fingerprint = fingerprint(&recharge);
        match &self.shared.store {
            Store::Memory(m) => match self.evaluate_local(m, &pack, recharge, fingerprint) {
                Ok(Local::Done(evaluated)) => Evaluation::Ready(Ok(evaluated)),
                Ok(Local::Deciding(entry, request_id)) => {
                    Evaluation::Pending(Box::pin(wait_for(entry, request_id)))
                }
                Err(e) => Evaluation::Ready(Err(e)),
            },
            Store::Redis(r) => Evaluation::Pending(Box::pin(async move {
                self.evaluate_shared(r, &pack, recharge, fingerprint).await
            })),
        }
    }

    /// In memory, without waiting: the call that creates an id's record
    /// decides at once, synchronously, and settles it; a retry finds the
    /// stored decision. Only a retry that arrives during those microseconds
    /// has to wait ([`Local::Deciding`]), so a retry storm decides once.
    fn evaluate_local(
        &self,
        store: &MemoryStore,
        pack: &Pack,
        recharge: Recharge,
        fingerprint: u64,
    ) -> Result<Local, EngineError> {
        if recharge.dry_run {
            if let Some(entry) = store.find(&recharge.request_id) {
                if entry.fingerprint != fingerprint {
                    return Err(Conflict(recharge.request_id).into());
                }
                if let Some(kept) = entry.settled.get() {
                    return Ok(Local::Done(replay_kept(kept)));
                }
            }
            let settled = self.decide_local(store, pack, recharge, false);
            return Ok(Local::Done(Evaluated {
                decision: settled.decision,
                replayed: false,
            }));
        }
        let claim = store.claim(&recharge.request_id, fingerprint)?;
        if !claim.fresh {
            return Ok(match claim.entry.settled.get() {
                Some(kept) => Local::Done(replay_kept(kept)),
                None => Local::Deciding(claim.entry, recharge.request_id),
            });
        }
        let deciding = Abandon(&claim.entry);
        let settled = self.decide_local(store, pack, recharge, true);
        // This call created the record, so nothing else sets it. The record
        // packs its own copy, and the reply takes the decision unshared.
        let _ = claim.entry.settled.set(KeptDecision::new(&settled));
        drop(deciding);
        Ok(Local::Done(Evaluated {
            decision: settled.decision,
            replayed: false,
        }))
    }

    fn decide_local(
        &self,
        store: &MemoryStore,
        pack: &Pack,
        recharge: Recharge,
        record: bool,
    ) -> Settled {
        // Only the decision log reports latency: no clock read without it.
        let started = self.shared.log.as_ref().map(|_| Instant::now());
        let location = self.shared.geo.lookup(recharge.ip);
        let begun = store.begin(&pack.plan, &recharge, location.as_deref(), record);
        let judged = self.judge(pack, recharge, location, begun, None, started);
        if record {
            let s = &judged.settled;
            let loc = s.location.as_deref();
            store.settle(&pack.plan, &s.facts, s.decision.action, judged.learn, loc);
        }
        judged.settled
    }

    /// In Redis, the request record is shared by every instance: a retry
    /// that finds the id still being decided elsewhere waits for it (up to
    /// [`IN_FLIGHT_WAIT`]). When state cannot be reached in time, the pack's
    /// `on_state_unavailable` decides on what needs no state.
    async fn evaluate_shared(
        &self,
        store: &Arc<RedisStore>,
        pack: &Arc<Pack>,
        recharge: Recharge,
        fingerprint: u64,
    ) -> Result<Evaluated, EngineError> {
        let started = Instant::now();
        let location = self.shared.geo.lookup(recharge.ip);
        let record = !recharge.dry_run;
        let opened = loop {
            let opened = store
                .open(
                    &pack.plan,
                    &recharge,
                    location.as_deref(),
                    fingerprint,
                    record,
                )
                .await;
            match opened {
                Ok(Opened::Pending) if started.elapsed() < IN_FLIGHT_WAIT => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(Opened::Pending) => return Err(EngineError::InFlight(recharge.request_id)),
                other => break other,
            }
        };
        let (begun, profile, failure) = match opened {
            Ok(Opened::Decide { begun, profile }) => (begun, profile, None),
            Ok(Opened::Replay(settled)) => return Ok(replay(settled.decision)),
            Ok(Opened::Conflict) => return Err(Conflict(recharge.request_id).into()),
            Ok(Opened::Pending) => unreachable!("waited for above"),
            Err(e) => {
                let ts = recharge.facts.timestamp_ms;
                let span = pack.plan.profile_span_ms;
                let begun = Begun {
                    windows: vec![0; pack.plan.windows.len()],
                    profile: Profile::default().view(ts, span, location.as_deref()),
                };
                (begun, None, Some(e))
            }
        };
        let judged = self.judge(
            pack,
            recharge,
            location,
            begun,
            failure.as_ref(),
            Some(started),
        );
        let decision = judged.settled.decision.clone();
        let store_settles_inline = store.settles_inline();
        if record && failure.is_none() {
            let (store, pack) = (store.clone(), pack.clone());
            let settle = async move {
                let Judged { settled, learn } = judged;
                let mut profile = profile;
                // Retried while the claim holds (PENDING_TTL_MS): until one
                // lands, a retry of the request waits, and after the claim
                // lapses it would decide and count again. A retry passes no
                // profile read: its compare-and-set reads the profile anew.
                let mut pauses = SETTLE_PAUSES_MS.iter();
                loop {
                    let result = store
                        .settle(&pack.plan, &settled, fingerprint, learn, profile.take())
                        .await;
                    let Err(e) = result else { break };
                    let id = &settled.decision.request_id;
                    match pauses.next() {
                        Some(&ms) => {
                            tracing::warn!(request_id = %id, error = %e, "could not settle a decision in shared state; retrying");
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        None => {
                            tracing::error!(request_id = %id, error = %e, "could not settle a decision in shared state; gave up");
                            break;
                        }
                    }
                }
            };
            if store_settles_inline {
                settle.await;
            } else {
                // The answer does not wait for this second write: the request
                // record says "pending" until it lands, and a retry waits.
                self.shared.settles.spawn(settle);
            }
        }
        Ok(Evaluated {
            decision,
            replayed: false,
        })
    }

    /// Rules and combine: what every backend shares. Pure but for the
    /// decision log.
    fn judge(
        &self,
        pack: &Pack,
        recharge: Recharge,
        location: Option<Arc<Location>>,
        begun: Begun,
        failure: Option<&StateError>,
        started: Option<Instant>,
    ) -> Judged {
        let ctx = pack.context(recharge, location, begun);
        let mut verdict = pack.run(&ctx);
        if let Some(e) = failure {
            verdict.reasons.push(state_unavailable(&pack.policy, e));
        }
        // What the rules saw, for the log (only built when the log is on).
        let seen = self.shared.log.as_ref().map(|_| seen(pack, &ctx));
        // The location comes back out of the context: no second reference.
        let Ctx {
            recharge: Recharge {
                request_id, facts, ..
            },
            location,
            ..
        } = ctx;
        let lenient =
            (pack.leniency.as_ref()).is_some_and(|l| l.applies(facts.amount, &verdict.reasons));
        let decision = combine(
            request_id,
            facts.amount,
            verdict.reasons,
            verdict.shadow_reasons,
            &pack.policy,
            pack.leniency.as_ref(),
            pack.version.clone(),
        );
        let learn = decision.teaches_profile(lenient);
        if let (Some(log), Some(mut seen)) = (&self.shared.log, seen) {
            seen.decision = decision.clone();
            seen.latency_us = started.map_or(0, |t| t.elapsed().as_micros() as u64);
            log.offer(Record::Evaluate(Box::new(seen)));
        }
        tracing::debug!(
            request_id = %decision.request_id,
            action = decision.action.name(),
            score = decision.score,
            reasons = decision.reasons.len(),
            "decided"
        );
        Judged {
            settled: Settled {
                decision: Arc::new(decision),
                facts,
                location,
            },
            learn,
        }
    }

    /// Records a login. Returns true when `event_id` was seen before and
    /// nothing was recorded again.
    pub async fn record_login(&self, login: Login) -> Result<bool, EngineError> {
        let pack = self.pack();
        let location = login.ip.and_then(|ip| self.shared.geo.lookup(ip));
        let fp = fnv1a(&[login.user_id.as_bytes()]);
        match &self.shared.store {
            Store::Memory(m) => {
                if !login.event_id.is_empty() {
                    let key = format!("\u{1e}event\u{1f}{}", login.event_id);
                    let claim = m.claim(&key, fp);
                    let claim = claim.map_err(|_| event_conflict(&login))?;
                    if !claim.fresh {
                        return Ok(true);
                    }
                }
                m.record_login(&pack.plan, &login, location.as_deref());
            }
            Store::Redis(r) => {
                match r
                    .record_login(&pack.plan, &login, location.as_deref(), fp)
                    .await?
                {
                    Logged::Recorded => {}
                    Logged::Seen => return Ok(true),
                    Logged::Conflict => return Err(event_conflict(&login)),
                }
            }
        }
        if let Some(log) = &self.shared.log {
            log.offer(Record::Login(decision_log::LoginRecord {
                event_id: login.event_id,
                user_id: login.user_id,
                succeeded: login.succeeded,
                ip: login.ip_text,
                device_id: login.device_id,
                timestamp_ms: login.timestamp_ms,
            }));
        }
        Ok(false)
    }

    /// Applies what became of a decided request. Returns true when this
    /// outcome was already applied.
    pub async fn report_outcome(&self, outcome: Outcome) -> Result<bool, EngineError> {
        let unknown = || EngineError::UnknownRequest(outcome.request_id.clone());
        let pack = self.pack();
        let user_id = match &self.shared.store {
            Store::Memory(m) => {
                let entry = m.find(&outcome.request_id).ok_or_else(unknown)?;
                let kept = entry.settled.get().ok_or_else(unknown)?;
                check_user(&outcome, kept.facts().user_id())?;
                let release = releases(outcome.kind, kept.action());
                let release = match entry.mark_outcome(outcome.kind, release) {
                    OutcomeMark::Fresh { release } => release,
                    OutcomeMark::Seen => return Ok(true),
                    OutcomeMark::Contradicts(earlier) => {
                        return Err(contradicts(&outcome, earlier));
                    }
                };
                let settled = kept.settled();
                let ts = outcome.timestamp_ms;
                m.apply_outcome(&pack.plan, &settled, outcome.kind, ts, release);
                settled.facts.user_id
            }
            Store::Redis(r) => {
                let settled = r.find(&outcome.request_id).await?.ok_or_else(unknown)?;
                check_user(&outcome, &settled.facts.user_id)?;
                let (id, kind, ts) = (&outcome.request_id, outcome.kind, outcome.timestamp_ms);
                match r.apply_outcome(&pack.plan, id, &settled, kind, ts).await? {
                    None => return Err(unknown()),
                    Some(OutcomeMark::Seen) => return Ok(true),
                    Some(OutcomeMark::Contradicts(earlier)) => {
                        return Err(contradicts(&outcome, earlier));
                    }
                    Some(OutcomeMark::Fresh { .. }) => {}
                }
                settled.facts.user_id.clone()
            }
        };
        if let Some(log) = &self.shared.log {
            log.offer(Record::Outcome(decision_log::OutcomeRecord {
                request_id: outcome.request_id,
                user_id,
                outcome: outcome.kind.name().to_string(),
                timestamp_ms: outcome.timestamp_ms,
            }));
        }
        Ok(false)
    }
}

fn event_conflict(login: &Login) -> EngineError {
    EngineError::EventConflict(login.event_id.clone())
}

fn contradicts(outcome: &Outcome, earlier: OutcomeKind) -> EngineError {
    EngineError::Contradicts {
        request_id: outcome.request_id.clone(),
        kind: outcome.kind.name(),
        earlier: earlier.name(),
    }
}

/// An outcome that names a user must name the decided one.
fn check_user(outcome: &Outcome, decided_user: &str) -> Result<(), EngineError> {
    if !outcome.user_id.is_empty() && outcome.user_id != decided_user {
        return Err(EngineError::UserMismatch {
            request_id: outcome.request_id.clone(),
            given: outcome.user_id.clone(),
            decided: decided_user.to_string(),
        });
    }
    Ok(())
}

/// The reason a decision made without state carries; its action is the
/// pack's `on_state_unavailable`.
fn state_unavailable(policy: &Policy, e: &StateError) -> Reason {
    let (action, challenge) = match policy.on_state_unavailable {
        StateFailure::Open => (Action::Allow, String::new()),
        StateFailure::Challenge => (Action::Challenge, policy.default_challenge.clone()),
        StateFailure::Block => (Action::Block, String::new()),
    };
    tracing::debug!(error = %e, "decided without state");
    Reason {
        rule_id: Arc::from("state"),
        code: STATE_UNAVAILABLE.to_string(),
        message: "risk history is temporarily unavailable; decided on the request alone"
            .to_string(),
        action,
        score: 0,
        challenge,
    }
}

/// A decision, and what settling it needs.
struct Judged {
    settled: Settled,
    /// The request may teach the user's profile its region.
    learn: bool,
}

/// The log's record of what the rules of one request saw.
fn seen(pack: &Pack, ctx: &crate::pack::script::Ctx) -> decision_log::Evaluation {
    let r = &ctx.recharge;
    let f = &r.facts;
    decision_log::Evaluation {
        request: decision_log::LoggedRequest {
            request_id: r.request_id.clone(),
            user_id: f.user_id.clone(),
            amount: f.amount,
            currency: f.currency.clone(),
            channel: f.channel.clone(),
            product: f.product.clone(),
            target: f.target.clone(),
            ip: f.ip_text.clone(),
            device_id: f.device_id.clone(),
            timestamp_ms: f.timestamp_ms,
            real_name_verified: r.account.real_name_verified,
            account_status: r.account.status.name().to_string(),
            created_at_ms: r.account.created_at_ms,
            has_purchase_history: r.account.has_purchase_history,
            attributes: r
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            dry_run: r.dry_run,
        },
        windows: pack
            .plan
            .windows
            .iter()
            .zip(&ctx.windows)
            .map(|(w, v)| (w.name.clone(), *v))
            .collect(),
        location: ctx.location.as_ref().map(|l| decision_log::LoggedLocation {
            country: l.country.clone(),
            region: l.region.clone(),
            city: l.city.clone(),
        }),
        profile: ctx.profile.clone(),
        lists: pack
            .lists
            .iter()
            .zip(&ctx.lists)
            .filter(|(_, on)| **on)
            .map(|((name, _), _)| name.clone())
            .collect(),
        decision: Decision {
            request_id: String::new(),
            action: crate::decision::Action::Allow,
            challenge: String::new(),
            score: 0,
            reasons: Vec::new(),
            shadow_reasons: Vec::new(),
            ruleset_version: pack.version.clone(),
        },
        latency_us: 0,
    }
}

/// What an in-memory evaluation came to without waiting.
enum Local {
    Done(Evaluated),
    /// Another call is deciding this request id right now.
    Deciding(Arc<IdemEntry>, String),
}

/// Abandons a claimed record if its creator unwinds before settling it, so
/// that retries decide afresh instead of waiting on it until it expires.
struct Abandon<'a>(&'a IdemEntry);

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// Waits (up to [`IN_FLIGHT_WAIT`]) for the decision another call is making
/// in memory. Polled, not notified: it takes microseconds, so this is only
/// met by retries sent while the first attempt is still being decided, and
/// a record needs no waker list for them.
async fn wait_for(entry: Arc<IdemEntry>, request_id: String) -> Result<Evaluated, EngineError> {
    let started = Instant::now();
    loop {
        if let Some(kept) = entry.settled.get() {
            return Ok(replay_kept(kept));
        }
        if entry.is_abandoned() || started.elapsed() >= IN_FLIGHT_WAIT {
            return Err(EngineError::InFlight(request_id));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A kept record's answer, unpacked for a retry of its request id.
fn replay_kept(kept: &KeptDecision) -> Evaluated {
    replay(Arc::new(kept.decision()))
}

fn replay(decision: Arc<Decision>) -> Evaluated {
    Evaluated {
        decision,
        replayed: true,
    }
}

/// What makes two requests with one id "the same request": the paying user,
/// the amount, the currency and what is topped up.
fn fingerprint(r: &Recharge) -> u64 {
    let f = &r.facts;
    fnv1a(&[
        f.user_id.as_bytes(),
        &f.amount.to_le_bytes(),
        f.currency.as_bytes(),
        f.target.as_bytes(),
    ])
}
