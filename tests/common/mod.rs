//! Test harness: a real riskgate server on 127.0.0.1:0 and a tonic client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use riskgate::engine::Engine;
use riskgate::pb;
use riskgate::pb::risk_engine_client::RiskEngineClient;
use riskgate::state::memory::MemoryLimits;
use riskgate::state::{MemoryStore, Store};
use tonic::transport::Channel;

pub const BEIJING: &str = "192.0.2.10";
pub const BEIJING_2: &str = "192.0.2.20";
pub const SHANGHAI: &str = "192.0.2.200";
pub const HARBIN: &str = "203.0.113.10";
pub const URUMQI: &str = "203.0.113.200";
pub const CHENGDU: &str = "198.51.100.200";
pub const UNKNOWN_IP: &str = "100.64.0.1";

pub const MIN: i64 = 60_000;
pub const HOUR: i64 = 60 * MIN;
pub const DAY: i64 = 24 * HOUR;

pub struct TestServer {
    pub client: RiskEngineClient<Channel>,
    pub channel: Channel,
    pub engine: Engine,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn shipped_pack() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")
}

pub async fn start() -> TestServer {
    start_with(&shipped_pack(), MemoryLimits::default()).await
}

pub async fn start_with(pack: &Path, limits: MemoryLimits) -> TestServer {
    start_logged(pack, limits, None).await
}

/// A server that writes its decision log through `log`.
pub async fn start_logged(
    pack: &Path,
    limits: MemoryLimits,
    log: Option<riskgate::decision_log::DecisionLog>,
) -> TestServer {
    let pack = riskgate::pack::Pack::load(pack).unwrap_or_else(|e| panic!("{e}"));
    let geo = riskgate::server::open_geo(Some(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("geo/demo.csv"),
    ))
    .expect("demo geo");
    let engine = Engine::new(
        Arc::new(pack),
        Store::Memory(Arc::new(MemoryStore::new(limits))),
        geo,
        log,
    );
    start_engine(engine).await
}

/// Serves `engine` on 127.0.0.1:0 until the returned server is dropped.
pub async fn start_engine(engine: Engine) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = engine.clone();
    tokio::spawn(async move {
        riskgate::api::serve(served, listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("server");
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    TestServer {
        client: RiskEngineClient::new(channel.clone()),
        channel,
        engine,
        stop: Some(stop),
    }
}

/// A clock for one test: event times relative to a point two hours ago, so
/// every timestamp is inside the accepted range.
pub fn t0() -> i64 {
    riskgate::now_ms() - 2 * HOUR
}

/// A verified, active account with purchase history: no rule should mind it.
pub fn good_account() -> pb::Account {
    pb::Account {
        real_name_verified: true,
        status: pb::AccountStatus::Active as i32,
        created_at_ms: riskgate::now_ms() - 400 * DAY,
        has_purchase_history: true,
    }
}

/// A plain recharge of `yuan` by `user` from Beijing, to a target of its own.
pub fn recharge(id: &str, user: &str, yuan: i64, ts: i64) -> pb::EvaluateRequest {
    pb::EvaluateRequest {
        request_id: id.to_string(),
        user_id: user.to_string(),
        amount: yuan * 100,
        currency: String::new(),
        channel: "wechat".to_string(),
        product: "phone_credit".to_string(),
        target: format!("target-of-{id}"),
        ip: BEIJING.to_string(),
        device_id: format!("dev-{user}"),
        timestamp_ms: ts,
        account: Some(good_account()),
        attributes: Default::default(),
        dry_run: false,
    }
}

pub fn login(id: &str, user: &str, ok: bool, ip: &str, ts: i64) -> pb::Event {
    pb::Event {
        event_id: id.to_string(),
        user_id: user.to_string(),
        kind: if ok {
            pb::EventKind::LoginSucceeded
        } else {
            pb::EventKind::LoginFailed
        } as i32,
        ip: ip.to_string(),
        device_id: format!("dev-{user}"),
        timestamp_ms: ts,
        attributes: Default::default(),
    }
}

impl TestServer {
    pub async fn eval(&mut self, req: pb::EvaluateRequest) -> pb::Decision {
        self.client
            .evaluate(req)
            .await
            .unwrap_or_else(|s| panic!("evaluate failed: {s:?}"))
            .into_inner()
    }

    pub async fn login(&mut self, ev: pb::Event) {
        self.client.record_event(ev).await.expect("record_event");
    }

    pub async fn outcome(&mut self, id: &str, kind: pb::OutcomeKind) -> bool {
        self.client
            .report_outcome(pb::Outcome {
                request_id: id.to_string(),
                user_id: String::new(),
                kind: kind as i32,
                timestamp_ms: 0,
            })
            .await
            .expect("report_outcome")
            .into_inner()
            .replayed
    }
}

pub fn action(d: &pb::Decision) -> pb::Action {
    pb::Action::try_from(d.action).unwrap_or(pb::Action::Unspecified)
}

pub fn codes(d: &pb::Decision) -> Vec<&str> {
    d.reasons.iter().map(|r| r.code.as_str()).collect()
}

pub fn shadow_codes(d: &pb::Decision) -> Vec<&str> {
    d.shadow_reasons.iter().map(|r| r.code.as_str()).collect()
}

/// Asserts the action and that `code` is the strongest reason.
#[track_caller]
pub fn assert_decision(d: &pb::Decision, want: pb::Action, code: Option<&str>) {
    assert_eq!(action(d), want, "decision: {d:#?}");
    match code {
        Some(code) => assert_eq!(codes(d).first().copied(), Some(code), "decision: {d:#?}"),
        None => assert!(d.reasons.is_empty(), "expected no reasons: {d:#?}"),
    }
}

/// Copies a folder tree (a rule pack) for a test to edit.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
