//! Backtesting (`riskgate replay`): a candidate pack on recorded traffic.
//!
//! The decision log is replayed in event-time order into a fresh in-memory
//! store, so windows and profiles are rebuilt exactly as the traffic built
//! them, and every recorded recharge is decided again by the candidate pack.
//! The baseline is either another pack replayed the same way, or the
//! decisions the log recorded. Replay is deterministic: the same log and
//! packs give the same output, byte for byte.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::api::validate;
use crate::decision::Decision;
use crate::decision_log::{self, Record};
use crate::engine::Engine;
use crate::geo::GeoDb;
use crate::pack::Pack;
use crate::pb;
use crate::state::{MemoryStore, Store};

/// What to replay, and against what.
#[derive(Debug, Clone)]
pub struct Options {
    /// Decision log files, in any order (records are sorted by event time).
    pub logs: Vec<PathBuf>,
    /// The candidate pack.
    pub pack: PathBuf,
    /// A baseline pack; without one the log's own decisions are the baseline.
    pub baseline: Option<PathBuf>,
    /// How many changed requests to list.
    pub show: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pack(#[from] crate::pack::LoadError),
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    /// Records read (all kinds), and lines that did not parse.
    pub records: usize,
    pub unreadable_lines: usize,
    pub evaluations: usize,
    pub logins: usize,
    pub outcomes: usize,
    /// Dry runs in the log: they recorded nothing, so they are not replayed.
    pub dry_runs: usize,
    /// Evaluations left out of the comparison: the candidate or the
    /// baseline pack refused them (a request that no longer validates, an
    /// id reused with other content), so no side counts them.
    pub skipped: usize,
    /// The first skipped requests (up to `--show`): id and why.
    pub first_skips: Vec<String>,
    /// Logins and outcomes a replaying engine refused (an outcome of a
    /// skipped request, say): the windows they feed miss them.
    pub events_refused: usize,
    pub baseline: Side,
    pub candidate: Side,
    /// "allow -> block": how many requests went from one action to the other.
    pub transitions: BTreeMap<String, usize>,
    /// Requests whose action or enforcing reason codes differ.
    pub changed: usize,
    pub first_changes: Vec<Change>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Side {
    /// "log" or "pack DIR".
    pub source: String,
    /// Pack versions that made these decisions.
    pub versions: Vec<String>,
    pub actions: BTreeMap<String, usize>,
    /// Decisions each rule fired in (enforcing or shadow), by rule id.
    pub hits: BTreeMap<String, usize>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Change {
    pub request_id: String,
    pub user_id: String,
    pub amount: i64,
    pub timestamp_ms: i64,
    pub baseline: String,
    pub candidate: String,
    pub baseline_reasons: Vec<String>,
    pub candidate_reasons: Vec<String>,
}

/// Replays the log and compares.
pub async fn run(options: &Options, geo: &GeoDb) -> Result<Summary, ReplayError> {
    let mut records = Vec::new();
    let mut unreadable = 0;
    for path in &options.logs {
        let (mut r, bad) = decision_log::read(path).map_err(|source| ReplayError::Read {
            path: path.clone(),
            source,
        })?;
        records.append(&mut r);
        unreadable += bad;
    }
    // Event time order; records at the same time keep their log order.
    records.sort_by_key(Record::timestamp_ms);

    let engine = |pack: Pack| {
        let store = Store::Memory(Arc::new(MemoryStore::new(Default::default())));
        Engine::new(Arc::new(pack), store, geo.clone(), None)
    };
    let candidate = engine(Pack::load(&options.pack)?);
    let baseline = match &options.baseline {
        Some(dir) => Some(engine(Pack::load(dir)?)),
        None => None,
    };

    let mut summary = Summary {
        records: records.len(),
        unreadable_lines: unreadable,
        evaluations: 0,
        logins: 0,
        outcomes: 0,
        dry_runs: 0,
        skipped: 0,
        first_skips: Vec::new(),
        events_refused: 0,
        baseline: Side::new(match &options.baseline {
            Some(dir) => format!("pack {}", dir.display()),
            None => "log".to_string(),
        }),
        candidate: Side::new(format!("pack {}", options.pack.display())),
        transitions: BTreeMap::new(),
        changed: 0,
        first_changes: Vec::new(),
    };
    let engines: Vec<&Engine> = std::iter::once(&candidate)
        .chain(baseline.as_ref())
        .collect();
    for record in records {
        match record {
            Record::Evaluate(e) if e.request.dry_run => summary.dry_runs += 1,
            Record::Evaluate(e) => {
                summary.evaluations += 1;
                // Both sides see every request, whatever the other made of it.
                let now = decide(&candidate, &e.request).await;
                let before = match &baseline {
                    Some(b) => decide(b, &e.request).await,
                    None => Ok(Arc::new(e.decision.clone())),
                };
                match (before, now) {
                    (Ok(before), Ok(now)) => {
                        summary.compare(&e.request, &before, &now, options.show)
                    }
                    (_, Err(why)) => {
                        summary.skip(&e.request.request_id, "candidate", why, options.show)
                    }
                    (Err(why), _) => {
                        summary.skip(&e.request.request_id, "baseline", why, options.show)
                    }
                }
            }
            Record::Login(l) => {
                summary.logins += 1;
                let mut refused = false;
                for engine in &engines {
                    refused |= !login(engine, &l).await;
                }
                summary.events_refused += usize::from(refused);
            }
            Record::Outcome(o) => {
                summary.outcomes += 1;
                let mut refused = false;
                for engine in &engines {
                    refused |= !outcome(engine, &o).await;
                }
                summary.events_refused += usize::from(refused);
            }
        }
    }
    Ok(summary)
}

/// The engine's decision, or why it refused the request.
async fn decide(engine: &Engine, r: &decision_log::LoggedRequest) -> Result<Arc<Decision>, String> {
    let status = match r.account_status.as_str() {
        "active" => pb::AccountStatus::Active,
        "frozen" => pb::AccountStatus::Frozen,
        "lost" => pb::AccountStatus::Lost,
        "arrears" => pb::AccountStatus::Arrears,
        "closed" => pb::AccountStatus::Closed,
        _ => pb::AccountStatus::Unspecified,
    };
    let req = pb::EvaluateRequest {
        request_id: r.request_id.clone(),
        user_id: r.user_id.clone(),
        amount: r.amount,
        currency: r.currency.clone(),
        channel: r.channel.clone(),
        product: r.product.clone(),
        target: r.target.clone(),
        ip: r.ip.clone(),
        device_id: r.device_id.clone(),
        timestamp_ms: r.timestamp_ms,
        account: Some(pb::Account {
            real_name_verified: r.real_name_verified,
            status: status as i32,
            created_at_ms: r.created_at_ms,
            has_purchase_history: r.has_purchase_history,
        }),
        attributes: r
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        dry_run: false,
    };
    let recharge = validate::recharge(req, r.timestamp_ms)
        .map_err(|status| format!("invalid request: {}", status.message()))?;
    engine
        .evaluate(recharge)
        .await
        .map(|e| e.decision)
        .map_err(|e| e.to_string())
}

/// Whether the engine took the login.
async fn login(engine: &Engine, l: &decision_log::LoginRecord) -> bool {
    let ev = pb::Event {
        event_id: l.event_id.clone(),
        user_id: l.user_id.clone(),
        kind: if l.succeeded {
            pb::EventKind::LoginSucceeded
        } else {
            pb::EventKind::LoginFailed
        } as i32,
        ip: l.ip.clone(),
        device_id: l.device_id.clone(),
        timestamp_ms: l.timestamp_ms,
        attributes: Default::default(),
    };
    match validate::login(ev, l.timestamp_ms) {
        Ok(login) => engine.record_login(login).await.is_ok(),
        Err(_) => false,
    }
}

/// Whether the engine took the outcome.
async fn outcome(engine: &Engine, o: &decision_log::OutcomeRecord) -> bool {
    let kind = match o.outcome.as_str() {
        "succeeded" => pb::OutcomeKind::Succeeded,
        "failed" => pb::OutcomeKind::Failed,
        "chargeback" => pb::OutcomeKind::Chargeback,
        "challenge_passed" => pb::OutcomeKind::ChallengePassed,
        "challenge_failed" => pb::OutcomeKind::ChallengeFailed,
        _ => return false,
    };
    let msg = pb::Outcome {
        request_id: o.request_id.clone(),
        user_id: String::new(),
        kind: kind as i32,
        timestamp_ms: o.timestamp_ms,
    };
    // A request the engine never saw (it refused it) has no outcome.
    match validate::outcome(msg, o.timestamp_ms) {
        Ok(outcome) => engine.report_outcome(outcome).await.is_ok(),
        Err(_) => false,
    }
}

impl Side {
    fn new(source: String) -> Side {
        Side {
            source,
            versions: Vec::new(),
            actions: BTreeMap::new(),
            hits: BTreeMap::new(),
        }
    }

    fn count(&mut self, d: &Decision) {
        *self.actions.entry(d.action.name().to_string()).or_default() += 1;
        if !self.versions.iter().any(|v| **v == *d.ruleset_version) {
            self.versions.push(d.ruleset_version.to_string());
        }
        let mut rules: Vec<&str> = d
            .reasons
            .iter()
            .chain(&d.shadow_reasons)
            .map(|r| &*r.rule_id)
            .collect();
        rules.sort_unstable();
        rules.dedup();
        for rule in rules {
            *self.hits.entry(rule.to_string()).or_default() += 1;
        }
    }
}

impl Summary {
    fn compare(
        &mut self,
        r: &decision_log::LoggedRequest,
        before: &Decision,
        now: &Decision,
        show: usize,
    ) {
        self.baseline.count(before);
        self.candidate.count(now);
        let transition = format!("{} -> {}", before.action.name(), now.action.name());
        *self.transitions.entry(transition).or_default() += 1;
        let codes = |d: &Decision| d.reasons.iter().map(|r| r.code.clone()).collect::<Vec<_>>();
        let (b, c) = (codes(before), codes(now));
        if before.action != now.action || b != c {
            self.changed += 1;
            if self.first_changes.len() < show {
                self.first_changes.push(Change {
                    request_id: r.request_id.clone(),
                    user_id: r.user_id.clone(),
                    amount: r.amount,
                    timestamp_ms: r.timestamp_ms,
                    baseline: before.action.name().to_string(),
                    candidate: now.action.name().to_string(),
                    baseline_reasons: b,
                    candidate_reasons: c,
                });
            }
        }
    }

    fn skip(&mut self, request_id: &str, side: &str, why: String, show: usize) {
        self.skipped += 1;
        if self.first_skips.len() < show {
            self.first_skips
                .push(format!("{request_id}: the {side} refused it: {why}"));
        }
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "replayed {} records: {} evaluations, {} logins, {} outcomes ({} dry runs skipped, {} unreadable lines)",
            self.records, self.evaluations, self.logins, self.outcomes, self.dry_runs, self.unreadable_lines
        );
        if self.skipped > 0 || self.events_refused > 0 {
            let _ = writeln!(
                w,
                "not compared: {} evaluation(s) a pack refused; {} login(s) and outcome(s) refused",
                self.skipped, self.events_refused
            );
            for skip in &self.first_skips {
                let _ = writeln!(w, "  {skip}");
            }
        }
        let _ = writeln!(
            w,
            "baseline:  {} ({})",
            self.baseline.source,
            self.baseline.versions.join(", ")
        );
        let _ = writeln!(
            w,
            "candidate: {} ({})",
            self.candidate.source,
            self.candidate.versions.join(", ")
        );
        let _ = writeln!(w, "\n{:<12}{:>10}{:>11}", "action", "baseline", "candidate");
        for action in ["allow", "challenge", "block"] {
            let n = |s: &Side| s.actions.get(action).copied().unwrap_or(0);
            let _ = writeln!(
                w,
                "{action:<12}{:>10}{:>11}",
                n(&self.baseline),
                n(&self.candidate)
            );
        }
        let _ = writeln!(w, "\ntransitions (baseline -> candidate):");
        for (t, n) in &self.transitions {
            let _ = writeln!(w, "  {t:<22}{n:>8}");
        }
        let _ = writeln!(
            w,
            "\nhits per rule:\n  {:<24}{:>10}{:>11}",
            "rule", "baseline", "candidate"
        );
        let mut rules: Vec<&String> = self
            .baseline
            .hits
            .keys()
            .chain(self.candidate.hits.keys())
            .collect();
        rules.sort();
        rules.dedup();
        for rule in rules {
            let n = |s: &Side| s.hits.get(rule).copied().unwrap_or(0);
            let _ = writeln!(
                w,
                "  {rule:<24}{:>10}{:>11}",
                n(&self.baseline),
                n(&self.candidate)
            );
        }
        let _ = writeln!(w, "\n{} requests changed", self.changed);
        for c in &self.first_changes {
            let _ = writeln!(
                w,
                "  {} user {} {}.{:02} yuan at {}: {} {:?} -> {} {:?}",
                c.request_id,
                c.user_id,
                c.amount / 100,
                c.amount % 100,
                c.timestamp_ms,
                c.baseline,
                c.baseline_reasons,
                c.candidate,
                c.candidate_reasons
            );
        }
        if self.changed > self.first_changes.len() {
            let _ = writeln!(
                w,
                "  ... and {} more",
                self.changed - self.first_changes.len()
            );
        }
        out
    }
}
