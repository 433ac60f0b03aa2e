//! Rules compiled from their Rhai AST to a small tree of typed Rust nodes,
//! for the common subset rules are written in: `let`, `if`/`else`, `switch`
//! on literals, `return`, comparisons, arithmetic, `&&`, `||`, `!`, template
//! strings, the hit functions (`block`, `challenge`, `flag`, `notice`,
//! `.ask`, `.score`), `yuan` and `to_int`, over the features of
//! [`super::fast`] and the rule's own variables.
//!
//! Why: even with features resolved, Rhai's tree walker spends a few
//! hundred instructions on every node (a comparison is a function call with
//! its arguments collected into `Dynamic`s). These nodes cost a few. The
//! statements and the conditions, which run on every request (what a rule
//! computes for its hit runs only when it fires), are compiled once more,
//! to closures made for their shape ([`Run`], [`Cond`]).
//!
//! Exactness: a compiled rule never decides anything Rhai would not. Every
//! operation here is Rhai's own for the types it handles (the checked
//! integer arithmetic, the epsilon float comparisons, the template string
//! formatting), and anything else, at run time as at compile time, is a
//! *bail*: the rule is then evaluated by Rhai, on its original AST, exactly
//! as before (so an overflow, a type mismatch, a string over the size limit
//! all end as the RULE_ERROR Rhai reports). What cannot be compiled
//! (loops, functions, maps, arrays, assignments, other calls...) is left
//! to Rhai whole. Compiled rules have no loops, so they stay within the
//! operations limit by construction (their node count is checked against
//! it).

use rhai::{Dynamic, Engine, Expr, FnCallExpr, ImmutableString, Scope, Stmt, AST};

use super::fast::{Feature, IntReader, Reader, Statuses};
use super::script::{self, Ctx, Hit};
use crate::decision::Action;

/// A value of a compiled rule.
#[derive(Debug, Clone)]
pub enum Value {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(ImmutableString),
    Hit(Box<Hit>),
}

impl Value {
    /// The same value as Rhai holds it.
    pub fn into_dynamic(self) -> Dynamic {
        match self {
            Value::Unit => Dynamic::UNIT,
            Value::Bool(b) => Dynamic::from(b),
            Value::Int(n) => Dynamic::from(n),
            Value::Float(x) => Dynamic::from(x),
            Value::Str(s) => Dynamic::from(s),
            Value::Hit(h) => Dynamic::from(*h),
        }
    }

    /// The value as a [`Scalar`], when it is a number or a boolean.
    pub(crate) fn scalar(&self) -> Option<Scalar> {
        match *self {
            Value::Bool(b) => Some(Scalar::Bool(b)),
            Value::Int(n) => Some(Scalar::Int(n)),
            Value::Float(x) => Some(Scalar::Float(x)),
            _ => None,
        }
    }

    /// A parameter's value, when it is of a type handled here.
    pub fn from_param(d: &Dynamic) -> Option<Value> {
        Value::from_dynamic(d)
    }

    /// A constant of the AST, when it is of a type handled here.
    fn from_dynamic(d: &Dynamic) -> Option<Value> {
        if d.is_unit() {
            Some(Value::Unit)
        } else if let Ok(b) = d.as_bool() {
            Some(Value::Bool(b))
        } else if let Ok(n) = d.as_int() {
            Some(Value::Int(n))
        } else if let Ok(x) = d.as_float() {
            Some(Value::Float(x))
        } else {
            d.clone().into_immutable_string().ok().map(Value::Str)
        }
    }
}

/// A number or a boolean: what most conditions compare. Read in place and
/// copied, with no reference count to touch and nothing to drop, where a
/// [`Value`] would be built, matched and dropped for every operand.
#[derive(Debug, Clone, Copy)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
}

impl From<Scalar> for Value {
    fn from(s: Scalar) -> Value {
        match s {
            Scalar::Bool(b) => Value::Bool(b),
            Scalar::Int(n) => Value::Int(n),
            Scalar::Float(x) => Value::Float(x),
        }
    }
}

/// Why a compiled rule stopped early (small, so results stay in
/// registers).
enum Stop {
    /// Something Rhai must decide: the rule runs there instead.
    Bail,
    /// `return value`: the value is in [`Frame::returned`].
    Return,
}

type Eval = Result<Value, Stop>;

#[derive(Debug, Clone, Copy, PartialEq)]
enum BinOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl BinOp {
    fn compares(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
        )
    }
}

#[derive(Debug, Clone, Copy)]
enum Fun {
    /// `block`, `challenge`, `flag` (Allow) and `notice` (Allow, notice).
    Hit(Action, bool),
    Ask,
    Score,
    Yuan,
    ToInt,
}

#[derive(Debug)]
enum E {
    Const(Value),
    Local(usize),
    Feature(usize),
    /// A number or boolean feature, read where it lies.
    Read(Reader),
    /// A comparison of numbers or booleans (see [`Cmp`]).
    Cmp(Box<Cmp>),
    Interp(Vec<E>),
    /// `&&`, `||` or `!`: a condition, compiled (see [`Cond`]).
    Test(Cond),
    Neg(Box<E>),
    Bin(BinOp, Box<E>, Box<E>),
    Call(Fun, Vec<E>),
    Block(Run),
}

#[derive(Debug)]
enum S {
    Let(usize, E),
    Expr(E),
    If(Cond, Vec<S>, Vec<S>),
    Switch(Box<Switch>),
    Return(E),
    Block(Vec<S>),
}

#[derive(Debug)]
struct Switch {
    value: E,
    /// Literal, optional condition, body: in Rhai's order for that literal.
    cases: Vec<(Value, Option<E>, E)>,
    default: Option<E>,
}

/// A comparison whose operands are numbers or booleans where they lie (a
/// constant, a local, a feature): most conditions of a rule. Resolved when
/// the rule compiles, it costs two reads and a compare, where the general
/// path walks operand nodes and looks each feature up.
#[derive(Debug)]
struct Cmp {
    op: BinOp,
    a: Operand,
    b: Operand,
    /// Both operands always integers (a window, an integer field or
    /// constant): compared as such, with no [`Scalar`] in between.
    ints: Option<(IntReader, IntReader)>,
    /// The operands as written: a local can hold a string, which the
    /// general path compares.
    general: (E, E),
}

#[derive(Debug, Clone, Copy)]
enum Operand {
    Local(usize),
    Read(Reader),
}

impl Operand {
    fn of(e: &E) -> Option<Operand> {
        match e {
            E::Local(slot) => Some(Operand::Local(*slot)),
            E::Read(r) => Some(Operand::Read(*r)),
            E::Const(v) => Some(Operand::Read(Reader::Const(v.scalar()?))),
            _ => None,
        }
    }

    /// `None`: a local holding something else than a number or boolean.
    #[inline]
    fn read(self, f: &Frame) -> Option<Scalar> {
        match self {
            Operand::Read(r) => Some(r.read(f.ctx)),
            Operand::Local(slot) => f.locals.get(slot)?.scalar(),
        }
    }
}

/// A compiled rule.
#[derive(Debug)]
pub struct Program {
    body: Run,
    /// Local variable slots.
    pub slots: usize,
}

/// What a variable of a compiled rule stands for.
#[derive(Debug)]
enum Binding {
    /// A local slot, set when its `let` runs.
    Slot(usize),
    /// `let n = window.x;`: a number or boolean feature, which cannot change
    /// while the rule runs (the request's features are fixed, and a
    /// compiled rule never assigns), so every use of `n` reads it in place,
    /// as `window.x` itself would be, and the `let` costs nothing.
    Read(Reader),
    /// `let n = 5;`: a number or boolean constant, likewise.
    Const(Value),
}

/// What compiling needs to know of the pack.
pub struct Compiler<'a> {
    pub engine: &'a Engine,
    /// Prefix of the feature variables (see [`super::fast`]).
    pub prefix: &'a str,
    pub max_operations: u64,
    pub max_variables: usize,
}

struct State<'a> {
    c: &'a Compiler<'a>,
    /// The script's variables in scope, innermost last.
    scope: Vec<(ImmutableString, Binding)>,
    slots: usize,
    /// Variables declared, slot or not (Rhai's `max_variables` counts
    /// them all).
    vars: usize,
    nodes: u64,
    /// String literals of the rule's source, for recovering `switch` cases.
    literals: &'a [String],
    /// The pack's features, as far as this rule reads them.
    features: &'a [Feature],
}

impl Compiler<'_> {
    /// Compiles a rule (its AST as rewritten for the fast path, and that
    /// rewritten source, and the features it reads), or `None` when it uses
    /// anything not handled here.
    pub fn compile(&self, ast: &AST, source: &str, features: &[Feature]) -> Option<Program> {
        if ast.has_functions() {
            return None;
        }
        let literals = string_literals(source);
        let mut st = State {
            c: self,
            scope: Vec::new(),
            slots: 0,
            vars: 0,
            nodes: 0,
            literals: &literals,
            features,
        };
        let body = st.block(ast.statements())?;
        // Each node is at most a handful of Rhai operations: far from the
        // limit, or not compiled.
        let limited = self.max_operations > 0 && st.nodes * 8 >= self.max_operations;
        if limited || st.vars + 8 >= self.max_variables {
            return None;
        }
        Some(Program {
            body: Run::block(body),
            slots: st.slots,
        })
    }
}

impl State<'_> {
    fn block(&mut self, stmts: &[Stmt]) -> Option<Vec<S>> {
        let depth = self.scope.len();
        let out: Option<Vec<S>> = stmts.iter().map(|s| self.stmt(s)).collect();
        self.scope.truncate(depth);
        let mut out = out?;
        // Statements that do nothing (a `let` read in place, a no-op) go,
        // but for the last, whose value is the block's.
        let last = out.pop();
        out.retain(|s| !matches!(s, S::Expr(E::Const(Value::Unit))));
        out.extend(last);
        Some(out)
    }

    fn stmt(&mut self, stmt: &Stmt) -> Option<S> {
        self.nodes += 1;
        Some(match stmt {
            Stmt::Noop(..) => S::Expr(E::Const(Value::Unit)),
            Stmt::Expr(e) => S::Expr(self.expr(e)?),
            Stmt::FnCall(f, _) => S::Expr(self.call(f, None)?),
            Stmt::Var(x, ..) => {
                let value = self.expr(&x.1)?;
                self.vars += 1;
                let in_place = match &value {
                    E::Read(r) => Some(Binding::Read(*r)),
                    E::Const(v) if v.scalar().is_some() => Some(Binding::Const(v.clone())),
                    _ => None,
                };
                if let Some(binding) = in_place {
                    self.scope.push((x.0.name.clone(), binding));
                    // A `let` is worth `()`, should it end a block (see
                    // `block` for the others).
                    return Some(S::Expr(E::Const(Value::Unit)));
                }
                let slot = self.slots;
                self.slots += 1;
                self.scope.push((x.0.name.clone(), Binding::Slot(slot)));
                S::Let(slot, value)
            }
            Stmt::If(x, _) => S::If(
                Cond::of(self.expr(&x.expr)?, self.features),
                self.block(x.body.statements())?,
                self.block(x.branch.statements())?,
            ),
            Stmt::Block(b) => S::Block(self.block(b.statements())?),
            Stmt::Return(value, flags, _) => {
                // `throw` is an error: Rhai's to report.
                if flags.contains(rhai::ASTFlags::BREAK) {
                    return None;
                }
                S::Return(match value {
                    Some(e) => self.expr(e)?,
                    None => E::Const(Value::Unit),
                })
            }
            Stmt::Switch(x, _) => S::Switch(Box::new(self.switch(&x.0, &x.1)?)),
            _ => return None,
        })
    }

    fn switch(&mut self, value: &Expr, cases: &rhai::SwitchCasesCollection) -> Option<Switch> {
        if !cases.ranges.is_empty() {
            return None;
        }
        let value = self.expr(value)?;
        // Rhai keeps the cases by the hash of their literal only: find the
        // literal among the rule's own, by the hash Rhai gives it.
        let mut out = Vec::new();
        for (hash, list) in cases.cases.iter() {
            let literal = self
                .literals
                .iter()
                .find(|l| switch_hash(self.c.engine, l) == Some(*hash))?;
            for &i in list.blocks.iter() {
                let case = &cases.expressions[i];
                let cond = match &case.lhs {
                    Expr::BoolConstant(true, _) => None,
                    c => Some(self.expr(c)?),
                };
                out.push((
                    i,
                    Value::Str(literal.as_str().into()),
                    cond,
                    self.expr(&case.rhs)?,
                ));
            }
        }
        // Rhai tries a literal's cases in their order in the source.
        out.sort_by_key(|(i, ..)| *i);
        let default = match cases.def_case {
            Some(i) => Some(self.expr(&cases.expressions[i].rhs)?),
            None => None,
        };
        Some(Switch {
            value,
            cases: out.into_iter().map(|(_, v, c, e)| (v, c, e)).collect(),
            default,
        })
    }

    fn expr(&mut self, expr: &Expr) -> Option<E> {
        self.nodes += 1;
        Some(match expr {
            Expr::Unit(_) => E::Const(Value::Unit),
            Expr::BoolConstant(b, _) => E::Const(Value::Bool(*b)),
            Expr::IntegerConstant(n, _) => E::Const(Value::Int(*n)),
            Expr::FloatConstant(x, _) => E::Const(Value::Float(**x)),
            Expr::StringConstant(s, _) => E::Const(Value::Str(s.clone())),
            Expr::DynamicConstant(d, _) => E::Const(Value::from_dynamic(d)?),
            Expr::InterpolatedString(parts, _) => {
                E::Interp(parts.iter().map(|p| self.expr(p)).collect::<Option<_>>()?)
            }
            Expr::Variable(v, ..) => {
                if !v.2.is_empty() {
                    return None;
                }
                let name = v.1.as_str();
                match self.scope.iter().rev().find(|(n, _)| n == name) {
                    Some((_, Binding::Slot(slot))) => E::Local(*slot),
                    Some((_, Binding::Read(r))) => E::Read(*r),
                    Some((_, Binding::Const(v))) => E::Const(v.clone()),
                    None => {
                        let i = name.strip_prefix(self.c.prefix)?.parse::<usize>().ok()?;
                        match self.features.get(i).and_then(Feature::reader) {
                            Some(r) => E::Read(r),
                            None => E::Feature(i),
                        }
                    }
                }
            }
            Expr::And(x, _) => E::Test(Cond::and(
                x.iter().map(|e| self.expr(e)).collect::<Option<_>>()?,
                self.features,
            )),
            Expr::Or(x, _) => E::Test(Cond::or(
                x.iter().map(|e| self.expr(e)).collect::<Option<_>>()?,
                self.features,
            )),
            Expr::Stmt(b) => E::Block(Run::block(self.block(b.statements())?)),
            Expr::FnCall(f, _) => self.call(f, None)?,
            Expr::Dot(x, ..) => {
                // receiver.method(..).method(..)
                let mut receiver = self.expr(&x.lhs)?;
                let mut rhs = &x.rhs;
                loop {
                    match rhs {
                        Expr::MethodCall(f, _) => break self.call(f, Some(receiver))?,
                        Expr::Dot(y, ..) => {
                            let Expr::MethodCall(f, _) = &y.lhs else {
                                return None;
                            };
                            receiver = self.call(f, Some(receiver))?;
                            rhs = &y.rhs;
                        }
                        _ => return None,
                    }
                }
            }
            _ => return None,
        })
    }

    /// A function call, or a method call on `receiver`.
    fn call(&mut self, f: &FnCallExpr, receiver: Option<E>) -> Option<E> {
        if !f.namespace.is_empty() || f.capture_parent_scope {
            return None;
        }
        let mut args: Vec<E> = receiver.into_iter().collect();
        for a in f.args.iter() {
            args.push(self.expr(a)?);
        }
        let name = f.name.as_str();
        let arity = args.len();
        Some(match (name, arity) {
            ("==", 2) => bin(BinOp::Eq, args)?,
            ("!=", 2) => bin(BinOp::Ne, args)?,
            ("<", 2) => bin(BinOp::Lt, args)?,
            ("<=", 2) => bin(BinOp::Le, args)?,
            (">", 2) => bin(BinOp::Gt, args)?,
            (">=", 2) => bin(BinOp::Ge, args)?,
            ("+", 2) => bin(BinOp::Add, args)?,
            ("-", 2) => bin(BinOp::Sub, args)?,
            ("*", 2) => bin(BinOp::Mul, args)?,
            ("/", 2) => bin(BinOp::Div, args)?,
            ("%", 2) => bin(BinOp::Rem, args)?,
            ("!", 1) => E::Test(Cond::not(one(args)?, self.features)),
            ("-", 1) => E::Neg(Box::new(one(args)?)),
            ("block", 2) => E::Call(Fun::Hit(Action::Block, false), args),
            ("challenge", 2) => E::Call(Fun::Hit(Action::Challenge, false), args),
            ("flag", 2) => E::Call(Fun::Hit(Action::Allow, false), args),
            ("notice", 2) => E::Call(Fun::Hit(Action::Allow, true), args),
            ("ask", 2) => E::Call(Fun::Ask, args),
            ("score", 2) => E::Call(Fun::Score, args),
            ("yuan", 1) => E::Call(Fun::Yuan, args),
            ("to_int", 1) => E::Call(Fun::ToInt, args),
            _ => return None,
        })
    }
}

fn bin(op: BinOp, args: Vec<E>) -> Option<E> {
    let mut args = args.into_iter();
    let (a, b) = (args.next()?, args.next()?);
    if op.compares() {
        if let (Some(x), Some(y)) = (Operand::of(&a), Operand::of(&b)) {
            let int = |o: Operand| match o {
                Operand::Read(r) => r.int(),
                Operand::Local(_) => None,
            };
            return Some(E::Cmp(Box::new(Cmp {
                op,
                a: x,
                b: y,
                ints: int(x).zip(int(y)),
                general: (a, b),
            })));
        }
    }
    Some(E::Bin(op, Box::new(a), Box::new(b)))
}

fn one(args: Vec<E>) -> Option<E> {
    args.into_iter().next()
}

/// The hash Rhai files a `switch` case under, for a string literal.
fn switch_hash(engine: &Engine, literal: &str) -> Option<u64> {
    let mut scope = Scope::new();
    scope.push("x", ());
    let probe = format!("switch x {{ {} => () }}", quoted(literal));
    let ast = engine.compile_with_scope(&scope, &probe).ok()?;
    match ast.statements().first()? {
        Stmt::Switch(x, _) if x.1.cases.len() == 1 => x.1.cases.keys().next().copied(),
        _ => None,
    }
}

/// A Rhai string literal for `s`.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The contents of every plain "..." literal of a script (escapes
/// resolved), the candidates for `switch` cases.
fn string_literals(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' => {
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('n') => s.push('\n'),
                            Some('r') => s.push('\r'),
                            Some('t') => s.push('\t'),
                            Some(c) => s.push(c),
                            None => {}
                        },
                        c => s.push(c),
                    }
                }
                if !out.contains(&s) {
                    out.push(s);
                }
            }
            _ => {}
        }
    }
    out
}

/// What a compiled rule needs while it runs.
pub struct Frame<'a> {
    pub ctx: &'a Ctx,
    /// The pack's features, and their values for this request, each
    /// computed on its first read.
    pub defs: &'a [Feature],
    pub statuses: &'a Statuses,
    pub features: &'a mut Vec<Option<Value>>,
    /// Local variable slots: at least the largest program's.
    pub locals: &'a mut Vec<Value>,
    /// The pack's `max_string_size` (0: none).
    pub max_string: usize,
    /// The value of a `return`, on its way out.
    pub returned: Option<Value>,
    /// A value was put in `features` (which the caller then clears).
    pub filled: bool,
}

impl Frame<'_> {
    /// Makes sure a simple operand's value is at hand.
    fn ready(&mut self, e: &E) -> Result<(), Stop> {
        if let E::Feature(i) = e {
            let slot = self.features.get_mut(*i).ok_or(Stop::Bail)?;
            if slot.is_none() {
                let def = self.defs.get(*i).ok_or(Stop::Bail)?;
                *slot = Some(def.value(self.ctx, self.statuses));
                self.filled = true;
            }
        }
        Ok(())
    }

    /// A simple operand's value when it is a number or a boolean, read in
    /// place (features uncached: a field read costs less than the cache).
    fn scalar(&self, e: &E) -> Option<Scalar> {
        match e {
            E::Const(v) => v.scalar(),
            E::Local(slot) => self.locals.get(*slot)?.scalar(),
            E::Feature(i) => self.defs.get(*i)?.scalar(self.ctx),
            E::Read(r) => Some(r.read(self.ctx)),
            _ => None,
        }
    }

    /// A simple operand's text when it is a string constant, a string local
    /// or a string feature of the request, borrowed where it lies.
    fn text<'v>(&'v self, e: &'v E) -> Option<&'v str> {
        match e {
            E::Const(Value::Str(s)) => Some(s),
            E::Local(slot) => match self.locals.get(*slot)? {
                Value::Str(s) => Some(s),
                _ => None,
            },
            E::Feature(i) => self.defs.get(*i)?.text(self.ctx),
            _ => None,
        }
    }

    /// A simple operand's value (after [`Frame::ready`]).
    fn peek<'v>(&'v self, e: &'v E) -> &'v Value {
        match e {
            E::Const(v) => v,
            E::Local(slot) => &self.locals[*slot],
            E::Feature(i) => self.features[*i].as_ref().unwrap_or(&Value::Unit),
            _ => &Value::Unit,
        }
    }
}

/// A constant, a local or a feature: read in place, not evaluated.
fn simple(e: &E) -> bool {
    matches!(e, E::Const(_) | E::Local(_) | E::Feature(_))
}

impl Program {
    /// The rule's value, or `None`: Rhai must evaluate this rule.
    pub fn run(&self, frame: &mut Frame) -> Option<Value> {
        if frame.locals.len() < self.slots {
            frame.locals.resize(self.slots, Value::Unit);
        }
        match self.body.run(frame) {
            Ok(v) => Some(v),
            Err(Stop::Return) => frame.returned.take(),
            Err(Stop::Bail) => None,
        }
    }
}

/// A statement or a block, compiled to a closure, as conditions are (see
/// [`Cond`]): most rules are one `if` whose condition is false on most
/// requests, and running one is then a call for the `if` and one for its
/// condition, with no walk over statement kinds and block shapes.
struct Run(Box<RunFn>);

type RunFn = dyn Fn(&mut Frame<'_>) -> Eval + Send + Sync;

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Run")
    }
}

impl Run {
    #[inline]
    fn run(&self, f: &mut Frame<'_>) -> Eval {
        (self.0)(f)
    }

    fn new(run: impl Fn(&mut Frame<'_>) -> Eval + Send + Sync + 'static) -> Run {
        Run(Box::new(run))
    }

    /// Statements in order; the value is the last one's (`()` for none).
    fn block(stmts: Vec<S>) -> Run {
        let mut runs: Vec<Run> = stmts.into_iter().map(Run::stmt).collect();
        match runs.len() {
            0 => Run::new(|_| Ok(Value::Unit)),
            1 => runs.pop().unwrap(),
            _ => {
                let last = runs.pop().unwrap();
                Run::new(move |f| {
                    for r in &runs {
                        r.run(f)?;
                    }
                    last.run(f)
                })
            }
        }
    }

    fn stmt(s: S) -> Run {
        match s {
            S::Expr(E::Const(Value::Unit)) => Run::new(|_| Ok(Value::Unit)),
            S::Expr(e) => Run::new(move |f| eval(&e, f)),
            S::Let(slot, e) => Run::new(move |f| {
                let v = eval(&e, f)?;
                f.locals[slot] = v;
                Ok(Value::Unit)
            }),
            S::If(cond, then, otherwise) => {
                let then = Run::block(then);
                if otherwise.is_empty() {
                    Run::new(move |f| {
                        if cond.test(f)? {
                            then.run(f)
                        } else {
                            Ok(Value::Unit)
                        }
                    })
                } else {
                    let otherwise = Run::block(otherwise);
                    Run::new(move |f| {
                        if cond.test(f)? {
                            then.run(f)
                        } else {
                            otherwise.run(f)
                        }
                    })
                }
            }
            S::Block(b) => Run::block(b),
            S::Return(e) => Run::new(move |f| {
                let v = eval(&e, f)?;
                f.returned = Some(v);
                Err(Stop::Return)
            }),
            S::Switch(sw) => Run::new(move |f| switch(&sw, f)),
        }
    }
}

fn switch(sw: &Switch, f: &mut Frame) -> Eval {
    // A string feature is compared where it lies (it borrows the request,
    // not the frame); anything else is evaluated.
    let (ctx, defs) = (f.ctx, f.defs);
    let in_place = match &sw.value {
        E::Feature(i) => defs.get(*i).and_then(|d| d.text(ctx)),
        _ => None,
    };
    let owned;
    let value = match in_place {
        Some(text) => text,
        None => {
            owned = match eval(&sw.value, f)? {
                Value::Str(s) => s,
                _ => return Err(Stop::Bail),
            };
            owned.as_str()
        }
    };
    for (literal, cond, body) in &sw.cases {
        let Value::Str(l) = literal else {
            return Err(Stop::Bail);
        };
        if l.as_str() != value {
            continue;
        }
        let taken = match cond {
            None => true,
            Some(c) => truth(c, f)?,
        };
        if taken {
            return eval(body, f);
        }
    }
    match &sw.default {
        Some(d) => eval(d, f),
        None => Ok(Value::Unit),
    }
}

/// An expression that must be a boolean (a `switch` case's condition, or a
/// comparison's value; an `if`'s condition and the operands of `&&`, `||`
/// and `!` are [`Cond`]s): Rhai's type mismatch otherwise.
///
/// Only the common nodes are here, so that this function stays small; the
/// rest is [`truth_general`].
fn truth(e: &E, f: &mut Frame) -> Result<bool, Stop> {
    match e {
        E::Cmp(c) => match c.ints {
            Some((a, b)) => ordered(c.op, &a.read(f.ctx), &b.read(f.ctx)).ok_or(Stop::Bail),
            None => match (c.a.read(f), c.b.read(f)) {
                (Some(x), Some(y)) => compare_scalars(c.op, x, y).ok_or(Stop::Bail),
                _ => truth_general(e, f),
            },
        },
        E::Read(r) => match r.read(f.ctx) {
            Scalar::Bool(b) => Ok(b),
            _ => Err(Stop::Bail),
        },
        E::Test(c) => c.test(f),
        e => truth_general(e, f),
    }
}

#[inline(never)]
fn truth_general(e: &E, f: &mut Frame) -> Result<bool, Stop> {
    match e {
        E::Cmp(c) => compare_in_place(c.op, &c.general.0, &c.general.1, f),
        E::Bin(op, a, b) if op.compares() => compare_in_place(*op, a, b, f),
        e if simple(e) => {
            if let Some(Scalar::Bool(b)) = f.scalar(e) {
                return Ok(b);
            }
            f.ready(e)?;
            match f.peek(e) {
                Value::Bool(b) => Ok(*b),
                _ => Err(Stop::Bail),
            }
        }
        e => match eval(e, f)? {
            Value::Bool(b) => Ok(b),
            _ => Err(Stop::Bail),
        },
    }
}

/// A condition (of an `if`, or an `&&`, `||` or `!` anywhere), compiled to
/// a closure when the rule compiles.
///
/// Why: walking a condition's nodes, [`truth`] dispatches on the node, then
/// on each operand's kind, then on the operator, and most of those
/// branches are taken one way on one rule and another way on the next, so
/// they are mispredicted. A closure is made for the very shape of each
/// condition (`window.x > 5` reads that window and compares, nothing
/// else), so testing it costs one indirect call a node. What it answers is
/// exactly what [`truth`] answers on the same node, error for error: the
/// shapes not specialized here call [`truth_general`] as it would.
struct Cond(Box<CondFn>);

type CondFn = dyn Fn(&mut Frame<'_>) -> Result<bool, Stop> + Send + Sync;

impl std::fmt::Debug for Cond {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cond")
    }
}

impl Cond {
    #[inline]
    fn test(&self, f: &mut Frame<'_>) -> Result<bool, Stop> {
        (self.0)(f)
    }

    fn new(test: impl Fn(&mut Frame<'_>) -> Result<bool, Stop> + Send + Sync + 'static) -> Cond {
        Cond(Box::new(test))
    }

    /// The condition `e` (reading `features`), node for node what [`truth`]
    /// does with it.
    fn of(e: E, features: &[Feature]) -> Cond {
        match e {
            E::Cmp(c) => match c.ints {
                Some((a, b)) => int_compare(c.op, a, b),
                None => match (c.a, c.b) {
                    // A number or boolean feature or constant each side
                    // (a float, say): read and compared, nothing else.
                    (Operand::Read(a), Operand::Read(b)) => {
                        let op = c.op;
                        Cond::new(move |f| {
                            compare_scalars(op, a.read(f.ctx), b.read(f.ctx)).ok_or(Stop::Bail)
                        })
                    }
                    _ => Cond::new(move |f| match (c.a.read(f), c.b.read(f)) {
                        (Some(x), Some(y)) => compare_scalars(c.op, x, y).ok_or(Stop::Bail),
                        _ => compare_in_place(c.op, &c.general.0, &c.general.1, f),
                    }),
                },
            },
            E::Read(Reader::List(i)) => Cond::new(move |f| Ok(f.ctx.lists[i])),
            E::Read(Reader::Const(Scalar::Bool(b))) => Cond::new(move |_| Ok(b)),
            E::Read(r) => Cond::new(move |f| match r.read(f.ctx) {
                Scalar::Bool(b) => Ok(b),
                _ => Err(Stop::Bail),
            }),
            E::Test(c) => c,
            E::Bin(op, a, b) if op.compares() => {
                match (Text::of(&a, features), Text::of(&b, features)) {
                    // Two strings where they lie: `compare_in_place`'s
                    // answer, with no look at what else they could be.
                    (Some(x), Some(y)) => Cond::new(move |f| {
                        ordered(op, x.read(f.ctx), y.read(f.ctx)).ok_or(Stop::Bail)
                    }),
                    _ => Cond::new(move |f| compare_in_place(op, &a, &b, f)),
                }
            }
            e => Cond::new(move |f| truth_general(&e, f)),
        }
    }

    /// `!x`.
    fn not(x: E, features: &[Feature]) -> Cond {
        let x = Cond::of(x, features);
        Cond::new(move |f| Ok(!x.test(f)?))
    }

    /// `a && b && ...`: in order, stopping at the first false (or error).
    fn and(xs: Vec<E>, features: &[Feature]) -> Cond {
        let mut xs: Vec<Cond> = xs.into_iter().map(|x| Cond::of(x, features)).collect();
        match xs.len() {
            2 => {
                let (b, a) = (xs.pop().unwrap(), xs.pop().unwrap());
                Cond::new(move |f| Ok(a.test(f)? && b.test(f)?))
            }
            3 => {
                let (c, b, a) = (xs.pop().unwrap(), xs.pop().unwrap(), xs.pop().unwrap());
                Cond::new(move |f| Ok(a.test(f)? && b.test(f)? && c.test(f)?))
            }
            _ => Cond::new(move |f| {
                for x in &xs {
                    if !x.test(f)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }),
        }
    }

    /// `a || b || ...`: in order, stopping at the first true (or error).
    fn or(xs: Vec<E>, features: &[Feature]) -> Cond {
        let xs: Vec<Cond> = xs.into_iter().map(|x| Cond::of(x, features)).collect();
        Cond::new(move |f| {
            for x in &xs {
                if x.test(f)? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }
}

/// A string operand where it lies: a literal, or a string feature of the
/// request or its location.
enum Text {
    Const(ImmutableString),
    Field(fn(&Ctx) -> &str),
}

impl Text {
    fn of(e: &E, features: &[Feature]) -> Option<Text> {
        match e {
            E::Const(Value::Str(s)) => Some(Text::Const(s.clone())),
            E::Feature(i) => features.get(*i)?.text_reader().map(Text::Field),
            _ => None,
        }
    }

    #[inline]
    fn read<'a>(&'a self, ctx: &'a Ctx) -> &'a str {
        match self {
            Text::Const(s) => s,
            Text::Field(get) => get(ctx),
        }
    }
}

/// Integer comparison operators, as types: a comparison closure is made
/// for its operator.
trait IntOp: Send + Sync + 'static {
    fn test(a: i64, b: i64) -> bool;
}

macro_rules! int_ops {
    ($($name:ident $op:tt),*) => {$(
        struct $name;
        impl IntOp for $name {
            #[inline(always)]
            fn test(a: i64, b: i64) -> bool {
                a $op b
            }
        }
    )*};
}

int_ops!(IntEq ==, IntNe !=, IntLt <, IntLe <=, IntGt >, IntGe >=);

/// `a op b` on two integers where they lie: [`truth`]'s `ordered`, made for
/// the operator and the operands' kinds.
fn int_compare(op: BinOp, a: IntReader, b: IntReader) -> Cond {
    fn left<O: IntOp>(a: IntReader, b: IntReader) -> Cond {
        match a {
            IntReader::Const(x) => right::<O>(move |_| x, b),
            IntReader::Window(i) => right::<O>(move |ctx| ctx.windows[i], b),
            IntReader::Field(get) => right::<O>(get, b),
        }
    }
    fn right<O: IntOp>(a: impl Fn(&Ctx) -> i64 + Send + Sync + 'static, b: IntReader) -> Cond {
        match b {
            IntReader::Const(y) => Cond::new(move |f| Ok(O::test(a(f.ctx), y))),
            IntReader::Window(j) => Cond::new(move |f| Ok(O::test(a(f.ctx), f.ctx.windows[j]))),
            IntReader::Field(get) => Cond::new(move |f| Ok(O::test(a(f.ctx), get(f.ctx)))),
        }
    }
    match op {
        BinOp::Eq => left::<IntEq>(a, b),
        BinOp::Ne => left::<IntNe>(a, b),
        BinOp::Lt => left::<IntLt>(a, b),
        BinOp::Le => left::<IntLe>(a, b),
        BinOp::Gt => left::<IntGt>(a, b),
        BinOp::Ge => left::<IntGe>(a, b),
        // Not a comparison: never made a `Cmp` (see `bin`).
        op => Cond::new(move |f| ordered(op, &a.read(f.ctx), &b.read(f.ctx)).ok_or(Stop::Bail)),
    }
}

/// A comparison of operands read in place where they are simple.
fn compare_in_place(op: BinOp, a: &E, b: &E, f: &mut Frame) -> Result<bool, Stop> {
    if simple(a) && simple(b) {
        // Numbers and booleans, then strings, in place: most conditions.
        if let (Some(x), Some(y)) = (f.scalar(a), f.scalar(b)) {
            return compare_scalars(op, x, y).ok_or(Stop::Bail);
        }
        if let (Some(x), Some(y)) = (f.text(a), f.text(b)) {
            return ordered(op, x, y).ok_or(Stop::Bail);
        }
        f.ready(a)?;
        f.ready(b)?;
        return compare(op, f.peek(a), f.peek(b)).ok_or(Stop::Bail);
    }
    match binary_in_place(op, a, b, f)? {
        Value::Bool(b) => Ok(b),
        _ => Err(Stop::Bail),
    }
}

/// A binary operator on operands read in place where they are simple.
fn binary_in_place(op: BinOp, a: &E, b: &E, f: &mut Frame) -> Eval {
    let a_owned = if simple(a) {
        f.ready(a)?;
        None
    } else {
        Some(eval(a, f)?)
    };
    let b_owned = if simple(b) {
        f.ready(b)?;
        None
    } else {
        Some(eval(b, f)?)
    };
    let x = a_owned.as_ref().unwrap_or_else(|| f.peek(a));
    let y = b_owned.as_ref().unwrap_or_else(|| f.peek(b));
    binary(op, x, y, f.max_string).ok_or(Stop::Bail)
}

fn eval(e: &E, f: &mut Frame) -> Eval {
    Ok(match e {
        E::Const(v) => v.clone(),
        E::Local(slot) => f.locals[*slot].clone(),
        E::Read(r) => r.read(f.ctx).into(),
        E::Cmp(_) => Value::Bool(truth(e, f)?),
        E::Feature(_) => {
            f.ready(e)?;
            f.peek(e).clone()
        }
        E::Interp(parts) => {
            let mut s = String::with_capacity(96);
            for p in parts {
                match eval(p, f)? {
                    Value::Str(x) => s.push_str(&x),
                    Value::Int(n) => s.push_str(itoa::Buffer::new().format(n)),
                    Value::Bool(b) => s.push_str(if b { "true" } else { "false" }),
                    Value::Unit => {}
                    Value::Float(x) => {
                        use std::fmt::Write;
                        let _ = write!(s, "{}", rhai::FloatWrapper::new(x));
                    }
                    Value::Hit(_) => return Err(Stop::Bail),
                }
                if f.max_string > 0 && s.len() > f.max_string {
                    return Err(Stop::Bail);
                }
            }
            Value::Str(s.into())
        }
        E::Test(c) => Value::Bool(c.test(f)?),
        E::Neg(x) => match eval(x, f)? {
            Value::Int(n) => Value::Int(n.checked_neg().ok_or(Stop::Bail)?),
            Value::Float(x) => Value::Float(-x),
            _ => return Err(Stop::Bail),
        },
        E::Bin(op, a, b) => binary_in_place(*op, a, b, f)?,
        E::Call(fun, args) => {
            // Every function here takes one or two arguments: on the stack.
            let mut vals = Args::new();
            for a in args {
                vals.push(eval(a, f)?);
            }
            call(*fun, vals).ok_or(Stop::Bail)?
        }
        E::Block(b) => b.run(f)?,
    })
}

/// Rhai's built-in comparisons of numbers and booleans.
fn compare_scalars(op: BinOp, a: Scalar, b: Scalar) -> Option<bool> {
    use Scalar::*;
    match (a, b) {
        (Int(x), Int(y)) => ordered(op, &x, &y),
        (Float(x), Float(y)) => float_compare(op, x, y),
        (Float(x), Int(y)) => float_compare(op, x, y as f64),
        (Int(x), Float(y)) => float_compare(op, x as f64, y),
        // false < true, as Rhai orders booleans.
        (Bool(x), Bool(y)) => ordered(op, &x, &y),
        _ => None,
    }
}

/// Rhai's built-in comparisons, for the types they are built in for.
fn compare(op: BinOp, a: &Value, b: &Value) -> Option<bool> {
    use BinOp::*;
    use Value::*;
    if let (Some(x), Some(y)) = (a.scalar(), b.scalar()) {
        return compare_scalars(op, x, y);
    }
    Some(match (a, b) {
        (Str(x), Str(y)) => ordered(op, x.as_str(), y.as_str())?,
        (Unit, Unit) => match op {
            Eq => true,
            Ne | Lt | Le | Gt | Ge => false,
            _ => return None,
        },
        _ => return None,
    })
}

/// A comparison by the type's own order: Rhai's for integers, booleans and
/// strings (by bytes, as `str` compares).
fn ordered<T: PartialOrd + ?Sized>(op: BinOp, x: &T, y: &T) -> Option<bool> {
    use BinOp::*;
    Some(match op {
        Eq => x == y,
        Ne => x != y,
        Lt => x < y,
        Le => x <= y,
        Gt => x > y,
        Ge => x >= y,
        _ => return None,
    })
}

/// Rhai's built-in operators, for the types they are built in for.
fn binary(op: BinOp, a: &Value, b: &Value, max_string: usize) -> Option<Value> {
    if op.compares() {
        return compare(op, a, b).map(Value::Bool);
    }
    use BinOp::*;
    use Value::*;
    Some(match (a, b) {
        (&Int(x), &Int(y)) => match op {
            Add => Int(x.checked_add(y)?),
            Sub => Int(x.checked_sub(y)?),
            Mul => Int(x.checked_mul(y)?),
            Div if y == 0 => return None,
            Div => Int(x.checked_div(y)?),
            Rem => Int(x.checked_rem(y)?),
            _ => return None,
        },
        (&Float(x), &Float(y)) => float(op, x, y)?,
        (&Float(x), &Int(y)) => float(op, x, y as f64)?,
        (&Int(x), &Float(y)) => float(op, x as f64, y)?,
        (Str(x), Str(y)) if op == Add => {
            if max_string > 0 && x.len() + y.len() > max_string {
                return None;
            }
            Str(x.clone() + y)
        }
        _ => return None,
    })
}

/// Rhai's float comparisons (checked build): within a relative epsilon.
fn float_compare(op: BinOp, x: f64, y: f64) -> Option<bool> {
    use BinOp::*;
    let max = if x * y == 0.0 {
        1.0
    } else {
        x.abs().max(y.abs())
    };
    let eps = f64::EPSILON;
    // (the answer when the scale is zero, the test otherwise)
    let (zero, test) = match op {
        Eq => (true, (x - y).abs() / max <= eps),
        Ne => (false, (x - y).abs() / max > eps),
        Gt => (false, (x - y) / max > eps),
        Ge => (true, (x - y) / max > -eps),
        Lt => (false, (y - x) / max > eps),
        Le => (true, (y - x) / max > -eps),
        _ => return None,
    };
    Some(if max == 0.0 { zero } else { test })
}

/// Rhai's float arithmetic, as is (comparisons are [`float_compare`]).
fn float(op: BinOp, x: f64, y: f64) -> Option<Value> {
    use BinOp::*;
    Some(Value::Float(match op {
        Add => x + y,
        Sub => x - y,
        Mul => x * y,
        Div => x / y,
        Rem => x % y,
        _ => return None,
    }))
}

/// A call's arguments.
type Args = smallvec::SmallVec<[Value; 2]>;

fn call(fun: Fun, args: Args) -> Option<Value> {
    let mut args = args.into_iter();
    let mut next = || args.next();
    Some(match fun {
        Fun::Hit(action, notice) => {
            let (Value::Str(code), Value::Str(message)) = (next()?, next()?) else {
                return None;
            };
            let mut h = script::hit(action, code, message);
            h.notice = notice;
            Value::Hit(Box::new(h))
        }
        Fun::Ask => {
            let (Value::Hit(mut h), Value::Str(kind)) = (next()?, next()?) else {
                return None;
            };
            h.challenge = kind;
            Value::Hit(h)
        }
        Fun::Score => {
            let (Value::Hit(mut h), Value::Int(n)) = (next()?, next()?) else {
                return None;
            };
            h.score = Some(n);
            Value::Hit(h)
        }
        Fun::Yuan => match next()? {
            Value::Int(fen) => Value::Str(script::yuan(fen).into()),
            _ => return None,
        },
        Fun::ToInt => match next()? {
            Value::Int(n) => Value::Int(n),
            Value::Float(x) => {
                if x > i64::MAX as f64 || x < i64::MIN as f64 {
                    return None;
                }
                Value::Int(x.trunc() as i64)
            }
            _ => return None,
        },
    })
}
