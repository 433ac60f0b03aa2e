//! Scenario tests for rule packs (`riskgate test`).
//!
//! A scenario is a TOML file in the pack's `tests/` folder: a timeline of
//! evaluations, logins and outcomes, each evaluation with the decision it
//! expects. Each scenario runs on a fresh in-memory store at a fixed clock, so
//! a pack's own tests are deterministic and prove what the pack does before it
//! serves (hot reload refuses a pack whose scenarios fail).
//!
//! ```toml
//! name = "the 5th large order within 10 minutes is blocked"
//!
//! [defaults]                      # every evaluation starts from these
//! user_id = "u1"
//! ip = "192.0.2.10"
//!
//! [[steps]]
//! repeat = 4                      # o-1 .. o-4, one minute apart
//! every = "1m"
//! evaluate = { id = "o", yuan = 500 }
//! expect = { action = "allow" }
//!
//! [[steps]]
//! at = "5m"
//! evaluate = { id = "o5", yuan = 500 }
//! expect = { action = "block", codes = ["BURST_FREQUENCY"] }
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::api::validate;
use crate::engine::Engine;
use crate::geo::GeoDb;
use crate::pack::Pack;
use crate::pb;
use crate::state::redis::RedisConfig;
use crate::state::{MemoryStore, RedisStore, Store};

/// The clock every scenario starts at (2024-01-01T00:00:00Z): fixed, so runs
/// are reproducible.
pub const EPOCH_MS: i64 = 1_704_067_200_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub defaults: Request,
    pub steps: Vec<Step>,
}

/// An evaluation, as written in a scenario. Unset fields come from the
/// scenario's defaults, then from built-in defaults (a verified, active,
/// year-old account with purchases, in Beijing).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub id: Option<String>,
    pub user_id: Option<String>,
    /// In fen.
    pub amount: Option<i64>,
    /// In yuan, for readability; `amount` wins when both are set.
    pub yuan: Option<i64>,
    pub currency: Option<String>,
    pub channel: Option<String>,
    pub product: Option<String>,
    pub target: Option<String>,
    pub ip: Option<String>,
    pub device_id: Option<String>,
    pub attributes: Option<HashMap<String, String>>,
    pub dry_run: Option<bool>,
    pub real_name_verified: Option<bool>,
    /// active, frozen, lost, arrears, closed.
    pub status: Option<String>,
    /// Age of the account at the step's time.
    pub age_days: Option<f64>,
    pub has_purchase_history: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Time since the scenario started ("90s", "10m"); default: the previous
    /// step's time.
    pub at: Option<String>,
    /// Run the step this many times; ids (and the fields named in `vary`) get
    /// "-1", "-2"... suffixes.
    #[serde(default = "one")]
    pub repeat: u32,
    /// Time between repetitions.
    pub every: Option<String>,
    /// Fields that differ per repetition: user_id, device_id, target, ip_host.
    #[serde(default)]
    pub vary: Vec<String>,
    pub evaluate: Option<Request>,
    pub login: Option<LoginStep>,
    pub outcome: Option<OutcomeStep>,
    pub expect: Option<Expect>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginStep {
    pub user_id: Option<String>,
    #[serde(default = "yes")]
    pub ok: bool,
    pub ip: Option<String>,
    pub device_id: Option<String>,
    pub id: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeStep {
    /// The request id the outcome is about.
    pub id: String,
    /// succeeded, failed, chargeback, challenge_passed, challenge_failed.
    pub kind: String,
}

/// What a decision must look like; unset parts are not checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// allow, challenge or block.
    pub action: Option<String>,
    /// The enforcing reason codes, strongest first, exactly.
    pub codes: Option<Vec<String>>,
    /// The shadow reason codes, exactly.
    pub shadow: Option<Vec<String>>,
    /// What a challenge asks for.
    pub challenge: Option<String>,
    pub replayed: Option<bool>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn scenario_times() {
        assert_eq!(super::span("0m"), Ok(0));
        assert_eq!(super::span("10h05m"), Ok(36_300_000));
        assert_eq!(super::span("90s"), Ok(90_000));
        assert_eq!(super::span("2d3h"), Ok(183_600_000));
        assert!(super::span("10 minutes").is_err());
        assert!(super::span("").is_err());
    }
}

/// The result of one scenario.
#[derive(Debug)]
pub struct Outcome {
    pub file: PathBuf,
    pub name: String,
    pub steps: usize,
    /// Empty when the scenario passed.
    pub failures: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The scenario files of a pack (`tests/*.toml`), sorted.
pub fn files(pack_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(pack_dir.join("tests"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// Where a scenario's fresh, empty state comes from.
#[derive(Debug, Clone, Default)]
pub enum Fresh {
    /// A new in-memory store per scenario.
    #[default]
    Memory,
    /// A Redis server: each scenario gets its own key prefix there, so
    /// scenarios never see each other's keys (they expire by their TTLs).
    Redis(String),
}

impl Fresh {
    async fn store(&self, scenario: &str) -> Result<Store, String> {
        match self {
            Fresh::Memory => Ok(Store::Memory(Arc::new(
                MemoryStore::new(Default::default()),
            ))),
            Fresh::Redis(url) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let config = RedisConfig {
                    url: url.clone(),
                    prefix: format!("rgtest-{}-{nanos}-{scenario}", std::process::id()),
                    timeout_ms: 2_000,
                    idempotency_ttl_ms: 3_600_000,
                    // Each step must see the last one's settlement.
                    inline_settle: true,
                };
                let store = RedisStore::connect(config)
                    .await
                    .map_err(|e| e.to_string())?;
                if !store.is_available() {
                    return Err(format!("redis at {url} is not reachable"));
                }
                Ok(Store::Redis(Arc::new(store)))
            }
        }
    }
}

/// Runs every scenario of `pack` (from `pack.dir/tests`) on the in-memory store.
pub async fn run_all(pack: &Arc<Pack>, geo: &GeoDb) -> Vec<Outcome> {
    run_all_on(pack, geo, &Fresh::Memory).await
}

/// Runs every scenario of `pack`, each on fresh state from `fresh`.
pub async fn run_all_on(pack: &Arc<Pack>, geo: &GeoDb, fresh: &Fresh) -> Vec<Outcome> {
    let mut out = Vec::new();
    for file in files(&pack.dir) {
        out.push(run_file(pack, geo, &file, fresh).await);
    }
    pack.reset_hits();
    out
}

/// Runs one scenario file on fresh state.
pub async fn run_file(pack: &Arc<Pack>, geo: &GeoDb, file: &Path, fresh: &Fresh) -> Outcome {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut outcome = Outcome {
        file: file.to_path_buf(),
        name: stem,
        steps: 0,
        failures: Vec::new(),
    };
    let scenario: Scenario = match std::fs::read_to_string(file)
        .map_err(|e| e.to_string())
        .and_then(|t| toml::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            outcome
                .failures
                .push(format!("cannot read the scenario: {}", e.trim()));
            return outcome;
        }
    };
    if !scenario.name.is_empty() {
        outcome.name = scenario.name.clone();
    }
    let store = match fresh.store(&outcome.name).await {
        Ok(store) => store,
        Err(e) => {
            outcome.failures.push(e);
            return outcome;
        }
    };
    let engine = Engine::new(pack.clone(), store, geo.clone(), None);
    let mut now = EPOCH_MS;
    for (n, step) in scenario.steps.iter().enumerate() {
        if let Err(e) = run_step(
            &engine,
            &scenario.defaults,
            step,
            n + 1,
            &mut now,
            &mut outcome,
        )
        .await
        {
            outcome.failures.push(format!("step {}: {e}", n + 1));
        }
    }
    outcome
}

async fn run_step(
    engine: &Engine,
    defaults: &Request,
    step: &Step,
    n: usize,
    now: &mut i64,
    outcome: &mut Outcome,
) -> Result<(), String> {
    if let Some(at) = &step.at {
        *now = EPOCH_MS + span(at)?;
    }
    let every = step.every.as_deref().map(span).transpose()?.unwrap_or(0);
    let kinds = [
        step.evaluate.is_some(),
        step.login.is_some(),
        step.outcome.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err("a step needs exactly one of evaluate, login, outcome".into());
    }
    for rep in 1..=step.repeat {
        if rep > 1 {
            *now = now.saturating_add(every);
        }
        let suffix = (step.repeat > 1).then(|| format!("-{rep}"));
        outcome.steps += 1;
        if let Some(req) = &step.evaluate {
            let req = request(defaults, req, step, suffix.as_deref(), *now, n)?;
            let id = req.request_id.clone();
            let recharge = validate::recharge(req, *now)
                .map_err(|s| format!("bad request {id}: {}", s.message()))?;
            let got = engine.evaluate(recharge).await.map_err(|e| e.to_string())?;
            if let Some(expect) = &step.expect {
                let diff = compare(expect, &got);
                if !diff.is_empty() {
                    outcome.failures.push(format!(
                        "step {n} ({}, evaluate {id}):\n{diff}",
                        clock(*now)
                    ));
                }
            }
        } else if let Some(l) = &step.login {
            let user = l
                .user_id
                .clone()
                .or_else(|| defaults.user_id.clone())
                .unwrap_or_else(|| "u1".into());
            let ev = pb::Event {
                event_id: l
                    .id
                    .clone()
                    .map(|id| format!("{id}{}", suffix.as_deref().unwrap_or("")))
                    .unwrap_or_default(),
                kind: if l.ok {
                    pb::EventKind::LoginSucceeded
                } else {
                    pb::EventKind::LoginFailed
                } as i32,
                ip: l
                    .ip
                    .clone()
                    .or_else(|| defaults.ip.clone())
                    .unwrap_or_else(|| "192.0.2.10".into()),
                device_id: l.device_id.clone().unwrap_or_else(|| format!("dev-{user}")),
                user_id: user,
                timestamp_ms: *now,
                attributes: HashMap::new(),
            };
            let login = validate::login(ev, *now).map_err(|s| s.message().to_string())?;
            engine
                .record_login(login)
                .await
                .map_err(|e| e.to_string())?;
        } else if let Some(o) = &step.outcome {
            let kind = match o.kind.as_str() {
                "succeeded" => pb::OutcomeKind::Succeeded,
                "failed" => pb::OutcomeKind::Failed,
                "chargeback" => pb::OutcomeKind::Chargeback,
                "challenge_passed" => pb::OutcomeKind::ChallengePassed,
                "challenge_failed" => pb::OutcomeKind::ChallengeFailed,
                other => return Err(format!("unknown outcome kind `{other}`")),
            };
            let o = validate::outcome(
                pb::Outcome {
                    request_id: o.id.clone(),
                    user_id: String::new(),
                    kind: kind as i32,
                    timestamp_ms: *now,
                },
                *now,
            )
            .map_err(|s| s.message().to_string())?;
            engine.report_outcome(o).await.map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// A scenario time: "0m", "90s", "10h05m", "2d3h" (units ms, s, m, h, d).
fn span(text: &str) -> Result<i64, String> {
    let bad = || format!("`{text}` is not a duration like 0s, 90s, 10m, 10h05m");
    let mut total = 0i64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let (n, unit) = (&rest[..digits], &rest[digits..digits + unit_len]);
        let n: i64 = n.parse().map_err(|_| bad())?;
        let ms = match unit {
            "ms" => 1,
            "s" | "" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        rest = &rest[digits + unit_len..];
    }
    Ok(total)
}

/// "+1h05m30s" since the scenario began.
fn clock(now: i64) -> String {
    let s = (now - EPOCH_MS) / 1000;
    format!("at +{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

fn request(
    defaults: &Request,
    req: &Request,
    step: &Step,
    suffix: Option<&str>,
    now: i64,
    n: usize,
) -> Result<pb::EvaluateRequest, String> {
    macro_rules! pick {
        ($f:ident) => {
            req.$f.clone().or_else(|| defaults.$f.clone())
        };
    }
    let sfx = suffix.unwrap_or("");
    let vary = |field: &str, value: String| {
        if step.vary.iter().any(|v| v == field) {
            format!("{value}{sfx}")
        } else {
            value
        }
    };
    let id = format!("{}{sfx}", pick!(id).unwrap_or_else(|| format!("step{n}")));
    let user = vary("user_id", pick!(user_id).unwrap_or_else(|| "u1".into()));
    let amount = pick!(amount)
        .or_else(|| pick!(yuan).map(|y| y.saturating_mul(100)))
        .unwrap_or(3000);
    let status = match pick!(status).as_deref().unwrap_or("active") {
        "active" => pb::AccountStatus::Active,
        "frozen" => pb::AccountStatus::Frozen,
        "lost" => pb::AccountStatus::Lost,
        "arrears" => pb::AccountStatus::Arrears,
        "closed" => pb::AccountStatus::Closed,
        "unspecified" => pb::AccountStatus::Unspecified,
        other => return Err(format!("unknown account status `{other}`")),
    };
    let age_days = pick!(age_days).unwrap_or(365.0);
    let mut ip = pick!(ip).unwrap_or_else(|| "192.0.2.10".into());
    if step.vary.iter().any(|v| v == "ip_host") {
        // Vary the last IPv4 octet: many addresses in one range.
        if let Some((net, _)) = ip.rsplit_once('.') {
            ip = format!(
                "{net}.{}",
                suffix.and_then(|s| s[1..].parse::<u32>().ok()).unwrap_or(1) % 250 + 1
            );
        }
    }
    Ok(pb::EvaluateRequest {
        request_id: id.clone(),
        device_id: vary(
            "device_id",
            pick!(device_id).unwrap_or_else(|| format!("dev-{user}")),
        ),
        target: vary(
            "target",
            pick!(target).unwrap_or_else(|| format!("target-{id}")),
        ),
        user_id: user,
        amount,
        currency: pick!(currency).unwrap_or_default(),
        channel: pick!(channel).unwrap_or_else(|| "app".into()),
        product: pick!(product).unwrap_or_else(|| "phone_credit".into()),
        ip,
        timestamp_ms: now,
        account: Some(pb::Account {
            real_name_verified: pick!(real_name_verified).unwrap_or(true),
            status: status as i32,
            created_at_ms: now - (age_days * 86_400_000.0) as i64,
            has_purchase_history: pick!(has_purchase_history).unwrap_or(true),
        }),
        attributes: pick!(attributes).unwrap_or_default(),
        dry_run: pick!(dry_run).unwrap_or(false),
    })
}

/// A readable diff of what was expected and what came, empty when they agree.
fn compare(expect: &Expect, got: &crate::engine::Evaluated) -> String {
    let d = &got.decision;
    let mut diff = String::new();
    let codes: Vec<&str> = d.reasons.iter().map(|r| r.code.as_str()).collect();
    let shadow: Vec<&str> = d.shadow_reasons.iter().map(|r| r.code.as_str()).collect();
    if let Some(a) = &expect.action {
        if a != d.action.name() {
            let _ = writeln!(diff, "    action:    expected {a}, got {}", d.action.name());
        }
    }
    if let Some(c) = &expect.codes {
        if *c != codes {
            let _ = writeln!(diff, "    codes:     expected {c:?}, got {codes:?}");
        }
    }
    if let Some(c) = &expect.shadow {
        if *c != shadow {
            let _ = writeln!(diff, "    shadow:    expected {c:?}, got {shadow:?}");
        }
    }
    if let Some(c) = &expect.challenge {
        if *c != d.challenge {
            let _ = writeln!(diff, "    challenge: expected {c:?}, got {:?}", d.challenge);
        }
    }
    if let Some(r) = expect.replayed {
        if r != got.replayed {
            let _ = writeln!(diff, "    replayed:  expected {r}, got {}", got.replayed);
        }
    }
    if !diff.is_empty() {
        for r in &d.reasons {
            let _ = writeln!(
                diff,
                "    (reason {} {}: {})",
                r.code,
                r.action.name(),
                r.message
            );
        }
    }
    diff.trim_end().to_string()
}

/// Prints one line per scenario (and the diff of each failure) and a closing
/// `N passed, M failed` line; returns the number failed.
pub fn report(outcomes: &[Outcome], out: &mut impl std::io::Write) -> usize {
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    for o in outcomes {
        let file = o
            .file
            .file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default();
        if o.passed() {
            let _ = writeln!(out, "ok   {file}: {} ({} steps)", o.name, o.steps);
        } else {
            let _ = writeln!(out, "FAIL {file}: {}", o.name);
            for f in &o.failures {
                let _ = writeln!(out, "  {f}");
            }
        }
    }
    let _ = writeln!(out, "{} passed, {failed} failed", outcomes.len() - failed);
    failed
}
