//! The API contract: idempotency, dry runs, input errors, outcomes, rule
//! failures, memory bounds and concurrency, through a real server.

mod common;

use std::path::Path;

use common::*;
use riskgate::pb::{self, Action, OutcomeKind};
use riskgate::state::memory::MemoryLimits;
use tonic::Code;

#[tokio::test]
async fn a_retried_request_id_replays_and_never_double_counts() {
    let mut s = start().await;
    let t = t0();
    for i in 0..3 {
        s.eval(recharge(&format!("o{i}"), "u1", 500, t + i * MIN))
            .await;
    }
    let fourth = recharge("o3", "u1", 500, t + 3 * MIN);
    let first = s.eval(fourth.clone()).await;
    assert!(!first.replayed);
    for _ in 0..5 {
        let again = s.eval(fourth.clone()).await;
        assert!(again.replayed);
        assert_eq!(again.action, first.action);
        assert_eq!(again.ruleset_version, first.ruleset_version);
        assert_eq!(again.request_id, "o3");
    }
    // Had the retries counted, this would be the ninth order; it is the fifth.
    let d = s.eval(recharge("o4", "u1", 500, t + 4 * MIN)).await;
    assert_decision(&d, Action::Block, Some("BURST_FREQUENCY"));
    assert!(d.reasons[0].message.contains("(5 in 10 minutes)"), "{d:?}");
}

#[tokio::test]
async fn the_same_request_id_for_another_request_is_refused() {
    let mut s = start().await;
    let t = t0();
    s.eval(recharge("dup", "u1", 100, t)).await;
    for changed in [recharge("dup", "u2", 100, t), recharge("dup", "u1", 101, t)] {
        let err = s.client.evaluate(changed).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        assert!(err.message().contains("dup"), "{err:?}");
    }
}

#[tokio::test]
async fn concurrent_retries_of_one_request_decide_once() {
    let s = start().await;
    let t = t0();
    let mut calls = Vec::new();
    for _ in 0..20 {
        let mut c = s.client.clone();
        let r = recharge("same", "u1", 500, t);
        calls.push(tokio::spawn(async move {
            c.evaluate(r).await.unwrap().into_inner()
        }));
    }
    let mut fresh = 0;
    for c in calls {
        fresh += usize::from(!c.await.unwrap().replayed);
    }
    assert_eq!(fresh, 1);
}

#[tokio::test]
async fn a_dry_run_decides_but_records_nothing() {
    let mut s = start().await;
    let t = t0();
    for i in 0..4 {
        s.eval(recharge(&format!("o{i}"), "u1", 500, t + i * MIN))
            .await;
    }
    // Dry runs see themselves in the windows (the fifth would block)...
    for i in 0..3 {
        let mut r = recharge(&format!("dry{i}"), "u1", 500, t + 4 * MIN);
        r.dry_run = true;
        let d = s.eval(r).await;
        assert_decision(&d, Action::Block, Some("BURST_FREQUENCY"));
        assert!(!d.replayed);
    }
    // ...but record nothing: a dry-run id is free for a real request, and
    // the real fifth order is counted as the fifth.
    let mut r = recharge("dry0", "u1", 500, t + 4 * MIN);
    r.target = "other".into();
    let d = s.eval(r).await;
    assert!(d.reasons[0].message.contains("(5 in 10 minutes)"), "{d:?}");
    // A dry run of a decided id replays it.
    let mut r = recharge("o0", "u1", 500, t);
    r.dry_run = true;
    assert!(s.eval(r).await.replayed);
}

/// Breaks one field of a request.
type Mutation = Box<dyn Fn(&mut pb::EvaluateRequest)>;

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let mut s = start().await;
    let t = t0();
    let base = recharge("bad", "u1", 100, t);
    let cases: Vec<(&str, Mutation)> = vec![
        ("request_id", Box::new(|r| r.request_id.clear())),
        ("user_id", Box::new(|r| r.user_id.clear())),
        ("ip", Box::new(|r| r.ip.clear())),
        ("ip", Box::new(|r| r.ip = "300.1.2.3".into())),
        ("ip", Box::new(|r| r.ip = "example.com".into())),
        ("amount", Box::new(|r| r.amount = 0)),
        ("amount", Box::new(|r| r.amount = -100)),
        ("amount", Box::new(|r| r.amount = i64::MAX)),
        ("user_id", Box::new(|r| r.user_id = "x".repeat(129))),
        ("request_id", Box::new(|r| r.request_id = "r".repeat(129))),
        ("target", Box::new(|r| r.target = "t".repeat(129))),
        ("device_id", Box::new(|r| r.device_id = "d".repeat(129))),
        ("channel", Box::new(|r| r.channel = "c".repeat(33))),
        ("currency", Box::new(|r| r.currency = "yuan".into())),
        (
            "attributes",
            Box::new(|r| r.attributes = (0..33).map(|i| (format!("k{i}"), "v".into())).collect()),
        ),
        (
            "attributes",
            Box::new(|r| {
                r.attributes.insert("note".into(), "v".repeat(257));
            }),
        ),
        (
            "timestamp_ms",
            Box::new(|r| r.timestamp_ms = riskgate::now_ms() - 31 * DAY),
        ),
        (
            "timestamp_ms",
            Box::new(|r| r.timestamp_ms = riskgate::now_ms() + HOUR),
        ),
        (
            "account.status",
            Box::new(|r| r.account.as_mut().unwrap().status = 99),
        ),
    ];
    for (field, mutate) in cases {
        let mut r = base.clone();
        mutate(&mut r);
        let err = s.client.evaluate(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // Nothing of the refused requests was recorded: the id is still free.
    let d = s.eval(base).await;
    assert!(!d.replayed);
    assert_decision(&d, Action::Allow, None);
}

#[tokio::test]
async fn events_and_outcomes_are_validated_too() {
    let mut s = start().await;
    let mut ev = login("e1", "u1", true, BEIJING, 0);
    ev.kind = pb::EventKind::Unspecified as i32;
    let err = s.client.record_event(ev).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("kind"));
    let err = s
        .client
        .record_event(login("e2", "", true, BEIJING, 0))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("user_id"), "{err:?}");
    let err = s
        .client
        .record_event(login("e3", "u1", true, "nope", 0))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("ip"), "{err:?}");
    // An event id reused for another user's event: named as the event id.
    s.login(login("e4", "u1", true, BEIJING, 0)).await;
    let err = s
        .client
        .record_event(login("e4", "u2", true, BEIJING, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(
        err.message(),
        "event_id `e4` was already used for another user's event"
    );

    let outcome = |id: &str, user: &str, kind: OutcomeKind| pb::Outcome {
        request_id: id.into(),
        user_id: user.into(),
        kind: kind as i32,
        timestamp_ms: 0,
    };
    let err = s
        .client
        .report_outcome(outcome("", "", OutcomeKind::Succeeded))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("request_id"));
    let err = s
        .client
        .report_outcome(outcome("never", "", OutcomeKind::Succeeded))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    s.eval(recharge("known", "u1", 10, t0())).await;
    let err = s
        .client
        .report_outcome(outcome("known", "u2", OutcomeKind::Succeeded))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("user_id"));
    let err = s
        .client
        .report_outcome(outcome("known", "u1", OutcomeKind::Unspecified))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("kind"));
    assert!(
        !s.client
            .report_outcome(outcome("known", "u1", OutcomeKind::Succeeded))
            .await
            .unwrap()
            .into_inner()
            .replayed
    );
    assert!(
        s.client
            .report_outcome(outcome("known", "u1", OutcomeKind::Succeeded))
            .await
            .unwrap()
            .into_inner()
            .replayed
    );
    // A payment that succeeded did not fail: refused, naming both.
    let err = s
        .client
        .report_outcome(outcome("known", "u1", OutcomeKind::Failed))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().starts_with("outcome"), "{err:?}");
    assert!(
        err.message().contains("succeeded") && err.message().contains("failed"),
        "{err:?}"
    );
    // A chargeback after a success is what chargebacks are.
    assert!(
        !s.client
            .report_outcome(outcome("known", "u1", OutcomeKind::Chargeback))
            .await
            .unwrap()
            .into_inner()
            .replayed
    );
}

/// Copies the shipped pack into a temp dir, with `edit` applied to it.
fn pack_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&shipped_pack(), dir.path());
    edit(dir.path());
    dir
}

fn add_rule(dir: &Path, id: &str, script: &str, extra: &str) {
    std::fs::write(dir.join(format!("{id}.rhai")), script).unwrap();
    let mut manifest = std::fs::read_to_string(dir.join("pack.toml")).unwrap();
    manifest.push_str(&format!(
        "\n[[rules]]\nid = \"{id}\"\nfile = \"{id}.rhai\"\n{extra}\n"
    ));
    std::fs::write(dir.join("pack.toml"), manifest).unwrap();
}

#[tokio::test]
async fn a_failing_rule_is_reported_and_skipped_by_default() {
    let dir = pack_copy(|d| {
        // Runs past the operations limit on large amounts.
        add_rule(d, "runaway", "if request.amount > 10000 { loop { } }", "");
        add_rule(
            d,
            "divides",
            "let x = 1 / (request.amount - request.amount); ()",
            "",
        );
        add_rule(d, "wrong_type", "42", "");
    });
    let mut s = start_with(dir.path(), MemoryLimits::default()).await;
    let d = s.eval(recharge("e1", "u1", 200, t0())).await;
    assert_eq!(action(&d), Action::Allow, "{d:?}");
    let errors: Vec<_> = d
        .reasons
        .iter()
        .filter(|r| r.code == "RULE_ERROR")
        .collect();
    assert_eq!(errors.len(), 3, "{d:?}");
    assert_eq!(errors[0].rule_id, "runaway");
    assert!(
        errors[0].message.contains("operations"),
        "{}",
        errors[0].message
    );
    assert!(errors.iter().all(|r| r.action == Action::Allow as i32));
    // Below the runaway threshold only the other two fail.
    let d = s.eval(recharge("e2", "u2", 50, t0())).await;
    assert_eq!(
        d.reasons.iter().filter(|r| r.code == "RULE_ERROR").count(),
        2
    );
}

#[tokio::test]
async fn a_failing_rule_can_block_when_the_manifest_says_so() {
    let dir = pack_copy(|d| {
        add_rule(
            d,
            "strict",
            "if request.amount > 0 { throw \"lookup failed\" }",
            "on_error = \"block\"",
        );
    });
    let mut s = start_with(dir.path(), MemoryLimits::default()).await;
    let d = s.eval(recharge("e1", "u1", 20, t0())).await;
    assert_decision(&d, Action::Block, Some("RULE_ERROR"));
    assert!(d.reasons[0].message.contains("lookup failed"));
}

#[tokio::test]
async fn shadow_rules_report_but_never_change_the_action() {
    let dir = pack_copy(|d| {
        add_rule(
            d,
            "everything",
            "block(\"TRY_ME\", \"testing\")",
            "mode = \"shadow\"",
        );
    });
    let mut s = start_with(dir.path(), MemoryLimits::default()).await;
    let d = s.eval(recharge("e1", "u1", 20, t0())).await;
    assert_decision(&d, Action::Allow, None);
    assert_eq!(shadow_codes(&d), ["TRY_ME"]);
    assert_eq!(d.shadow_reasons[0].action, Action::Block as i32);
}

#[tokio::test]
async fn a_flood_of_unique_keys_stays_under_the_cap() {
    let limits = MemoryLimits {
        max_tracked_keys: 500,
        max_idempotency_records: 800,
        ..MemoryLimits::default()
    };
    let mut s = start_with(&shipped_pack(), limits).await;
    let t = t0();
    // A user that stays active through the flood keeps its windows.
    for i in 0..3000 {
        let mut r = recharge(&format!("f{i}"), &format!("bot{i}"), 10, t + i);
        r.ip = format!("198.51.{}.{}", i / 250, i % 250);
        s.eval(r).await;
        if i % 50 == 0 {
            s.eval(recharge(&format!("keep{i}"), "steady", 600, t + i))
                .await;
        }
        let stats = s.engine.store().stats();
        assert!(stats.window_keys <= 500, "{stats:?}");
        assert!(stats.profiles <= 500, "{stats:?}");
        assert!(stats.idempotency_records <= 800, "{stats:?}");
    }
    assert!(s.engine.store().stats().evicted > 0);
    // The busy user's burst window survived the flood: its 61st large order
    // within ten minutes is blocked.
    let d = s.eval(recharge("keep-last", "steady", 600, t + 3000)).await;
    assert_decision(&d, Action::Block, Some("BURST_FREQUENCY"));
}

#[tokio::test]
async fn fifty_simultaneous_large_orders_cannot_slip_under_the_burst_limit() {
    let s = start().await;
    let t = t0();
    let mut calls = Vec::new();
    for i in 0..50 {
        let mut c = s.client.clone();
        let r = recharge(&format!("c{i}"), "racer", 600, t);
        calls.push(tokio::spawn(async move {
            c.evaluate(r).await.unwrap().into_inner()
        }));
    }
    let mut allowed = 0;
    for c in calls {
        allowed += usize::from(action(&c.await.unwrap()) == Action::Allow);
    }
    assert_eq!(allowed, 4);
}

#[tokio::test]
async fn simultaneous_recharges_cannot_overshoot_the_daily_sum() {
    let s = start().await;
    let t = t0();
    let mut calls = Vec::new();
    for i in 0..30 {
        let mut c = s.client.clone();
        let mut r = recharge(&format!("c{i}"), "racer", 400, t);
        r.account.as_mut().unwrap().real_name_verified = false;
        calls.push(tokio::spawn(async move {
            c.evaluate(r).await.unwrap().into_inner()
        }));
    }
    let mut passed = 0;
    for c in calls {
        passed += usize::from(action(&c.await.unwrap()) != Action::Block);
    }
    // 12 x 400 = 4,800 yuan; a 13th would take the day over 5,000.
    assert_eq!(passed, 12);
}

#[tokio::test]
async fn health_reports_serving() {
    let s = start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    for service in ["", "riskgate.v1.RiskEngine"] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
}

#[tokio::test]
async fn decisions_name_the_pack_version() {
    let mut s = start().await;
    let d = s.eval(recharge("v", "u1", 10, t0())).await;
    assert_eq!(d.ruleset_version, s.engine.pack().version.to_string());
    assert_eq!(d.ruleset_version.len(), 16);
}

#[tokio::test]
async fn the_baseline_server_answers_allow_to_everything() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(riskgate::api::serve_baseline(
        listener,
        std::future::pending(),
    ));
    let mut client = pb::risk_engine_client::RiskEngineClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // Even what the engine would block or refuse: the baseline decides nothing.
    let mut r = recharge("b1", "fraud-ring-001", 10, t0());
    r.amount = 0;
    let d = client.evaluate(r).await.unwrap().into_inner();
    assert_eq!((action(&d), d.request_id.as_str()), (Action::Allow, "b1"));
    assert_eq!(d.ruleset_version, "baseline");
}
