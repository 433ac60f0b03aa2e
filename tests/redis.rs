//! The Redis backend against a real redis-server, started by each test on a
//! free port (`.ci/run` installs it; without it these tests say so and pass
//! unless RISKGATE_REQUIRE_REDIS is set, as CI sets it).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use riskgate::config::Config;
use riskgate::pb::{self, Action, OutcomeKind};
use tonic_health::pb::health_check_response::ServingStatus;

/// A redis-server of this test's own, killed on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts one, or None (the test is skipped) when redis-server is not
    /// installed and RISKGATE_REQUIRE_REDIS is unset.
    fn start() -> Option<Redis> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok();
        if !installed {
            assert!(
                std::env::var_os("RISKGATE_REQUIRE_REDIS").is_none(),
                "RISKGATE_REQUIRE_REDIS is set but redis-server is not installed"
            );
            eprintln!("redis-server not installed: skipping");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.up();
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// (Re)starts the server on its port and waits until it answers.
    fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("redis client")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server on `redis` with the shipped pack (or `pack`), under `prefix`.
async fn instance(redis: &Redis, prefix: &str, pack: Option<&Path>, timeout: &str) -> TestServer {
    let config = Config {
        rules: pack.map_or_else(shipped_pack, Path::to_path_buf),
        geo: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("geo/demo.csv")),
        state: redis.url(),
        redis_prefix: prefix.to_string(),
        state_timeout: timeout.to_string(),
        ..Config::default()
    };
    let engine = riskgate::server::build(&config).await.expect("engine");
    start_engine(engine).await
}

async fn state_health(s: &TestServer) -> i32 {
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: riskgate::api::STATE_HEALTH.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

/// Polls `check` for up to 15 s.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_instances_catch_a_burst_split_across_them() {
    let Some(redis) = Redis::start() else { return };
    let mut a = instance(&redis, "split", None, "1s").await;
    let mut b = instance(&redis, "split", None, "1s").await;
    let t = t0();
    for i in 0..4 {
        let s = if i % 2 == 0 { &mut a } else { &mut b };
        let d = s
            .eval(recharge(&format!("b{i}"), "u1", 500, t + i * MIN))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
    // Neither instance saw more than two of the four: together they block.
    let d = a.eval(recharge("b4", "u1", 500, t + 4 * MIN)).await;
    assert_decision(&d, Action::Block, Some("BURST_FREQUENCY"));

    // Another prefix is another world.
    let mut other = instance(&redis, "elsewhere", None, "1s").await;
    let d = other.eval(recharge("b5", "u1", 500, t + 5 * MIN)).await;
    assert_decision(&d, Action::Allow, None);
}

#[tokio::test]
async fn two_instances_agree_on_idempotency() {
    let Some(redis) = Redis::start() else { return };
    let mut a = instance(&redis, "idem", None, "1s").await;
    let mut b = instance(&redis, "idem", None, "1s").await;
    let t = t0();
    let first = a.eval(recharge("r1", "u2", 500, t)).await;
    assert!(!first.replayed);
    // The retry lands on the other instance: the same answer, counted once.
    let again = b.eval(recharge("r1", "u2", 500, t)).await;
    assert!(again.replayed, "{again:?}");
    assert_eq!(
        (again.action, &again.reasons),
        (first.action, &first.reasons)
    );
    for i in 2..5 {
        let d = b
            .eval(recharge(&format!("r{i}"), "u2", 500, t + i * MIN))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
    // r1 counted once: this is the fifth large order, not the sixth... and the
    // fifth is the one that blocks.
    let d = a.eval(recharge("r5", "u2", 500, t + 5 * MIN)).await;
    assert_decision(&d, Action::Block, Some("BURST_FREQUENCY"));

    // The same id for a different request is refused by either instance.
    let mut changed = recharge("r1", "u2", 900, t);
    changed.target = "someone-else".into();
    let err = b.client.evaluate(changed).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

    // Outcomes reach the shared record once.
    assert!(!b.outcome("r1", OutcomeKind::Succeeded).await);
    assert!(
        a.outcome("r1", OutcomeKind::Succeeded).await,
        "a second report is a replay"
    );
    // One that contradicts it is refused by either instance.
    let failed = pb::Outcome {
        request_id: "r1".into(),
        user_id: String::new(),
        kind: OutcomeKind::Failed as i32,
        timestamp_ms: 0,
    };
    let err = a.client.report_outcome(failed).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    // An outcome for an id never decided is not found.
    let never = pb::Outcome {
        request_id: "never".into(),
        user_id: String::new(),
        kind: OutcomeKind::Succeeded as i32,
        timestamp_ms: 0,
    };
    let err = b.client.report_outcome(never).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    // An event id reused for another user's event, named as the event id.
    a.login(login("e1", "u1", true, "192.0.2.10", 0)).await;
    let err = b
        .client
        .record_event(login("e1", "u2", true, "192.0.2.10", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(err.message().starts_with("event_id `e1`"), "{err:?}");
}

#[tokio::test]
async fn concurrent_retries_across_instances_decide_once() {
    let Some(redis) = Redis::start() else { return };
    let a = instance(&redis, "race", None, "1s").await;
    let b = instance(&redis, "race", None, "1s").await;
    let t = t0();
    let mut calls = Vec::new();
    for n in 0..20 {
        let mut client = if n % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        calls.push(tokio::spawn(async move {
            client
                .evaluate(recharge("same", "u3", 500, t))
                .await
                .expect("evaluate")
                .into_inner()
        }));
    }
    let mut fresh = 0;
    for c in calls {
        let d = c.await.unwrap();
        assert_eq!(action(&d), Action::Allow);
        fresh += usize::from(!d.replayed);
    }
    assert_eq!(fresh, 1, "exactly one call decided; the rest replayed");
}

#[tokio::test]
async fn redis_down_fails_open_then_recovers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let mut s = instance(&redis, "down", None, "200ms").await;
    let t = t0();
    let d = s.eval(recharge("d0", "u4", 100, t)).await;
    assert_decision(&d, Action::Allow, None);
    eventually("state health SERVING", || {
        let s = &s;
        async move { state_health(s).await == ServingStatus::Serving as i32 }
    })
    .await;

    redis.kill();
    // Decided on what needs no state, and says so.
    let d = s.eval(recharge("d1", "u4", 100, t + MIN)).await;
    assert_eq!(action(&d), Action::Allow, "{d:?}");
    assert_eq!(codes(&d), ["STATE_UNAVAILABLE"], "{d:?}");
    // A frozen account still blocks: that needs no state.
    let mut frozen = recharge("d2", "u4", 100, t + MIN);
    frozen.account.as_mut().unwrap().status = riskgate::pb::AccountStatus::Frozen as i32;
    let d = s.eval(frozen).await;
    assert_eq!(action(&d), Action::Block, "{d:?}");
    assert!(codes(&d).contains(&"STATE_UNAVAILABLE"), "{d:?}");
    // Recording a login needs state: the caller is told to retry.
    let err = s
        .client
        .record_event(login("l1", "u4", true, BEIJING, t))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    eventually("state health NOT_SERVING", || {
        let s = &s;
        async move { state_health(s).await == ServingStatus::NotServing as i32 }
    })
    .await;

    redis.up();
    let mut n = 0;
    eventually("decisions with state again", || {
        n += 1;
        let mut client = s.client.clone();
        async move {
            let d = client
                .evaluate(recharge(&format!("d-back-{n}"), "u5", 100, t + 2 * MIN))
                .await
                .unwrap()
                .into_inner();
            d.reasons.is_empty()
        }
    })
    .await;
    eventually("state health SERVING again", || {
        let s = &s;
        async move { state_health(s).await == ServingStatus::Serving as i32 }
    })
    .await;
}

#[tokio::test]
async fn a_fail_closed_pack_blocks_without_state() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&shipped_pack(), dir.path());
    let manifest = dir.path().join("pack.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let closed = text.replace(
        "on_state_unavailable = \"open\"",
        "on_state_unavailable = \"block\"",
    );
    assert_ne!(text, closed, "the shipped pack names its fail mode");
    std::fs::write(&manifest, closed).unwrap();
    let mut s = instance(&redis, "closed", Some(dir.path()), "200ms").await;
    let t = t0();
    assert_decision(
        &s.eval(recharge("c0", "u6", 100, t)).await,
        Action::Allow,
        None,
    );
    redis.kill();
    let d = s.eval(recharge("c1", "u6", 100, t + MIN)).await;
    assert_decision(&d, Action::Block, Some("STATE_UNAVAILABLE"));
}

#[tokio::test]
async fn a_stalled_redis_hits_the_deadline_instead_of_hanging() {
    let Some(redis) = Redis::start() else { return };
    let mut s = instance(&redis, "stall", None, "100ms").await;
    let t = t0();
    assert_decision(
        &s.eval(recharge("s0", "u7", 100, t)).await,
        Action::Allow,
        None,
    );
    redis.signal("-STOP");
    let d = tokio::time::timeout(
        Duration::from_secs(10),
        s.eval(recharge("s1", "u7", 100, t)),
    )
    .await
    .expect("an answer, not a hang");
    redis.signal("-CONT");
    assert_eq!(codes(&d), ["STATE_UNAVAILABLE"], "{d:?}");
}

#[tokio::test]
async fn keys_share_one_hash_tag_and_all_expire() {
    let Some(redis) = Redis::start() else { return };
    let mut s = instance(&redis, "keys", None, "1s").await;
    let t = t0();
    for i in 0..5 {
        s.eval(recharge(&format!("k{i}"), "u8", 500, t + i * MIN))
            .await;
    }
    s.login(login("e1", "u8", true, BEIJING, t)).await;
    // Settling happens after the answer: give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut conn = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.len() > 5, "{keys:?}");
    for key in &keys {
        assert!(key.starts_with("{keys}:"), "{key}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} has no TTL ({ttl})");
    }
    for kind in ["{keys}:w:", "{keys}:p:", "{keys}:r:", "{keys}:e:"] {
        assert!(
            keys.iter().any(|k| k.starts_with(kind)),
            "no {kind} key in {keys:?}"
        );
    }
}

#[tokio::test]
async fn the_shipped_scenarios_pass_on_redis() {
    let Some(redis) = Redis::start() else { return };
    let pack = std::sync::Arc::new(riskgate::pack::Pack::load(&shipped_pack()).unwrap());
    let geo = riskgate::server::open_geo(Some(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("geo/demo.csv"),
    ))
    .unwrap();
    let outcomes =
        riskgate::scenario::run_all_on(&pack, &geo, &riskgate::scenario::Fresh::Redis(redis.url()))
            .await;
    let mut report = Vec::new();
    let failed = riskgate::scenario::report(&outcomes, &mut report);
    assert!(outcomes.len() >= 17, "{} scenarios", outcomes.len());
    assert_eq!(failed, 0, "{}", String::from_utf8_lossy(&report));
}

/// A Redis store that settles inline, under its own key prefix.
async fn inline_store(redis: &Redis, prefix: &str) -> riskgate::state::RedisStore {
    riskgate::state::RedisStore::connect(riskgate::state::redis::RedisConfig {
        url: redis.url(),
        prefix: prefix.to_string(),
        timeout_ms: 5_000,
        idempotency_ttl_ms: 3_600_000,
        inline_settle: true,
    })
    .await
    .unwrap()
}

/// The window values a request reads in memory and in Redis (`step`: its
/// fingerprint), which must be the same.
async fn windows_in_both(
    memory: &riskgate::state::MemoryStore,
    shared: &riskgate::state::RedisStore,
    plan: &riskgate::state::WindowPlan,
    r: &riskgate::model::Recharge,
    step: u64,
    record: bool,
) -> (Vec<i64>, Vec<i64>) {
    use riskgate::state::redis::Opened;
    let in_memory = memory.begin(plan, r, None, record).windows;
    let in_redis = match shared.open(plan, r, None, step, record).await.unwrap() {
        Opened::Decide { begun, .. } => begun.windows,
        _ => panic!("step {step}: a new request id"),
    };
    (in_memory, in_redis)
}

/// A recharge by `user` from the one device many users share.
fn on_shared_device(user: u64, ts: i64) -> riskgate::model::Recharge {
    use riskgate::model::{Account, AccountStatus, Facts, Recharge};
    let ip: std::net::IpAddr = format!("10.1.{}.{}", user / 200, user % 200)
        .parse()
        .unwrap();
    Recharge {
        request_id: format!("shared-{user}-{ts}"),
        facts: Facts {
            user_id: format!("u{user}"),
            ip_text: ip.to_string(),
            device_id: "kiosk-1".to_string(),
            target: format!("138{user:08}"),
            channel: "wechat".to_string(),
            product: "phone_credit".to_string(),
            currency: "CNY".to_string(),
            amount: 1_000,
            timestamp_ms: ts,
        },
        ip,
        account: Account {
            real_name_verified: true,
            status: AccountStatus::Active,
            created_at_ms: ts - 400 * 86_400_000,
            has_purchase_history: true,
        },
        attributes: Default::default(),
        dry_run: false,
    }
}

/// A device hundreds of users share (a shop terminal): its distinct window
/// lives in a sorted set in Redis and a hash map in memory, and every window
/// of every request reads the same in both, late events and dry runs
/// included, as users come and go out of the hour.
#[tokio::test]
async fn a_shared_device_counts_alike_in_redis_and_in_memory() {
    use riskgate::state::{memory::MemoryLimits, MemoryStore};
    let Some(redis) = Redis::start() else { return };
    let pack = riskgate::pack::Pack::load(&shipped_pack()).unwrap();
    let plan = &pack.plan;
    let shared = inline_store(&redis, "shared").await;
    let memory = MemoryStore::new(MemoryLimits::default());
    let device_users = plan
        .windows
        .iter()
        .position(|w| &*w.name == "device_users_1h")
        .expect("the shipped pack counts a device's users");
    let mut peak = 0;
    for step in 0..900u64 {
        // 300 users, one every 10 s (a fifth of them dry runs, a seventh late).
        let user = step % 300;
        let mut ts = t0() + step as i64 * 10_000;
        if step % 7 == 3 {
            ts -= 20 * MIN; // late
        }
        let mut r = on_shared_device(user, ts);
        r.dry_run = step % 5 == 4;
        let record = !r.dry_run;
        let (in_memory, in_redis) = windows_in_both(&memory, &shared, plan, &r, step, record).await;
        assert_eq!(in_redis, in_memory, "step {step} (user {user}, ts {ts})");
        peak = peak.max(in_memory[device_users]);
    }
    assert!(peak > 200, "the device reached {peak} users in an hour");
}

/// At the bound on a key's distinct values (4,096), both stores make room
/// the same way: what left the span, then the least recently seen, and
/// never the value being recorded, a late one included.
#[tokio::test]
async fn a_full_distinct_window_makes_room_alike_in_redis_and_in_memory() {
    use riskgate::state::{memory::MemoryLimits, MemoryStore};
    let Some(redis) = Redis::start() else { return };
    let pack = riskgate::pack::Pack::load(&shipped_pack()).unwrap();
    let plan = &pack.plan;
    let shared = inline_store(&redis, "bound").await;
    let memory = MemoryStore::new(MemoryLimits::default());
    let t = t0();
    // 4,096 users on one device within a few minutes, then more: on time,
    // late (older than every value held), and on time again.
    let users = (0..4_100u64).map(|u| (u, t + u as i64 * 50));
    let late = [
        (5_000, t - 10_000),
        (5_001, t + 4_200 * 50),
        (5_002, t - 5_000),
    ];
    for (step, (user, ts)) in users.chain(late).enumerate() {
        let r = on_shared_device(user, ts);
        let (in_memory, in_redis) =
            windows_in_both(&memory, &shared, plan, &r, step as u64, true).await;
        assert_eq!(in_redis, in_memory, "step {step} (user {user}, ts {ts})");
    }
}

/// Not a test: what one `touch.lua` call costs Redis (its own
/// `INFO commandstats`, so client noise stays out), for BENCHMARKS.md.
/// 4,000 recharges from `RISKGATE_USERS` users (default 4,096) on one shared
/// device, or each on their own device with `RISKGATE_OWN_DEVICE=1`, after
/// 4,000 that fill the keys:
///
/// ```sh
/// cargo test --test redis measure -- --ignored --nocapture
/// ```
#[tokio::test]
#[ignore]
async fn measure_the_touch_script_on_a_shared_device() {
    use riskgate::state::redis::Opened;
    let redis = Redis::start().expect("redis-server");
    let pack = riskgate::pack::Pack::load(&shipped_pack()).unwrap();
    let shared = inline_store(&redis, "measure").await;
    let env = |name: &str| std::env::var(name).ok();
    let users: u64 = env("RISKGATE_USERS").map_or(4096, |u| u.parse().unwrap());
    let own_device = env("RISKGATE_OWN_DEVICE").is_some();
    let mut conn = redis.client().await;
    for (phase, from) in [("fill", 0), ("measure", 4_000)] {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await
            .unwrap();
        for step in from..from + 4_000u64 {
            let user = step % users;
            let mut r = on_shared_device(user, t0() + step as i64 * 500);
            if own_device {
                r.facts.device_id = format!("d{user}");
            }
            let opened = shared.open(&pack.plan, &r, None, step, true).await;
            assert!(matches!(opened, Ok(Opened::Decide { .. })), "step {step}");
        }
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        for line in stats.lines().filter(|l| l.contains("evalsha")) {
            println!("{phase}: users {users}, own device {own_device}: {line}");
        }
    }
}

/// A settle that lands after its request's claim lapsed (a slow Redis, a
/// retried settle) still stands: it puts the fingerprint back with the
/// decision, so a retry of the request replays it instead of deciding and
/// counting again, and another request under the id is still refused.
#[tokio::test]
async fn a_settle_after_the_claim_lapsed_still_stands() {
    use riskgate::decision::{Action as Decided, Decision};
    use riskgate::state::redis::Opened;
    use riskgate::state::Settled;
    let Some(redis) = Redis::start() else { return };
    let pack = riskgate::pack::Pack::load(&shipped_pack()).unwrap();
    let store = inline_store(&redis, "late").await;
    let r = on_shared_device(1, t0());
    let Opened::Decide { profile, .. } = store.open(&pack.plan, &r, None, 42, true).await.unwrap()
    else {
        panic!("a new request id");
    };
    // The claim lapses before the settle lands.
    let mut conn = redis.client().await;
    let record = format!("{{late}}:r:{}", r.request_id);
    let gone: i64 = redis::cmd("DEL")
        .arg(&record)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(gone, 1, "the claim was at {record}");
    let decision = Decision {
        request_id: r.request_id.clone(),
        action: Decided::Allow,
        challenge: String::new(),
        score: 0,
        reasons: Vec::new(),
        shadow_reasons: Vec::new(),
        ruleset_version: "v".into(),
    };
    let settled = Settled {
        decision: std::sync::Arc::new(decision),
        facts: r.facts.clone(),
        location: None,
    };
    store
        .settle(&pack.plan, &settled, 42, false, profile)
        .await
        .unwrap();
    match store.open(&pack.plan, &r, None, 42, true).await.unwrap() {
        Opened::Replay(s) => assert_eq!(s.decision.request_id, r.request_id),
        _ => panic!("the retry must replay the settled decision"),
    }
    assert!(matches!(
        store.open(&pack.plan, &r, None, 7, true).await.unwrap(),
        Opened::Conflict
    ));
}
