//! The fast path: a pack's rules evaluated in as few Rhai calls as possible,
//! on values resolved before any rule runs.
//!
//! Why: in Rhai's tree walker a property read (`window.x`, `request.amount`)
//! is a dot chain plus a native getter call, about 40 times the cost of
//! reading a variable, and each evaluation starts a fresh runtime state and
//! function cache. So when a pack loads, every rule is also compiled a second
//! way:
//!
//! - every `namespace.name` read the engine knows (a window, a list, a
//!   request, account, location or profile field, a parameter that was not
//!   inlined) becomes a variable `<prefix><n>`, padded to the same length so
//!   every line:column stays put. A variable resolver on the fast engine
//!   answers those names from a per-thread table filled once per request
//!   ([`Feature::value`], the very values the getters return);
//! - consecutive rules are merged into one program, each rule's body a block
//!   whose value lands in a variable `<prefix>r<i>`: one evaluation per
//!   segment. A rule that may `return` ends its segment (its value is then
//!   the evaluation's result), so a return never skips another rule.
//!
//! Exactness: the fast path only ever answers when it ran without error.
//! Any error in a segment (a runtime error, a limit) re-runs that segment's
//! rules one by one, on their own ASTs as compiled for `riskgate check`, on
//! the rule engine with the pack's limits: the RULE_ERROR reason, its
//! message and the `on_error` action are exactly what they were before.
//! The fast engine's operations limit is a quarter of the pack's, per
//! segment: a rewritten read costs one operation where the dot chain it
//! replaces costs at most four, so a segment that stays under its budget had
//! every one of its rules under the pack's limit. Rules the fast path cannot
//! mirror exactly (ones defining functions or closures, or asking whether
//! a variable or function is defined) always run the original way.

use std::cell::RefCell;

use rhai::{ASTNode, Dynamic, Engine, Expr, ImmutableString, Scope, Stmt, AST};

use super::compiled::{Compiler, Frame, Program, Scalar, Value};
use super::script::{self, Ctx, Names, VARIABLES};

/// Rules merged into one evaluation at most: bounds what a segment that
/// fails has to run again.
const SEGMENT_MAX: usize = 16;

/// The fast engine's operations limit, as a fraction of the pack's.
pub const OPS_DIVISOR: u64 = 4;

/// A value a script reads as `namespace.name`, resolved natively.
#[derive(Debug, Clone)]
pub enum Feature {
    Window(usize),
    List(usize),
    Allowlisted,
    /// A parameter the compiler did not inline (a string, say): its name
    /// and value.
    Param(String, Value),
    RequestId,
    UserId,
    Amount,
    Currency,
    Channel,
    Product,
    Target,
    Ip,
    DeviceId,
    TimestampMs,
    IsIpv6,
    RealNameVerified,
    Status,
    CreatedAtMs,
    HasPurchaseHistory,
    AgeDays,
    Known,
    Country,
    Region,
    City,
    Latitude,
    Longitude,
    LocatedEvents,
    UsualRegion,
    UsualRegions,
    LastLoginNewRegion,
    SecsSinceLogin,
    TravelKm,
    TravelKmh,
}

/// Where the value of a number or boolean feature lies (see
/// [`Feature::reader`]): small and `Copy`, so a compiled condition holds its
/// operands' readers and reads them directly.
#[derive(Debug, Clone, Copy)]
pub enum Reader {
    /// A parameter's value.
    Const(Scalar),
    Window(usize),
    List(usize),
    /// An integer field of the request, account or profile.
    IntField(fn(&Ctx) -> i64),
    /// Another field of the request, account, location or profile, or
    /// whether an allow list matched.
    Field(fn(&Ctx) -> Scalar),
}

impl Reader {
    #[inline]
    pub fn read(self, ctx: &Ctx) -> Scalar {
        match self {
            Reader::Const(s) => s,
            Reader::Window(i) => Scalar::Int(ctx.windows[i]),
            Reader::List(i) => Scalar::Bool(ctx.lists[i]),
            Reader::IntField(get) => Scalar::Int(get(ctx)),
            Reader::Field(get) => get(ctx),
        }
    }

    /// Where an integer lies, when this always reads one.
    pub fn int(self) -> Option<IntReader> {
        match self {
            Reader::Const(Scalar::Int(n)) => Some(IntReader::Const(n)),
            Reader::Window(i) => Some(IntReader::Window(i)),
            Reader::IntField(get) => Some(IntReader::Field(get)),
            _ => None,
        }
    }
}

/// A [`Reader`] known to read an integer: a comparison of two of them
/// (most conditions of a rule: an amount or a window against a parameter)
/// needs no [`Scalar`] and no match on the operands' types.
#[derive(Debug, Clone, Copy)]
pub enum IntReader {
    Const(i64),
    Window(usize),
    Field(fn(&Ctx) -> i64),
}

impl IntReader {
    #[inline]
    pub fn read(self, ctx: &Ctx) -> i64 {
        match self {
            IntReader::Const(n) => n,
            IntReader::Window(i) => ctx.windows[i],
            IntReader::Field(get) => get(ctx),
        }
    }
}

impl Feature {
    /// The feature `namespace.name` reads, when the engine knows it.
    pub fn parse(namespace: &str, name: &str, names: &Names) -> Option<Feature> {
        use Feature::*;
        Some(match (namespace, name) {
            ("window", n) => Window(*names.windows.get(n)?),
            ("list", "allowlisted") => Allowlisted,
            ("list", n) => List(*names.lists.get(n)?),
            ("param", n) => Param(n.to_string(), Value::from_param(names.params.get(n)?)?),
            ("request", "id") => RequestId,
            ("request", "user_id") => UserId,
            ("request", "amount") => Amount,
            ("request", "currency") => Currency,
            ("request", "channel") => Channel,
            ("request", "product") => Product,
            ("request", "target") => Target,
            ("request", "ip") => Ip,
            ("request", "device_id") => DeviceId,
            ("request", "timestamp_ms") => TimestampMs,
            ("request", "is_ipv6") => IsIpv6,
            ("account", "real_name_verified") => RealNameVerified,
            ("account", "status") => Status,
            ("account", "created_at_ms") => CreatedAtMs,
            ("account", "has_purchase_history") => HasPurchaseHistory,
            ("account", "age_days") => AgeDays,
            ("geo", "known") => Known,
            ("geo", "country") => Country,
            ("geo", "region") => Region,
            ("geo", "city") => City,
            ("geo", "latitude") => Latitude,
            ("geo", "longitude") => Longitude,
            ("profile", "located_events") => LocatedEvents,
            ("profile", "usual_region") => UsualRegion,
            ("profile", "usual_regions") => UsualRegions,
            ("profile", "last_login_new_region") => LastLoginNewRegion,
            ("profile", "secs_since_login") => SecsSinceLogin,
            ("profile", "travel_km") => TravelKm,
            ("profile", "travel_kmh") => TravelKmh,
            _ => return None,
        })
    }

    /// Both read the same thing.
    fn same(&self, other: &Feature) -> bool {
        match (self, other) {
            (Feature::Param(a, _), Feature::Param(b, _)) => a == b,
            (Feature::Window(a), Feature::Window(b)) | (Feature::List(a), Feature::List(b)) => {
                a == b
            }
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }

    /// The value, exactly as the getter of `namespace.name` answers it
    /// (a test checks every one against its getter).
    pub fn value(&self, ctx: &Ctx, statuses: &Statuses) -> Value {
        if let Some(v) = self.scalar(ctx) {
            return v.into();
        }
        match self {
            // Before `text`: the pack's copy of the name is a reference
            // count, where a new string would be an allocation.
            Feature::Status => Value::Str(statuses.get(ctx.recharge.account.status)),
            Feature::Param(_, v) => v.clone(),
            _ => match self.text(ctx) {
                Some(s) => Value::Str(ImmutableString::from(s)),
                None => Value::Unit,
            },
        }
    }

    /// The value of a number or boolean feature (a field read: compiled
    /// rules read these in place, uncached); `None` for the others.
    pub fn scalar(&self, ctx: &Ctx) -> Option<Scalar> {
        Some(self.reader()?.read(ctx))
    }

    /// Where a number or boolean feature lies, for the others `None`.
    /// Compiled rules resolve this once, when the pack loads, and then read
    /// the value with no match on the feature.
    pub fn reader(&self) -> Option<Reader> {
        use Feature::*;
        use Scalar::{Bool, Float};
        Some(match self {
            Window(i) => Reader::Window(*i),
            List(i) => Reader::List(*i),
            Param(_, v) => Reader::Const(v.scalar()?),
            Allowlisted => Reader::Field(|c| Bool(c.allowlisted)),
            Amount => Reader::IntField(|c| c.recharge.facts.amount),
            TimestampMs => Reader::IntField(|c| c.recharge.facts.timestamp_ms),
            IsIpv6 => Reader::Field(|c| Bool(c.recharge.ip.is_ipv6())),
            RealNameVerified => Reader::Field(|c| Bool(c.recharge.account.real_name_verified)),
            CreatedAtMs => Reader::IntField(|c| c.recharge.account.created_at_ms),
            HasPurchaseHistory => Reader::Field(|c| Bool(c.recharge.account.has_purchase_history)),
            AgeDays => Reader::Field(|c| Float(script::age_days(c))),
            Known => Reader::Field(|c| Bool(c.location.is_some())),
            Latitude => Reader::Field(|c| Float(script::latitude(c))),
            Longitude => Reader::Field(|c| Float(script::longitude(c))),
            LocatedEvents => Reader::IntField(|c| c.profile.located_events),
            UsualRegion => Reader::Field(|c| Bool(c.profile.usual_region)),
            UsualRegions => Reader::IntField(|c| c.profile.usual_regions),
            LastLoginNewRegion => Reader::Field(|c| Bool(c.profile.last_login_new_region)),
            SecsSinceLogin => Reader::IntField(|c| c.profile.secs_since_login),
            TravelKm => Reader::Field(|c| Float(c.profile.travel_km)),
            TravelKmh => Reader::Field(|c| Float(c.profile.travel_kmh)),
            _ => return None,
        })
    }

    /// The text of a string feature of the request or its location, where
    /// it lies (compared in place, no string made); `None` for the others.
    pub fn text<'c>(&self, ctx: &'c Ctx) -> Option<&'c str> {
        Some(self.text_reader()?(ctx))
    }

    /// Where the text of a string feature lies, for the others `None`: as
    /// [`Feature::reader`] is for numbers and booleans.
    pub fn text_reader(&self) -> Option<fn(&Ctx) -> &str> {
        use Feature::*;
        let read: fn(&Ctx) -> &str = match self {
            RequestId => |c| &c.recharge.request_id,
            UserId => |c| &c.recharge.facts.user_id,
            Currency => |c| &c.recharge.facts.currency,
            Channel => |c| &c.recharge.facts.channel,
            Product => |c| &c.recharge.facts.product,
            Target => |c| &c.recharge.facts.target,
            Ip => |c| &c.recharge.facts.ip_text,
            DeviceId => |c| &c.recharge.facts.device_id,
            Status => |c| c.recharge.account.status.name(),
            Country => |c| script::location_str(c, |l| &l.country),
            Region => |c| script::location_str(c, |l| &l.region),
            City => |c| script::location_str(c, |l| &l.city),
            _ => return None,
        };
        Some(read)
    }
}

/// The account statuses as script strings, made once per pack (a clone is a
/// reference count, not an allocation).
#[derive(Debug)]
pub struct Statuses(Vec<(crate::model::AccountStatus, ImmutableString)>);

impl Default for Statuses {
    fn default() -> Statuses {
        use crate::model::AccountStatus::*;
        Statuses(
            [Unspecified, Active, Frozen, Lost, Arrears, Closed]
                .into_iter()
                .map(|s| (s, ImmutableString::from(s.name())))
                .collect(),
        )
    }
}

impl Statuses {
    fn get(&self, status: crate::model::AccountStatus) -> ImmutableString {
        self.0
            .iter()
            .find(|(s, _)| *s == status)
            .map_or_else(|| status.name().into(), |(_, name)| name.clone())
    }
}

thread_local! {
    /// The features of the request this thread is deciding, in pack order,
    /// as the Rhai segments read them.
    static FEATURES: RefCell<Vec<Dynamic>> = const { RefCell::new(Vec::new()) };
    /// Feature values and local slots for compiled rules, kept between
    /// requests.
    static SCRATCH: RefCell<(Vec<Option<Value>>, Vec<Value>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// What one rule is on the fast path.
struct FastRule {
    /// The rule's body as a block whose value lands in `result`.
    ast: AST,
    /// The variable holding the rule's value after a segment ran.
    result: ImmutableString,
    /// The rule may end the evaluation (`return`, `exit`): it ends its
    /// segment.
    returns: bool,
    /// It reads one of the rule variables whole (`request.attr(..)`, say):
    /// its segment needs them in scope.
    needs_vars: bool,
    /// The rule compiled to Rust, when it only uses what that handles.
    program: Option<Program>,
}

/// One step of a run, in rule order.
enum Step {
    /// Rules (indexes into the pack's rules) merged into one evaluation.
    Segment {
        ast: AST,
        rules: Vec<(usize, ImmutableString)>,
        needs_vars: bool,
    },
    /// A rule run on its own, the original way.
    Alone(usize),
    /// A rule compiled to Rust (its program in [`FastPlan::programs`]).
    Compiled(usize),
}

/// The fast path of one pack.
pub struct FastPlan {
    /// Engine for the segments: the rule engine's API, a quarter of its
    /// operations limit, and the feature resolver.
    engine: Engine,
    features: Vec<Feature>,
    statuses: Statuses,
    /// Compiled rules, by rule index.
    programs: Vec<Option<Program>>,
    /// Local variable slots the largest program needs.
    slots: usize,
    /// Times each compiled rule handed a request over to Rhai.
    bails: Vec<std::sync::atomic::AtomicU64>,
    max_string: usize,
    /// Steps for a request that is not allow-listed, and for one that is
    /// (soft rules left out).
    all: Vec<Step>,
    hard: Vec<Step>,
}

/// What the loader knows of a rule, for the fast path.
pub struct RuleSource<'a> {
    /// The source as compiled for the rule engine (parameters inlined).
    pub source: &'a str,
    /// That compiled AST.
    pub ast: &'a AST,
    pub soft: bool,
}

/// How a step went, for [`FastPlan::run`]'s caller.
pub enum Ran {
    /// A rule's value (unit: nothing to report).
    Value(usize, Dynamic),
    /// A compiled rule's value.
    Compiled(usize, Value),
    /// These rules must run the original way (a segment failed, or they
    /// always do), in this order.
    Slow(usize),
}

impl FastPlan {
    /// Builds the fast path for a pack's rules. `engine` makes a fresh copy
    /// of the pack's rule engine; `max_operations` is the pack's limit.
    pub fn build(
        rules: &[RuleSource],
        names: &Names,
        limits: &super::manifest::Limits,
        engine: impl FnOnce() -> Engine,
    ) -> FastPlan {
        let max_operations = limits.max_operations;
        let prefix = free_prefix(rules.iter().map(|r| r.source));
        let mut engine = engine();
        engine.set_max_operations(if max_operations == 0 {
            0
        } else {
            (max_operations / OPS_DIVISOR).max(1)
        });
        let resolver_prefix = prefix.clone();
        // `on_var` is marked volatile (not deprecated) by Rhai.
        #[allow(deprecated)]
        engine.on_var(move |name, _, _| {
            let Some(n) = name.strip_prefix(resolver_prefix.as_str()) else {
                return Ok(None);
            };
            let Ok(i) = n.parse::<usize>() else {
                return Ok(None);
            };
            Ok(FEATURES.with(|f| f.borrow().get(i).cloned()))
        });

        let mut features: Vec<Feature> = Vec::new();
        let mut fast: Vec<Option<FastRule>> = Vec::new();
        let compiler = Compiler {
            engine: &engine,
            prefix: &prefix,
            max_operations,
            max_variables: 256,
        };
        for (i, rule) in rules.iter().enumerate() {
            fast.push(fast_rule(&compiler, rule, i, names, &mut features));
        }
        let steps = |keep: &dyn Fn(&RuleSource) -> bool| {
            let mut steps = Vec::new();
            let mut open: Vec<usize> = Vec::new();
            let close = |open: &mut Vec<usize>, steps: &mut Vec<Step>| {
                if open.is_empty() {
                    return;
                }
                let mut ast = AST::empty();
                let mut needs_vars = false;
                let mut members = Vec::new();
                for &i in open.iter() {
                    let f = fast[i].as_ref().expect("only fast rules are merged");
                    ast = ast.merge(&f.ast);
                    needs_vars |= f.needs_vars;
                    members.push((i, f.result.clone()));
                }
                steps.push(Step::Segment {
                    ast,
                    rules: members,
                    needs_vars,
                });
                open.clear();
            };
            for (i, rule) in rules.iter().enumerate() {
                if !keep(rule) {
                    continue;
                }
                match &fast[i] {
                    Some(f) if f.program.is_some() => {
                        close(&mut open, &mut steps);
                        steps.push(Step::Compiled(i));
                    }
                    Some(f) => {
                        open.push(i);
                        if f.returns || open.len() >= SEGMENT_MAX {
                            close(&mut open, &mut steps);
                        }
                    }
                    None => {
                        close(&mut open, &mut steps);
                        steps.push(Step::Alone(i));
                    }
                }
            }
            close(&mut open, &mut steps);
            steps
        };
        let all = steps(&|_| true);
        let hard = steps(&|r| !r.soft);
        let programs: Vec<Option<Program>> = fast
            .into_iter()
            .map(|f| f.and_then(|f| f.program))
            .collect();
        let slots = programs
            .iter()
            .flatten()
            .map(|p| p.slots)
            .max()
            .unwrap_or(0);
        FastPlan {
            engine,
            features,
            statuses: Statuses::default(),
            bails: programs.iter().map(|_| Default::default()).collect(),
            programs,
            slots,
            max_string: limits.max_string_size,
            all,
            hard,
        }
    }

    /// Some step always needs the rule variables (a rule run alone, or a
    /// segment reading a variable whole): the caller should share the
    /// context from the start.
    pub fn needs_shared(&self) -> bool {
        self.all.iter().chain(&self.hard).any(|s| {
            matches!(
                s,
                Step::Alone(_)
                    | Step::Segment {
                        needs_vars: true,
                        ..
                    }
            )
        })
    }

    /// Per rule: how many times its compiled form handed a request over to
    /// Rhai (an error to report, or a value it does not handle).
    pub fn bails(&self) -> Vec<u64> {
        self.bails
            .iter()
            .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// Of the rules a request that is not allow-listed runs: how many are
    /// compiled, how many run in merged Rhai segments, how many run alone.
    pub fn coverage(&self) -> (usize, usize, usize) {
        let mut out = (0, 0, 0);
        for s in &self.all {
            match s {
                Step::Compiled(_) => out.0 += 1,
                Step::Segment { rules, .. } => out.1 += rules.len(),
                Step::Alone(_) => out.2 += 1,
            }
        }
        out
    }

    /// Runs the rules for one request, handing each outcome to `out` in rule
    /// order. `vars` gives the scope with the rule variables, for segments
    /// that need them (made at most once, by the caller).
    pub fn run(
        &self,
        ctx: &Ctx,
        vars: &mut dyn FnMut() -> Scope<'static>,
        out: &mut dyn FnMut(Ran),
    ) {
        let steps = if ctx.allowlisted {
            &self.hard
        } else {
            &self.all
        };
        // This thread's buffers from its last request (taken, not borrowed:
        // a nested run would just start its own).
        let (mut features, mut locals) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        // Left all `None` by the last run (see below): only its length
        // may be another pack's.
        if features.len() != self.features.len() {
            features.clear();
            features.resize(self.features.len(), None);
        }
        locals.resize(self.slots, Value::Unit);
        let mut dynamic_features = false;
        // One frame for every compiled rule of the request: they share the
        // feature values it computes.
        let mut frame = Frame {
            ctx,
            defs: &self.features,
            statuses: &self.statuses,
            features: &mut features,
            locals: &mut locals,
            max_string: self.max_string,
            returned: None,
            filled: false,
        };
        for step in steps {
            match step {
                Step::Alone(i) => out(Ran::Slow(*i)),
                Step::Compiled(i) => {
                    let program = self.programs[*i].as_ref().expect("a compiled rule");
                    match program.run(&mut frame) {
                        // Most rules, most of the time: nothing to report.
                        Some(Value::Unit) => {}
                        Some(value) => out(Ran::Compiled(*i, value)),
                        None => {
                            self.bails[*i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            out(Ran::Slow(*i))
                        }
                    }
                }
                Step::Segment {
                    ast,
                    rules,
                    needs_vars,
                } => {
                    if !dynamic_features {
                        FEATURES.with(|f| {
                            let mut f = f.borrow_mut();
                            f.clear();
                            f.extend(self.features.iter().zip(&*frame.features).map(|(def, v)| {
                                v.clone()
                                    .unwrap_or_else(|| def.value(ctx, &self.statuses))
                                    .into_dynamic()
                            }));
                        });
                        dynamic_features = true;
                    }
                    let mut scope = if *needs_vars { vars() } else { Scope::new() };
                    match self.engine.eval_ast_with_scope::<Dynamic>(&mut scope, ast) {
                        Ok(last) => {
                            let mut last = Some(last);
                            let mut done = true;
                            for (i, name) in rules {
                                if !done {
                                    // Not reached: a rule before it ended
                                    // the evaluation (never, as segments
                                    // are built), so it runs on its own.
                                    out(Ran::Slow(*i));
                                    continue;
                                }
                                match scope.get(name) {
                                    Some(v) => out(Ran::Value(*i, v.clone())),
                                    None => {
                                        // This rule returned: its value is
                                        // the evaluation's.
                                        out(Ran::Value(*i, last.take().unwrap_or_default()));
                                        done = false;
                                    }
                                }
                            }
                        }
                        Err(_) => rules.iter().for_each(|(i, _)| out(Ran::Slow(*i))),
                    }
                }
            }
        }
        let filled = frame.filled;
        drop(frame);
        // Values hold strings of this request: drop them now, keep the room
        // (most requests put none there, and skip the walk).
        if filled {
            features.clear();
        }
        locals.clear();
        SCRATCH.with(|s| *s.borrow_mut() = (features, locals));
    }
}

/// A prefix no rule's source contains, for the fast path's variables.
fn free_prefix<'a>(sources: impl Iterator<Item = &'a str> + Clone) -> String {
    let mut prefix = "_rg".to_string();
    while sources.clone().any(|s| s.contains(&prefix)) {
        prefix.push('x');
    }
    prefix
}

/// Compiles one rule for the fast path, or says it must run the original
/// way.
fn fast_rule(
    compiler: &Compiler,
    rule: &RuleSource,
    index: usize,
    names: &Names,
    features: &mut Vec<Feature>,
) -> Option<FastRule> {
    let (engine, prefix) = (compiler.engine, compiler.prefix);
    if rule.ast.has_functions() || asks_about_definitions(rule.ast) || binds_variable(rule.ast) {
        return None;
    }
    let mut feature_index = |namespace: &str, name: &str| {
        let feature = Feature::parse(namespace, name, names)?;
        Some(match features.iter().position(|f| f.same(&feature)) {
            Some(i) => i,
            None => {
                features.push(feature);
                features.len() - 1
            }
        })
    };
    let rewritten = script::rewrite_reads(rule.source, prefix, &mut feature_index);
    let result: ImmutableString = format!("{prefix}r{index}").into();
    // On the first line, so the rule's lines keep their numbers.
    let wrapped = format!("let {result} = {{{rewritten}\n}};");
    let mut scope = script::scope(None);
    for i in 0..features.len() {
        // Not constants: the optimizer must not fold them.
        scope.push(format!("{prefix}{i}"), ());
    }
    let ast = engine.compile_with_scope(&scope, &wrapped).ok()?;
    if ast.has_functions() {
        return None;
    }
    let mut returns = false;
    let mut needs_vars = false;
    ast.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            Some(ASTNode::Stmt(Stmt::Return(..))) => returns = true,
            Some(ASTNode::Expr(Expr::FnCall(f, _))) | Some(ASTNode::Stmt(Stmt::FnCall(f, _)))
                if f.name == "exit" =>
            {
                returns = true
            }
            Some(ASTNode::Expr(Expr::Variable(v, ..))) if VARIABLES.contains(&v.1.as_str()) => {
                needs_vars = true
            }
            _ => {}
        }
        true
    });
    let program = if needs_vars {
        None
    } else {
        engine
            .compile_with_scope(&scope, &rewritten)
            .ok()
            .and_then(|bare| compiler.compile(&bare, &rewritten, features))
    };
    Some(FastRule {
        ast,
        result,
        returns,
        needs_vars,
        program,
    })
}

/// Calls that see the scope or the function table, which differ on the fast
/// path.
fn asks_about_definitions(ast: &AST) -> bool {
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(Expr::FnCall(f, _)))
        | Some(ASTNode::Expr(Expr::MethodCall(f, _)))
        | Some(ASTNode::Stmt(Stmt::FnCall(f, _))) = path.last()
        {
            if ["is_def_var", "is_def_fn", "Fn", "call", "curry"].contains(&f.name.as_str()) {
                found = true;
            }
        }
        !found
    });
    found
}

/// A `let`, `const`, loop or `catch` variable named like a rule variable:
/// `profile.x` would then read the rule's own `profile`, not the feature.
fn binds_variable(ast: &AST) -> bool {
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        let bound: Vec<&str> = match path.last() {
            Some(ASTNode::Stmt(Stmt::Var(x, ..))) => vec![x.0.name.as_str()],
            Some(ASTNode::Stmt(Stmt::For(x, _))) => std::iter::once(x.0.name.as_str())
                .chain(x.1.as_ref().map(|c| c.name.as_str()))
                .collect(),
            Some(ASTNode::Stmt(Stmt::TryCatch(x, _))) => match &x.expr {
                Expr::Variable(v, ..) => vec![v.1.as_str()],
                _ => vec![],
            },
            Some(ASTNode::Stmt(Stmt::Import(x, _))) => vec![x.1.name.as_str()],
            _ => vec![],
        };
        found |= bound.iter().any(|n| VARIABLES.contains(n));
        !found
    });
    found
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::decision::Reason;
    use crate::geo::Location;
    use crate::model::{Account, AccountStatus, Facts, Recharge};
    use crate::pack::{Pack, Verdict};
    use crate::state::ProfileView;

    const MANIFEST: &str = r#"
[policy]
allowlists = ["user_allow"]

[limits]
max_operations = 2000

[params]
limit = 5
label = "a string parameter"
on = true

[windows.w]
key = ["user_id"]
aggregate = "count"
span = "10m"

[windows.s]
key = ["user_id"]
aggregate = "sum"
span = "1h"

[lists.user_allow]
kind = "user"
file = "allow.txt"

[lists.b]
kind = "ip"
file = "block.txt"
"#;

    /// A pack of `(id, script, extra manifest lines)` rules.
    fn pack(rules: &[(&str, &str, &str)]) -> Pack {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), rules);
        Pack::load(dir.path()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn write(dir: &Path, rules: &[(&str, &str, &str)]) {
        let mut manifest = MANIFEST.to_string();
        for (id, script, extra) in rules {
            std::fs::write(dir.join(format!("{id}.rhai")), script).unwrap();
            manifest.push_str(&format!(
                "\n[[rules]]\nid = \"{id}\"\nfile = \"{id}.rhai\"\nscore = 10\n{extra}\n"
            ));
        }
        std::fs::write(dir.join("pack.toml"), manifest).unwrap();
        std::fs::write(dir.join("allow.txt"), "vip\n").unwrap();
        std::fs::write(dir.join("block.txt"), "192.0.2.0/24\n").unwrap();
    }

    fn ctx(pack: &Pack, user: &str, amount: i64, located: bool) -> Ctx {
        let ip = "192.0.2.7".parse().unwrap();
        let recharge = Recharge {
            request_id: format!("r-{user}-{amount}"),
            facts: Facts {
                user_id: user.to_string(),
                ip_text: "192.0.2.7".to_string(),
                device_id: "d1".to_string(),
                target: "13800000000".to_string(),
                channel: "wechat".to_string(),
                product: "phone_credit".to_string(),
                currency: "CNY".to_string(),
                amount,
                timestamp_ms: 1_767_225_600_000,
            },
            ip,
            account: Account {
                real_name_verified: amount % 2 == 0,
                status: if amount > 900 {
                    AccountStatus::Frozen
                } else {
                    AccountStatus::Active
                },
                created_at_ms: 1_767_225_600_000 - 3 * 86_400_000,
                has_purchase_history: false,
            },
            attributes: HashMap::from([("promo".to_string(), "x1".to_string())]),
            dry_run: false,
        };
        let location = located.then(|| {
            Arc::new(Location::new(
                "CN".into(),
                "Hubei".into(),
                "Wuhan".into(),
                30.5,
                114.3,
            ))
        });
        let begun = crate::state::Begun {
            windows: vec![amount / 100, amount],
            profile: ProfileView {
                located_events: 4,
                usual_region: false,
                usual_regions: 2,
                last_login_new_region: true,
                secs_since_login: 30,
                travel_km: 1234.5,
                travel_kmh: 2500.0,
            },
        };
        pack.context(recharge, location, begun)
    }

    fn same(a: &Verdict, b: &Verdict) {
        let key = |rs: &[Reason]| -> Vec<String> {
            rs.iter()
                .map(|r| {
                    format!(
                        "{}|{}|{}|{:?}|{}|{}",
                        r.rule_id, r.code, r.message, r.action, r.score, r.challenge
                    )
                })
                .collect()
        };
        assert_eq!(key(&a.reasons), key(&b.reasons));
        assert_eq!(key(&a.shadow_reasons), key(&b.shadow_reasons));
    }

    /// The fast path and the rule-by-rule path agree, for every request of
    /// a small mix; returns the fast verdicts.
    fn agree(pack: &Pack) -> Vec<Verdict> {
        let mut out = Vec::new();
        for (user, amount, located) in [
            ("u1", 100, true),
            ("u2", 999, false),
            ("vip", 500, true),
            ("u3", 12_345, true),
            ("vip", 12_346, false),
        ] {
            let c = ctx(pack, user, amount, located);
            let (fast, slow) = (pack.run(&c), pack.run_rule_by_rule(&c));
            same(&fast, &slow);
            out.push(fast);
        }
        out
    }

    #[test]
    fn every_feature_is_what_its_getter_answers() {
        let reads: Vec<String> = [
            "window.w",
            "window.s",
            "list.b",
            "list.user_allow",
            "list.allowlisted",
            "param.label",
            "request.id",
            "request.user_id",
            "request.amount",
            "request.currency",
            "request.channel",
            "request.product",
            "request.target",
            "request.ip",
            "request.device_id",
            "request.timestamp_ms",
            "request.is_ipv6",
            "account.real_name_verified",
            "account.status",
            "account.created_at_ms",
            "account.has_purchase_history",
            "account.age_days",
            "geo.known",
            "geo.country",
            "geo.region",
            "geo.city",
            "geo.latitude",
            "geo.longitude",
            "profile.located_events",
            "profile.usual_region",
            "profile.usual_regions",
            "profile.last_login_new_region",
            "profile.secs_since_login",
            "profile.travel_km",
            "profile.travel_kmh",
        ]
        .iter()
        .map(|r| r.to_string())
        .collect();
        // Each read, compared with `type_of` and its text: both paths must
        // produce the same message.
        let script: String = reads
            .iter()
            .map(|r| format!("${{type_of({r})}}={{${{{r}}}}};"))
            .collect();
        // The same reads as text only: that rule is compiled.
        let text: String = reads.iter().map(|r| format!("{r}={{${{{r}}}}};")).collect();
        let p = pack(&[
            ("typed", &format!("flag(\"TYPED\", `{script}`)"), ""),
            ("text", &format!("flag(\"TEXT\", `{text}`)"), ""),
        ]);
        assert_eq!(p.fast_coverage(), (1, 1, 0));
        for verdict in agree(&p) {
            assert_eq!(verdict.reasons.len(), 2, "{verdict:?}");
        }
        // Each feature parses, so each read above went through the fast path.
        let names = &p.names;
        for r in &reads {
            let (ns, name) = r.split_once('.').unwrap();
            assert!(Feature::parse(ns, name, names).is_some(), "{r}");
        }
    }

    #[test]
    fn the_fast_path_gives_what_rule_by_rule_gives() {
        let p = pack(&[
            ("hit", "if window.w > 3 { challenge(\"BIG\", `n=${window.w} ${param.label}`).ask(\"sms\") }", ""),
            ("ret", "if !account.real_name_verified { return block(\"RN\", \"x\"); } if request.amount > 10000 { return flag(\"BIGSUM\", \"y\").score(7) }", ""),
            ("after", "if list.b { block(\"LISTED\", `${request.ip}`) }", "soft = true"),
            ("status", "switch account.status { \"frozen\" => block(\"FROZEN\", \"z\"), _ => () }", ""),
            ("attr", "if request.attr(\"promo\") == \"x1\" && profile.travel_kmh > 1000.0 { notice(\"PROMO\", \"p\") }", "mode = \"shadow\""),
            ("shadowing", "let profile = #{usual_region: true}; if profile.usual_region { flag(\"SHADOWED\", \"s\") }", ""),
            ("geo", "if geo.known { flag(\"GEO\", geo.region + geo.city) } else { () }", "soft = true"),
            ("exits", "if request.amount == 999 { exit(flag(\"EXIT\", \"e\")) } flag(\"NOEXIT\", \"n\")", ""),
            ("last", "if account.age_days < 7.0 { flag(\"NEW\", `${account.age_days}`) }", ""),
            // Text that looks like a read, in a raw string and in a nested
            // comment, is text: never rewritten, never checked.
            ("raw", "/* /* */ window.typo */ if window.w >= 0 { flag(\"RAW\", #\"see \"window.w\" and param.label\"#) }", ""),
        ]);
        let verdicts = agree(&p);
        assert!(verdicts
            .iter()
            .any(|v| v.reasons.iter().any(|r| r.code == "BIGSUM")));
        assert!(verdicts
            .iter()
            .any(|v| v.reasons.iter().any(|r| r.code == "EXIT")));
        assert!(verdicts
            .iter()
            .any(|v| v.reasons.iter().any(|r| r.code == "NEW")));
        assert!(verdicts
            .iter()
            .all(|v| v.reasons.iter().any(|r| r.code == "SHADOWED")));
        assert!(verdicts.iter().all(|v| v
            .reasons
            .iter()
            .any(|r| r.message == "see \"window.w\" and param.label")));
        // `shadowing` declares its own `profile`: it must run the original
        // way; `attr` and `exits` call what is not compiled.
        assert_eq!(p.fast_coverage(), (7, 2, 1));
    }

    #[test]
    fn a_string_parameter_longer_than_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[("hit", "flag(\"X\", param.label)", "")]);
        let manifest = std::fs::read_to_string(dir.path().join("pack.toml")).unwrap();
        let manifest = manifest
            .replace(
                "max_operations = 2000",
                "max_operations = 2000\nmax_string_size = 256",
            )
            .replace(
                "\"a string parameter\"",
                &format!("\"{}\"", "x".repeat(300)),
            );
        std::fs::write(dir.path().join("pack.toml"), manifest).unwrap();
        let Err(e) = Pack::load(dir.path()) else {
            panic!("a parameter longer than the limit loaded");
        };
        let e = e.to_string();
        assert!(
            e.contains("pack.toml:11:1: parameter `label` is longer than limits.max_string_size"),
            "{e}"
        );
    }

    /// A rule variable passed whole (to a function, into a `let`) is the
    /// variable, not `()`: compiling must not fold the variables into
    /// constants of the placeholder it compiles against.
    #[test]
    fn rule_variables_passed_whole_are_the_variables() {
        let p = pack(&[(
            "whole",
            "fn big(r) { r.amount > 900 } let a = account; if big(request) && a.status == \"frozen\" { flag(\"WHOLE\", \"w\") }",
            "",
        )]);
        let verdicts = agree(&p);
        let codes = |v: &Verdict| v.reasons.iter().map(|r| r.code.clone()).collect::<Vec<_>>();
        assert!(verdicts
            .iter()
            .all(|v| !codes(v).contains(&"RULE_ERROR".to_string())));
        assert!(
            verdicts.iter().any(|v| codes(v) == ["WHOLE"]),
            "{verdicts:?}"
        );
    }

    #[test]
    fn compiled_operators_are_rhais() {
        let p = pack(&[
            ("ints", "let a = request.amount; let b = a * 3 - 7 % 4; if a / 3 > b / 10 && !(a == b) { flag(\"INTS\", `${a / 3} ${b} ${-a} ${a % 7}`) }", ""),
            ("floats", "let x = profile.travel_km; let y = x * 1.0000000000000002; if x == y && x >= y && !(x < y) && x != y + 1.0 { flag(\"EPS\", `${x} ${y} ${x / 3.0} ${x.to_int()} ${x + 1}`) }", ""),
            ("mixed", "if request.amount > profile.travel_km || 100 < account.age_days { flag(\"MIXED\", `${account.age_days * 2}`) }", ""),
            ("strings", "let t = request.target + \"-\" + request.channel; if t > \"1\" && t != \"\" && geo.region <= \"Z\" && request.target != request.channel && request.target >= \"\" { flag(\"STR\", t) }", ""),
            ("bools", "if (true > false) && (list.b >= list.user_allow) && (() == ()) { notice(\"BOOL\", `${()}|${true}|${1.5}|${-0.0}|${1e300 * 10.0}|${0.1 + 0.2}`).score(3) }", ""),
            ("overflow", "let big = 9223372036854775807; if request.amount > 900 { big + request.amount } else { () }", ""),
            ("div0", "if request.amount == 999 { request.amount / (request.amount - 999) } else { () }", ""),
            ("types", "if request.amount == 100 { request.amount == \"100\" } else { () }", ""),
            ("switch", "switch account.status { \"frozen\" if request.amount > 950 => block(\"F1\", \"f\"), \"frozen\" => challenge(\"F2\", \"g\").ask(\"sms\"), \"active\" => { let s = `${account.status}!`; flag(\"ACT\", s) }, _ => () }", ""),
            ("nested", "let n = 1; if window.w > 0 { let n = n + 1; if n == 2 { return flag(\"NESTED\", `${n}`); } } flag(\"OUTER\", `${n}`)", ""),
            // Locals compared as numbers where they hold numbers, and as
            // strings where they hold strings (the general path).
            ("locals", "let a = request.target; let b = request.channel; let n = request.amount; let v = list.b; if a != b && b >= a && n >= window.w && (v == list.b) { flag(\"LOCALS\", `${a}${n}`) }", ""),
            // `let`s of a feature or a constant are read in place: shadowed
            // by a computed local in an inner block, and back outside it;
            // a `let` that ends the rule still makes its value `()`.
            ("aliases", "let w = window.w; let k = 300; if w > k { let w = w * 2; if w > 700 { flag(\"ALIAS\", `${w} ${k}`) } else { flag(\"ALIAS2\", `${w}`) } } else { flag(\"ALIAS3\", `${w} ${k}`) }", ""),
            ("alias_last", "let w = window.w; if w >= 0 { flag(\"NEVER\", `${w}`) }; let z = w;", ""),
            // Every comparison of two integers where they lie (an integer
            // field, a window, a constant), below, at and above.
            ("int_ops", "let k = 500; if request.amount > 0 { flag(\"INTOPS\", `${request.amount == k}${request.amount != k}${request.amount < k}${request.amount <= k}${request.amount > k}${request.amount >= k}${window.w >= 999}${k == 500}`) }", ""),
        ]);
        let (compiled, _, _) = p.fast_coverage();
        assert_eq!(compiled, 14);
        let verdicts = agree(&p);
        // Only where Rhai has an error to report (or an operator on types
        // not compiled) does a compiled rule hand over.
        let bails = p.fast.bails();
        let ids: Vec<&str> = p.rules.iter().map(|r| r.id.as_ref()).collect();
        let handed: Vec<(&str, u64)> = ids
            .iter()
            .copied()
            .zip(bails)
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(handed, [("overflow", 3), ("div0", 1), ("types", 1)]);
        let codes: Vec<Vec<&str>> = verdicts
            .iter()
            .map(|v| v.reasons.iter().map(|r| r.code.as_str()).collect())
            .collect();
        assert!(codes.iter().flatten().any(|c| *c == "INTS"), "{codes:?}");
        assert!(codes.iter().flatten().any(|c| *c == "EPS"), "{codes:?}");
        assert!(codes.iter().flatten().any(|c| *c == "F1"), "{codes:?}");
        assert!(codes.iter().flatten().any(|c| *c == "ACT"), "{codes:?}");
        assert!(codes.iter().flatten().any(|c| *c == "NESTED"), "{codes:?}");
        assert!(codes.iter().flatten().any(|c| *c == "LOCALS"), "{codes:?}");
        for code in ["ALIAS", "ALIAS3"] {
            assert!(
                codes.iter().flatten().any(|c| *c == code),
                "{code} {codes:?}"
            );
        }
        assert!(!codes.iter().flatten().any(|c| *c == "NEVER"), "{codes:?}");
        let int_ops: Vec<&str> = verdicts
            .iter()
            .flat_map(|v| v.reasons.iter())
            .filter(|r| r.code == "INTOPS")
            .map(|r| r.message.as_str())
            .collect();
        // Amounts 100, 999, 500, 12,345 and 12,346 against 500.
        for m in [
            "falsetruetruetruefalsefalsefalsetrue",
            "falsetruefalsefalsetruetruetruetrue",
            "truefalsefalsetruefalsetruefalsetrue",
        ] {
            assert!(int_ops.contains(&m), "{m} {int_ops:?}");
        }
        // The overflow, the division by zero and the comparison of an int
        // with a string are Rhai's to report (or not).
        let errors: Vec<String> = verdicts
            .iter()
            .flat_map(|v| v.reasons.iter())
            .filter(|r| r.code == crate::pack::RULE_ERROR)
            .map(|r| r.rule_id.to_string())
            .collect();
        assert!(errors.contains(&"overflow".to_string()), "{errors:?}");
        assert!(errors.contains(&"div0".to_string()), "{errors:?}");
    }

    /// Conditions are compiled to closures made for their shape (see
    /// `compiled::Cond`): every integer comparison, each operator with each
    /// kind of operand on each side, answers what Rust answers on the same
    /// values; and every other shape of condition, errors included, what
    /// Rhai answers.
    #[test]
    fn compiled_conditions_are_rhais() {
        // Operands, and their values for a request of `amount` (see `ctx`:
        // the pack's windows are in name order, `s` then `w`).
        type Get = fn(i64) -> i64;
        type Compare = fn(i64, i64) -> bool;
        let operands: [(&str, Get); 5] = [
            ("request.amount", |a| a),
            ("window.s", |a| a / 100),
            ("window.w", |a| a),
            ("500", |_| 500),
            ("param.limit", |_| 5),
        ];
        let ops: [(&str, Compare); 6] = [
            ("==", |a, b| a == b),
            ("!=", |a, b| a != b),
            ("<", |a, b| a < b),
            ("<=", |a, b| a <= b),
            (">", |a, b| a > b),
            (">=", |a, b| a >= b),
        ];
        let mut rules = Vec::new();
        let mut expected: Vec<(String, Get, Get, Compare)> = Vec::new();
        for (a, fa) in operands {
            for (b, fb) in operands {
                for (op, test) in ops {
                    let code = format!("C{}", rules.len());
                    rules.push((
                        code.to_lowercase(),
                        format!("if {a} {op} {b} {{ flag(\"{code}\", \"\") }}"),
                    ));
                    expected.push((code, fa, fb, test));
                }
            }
        }
        let others = [
            "if profile.travel_km > 1000 && account.age_days < param.limit { flag(\"FLOATS\", \"\") }",
            "if !list.b || list.user_allow == false { flag(\"BOOLS\", \"\") }",
            "if geo.known || request.amount > 900 && !account.real_name_verified { flag(\"PRECEDENCE\", \"\") }",
            "let big = request.amount > 900; if big && request.target != \"\" { flag(\"LOCAL\", \"\") }",
            "if request.channel == \"wechat\" && account.status != \"frozen\" { flag(\"STRINGS\", \"\") }",
            "if (request.amount > 900) == true { flag(\"COMPARED\", \"\") }",
            "if request.amount / 3 >= window.s * 30 { flag(\"ARITH\", \"\") }",
            // A string parameter has no text where it lies: the general path.
            "if param.label != request.channel && request.channel > param.label { flag(\"PARAM_STR\", \"\") }",
            "if param.on && list.b == param.on { flag(\"PARAM_BOOL\", \"\") }",
            // Numbers into a message: Rhai's text, the smallest integer too.
            "let m = -9223372036854775807 - 1; if request.amount > 0 { flag(\"NUMBERS\", `${m}|${-request.amount}|${request.amount * 1.5}|${-0.0}`) }",
            // Errors: Rhai's own, as rule by rule reports them.
            "if request.target { flag(\"NOT_BOOL\", \"\") }",
            "if request.amount > 900 && request.amount { flag(\"AND_NOT_BOOL\", \"\") }",
            // No error: Rhai's `<` of an integer and a string is false.
            "if request.amount < \"5\" { flag(\"INT_STR\", \"\") }",
        ];
        for (i, script) in others.iter().enumerate() {
            rules.push((format!("other{i}"), script.to_string()));
        }
        let specs: Vec<(&str, &str, &str)> = rules
            .iter()
            .map(|(id, script)| (id.as_str(), script.as_str(), ""))
            .collect();
        let p = pack(&specs);
        assert_eq!(p.fast_coverage(), (rules.len(), 0, 0));
        let verdicts = agree(&p);
        for (verdict, amount) in verdicts.iter().zip([100, 999, 500, 12_345, 12_346]) {
            let fired: Vec<&str> = verdict.reasons.iter().map(|r| r.code.as_str()).collect();
            for (code, fa, fb, test) in &expected {
                assert_eq!(
                    fired.contains(&code.as_str()),
                    test(fa(amount), fb(amount)),
                    "{code} at {amount}"
                );
            }
        }
        let fired = |code: &str| {
            verdicts
                .iter()
                .any(|v| v.reasons.iter().any(|r| r.code == code))
        };
        for code in [
            "FLOATS",
            "BOOLS",
            "PRECEDENCE",
            "LOCAL",
            "STRINGS",
            "COMPARED",
            "ARITH",
            "PARAM_STR",
            "PARAM_BOOL",
            "NUMBERS",
        ] {
            assert!(fired(code), "{code}");
        }
        let errors: Vec<String> = verdicts[1]
            .reasons
            .iter()
            .filter(|r| r.code == crate::pack::RULE_ERROR)
            .map(|r| r.rule_id.to_string())
            .collect();
        assert_eq!(errors, ["other10", "other11"]);
        assert!(!fired("INT_STR"));
    }

    #[test]
    fn failing_rules_are_attributed_exactly() {
        let p = pack(&[
            ("fine", "if window.w > 0 { flag(\"FINE\", \"f\") }", ""),
            ("runaway", "if request.amount > 10000 { loop { } }", ""),
            (
                "divides",
                "let x = 1 / (request.amount - request.amount); ()",
                "",
            ),
            ("wrong_type", "42", ""),
            (
                "throws",
                "if request.amount > 900 { throw \"lookup failed\" }",
                "on_error = \"block\"",
            ),
            ("after", "flag(\"AFTER\", `${window.s}`)", ""),
        ]);
        let verdicts = agree(&p);
        let errors = |v: &Verdict| -> Vec<String> {
            v.reasons
                .iter()
                .filter(|r| r.code == crate::pack::RULE_ERROR)
                .map(|r| r.rule_id.to_string())
                .collect()
        };
        assert_eq!(errors(&verdicts[0]), ["divides", "wrong_type"]);
        assert_eq!(
            errors(&verdicts[3]),
            ["runaway", "divides", "wrong_type", "throws"]
        );
        assert!(verdicts[3]
            .reasons
            .iter()
            .any(|r| r.rule_id.as_ref() == "runaway" && r.message.contains("operations")));
        assert!(verdicts
            .iter()
            .all(|v| v.reasons.iter().any(|r| r.code == "AFTER")));
    }

    #[test]
    fn a_rule_near_the_operations_limit_is_judged_by_the_original_count() {
        // About 1,500 of the pack's 2,000 operations in the original form,
        // fewer once rewritten: it must still pass, and a slightly longer
        // one must still fail, as rule by rule.
        let looped = |n: i64| {
            format!("let t = 0; for i in 0..{n} {{ t += window.w + request.amount; }} if t > 0 {{ flag(\"T\", `${{t}}`) }}")
        };
        let mut failed = Vec::new();
        for n in [20, 50, 80, 100, 150, 250] {
            let p = pack(&[("loop", &looped(n), "")]);
            let errors = agree(&p)[0]
                .reasons
                .iter()
                .filter(|r| r.code == crate::pack::RULE_ERROR)
                .count();
            failed.push(errors > 0);
        }
        // Both sides of the limit were seen.
        assert!(
            failed.contains(&true) && failed.contains(&false),
            "{failed:?}"
        );
    }

    #[test]
    fn hit_counters_count_each_decision_once() {
        let p = pack(&[
            ("a", "if window.w > 0 { flag(\"A\", \"a\") }", ""),
            ("b", "if request.amount > 900 { throw \"no\" }", ""),
        ]);
        let v = p.run(&ctx(&p, "u1", 950, true));
        assert_eq!(v.reasons.len(), 2);
        assert_eq!((p.rules[0].hits(), p.rules[0].errors()), (1, 0));
        assert_eq!((p.rules[1].hits(), p.rules[1].errors()), (1, 1));
    }

    #[test]
    fn reads_are_rewritten_in_place() {
        let mut seen = Vec::new();
        let src =
            "if window.w > 3 && request.attr(\"k\") == \"\" {\n  `${geo.region}`\n} // window.w";
        let out = script::rewrite_reads(src, "_rg", &mut |ns, name| {
            seen.push(format!("{ns}.{name}"));
            Some(seen.len() - 1)
        });
        assert_eq!(
            out,
            "if _rg1     > 3 && request.attr(\"k\") == \"\" {\n  `${_rg0      }`\n} // window.w"
        );
        assert_eq!(seen, ["geo.region", "window.w"]);
    }
}
