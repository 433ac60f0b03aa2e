//! Every shipped rule, positive and negative, through a real server.

mod common;

use common::*;
use riskgate::pb::{AccountStatus, Action, OutcomeKind};

#[tokio::test]
async fn burst_blocks_the_fifth_large_order_in_ten_minutes() {
    let mut s = start().await;
    let t = t0();
    for i in 0..4 {
        let d = s
            .eval(recharge(&format!("b{i}"), "u1", 500, t + i * MIN))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
    let d = s.eval(recharge("b4", "u1", 500, t + 4 * MIN)).await;
    assert_decision(&d, Action::Block, Some("BURST_FREQUENCY"));
    assert!(!d.reasons[0].message.is_empty());
    assert!(d.reasons[0].score > 0);
}

/// A caller whose clock runs minutes fast does not reset the burst window
/// for everyone on time: its time is taken as the server's.
#[tokio::test]
async fn a_request_stamped_ahead_does_not_drop_a_burst() {
    let mut s = start().await;
    let now = riskgate::now_ms();
    for i in 0..4 {
        let d = s
            .eval(recharge(
                &format!("b{i}"),
                "u1",
                500,
                now - 8 * MIN + i * MIN,
            ))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
    // A small order stamped 4 minutes ahead (within the accepted skew).
    let d = s.eval(recharge("ahead", "u1", 20, now + 4 * MIN)).await;
    assert_decision(&d, Action::Allow, None);
    let d = s.eval(recharge("b4", "u1", 500, now)).await;
    assert_decision(&d, Action::Block, Some("BURST_FREQUENCY"));
}

#[tokio::test]
async fn burst_ignores_small_orders_and_old_ones() {
    let mut s = start().await;
    let t = t0();
    // Five orders just under the large threshold.
    for i in 0..5 {
        let d = s
            .eval(recharge(&format!("s{i}"), "u1", 499, t + i * MIN))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
    // Four large orders, then a fifth after the first left the window.
    for i in 0..4 {
        let d = s
            .eval(recharge(&format!("l{i}"), "u2", 600, t + i * 3 * MIN))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
    let d = s.eval(recharge("l4", "u2", 600, t + 11 * MIN)).await;
    assert_decision(&d, Action::Allow, None);
}

#[tokio::test]
async fn many_users_on_one_device_are_challenged() {
    let mut s = start().await;
    let t = t0();
    for i in 0..4 {
        let mut r = recharge(&format!("d{i}"), &format!("user{i}"), 20, t + i * MIN);
        r.device_id = "shared-phone".into();
        assert_decision(&s.eval(r).await, Action::Allow, None);
    }
    let mut r = recharge("d4", "user4", 20, t + 5 * MIN);
    r.device_id = "shared-phone".into();
    let d = s.eval(r).await;
    assert_decision(&d, Action::Challenge, Some("DEVICE_MANY_USERS"));
    assert_eq!(d.challenge, "captcha");
}

#[tokio::test]
async fn many_recharges_from_one_device_are_challenged() {
    let mut s = start().await;
    let t = t0();
    for i in 0..20 {
        let d = s
            .eval(recharge(&format!("r{i}"), "u1", 10, t + i * 1000))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
    let d = s.eval(recharge("r20", "u1", 10, t + 21_000)).await;
    assert_decision(&d, Action::Challenge, Some("DEVICE_BURST"));
}

#[tokio::test]
async fn one_campus_address_takes_hundreds_of_users_then_challenges() {
    let mut s = start().await;
    let t = t0();
    // 300 students behind one NAT address, each with a device of their own.
    for i in 0..300 {
        let d = s
            .eval(recharge(
                &format!("c{i}"),
                &format!("stu{i}"),
                30,
                t + i * 100,
            ))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
    let d = s.eval(recharge("c300", "stu300", 30, t + 30_100)).await;
    assert_decision(&d, Action::Challenge, Some("IP_BURST"));
}

/// Three allowed recharges from Beijing make Beijing the usual region.
async fn settle_in_beijing(s: &mut TestServer, user: &str, t: i64) {
    for i in 0..3 {
        let d = s
            .eval(recharge(&format!("{user}-home{i}"), user, 60, t + i * HOUR))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
}

#[tokio::test]
async fn recharge_from_an_unusual_region_is_challenged() {
    let mut s = start().await;
    let t = t0() - 20 * HOUR;
    settle_in_beijing(&mut s, "u1", t).await;
    // Same region, another address: fine.
    let mut r = recharge("home-again", "u1", 80, t + 4 * HOUR);
    r.ip = BEIJING_2.into();
    assert_decision(&s.eval(r).await, Action::Allow, None);
    // Chengdu, a day later: challenged.
    let mut r = recharge("away", "u1", 80, t + 20 * HOUR);
    r.ip = CHENGDU.into();
    let d = s.eval(r).await;
    assert_decision(&d, Action::Challenge, Some("LOCATION_UNUSUAL"));
    assert_eq!(d.challenge, "sms");
    assert!(d.reasons[0].message.contains("Sichuan"), "{d:?}");
}

#[tokio::test]
async fn unusual_region_needs_history_and_a_known_location() {
    let mut s = start().await;
    let t = t0() - 20 * HOUR;
    // Only two located events: not enough history to judge.
    for i in 0..2 {
        s.eval(recharge(&format!("h{i}"), "u1", 60, t + i * HOUR))
            .await;
    }
    let mut r = recharge("away", "u1", 80, t + 10 * HOUR);
    r.ip = CHENGDU.into();
    assert_decision(&s.eval(r).await, Action::Allow, None);
    // An address with no location is not judged either.
    settle_in_beijing(&mut s, "u2", t).await;
    let mut r = recharge("nowhere", "u2", 80, t + 10 * HOUR);
    r.ip = UNKNOWN_IP.into();
    assert_decision(&s.eval(r).await, Action::Allow, None);
}

#[tokio::test]
async fn small_amounts_from_an_unusual_region_are_only_noted() {
    let mut s = start().await;
    let t = t0() - 20 * HOUR;
    settle_in_beijing(&mut s, "u1", t).await;
    let mut r = recharge("small-away", "u1", 49, t + 10 * HOUR);
    r.ip = CHENGDU.into();
    let d = s.eval(r).await;
    assert_decision(&d, Action::Allow, None);
    assert!(shadow_codes(&d).contains(&"LOCATION_UNUSUAL"), "{d:?}");
}

#[tokio::test]
async fn login_from_a_new_region_then_a_quick_recharge() {
    let mut s = start().await;
    let t = t0() - 20 * HOUR;
    settle_in_beijing(&mut s, "u1", t).await;
    s.login(login("l1", "u1", true, HARBIN, t + 10 * HOUR))
        .await;
    // Five minutes later, from the new place: challenged.
    let mut r = recharge("soon", "u1", 100, t + 10 * HOUR + 5 * MIN);
    r.ip = HARBIN.into();
    let d = s.eval(r).await;
    assert_decision(&d, Action::Challenge, Some("NEW_REGION_LOGIN"));
    // A large amount right after: blocked.
    let mut r = recharge("soon-big", "u1", 2500, t + 10 * HOUR + 6 * MIN);
    r.ip = HARBIN.into();
    let d = s.eval(r).await;
    assert_decision(&d, Action::Block, Some("NEW_REGION_LOGIN"));
}

#[tokio::test]
async fn new_region_login_does_not_matter_after_ten_minutes_or_at_home() {
    let mut s = start().await;
    let t = t0() - 20 * HOUR;
    settle_in_beijing(&mut s, "u1", t).await;
    s.login(login("l1", "u1", true, HARBIN, t + 10 * HOUR))
        .await;
    let mut r = recharge("later", "u1", 100, t + 10 * HOUR + 11 * MIN);
    r.ip = HARBIN.into();
    assert_decision(&s.eval(r).await, Action::Allow, None);
    // A login from the usual region is not new.
    settle_in_beijing(&mut s, "u2", t).await;
    s.login(login("l2", "u2", true, BEIJING, t + 10 * HOUR))
        .await;
    let r = recharge("u2-soon", "u2", 100, t + 10 * HOUR + MIN);
    assert_decision(&s.eval(r).await, Action::Allow, None);
}

#[tokio::test]
async fn implausible_travel_is_flagged_in_shadow() {
    let mut s = start().await;
    let t = t0() - 20 * HOUR;
    settle_in_beijing(&mut s, "u1", t).await;
    s.login(login("l1", "u1", true, URUMQI, t + 5 * HOUR)).await;
    // Urumqi to Beijing (about 2,400 km) in 30 minutes.
    let r = recharge("jump", "u1", 100, t + 5 * HOUR + 30 * MIN);
    let d = s.eval(r).await;
    assert!(shadow_codes(&d).contains(&"IMPOSSIBLE_TRAVEL"), "{d:?}");
    // Shadow rules never change the action on their own.
    assert!(!codes(&d).contains(&"IMPOSSIBLE_TRAVEL"));
    // A day later the same trip is plausible.
    let r = recharge("slow", "u1", 100, t + 19 * HOUR);
    let d = s.eval(r).await;
    assert!(!shadow_codes(&d).contains(&"IMPOSSIBLE_TRAVEL"), "{d:?}");
}

fn unverified(mut r: riskgate::pb::EvaluateRequest) -> riskgate::pb::EvaluateRequest {
    r.account.as_mut().unwrap().real_name_verified = false;
    r
}

#[tokio::test]
async fn large_single_recharge_needs_real_name() {
    let mut s = start().await;
    let t = t0();
    let d = s.eval(unverified(recharge("big", "u1", 5000, t))).await;
    assert_decision(&d, Action::Block, Some("REAL_NAME_REQUIRED"));
    let d = s.eval(unverified(recharge("under", "u2", 4999, t))).await;
    assert_decision(&d, Action::Allow, None);
    // Verified: a single 5,000 is fine.
    let d = s.eval(recharge("ok", "u3", 5000, t)).await;
    assert_decision(&d, Action::Allow, None);
}

#[tokio::test]
async fn daily_cumulative_needs_real_name_or_an_sms() {
    let mut s = start().await;
    let t = t0();
    assert_decision(
        &s.eval(unverified(recharge("a1", "u1", 3000, t))).await,
        Action::Allow,
        None,
    );
    let d = s
        .eval(unverified(recharge("a2", "u1", 2500, t + HOUR)))
        .await;
    assert_decision(&d, Action::Block, Some("REAL_NAME_REQUIRED"));
    // The blocked 2,500 was released: 3,000 + 1,500 is under the limit.
    let d = s
        .eval(unverified(recharge("a3", "u1", 1500, t + 2 * HOUR)))
        .await;
    assert_decision(&d, Action::Allow, None);
    // A verified account over the daily limit confirms by SMS.
    assert_decision(
        &s.eval(recharge("v1", "u2", 3000, t)).await,
        Action::Allow,
        None,
    );
    let d = s.eval(recharge("v2", "u2", 2500, t + HOUR)).await;
    assert_decision(&d, Action::Challenge, Some("DAILY_LIMIT_SMS"));
    assert_eq!(d.challenge, "sms");
}

#[tokio::test]
async fn failed_charges_leave_the_daily_sum() {
    let mut s = start().await;
    let t = t0();
    assert_decision(
        &s.eval(unverified(recharge("f1", "u1", 3000, t))).await,
        Action::Allow,
        None,
    );
    assert!(!s.outcome("f1", OutcomeKind::Failed).await);
    // The failed 3,000 no longer counts: 2,500 passes.
    let d = s
        .eval(unverified(recharge("f2", "u1", 2500, t + HOUR)))
        .await;
    assert_decision(&d, Action::Allow, None);
    // Reporting the failure again changes nothing.
    assert!(s.outcome("f1", OutcomeKind::Failed).await);
    let d = s
        .eval(unverified(recharge("f3", "u1", 2600, t + 2 * HOUR)))
        .await;
    assert_decision(&d, Action::Block, Some("REAL_NAME_REQUIRED"));
}

#[tokio::test]
async fn account_states_block_with_their_own_codes() {
    let mut s = start().await;
    let t = t0();
    for (i, (status, code)) in [
        (AccountStatus::Frozen, "ACCOUNT_FROZEN"),
        (AccountStatus::Lost, "ACCOUNT_LOST"),
        (AccountStatus::Arrears, "ACCOUNT_IN_ARREARS"),
        (AccountStatus::Closed, "ACCOUNT_CLOSED"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = recharge(&format!("s{i}"), &format!("u{i}"), 20, t);
        r.account.as_mut().unwrap().status = status as i32;
        assert_decision(&s.eval(r).await, Action::Block, Some(code));
    }
    let mut r = recharge("active", "ua", 20, t);
    r.account.as_mut().unwrap().status = AccountStatus::Active as i32;
    assert_decision(&s.eval(r).await, Action::Allow, None);
}

#[tokio::test]
async fn new_accounts_without_purchases_are_challenged_above_a_small_amount() {
    let mut s = start().await;
    let t = t0();
    let fresh = |id: &str, user: &str, yuan: i64, history: bool| {
        let mut r = recharge(id, user, yuan, t);
        let a = r.account.as_mut().unwrap();
        a.created_at_ms = t - 2 * DAY;
        a.has_purchase_history = history;
        r
    };
    let d = s.eval(fresh("n1", "u1", 200, false)).await;
    assert_decision(&d, Action::Challenge, Some("NEW_ACCOUNT"));
    assert_eq!(d.challenge, "sms");
    assert_decision(
        &s.eval(fresh("n2", "u2", 100, false)).await,
        Action::Allow,
        None,
    );
    assert_decision(
        &s.eval(fresh("n3", "u3", 200, true)).await,
        Action::Allow,
        None,
    );
    let mut old = fresh("n4", "u4", 200, false);
    old.account.as_mut().unwrap().created_at_ms = t - 8 * DAY;
    assert_decision(&s.eval(old).await, Action::Allow, None);
}

#[tokio::test]
async fn the_same_top_up_twice_on_two_channels_is_a_suspected_duplicate() {
    let mut s = start().await;
    let t = t0();
    let mut first = recharge("p1", "u1", 100, t);
    first.target = "13800000000".into();
    assert_decision(&s.eval(first.clone()).await, Action::Allow, None);
    let mut again = first.clone();
    again.request_id = "p2".into();
    again.channel = "alipay".into();
    again.timestamp_ms = t + 2 * MIN;
    let d = s.eval(again).await;
    assert_decision(&d, Action::Challenge, Some("DUPLICATE_SUSPECTED"));
    // Another amount, or the same order eleven minutes on, is not a duplicate.
    let mut other = first.clone();
    other.request_id = "p3".into();
    other.amount = 5000;
    other.timestamp_ms = t + 3 * MIN;
    assert_decision(&s.eval(other).await, Action::Allow, None);
    let mut later = first.clone();
    later.request_id = "p4".into();
    later.timestamp_ms = t + 14 * MIN;
    assert_decision(&s.eval(later).await, Action::Allow, None);
}

#[tokio::test]
async fn five_wrong_passwords_challenge_the_next_recharge() {
    let mut s = start().await;
    let t = t0();
    for i in 0..4 {
        s.login(login(&format!("f{i}"), "u1", false, BEIJING, t + i * MIN))
            .await;
    }
    let d = s.eval(recharge("r1", "u1", 50, t + 5 * MIN)).await;
    assert_decision(&d, Action::Allow, None);
    s.login(login("f4", "u1", false, BEIJING, t + 6 * MIN))
        .await;
    let d = s.eval(recharge("r2", "u1", 50, t + 7 * MIN)).await;
    assert_decision(&d, Action::Challenge, Some("PASSWORD_FAILURES"));
    // A retried event id does not count twice.
    let mut s = start().await;
    for _ in 0..5 {
        s.login(login("same-event", "u2", false, BEIJING, t)).await;
    }
    let d = s.eval(recharge("r3", "u2", 50, t + MIN)).await;
    assert_decision(&d, Action::Allow, None);
}

#[tokio::test]
async fn block_lists_refuse_users_devices_and_ip_ranges() {
    let mut s = start().await;
    let t = t0();
    let d = s.eval(recharge("x1", "fraud-ring-001", 10, t)).await;
    assert_decision(&d, Action::Block, Some("USER_BLOCKED"));
    let mut r = recharge("x2", "u2", 10, t);
    r.device_id = "emulator-farm-42".into();
    assert_decision(&s.eval(r).await, Action::Block, Some("DEVICE_BLOCKED"));
    let mut r = recharge("x3", "u3", 10, t);
    r.ip = "203.0.113.250".into();
    assert_decision(&s.eval(r).await, Action::Block, Some("IP_BLOCKED"));
    let mut r = recharge("x4", "u4", 10, t);
    r.ip = "203.0.113.251".into();
    assert_decision(&s.eval(r).await, Action::Allow, None);
}

#[tokio::test]
async fn allow_listed_users_skip_soft_rules_but_not_hard_ones() {
    let mut s = start().await;
    let t = t0();
    for i in 0..6 {
        let d = s
            .eval(recharge(&format!("v{i}"), "vip-0001", 600, t + i * MIN))
            .await;
        assert_decision(&d, Action::Allow, None);
    }
    let mut r = recharge("v-frozen", "vip-0001", 10, t + 7 * MIN);
    r.account.as_mut().unwrap().status = AccountStatus::Frozen as i32;
    assert_decision(&s.eval(r).await, Action::Block, Some("ACCOUNT_FROZEN"));
}

#[tokio::test]
async fn chargebacks_make_the_next_recharge_confirm() {
    let mut s = start().await;
    let t = t0();
    assert_decision(
        &s.eval(recharge("c1", "u1", 100, t)).await,
        Action::Allow,
        None,
    );
    assert_decision(
        &s.eval(recharge("c2", "u1", 100, t + MIN)).await,
        Action::Allow,
        None,
    );
    s.outcome("c1", OutcomeKind::Chargeback).await;
    let d = s.eval(recharge("c3", "u1", 100, riskgate::now_ms())).await;
    assert_decision(&d, Action::Challenge, Some("CHARGEBACK_HISTORY"));
}

#[tokio::test]
async fn repeated_failed_challenges_block() {
    let mut s = start().await;
    let t = t0();
    let new_account = |id: &str, ts: i64| {
        let mut r = recharge(id, "u1", 200, ts);
        let a = r.account.as_mut().unwrap();
        a.created_at_ms = t - DAY;
        a.has_purchase_history = false;
        r
    };
    for i in 0..3 {
        let id = format!("n{i}");
        let d = s.eval(new_account(&id, t + i * MIN)).await;
        assert_decision(&d, Action::Challenge, Some("NEW_ACCOUNT"));
        assert!(!s.outcome(&id, OutcomeKind::ChallengeFailed).await);
    }
    let d = s.eval(recharge("next", "u1", 20, riskgate::now_ms())).await;
    assert_decision(&d, Action::Block, Some("CHALLENGE_FAILURES"));
    // Two failures are not enough.
    let mut s = start().await;
    for i in 0..2 {
        let id = format!("m{i}");
        s.eval(new_account(&id, t + i * MIN)).await;
        s.outcome(&id, OutcomeKind::ChallengeFailed).await;
    }
    let d = s.eval(recharge("next", "u1", 20, riskgate::now_ms())).await;
    assert_decision(&d, Action::Allow, None);
}

#[tokio::test]
async fn a_passed_challenge_teaches_the_new_region() {
    let mut s = start().await;
    let t = t0() - 20 * HOUR;
    settle_in_beijing(&mut s, "u1", t).await;
    let mut r = recharge("away", "u1", 80, t + 10 * HOUR);
    r.ip = CHENGDU.into();
    assert_decision(
        &s.eval(r).await,
        Action::Challenge,
        Some("LOCATION_UNUSUAL"),
    );
    s.outcome("away", OutcomeKind::ChallengePassed).await;
    let mut r = recharge("away-again", "u1", 80, t + 12 * HOUR);
    r.ip = CHENGDU.into();
    assert_decision(&s.eval(r).await, Action::Allow, None);
}
