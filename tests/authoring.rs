//! The analyst's workflow: decision log, replay, hot reload, the admin API.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use riskgate::decision_log::{self, DecisionLog, LogConfig, Record};
use riskgate::pb::rule_admin_client::RuleAdminClient;
use riskgate::pb::{self, Action, OutcomeKind};
use riskgate::reload::Reloader;
use riskgate::replay;
use riskgate::state::memory::MemoryLimits;

fn pack_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&shipped_pack(), dir.path());
    dir
}

fn set_param(dir: &Path, line: &str, new: &str) {
    let path = dir.join("pack.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(line), "{line}");
    std::fs::write(&path, text.replace(line, new)).unwrap();
}

fn open_log(path: &Path) -> DecisionLog {
    DecisionLog::open(LogConfig {
        path: path.to_path_buf(),
        max_bytes: u64::MAX,
        keep: 1,
        queue: 100_000,
    })
    .unwrap()
}

/// Traffic with a known answer: user k{n}-{i} places n large orders (n = 3,
/// 4, 5), plus logins and outcomes for good measure.
async fn record_traffic(log_path: &Path) -> (usize, usize, usize) {
    let log = open_log(log_path);
    let mut s = start_logged(&shipped_pack(), MemoryLimits::default(), Some(log.clone())).await;
    let t = t0() - 10 * HOUR;
    let (mut n3, mut n4, mut n5) = (0, 0, 0);
    for i in 0..30 {
        let n = 3 + i % 3;
        let user = format!("k{n}-{i}");
        s.login(login(
            &format!("{user}-login"),
            &user,
            true,
            BEIJING,
            t + i as i64 * HOUR / 10,
        ))
        .await;
        for o in 0..n {
            let ts = t + i as i64 * HOUR / 10 + (o as i64 + 1) * MIN;
            s.eval(recharge(&format!("{user}-o{o}"), &user, 500, ts))
                .await;
        }
        match n {
            3 => n3 += 1,
            4 => n4 += 1,
            _ => n5 += 1,
        }
        s.outcome(&format!("{user}-o0"), OutcomeKind::Succeeded)
            .await;
    }
    // A dry run is logged but not replayed.
    let mut dry = recharge("dry", "someone", 10, t);
    dry.dry_run = true;
    s.eval(dry).await;
    log.close();
    (n3, n4, n5)
}

#[tokio::test]
async fn the_decision_log_records_what_the_rules_saw() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    record_traffic(&path).await;
    let (records, bad) = decision_log::read(&path).unwrap();
    assert_eq!(bad, 0);
    let evals: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            Record::Evaluate(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(evals.len(), 121, "120 orders and one dry run");
    assert_eq!(
        records
            .iter()
            .filter(|r| matches!(r, Record::Login(_)))
            .count(),
        30
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| matches!(r, Record::Outcome(_)))
            .count(),
        30
    );
    let fifth = evals
        .iter()
        .find(|e| e.request.request_id == "k5-2-o4")
        .unwrap();
    assert_eq!(fifth.windows["user_large_orders_10m"], 5);
    assert_eq!(fifth.decision.action, riskgate::decision::Action::Block);
    assert_eq!(fifth.decision.reasons[0].code, "BURST_FREQUENCY");
    assert_eq!(fifth.location.as_ref().unwrap().city, "Beijing");
    assert!(fifth.profile.located_events >= 1);
    assert_eq!(fifth.request.amount, 50_000);
}

#[tokio::test]
async fn replay_counts_the_transitions_of_a_changed_threshold_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let (n3, n4, n5) = record_traffic(&path).await;
    let candidate = pack_copy();
    set_param(
        candidate.path(),
        "burst_large_orders = 5 ",
        "burst_large_orders = 4 ",
    );
    let options = replay::Options {
        logs: vec![path.clone()],
        pack: candidate.path().to_path_buf(),
        baseline: None,
        show: 5,
    };
    let geo = riskgate::server::open_geo(Some(&shipped_pack().join("../geo/demo.csv"))).unwrap();
    let first = replay::run(&options, &geo).await.unwrap();
    assert_eq!(first.evaluations, 3 * n3 + 4 * n4 + 5 * n5);
    assert_eq!(first.dry_runs, 1);
    // Baseline (the log) blocks each 5th order; the candidate blocks 4th and 5th.
    assert_eq!(first.baseline.actions["block"], n5);
    assert_eq!(first.candidate.actions["block"], n4 + 2 * n5);
    assert_eq!(first.transitions["allow -> block"], n4 + n5);
    assert_eq!(first.transitions["block -> block"], n5);
    assert!(!first.transitions.contains_key("block -> allow"));
    assert_eq!(first.changed, n4 + n5);
    assert_eq!(first.first_changes.len(), 5);
    assert_eq!(
        first.first_changes[0].candidate_reasons,
        ["BURST_FREQUENCY"]
    );
    assert_eq!(first.candidate.hits["burst_user"], n4 + 2 * n5);
    // The same log and pack give the same output, byte for byte.
    let second = replay::run(&options, &geo).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first.render(), second.render());
    assert_eq!(
        serde_json::to_string(&first).unwrap(),
        serde_json::to_string(&second).unwrap()
    );
    // The shipped pack as baseline reproduces the logged decisions exactly.
    let same = replay::run(
        &replay::Options {
            pack: shipped_pack(),
            ..options.clone()
        },
        &geo,
    )
    .await
    .unwrap();
    assert_eq!(same.changed, 0, "{}", same.render());
    assert_eq!((same.skipped, same.events_refused), (0, 0));
}

/// A logged request that a pack refuses (here its id comes again with
/// another amount) is counted and named, and the baseline pack still sees
/// it: before, it vanished from both sides and the counts stopped adding up.
#[tokio::test]
async fn replay_counts_and_names_the_requests_a_pack_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    record_traffic(&path).await;
    let (records, _) = decision_log::read(&path).unwrap();
    let mut again = records
        .iter()
        .find_map(|r| match r {
            Record::Evaluate(e) if !e.request.dry_run => Some(e.clone()),
            _ => None,
        })
        .unwrap();
    again.request.amount += 100;
    again.request.timestamp_ms += 1;
    let id = again.request.request_id.clone();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&serde_json::to_string(&Record::Evaluate(again)).unwrap());
    text.push('\n');
    std::fs::write(&path, text).unwrap();

    let geo = riskgate::server::open_geo(Some(&shipped_pack().join("../geo/demo.csv"))).unwrap();
    let options = replay::Options {
        logs: vec![path],
        pack: shipped_pack(),
        baseline: Some(shipped_pack()),
        show: 5,
    };
    let summary = replay::run(&options, &geo).await.unwrap();
    assert_eq!(summary.skipped, 1, "{}", summary.render());
    assert!(
        summary.first_skips[0].starts_with(&format!("{id}: the candidate refused it")),
        "{:?}",
        summary.first_skips
    );
    let decided = |side: &replay::Side| side.actions.values().sum::<usize>();
    assert_eq!(decided(&summary.candidate), summary.evaluations - 1);
    assert_eq!(decided(&summary.baseline), summary.evaluations - 1);
    assert!(summary.render().contains("not compared: 1 evaluation(s)"));
}

async fn serve_admin(
    engine: riskgate::engine::Engine,
    reloader: Reloader,
    token: Option<&str>,
) -> RuleAdminClient<tonic::transport::Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = riskgate::api::admin::AdminApi::new(engine, reloader);
    let token = token.map(str::to_string);
    tokio::spawn(riskgate::api::serve_admin(
        api,
        token,
        listener,
        std::future::pending(),
    ));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    RuleAdminClient::new(channel)
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test]
async fn the_admin_api_shows_the_ruleset_and_reloads_it() {
    let dir = pack_copy();
    let mut s = start_with(dir.path(), MemoryLimits::default()).await;
    let reloader = Reloader::new(s.engine.clone(), dir.path().to_path_buf());
    let mut admin = serve_admin(s.engine.clone(), reloader, Some("s3cret")).await;

    let err = admin
        .get_ruleset(pb::GetRulesetRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = admin
        .get_ruleset(with_token(pb::GetRulesetRequest {}, "guess"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let mut frozen = recharge("f1", "u1", 20, t0());
    frozen.account.as_mut().unwrap().status = pb::AccountStatus::Frozen as i32;
    s.eval(frozen).await;
    let before = admin
        .get_ruleset(with_token(pb::GetRulesetRequest {}, "s3cret"))
        .await
        .unwrap()
        .into_inner();
    let v1 = s.engine.pack().version.to_string();
    assert_eq!(before.version, v1);
    let state = before
        .rules
        .iter()
        .find(|r| r.id == "account_state")
        .unwrap();
    assert_eq!((state.hits, state.mode.as_str()), (1, "enforce"));
    assert_eq!(
        before
            .rules
            .iter()
            .find(|r| r.id == "impossible_travel")
            .unwrap()
            .mode,
        "shadow"
    );

    // A broken script: refused with its position, the old pack serves on.
    std::fs::write(
        dir.path().join("duplicate.rhai"),
        "if window.same_order_10m >= {\n",
    )
    .unwrap();
    let r = admin
        .reload_rules(with_token(pb::ReloadRulesRequest {}, "s3cret"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.ok);
    assert_eq!(r.version, v1);
    assert!(
        r.errors.iter().any(|e| e.starts_with("duplicate.rhai:")),
        "{:?}",
        r.errors
    );
    assert_eq!(
        s.eval(recharge("after-broken", "u2", 20, t0()))
            .await
            .ruleset_version,
        v1
    );
    let status = admin
        .get_ruleset(with_token(pb::GetRulesetRequest {}, "s3cret"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.reload_failures, 1);
    assert!(status.last_reload_error.contains("duplicate.rhai"));

    // A pack whose own scenarios fail is refused too, with the diff.
    std::fs::copy(
        shipped_pack().join("duplicate.rhai"),
        dir.path().join("duplicate.rhai"),
    )
    .unwrap();
    set_param(
        dir.path(),
        "burst_large_orders = 5 ",
        "burst_large_orders = 50 ",
    );
    let r = admin
        .reload_rules(with_token(pb::ReloadRulesRequest {}, "s3cret"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.ok);
    assert!(
        r.errors
            .iter()
            .any(|e| e.contains("burst_user.toml") && e.contains("BURST_FREQUENCY")),
        "{:?}",
        r.errors
    );

    // A good change goes live: a new rule, in shadow first.
    set_param(
        dir.path(),
        "burst_large_orders = 50 ",
        "burst_large_orders = 5 ",
    );
    std::fs::write(
        dir.path().join("promo_abuse.rhai"),
        "if request.attr(\"promo\") == \"stacked\" { block(\"PROMO_ABUSE\", \"Promotions cannot be stacked.\") }",
    )
    .unwrap();
    let manifest = std::fs::read_to_string(dir.path().join("pack.toml")).unwrap();
    let with_rule = |mode: &str| {
        format!("{manifest}\n[[rules]]\nid = \"promo_abuse\"\nfile = \"promo_abuse.rhai\"\nmode = \"{mode}\"\n")
    };
    std::fs::write(dir.path().join("pack.toml"), with_rule("shadow")).unwrap();
    let reload = |mut admin: RuleAdminClient<tonic::transport::Channel>| async move {
        admin
            .reload_rules(with_token(pb::ReloadRulesRequest {}, "s3cret"))
            .await
            .unwrap()
            .into_inner()
    };
    let r = reload(admin.clone()).await;
    assert!(r.ok, "{:?}", r.errors);
    assert_ne!(r.version, v1);
    assert_eq!(r.previous_version, v1);
    let promo = |id: &str| {
        let mut req = recharge(id, id, 20, t0());
        req.attributes.insert("promo".into(), "stacked".into());
        req
    };
    let d = s.eval(promo("p1")).await;
    assert_eq!(d.ruleset_version, r.version);
    assert_decision(&d, Action::Allow, None);
    assert_eq!(shadow_codes(&d), ["PROMO_ABUSE"]);
    // Promoted to enforce: one word in the manifest and a reload.
    std::fs::write(dir.path().join("pack.toml"), with_rule("enforce")).unwrap();
    let r = reload(admin.clone()).await;
    assert!(r.ok, "{:?}", r.errors);
    assert_decision(
        &s.eval(promo("p2")).await,
        Action::Block,
        Some("PROMO_ABUSE"),
    );
    let after = admin
        .get_ruleset(with_token(pb::GetRulesetRequest {}, "s3cret"))
        .await
        .unwrap()
        .into_inner();
    let rule = after.rules.iter().find(|r| r.id == "promo_abuse").unwrap();
    assert_eq!((rule.mode.as_str(), rule.hits), ("enforce", 1));
    assert_eq!(after.reloads, 2);
    // Reloading the same folder again changes nothing.
    let r = admin
        .reload_rules(with_token(pb::ReloadRulesRequest {}, "s3cret"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.ok && r.unchanged);
}

/// Version A tags every decision PACK_A, version B PACK_B.
fn write_marker(dir: &Path, tag: &str) {
    std::fs::write(
        dir.join("marker.rhai"),
        format!("notice(\"{tag}\", \"which pack\")"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_no_request_and_never_mix_packs() {
    let dir = pack_copy();
    let manifest = std::fs::read_to_string(dir.path().join("pack.toml")).unwrap();
    std::fs::write(
        dir.path().join("pack.toml"),
        format!("{manifest}\n[[rules]]\nid = \"marker\"\nfile = \"marker.rhai\"\n"),
    )
    .unwrap();
    write_marker(dir.path(), "PACK_A");
    // The marker shows in every decision, which the shipped scenarios (exact
    // about shadow reasons) would refuse: this pack goes without them.
    std::fs::remove_dir_all(dir.path().join("tests")).unwrap();
    let s = start_with(dir.path(), MemoryLimits::default()).await;
    let reloader = Reloader::new(s.engine.clone(), dir.path().to_path_buf());
    let version_a = s.engine.pack().version.to_string();

    let mut load = Vec::new();
    for w in 0..4 {
        let mut client = s.client.clone();
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..250 {
                let r = recharge(&format!("w{w}-{i}"), &format!("user{w}-{i}"), 20, t0());
                let d = client
                    .evaluate(r)
                    .await
                    .expect("no request fails during reloads")
                    .into_inner();
                seen.push(d);
            }
            seen
        }));
    }
    let mut version_b = String::new();
    for round in 0..6 {
        write_marker(dir.path(), if round % 2 == 0 { "PACK_B" } else { "PACK_A" });
        let r = reloader.reload("test").await;
        assert!(r.ok, "{:?}", r.errors);
        if round == 0 {
            version_b = r.version.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut total = 0;
    let mut by_version = std::collections::HashMap::new();
    for task in load {
        for d in task.await.unwrap() {
            total += 1;
            let tag = if d.ruleset_version == version_a {
                "PACK_A"
            } else {
                assert_eq!(d.ruleset_version, version_b);
                "PACK_B"
            };
            assert_eq!(shadow_codes(&d), [tag], "one pack per decision: {d:?}");
            *by_version.entry(tag).or_insert(0) += 1;
        }
    }
    assert_eq!(total, 1000);
    assert_eq!(by_version.len(), 2, "both packs served: {by_version:?}");
    assert_eq!(reloader.stats().reloads, 6);
}

#[tokio::test]
async fn a_broken_pack_dropped_into_the_folder_leaves_the_old_one_serving() {
    let dir = pack_copy();
    let mut s = start_with(dir.path(), MemoryLimits::default()).await;
    let reloader = Reloader::new(s.engine.clone(), dir.path().to_path_buf());
    let watch = reloader.spawn_watch(Duration::from_millis(50));
    let v1 = s.engine.pack().version.to_string();
    // Windows survive reloads: three large orders before...
    for i in 0..3 {
        s.eval(recharge(&format!("o{i}"), "u1", 500, t0() + i * MIN))
            .await;
    }

    std::fs::write(
        dir.path().join("burst_user.rhai"),
        "let n = window.no_such_window;\n",
    )
    .unwrap();
    wait_for(|| reloader.stats().failures >= 1).await;
    assert_eq!(s.engine.pack().version.to_string(), v1);
    assert!(
        reloader.stats().last_error.contains("burst_user.rhai:1:"),
        "{}",
        reloader.stats().last_error
    );
    let d = s.eval(recharge("o3", "u1", 500, t0() + 3 * MIN)).await;
    assert_eq!(d.ruleset_version, v1);

    // Fixed, with a lower threshold: the new pack takes over, and the four
    // orders already in the window count.
    std::fs::copy(
        shipped_pack().join("burst_user.rhai"),
        dir.path().join("burst_user.rhai"),
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.path().join("pack.toml")).unwrap();
    std::fs::write(
        dir.path().join("pack.toml"),
        text.replace(
            "burst_large_orders = 5 ",
            "burst_large_orders = 5  # unchanged, new version ",
        ),
    )
    .unwrap();
    wait_for(|| reloader.stats().reloads >= 1).await;
    let d = s.eval(recharge("o4", "u1", 500, t0() + 4 * MIN)).await;
    assert_ne!(d.ruleset_version, v1);
    assert_decision(&d, Action::Block, Some("BURST_FREQUENCY"));
    watch.abort();
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for the reloader");
}

#[test]
fn shared_handles_are_cheap() {
    // The engine and reloader are Clone handles over shared state.
    fn clone<T: Clone>() {}
    clone::<riskgate::engine::Engine>();
    clone::<Reloader>();
    let _ = Arc::new(0);
}
