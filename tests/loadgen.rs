//! `riskgate loadgen` against a real server on 127.0.0.1:0: counts add up, the
//! mix makes the shipped rules fire, the report round-trips through JSON.
//! No timing assertions: CI machines are too noisy for them.

use std::path::Path;

use clap::Parser;
use riskgate::loadgen::{self, Args, Mode, Pacing, Report};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

fn args(addr: &str, flags: &[&str]) -> Args {
    let argv = ["loadgen", "--addr", addr, "--warmup", "0s"]
        .into_iter()
        .chain(flags.iter().copied());
    Cli::try_parse_from(argv).expect("flags").args
}

/// Serves the shipped pack and demo geo data until the sender is dropped.
async fn start() -> (String, tokio::sync::oneshot::Sender<()>) {
    let (addr, stop, _) = start_engine().await;
    (addr, stop)
}

/// [`start`], with the engine, to look at its state.
async fn start_engine() -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    riskgate::engine::Engine,
) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = riskgate::config::Config {
        rules: root.join("rules"),
        geo: Some(root.join("geo/demo.csv")),
        ..Default::default()
    };
    let engine = riskgate::server::build(&config).await.expect("engine");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(riskgate::api::serve(engine.clone(), listener, async {
        let _ = stopped.await;
    }));
    (addr.to_string(), stop, engine)
}

#[track_caller]
fn check(report: &Report, requests: u64) {
    assert_eq!(report.errors, 0, "{report:#?}");
    assert!(report.errors_by_code.is_empty(), "{report:#?}");
    assert_eq!(report.requests, requests, "{report:#?}");
    let mix = &report.mix;
    assert_eq!(
        mix.allow + mix.challenge + mix.block,
        requests,
        "{report:#?}"
    );
    assert!(
        mix.allow > mix.challenge + mix.block,
        "mostly allowed: {report:#?}"
    );
    assert!(mix.block > 0 && mix.challenge > 0, "{report:#?}");
    for code in [
        "BURST_FREQUENCY",
        "REAL_NAME_REQUIRED",
        "DUPLICATE_SUSPECTED",
        "LOCATION_UNUSUAL",
    ] {
        assert!(
            report.reasons.get(code).is_some_and(|&n| n > 0),
            "no {code}: {report:#?}"
        );
    }
    let l = &report.latency_us;
    assert!(
        0 < l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max,
        "{l:?}"
    );
    assert!(report.duration_s > 0.0 && report.rps > 0.0, "{report:#?}");
    let json = serde_json::to_string(report).expect("serialize");
    assert_eq!(
        &serde_json::from_str::<Report>(&json).expect("deserialize"),
        report
    );
    let mut value: serde_json::Value = serde_json::from_str(&json).expect("json");
    for field in [
        "requests",
        "errors",
        "duration_s",
        "rps",
        "mix",
        "reasons",
        "latency_us",
        "mode",
        "rate",
        "pacing",
        "connections",
        "streams",
        "late",
    ] {
        assert!(value.get(field).is_some(), "no {field} in {json}");
    }
    assert!(loadgen::table(report).contains("p99.9"));
    // A report from before the pacing field still reads, with none.
    value.as_object_mut().expect("object").remove("pacing");
    let old: Report = serde_json::from_value(value).expect("a report without pacing");
    assert_eq!(old.pacing, None);
    assert!(!loadgen::table(&old).contains("pacing"));
}

/// On the runtime that `serve` and `loadgen` run on (no LIFO slot), the
/// server and the client both: every request of many streams is answered.
#[test]
fn closed_loop_counts_every_request() {
    let runtime = riskgate::runtime::multi_thread().expect("runtime");
    let report = runtime.block_on(async {
        let (addr, _stop) = start().await;
        let args = args(
            &addr,
            &["--requests", "2000", "--connections", "2", "--streams", "8"],
        );
        loadgen::run(&args).await.expect("run")
    });
    assert_eq!(report.mode, Mode::Closed);
    assert_eq!(
        (
            report.connections,
            report.streams,
            report.rate,
            report.pacing
        ),
        (2, 8, None, None)
    );
    check(&report, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_loop_sends_on_schedule() {
    let (addr, _stop) = start().await;
    for (flag, pacing) in [(None, Pacing::Exact), (Some("tick"), Pacing::Tick)] {
        let mut flags = vec!["--rate", "500", "--duration", "2s", "--connections", "2"];
        flags.extend(flag.map(|f| ["--pacing", f]).into_iter().flatten());
        let report = loadgen::run(&args(&addr, &flags)).await.expect("run");
        assert_eq!(report.mode, Mode::Open);
        assert_eq!(report.rate, Some(500.0));
        assert_eq!(report.pacing, Some(pacing), "{flags:?}");
        // The schedule, not the clock, decides the count: 500/s for 2 s.
        check(&report, 1000);
        let table = loadgen::table(&report);
        assert!(table.contains(&format!("{pacing} pacing")), "{table}");
    }
}

#[tokio::test]
async fn bad_input_is_an_error_not_a_panic() {
    for (addr, flags, want) in [
        ("http://", &[][..], "--addr"),
        ("https://127.0.0.1:1", &[], "plaintext"),
        ("127.0.0.1:1", &[], "cannot connect"),
        ("127.0.0.1:1", &["--users", "0"], "at least 1"),
        (
            "127.0.0.1:1",
            &[
                "--regular",
                "0",
                "--burst",
                "0",
                "--traveller",
                "0",
                "--duplicate",
                "0",
                "--unverified-large",
                "0",
                "--new-device",
                "0",
            ],
            "every traffic share is 0",
        ),
        ("127.0.0.1:1", &["--rate", "0"], "--rate"),
        (
            "127.0.0.1:1",
            &["--rate", "1e-20", "--requests", "2"],
            "--rate",
        ),
        (
            "127.0.0.1:1",
            &["--rate", "100", "--duration", "1ms"],
            "measures no request",
        ),
        ("127.0.0.1:1", &["--population", "a b"], "--population"),
        (
            "127.0.0.1:1",
            &["--population", "seventeen-chars-x"],
            "--population",
        ),
    ] {
        let err = loadgen::run(&args(addr, flags))
            .await
            .expect_err(addr)
            .to_string();
        assert!(err.contains(want), "{addr} {flags:?}: {err}");
    }
    assert!(Cli::try_parse_from(["loadgen", "--duration", "ten"]).is_err());
}

/// `--population` names the users: a second run with the same name sends as
/// the users of the first (the store knows them: a warm-store benchmark
/// measures what it says), and a run without it draws new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_population_is_the_same_users_run_after_run() {
    let (addr, _stop, engine) = start_engine().await;
    let users = || engine.store().stats().profiles;
    let flags = ["--users", "200", "--requests", "600", "--connections", "1"];
    let named: Vec<&str> = flags
        .iter()
        .copied()
        .chain(["--population", "warm"])
        .collect();
    let mut added = Vec::new();
    for run in [&named[..], &named[..], &flags[..]] {
        let before = users();
        let report = loadgen::run(&args(&addr, run)).await.expect("run");
        assert_eq!(report.errors, 0, "{report:#?}");
        let named = run.contains(&"--population");
        assert_eq!(report.population.as_deref(), named.then_some("warm"));
        added.push(users() - before);
    }
    let [first, again, fresh] = added[..] else {
        unreachable!()
    };
    assert!(first >= 100, "600 orders over 200 users: {added:?}");
    assert!(again * 10 <= first, "the same users again: {added:?}");
    assert!(fresh * 2 >= first, "new users: {added:?}");
}

/// Warm-up requests reach the server but not the report: the server holds a
/// record of every request, the report counts only those after the warm-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_requests_are_sent_but_not_reported() {
    let (addr, _stop, engine) = start_engine().await;
    let argv = [
        "loadgen",
        "--addr",
        &addr,
        "--warmup",
        "500ms",
        "--duration",
        "500ms",
        "--connections",
        "1",
        "--streams",
        "2",
    ];
    let args = Cli::try_parse_from(argv).expect("flags").args;
    let report = loadgen::run(&args).await.expect("run");
    assert_eq!(report.errors, 0, "{report:#?}");
    let served = engine.store().stats().idempotency_records as u64;
    assert!(report.requests > 0, "{report:#?}");
    // Half the time was warm-up: about half the requests. (A run that
    // reported its warm-up would differ only by the few left in flight.)
    assert!(
        served >= report.requests + report.requests / 4,
        "the server decided {served}, the report counts {}: warm-up included?",
        report.requests
    );
}

/// A server that answers at once, but for one request that it holds 300 ms.
struct Stalling {
    served: std::sync::atomic::AtomicU64,
}

#[tonic::async_trait]
impl riskgate::pb::risk_engine_server::RiskEngine for Stalling {
    async fn evaluate(
        &self,
        request: tonic::Request<riskgate::pb::EvaluateRequest>,
    ) -> Result<tonic::Response<riskgate::pb::Decision>, tonic::Status> {
        let n = self
            .served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n == 200 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        Ok(tonic::Response::new(riskgate::pb::Decision {
            request_id: request.into_inner().request_id,
            action: riskgate::pb::Action::Allow.into(),
            ..Default::default()
        }))
    }

    async fn record_event(
        &self,
        _: tonic::Request<riskgate::pb::Event>,
    ) -> Result<tonic::Response<riskgate::pb::RecordEventResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn report_outcome(
        &self,
        _: tonic::Request<riskgate::pb::Outcome>,
    ) -> Result<tonic::Response<riskgate::pb::ReportOutcomeResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

/// The open loop's claim: a stall is not hidden. With one request in
/// flight at most, the client cannot send while the server holds one for
/// 300 ms; the ~150 sends due meanwhile go out late, and each is timed from
/// when it was due. Timed from when it left, only the held request would be
/// slow, one in 1,000: a p99 of a millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_times_a_stall_from_when_requests_were_due() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let service = riskgate::pb::risk_engine_server::RiskEngineServer::new(Stalling {
        served: Default::default(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let flags = [
        "--rate",
        "500",
        "--duration",
        "2s",
        "--connections",
        "1",
        "--max-in-flight",
        "1",
    ];
    let report = loadgen::run(&args(&addr, &flags)).await.expect("run");
    assert_eq!((report.requests, report.errors), (1000, 0), "{report:#?}");
    let l = &report.latency_us;
    assert!(l.max >= 300_000, "the held request: {l:?}");
    assert!(l.p99 >= 150_000, "the sends due during the stall: {l:?}");
    assert!(report.late >= 50, "{report:#?}");
}
