//! A rule pack: a folder with a manifest (`pack.toml`), one Rhai script per
//! rule, and list files. Loaded and checked whole, then immutable: a new
//! version is loaded beside it and swapped in, never edited in place.

pub mod compiled;
pub mod fast;
pub mod lists;
pub mod manifest;
pub mod script;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rhai::{Dynamic, Engine, EvalAltResult, AST};

use crate::decision::{Action, Leniency, Reason};
use crate::model::{Field, Recharge};
use crate::state::window::Shape;
use crate::state::{fnv1a, Aggregate, Counts, KeyGroup, Window, WindowPlan};
use fast::{FastPlan, Ran, RuleSource};
use lists::{List, ListKind};
use manifest::{Amount, Manifest, Mode, OnError, Policy};
use script::{Ctx, Hit, Names, Vars};

/// The manifest's file name inside a pack folder.
pub const MANIFEST: &str = "pack.toml";

/// The most a pack's `[limits]` may allow: enough for any rule worth
/// running on the payment path, and a bound on what one request's rules can
/// take (time on a worker, its stack, memory).
pub const MOST_OPERATIONS: u64 = 1_000_000;
pub const MOST_CALL_DEPTH: u64 = 64;
pub const MOST_STRING_SIZE: u64 = 1 << 20;
pub const MOST_ARRAY_SIZE: u64 = 100_000;

/// The code of the reason a failing rule leaves.
pub const RULE_ERROR: &str = "RULE_ERROR";

/// One problem found while loading a pack, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based; 0 when the problem is about the file as a whole.
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Problem {
    pub fn at(file: &str, line: usize, col: usize, message: impl Into<String>) -> Problem {
        Problem {
            file: file.to_string(),
            line,
            col,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}

/// Every problem of a pack that failed to load.
#[derive(Debug, Clone, thiserror::Error)]
pub struct LoadError {
    pub dir: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rule pack {} has {} problem(s)",
            self.dir.display(),
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// A compiled rule.
pub struct Rule {
    pub id: Arc<str>,
    pub file: String,
    pub mode: Mode,
    pub soft: bool,
    pub score: i64,
    pub description: String,
    pub on_error: OnError,
    ast: AST,
    hits: AtomicU64,
    errors: AtomicU64,
}

impl Rule {
    /// Decisions this rule fired in (errors included).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Decisions in which this rule failed.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// A loaded, checked, compiled pack.
pub struct Pack {
    pub dir: PathBuf,
    pub name: String,
    /// Content hash of the manifest, scripts and lists.
    pub version: Arc<str>,
    /// When it was loaded, Unix ms.
    pub loaded_at_ms: i64,
    pub policy: Policy,
    pub leniency: Option<Leniency>,
    pub plan: WindowPlan,
    pub rules: Vec<Rule>,
    pub lists: Vec<(String, List)>,
    allowlists: Vec<usize>,
    names: Arc<Names>,
    engine: Engine,
    fast: FastPlan,
}

/// What the rules of one request said.
#[derive(Debug, Default)]
pub struct Verdict {
    pub reasons: Vec<Reason>,
    pub shadow_reasons: Vec<Reason>,
}

impl Pack {
    /// Loads the pack in `dir`, reporting every problem at once.
    pub fn load(dir: &Path) -> Result<Pack, LoadError> {
        let mut problems = Vec::new();
        let pack = load_inner(dir, &mut problems);
        match pack {
            Some(pack) if problems.is_empty() => Ok(pack),
            _ => Err(LoadError {
                dir: dir.to_path_buf(),
                problems,
            }),
        }
    }

    /// Zeroes the rules' hit counters (after a pack's own scenarios ran on it).
    pub fn reset_hits(&self) {
        for rule in &self.rules {
            rule.hits.store(0, Ordering::Relaxed);
            rule.errors.store(0, Ordering::Relaxed);
        }
    }

    /// The windows, lists and parameters the scripts resolve by name.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// List membership of one request, and whether it is allow-listed.
    pub fn list_hits(&self, recharge: &Recharge) -> (script::ListHits, bool) {
        let hits: script::ListHits = self
            .lists
            .iter()
            .map(|(_, list)| match list.kind {
                ListKind::Ip => list.contains_ip(recharge.ip),
                ListKind::User => list.contains_name(&recharge.facts.user_id),
                ListKind::Device => list.contains_name(&recharge.facts.device_id),
            })
            .collect();
        let allowlisted = self.allowlists.iter().any(|&i| hits[i]);
        (hits, allowlisted)
    }

    /// Builds the rules' context for one request.
    pub fn context(
        &self,
        recharge: Recharge,
        location: Option<Arc<crate::geo::Location>>,
        begun: crate::state::Begun,
    ) -> Ctx {
        let (lists, allowlisted) = self.list_hits(&recharge);
        Ctx {
            recharge,
            location,
            windows: begun.windows,
            profile: begun.profile,
            lists,
            allowlisted,
        }
    }

    /// Runs every rule on one request. Rules are pure: this reads the context
    /// and nothing else. Borrowed, not moved: the context is some 500 bytes,
    /// and the caller still needs the recharge in it.
    ///
    /// The rules run on the fast path (see [`fast`]) where they can; a rule
    /// that cannot, or a segment of rules that failed there, runs the
    /// original way: each rule on its own AST, with the rule variables in
    /// scope, on the engine with the pack's limits.
    pub fn run(&self, ctx: &Ctx) -> Verdict {
        self.run_with(ctx, true)
    }

    /// [`Pack::run`] without the fast path: every rule evaluated on its own,
    /// the original way. The same verdict, slower; for tests and benchmarks.
    pub fn run_rule_by_rule(&self, ctx: &Ctx) -> Verdict {
        self.run_with(ctx, false)
    }

    fn run_with(&self, ctx: &Ctx, fast: bool) -> Verdict {
        if fast && !self.fast.needs_shared() {
            return self.run_borrowed(ctx);
        }
        // The rule variables hold the context: a copy, made only for packs
        // with rules that read the variables whole, which run in Rhai.
        let ctx = Arc::new(self.vars(ctx));
        let mut verdict = Verdict::default();
        {
            // The rule variables, for the rules that run the original way:
            // made once, on the first such rule.
            let mut alone: Option<rhai::Scope> = None;
            let mut vars = || script::scope(Some(&ctx));
            let mut out = |ran: Ran| match ran {
                Ran::Slow(i) => self.run_alone(i, &ctx, &mut alone, &mut verdict),
                ran => self.settle_ran(ran, &mut verdict),
            };
            if fast {
                self.fast.run(&ctx, &mut vars, &mut out);
            } else {
                for (i, rule) in self.rules.iter().enumerate() {
                    if !(rule.soft && ctx.allowlisted) {
                        out(Ran::Slow(i));
                    }
                }
            }
        }
        verdict
    }

    /// The fast path when no rule needs the rule variables as a rule: the
    /// context is only borrowed, and shared (a copy) only if a rule hands a
    /// request over to Rhai.
    fn run_borrowed(&self, ctx: &Ctx) -> Verdict {
        let mut verdict = Verdict::default();
        {
            let mut shared: Option<Arc<Vars>> = None;
            let mut alone: Option<rhai::Scope> = None;
            // No step reads the variables whole (`needs_shared`).
            let mut vars = || script::scope(None);
            let mut out = |ran: Ran| match ran {
                Ran::Slow(i) => {
                    let shared = shared.get_or_insert_with(|| Arc::new(self.vars(ctx)));
                    self.run_alone(i, shared, &mut alone, &mut verdict)
                }
                ran => self.settle_ran(ran, &mut verdict),
            };
            self.fast.run(ctx, &mut vars, &mut out);
        }
        verdict
    }

    /// The rule variables' copy of a context.
    fn vars(&self, ctx: &Ctx) -> Vars {
        Vars {
            ctx: ctx.clone(),
            names: self.names.clone(),
        }
    }

    /// One rule, the original way: its own AST, the rule variables in scope.
    fn run_alone(
        &self,
        i: usize,
        ctx: &Arc<Vars>,
        scope: &mut Option<rhai::Scope<'static>>,
        verdict: &mut Verdict,
    ) {
        let rule = &self.rules[i];
        let scope = scope.get_or_insert_with(|| script::scope(Some(ctx)));
        let base = scope.len();
        let result = self.engine.eval_ast_with_scope::<Dynamic>(scope, &rule.ast);
        scope.rewind(base);
        self.settle(rule, result, verdict);
    }

    fn settle_ran(&self, ran: Ran, verdict: &mut Verdict) {
        match ran {
            Ran::Value(i, value) => self.settle(&self.rules[i], Ok(value), verdict),
            Ran::Compiled(_, compiled::Value::Unit) => {}
            Ran::Compiled(i, compiled::Value::Hit(hit)) => {
                let rule = &self.rules[i];
                self.record(rule, self.reason(rule, *hit), verdict)
            }
            Ran::Compiled(i, value) => {
                self.settle(&self.rules[i], Ok(value.into_dynamic()), verdict)
            }
            Ran::Slow(_) => unreachable!("run by the caller"),
        }
    }

    /// Of the rules a request that is not allow-listed runs: how many are
    /// compiled to Rust, how many run in merged Rhai segments, how many run
    /// alone the original way.
    pub fn fast_coverage(&self) -> (usize, usize, usize) {
        self.fast.coverage()
    }

    /// Per rule: how many requests its compiled form handed over to Rhai.
    pub fn fast_bails(&self) -> Vec<u64> {
        self.fast.bails()
    }

    /// What one rule's evaluation means for the verdict: nothing (unit), a
    /// reason, or a RULE_ERROR reason.
    fn settle(
        &self,
        rule: &Rule,
        result: Result<Dynamic, Box<EvalAltResult>>,
        verdict: &mut Verdict,
    ) {
        let reason = match result {
            Ok(v) if v.is_unit() => return,
            Ok(v) => match v.try_cast::<Hit>() {
                Some(hit) => self.reason(rule, hit),
                None => Err(
                    "a rule must end with a hit (block, challenge, flag, notice) or nothing"
                        .to_string(),
                ),
            },
            Err(e) => Err(e.to_string()),
        };
        self.record(rule, reason, verdict);
    }

    /// Counts a rule's hit (or error) and files its reason.
    fn record(&self, rule: &Rule, reason: Result<(Reason, bool), String>, verdict: &mut Verdict) {
        rule.hits.fetch_add(1, Ordering::Relaxed);
        match reason {
            Ok((reason, true)) => verdict.shadow_reasons.push(reason),
            Ok((reason, false)) => verdict.reasons.push(reason),
            Err(error) => {
                rule.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(rule = %rule.id, %error, "rule failed");
                let reason = rule_error(rule, &error);
                if rule.mode == Mode::Shadow {
                    verdict.shadow_reasons.push(reason);
                } else {
                    verdict.reasons.push(reason);
                }
            }
        }
    }

    /// Turns a hit into a reason; the flag says it goes to shadow_reasons.
    fn reason(&self, rule: &Rule, hit: Hit) -> Result<(Reason, bool), String> {
        if !is_code(&hit.code) {
            return Err(format!(
                "code `{}` must be UPPER_SNAKE_CASE (letters, digits, underscores)",
                hit.code
            ));
        }
        let challenge = if hit.action == Action::Challenge && hit.challenge.is_empty() {
            self.policy.default_challenge.clone()
        } else {
            hit.challenge.to_string()
        };
        let shadow = hit.notice || rule.mode == Mode::Shadow;
        Ok((
            Reason {
                rule_id: rule.id.clone(),
                code: hit.code.to_string(),
                message: hit.message.to_string(),
                action: hit.action,
                score: if hit.notice {
                    0
                } else {
                    hit.score.unwrap_or(rule.score)
                },
                challenge,
            },
            shadow,
        ))
    }
}

fn rule_error(rule: &Rule, error: &str) -> Reason {
    let action = match rule.on_error {
        OnError::Skip => Action::Allow,
        OnError::Challenge => Action::Challenge,
        OnError::Block => Action::Block,
    };
    Reason {
        rule_id: rule.id.clone(),
        code: RULE_ERROR.to_string(),
        message: format!("rule {} failed: {error}", rule.id),
        action,
        score: 0,
        challenge: String::new(),
    }
}

pub(crate) fn is_code(code: &str) -> bool {
    code.starts_with(|c: char| c.is_ascii_uppercase())
        && code
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn load_inner(dir: &Path, problems: &mut Vec<Problem>) -> Option<Pack> {
    let manifest_path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => text,
        Err(e) => {
            problems.push(Problem::at(
                &manifest_path.display().to_string(),
                0,
                0,
                e.to_string(),
            ));
            return None;
        }
    };
    let mf = MANIFEST;
    let manifest: Manifest = match toml::from_str(&text) {
        Ok(m) => m,
        Err(e) => {
            let (line, col) = e.span().map_or((1, 1), |s| line_col(&text, s.start));
            problems.push(Problem::at(mf, line, col, e.message().trim().to_string()));
            return None;
        }
    };
    let mut hasher_parts: Vec<(String, Vec<u8>)> =
        vec![(MANIFEST.to_string(), text.clone().into_bytes())];
    let here = |needle: &str| line_col_of(&text, needle);

    // Parameters.
    let mut params: HashMap<String, Dynamic> = HashMap::new();
    for (name, value) in &manifest.params {
        let dynamic = match value {
            toml::Value::Integer(i) => Dynamic::from(*i),
            toml::Value::Float(f) => Dynamic::from(*f),
            toml::Value::Boolean(b) => Dynamic::from(*b),
            toml::Value::String(s) => Dynamic::from(s.clone()),
            _ => {
                let (l, c) = here(&format!("{name} ="));
                problems.push(Problem::at(
                    mf,
                    l,
                    c,
                    format!("parameter `{name}` must be a number, boolean or string"),
                ));
                continue;
            }
        };
        params.insert(name.clone(), dynamic);
    }
    let amount = |a: &Amount, what: &str, problems: &mut Vec<Problem>| -> i64 {
        match a {
            Amount::Fen(n) => *n,
            Amount::Param(p) => match manifest.params.get(p) {
                Some(toml::Value::Integer(n)) => *n,
                _ => {
                    let (l, c) = here(&format!("\"{p}\""));
                    problems.push(Problem::at(
                        mf,
                        l,
                        c,
                        format!("{what}: `{p}` is not an integer parameter"),
                    ));
                    0
                }
            },
        }
    };

    // Windows.
    let profile_span_ms = manifest::parse_span(&manifest.profile.span).unwrap_or_else(|| {
        let (l, c) = here("span");
        problems.push(Problem::at(
            mf,
            l,
            c,
            format!(
                "profile span `{}` is not a duration like 30d",
                manifest.profile.span
            ),
        ));
        30 * 86_400_000
    });
    let mut plan = WindowPlan {
        profile_span_ms,
        ..WindowPlan::default()
    };
    let mut window_index = HashMap::new();
    for (name, def) in &manifest.windows {
        let (l, c) = here(&format!("[windows.{name}]"));
        let mut bad =
            |msg: String| problems.push(Problem::at(mf, l, c, format!("window `{name}`: {msg}")));
        let mut fields = Vec::new();
        for f in &def.key {
            match Field::parse(f) {
                Some(field) => fields.push(field),
                None => bad(format!("unknown key field `{f}`")),
            }
        }
        if def.key.is_empty() {
            bad("key needs at least one field".into());
        }
        let counts = Counts::parse(&def.counts).unwrap_or_else(|| {
            bad(format!("unknown counts `{}` (attempts, allowed, succeeded, failed, chargeback, challenge_failed, login_succeeded, login_failed)", def.counts));
            Counts::Attempts
        });
        if counts.is_login() {
            if let Some(f) = fields.iter().find(|f| !f.on_login()) {
                bad(format!("login events carry no `{}`", f.name()));
            }
        }
        let aggregate = match (def.aggregate.as_str(), def.of.as_deref()) {
            ("count", None) => Aggregate::Count,
            ("sum", None) => Aggregate::Sum,
            ("distinct", Some(of)) => match Field::parse(of) {
                Some(f) => Aggregate::Distinct(f),
                None => {
                    bad(format!("unknown field `{of}` to count distinct values of"));
                    Aggregate::Count
                }
            },
            ("distinct", None) => {
                bad("distinct needs `of`, the field whose distinct values are counted".into());
                Aggregate::Count
            }
            (other, _) => {
                bad(format!(
                    "aggregate `{other}` must be count, sum or distinct (with `of`)"
                ));
                Aggregate::Count
            }
        };
        let span = manifest::parse_span(&def.span).unwrap_or_else(|| {
            bad(format!(
                "span `{}` is not a duration like 90s, 10m, 24h, 30d",
                def.span
            ));
            60_000
        });
        // Buckets are whole seconds (see `Shape`): a shorter span would
        // quietly count over a second, which is not what the pack says.
        if span < 1_000 {
            bad("span is shorter than 1 second".into());
        }
        if span > 31 * 86_400_000 {
            bad("span is longer than 31 days".into());
        }
        let min_amount = def.min_amount.as_ref().map_or(0, |a| {
            amount(a, &format!("window `{name}` min_amount"), problems)
        });
        let prefix = def.key.join("+");
        let group = match plan.groups.iter().position(|g| g.prefix == prefix) {
            Some(g) => g,
            None => {
                plan.groups.push(KeyGroup {
                    fields,
                    prefix: prefix.clone(),
                    windows: Vec::new(),
                });
                plan.groups.len() - 1
            }
        };
        let sig = fnv1a(&[
            name.as_bytes(),
            prefix.as_bytes(),
            format!("{aggregate:?}|{counts:?}|{span}|{min_amount}").as_bytes(),
        ]);
        window_index.insert(name.clone(), plan.windows.len());
        plan.groups[group].windows.push(plan.windows.len());
        plan.windows.push(Window {
            name: name.clone(),
            sig,
            shape: Shape::new(span),
            aggregate,
            counts,
            min_amount,
            group,
        });
    }

    // Lists.
    let mut lists = Vec::new();
    let mut list_index = HashMap::new();
    for (name, def) in &manifest.lists {
        let (l, c) = here(&format!("[lists.{name}]"));
        let Some(kind) = ListKind::parse(&def.kind) else {
            problems.push(Problem::at(
                mf,
                l,
                c,
                format!(
                    "list `{name}`: kind `{}` must be ip, user or device",
                    def.kind
                ),
            ));
            continue;
        };
        if name == "allowlisted" {
            problems.push(Problem::at(
                mf,
                l,
                c,
                "`allowlisted` is reserved for list.allowlisted".to_string(),
            ));
        }
        let path = dir.join(&def.file);
        match std::fs::read_to_string(&path) {
            Ok(body) => {
                match List::parse(kind, &body, &def.file) {
                    Ok(list) => {
                        list_index.insert(name.clone(), lists.len());
                        lists.push((name.clone(), list));
                    }
                    Err(mut ps) => problems.append(&mut ps),
                }
                hasher_parts.push((def.file.clone(), body.into_bytes()));
            }
            Err(e) => problems.push(Problem::at(
                mf,
                l,
                c,
                format!("list `{name}`: cannot read {}: {e}", def.file),
            )),
        }
    }

    // Policy.
    let mut allowlists = Vec::new();
    for name in &manifest.policy.allowlists {
        match list_index.get(name) {
            Some(&i) => allowlists.push(i),
            None => {
                let (l, c) = here(&format!("\"{name}\""));
                problems.push(Problem::at(
                    mf,
                    l,
                    c,
                    format!("policy.allowlists names unknown list `{name}`"),
                ));
            }
        }
    }
    let leniency = manifest.policy.leniency.as_ref().map(|len| Leniency {
        below_amount: amount(&len.below_amount, "policy.leniency.below_amount", problems),
        demote: len.demote.clone(),
    });

    // Limits: each bounded, never 0 (to Rhai, 0 means no limit at all).
    // Strings hold at least the longest text a request brings in (an
    // attribute value): Rhai checks what a getter hands it, the fast path
    // reads in place, and the two must agree.
    let l = &manifest.limits;
    let least_string = crate::api::validate::MAX_ATTRIBUTE_VALUE_LEN as u64;
    for (name, value, least, most) in [
        ("max_operations", l.max_operations, 1, MOST_OPERATIONS),
        (
            "max_call_depth",
            l.max_call_depth as u64,
            1,
            MOST_CALL_DEPTH,
        ),
        (
            "max_string_size",
            l.max_string_size as u64,
            least_string,
            MOST_STRING_SIZE,
        ),
        (
            "max_array_size",
            l.max_array_size as u64,
            1,
            MOST_ARRAY_SIZE,
        ),
    ] {
        if !(least..=most).contains(&value) {
            let (l, c) = here(&format!("{name} ="));
            problems.push(Problem::at(
                mf,
                l,
                c,
                format!("limits.{name} must be from {least} to {most}, not {value}"),
            ));
        }
    }
    // A string parameter longer than the limit would fail every rule that
    // reads it (and on the fast path, not fail): refused here instead.
    for (name, value) in &manifest.params {
        if let toml::Value::String(text) = value {
            if text.len() > l.max_string_size {
                let (l, c) = here(&format!("{name} ="));
                problems.push(Problem::at(
                    mf,
                    l,
                    c,
                    format!("parameter `{name}` is longer than limits.max_string_size"),
                ));
            }
        }
    }

    // Rules.
    let names = Names {
        windows: window_index,
        lists: list_index,
        params,
    };
    let mut engine = script::engine(&manifest.limits);
    script::register_names(&mut engine, &names);
    let functions = script::known_functions(&engine);
    let known: BTreeMap<&str, HashSet<&str>> = BTreeMap::from([
        ("window", names.windows.keys().map(String::as_str).collect()),
        ("param", names.params.keys().map(String::as_str).collect()),
        (
            "list",
            names
                .lists
                .keys()
                .map(String::as_str)
                .chain(["allowlisted"])
                .collect(),
        ),
    ]);
    let mut rules = Vec::new();
    let mut sources = Vec::new();
    let mut ids = HashSet::new();
    for (n, def) in manifest.rules.iter().enumerate() {
        let (l, c) = nth_line_col(&text, "[[rules]]", n);
        if !ids.insert(def.id.clone()) {
            problems.push(Problem::at(
                mf,
                l,
                c,
                format!("duplicate rule id `{}`", def.id),
            ));
        }
        let source = match std::fs::read_to_string(dir.join(&def.file)) {
            Ok(s) => s,
            Err(e) => {
                problems.push(Problem::at(
                    mf,
                    l,
                    c,
                    format!("rule `{}`: cannot read {}: {e}", def.id, def.file),
                ));
                continue;
            }
        };
        for u in script::name_uses(&source) {
            if !known[u.namespace].contains(u.name.as_str()) {
                let what = match u.namespace {
                    "window" => "window",
                    "param" => "parameter",
                    _ => "list",
                };
                problems.push(Problem::at(
                    &def.file,
                    u.line,
                    u.col,
                    format!("unknown {what} `{}`", u.name),
                ));
            }
        }
        let inlined = script::inline_params(&source, &names);
        match script::compile(&engine, &inlined, &def.file) {
            Ok(ast) => {
                for (name, line, col) in script::unknown_calls(&ast, &functions) {
                    problems.push(Problem::at(
                        &def.file,
                        line,
                        col,
                        format!("unknown function `{name}`"),
                    ));
                }
                for (why, line, col) in script::bad_hits(&ast) {
                    problems.push(Problem::at(&def.file, line, col, why));
                }
                sources.push(inlined);
                rules.push(Rule {
                    id: Arc::from(def.id.as_str()),
                    file: def.file.clone(),
                    mode: def.mode,
                    soft: def.soft,
                    score: def.score,
                    description: def.description.clone(),
                    on_error: def.on_error.unwrap_or(manifest.policy.on_error),
                    ast,
                    hits: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                })
            }
            Err(p) => problems.push(p),
        }
        hasher_parts.push((def.file.clone(), source.into_bytes()));
    }
    if manifest.rules.is_empty() {
        problems.push(Problem::at(mf, 0, 0, "the pack has no rules"));
    }

    let parts: Vec<&[u8]> = hasher_parts
        .iter()
        .flat_map(|(name, body)| [name.as_bytes(), body.as_slice()])
        .collect();
    let version: Arc<str> = Arc::from(format!("{:016x}", fnv1a(&parts)));

    let fast = FastPlan::build(
        &rules
            .iter()
            .zip(&sources)
            .map(|(rule, source)| RuleSource {
                source,
                ast: &rule.ast,
                soft: rule.soft,
            })
            .collect::<Vec<_>>(),
        &names,
        &manifest.limits,
        || {
            let mut engine = script::engine(&manifest.limits);
            script::register_names(&mut engine, &names);
            engine
        },
    );

    Some(Pack {
        dir: dir.to_path_buf(),
        name: manifest.pack.name.clone(),
        version,
        loaded_at_ms: crate::now_ms(),
        policy: manifest.policy,
        leniency,
        plan,
        rules,
        lists,
        allowlists,
        names: Arc::new(names),
        engine,
        fast,
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Position of the `n`th (0-based) occurrence of `needle`, or (0, 0).
fn nth_line_col(text: &str, needle: &str, n: usize) -> (usize, usize) {
    text.match_indices(needle)
        .nth(n)
        .map_or((0, 0), |(at, _)| line_col(text, at))
}

/// Position of the first occurrence of `needle`, or (0, 0).
fn line_col_of(text: &str, needle: &str) -> (usize, usize) {
    text.find(needle).map_or((0, 0), |at| line_col(text, at))
}
