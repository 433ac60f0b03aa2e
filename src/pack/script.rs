//! The Rhai side of a rule pack: the sandboxed engine and the API scripts see.
//!
//! A rule is a script evaluated once per request. It sees seven read-only
//! variables and answers with a hit or with nothing:
//!
//! | variable  | what it is                                                        |
//! |-----------|-------------------------------------------------------------------|
//! | `request` | the recharge: `amount` (fen), `user_id`, `ip`, `channel`, ...      |
//! | `account` | `status` ("active", "frozen"...), `real_name_verified`, `age_days` |
//! | `window`  | `window.NAME`: a window's value, this request included             |
//! | `geo`     | the IP's location: `known`, `country`, `region`, `city`            |
//! | `profile` | the user's history: `usual_region`, `located_events`, ...          |
//! | `list`    | `list.NAME`: membership in a list; `list.allowlisted`              |
//! | `param`   | `param.NAME`: the manifest's parameters                           |
//!
//! Hits: `block(code, message)`, `challenge(code, message)`, `flag(code, message)`
//! (allow, but adds its score) and `notice(code, message)` (shadow note only),
//! refined with `.ask("sms")` and `.score(30)`.
//!
//! Why custom types with getters and not object maps: a map per variable per
//! request costs allocations and hashing before any rule runs; getters over one
//! shared context cost nothing until a rule reads a value.

use std::collections::HashMap;
use std::sync::Arc;

use rhai::{Dynamic, Engine, ImmutableString, Scope, AST};

use super::manifest::Limits;
use super::Problem;
use crate::decision::Action;
use crate::geo::Location;
use crate::model::Recharge;
use crate::state::ProfileView;

/// Names of the variables every rule sees, in scope order.
pub const VARIABLES: [&str; 7] = [
    "request", "account", "window", "geo", "profile", "list", "param",
];

/// Pack-wide names the scripts resolve: windows, lists, parameters.
#[derive(Debug, Default)]
pub struct Names {
    pub windows: HashMap<String, usize>,
    pub lists: HashMap<String, usize>,
    pub params: HashMap<String, Dynamic>,
}

/// Everything about one request the rules may read. Built once per request;
/// the fast path reads it in place, and the variables above reach it (with
/// the pack's names) through [`Vars`].
#[derive(Debug, Clone)]
pub struct Ctx {
    pub recharge: Recharge,
    pub location: Option<Arc<Location>>,
    /// One value per pack window, in pack order.
    pub windows: Vec<i64>,
    pub profile: ProfileView,
    /// One flag per pack list, in pack order.
    pub lists: ListHits,
    pub allowlisted: bool,
}

/// What the rule variables read, for the rules that run in Rhai: a copy of
/// the request's context, and the pack's names. Made only for them, so a
/// request on the fast path takes no reference to the names.
#[derive(Debug)]
pub struct Vars {
    pub ctx: Ctx,
    pub names: Arc<Names>,
}

impl std::ops::Deref for Vars {
    type Target = Ctx;

    fn deref(&self) -> &Ctx {
        &self.ctx
    }
}

/// One flag per pack list, in pack order; inline up to 16 lists, so a
/// request's flags need no allocation of their own. (Window values stay a
/// `Vec`: inline, their 128 bytes made every move of the context dearer
/// than the allocation they saved, about 1% of a served request.)
pub type ListHits = smallvec::SmallVec<[bool; 16]>;

macro_rules! view {
    ($($name:ident),*) => {$(
        #[derive(Debug, Clone)]
        pub struct $name(Arc<Vars>);
    )*};
}
view!(RequestVar, AccountVar, WindowVar, GeoVar, ProfileVar, ListVar, ParamVar);

/// What a rule reports.
#[derive(Debug, Clone)]
pub struct Hit {
    pub action: Action,
    pub code: ImmutableString,
    pub message: ImmutableString,
    pub challenge: ImmutableString,
    pub score: Option<i64>,
    /// A notice: always a shadow note, whatever the rule's mode.
    pub notice: bool,
}

/// A hit as `block`, `challenge` and `flag` make it.
pub fn hit(action: Action, code: ImmutableString, message: ImmutableString) -> Hit {
    Hit {
        action,
        code,
        message,
        challenge: ImmutableString::new(),
        score: None,
        notice: false,
    }
}

/// Builds the sandboxed engine: no modules, no `eval`, bounded work.
pub fn engine(limits: &Limits) -> Engine {
    let mut engine = Engine::new();
    engine
        .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new())
        .set_strict_variables(true)
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_depth)
        .set_max_expr_depths(64, 32)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_array_size)
        .set_max_variables(256)
        .set_max_functions(64);
    engine.disable_symbol("eval");
    engine.on_print(|text| tracing::info!(target: "riskgate::rule", "{text}"));
    engine.on_debug(|text, _, pos| tracing::debug!(target: "riskgate::rule", %pos, "{text}"));
    register_api(&mut engine);
    engine
}

fn register_api(engine: &mut Engine) {
    engine
        .register_type_with_name::<Hit>("Hit")
        .register_fn("block", |c, m| hit(Action::Block, c, m))
        .register_fn("challenge", |c, m| hit(Action::Challenge, c, m))
        .register_fn("flag", |c, m| hit(Action::Allow, c, m))
        .register_fn("notice", |c, m| Hit {
            notice: true,
            ..hit(Action::Allow, c, m)
        })
        .register_fn("ask", |h: Hit, kind: ImmutableString| Hit {
            challenge: kind,
            ..h
        })
        .register_fn("score", |h: Hit, score: i64| Hit {
            score: Some(score),
            ..h
        })
        .register_fn("yuan", yuan);

    engine
        .register_type_with_name::<RequestVar>("Request")
        .register_get("id", |v: &mut RequestVar| v.0.recharge.request_id.clone())
        .register_get("user_id", |v: &mut RequestVar| {
            v.0.recharge.facts.user_id.clone()
        })
        .register_get("amount", |v: &mut RequestVar| v.0.recharge.facts.amount)
        .register_get("currency", |v: &mut RequestVar| {
            v.0.recharge.facts.currency.clone()
        })
        .register_get("channel", |v: &mut RequestVar| {
            v.0.recharge.facts.channel.clone()
        })
        .register_get("product", |v: &mut RequestVar| {
            v.0.recharge.facts.product.clone()
        })
        .register_get("target", |v: &mut RequestVar| {
            v.0.recharge.facts.target.clone()
        })
        .register_get("ip", |v: &mut RequestVar| {
            v.0.recharge.facts.ip_text.clone()
        })
        .register_get("device_id", |v: &mut RequestVar| {
            v.0.recharge.facts.device_id.clone()
        })
        .register_get("timestamp_ms", |v: &mut RequestVar| {
            v.0.recharge.facts.timestamp_ms
        })
        .register_get("is_ipv6", |v: &mut RequestVar| v.0.recharge.ip.is_ipv6())
        .register_fn("attr", |v: &mut RequestVar, key: &str| {
            v.0.recharge
                .attributes
                .get(key)
                .cloned()
                .unwrap_or_default()
        });

    engine
        .register_type_with_name::<AccountVar>("Account")
        .register_get("real_name_verified", |v: &mut AccountVar| {
            v.0.recharge.account.real_name_verified
        })
        .register_get("status", |v: &mut AccountVar| {
            v.0.recharge.account.status.name()
        })
        .register_get("created_at_ms", |v: &mut AccountVar| {
            v.0.recharge.account.created_at_ms
        })
        .register_get("has_purchase_history", |v: &mut AccountVar| {
            v.0.recharge.account.has_purchase_history
        })
        .register_get("age_days", |v: &mut AccountVar| age_days(&v.0));

    engine
        .register_type_with_name::<WindowVar>("Windows")
        .register_indexer_get(
            |v: &mut WindowVar, name: &str| -> Result<i64, Box<rhai::EvalAltResult>> {
                match v.0.names.windows.get(name) {
                    Some(&i) => Ok(v.0.windows[i]),
                    None => Err(format!("unknown window `{name}`").into()),
                }
            },
        );

    engine
        .register_type_with_name::<GeoVar>("Location")
        .register_get("known", |v: &mut GeoVar| v.0.location.is_some())
        .register_get("country", |v: &mut GeoVar| {
            location_text(&v.0, |l| &l.country)
        })
        .register_get("region", |v: &mut GeoVar| {
            location_text(&v.0, |l| &l.region)
        })
        .register_get("city", |v: &mut GeoVar| location_text(&v.0, |l| &l.city))
        .register_get("latitude", |v: &mut GeoVar| latitude(&v.0))
        .register_get("longitude", |v: &mut GeoVar| longitude(&v.0));

    engine
        .register_type_with_name::<ProfileVar>("Profile")
        .register_get("located_events", |v: &mut ProfileVar| {
            v.0.profile.located_events
        })
        .register_get("usual_region", |v: &mut ProfileVar| {
            v.0.profile.usual_region
        })
        .register_get("usual_regions", |v: &mut ProfileVar| {
            v.0.profile.usual_regions
        })
        .register_get("last_login_new_region", |v: &mut ProfileVar| {
            v.0.profile.last_login_new_region
        })
        .register_get("secs_since_login", |v: &mut ProfileVar| {
            v.0.profile.secs_since_login
        })
        .register_get("travel_km", |v: &mut ProfileVar| v.0.profile.travel_km)
        .register_get("travel_kmh", |v: &mut ProfileVar| v.0.profile.travel_kmh);

    engine
        .register_type_with_name::<ListVar>("Lists")
        .register_get("allowlisted", |v: &mut ListVar| v.0.allowlisted)
        .register_indexer_get(
            |v: &mut ListVar, name: &str| -> Result<bool, Box<rhai::EvalAltResult>> {
                match v.0.names.lists.get(name) {
                    Some(&i) => Ok(v.0.lists[i]),
                    None => Err(format!("unknown list `{name}`").into()),
                }
            },
        );

    engine
        .register_type_with_name::<ParamVar>("Params")
        .register_indexer_get(
            |v: &mut ParamVar, name: &str| -> Result<Dynamic, Box<rhai::EvalAltResult>> {
                match v.0.names.params.get(name) {
                    Some(value) => Ok(value.clone()),
                    None => Err(format!("unknown parameter `{name}`").into()),
                }
            },
        );
}

/// `yuan(fen)`: an amount in fen as yuan, "12.34".
pub fn yuan(fen: i64) -> String {
    format!("{}.{:02}", fen / 100, (fen % 100).abs())
}

/// `account.age_days`: -1.0 when the platform did not say.
pub fn age_days(ctx: &Ctx) -> f64 {
    let a = &ctx.recharge.account;
    if a.created_at_ms <= 0 {
        -1.0
    } else {
        (ctx.recharge.facts.timestamp_ms - a.created_at_ms).max(0) as f64 / 86_400_000.0
    }
}

/// `geo.country`, `geo.region`, `geo.city`: "" when the IP has no location.
pub fn location_text(ctx: &Ctx, field: impl Fn(&Location) -> &String) -> String {
    location_str(ctx, field).to_string()
}

/// [`location_text`], borrowed.
pub fn location_str(ctx: &Ctx, field: impl Fn(&Location) -> &String) -> &str {
    ctx.location.as_deref().map_or("", |l| field(l).as_str())
}

/// `geo.latitude`: 0.0 when the IP has no location.
pub fn latitude(ctx: &Ctx) -> f64 {
    ctx.location.as_ref().map_or(0.0, |l| l.latitude)
}

/// `geo.longitude`: 0.0 when the IP has no location.
pub fn longitude(ctx: &Ctx) -> f64 {
    ctx.location.as_ref().map_or(0.0, |l| l.longitude)
}

/// Registers a property getter for every window, list and parameter of a
/// pack, on that pack's own engine. Why: a property with a getter resolves
/// through a hash computed when the script compiles, while the indexer
/// fallback (`window["name"]`, still there for dynamic names) first misses
/// the getter lookup and then hashes the name string, on every access.
pub fn register_names(engine: &mut Engine, names: &Names) {
    for (name, &i) in &names.windows {
        engine.register_get(name, move |v: &mut WindowVar| v.0.windows[i]);
    }
    for (name, &i) in &names.lists {
        engine.register_get(name, move |v: &mut ListVar| v.0.lists[i]);
    }
    for (name, value) in &names.params {
        if let Some(n) = value.clone().try_cast::<i64>() {
            engine.register_get(name, move |_: &mut ParamVar| n);
        } else if let Some(x) = value.clone().try_cast::<f64>() {
            engine.register_get(name, move |_: &mut ParamVar| x);
        } else if let Some(b) = value.clone().try_cast::<bool>() {
            engine.register_get(name, move |_: &mut ParamVar| b);
        } else {
            let value = value.clone();
            engine.register_get(name, move |_: &mut ParamVar| value.clone());
        }
    }
}

/// A scope holding the rule variables, for compiling (strict variables) and
/// for running (the real values).
pub fn scope(ctx: Option<&Arc<Vars>>) -> Scope<'static> {
    let mut scope = Scope::new();
    match ctx {
        None => {
            // Not constants: the optimizer puts a constant's value in place
            // of its every use, so `big(request)` would pass `()`.
            for name in VARIABLES {
                scope.push(name, ());
            }
        }
        Some(ctx) => {
            scope
                .push_constant("request", RequestVar(ctx.clone()))
                .push_constant("account", AccountVar(ctx.clone()))
                .push_constant("window", WindowVar(ctx.clone()))
                .push_constant("geo", GeoVar(ctx.clone()))
                .push_constant("profile", ProfileVar(ctx.clone()))
                .push_constant("list", ListVar(ctx.clone()))
                .push_constant("param", ParamVar(ctx.clone()));
        }
    }
    scope
}

/// Writes numeric and boolean parameters into the script as literals: a
/// parameter is a constant of the pack, and a literal costs nothing at run
/// time where `param.x` is a getter call. The literal is padded with spaces
/// to the length of `param.x`, so every line:column an error names is still
/// right; a parameter whose literal would not fit keeps its getter.
pub fn inline_params(source: &str, names: &Names) -> String {
    let mut out = source.to_string();
    // Right to left, so earlier offsets stay valid.
    let mut uses: Vec<NameUse> = name_uses(source)
        .into_iter()
        .filter(|u| u.namespace == "param")
        .collect();
    uses.sort_by_key(|u| std::cmp::Reverse((u.line, u.col)));
    let line_starts = line_starts(source);
    for u in uses {
        let Some(value) = names.params.get(&u.name) else {
            continue;
        };
        let literal = if let Some(n) = value.clone().try_cast::<i64>() {
            n.to_string()
        } else if let Some(x) = value.clone().try_cast::<f64>() {
            format!("{x:?}")
        } else if let Some(b) = value.clone().try_cast::<bool>() {
            b.to_string()
        } else {
            continue;
        };
        // `x-param.n` must not become `x--5`.
        let literal = if literal.starts_with('-') {
            format!("({literal})")
        } else {
            literal
        };
        let Some((from, to)) = span_of(source, &line_starts, &u) else {
            continue;
        };
        if literal.len() > to - from {
            continue;
        }
        let padded = format!("{literal:<width$}", width = to - from);
        out.replace_range(from..to, &padded);
    }
    out
}

/// Byte offsets where each line starts.
fn line_starts(source: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(source.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

/// The byte range of `namespace.name` for a use found by [`property_uses`].
fn span_of(source: &str, line_starts: &[usize], u: &NameUse) -> Option<(usize, usize)> {
    // `col` is the 1-based column of the name, in characters.
    let start = *line_starts.get(u.line.checked_sub(1)?)?;
    let (name_at, _) = source[start..].char_indices().nth(u.col.checked_sub(1)?)?;
    let name_at = start + name_at;
    let from = name_at.checked_sub(u.namespace.len() + 1)?;
    let to = name_at + u.name.len();
    let dotted = source.get(from..name_at)?;
    (dotted.strip_suffix('.') == Some(u.namespace)).then_some((from, to))
}

/// Replaces every `namespace.name` read that `feature` knows (it answers an
/// index) with the variable `<prefix><index>`, padded with spaces to the
/// same length so every line:column stays put. Method calls
/// (`request.attr(..)`) and reads whose variable would not fit are left as
/// they are.
pub fn rewrite_reads(
    source: &str,
    prefix: &str,
    feature: &mut dyn FnMut(&str, &str) -> Option<usize>,
) -> String {
    let mut uses: Vec<NameUse> = property_uses(source, &VARIABLES)
        .into_iter()
        .filter(|u| !u.call)
        .collect();
    // Right to left, so earlier offsets stay valid.
    uses.sort_by_key(|u| std::cmp::Reverse((u.line, u.col)));
    let line_starts = line_starts(source);
    let mut out = source.to_string();
    for u in uses {
        let Some((from, to)) = span_of(source, &line_starts, &u) else {
            continue;
        };
        let Some(index) = feature(u.namespace, &u.name) else {
            continue;
        };
        let var = format!("{prefix}{index}");
        if var.len() > to - from {
            continue;
        }
        out.replace_range(from..to, &format!("{var:<width$}", width = to - from));
    }
    out
}

/// Compiles one rule script; errors carry the script's file, line and column.
pub fn compile(engine: &Engine, source: &str, file: &str) -> Result<AST, Problem> {
    engine
        .compile_with_scope(&scope(None), source)
        .map_err(|e| {
            let pos = e.position();
            Problem::at(
                file,
                pos.line().unwrap_or(0),
                pos.position().unwrap_or(0),
                e.err_type().to_string(),
            )
        })
}

/// Names every rule may call: the engine's functions (ours and Rhai's
/// standard library) and the language's built-in calls.
pub fn known_functions(engine: &Engine) -> std::collections::HashSet<String> {
    let mut known: std::collections::HashSet<String> = engine
        .gen_fn_signatures(true)
        .iter()
        .filter_map(|sig| sig.split('(').next())
        .map(|name| name.trim_start_matches("pub ").trim().to_string())
        .collect();
    for builtin in [
        "print",
        "debug",
        "type_of",
        "Fn",
        "call",
        "curry",
        "is_def_var",
        "is_def_fn",
        "is_shared",
    ] {
        known.insert(builtin.to_string());
    }
    known
}

/// Every call in `ast` to a function that neither `known` nor the script
/// itself defines, with its (line, column): Rhai would only find these when
/// the call runs, so a typo would sit in a rare branch until 3 a.m.
pub fn unknown_calls(
    ast: &AST,
    known: &std::collections::HashSet<String>,
) -> Vec<(String, usize, usize)> {
    use rhai::{ASTNode, Expr, Stmt};
    let defined: std::collections::HashSet<&str> = ast.iter_functions().map(|f| f.name).collect();
    let mut out = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        let call = match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(f, pos)))
            | Some(ASTNode::Expr(Expr::MethodCall(f, pos)))
            | Some(ASTNode::Stmt(Stmt::FnCall(f, pos))) => Some((f, pos)),
            _ => None,
        };
        if let Some((f, pos)) = call {
            let name = f.name.as_str();
            let operator = f.op_token.is_some() || !name.starts_with(|c: char| c.is_alphabetic());
            if !operator && !known.contains(name) && !defined.contains(name) {
                out.push((
                    name.to_string(),
                    pos.line().unwrap_or(0),
                    pos.position().unwrap_or(0),
                ));
            }
        }
        true
    });
    out
}

/// The functions that make a hit: each takes a code and a message.
const HIT_FUNCTIONS: [&str; 4] = ["block", "challenge", "flag", "notice"];

/// Every call in `ast` to a hit function ([`HIT_FUNCTIONS`]) that cannot
/// work, with its (line, column) and why: the wrong number of arguments,
/// or a code written out that is not one (`block("burst-freq", ...)`). Rhai
/// would only find these when the call runs, and a rule that fails is
/// skipped by default: the rule would never fire.
pub fn bad_hits(ast: &AST) -> Vec<(String, usize, usize)> {
    use rhai::{ASTNode, Expr, Stmt};
    let defined: std::collections::HashSet<&str> = ast.iter_functions().map(|f| f.name).collect();
    let mut out = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        let (f, pos) = match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(f, pos))) | Some(ASTNode::Stmt(Stmt::FnCall(f, pos))) => {
                (f, pos)
            }
            _ => return true,
        };
        let name = f.name.as_str();
        if !HIT_FUNCTIONS.contains(&name) || defined.contains(name) {
            return true;
        }
        let at = (pos.line().unwrap_or(0), pos.position().unwrap_or(0));
        if f.args.len() != 2 {
            let why = format!(
                "`{name}` takes a code and a message, `{name}(\"CODE\", \"message\")`, not {} argument(s)",
                f.args.len()
            );
            out.push((why, at.0, at.1));
        } else if let Expr::StringConstant(code, _) = &f.args[0] {
            if !super::is_code(code) {
                let why = format!(
                    "code `{code}` must be UPPER_SNAKE_CASE (letters, digits, underscores)"
                );
                out.push((why, at.0, at.1));
            }
        }
        true
    });
    out
}

/// A name a script reads from `window`, `param` or `list`, with its position.
#[derive(Debug, PartialEq)]
pub struct NameUse {
    pub namespace: &'static str,
    pub name: String,
    pub line: usize,
    pub col: usize,
    /// Followed by `(`: a method call (`request.attr("k")`), not a read.
    pub call: bool,
}

/// Finds every `window.X`, `param.X` and `list.X` in a script (skipping
/// comments and string text, but reading `${...}` inside template strings), so
/// the loader can reject unknown names with their position before the pack
/// ever serves.
pub fn name_uses(source: &str) -> Vec<NameUse> {
    property_uses(source, &["window", "param", "list"])
}

/// Finds every `NAMESPACE.X` in a script for the given namespaces (see
/// [`name_uses`]).
pub fn property_uses(source: &str, namespaces: &[&'static str]) -> Vec<NameUse> {
    #[derive(Clone, Copy, PartialEq)]
    enum St {
        Code,
        Str(char),
        /// A raw string, `#"..."#`, with this many `#`s.
        Raw(usize),
        Template,
        LineComment,
        /// Rhai's block comments nest.
        BlockComment,
    }
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut stack = vec![St::Code];
    let (mut line, mut col) = (1usize, 1usize);
    let mut braces: Vec<usize> = Vec::new(); // brace depth where each `${` opened
    let mut depth = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let st = *stack.last().unwrap_or(&St::Code);
        let mut advance = 1;
        match st {
            St::Code => {
                if c == '/' && next == Some('/') {
                    stack.push(St::LineComment);
                } else if c == '/' && next == Some('*') {
                    stack.push(St::BlockComment);
                    advance = 2;
                } else if c == '"' || c == '\'' {
                    stack.push(St::Str(c));
                } else if c == '#' && chars[i..].iter().find(|&&c| c != '#') == Some(&'"') {
                    let hashes = chars[i..].iter().take_while(|&&c| c == '#').count();
                    stack.push(St::Raw(hashes));
                    advance = hashes + 1;
                } else if c == '`' {
                    stack.push(St::Template);
                } else if c == '{' {
                    depth += 1;
                } else if c == '}' {
                    if braces.last() == Some(&depth) {
                        braces.pop();
                        stack.pop();
                    } else {
                        depth = depth.saturating_sub(1);
                    }
                } else if c.is_ascii_alphabetic()
                    && (i == 0 || !is_ident(chars[i - 1]) && chars[i - 1] != '.')
                {
                    let start = i;
                    let mut j = i;
                    while j < chars.len() && is_ident(chars[j]) {
                        j += 1;
                    }
                    let word: String = chars[start..j].iter().collect();
                    if let Some(ns) = namespaces.iter().copied().find(|n| *n == word) {
                        if chars.get(j) == Some(&'.') {
                            let mut k = j + 1;
                            while k < chars.len() && is_ident(chars[k]) {
                                k += 1;
                            }
                            let name: String = chars[j + 1..k].iter().collect();
                            let mut after = k;
                            while chars.get(after).is_some_and(|c| c.is_whitespace()) {
                                after += 1;
                            }
                            if !name.is_empty() {
                                out.push(NameUse {
                                    namespace: ns,
                                    name,
                                    line,
                                    col: col + (j + 1 - start),
                                    call: chars.get(after) == Some(&'('),
                                });
                            }
                        }
                    }
                    advance = j - i;
                }
            }
            St::Str(q) => {
                if c == '\\' {
                    advance = 2;
                } else if c == q {
                    stack.pop();
                }
            }
            St::Template => {
                if c == '\\' {
                    advance = 2;
                } else if c == '`' {
                    stack.pop();
                } else if c == '$' && next == Some('{') {
                    depth += 1;
                    braces.push(depth);
                    stack.push(St::Code);
                    advance = 2;
                }
            }
            St::LineComment => {
                if c == '\n' {
                    stack.pop();
                }
            }
            St::Raw(hashes) => {
                let closes = || (1..=hashes).all(|k| chars.get(i + k) == Some(&'#'));
                if c == '"' && closes() {
                    stack.pop();
                    advance = hashes + 1;
                }
            }
            St::BlockComment => {
                if c == '*' && next == Some('/') {
                    stack.pop();
                    advance = 2;
                } else if c == '/' && next == Some('*') {
                    stack.push(St::BlockComment);
                    advance = 2;
                }
            }
        }
        for &ch in chars.iter().skip(i).take(advance) {
            if ch == '\n' {
                line += 1;
                col = 1;
            } else {
                col += 1;
            }
        }
        i += advance;
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_names_in_code_and_templates_only() {
        let src = "// window.not_me\nif window.a > param.b_1 {\n  block(\"X\", `saw ${window.c} \"list.no\"`)\n}\nlet s = \"param.no\"; list.d";
        let found: Vec<(&str, String, usize, usize)> = name_uses(src)
            .into_iter()
            .map(|u| (u.namespace, u.name, u.line, u.col))
            .collect();
        assert_eq!(
            found,
            vec![
                ("window", "a".to_string(), 2, 11),
                ("param", "b_1".to_string(), 2, 21),
                ("window", "c".to_string(), 3, 28),
                ("list", "d".to_string(), 5, 26),
            ]
        );
    }

    #[test]
    fn unknown_functions_are_found_with_positions() {
        let engine = engine(&Limits::default());
        let known = known_functions(&engine);
        let src = "fn helper(x) { x + 1 }\nlet n = helper(2).to_string();\nif n == \"3\" {\n  blok(\"X\", \"y\").ask(\"sms\")\n}\nchallenge(\"A\", \"b\").skor(3);\nif n == \"4\" { notise(\"A\", \"b\") }";
        let ast = compile(&engine, src, "r.rhai").unwrap();
        let unknown = unknown_calls(&ast, &known);
        assert_eq!(
            unknown,
            vec![
                ("blok".to_string(), 4, 3),
                ("skor".to_string(), 6, 21),
                ("notise".to_string(), 7, 15)
            ]
        );
    }

    #[test]
    fn parameters_are_inlined_without_moving_positions() {
        let mut names = Names::default();
        names.params.insert("limit".into(), Dynamic::from(5_i64));
        names.params.insert("ratio".into(), Dynamic::from(1.5_f64));
        names
            .params
            .insert("label".into(), Dynamic::from("x".to_string()));
        let src = "if window.n >= param.limit && x < param.ratio { `${param.label}` }\nparam.limit";
        assert_eq!(
            inline_params(src, &names),
            "if window.n >= 5           && x < 1.5         { `${param.label}` }\n5          "
        );
    }

    #[test]
    fn compile_errors_carry_positions() {
        let engine = engine(&Limits::default());
        let err = compile(&engine, "let x = 1;\nif x > { }", "r.rhai").unwrap_err();
        assert_eq!((err.file.as_str(), err.line), ("r.rhai", 2));
        let err = compile(&engine, "if undefined_var > 1 { }", "r.rhai").unwrap_err();
        assert!(err.message.contains("undefined_var"), "{}", err.message);
    }
}
