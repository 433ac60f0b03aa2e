//! The pipeline for one request:
//!
//! features (location, lists, windows, profile) -> rules (pure) -> decision
//! (combine) -> record (settle the windows, remember the decision).
//!
//! The engine owns no I/O beyond the state interface, which is what lets the
//! same code serve gRPC, tests and (later) backtests.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::decision::{combine, Decision};
use crate::geo::GeoDb;
use crate::model::{Login, Outcome, Recharge};
use crate::pack::Pack;
use crate::state::{fnv1a, Conflict, Settled, Store};

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
}

/// A decision, and whether it is the stored answer to an earlier request.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub decision: Arc<Decision>,
    pub replayed: bool,
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
}

impl Engine {
    pub fn new(pack: Arc<Pack>, store: Store, geo: GeoDb) -> Engine {
        Engine {
            shared: Arc::new(Shared {
                pack: ArcSwap::new(pack),
                store,
                geo,
            }),
        }
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

    /// Scores one recharge. A request id seen before with the same content gets
    /// the stored decision back and records nothing.
    pub async fn evaluate(&self, recharge: Recharge) -> Result<Evaluated, EngineError> {
        let pack = self.pack();
        let store = &self.shared.store;
        let fingerprint = fingerprint(&recharge);
        if recharge.dry_run {
            if let Some(entry) = store.find(&recharge.request_id).await {
                if entry.fingerprint != fingerprint {
                    return Err(Conflict(recharge.request_id).into());
                }
                if let Some(settled) = entry.settled.get() {
                    return Ok(replay(settled));
                }
            }
            let settled = self.decide(&pack, recharge, false).await;
            return Ok(Evaluated {
                decision: settled.decision,
                replayed: false,
            });
        }
        let claim = store.claim(&recharge.request_id, fingerprint).await?;
        let mut fresh = false;
        let settled = claim
            .entry
            .settled
            .get_or_init(|| {
                fresh = true;
                self.decide(&pack, recharge, true)
            })
            .await;
        Ok(Evaluated {
            decision: settled.decision.clone(),
            replayed: !fresh,
        })
    }

    async fn decide(&self, pack: &Pack, recharge: Recharge, record: bool) -> Settled {
        let store = &self.shared.store;
        let location = self.shared.geo.lookup(recharge.ip);
        let begun = store
            .begin(&pack.plan, &recharge, location.as_deref(), record)
            .await;
        let (verdict, ctx) = pack.run(pack.context(recharge, location.clone(), begun));
        let Recharge {
            request_id, facts, ..
        } = ctx.recharge;
        let decision = combine(
            request_id,
            facts.amount,
            verdict.reasons,
            verdict.shadow_reasons,
            &pack.policy,
            pack.leniency.as_ref(),
            pack.version.clone(),
        );
        if record {
            store
                .settle(&pack.plan, &facts, decision.action, location.as_deref())
                .await;
        }
        tracing::debug!(
            request_id = %decision.request_id,
            action = decision.action.name(),
            score = decision.score,
            reasons = decision.reasons.len(),
            "decided"
        );
        Settled {
            decision: Arc::new(decision),
            facts,
            location,
        }
    }

    /// Records a login. Returns true when `event_id` was seen before and
    /// nothing was recorded again.
    pub async fn record_login(&self, login: Login) -> Result<bool, EngineError> {
        let store = &self.shared.store;
        if !login.event_id.is_empty() {
            let key = format!("\u{1e}event\u{1f}{}", login.event_id);
            let fp = fnv1a(&[login.user_id.as_bytes()]);
            let claim = store.claim(&key, fp).await?;
            if !claim.fresh {
                return Ok(true);
            }
        }
        let pack = self.pack();
        let location = login.ip.and_then(|ip| self.shared.geo.lookup(ip));
        store
            .record_login(&pack.plan, &login, location.as_deref())
            .await;
        Ok(false)
    }

    /// Applies what became of a decided request. Returns true when this
    /// outcome was already applied.
    pub async fn report_outcome(&self, outcome: Outcome) -> Result<bool, EngineError> {
        let store = &self.shared.store;
        let unknown = || EngineError::UnknownRequest(outcome.request_id.clone());
        let entry = store.find(&outcome.request_id).await.ok_or_else(unknown)?;
        let settled = entry.settled.get().ok_or_else(unknown)?;
        if !outcome.user_id.is_empty() && outcome.user_id != settled.facts.user_id {
            return Err(EngineError::UserMismatch {
                request_id: outcome.request_id,
                given: outcome.user_id,
                decided: settled.facts.user_id.clone(),
            });
        }
        if !entry.mark_outcome(outcome.kind) {
            return Ok(true);
        }
        let pack = self.pack();
        store
            .apply_outcome(&pack.plan, settled, outcome.kind, outcome.timestamp_ms)
            .await;
        Ok(false)
    }
}

fn replay(settled: &Settled) -> Evaluated {
    Evaluated {
        decision: settled.decision.clone(),
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
