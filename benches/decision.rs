//! One full decision in process, as the server makes it minus gRPC, with the
//! shipped pack; the same rules written natively in Rust over the same
//! features; and the rules alone.
//!
//! ```sh
//! cargo bench --bench decision                     # full run
//! cargo bench --bench decision -- --quick          # smoke run
//! cargo bench --bench decision -- decision/        # the pipeline benches only
//! ```
//!
//! Before any benchmark, a check feeds one 100,000-step stream to a Rhai
//! pipeline and a native one (separate stores) and panics at the first
//! decision that differs in any field: the Rhai/native ratio compares equal
//! work. It prints the decision mix it saw.
//!
//! - `decision/shipped_pack`: claim the request id, geo lookup, `begin`
//!   (record + read every window, read the profile), `Pack::context` (lists),
//!   `Pack::run` (Rhai), `combine`, `settle`, store the decision: what
//!   `Engine::evaluate` does, through public calls, without async.
//! - `decision/native_baseline`: the same, with `Native::run` for `Pack::run`.
//! - `decision/shipped_pack_rule_by_rule`: the same, with
//!   `Pack::run_rule_by_rule` (no fast path: every rule its own Rhai
//!   evaluation, as before the fast path), for a before/after in one run.
//! - `decision/engine_evaluate`: `Engine::evaluate` itself on a current-thread
//!   runtime (one `block_on` per 256 decisions), to show the mirror is faithful.
//! - `decision/engine_threads` (only with `RISKGATE_BENCH_THREADS=K`, see
//!   [`threads`]): `Engine::evaluate` on one thread and on K threads sharing
//!   one engine, for what threads add to a decision.
//! - `decision/rules_only_rhai` / `_native`: `Pack::run` / `Native::run` alone
//!   on contexts sampled from the check (real window values, the same mix);
//!   `rules_only_rhai_rule_by_rule`: `Pack::run_rule_by_rule`.
//! - `rhai_rule/<id>`: one shipped rule alone (a one-rule copy of the pack),
//!   on the same contexts; `rhai_rule/empty_x1` and `empty_x13` are packs of
//!   empty scripts: `Pack::run`'s fixed cost, and its cost per rule evaluated.
//!   `rhai_rule/read_*_x10`: one rule making ten reads of one kind (`window.X`,
//!   `param.X`, `list.X`: the indexer; `profile.X`, `request.X`: registered
//!   getters), each `if <read> > 999 {}`; minus `empty_x1`, over ten, is the
//!   cost of one read. `hit_static` / `hit_template`: a rule that always
//!   fires, with a literal message or an interpolated one. All of these go
//!   through `Pack::run`, so they measure rules as the fast path runs them
//!   (compiled to Rust when they can be: see `src/pack/compiled.rs`).
//!
//! Instruction counts: the machine these run on is shared and noisy, so
//! `RISKGATE_BENCH_ITERS=N` skips criterion and runs each `decision/` bench
//! matching the filters exactly N times (same setup, same epochs), printing
//! the time per decision (`RISKGATE_BENCH_ROUNDS=K`: K alternating rounds and
//! medians); under callgrind, restricted to the timed part, it
//! gives instructions per decision, which noise does not move:
//!
//! ```sh
//! RISKGATE_BENCH_ITERS=20000 RISKGATE_BENCH_CHECK_STEPS=2000 valgrind --tool=callgrind \
//!     --callgrind-out-file=/tmp/cg.out --toggle-collect='*counted*' \
//!     target/release/deps/decision-HASH decision/shipped_pack
//! callgrind_annotate /tmp/cg.out | head   # total Ir / N = instructions per decision
//! ```
//!
//! Traffic: 50,000 regular users plus new accounts, unverified accounts, bot
//! devices, floods...; event time advances 100 ms a step; every recharge has
//! a fresh request id. Logins and outcomes in the stream are applied untimed,
//! and so is a sweep of idle keys every hour of event time.
//!
//! Epochs: the pipeline benchmarks time the same 50,000 recharges over and
//! over, each time on a fresh store warmed (untimed, natively) with the same
//! 100,000 steps: a store that only grows would make the time per decision
//! depend on how long criterion runs (it did: 6 -> 10 us native between a
//! 2 s and a 15 s measurement). `RISKGATE_BENCH_VERBOSE=1` prints each
//! epoch's store size and the process RSS.

#[path = "native/mod.rs"]
mod native;

/// The allocator the server runs with (see `src/main.rs`).
#[global_allocator]
static ALLOC: riskgate_alloc::MiMalloc = riskgate_alloc::MiMalloc;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use riskgate::engine::Engine;
use riskgate::geo::GeoDb;
use riskgate::pack::script::Ctx;
use riskgate::pack::Pack;
use riskgate::state::Store;

use native::{
    check, counted, demo_geo, shipped_pack, shipped_rule_tables, timed, write_pack, Checked,
    Native, Pipeline, Rules, Traffic, ALL_CODES, STEP_MS,
};

/// Steps of the equivalence check (`RISKGATE_BENCH_CHECK_STEPS` overrides,
/// e.g. a short check under valgrind).
const CHECK_STEPS: usize = 100_000;
/// Steps a pipeline benchmark's store is warmed with first.
const WARM_STEPS: usize = 100_000;
/// Seed of the timed streams (the check uses its own).
const SEED: u64 = 7;
/// Recharges timed on one warmed store before it is replaced by a fresh one
/// (untimed). The store grows with every decision (idempotency records,
/// profiles, new keys), and its cost per decision with it: epochs make a
/// measurement independent of how many iterations criterion picks.
const EPOCH: u64 = 50_000;

struct Setup {
    pack: Arc<Pack>,
    geo: GeoDb,
    native: Arc<Native>,
    checked: Checked,
}

impl Setup {
    fn new() -> Setup {
        let pack = shipped_pack();
        let geo = demo_geo();
        let native = Arc::new(Native::new(&pack));
        let started = Instant::now();
        // At least one step: the rules-only benches time the contexts it captures.
        let steps = env_number("RISKGATE_BENCH_CHECK_STEPS")
            .unwrap_or(CHECK_STEPS)
            .max(1);
        let checked = check(&pack, &geo, &native, steps);
        report_check(&checked, started.elapsed());
        let (compiled, merged, alone) = pack.fast_coverage();
        eprintln!(
            "check: rules compiled {compiled}, in merged Rhai segments {merged}, alone {alone}; \
             hand-overs to Rhai per rule {:?}",
            pack.fast_bails()
        );
        Setup {
            pack,
            geo,
            native,
            checked,
        }
    }

    /// A pipeline with a warmed store, and the stream to go on with.
    fn warmed(&self) -> (Pipeline, Traffic) {
        let p = Pipeline::new(self.pack.clone(), self.geo.clone(), self.native.clone());
        let mut traffic = Traffic::new(SEED);
        // Native and Rhai decide alike (checked), so the faster one warms.
        p.warm(&mut traffic, WARM_STEPS, Rules::Native);
        (p, traffic)
    }
}

fn report_check(c: &Checked, took: Duration) {
    let pct = |n: usize| 100.0 * n as f64 / c.decisions.max(1) as f64;
    eprintln!(
        "check: native == Rhai on all {} decisions ({} steps, {:.1} s of event time, {:.2?} to run both)",
        c.decisions,
        c.steps,
        c.steps as f64 * STEP_MS as f64 / 1000.0,
        took
    );
    let actions: Vec<String> = c
        .actions
        .iter()
        .map(|(a, n)| format!("{a} {n} ({:.1}%)", pct(*n)))
        .collect();
    eprintln!("check: actions  {}", actions.join(", "));
    let codes: Vec<String> = c.codes.iter().map(|(k, n)| format!("{k} {n}")).collect();
    eprintln!("check: reasons  {}", codes.join(", "));
    let shadow: Vec<String> = c
        .shadow_codes
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    eprintln!("check: shadow   {}", shadow.join(", "));
    let missing: Vec<&str> = ALL_CODES
        .iter()
        .copied()
        .filter(|k| !c.codes.contains_key(*k) && !c.shadow_codes.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "check: WARNING the mix never produced {} (native and Rhai were not compared there)",
            missing.join(", ")
        );
    }
    eprintln!(
        "check: {} contexts sampled for the rules-only benches",
        c.ctxs.len()
    );
}

/// A number from the environment, when set and well formed.
fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn main() {
    // As `riskgate serve` without a pretouch: no transparent huge pages.
    if let Err(e) = riskgate::runtime::huge_pages(false) {
        eprintln!("cannot refuse transparent huge pages: {e}");
    }
    let setup = Setup::new();
    if let Some(n) = env_number::<u64>("RISKGATE_BENCH_ITERS") {
        match env_number::<usize>("RISKGATE_BENCH_THREADS") {
            Some(k) => threads(&setup, n, k.max(1)),
            None => fixed(&setup, n),
        }
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    pipelines(&mut c, &setup);
    rules_only(&mut c, &setup);
    rhai_rules(&mut c, &setup);
    c.final_summary();
}

/// `RISKGATE_BENCH_ITERS=N`: each `decision/` bench whose name ends with one
/// of the arguments that are not flags (all when none), exactly N decisions
/// (or runs) timed. `RISKGATE_BENCH_ROUNDS=K` (default 1) repeats them K
/// times, alternating, each bench going on with its own epochs as under
/// criterion, and prints each bench's median: on a noisy machine, benches
/// compared in one alternating run are what can be compared.
fn fixed(setup: &Setup, n: u64) {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rounds: usize = env_number("RISKGATE_BENCH_ROUNDS").unwrap_or(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let wanted = |name: &str| filters.is_empty() || filters.iter().any(|f| name.ends_with(f));
    let pipelines = [
        ("decision/shipped_pack", How::Pipeline(Rules::Rhai)),
        ("decision/native_baseline", How::Pipeline(Rules::Native)),
        ("decision/engine_evaluate", How::Engine(&rt)),
        (
            "decision/shipped_pack_rule_by_rule",
            How::Pipeline(Rules::RhaiRuleByRule),
        ),
    ];
    // Verdicts are dropped inside the timing here (empty ones cost nothing).
    type RulesOnly<'a> = Box<dyn Fn(&Ctx) + 'a>;
    let pack = &setup.pack;
    let native = &setup.native;
    let rules_only: [(&str, RulesOnly); 3] = [
        (
            "decision/rules_only_rhai",
            Box::new(|ctx| {
                black_box(pack.run(ctx));
            }),
        ),
        (
            "decision/rules_only_rhai_rule_by_rule",
            Box::new(|ctx| {
                black_box(pack.run_rule_by_rule(ctx));
            }),
        ),
        (
            "decision/rules_only_native",
            Box::new(|ctx| {
                black_box(native.run(ctx));
            }),
        ),
    ];
    let mut states: Vec<Option<Epoch>> = pipelines.iter().map(|_| None).collect();
    let ctxs = &setup.checked.ctxs;
    let mut at = 0;
    let mut times: std::collections::BTreeMap<&str, Vec<Duration>> = Default::default();
    for round in 1..=rounds {
        for ((name, how), state) in pipelines.iter().zip(&mut states) {
            if wanted(name) {
                let took = measure(setup, state, n, *how) / n.max(1) as u32;
                eprintln!("{name}: {n} decisions, {took:?} each (round {round})");
                times.entry(name).or_default().push(took);
            }
        }
        for (name, run) in &rules_only {
            if wanted(name) {
                let took = over_ctxs(ctxs, &mut at, n, run) / n.max(1) as u32;
                eprintln!("{name}: {n} runs, {took:?} each (round {round})");
                times.entry(name).or_default().push(took);
            }
        }
    }
    if rounds > 1 {
        for (name, mut t) in times {
            t.sort();
            eprintln!("{name}: median {:?} of {} rounds", t[t.len() / 2], t.len());
        }
    }
}

/// `RISKGATE_BENCH_THREADS=K` with `RISKGATE_BENCH_ITERS=N`: `Engine::evaluate`
/// on one thread, then on K threads sharing one engine and one store, each
/// deciding N recharges (dealt in turn from one stream, so users, devices and
/// retries cross threads as they would across a server's cores), alternating
/// for `RISKGATE_BENCH_ROUNDS` rounds, each on a freshly warmed store. It
/// prints the time per decision on each thread: what K threads add to a
/// decision (shared reference counts, locks, cache lines moving between
/// cores) is the difference, measurable on any machine with K cores.
fn threads(setup: &Setup, n: u64, k: usize) {
    let rounds: usize = env_number("RISKGATE_BENCH_ROUNDS").unwrap_or(1);
    let mut per: std::collections::BTreeMap<usize, Vec<Duration>> = Default::default();
    for round in 1..=rounds {
        for t in [1, k] {
            let Epoch {
                mut traffic,
                engine,
                ..
            } = setup.epoch();
            let mut lists: Vec<Vec<riskgate::model::Recharge>> = vec![Vec::new(); t];
            let mut dealt = 0usize;
            while dealt < t * n as usize {
                if let native::Step::Recharge(r) = traffic.next_step() {
                    lists[dealt % t].push(r);
                    dealt += 1;
                }
            }
            let start = std::sync::Barrier::new(t);
            let took: Vec<Duration> = std::thread::scope(|s| {
                let workers: Vec<_> = lists
                    .into_iter()
                    .map(|list| {
                        let (engine, start) = (&engine, &start);
                        s.spawn(move || {
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .build()
                                .expect("a tokio runtime");
                            start.wait();
                            let began = Instant::now();
                            let mut list = list.into_iter();
                            loop {
                                let batch: Vec<_> = list.by_ref().take(256).collect();
                                if batch.is_empty() {
                                    break;
                                }
                                rt.block_on(async {
                                    for r in batch {
                                        black_box(engine.evaluate(r).await.expect("decided"));
                                    }
                                });
                            }
                            began.elapsed()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("a worker"))
                    .collect()
            });
            let each: Vec<String> = took
                .iter()
                .map(|d| format!("{:?}", *d / n.max(1) as u32))
                .collect();
            let slowest = took.iter().max().copied().unwrap_or_default();
            eprintln!(
                "decision/engine_threads: {t} thread(s) x {n} decisions, per decision {} ({:.0} decisions/s in all, round {round})",
                each.join(" / "),
                (t as u64 * n) as f64 / slowest.as_secs_f64()
            );
            per.entry(t)
                .or_default()
                .extend(took.iter().map(|d| *d / n.max(1) as u32));
        }
    }
    for (t, mut d) in per {
        d.sort();
        eprintln!(
            "decision/engine_threads: {t} thread(s): median {:?} per decision per thread, of {}",
            d[d.len() / 2],
            d.len()
        );
    }
}

/// A warmed store, its stream, and an engine over the same store; replaced
/// by a fresh one every `EPOCH` recharges.
struct Epoch {
    p: Pipeline,
    traffic: Traffic,
    engine: Engine,
    left: u64,
    /// Time spent deciding in this epoch so far.
    spent: Duration,
}

impl Setup {
    fn epoch(&self) -> Epoch {
        let (p, traffic) = self.warmed();
        let engine = Engine::new(
            self.pack.clone(),
            Store::Memory(p.store.clone()),
            self.geo.clone(),
            None,
        );
        Epoch {
            p,
            traffic,
            engine,
            left: EPOCH,
            spent: Duration::ZERO,
        }
    }
}

#[derive(Clone, Copy)]
enum How<'a> {
    /// The mirrored pipeline with these rules.
    Pipeline(Rules),
    /// `Engine::evaluate`, one `block_on` per batch of 256.
    Engine(&'a tokio::runtime::Runtime),
}

/// Times `iters` recharges, starting a fresh epoch (untimed) whenever the
/// current one is used up, so every measurement sees the same sequence of
/// store states whatever the iteration count.
fn measure(setup: &Setup, state: &mut Option<Epoch>, iters: u64, how: How) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        if state.as_ref().is_none_or(|e| e.left == 0) {
            if let Some(old) = state.take() {
                report_store(&old);
            }
            *state = Some(setup.epoch());
        }
        let Some(Epoch {
            p,
            traffic,
            engine,
            left: epoch_left,
            spent,
        }) = state.as_mut()
        else {
            unreachable!("an epoch was just made");
        };
        let n = left.min(*epoch_left);
        let p = &*p;
        let engine = &*engine;
        let took = match how {
            How::Pipeline(rules) => timed(
                traffic,
                n,
                |event| p.apply(event, rules),
                |now| p.sweep(now),
                |batch, out| out.extend(batch.drain(..).map(|r| p.evaluate(r, rules))),
            ),
            How::Engine(rt) => timed(
                traffic,
                n,
                // Logins, outcomes, sweeps: the engine's store, untimed.
                |event| p.apply(event, Rules::Rhai),
                |now| p.sweep(now),
                |batch, out| {
                    rt.block_on(async {
                        for r in batch.drain(..) {
                            let evaluated = engine.evaluate(r).await.expect("a fresh id");
                            out.push(evaluated.decision);
                        }
                    })
                },
            ),
        };
        total += took;
        *spent += took;
        *epoch_left -= n;
        left -= n;
    }
    total
}

fn pipelines(c: &mut Criterion, setup: &Setup) {
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    for (name, how) in [
        ("shipped_pack", How::Pipeline(Rules::Rhai)),
        ("native_baseline", How::Pipeline(Rules::Native)),
        ("engine_evaluate", How::Engine(&rt)),
        (
            "shipped_pack_rule_by_rule",
            How::Pipeline(Rules::RhaiRuleByRule),
        ),
    ] {
        // The first epoch is made here, not in criterion's warm-up: its
        // untimed warming takes about a second of wall clock, which
        // criterion's warm-up counts, so it used to plan 100 iterations in
        // all (one decision per sample) for some of these benches.
        let mut state = Some(setup.epoch());
        g.bench_function(name, |b| {
            b.iter_custom(|iters| measure(setup, &mut state, iters, how));
        });
    }
    g.finish();
}

/// What an epoch left behind: the store's size, and the process's memory.
fn report_store(e: &Epoch) {
    if std::env::var_os("RISKGATE_BENCH_VERBOSE").is_none() {
        return;
    }
    let stats = e.p.store.stats();
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .unwrap_or_default();
    eprintln!(
        "epoch done: {:.2?} per decision; {} recharges generated; store: {} window keys, {} profiles, {} idempotency records, {} swept or evicted; RSS {rss} kB",
        e.spent / EPOCH as u32,
        e.traffic.recharges(),
        stats.window_keys,
        stats.profiles,
        stats.idempotency_records,
        stats.evicted
    );
}

/// Runs `run` over the contexts round robin, `iters` times, timing only the
/// calls (outputs are dropped untimed).
fn over_ctxs<V>(
    ctxs: &[Ctx],
    at: &mut usize,
    iters: u64,
    mut run: impl FnMut(&Ctx) -> V,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut out = Vec::with_capacity(256);
    let mut left = iters;
    while left > 0 {
        let n = left.min(256);
        let start = Instant::now();
        counted(|| {
            for _ in 0..n {
                out.push(run(&ctxs[*at]));
                *at = (*at + 1) % ctxs.len();
            }
        });
        total += start.elapsed();
        black_box(&out);
        out.clear();
        left -= n;
    }
    total
}

fn rules_only(c: &mut Criterion, setup: &Setup) {
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));
    let ctxs = &setup.checked.ctxs;
    let mut at = 0;
    g.bench_function("rules_only_rhai", |b| {
        b.iter_custom(|iters| over_ctxs(ctxs, &mut at, iters, |ctx| setup.pack.run(ctx)));
    });
    g.bench_function("rules_only_rhai_rule_by_rule", |b| {
        b.iter_custom(|iters| {
            over_ctxs(ctxs, &mut at, iters, |ctx| setup.pack.run_rule_by_rule(ctx))
        });
    });
    let native = &setup.native;
    g.bench_function("rules_only_native", |b| {
        b.iter_custom(|iters| over_ctxs(ctxs, &mut at, iters, |ctx| native.run(ctx)));
    });
    g.finish();
}

fn rhai_rules(c: &mut Criterion, setup: &Setup) {
    let mut g = c.benchmark_group("rhai_rule");
    g.throughput(Throughput::Elements(1));
    let ctxs = &setup.checked.ctxs;
    let mut at = 0;
    let mut packs: Vec<(String, tempfile::TempDir)> = Vec::new();
    let empty =
        |i: usize| format!("[[rules]]\nid = \"empty{i}\"\nfile = \"empty.rhai\"\nscore = 1\n\n");
    let empty_script = vec![("empty.rhai", "// an empty rule\n".to_string())];
    for (name, n) in [("empty_x1", 1), ("empty_x13", 13)] {
        let dir = tempfile::tempdir().expect("a temp dir");
        let tables: String = (0..n).map(empty).collect();
        write_pack(dir.path(), &tables, &empty_script);
        packs.push((name.to_string(), dir));
    }
    // Synthetic one-rule packs: the cost of one kind of access, or of a hit.
    let x10 = |line: &str| line.repeat(10);
    let synthetic = [
        ("read_window_x10", x10("if window.user_chargebacks_30d > 999 {}\n")),
        ("read_param_x10", x10("if param.burst_large_orders > 999 {}\n")),
        ("read_list_x10", x10("if list.user_block {}\n")),
        ("read_getter_x10", x10("if profile.located_events > 999 {}\n")),
        ("read_request_x10", x10("if request.amount > 999999999 {}\n")),
        ("hit_static", "block(\"X_Y\", \"A fixed message.\")\n".to_string()),
        (
            "hit_template",
            "challenge(\"X_Y\", `The same ${yuan(request.amount)} yuan top-up for ${request.target}.`).ask(\"sms\")\n"
                .to_string(),
        ),
    ];
    for (name, script) in synthetic {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = format!("{name}.rhai");
        let table = format!("[[rules]]\nid = \"{name}\"\nfile = \"{file}\"\nscore = 1\n");
        write_pack(dir.path(), &table, &[(file.as_str(), script)]);
        packs.push((name.to_string(), dir));
    }
    for rule in shipped_rule_tables(&setup.pack) {
        let dir = tempfile::tempdir().expect("a temp dir");
        write_pack(
            dir.path(),
            &rule.table,
            &[(rule.file.as_str(), rule.script)],
        );
        packs.push((rule.id, dir));
    }
    for (name, dir) in &packs {
        let mut pack = None;
        g.bench_function(name.as_str(), |b| {
            let pack: &Pack = pack
                .get_or_insert_with(|| Pack::load(dir.path()).unwrap_or_else(|e| panic!("{e}")));
            b.iter_custom(|iters| over_ctxs(ctxs, &mut at, iters, |ctx| pack.run(ctx)));
        });
    }
    g.finish();
}
