//! A decided request as its idempotency record keeps it: the decision and
//! the request's facts packed into one allocation.
//!
//! Why: every decided request leaves a record behind for a day, and the
//! decision as the engine builds it is a tree of allocations (its request
//! id, its reasons, three strings a reason). Kept as it was, the record
//! shared it with the reply, so the reply had to copy every string of it
//! before prost could take them, and the record held the tree for a day.
//! Packed, the reply takes the decision's strings by move, and the record
//! is one block written once: 449 bytes a record instead of 777, and a
//! warm store's closed loop 3.7% faster (BENCHMARKS.md, session 18). The
//! facts (which outcomes need to find the request's windows) share the
//! block since session 19: one allocation a request fewer, about 8 bytes a
//! record less (the allocator's size classes take most of what the entry
//! saved), and no change in speed that a warm-store A/B could see. A
//! replay (a retried request id) or an outcome unpacks it: those are rare
//! next to decisions.

use std::sync::Arc;

use crate::decision::{Action, Decision, Reason};
use crate::model::Facts;

/// A [`Decision`] and its request's [`Facts`] in one block of bytes.
///
/// The decision first: the action, score, challenge, request id, ruleset
/// version, then the reasons and the shadow reasons, each string as a
/// little-endian `u32` length and its bytes. Then, from `facts_at`, the
/// facts: amount, timestamp, where each text but the last ends, and the
/// seven texts back to back (see [`KeptFacts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRecord {
    block: Box<[u8]>,
    facts_at: u32,
}

/// Bytes of the facts before their texts: amount, timestamp, six ends.
const FACTS_HEAD: usize = 8 + 8 + 4 * 6;

impl PackedRecord {
    pub fn pack(d: &Decision, f: &Facts) -> PackedRecord {
        let reasons = d.reasons.iter().chain(&d.shadow_reasons);
        let text: usize = reasons
            .map(|r| r.rule_id.len() + r.code.len() + r.message.len() + r.challenge.len())
            .sum::<usize>()
            + d.challenge.len()
            + d.request_id.len()
            + d.ruleset_version.len();
        let n = d.reasons.len() + d.shadow_reasons.len();
        let texts = f.texts();
        let facts: usize = FACTS_HEAD + texts.iter().map(|t| t.len()).sum::<usize>();
        // Exact, so that the box keeps the vector's block: action and
        // score, a length per string, two counts, action and score per
        // reason, the text, and the facts.
        let strings = 3 + 4 * n;
        let mut b = Vec::with_capacity(1 + 8 + 4 * strings + 2 * 4 + 9 * n + text + facts);
        b.push(d.action.code());
        b.extend_from_slice(&d.score.to_le_bytes());
        put_str(&mut b, &d.challenge);
        put_str(&mut b, &d.request_id);
        put_str(&mut b, &d.ruleset_version);
        put_reasons(&mut b, &d.reasons);
        put_reasons(&mut b, &d.shadow_reasons);
        // Records stay far below 4 GiB (validation bounds every text).
        let facts_at = b.len() as u32;
        put_facts(&mut b, f.amount, f.timestamp_ms, texts);
        PackedRecord {
            block: b.into_boxed_slice(),
            facts_at,
        }
    }

    /// The decided action, read without unpacking.
    pub fn action(&self) -> Action {
        action_of(self.block[0])
    }

    /// The decision, unpacked (replays, outcomes, snapshots).
    pub fn decision(&self) -> Decision {
        let mut r = Reader(&self.block[..self.facts_at as usize]);
        let action = action_of(r.u8());
        let score = r.i64();
        let challenge = r.str().to_string();
        let request_id = r.str().to_string();
        let ruleset_version = Arc::from(r.str());
        let reasons = get_reasons(&mut r);
        let shadow_reasons = get_reasons(&mut r);
        Decision {
            request_id,
            action,
            challenge,
            score,
            reasons,
            shadow_reasons,
            ruleset_version,
        }
    }

    /// The facts, read in place.
    pub fn facts(&self) -> KeptFacts<'_> {
        let mut r = Reader(&self.block[self.facts_at as usize..]);
        let amount = r.i64();
        let timestamp_ms = r.i64();
        let ends = std::array::from_fn(|_| r.u32());
        KeptFacts {
            // Written from `&str`s, so always UTF-8.
            texts: std::str::from_utf8(r.0).unwrap_or_default(),
            ends,
            amount,
            timestamp_ms,
        }
    }
}

/// A request's facts as a record keeps them: the seven texts back to back.
/// A record keeps its request's facts for as long as it lives (outcomes
/// find the request's windows by them); as seven strings they were most of
/// a record's allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptFacts<'a> {
    /// The texts, in [`Facts::texts`] order, back to back.
    texts: &'a str,
    /// Where each text but the last ends in `texts`. (Validation bounds
    /// every text to 128 bytes at most, and a snapshot holds only what was
    /// validated, so the seven fit in `u32` many times over.)
    ends: [u32; 6],
    pub amount: i64,
    pub timestamp_ms: i64,
}

impl<'a> KeptFacts<'a> {
    /// The `i`th text (in the order of [`KeptFacts::texts`]); empty where
    /// the ends do not fit the texts (only this module writes them).
    fn part(&self, i: usize) -> &'a str {
        let start = match i {
            0 => 0,
            _ => self.ends[i - 1] as usize,
        };
        let end = self.ends.get(i).map_or(self.texts.len(), |&e| e as usize);
        self.texts.get(start..end).unwrap_or_default()
    }

    pub fn user_id(&self) -> &'a str {
        self.part(0)
    }

    /// The texts, in [`Facts::texts`] order.
    pub fn texts(&self) -> [&'a str; 7] {
        std::array::from_fn(|i| self.part(i))
    }

    /// The facts unpacked (outcomes).
    pub fn facts(&self) -> Facts {
        Facts::from_texts(self.texts(), self.amount, self.timestamp_ms)
    }
}

fn put_facts(b: &mut Vec<u8>, amount: i64, timestamp_ms: i64, texts: [&str; 7]) {
    b.extend_from_slice(&amount.to_le_bytes());
    b.extend_from_slice(&timestamp_ms.to_le_bytes());
    let mut end = 0;
    for t in &texts[..6] {
        end += t.len();
        b.extend_from_slice(&(end as u32).to_le_bytes());
    }
    for t in texts {
        b.extend_from_slice(t.as_bytes());
    }
}

/// The action of a code [`PackedRecord::pack`] wrote (only it writes
/// these bytes, so the fallback is never taken).
fn action_of(code: u8) -> Action {
    Action::from_code(code).unwrap_or(Action::Block)
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    // Strings come from validated requests and loaded packs, far below
    // 4 GiB; saturating keeps a length and its bytes in step regardless.
    let s = &s.as_bytes()[..s.len().min(u32::MAX as usize)];
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s);
}

fn put_reasons(b: &mut Vec<u8>, reasons: &[Reason]) {
    b.extend_from_slice(&(reasons.len() as u32).to_le_bytes());
    for r in reasons {
        put_str(b, &r.rule_id);
        put_str(b, &r.code);
        put_str(b, &r.message);
        put_str(b, &r.challenge);
        b.push(r.action.code());
        b.extend_from_slice(&r.score.to_le_bytes());
    }
}

fn get_reasons(r: &mut Reader<'_>) -> Vec<Reason> {
    let n = r.u32() as usize;
    (0..n)
        .map(|_| {
            let rule_id = Arc::from(r.str());
            let code = r.str().to_string();
            let message = r.str().to_string();
            let challenge = r.str().to_string();
            Reason {
                rule_id,
                code,
                message,
                action: action_of(r.u8()),
                score: r.i64(),
                challenge,
            }
        })
        .collect()
}

/// Reads back what [`PackedRecord::pack`] wrote. The bytes never come
/// from outside the process, so a short read is a bug: it yields empty
/// values rather than a panic on the serving path.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or_default()
    }

    fn u32(&mut self) -> u32 {
        let mut b = [0; 4];
        let got = self.take(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }

    fn i64(&mut self) -> i64 {
        let mut b = [0; 8];
        let got = self.take(8);
        b[..got.len()].copy_from_slice(got);
        i64::from_le_bytes(b)
    }

    fn str(&mut self) -> &'a str {
        let n = self.u32() as usize;
        std::str::from_utf8(self.take(n)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(rule: &str, code: &str, action: Action, score: i64, challenge: &str) -> Reason {
        Reason {
            rule_id: Arc::from(rule),
            code: code.into(),
            message: format!("{code}: 你的充值需要验证"),
            action,
            score,
            challenge: challenge.into(),
        }
    }

    #[test]
    fn a_decision_unpacks_as_it_was_packed() {
        let d = Decision {
            request_id: "r-000123".into(),
            action: Action::Challenge,
            challenge: "sms".into(),
            score: -7,
            reasons: vec![
                reason(
                    "burst_user",
                    "BURST_FREQUENCY",
                    Action::Challenge,
                    40,
                    "sms",
                ),
                reason(
                    "duplicate",
                    "DUPLICATE_SUSPECTED",
                    Action::Block,
                    i64::MAX,
                    "",
                ),
            ],
            shadow_reasons: vec![reason("new_rule", "NEW_RULE", Action::Block, 0, "")],
            ruleset_version: Arc::from("612ccb1b4aea51ba"),
        };
        let f = facts(TEXTS);
        let packed = PackedRecord::pack(&d, &f);
        assert_eq!(packed.action(), Action::Challenge);
        assert_eq!(packed.decision(), d);
        assert_eq!(packed.facts().facts(), f);
    }

    #[test]
    fn an_empty_decision_round_trips_too() {
        for action in [Action::Allow, Action::Challenge, Action::Block] {
            let d = Decision {
                request_id: String::new(),
                action,
                challenge: String::new(),
                score: 0,
                reasons: vec![],
                shadow_reasons: vec![],
                ruleset_version: Arc::from(""),
            };
            let f = facts(["", "", "", "", "", "", ""]);
            let packed = PackedRecord::pack(&d, &f);
            assert_eq!(packed.action(), action);
            assert_eq!(packed.decision(), d);
            assert_eq!(packed.facts().facts(), f);
        }
    }

    /// A request's texts, in [`Facts::texts`] order.
    const TEXTS: [&str; 7] = [
        "u1",
        "192.0.2.1",
        "d1",
        "13800000000",
        "wechat",
        "phone_credit",
        "CNY",
    ];

    fn facts(texts: [&str; 7]) -> Facts {
        Facts::from_texts(texts, 12_345, 1_700_000_000_123)
    }

    fn allow() -> Decision {
        Decision {
            request_id: "r-1".into(),
            action: Action::Allow,
            challenge: String::new(),
            score: 0,
            reasons: vec![],
            shadow_reasons: vec![],
            ruleset_version: Arc::from("v1"),
        }
    }

    #[test]
    fn kept_facts_give_back_what_they_kept() {
        let cases = [
            TEXTS,
            // Empty texts anywhere, first and last included.
            ["", "", "d1", "", "alipay", "", ""],
            ["", "", "", "", "", "", ""],
            // Multi-byte text: ends are byte offsets, on char boundaries.
            [
                "用户一",
                "2001:db8::1",
                "设备",
                "校园卡 42",
                "微信",
                "话费",
                "CNY",
            ],
        ];
        for texts in cases {
            let f = facts(texts);
            let record = PackedRecord::pack(&allow(), &f);
            let kept = record.facts();
            assert_eq!(kept.facts(), f, "{texts:?}");
            assert_eq!(kept.user_id(), texts[0]);
            assert_eq!(kept.texts(), texts);
            assert_eq!((kept.amount, kept.timestamp_ms), (f.amount, f.timestamp_ms));
            assert_eq!(record.decision(), allow());
        }
        // Texts that concatenate alike stay apart.
        let a = PackedRecord::pack(&allow(), &facts(["ab", "c", "", "", "", "", ""]));
        let b = PackedRecord::pack(&allow(), &facts(["a", "bc", "", "", "", "", ""]));
        assert_ne!(a.facts(), b.facts());
        assert_eq!(b.facts().facts().ip_text, "bc");
    }
}
