//! Wire messages -> domain types. All input checking lives here, so every
//! refusal is an INVALID_ARGUMENT that names the field, and nothing past this
//! point ever sees bad input.

use std::net::IpAddr;

use tonic::Status;

use crate::model::{Account, AccountStatus, Facts, Login, Outcome, OutcomeKind, Recharge};
use crate::pb;

/// Longest request_id, event_id, user_id, device_id or target accepted.
pub const MAX_ID_LEN: usize = 128;
/// Longest currency, channel or product accepted.
pub const MAX_TAG_LEN: usize = 32;
/// Most attributes per request.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute key.
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 64;
/// Longest attribute value.
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 256;
/// Largest amount accepted, in fen (10 million yuan): a guard against
/// overflow in sums, far above any single recharge.
pub const MAX_AMOUNT: i64 = 1_000_000_000;
/// How far in the past an event time may be (late events; a window longer
/// than this never holds one older).
pub const MAX_PAST_MS: i64 = 30 * 86_400_000;
/// How far in the future an event time may be (clock skew).
pub const MAX_FUTURE_MS: i64 = 5 * 60_000;
/// Longest address text accepted.
pub const MAX_IP_LEN: usize = 64;

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

fn required(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    bounded(field, value, max)
}

fn bounded(field: &str, value: &str, max: usize) -> Result<(), Status> {
    bounded_as(|| field.to_string(), value, max)
}

/// [`bounded`] for a field whose name is built, only when it is refused.
fn bounded_as(field: impl Fn() -> String, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(invalid(
            &field(),
            format_args!("is longer than {max} bytes"),
        ));
    }
    if has_control(value) {
        return Err(invalid(&field(), "contains control characters"));
    }
    Ok(())
}

/// Whether `value` holds a control character (`char::is_control`: U+0000 to
/// U+001F and U+007F to U+009F). Ids and tags are nearly always ASCII, where
/// a byte scan answers without decoding UTF-8 a character at a time.
fn has_control(value: &str) -> bool {
    if value.is_ascii() {
        value.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        value.chars().any(char::is_control)
    }
}

fn parse_ip(field: &str, text: String) -> Result<(IpAddr, String), Status> {
    // The longest address text is 45 bytes (IPv4-mapped IPv6); spaces
    // around it are allowed for.
    if text.len() > MAX_IP_LEN {
        return Err(invalid(
            field,
            format_args!("is longer than {MAX_IP_LEN} bytes"),
        ));
    }
    let ip: IpAddr = text.trim().parse().map_err(|_| {
        invalid(
            field,
            format_args!("`{}` is not an IPv4 or IPv6 address", text.escape_debug()),
        )
    })?;
    // IPv4-mapped IPv6 is the IPv4 address: one address, one key.
    Ok(match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), v4.to_string()),
            None => (ip, v6_text(v6)),
        },
        // Text that parses as IPv4 is already in its one canonical form
        // (no leading zeros): kept as it is, not formatted anew, and without
        // a copy unless there were spaces to trim.
        IpAddr::V4(_) if text.trim().len() == text.len() => (ip, text),
        IpAddr::V4(_) => (ip, text.trim().to_string()),
    })
}

/// An IPv6 address (not IPv4-mapped) in its one canonical text form (RFC
/// 5952, exactly as `Ipv6Addr`'s `Display` writes it): lower-case hex with
/// no leading zeros, the first longest run of two or more zero groups as
/// `::`. Written here, not through `Display`, because the formatting
/// machinery cost more than the rest of the request's validation.
fn v6_text(v6: std::net::Ipv6Addr) -> String {
    let groups = v6.segments();
    // The first longest run of zero groups: (start, length).
    let (mut zeros, mut run) = ((0, 0), (0, 0));
    for (i, &g) in groups.iter().enumerate() {
        if g != 0 {
            run = (i + 1, 0);
            continue;
        }
        run.1 += 1;
        if run.1 > zeros.1 {
            zeros = run;
        }
    }
    let mut out = String::with_capacity(39);
    let hex = |out: &mut String, from: usize, to: usize| {
        for (i, &g) in groups[from..to].iter().enumerate() {
            if i > 0 {
                out.push(':');
            }
            let digits = (16 - g.leading_zeros()).div_ceil(4).max(1);
            for d in (0..digits).rev() {
                out.push(char::from(
                    b"0123456789abcdef"[(g >> (4 * d)) as usize & 0xf],
                ));
            }
        }
    };
    if zeros.1 > 1 {
        hex(&mut out, 0, zeros.0);
        out.push_str("::");
        hex(&mut out, zeros.0 + zeros.1, 8);
    } else {
        hex(&mut out, 0, 8);
    }
    out
}

/// Event time: 0 means now; otherwise within the accepted range.
///
/// A time ahead of the server's clock (a caller's clock that runs fast, up
/// to [`MAX_FUTURE_MS`]) is taken as now. Windows drop what falls out of
/// their span as of the newest time they have seen, so one request stamped
/// minutes ahead would drop, for every request on time after it, the oldest
/// minutes of each short window (a burst's first orders).
fn event_time(field: &str, ts: i64, now: i64) -> Result<i64, Status> {
    if ts == 0 {
        return Ok(now);
    }
    if ts < now - MAX_PAST_MS {
        return Err(invalid(field, "is more than 30 days in the past"));
    }
    if ts > now + MAX_FUTURE_MS {
        return Err(invalid(field, "is more than 5 minutes in the future"));
    }
    Ok(ts.min(now))
}

pub fn recharge(req: pb::EvaluateRequest, now: i64) -> Result<Recharge, Status> {
    required("request_id", &req.request_id, MAX_ID_LEN)?;
    required("user_id", &req.user_id, MAX_ID_LEN)?;
    if req.amount <= 0 {
        return Err(invalid("amount", "must be greater than 0 (fen)"));
    }
    if req.amount > MAX_AMOUNT {
        return Err(invalid(
            "amount",
            format_args!("must be at most {MAX_AMOUNT} fen"),
        ));
    }
    bounded("currency", &req.currency, MAX_TAG_LEN)?;
    if !req.currency.chars().all(|c| c.is_ascii_alphabetic())
        || !matches!(req.currency.len(), 0 | 3)
    {
        return Err(invalid("currency", "must be a three-letter ISO 4217 code"));
    }
    bounded("channel", &req.channel, MAX_TAG_LEN)?;
    bounded("product", &req.product, MAX_TAG_LEN)?;
    bounded("target", &req.target, MAX_ID_LEN)?;
    bounded("device_id", &req.device_id, MAX_ID_LEN)?;
    if req.ip.is_empty() {
        return Err(invalid("ip", "is required"));
    }
    let (ip, ip_text) = parse_ip("ip", req.ip)?;
    let timestamp_ms = event_time("timestamp_ms", req.timestamp_ms, now)?;
    attributes(&req.attributes)?;
    let account = match req.account {
        Some(a) => Account {
            real_name_verified: a.real_name_verified,
            status: account_status(a.status)?,
            created_at_ms: a.created_at_ms,
            has_purchase_history: a.has_purchase_history,
        },
        None => Account::default(),
    };
    if account.created_at_ms < 0 {
        return Err(invalid("account.created_at_ms", "must not be negative"));
    }
    // Later than the request: most likely microseconds or nanoseconds, where
    // milliseconds were meant, and every account would look brand new.
    if account.created_at_ms > timestamp_ms + MAX_FUTURE_MS {
        return Err(invalid(
            "account.created_at_ms",
            "is later than the request (Unix milliseconds are expected)",
        ));
    }
    let currency = if req.currency.is_empty() {
        "CNY".to_string()
    } else {
        let mut currency = req.currency;
        currency.make_ascii_uppercase();
        currency
    };
    Ok(Recharge {
        request_id: req.request_id,
        facts: Facts {
            user_id: req.user_id,
            ip_text,
            device_id: req.device_id,
            target: req.target,
            channel: req.channel,
            product: req.product,
            currency,
            amount: req.amount,
            timestamp_ms,
        },
        ip,
        account,
        attributes: req.attributes,
        dry_run: req.dry_run,
    })
}

fn attributes(attrs: &std::collections::HashMap<String, String>) -> Result<(), Status> {
    if attrs.len() > MAX_ATTRIBUTES {
        return Err(invalid(
            "attributes",
            format_args!(
                "has {} entries, at most {MAX_ATTRIBUTES} are accepted",
                attrs.len()
            ),
        ));
    }
    for (k, v) in attrs {
        if k.is_empty() || k.len() > MAX_ATTRIBUTE_KEY_LEN {
            // Not echoed whole: a key of any length may come here.
            let shown: String = k.chars().take(MAX_ATTRIBUTE_KEY_LEN).collect();
            return Err(invalid(
                "attributes",
                format_args!(
                    "key `{}`{} must be 1 to {MAX_ATTRIBUTE_KEY_LEN} bytes",
                    shown.escape_debug(),
                    if shown.len() < k.len() { "..." } else { "" }
                ),
            ));
        }
        if has_control(k) {
            return Err(invalid(
                "attributes",
                format_args!("key `{}` contains control characters", k.escape_debug()),
            ));
        }
        bounded_as(|| format!("attributes[{k}]"), v, MAX_ATTRIBUTE_VALUE_LEN)?;
    }
    Ok(())
}

fn account_status(raw: i32) -> Result<AccountStatus, Status> {
    use pb::AccountStatus as P;
    Ok(match P::try_from(raw) {
        Ok(P::Unspecified) => AccountStatus::Unspecified,
        Ok(P::Active) => AccountStatus::Active,
        Ok(P::Frozen) => AccountStatus::Frozen,
        Ok(P::Lost) => AccountStatus::Lost,
        Ok(P::Arrears) => AccountStatus::Arrears,
        Ok(P::Closed) => AccountStatus::Closed,
        Err(_) => {
            return Err(invalid(
                "account.status",
                format_args!("unknown value {raw}"),
            ))
        }
    })
}

pub fn login(ev: pb::Event, now: i64) -> Result<Login, Status> {
    bounded("event_id", &ev.event_id, MAX_ID_LEN)?;
    required("user_id", &ev.user_id, MAX_ID_LEN)?;
    let succeeded = match pb::EventKind::try_from(ev.kind) {
        Ok(pb::EventKind::LoginSucceeded) => true,
        Ok(pb::EventKind::LoginFailed) => false,
        _ => {
            return Err(invalid(
                "kind",
                "must be EVENT_KIND_LOGIN_SUCCEEDED or EVENT_KIND_LOGIN_FAILED",
            ))
        }
    };
    bounded("device_id", &ev.device_id, MAX_ID_LEN)?;
    let (ip, ip_text) = if ev.ip.is_empty() {
        (None, String::new())
    } else {
        let (ip, text) = parse_ip("ip", ev.ip)?;
        (Some(ip), text)
    };
    attributes(&ev.attributes)?;
    Ok(Login {
        event_id: ev.event_id,
        user_id: ev.user_id,
        succeeded,
        ip,
        ip_text,
        device_id: ev.device_id,
        timestamp_ms: event_time("timestamp_ms", ev.timestamp_ms, now)?,
    })
}

pub fn outcome(o: pb::Outcome, now: i64) -> Result<Outcome, Status> {
    required("request_id", &o.request_id, MAX_ID_LEN)?;
    bounded("user_id", &o.user_id, MAX_ID_LEN)?;
    let kind = match pb::OutcomeKind::try_from(o.kind) {
        Ok(pb::OutcomeKind::Succeeded) => OutcomeKind::Succeeded,
        Ok(pb::OutcomeKind::Failed) => OutcomeKind::Failed,
        Ok(pb::OutcomeKind::Chargeback) => OutcomeKind::Chargeback,
        Ok(pb::OutcomeKind::ChallengePassed) => OutcomeKind::ChallengePassed,
        Ok(pb::OutcomeKind::ChallengeFailed) => OutcomeKind::ChallengeFailed,
        _ => {
            return Err(invalid(
                "kind",
                "must name an outcome (OUTCOME_KIND_SUCCEEDED...)",
            ))
        }
    };
    // Chargebacks arrive weeks later: only the future is bounded here.
    let timestamp_ms = match o.timestamp_ms {
        0 => now,
        ts if ts > now + MAX_FUTURE_MS => {
            return Err(invalid(
                "timestamp_ms",
                "is more than 5 minutes in the future",
            ))
        }
        ts if ts < 0 => return Err(invalid("timestamp_ms", "must not be negative")),
        // Ahead of the server's clock: now (see `event_time`).
        ts => ts.min(now),
    };
    Ok(Outcome {
        request_id: o.request_id,
        user_id: o.user_id,
        kind,
        timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v6_text_is_displays() {
        use std::net::Ipv6Addr;
        let mut cases: Vec<[u16; 8]> = vec![
            [0; 8],
            [0, 0, 0, 0, 0, 0, 0, 1],
            [1, 0, 0, 0, 0, 0, 0, 0],
            [0x2001, 0xdb8, 0, 0, 1, 0, 0, 1], // two runs of two: the first
            [0x2001, 0xdb8, 0, 1, 0, 0, 0, 1], // the longer run, not the first
            [0x2001, 0, 1, 0, 1, 0, 1, 0],     // single zeros stay
            [0xffff; 8],
            [0x2001, 0xdb8, 0x85a3, 0x8a2e, 0x370, 0x7334, 0x0f, 0xabc],
            [0, 0, 0, 0, 0, 0, 0xc000, 0x0201], // IPv4-compatible: plain hex
        ];
        // Every mix of zero, one-digit and four-digit groups at every place
        // (3^8 addresses), so every run of zeros is met.
        for n in 0..3u32.pow(8) {
            let mut g = [0u16; 8];
            let mut k = n;
            for (i, slot) in g.iter_mut().enumerate() {
                *slot = [0, 0x7, 0xbeef][(k % 3) as usize] + i as u16 * (k % 3 != 0) as u16;
                k /= 3;
            }
            cases.push(g);
        }
        for g in cases {
            let v6 = Ipv6Addr::from(g);
            if v6.to_ipv4_mapped().is_none() {
                assert_eq!(v6_text(v6), v6.to_string(), "{g:x?}");
            }
        }
        // As validation sees it: any spelling of one address, one text.
        for text in ["2001:DB8::1", "2001:0db8:0:0:0:0:0:1", " 2001:db8::0:1 "] {
            let (_, canonical) = parse_ip("ip", text.to_string()).unwrap();
            assert_eq!(canonical, "2001:db8::1");
        }
        let (ip, text) = parse_ip("ip", "::ffff:192.0.2.1".into()).unwrap();
        assert_eq!(
            (ip.to_string(), text.as_str()),
            ("192.0.2.1".into(), "192.0.2.1")
        );
    }

    fn request() -> pb::EvaluateRequest {
        pb::EvaluateRequest {
            request_id: "r1".into(),
            user_id: "u1".into(),
            amount: 100,
            ip: "192.0.2.1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn control_characters_are_found_as_char_is_control_finds_them() {
        // Every ASCII byte and the C1 range around it, alone and inside
        // ASCII and non-ASCII text: the byte scan and the char scan agree.
        for c in (0u32..0x100)
            .chain([0x2028, 0xfeff])
            .filter_map(char::from_u32)
        {
            for text in [format!("{c}"), format!("u-{c}-1"), format!("\u{4e2d}{c}")] {
                assert_eq!(has_control(&text), c.is_control(), "{text:?}");
            }
        }
        assert!(!has_control("u-123456"));
        assert!(!has_control("\u{4e2d}\u{6587}"));
    }

    #[test]
    fn addresses_are_kept_in_one_canonical_form() {
        for (given, kept) in [
            ("192.0.2.1", "192.0.2.1"),
            (" 192.0.2.1 ", "192.0.2.1"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
            ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
        ] {
            let r = recharge(
                pb::EvaluateRequest {
                    ip: given.into(),
                    ..request()
                },
                1,
            )
            .unwrap();
            assert_eq!(
                (r.facts.ip_text.as_str(), r.ip),
                (kept, kept.parse().unwrap()),
                "{given}"
            );
        }
        for bad in ["192.0.2.01", "192.0.2", "::ffff:192.0.2.1.5", "example.com"] {
            let e = recharge(
                pb::EvaluateRequest {
                    ip: bad.into(),
                    ..request()
                },
                1,
            )
            .unwrap_err();
            assert!(e.message().starts_with("ip: "), "{bad}: {}", e.message());
        }
    }

    #[test]
    fn currency_is_upper_case_and_defaults_to_cny() {
        let r = |c: &str| {
            recharge(
                pb::EvaluateRequest {
                    currency: c.into(),
                    ..request()
                },
                1,
            )
        };
        assert_eq!(r("usd").unwrap().facts.currency, "USD");
        assert_eq!(r("CNY").unwrap().facts.currency, "CNY");
        assert_eq!(r("").unwrap().facts.currency, "CNY");
        assert!(r("yuan").is_err());
    }

    #[test]
    fn a_refused_attribute_value_names_its_key() {
        let mut req = request();
        req.attributes
            .insert("note".into(), "v".repeat(MAX_ATTRIBUTE_VALUE_LEN + 1));
        let e = recharge(req, 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "attributes[note]: is longer than 256 bytes");
        let mut req = request();
        req.attributes.insert("note".into(), "a\u{7}b".into());
        let e = recharge(req, 1).unwrap_err();
        assert_eq!(e.message(), "attributes[note]: contains control characters");
    }

    /// A refusal never echoes input of any length: clients cap the size of
    /// a status message (grpc-java and C-core at 8 to 16 KB), and one that
    /// is too long comes out as another error.
    #[test]
    fn refusals_stay_short_whatever_was_sent() {
        let mut req = request();
        req.ip = "1".repeat(100_000);
        let e = recharge(req, 1).unwrap_err();
        assert_eq!(e.message(), "ip: is longer than 64 bytes");
        let mut req = request();
        req.attributes.insert("k".repeat(100_000), "v".into());
        let e = recharge(req, 1).unwrap_err();
        assert!(
            e.message().starts_with("attributes: key `kkk"),
            "{}",
            e.message()
        );
        assert!(e.message().len() < 200, "{}", e.message());
        let mut req = request();
        req.attributes.insert("a\nb".into(), "v".into());
        let e = recharge(req, 1).unwrap_err();
        assert_eq!(
            e.message(),
            "attributes: key `a\\nb` contains control characters"
        );
    }

    #[test]
    fn an_account_created_after_the_request_is_refused() {
        let now = 1_767_225_600_000;
        let created = |ms: i64| {
            let mut req = request();
            req.account = Some(pb::Account {
                created_at_ms: ms,
                ..Default::default()
            });
            recharge(req, now)
        };
        assert!(created(now - 86_400_000).is_ok());
        // Microseconds where milliseconds were meant.
        let e = created(now * 1000).unwrap_err();
        assert!(
            e.message().starts_with("account.created_at_ms: "),
            "{}",
            e.message()
        );
    }
}
