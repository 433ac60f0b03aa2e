//! The `riskgate` command: a thin layer over the library.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use riskgate::config::Config;

/// mimalloc, not the system allocator: a decision makes a few dozen small,
/// short-lived allocations, and glibc's malloc (its free-list consolidation
/// above all) cost about a third of a decision in the benches. Measured in
/// BENCHMARKS.md, memory per user included. Called as `alloc/` explains.
#[global_allocator]
static ALLOC: riskgate_alloc::MiMalloc = riskgate_alloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "riskgate",
    version,
    about = "Real-time risk control for recharge platforms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the RiskEngine gRPC API.
    Serve {
        /// Address to listen on [default: 127.0.0.1:50051].
        #[arg(long, env = "RISKGATE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Rule pack folder [default: ./rules].
        #[arg(long, env = "RISKGATE_RULES")]
        rules: Option<PathBuf>,
        /// IP location database (.mmdb or .csv) [default: geo/demo.csv].
        #[arg(long, env = "RISKGATE_GEO")]
        geo: Option<PathBuf>,
        /// TOML config file; flags and environment variables override it.
        #[arg(long, env = "RISKGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Serve the RuleAdmin service on this address [default: off].
        #[arg(long, env = "RISKGATE_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Bearer token the RuleAdmin service requires.
        #[arg(long, env = "RISKGATE_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Write every decision, login and outcome as JSON lines to this file.
        #[arg(long, env = "RISKGATE_DECISION_LOG")]
        decision_log: Option<PathBuf>,
        /// Do not reload the pack when its folder changes (SIGHUP and the admin call still do).
        #[arg(long)]
        no_watch: bool,
        /// Benchmark floor: the same service answering ALLOW, with no rules and no state.
        #[arg(long)]
        baseline: bool,
        /// Where state lives: `memory` or `redis://host:port/db` [default: memory].
        #[arg(long, env = "RISKGATE_STATE")]
        state: Option<String>,
        /// Redis: how long a request waits for state before on_state_unavailable decides [default: 5ms].
        #[arg(long, env = "RISKGATE_STATE_TIMEOUT")]
        state_timeout: Option<String>,
        /// In-memory state: snapshot file, loaded at start and written periodically and at shutdown.
        #[arg(long, env = "RISKGATE_SNAPSHOT")]
        snapshot: Option<PathBuf>,
        /// How often the snapshot is written, e.g. 60s [default: 60s].
        #[arg(long)]
        snapshot_interval: Option<String>,
        /// Start empty when the snapshot is corrupt or incompatible, instead of refusing to start.
        #[arg(long)]
        discard_bad_snapshot: bool,
        /// Memory to fault in before serving and keep, e.g. 1GiB [default: 0, off].
        #[arg(long, env = "RISKGATE_PRETOUCH")]
        pretouch: Option<String>,
    },
    /// Load and compile a rule pack as the server would; report every problem.
    Check {
        /// Rule pack folder.
        #[arg(default_value = "rules")]
        pack: PathBuf,
    },
    /// Backtest a candidate pack on a decision log.
    Replay {
        /// Decision log file(s) (repeat for rotated files).
        #[arg(long = "log", required = true)]
        logs: Vec<PathBuf>,
        /// The candidate pack.
        #[arg(long)]
        pack: PathBuf,
        /// A baseline pack [default: the decisions recorded in the log].
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// IP location database [default: geo/demo.csv].
        #[arg(long, env = "RISKGATE_GEO")]
        geo: Option<PathBuf>,
        /// How many changed requests to list.
        #[arg(long, default_value_t = 20)]
        show: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a rule pack's scenario tests (PACK/tests/*.toml).
    Test {
        /// Rule pack folder.
        #[arg(default_value = "rules")]
        pack: PathBuf,
        /// IP location database [default: geo/demo.csv].
        #[arg(long, env = "RISKGATE_GEO")]
        geo: Option<PathBuf>,
        /// Run them on a Redis (redis://host:port/db) instead of in memory,
        /// each scenario under its own key prefix.
        #[arg(long)]
        state: Option<String>,
    },
    /// Drive Evaluate over gRPC with a realistic traffic mix and report latency percentiles.
    Loadgen(riskgate::loadgen::Args),
}

fn main() -> ExitCode {
    // First: what was allocated before main is all the process faults in
    // huge pages (a page or two).
    let thp_refused = riskgate::runtime::huge_pages(false);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = thp_refused {
        tracing::warn!(error = %e, "cannot refuse transparent huge pages");
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            rules,
            geo,
            config,
            admin_listen,
            admin_token,
            decision_log,
            no_watch,
            baseline,
            state,
            state_timeout,
            snapshot,
            snapshot_interval,
            discard_bad_snapshot,
            pretouch,
        } => {
            let mut cfg = match config.as_deref().map(Config::from_file).transpose() {
                Ok(c) => c.unwrap_or_default(),
                Err(e) => return fail(e),
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(r) = rules {
                cfg.rules = r;
            }
            if geo.is_some() {
                cfg.geo = geo;
            }
            if admin_listen.is_some() {
                cfg.admin_listen = admin_listen;
            }
            if admin_token.is_some() {
                cfg.admin_token = admin_token;
            }
            if decision_log.is_some() {
                cfg.decision_log = decision_log;
            }
            if no_watch {
                cfg.watch_rules = false;
            }
            if let Some(s) = state {
                cfg.state = s;
            }
            if let Some(t) = state_timeout {
                cfg.state_timeout = t;
            }
            if snapshot.is_some() {
                cfg.snapshot = snapshot;
            }
            if let Some(every) = snapshot_interval {
                cfg.snapshot_interval = every;
            }
            if discard_bad_snapshot {
                cfg.discard_bad_snapshot = true;
            }
            if let Some(p) = pretouch {
                cfg.pretouch = p;
            }
            // Checked here too, before a pretouch spends seconds on a start
            // that a bad setting would refuse anyway.
            if let Err(e) = cfg.check() {
                return fail(e);
            }
            match cfg.pretouch_bytes() {
                Ok(0) => {}
                Ok(bytes) => {
                    if let Err(e) = pretouch_memory(bytes) {
                        return fail(e);
                    }
                }
                Err(e) => return fail(e),
            }
            if !riskgate::runtime::LIFO_SLOT_OFF {
                tracing::warn!(
                    "built without --cfg tokio_unstable (a RUSTFLAGS variable replaces \
                     .cargo/config.toml's flags): the runtime keeps its LIFO slot, and each \
                     response is written on its own, a slower server"
                );
            }
            let runtime = match riskgate::runtime::multi_thread() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            // The signal handlers need the runtime: install them inside it.
            let serve = async {
                let stop = riskgate::server::shutdown_signal();
                if baseline {
                    riskgate::server::run_baseline(cfg, stop).await
                } else {
                    riskgate::server::run(cfg, stop).await
                }
            };
            match runtime.block_on(serve) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Test { pack, geo, state } => {
            let fresh = match state {
                Some(url) => riskgate::scenario::Fresh::Redis(url),
                None => riskgate::scenario::Fresh::Memory,
            };
            test_pack(&pack, geo.as_deref(), &fresh)
        }
        Command::Replay {
            logs,
            pack,
            baseline,
            geo,
            show,
            json,
        } => {
            let options = riskgate::replay::Options {
                logs,
                pack,
                baseline,
                show,
            };
            replay(&options, geo.as_deref(), json)
        }
        Command::Loadgen(args) => match riskgate::runtime::multi_thread() {
            Ok(rt) => rt.block_on(riskgate::loadgen::main(args)),
            Err(e) => fail(e),
        },
        Command::Check { pack } => match riskgate::pack::Pack::load(&pack) {
            Ok(p) => {
                println!(
                    "{}: ok, version {}, {} rules, {} windows, {} lists",
                    pack.display(),
                    p.version,
                    p.rules.len(),
                    p.plan.windows.len(),
                    p.lists.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                for problem in &e.problems {
                    println!("{problem}");
                }
                println!("{} problem(s)", e.problems.len());
                ExitCode::FAILURE
            }
        },
    }
}

fn test_pack(
    dir: &std::path::Path,
    geo: Option<&std::path::Path>,
    fresh: &riskgate::scenario::Fresh,
) -> ExitCode {
    let pack = match riskgate::pack::Pack::load(dir) {
        Ok(p) => std::sync::Arc::new(p),
        Err(e) => {
            for problem in &e.problems {
                println!("{problem}");
            }
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    };
    let (geo, runtime) = match offline(geo) {
        Ok(both) => both,
        Err(code) => return code,
    };
    let outcomes = runtime.block_on(riskgate::scenario::run_all_on(&pack, &geo, fresh));
    if outcomes.is_empty() {
        println!(
            "{}: no scenarios in {}",
            dir.display(),
            dir.join("tests").display()
        );
        return ExitCode::FAILURE;
    }
    match riskgate::scenario::report(&outcomes, &mut std::io::stdout()) {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// What the offline commands (test, replay) need: the geo database and a
/// single-threaded runtime (they decide one event after another).
fn offline(
    geo: Option<&std::path::Path>,
) -> Result<(riskgate::geo::GeoDb, tokio::runtime::Runtime), ExitCode> {
    let geo = riskgate::server::open_geo(geo).map_err(fail)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(fail)?;
    Ok((geo, runtime))
}

fn replay(
    options: &riskgate::replay::Options,
    geo: Option<&std::path::Path>,
    json: bool,
) -> ExitCode {
    let (geo, runtime) = match offline(geo) {
        Ok(both) => both,
        Err(code) => return code,
    };
    match runtime.block_on(riskgate::replay::run(options, &geo)) {
        Ok(summary) if json => match serde_json::to_string_pretty(&summary) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Ok(summary) => {
            print!("{}", summary.render());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Faults in `bytes` of memory and hands it back to the allocator, which
/// keeps it: the store then grows into memory that is already there, with
/// no page fault on the request path (`pretouch` in the config). Refuses
/// more than the machine has available, which would only end in the OOM
/// killer.
fn pretouch_memory(bytes: u64) -> Result<(), String> {
    if let Some(available) = available_memory() {
        if bytes > available {
            return Err(format!(
                "pretouch: {} MiB is more than the {} MiB available to this process",
                bytes >> 20,
                available >> 20
            ));
        }
    }
    let started = std::time::Instant::now();
    riskgate_alloc::keep_freed_memory();
    // Faulted in now, huge pages stall nothing: they map the store in a
    // 512th of the TLB entries that small pages take, where nearly every
    // lookup in a big store is a TLB miss. Granted for the touch only.
    if let Err(e) = riskgate::runtime::huge_pages(true) {
        tracing::warn!(error = %e, "cannot grant transparent huge pages");
    }
    // In blocks the allocator takes from its arenas and returns to them when
    // freed, for any size of allocation to reuse. A byte a page faults the
    // page in; not a zero, which fresh memory already reads as (a zeroed
    // allocation may skip writing it), and `black_box` keeps the writes.
    const BLOCK: usize = 1 << 20;
    const PAGE: usize = 4096;
    let blocks = usize::try_from(bytes.div_ceil(BLOCK as u64)).map_err(|e| e.to_string())?;
    let mut touched = Vec::with_capacity(blocks);
    for _ in 0..blocks {
        let mut block = Vec::<u8>::with_capacity(BLOCK);
        for byte in block.spare_capacity_mut().iter_mut().step_by(PAGE) {
            byte.write(1);
        }
        touched.push(std::hint::black_box(block));
    }
    drop(touched);
    // Past the pretouched size the store grows into small pages again: a
    // huge one would be zeroed (and memory compacted to find it) on the
    // core serving requests. The huge pages mapped above stay.
    if let Err(e) = riskgate::runtime::huge_pages(false) {
        tracing::warn!(error = %e, "cannot refuse transparent huge pages");
    }
    tracing::info!(
        mib = bytes >> 20,
        took_ms = started.elapsed().as_millis() as u64,
        "memory pretouched"
    );
    Ok(())
}

/// Memory this process may still take, in bytes: `MemAvailable` from
/// /proc/meminfo, or less where a container's cgroup (v2) limit leaves less
/// (None off Linux).
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let cgroup = |file: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{file}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    // "max" (no limit) does not parse, and leaves the machine's figure.
    let left_in_cgroup = cgroup("memory.max")
        .zip(cgroup("memory.current"))
        .map(|(max, current)| max.saturating_sub(current));
    Some(left_in_cgroup.map_or(kib << 10, |left| left.min(kib << 10)))
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("riskgate: {e}");
    ExitCode::FAILURE
}
