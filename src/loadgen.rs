//! `riskgate loadgen`: drives `Evaluate` over gRPC with a realistic traffic
//! mix and reports throughput, the decision mix and latency percentiles.
//!
//! Two ways to load a server, because they answer different questions:
//!
//! - **Closed loop** (default): `--connections` HTTP/2 connections, each with
//!   `--streams` workers that send the next request when the previous answer
//!   arrives. It finds the throughput ceiling, but a stalled server also
//!   stalls the load, so the stall shows up in one sample per worker.
//! - **Open loop** (`--rate`): requests leave on a fixed schedule whatever the
//!   server does, as real users' do, and latency is measured from the
//!   *intended* send time. A 200 ms stall then counts against every request
//!   that should have gone out during it: no coordinated omission. Sends more
//!   than 1 ms behind schedule are counted as `late`: the client's own share.
//!   Each request leaves at its own due time, not in the millisecond bursts
//!   that tokio's timer would make of the schedule (see [`Pacing`]).
//!
//! The open loop runs on sender threads of its own, one per available core
//! (as many as `taskset` allows) up to one per connection, each a
//! single-threaded runtime that owns its connections, their HTTP/2 tasks and
//! its share of `--max-in-flight`, and drives its requests from one scheduler
//! task without a task per request. On tokio's shared work-stealing runtime,
//! with a task per request, the sender needed twice the CPU, and once it fell
//! behind (busy neighbours on its cores, or 140k/s on 7 cores) it spiralled:
//! tens of milliseconds of stalls, thousands of late sends, and a rate below
//! the target though the server had room.
//!
//! The mix is built against the shipped pack and `geo/demo.csv` so the rules
//! really fire: bursts hit BURST_FREQUENCY, unverified large amounts
//! REAL_NAME_REQUIRED, resubmissions DUPLICATE_SUSPECTED, travellers
//! LOCATION_UNUSUAL. On the hot path every worker owns its histogram and
//! counters (merged at the end); the progress line reads relaxed atomics.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::IsTerminal;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::pb;
use crate::pb::risk_engine_client::RiskEngineClient;

/// Drive Evaluate over gRPC with a realistic traffic mix and report latency percentiles.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Server address: http://host:port, or host:port (plaintext gRPC).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Share of regular users: 10-300 yuan from their own device and home address.
    #[arg(long, value_name = "SHARE", default_value_t = 70)]
    pub regular: u32,
    /// Share of bursts: one user firing 6-8 orders of 500-2,000 yuan back to back.
    #[arg(long, value_name = "SHARE", default_value_t = 5)]
    pub burst: u32,
    /// Share of travellers: three orders at home, then alternating between two far cities.
    #[arg(long, value_name = "SHARE", default_value_t = 5)]
    pub traveller: u32,
    /// Share of duplicates: the last regular order again (user, target, amount), new id, other channel.
    #[arg(long, value_name = "SHARE", default_value_t = 5)]
    pub duplicate: u32,
    /// Share of unverified (no real name) accounts paying 3,000-6,000 yuan.
    #[arg(long, value_name = "SHARE", default_value_t = 5)]
    pub unverified_large: u32,
    /// Share of known users on a never-seen device id.
    #[arg(long, value_name = "SHARE", default_value_t = 10)]
    pub new_device: u32,
    /// Size of the user population. Windows are per user: with few users a long
    /// run drifts into daily-limit and duplicate challenges; raise it, or use --dry-run.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub users: u64,
    /// Seed of the traffic generator: the same seed draws the same sequence of users
    /// and orders (ids are fresh each run, so runs against one server do not mix).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Name of the user population (users, their devices and game accounts):
    /// runs with the same name send as the same users, so a first run can warm a
    /// store that a second one measures. Default: a fresh population each run.
    /// Up to 16 letters, digits, '-' or '_'; request ids stay fresh either way.
    #[arg(long, value_name = "NAME")]
    pub population: Option<String>,
    /// HTTP/2 connections to open (open loop: spread over one sender thread per core).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub connections: usize,
    /// Closed loop: concurrent requests per connection, each sent when the previous answer arrives.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub streams: usize,
    /// Open loop: requests per second in total, sent on schedule whatever the server does.
    #[arg(long, value_name = "RPS")]
    pub rate: Option<f64>,
    /// Open loop: exact sends each request at its due time (the sender keeps its
    /// core busy); tick sends what falls due in 1 ms bursts, as tokio's timer ticks.
    #[arg(long, value_enum, default_value_t = Pacing::Exact)]
    pub pacing: Pacing,
    /// Measured time, e.g. 30s, 2m, 500ms [default: 10s unless --requests is given].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many measured requests.
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,
    /// Unmeasured time first, so connections, caches and the allocator settle.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Deadline of each request.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    pub timeout: Duration,
    /// Open loop: most requests in flight (shared out among the sender threads);
    /// a send waiting for room is late, and counted.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Set dry_run on every request, so a long run does not fill the server's state
    /// (windows then see only the request itself: bursts and duplicates no longer fire).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("--addr {addr:?}: {reason}")]
    BadAddr { addr: String, reason: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{0}")]
    BadArgs(String),
    #[error("cannot run a sender thread: {0}")]
    Thread(String),
}

/// The outcome of a run (`--json`); its field names are stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub mode: Mode,
    pub addr: String,
    /// Open loop: the target rate; null in closed loop.
    pub rate: Option<f64>,
    /// Open loop: how sends kept to the schedule; null in closed loop (and
    /// absent from reports older than the field, which were tick-paced).
    #[serde(default)]
    pub pacing: Option<Pacing>,
    pub connections: usize,
    /// Closed loop: workers per connection; 0 in open loop.
    pub streams: usize,
    pub seed: u64,
    /// `--population`: null when the run drew a fresh one.
    #[serde(default)]
    pub population: Option<String>,
    /// Measured requests, answered or failed.
    pub requests: u64,
    pub errors: u64,
    /// Failures by gRPC code (UPPER_SNAKE name).
    pub errors_by_code: BTreeMap<String, u64>,
    /// From the end of the warm-up to the last measured answer.
    pub duration_s: f64,
    /// Measured requests per second of `duration_s`: what the server kept up
    /// with, which in an overloaded open loop is below `rate`.
    pub rps: f64,
    /// Open loop: sends more than 1 ms behind their intended time.
    pub late: u64,
    pub mix: Mix,
    /// Enforcing reason codes over all decisions (a decision may carry several).
    pub reasons: BTreeMap<String, u64>,
    pub latency_us: Latency,
}

/// How an open loop's sender keeps to its schedule.
///
/// tokio's timer ticks in milliseconds, so a sender that sleeps on it wakes
/// once a millisecond and sends what fell due meanwhile in one go: bursts of
/// rate/1000 requests (shared among the sender threads), which queue behind
/// each other on the server. At
/// 29,000/s that is 29 requests at once, and the last of them waits for the
/// other 28 to be served: the measured latency is then mostly the server's
/// time per request times the burst, not what a request meets when traffic
/// arrives spread out, as many independent callers' does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pacing {
    /// Each request leaves at its own due time: within 2 ms of it, the
    /// sender polls its connections and checks the clock instead of
    /// sleeping, so its thread keeps its core busy.
    #[default]
    Exact,
    /// The sender sleeps on tokio's 1 ms timer and sends everything due by
    /// the next tick at once (each request timed from when it really left).
    Tick,
}

impl std::fmt::Display for Pacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pacing::Exact => "exact",
            Pacing::Tick => "tick",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Closed,
    Open,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mix {
    pub allow: u64,
    pub challenge: u64,
    pub block: u64,
}

/// Microseconds, answered and failed requests alike (a timeout is latency too).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// Runs the load described by `args` and returns its report; progress goes to stderr.
pub async fn run(args: &Args) -> Result<Report, LoadgenError> {
    run_until(args, Arc::new(AtomicBool::new(false))).await
}

/// The `riskgate loadgen` command: run, print, and fail when nothing got through.
pub async fn main(args: Args) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Ctrl-C ends the run early and still reports what was measured.
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Relaxed);
        }
    });
    let result = run_until(&args, stop).await;
    ctrl_c.abort();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("riskgate loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let table = table(&report);
    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
    if args.json {
        eprint!("{table}");
        println!("{json}");
    } else {
        print!("{table}");
    }
    if let Some(path) = &args.json_out {
        if let Err(e) = std::fs::write(path, format!("{json}\n")) {
            eprintln!("riskgate loadgen: --json-out {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.requests == 0 || report.errors == report.requests {
        eprintln!("riskgate loadgen: no request succeeded");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// "10s", "1.5s", "500ms", "2m", "1h"; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{s:?}: unknown unit (use ms, s, m or h)")),
    };
    match num.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 && n * scale < 1e9 => {
            Ok(Duration::from_secs_f64(n * scale))
        }
        _ => Err(format!("{s:?} is not a duration like 10s, 500ms or 2m")),
    }
}

/// Measured time when neither --duration nor --requests is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// The lowest open-loop rate (one request in 1,000 s): a schedule's send
/// times stay far inside what a `Duration` holds.
const MIN_RATE: f64 = 0.001;

/// The longest latency recorded (an hour); a longer one counts as this. An
/// overloaded open loop's latency, timed from the intended send, grows with
/// the run's length, so the bound is far above any run's.
const MAX_US: u64 = 3_600_000_000;
const LATE: Duration = Duration::from_millis(1);
/// The resolution of tokio's timer.
const TICK: Duration = Duration::from_millis(1);
/// Exact pacing: how long before a send the sender stops sleeping and polls
/// instead. Two ticks: a deadline rounded up by one still wakes it early.
const SPIN: Duration = Duration::from_millis(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// gRPC status names by code, then one slot for answers with no known action.
#[rustfmt::skip]
const CODES: [&str; 18] = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED", "UNSPECIFIED_ACTION",
];

/// What every worker shares: the schedule, the stop conditions, progress.
struct Plan {
    start: Instant,
    measure_start: Instant,
    end: Option<Instant>,
    limit: Option<u64>,
    claimed: AtomicU64,
    stop: Arc<AtomicBool>,
    progress: Progress,
    rate: f64,
    pacing: Pacing,
    connections: u64,
    /// Open loop: send `g` leaves at start + g / rate; [warmup_index, stop_index) are measured.
    warmup_index: u64,
    stop_index: u64,
}

impl Plan {
    /// The clock starts now: call it once the connections are up.
    fn new(args: &Args, stop: Arc<AtomicBool>, shards: usize) -> Plan {
        let duration = args
            .duration
            .or(args.requests.is_none().then_some(DEFAULT_DURATION));
        let rate = args.rate.unwrap_or(0.0);
        let warmup_index = (args.warmup.as_secs_f64() * rate).ceil() as u64;
        let measured = duration.map_or(u64::MAX, |d| (d.as_secs_f64() * rate).round() as u64);
        let start = Instant::now();
        let measure_start = start + args.warmup;
        Plan {
            start,
            measure_start,
            end: duration.map(|d| measure_start + d),
            limit: args.requests,
            claimed: AtomicU64::new(0),
            stop,
            progress: Progress::new(shards),
            rate,
            pacing: args.pacing,
            connections: args.connections as u64,
            warmup_index,
            stop_index: warmup_index
                .saturating_add(measured.min(args.requests.unwrap_or(u64::MAX))),
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// Open loop: when send `g` is due.
    fn due(&self, g: u64) -> Instant {
        self.start + Duration::from_secs_f64(g as f64 / self.rate)
    }
}

async fn run_until(args: &Args, stop: Arc<AtomicBool>) -> Result<Report, LoadgenError> {
    let bad = |m: &str| Err(LoadgenError::BadArgs(m.to_string()));
    let mix = [
        args.regular,
        args.burst,
        args.traveller,
        args.duplicate,
        args.unverified_large,
        args.new_device,
    ];
    if mix.iter().all(|&s| s == 0) {
        return bad(
            "every traffic share is 0: give at least one of --regular, --burst, ... a share",
        );
    }
    if args.users == 0 || args.connections == 0 || args.streams == 0 || args.max_in_flight == 0 {
        return bad("--users, --connections, --streams and --max-in-flight must be at least 1");
    }
    if args.requests == Some(0) || args.duration == Some(Duration::ZERO) || args.timeout.is_zero() {
        return bad("--requests, --duration and --timeout must be more than 0");
    }
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate >= MIN_RATE) {
            return bad("--rate must be a number of requests per second, at least 0.001");
        }
        let duration = args
            .duration
            .or(args.requests.is_none().then_some(DEFAULT_DURATION));
        if duration.is_some_and(|d| (d.as_secs_f64() * rate).round() < 1.0) {
            return bad("--rate over --duration measures no request: raise one of them");
        }
    }
    if let Some(name) = &args.population {
        let fits = (1..=16).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !fits {
            return bad("--population must be 1 to 16 letters, digits, '-' or '_'");
        }
    }
    let (addr, endpoint) = endpoint(&args.addr, args.timeout)?;
    let run_id = format!(
        "{:08x}",
        Rng(args.seed ^ crate::now_ms() as u64).next() as u32
    );
    let (total, plan) = if args.rate.is_some() {
        open_loop(args, &addr, &endpoint, &run_id, stop).await?
    } else {
        closed_loop(args, &addr, &endpoint, &run_id, stop).await?
    };
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    Ok(total.report(args, addr, plan.measure_start))
}

/// Starts the clock and the progress line, once the connections are up.
fn begin(args: &Args, stop: Arc<AtomicBool>, shards: usize) -> (Arc<Plan>, AbortOnDrop) {
    let plan = Arc::new(Plan::new(args, stop, shards));
    if !args.warmup.is_zero() {
        eprintln!("riskgate loadgen: warming up for {:?}", args.warmup);
    }
    let progress = AbortOnDrop(tokio::spawn(print_progress(plan.clone())));
    (plan, progress)
}

/// Stops the progress line however the run ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn closed_loop(
    args: &Args,
    addr: &str,
    endpoint: &Endpoint,
    run_id: &str,
    stop: Arc<AtomicBool>,
) -> Result<(Tally, Arc<Plan>), LoadgenError> {
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| LoadgenError::Connect {
                addr: addr.to_string(),
                reason: error_chain(&e),
            })?;
        clients.push(RiskEngineClient::new(channel));
    }
    let (plan, _progress) = begin(args, stop, 1);
    let mut workers = JoinSet::new();
    for (c, client) in clients.into_iter().enumerate() {
        for s in 0..args.streams {
            let traffic = Traffic::new(args, run_id, c * args.streams + s);
            workers.spawn(closed_worker(client.clone(), traffic, plan.clone()));
        }
    }
    let mut total = Tally::new();
    while let Some(tally) = workers.join_next().await {
        match tally {
            Ok(t) => total.merge(t),
            Err(_) => {
                // A worker cannot panic short of a bug; count it, keep the rest.
                total.requests += 1;
                total.errors[tonic::Code::Unknown as usize] += 1;
            }
        }
    }
    Ok((total, plan))
}

/// Open loop: [`sender_threads`] threads, each with a current-thread runtime
/// of its own that connects its share of the connections (connection `c` goes
/// to thread `c % threads`), so their HTTP/2 tasks run where their requests
/// are sent and answered. The clock starts once every thread is connected.
async fn open_loop(
    args: &Args,
    addr: &str,
    endpoint: &Endpoint,
    run_id: &str,
    stop: Arc<AtomicBool>,
) -> Result<(Tally, Arc<Plan>), LoadgenError> {
    let threads = sender_threads(args);
    let (mut ready, mut go, mut done) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..threads {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let sender = Sender {
            shard: t,
            conns: (t..args.connections)
                .step_by(threads)
                .map(|c| (c as u64, Traffic::new(args, run_id, c)))
                .collect(),
            addr: addr.to_string(),
            endpoint: endpoint.clone(),
            budget: args.max_in_flight / threads + usize::from(t < args.max_in_flight % threads),
            ready: ready_tx,
            go: go_rx,
            done: done_tx,
        };
        std::thread::Builder::new()
            .name(format!("loadgen-{t}"))
            .spawn(move || sender.run())
            .map_err(|e| LoadgenError::Thread(e.to_string()))?;
        ready.push(ready_rx);
        go.push(go_tx);
        done.push(done_rx);
    }
    // On an error the `go` senders drop, and every thread ends.
    for r in ready {
        r.await
            .unwrap_or_else(|_| Err(LoadgenError::Thread("it stopped".into())))?;
    }
    let (plan, _progress) = begin(args, stop, threads);
    for g in go {
        let _ = g.send(plan.clone());
    }
    let mut total = Tally::new();
    for d in done {
        match d.await {
            Ok(t) => total.merge(t),
            // A sender cannot panic short of a bug; count it, keep the rest.
            Err(_) => {
                total.requests += 1;
                total.errors[tonic::Code::Unknown as usize] += 1;
            }
        }
    }
    Ok((total, plan))
}

/// `host:port` gets `http://`; anything but plaintext http is refused up front.
fn endpoint(addr: &str, timeout: Duration) -> Result<(String, Endpoint), LoadgenError> {
    let bad = |reason: &str| LoadgenError::BadAddr {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = addr.trim();
    let uri = if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    };
    if !uri.starts_with("http://") {
        return Err(bad(
            "only plaintext http:// is supported (riskgate serves plaintext gRPC)",
        ));
    }
    let endpoint =
        Endpoint::from_shared(uri.clone()).map_err(|e| bad(&format!("not a URI ({e})")))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(bad("no host; expected host:port or http://host:port"));
    }
    Ok((
        uri,
        endpoint
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Every request that times out resets its stream; past 1,024 such
            // resets h2 closes the connection, and an overloaded run would turn
            // its deadline errors into a cascade of failed connections.
            .http2_max_local_error_reset_streams(None),
    ))
}

/// tonic's transport error says only "transport error"; the cause is in its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

type Answer = Result<pb::Decision, tonic::Code>;

/// One call. tonic reports its own client-side deadline (`--timeout`) as
/// CANCELLED "Timeout expired"; it is a deadline, so it is counted as one.
async fn evaluate(client: &mut RiskEngineClient<Channel>, req: pb::EvaluateRequest) -> Answer {
    match client.evaluate(req).await {
        Ok(reply) => Ok(reply.into_inner()),
        Err(s) if s.code() == tonic::Code::Cancelled && s.message() == "Timeout expired" => {
            Err(tonic::Code::DeadlineExceeded)
        }
        Err(s) => Err(s.code()),
    }
}

/// Closed loop: one request at a time, the next as soon as the answer is in.
async fn closed_worker(
    mut client: RiskEngineClient<Channel>,
    mut traffic: Traffic,
    plan: Arc<Plan>,
) -> Tally {
    let mut tally = Tally::new();
    while Instant::now() < plan.measure_start && !plan.stopped() {
        let _ = evaluate(&mut client, traffic.next()).await;
    }
    loop {
        if plan.stopped() || plan.end.is_some_and(|end| Instant::now() >= end) {
            break;
        }
        if plan
            .limit
            .is_some_and(|n| plan.claimed.fetch_add(1, Relaxed) >= n)
        {
            break;
        }
        let req = traffic.next();
        let sent = Instant::now();
        let answer = evaluate(&mut client, req).await;
        let done = Instant::now();
        tally.record(done - sent, done, answer, plan.progress.shard(0));
    }
    tally
}

/// Open loop: how many sender threads, each with its own single-threaded
/// runtime. One per available core (taskset is honoured), no more than there
/// are connections or in-flight slots.
fn sender_threads(args: &Args) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(args.connections).min(args.max_in_flight).max(1)
}

/// One sender thread's share of an open loop, handed over before it starts.
struct Sender {
    /// Its index, which is also its progress shard.
    shard: usize,
    /// Its connections (`c % threads == shard`) and their traffic generators.
    conns: Vec<(u64, Traffic)>,
    addr: String,
    endpoint: Endpoint,
    /// Its share of `--max-in-flight`.
    budget: usize,
    ready: tokio::sync::oneshot::Sender<Result<(), LoadgenError>>,
    go: tokio::sync::oneshot::Receiver<Arc<Plan>>,
    done: tokio::sync::oneshot::Sender<Tally>,
}

impl Sender {
    /// The thread's body: a current-thread runtime that connects, reports
    /// ready, waits for the plan, runs the schedule and hands back its tally.
    fn run(self) {
        let Sender {
            shard,
            conns,
            addr,
            endpoint,
            budget,
            ready,
            go,
            done,
        } = self;
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(LoadgenError::Thread(format!("no runtime: {e}"))));
                return;
            }
        };
        let tally = runtime.block_on(async move {
            let mut clients = Vec::with_capacity(conns.len());
            for (index, traffic) in conns {
                match endpoint.connect().await {
                    Ok(channel) => clients.push(Conn {
                        index,
                        client: RiskEngineClient::new(channel),
                        traffic,
                    }),
                    Err(e) => {
                        let reason = error_chain(&e);
                        let _ = ready.send(Err(LoadgenError::Connect { addr, reason }));
                        return None;
                    }
                }
            }
            let _ = ready.send(Ok(()));
            let plan = go.await.ok()?;
            Some(open_sender(shard, clients, plan, budget).await)
        });
        if let Some(tally) = tally {
            let _ = done.send(tally);
        }
    }
}

struct Conn {
    index: u64,
    client: RiskEngineClient<Channel>,
    traffic: Traffic,
}

/// Sends a scheduler makes before it yields, so that the HTTP/2 tasks on its
/// thread write them out (and read answers) before it prepares more. With one
/// client core at 20k/s and tick pacing (the only pacing then), p50 was
/// 315 us with batches of 4, 482 us with 8, 626 us with 16 and 731 us with
/// 32; batches of 4 made more sends late.
const BURST: usize = 8;

type Call = Pin<Box<dyn Future<Output = Answer>>>;

/// One request on its way.
struct Flight {
    call: Call,
    due: Instant,
    sent: Instant,
    measured: bool,
}

/// The slots whose requests asked to be polled again, and the scheduler to wake.
#[derive(Default)]
struct Woken {
    slots: Mutex<Vec<usize>>,
    task: Mutex<Option<Waker>>,
}

struct SlotWaker {
    slot: usize,
    queued: AtomicBool,
    woken: Arc<Woken>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Relaxed) {
            lock(&self.woken.slots).push(self.slot);
        }
        if let Some(task) = lock(&self.woken.task).as_ref() {
            task.wake_by_ref();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The requests in flight on one sender thread, polled by its scheduler
/// itself (no task per request): a slot per request, a waker per slot.
struct Flights {
    slots: Vec<Option<Flight>>,
    wakers: Vec<(Arc<SlotWaker>, Waker)>,
    free: Vec<usize>,
    woken: Arc<Woken>,
    batch: Vec<usize>,
    len: usize,
}

impl Flights {
    fn new() -> Flights {
        Flights {
            slots: Vec::new(),
            wakers: Vec::new(),
            free: Vec::new(),
            woken: Arc::new(Woken::default()),
            batch: Vec::new(),
            len: 0,
        }
    }

    /// Adds a request; it is first polled by the next [`Flights::poll`].
    fn add(&mut self, call: Call, due: Instant, measured: bool) {
        let slot = self.free.pop().unwrap_or_else(|| {
            let slot = self.slots.len();
            self.slots.push(None);
            let w = Arc::new(SlotWaker {
                slot,
                queued: AtomicBool::new(false),
                woken: self.woken.clone(),
            });
            self.wakers.push((w.clone(), Waker::from(w)));
            slot
        });
        self.slots[slot] = Some(Flight {
            call,
            due,
            sent: Instant::now(),
            measured,
        });
        self.len += 1;
        self.wakers[slot].0.queued.store(true, Relaxed);
        lock(&self.woken.slots).push(slot);
    }

    /// Polls the requests woken since the last pass, once each (one that wakes
    /// itself again waits for the next pass, so the runtime gets its turn);
    /// records those that finished. Returns how many finished.
    fn poll(&mut self, cx: &mut Context<'_>, tally: &mut Tally, progress: &Shard) -> usize {
        {
            let mut task = lock(&self.woken.task);
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        std::mem::swap(&mut *lock(&self.woken.slots), &mut self.batch);
        let mut finished = 0;
        for &slot in &self.batch {
            let (state, waker) = &self.wakers[slot];
            state.queued.store(false, Relaxed);
            let Some(flight) = self.slots[slot].as_mut() else {
                continue;
            };
            if let Poll::Ready(answer) = flight.call.as_mut().poll(&mut Context::from_waker(waker))
            {
                let done = Instant::now();
                let f = self.slots[slot].take().expect("polled a flight");
                self.free.push(slot);
                self.len -= 1;
                finished += 1;
                if f.measured {
                    tally.record(done - f.due.min(f.sent), done, answer, progress);
                }
            }
        }
        self.batch.clear();
        finished
    }
}

/// Open loop, one sender thread: send `g` is due at `start + g / rate` and
/// goes out on connection `g % connections`; this thread sends those of its
/// own connections, in order. Each leaves when due, not when an earlier answer
/// arrives, and is timed from when it was due, so time lost in this scheduler,
/// waiting for room or in the server counts alike.
///
/// tokio's timer ticks in milliseconds and rounds deadlines up, so waiting for
/// `due` itself would add up to 1 ms to every sample. With [`Pacing::Exact`]
/// the scheduler sleeps only until [`SPIN`] before the next send, then
/// yields in a loop (the runtime polls the connections' sockets each time
/// round) until the send is due. With [`Pacing::Tick`] it wakes up to
/// [`TICK`] early and sends everything due by then; a request sent before
/// its due time is timed from its actual send. Either way latency runs from
/// the earlier of the two, never less than the server really took, never
/// hiding that the sender fell behind.
///
/// The requests are driven by this task itself ([`Flights`]), on the thread
/// that also runs their connections' HTTP/2 tasks: no task per request, no
/// work stealing, no lock or counter shared with another thread on the way.
async fn open_sender(shard: usize, mut conns: Vec<Conn>, plan: Arc<Plan>, budget: usize) -> Tally {
    let mut tally = Tally::new();
    let progress = plan.progress.shard(shard);
    let mut flights = Flights::new();
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(plan.start));
    let (mut round, mut i, mut sending) = (0u64, 0usize, true);
    // How early a send may leave: what the timer cannot resolve (Tick), or
    // nothing (Exact).
    let lead = match plan.pacing {
        Pacing::Exact => Duration::ZERO,
        Pacing::Tick => TICK,
    };
    loop {
        let mut sent = 0;
        let mut next = None;
        while sending {
            let conn = &mut conns[i];
            let g = round
                .saturating_mul(plan.connections)
                .saturating_add(conn.index);
            if g >= plan.stop_index || plan.stopped() {
                sending = false;
                break;
            }
            let due = plan.due(g);
            if due > Instant::now() + lead {
                next = Some(due - lead);
                break;
            }
            if flights.len >= budget || sent >= BURST {
                break;
            }
            let measured = g >= plan.warmup_index;
            if measured && Instant::now().saturating_duration_since(due) > LATE {
                tally.late += 1;
            }
            let req = conn.traffic.next();
            let mut client = conn.client.clone();
            flights.add(
                Box::pin(async move { evaluate(&mut client, req).await }),
                due,
                measured,
            );
            sent += 1;
            i += 1;
            if i == conns.len() {
                i = 0;
                round += 1;
            }
        }
        if !sending && flights.len == 0 {
            break;
        }
        // Exact pacing, the next send close: no timer, a turn of the runtime.
        let exact = plan.pacing == Pacing::Exact;
        let spin = exact && next.is_some_and(|at| at <= Instant::now() + SPIN);
        if let Some(at) = next.filter(|_| !spin) {
            sleep.as_mut().reset(if exact { at - SPIN } else { at });
        }
        let cut = sent >= BURST;
        std::future::poll_fn(|cx| {
            let finished = flights.poll(cx, &mut tally, progress);
            if cut || spin {
                return Poll::Ready(());
            }
            if next.is_some() && sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            if finished > 0 && next.is_none() {
                // Room for the next send, or one fewer to wait for.
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
        if cut || spin {
            tokio::task::yield_now().await;
        }
    }
    tally
}

/// One worker's counts: owned, so the hot path takes no lock.
struct Tally {
    hist: Histogram<u64>,
    requests: u64,
    errors: [u64; CODES.len()],
    mix: Mix,
    reasons: HashMap<String, u64>,
    late: u64,
    last_done: Option<Instant>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            // Constant, valid bounds: 1 us to 60 s at 3 significant digits.
            hist: Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"),
            requests: 0,
            errors: [0; CODES.len()],
            mix: Mix::default(),
            reasons: HashMap::new(),
            late: 0,
            last_done: None,
        }
    }

    fn record(&mut self, latency: Duration, done: Instant, answer: Answer, progress: &Shard) {
        let us = (latency.as_micros().min(MAX_US as u128) as u64).max(1);
        self.hist.saturating_record(us);
        self.requests += 1;
        self.last_done = self.last_done.max(Some(done));
        let failed = match answer {
            Ok(d) => {
                match pb::Action::try_from(d.action) {
                    Ok(pb::Action::Allow) => self.mix.allow += 1,
                    Ok(pb::Action::Challenge) => self.mix.challenge += 1,
                    Ok(pb::Action::Block) => self.mix.block += 1,
                    _ => self.errors[CODES.len() - 1] += 1,
                }
                for r in d.reasons {
                    *self.reasons.entry(r.code).or_default() += 1;
                }
                false
            }
            Err(code) => {
                self.errors[(code as usize).min(CODES.len() - 2)] += 1;
                true
            }
        };
        progress.add(us, failed);
    }

    fn merge(&mut self, other: Tally) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.requests += other.requests;
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        self.mix.allow += other.mix.allow;
        self.mix.challenge += other.mix.challenge;
        self.mix.block += other.mix.block;
        for (code, n) in other.reasons {
            *self.reasons.entry(code).or_default() += n;
        }
        self.late += other.late;
        self.last_done = self.last_done.max(other.last_done);
    }

    fn report(self, args: &Args, addr: String, measure_start: Instant) -> Report {
        let end = self.last_done.unwrap_or_else(Instant::now);
        let duration_s = round(
            end.saturating_duration_since(measure_start).as_secs_f64(),
            6,
        );
        let h = &self.hist;
        let latency_us = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
                mean: round(h.mean(), 1),
            }
        };
        let errors_by_code: BTreeMap<String, u64> = CODES
            .iter()
            .zip(self.errors)
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| (c.to_string(), n))
            .collect();
        Report {
            mode: if args.rate.is_some() {
                Mode::Open
            } else {
                Mode::Closed
            },
            addr,
            rate: args.rate,
            pacing: args.rate.map(|_| args.pacing),
            connections: args.connections,
            streams: if args.rate.is_some() { 0 } else { args.streams },
            seed: args.seed,
            population: args.population.clone(),
            requests: self.requests,
            errors: errors_by_code.values().sum(),
            errors_by_code,
            duration_s,
            rps: if duration_s > 0.0 {
                round(self.requests as f64 / duration_s, 1)
            } else {
                0.0
            },
            late: self.late,
            mix: self.mix,
            reasons: self.reasons.into_iter().collect(),
            latency_us,
        }
    }
}

/// Rounds to `digits` decimals: tidier JSON, and a short decimal reads back as
/// exactly the same f64 (serde_json's default parser can be one ulp off on long ones).
fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// Counters for the progress line: relaxed atomics, and a coarse log-linear
/// latency histogram (1/8 of a power of two) for a running p99. One shard per
/// sender thread, so the hot path never writes a cache line another thread
/// writes; the progress line sums them.
struct Progress {
    shards: Vec<Shard>,
}

#[repr(align(128))]
struct Shard {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

/// Enough for [`MAX_US`] (below 2^32).
const BUCKETS: usize = 240;

fn bucket(us: u64) -> usize {
    if us < 16 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize;
    (16 + (e - 4) * 8 + ((us >> (e - 3)) & 7) as usize).min(BUCKETS - 1)
}

/// The largest value that falls in bucket `i`.
fn bucket_top(i: usize) -> u64 {
    if i < 16 {
        return i as u64;
    }
    let (e, sub) = ((i - 16) / 8 + 4, ((i - 16) % 8) as u64);
    ((9 + sub) << (e - 3)) - 1
}

impl Progress {
    fn new(shards: usize) -> Progress {
        let shard = || Shard {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        };
        Progress {
            shards: (0..shards.max(1)).map(|_| shard()).collect(),
        }
    }

    fn shard(&self, i: usize) -> &Shard {
        &self.shards[i % self.shards.len()]
    }

    fn requests(&self) -> u64 {
        self.shards.iter().map(|s| s.requests.load(Relaxed)).sum()
    }

    fn errors(&self) -> u64 {
        self.shards.iter().map(|s| s.errors.load(Relaxed)).sum()
    }

    fn p99(&self) -> u64 {
        let counts: Vec<u64> = (0..BUCKETS)
            .map(|i| self.shards.iter().map(|s| s.buckets[i].load(Relaxed)).sum())
            .collect();
        let want = (counts.iter().sum::<u64>() as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= want && seen > 0 {
                return bucket_top(i);
            }
        }
        0
    }
}

impl Shard {
    fn add(&self, us: u64, failed: bool) {
        self.requests.fetch_add(1, Relaxed);
        if failed {
            self.errors.fetch_add(1, Relaxed);
        }
        self.buckets[bucket(us)].fetch_add(1, Relaxed);
    }
}

/// Once a second: elapsed, requests, current rate, errors, p99 so far.
async fn print_progress(plan: Arc<Plan>) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval_at(
        plan.measure_start + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_n, mut last_t) = (0, plan.measure_start);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let n = plan.progress.requests();
        let rps = (n - last_n) as f64 / now.duration_since(last_t).as_secs_f64().max(1e-9);
        (last_n, last_t) = (n, now);
        let line = format!(
            "{:>6.1}s {:>10} requests {:>9.0} req/s {:>6} errors  p99 ~{} us",
            now.duration_since(plan.measure_start).as_secs_f64(),
            n,
            rps,
            plan.progress.errors(),
            plan.progress.p99()
        );
        if tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
}

/// The human-readable report.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let pct = |n: u64| {
        if r.requests > 0 {
            100.0 * n as f64 / r.requests as f64
        } else {
            0.0
        }
    };
    let shape = match r.rate {
        Some(rate) => format!(
            "open loop, {rate} req/s over {} connections{}",
            r.connections,
            // Reports from before session 12 have none (and were tick).
            r.pacing
                .map(|p| format!(", {p} pacing"))
                .unwrap_or_default()
        ),
        None => format!(
            "closed loop, {} connections x {} streams",
            r.connections, r.streams
        ),
    };
    let _ = writeln!(t, "riskgate loadgen: {shape}, {}", r.addr);
    let _ = writeln!(
        t,
        "requests     {:>10}  in {:.2} s",
        r.requests, r.duration_s
    );
    let _ = writeln!(t, "throughput   {:>10.0}  req/s", r.rps);
    let _ = writeln!(t, "errors       {:>10}", r.errors);
    for (code, n) in &r.errors_by_code {
        let _ = writeln!(t, "  {code:<24} {n:>8}");
    }
    if r.rate.is_some() {
        let _ = writeln!(t, "late sends   {:>10}  (> 1 ms behind schedule)", r.late);
    }
    let m = &r.mix;
    let _ = writeln!(
        t,
        "decisions    allow {} ({:.1}%)  challenge {} ({:.1}%)  block {} ({:.1}%)",
        m.allow,
        pct(m.allow),
        m.challenge,
        pct(m.challenge),
        m.block,
        pct(m.block)
    );
    let mut reasons: Vec<_> = r.reasons.iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    if !reasons.is_empty() {
        let _ = writeln!(t, "top reasons");
    }
    for (code, n) in reasons.into_iter().take(8) {
        let _ = writeln!(t, "  {code:<24} {n:>8}  {:>5.1}%", pct(*n));
    }
    let l = &r.latency_us;
    let _ = writeln!(
        t,
        "latency (us)      p50      p90      p99    p99.9      max     mean"
    );
    let _ = writeln!(
        t,
        "             {:>8} {:>8} {:>8} {:>8} {:>8} {:>8.0}",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
    t
}

/// SplitMix64: tiny, fast, statistically fine for picking users and amounts.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Regular,
    Burst,
    Traveller,
    Duplicate,
    UnverifiedLarge,
    NewDevice,
}

/// An IPv4 city of `geo/demo.csv`: first three octets, first and last host.
/// Beijing is 192.0.2.0/25 without the nested Tianjin /26, so .1-.63 only.
type City = (&'static str, u64, u64);
const BEIJING: City = ("192.0.2", 1, 63);
const SHANGHAI: City = ("192.0.2", 128, 254);
const GUANGZHOU: City = ("198.51.100", 1, 127);
const CHENGDU: City = ("198.51.100", 192, 254);
const HARBIN: City = ("203.0.113", 1, 127);
/// Up to .249: 203.0.113.250 is on the shipped IP blocklist.
const URUMQI: City = ("203.0.113", 128, 249);
/// Pairs over 1,500 km apart that travellers alternate between.
const TRIPS: [(City, City); 4] = [
    (URUMQI, BEIJING),
    (HARBIN, CHENGDU),
    (URUMQI, SHANGHAI),
    (HARBIN, GUANGZHOU),
];
const CHANNELS: [&str; 5] = ["wechat", "alipay", "unionpay", "app", "web"];
/// Everyday top-ups in yuan (phone credit denominations); 50 and 100, the
/// commonest, twice.
const EVERYDAY_YUAN: [u64; 9] = [10, 20, 30, 50, 50, 100, 100, 200, 300];

/// A user's home address: their own IPv6 address in Hangzhou (2001:db8::/33)
/// or Wuhan (2001:db8:8000::/33). Own, because the demo IPv4 cities hold only
/// a few hundred addresses: shared by a whole population they would pass the
/// IP_BURST limit (300 per address in 10 minutes) within seconds of any load.
fn home_ip(user: u64) -> String {
    let high = ((user >> 16) & 0x7fff) as u16 | if user % 2 == 1 { 0x8000 } else { 0 };
    Ipv6Addr::new(0x2001, 0xdb8, high, user as u16, 0, 0, 0, 1).to_string()
}

/// One worker's request generator. Bursts and trips are streaks: a drawn
/// burst continues the worker's current bursting user, so the 5th large order
/// of one user within 10 minutes (BURST_FREQUENCY) really happens.
struct Traffic {
    rng: Rng,
    kinds: Vec<(u64, Kind)>,
    users: u64,
    /// Ends every user, device and game account id: by default the run's
    /// own id, so a second run against the same server is not judged by the
    /// windows of the first (and sees the same mix); `--population` names a
    /// population that runs share (a warm store).
    run: String,
    prefix: String,
    seq: u64,
    dry_run: bool,
    created_at_ms: i64,
    burst: Option<(u64, u64)>,
    trip: Option<(u64, u64, (City, City))>,
    last: Option<pb::EvaluateRequest>,
}

impl Traffic {
    fn new(args: &Args, run_id: &str, worker: usize) -> Traffic {
        let shares = [
            (args.regular, Kind::Regular),
            (args.burst, Kind::Burst),
            (args.traveller, Kind::Traveller),
            (args.duplicate, Kind::Duplicate),
            (args.unverified_large, Kind::UnverifiedLarge),
            (args.new_device, Kind::NewDevice),
        ];
        let mut sum = 0;
        let kinds = shares.iter().filter(|(s, _)| *s > 0).map(|&(s, k)| {
            sum += u64::from(s);
            (sum, k)
        });
        let mut rng = Rng(args.seed ^ (worker as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next();
        Traffic {
            rng,
            kinds: kinds.collect(),
            users: args.users,
            run: args.population.as_deref().unwrap_or(run_id).to_string(),
            prefix: format!("lg-{run_id}-{worker}"),
            seq: 0,
            dry_run: args.dry_run,
            created_at_ms: crate::now_ms() - 400 * 86_400_000,
            burst: None,
            trip: None,
            last: None,
        }
    }

    fn next(&mut self) -> pb::EvaluateRequest {
        let total = self.kinds.last().map_or(1, |k| k.0);
        let draw = self.rng.below(total);
        let kind = self
            .kinds
            .iter()
            .find(|k| draw < k.0)
            .map_or(Kind::Regular, |k| k.1);
        match kind {
            Kind::Regular => {
                let user = self.rng.below(self.users);
                let yuan = self.rng.pick(&EVERYDAY_YUAN);
                let req = self.order(user, yuan);
                self.last = Some(req.clone());
                req
            }
            Kind::Burst => {
                let (user, left) = match self.burst {
                    Some((user, left)) if left > 0 => (user, left),
                    _ => (self.rng.below(self.users), 6 + self.rng.below(3)),
                };
                self.burst = Some((user, left - 1));
                let yuan = 500 + 100 * self.rng.below(16);
                self.order(user, yuan)
            }
            Kind::Traveller => {
                let (user, step, trip) = match self.trip {
                    Some((user, step, trip)) if step < 6 => (user, step, trip),
                    _ => (self.rng.below(self.users), 0, self.rng.pick(&TRIPS)),
                };
                self.trip = Some((user, step + 1, trip));
                // At or above 50 yuan: below it the pack's leniency makes LOCATION_UNUSUAL a note.
                let yuan = self.rng.pick(&[50, 100, 200, 300]);
                let mut req = self.order(user, yuan);
                let city = match step {
                    0..=2 => None,
                    4 => Some(trip.1),
                    _ => Some(trip.0),
                };
                if let Some((net, lo, hi)) = city {
                    req.ip = format!("{net}.{}", lo + self.rng.below(hi - lo + 1));
                }
                req
            }
            Kind::Duplicate => match self.last.take() {
                Some(mut req) => {
                    self.seq += 1;
                    req.request_id = format!("{}-{}", self.prefix, self.seq);
                    let others: Vec<&str> =
                        CHANNELS.into_iter().filter(|c| *c != req.channel).collect();
                    req.channel = self.rng.pick(&others).to_string();
                    req
                }
                None => {
                    let user = self.rng.below(self.users);
                    let req = self.order(user, 100);
                    self.last = Some(req.clone());
                    req
                }
            },
            Kind::UnverifiedLarge => {
                let user = self.rng.below(self.users);
                let yuan = 3000 + self.rng.below(3001);
                let mut req = self.order(user, yuan);
                req.user_id = format!("v{user}-{}", self.run);
                req.device_id = format!("dv{user}-{}", self.run);
                if let Some(account) = req.account.as_mut() {
                    account.real_name_verified = false;
                }
                req
            }
            Kind::NewDevice => {
                let user = self.rng.below(self.users);
                let yuan = self.rng.pick(&EVERYDAY_YUAN);
                let mut req = self.order(user, yuan);
                req.device_id = format!("new-{}-{}", self.prefix, self.seq);
                req
            }
        }
    }

    /// An everyday order by `user`: own device, home address, one of their targets.
    fn order(&mut self, user: u64, yuan: u64) -> pb::EvaluateRequest {
        self.seq += 1;
        let phone = |prefix: &str| format!("{prefix}{:08}", user % 100_000_000);
        let (target, product) = match self.rng.below(4) {
            0 => (phone("138"), "phone_credit"),
            1 => (phone("138"), "mobile_data"),
            2 => (phone("139"), "phone_credit"),
            _ => (format!("game-{user}-{}", self.run), "game_card"),
        };
        pb::EvaluateRequest {
            request_id: format!("{}-{}", self.prefix, self.seq),
            user_id: format!("u{user}-{}", self.run),
            amount: yuan as i64 * 100,
            currency: String::new(),
            channel: self.rng.pick(&CHANNELS).to_string(),
            product: product.to_string(),
            target,
            ip: home_ip(user),
            device_id: format!("d{user}-{}", self.run),
            timestamp_ms: 0,
            account: Some(pb::Account {
                real_name_verified: true,
                status: pb::AccountStatus::Active as i32,
                created_at_ms: self.created_at_ms,
                has_purchase_history: true,
            }),
            attributes: Default::default(),
            dry_run: self.dry_run,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "-1s", "10x", "nan", "1e30s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn buckets_cover_their_values() {
        for us in [0, 1, 15, 16, 17, 100, 999, 1000, 65_535, 1 << 20, MAX_US] {
            let i = bucket(us);
            assert!(
                bucket_top(i) >= us && (i == 0 || bucket_top(i - 1) < us),
                "{us}"
            );
        }
    }

    /// Requests answered out of order, some after a wait, are all polled to
    /// completion and recorded once; warm-up ones are not recorded.
    #[test]
    fn flights_finish_and_record() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let progress = Progress::new(1);
            let mut tally = Tally::new();
            let mut flights = Flights::new();
            let mut answers = Vec::new();
            for i in 0..20u32 {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                answers.push(tx);
                let call: Call = Box::pin(async move {
                    let _ = rx.await;
                    Ok(pb::Decision::default())
                });
                flights.add(call, Instant::now(), i % 5 != 0);
            }
            let answer = tokio::spawn(async move {
                for (i, tx) in answers.into_iter().rev().enumerate() {
                    if i % 3 == 0 {
                        tokio::task::yield_now().await;
                    }
                    let _ = tx.send(());
                }
            });
            let mut finished = 0;
            while flights.len > 0 {
                finished += std::future::poll_fn(|cx| {
                    match flights.poll(cx, &mut tally, progress.shard(0)) {
                        0 => Poll::Pending,
                        n => Poll::Ready(n),
                    }
                })
                .await;
            }
            answer.await.unwrap();
            assert_eq!(finished, 20);
            assert_eq!(tally.requests, 16);
            assert_eq!(progress.requests(), 16);
            assert_eq!(flights.free.len(), 20);
        });
    }

    #[test]
    fn addresses() {
        assert_eq!(
            endpoint("127.0.0.1:50051", Duration::from_secs(1))
                .unwrap()
                .0,
            "http://127.0.0.1:50051"
        );
        for bad in ["", "https://x:1", "http://", "a b:1"] {
            assert!(endpoint(bad, Duration::from_secs(1)).is_err(), "{bad}");
        }
        assert_eq!(home_ip(3), "2001:db8:8000:3::1");
        assert_eq!(home_ip(70_000), "2001:db8:1:1170::1");
    }
}
