//! A decision as an idempotency record keeps it: packed into one
//! allocation.
//!
//! Why: every decided request leaves a record behind for a day, and the
//! decision as the engine builds it is a tree of allocations (its request
//! id, its reasons, three strings a reason). Kept as it was, the record
//! shared it with the reply, so the reply had to copy every string of it
//! before prost could take them, and the record held the tree for a day.
//! Packed, the reply takes the decision's strings by move, and the record
//! is one block written once: 449 bytes a record instead of 777, and a
//! warm store's closed loop 3.7% faster (BENCHMARKS.md, session 18). A
//! replay (a retried request id) or an outcome unpacks it: those are rare
//! next to decisions.

use std::sync::Arc;

use crate::decision::{Action, Decision, Reason};

/// A [`Decision`] in one block of bytes: the action, score, challenge,
/// request id, ruleset version, then the reasons and the shadow reasons,
/// each string as a little-endian `u32` length and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedDecision(Box<[u8]>);

impl PackedDecision {
    pub fn pack(d: &Decision) -> PackedDecision {
        let reasons = d.reasons.iter().chain(&d.shadow_reasons);
        let text: usize = reasons
            .map(|r| r.rule_id.len() + r.code.len() + r.message.len() + r.challenge.len())
            .sum::<usize>()
            + d.challenge.len()
            + d.request_id.len()
            + d.ruleset_version.len();
        let n = d.reasons.len() + d.shadow_reasons.len();
        // Exact, so that the box keeps the vector's block: action and
        // score, a length per string, two counts, action and score per
        // reason, and the text.
        let strings = 3 + 4 * n;
        let mut b = Vec::with_capacity(1 + 8 + 4 * strings + 2 * 4 + 9 * n + text);
        b.push(d.action.code());
        b.extend_from_slice(&d.score.to_le_bytes());
        put_str(&mut b, &d.challenge);
        put_str(&mut b, &d.request_id);
        put_str(&mut b, &d.ruleset_version);
        put_reasons(&mut b, &d.reasons);
        put_reasons(&mut b, &d.shadow_reasons);
        PackedDecision(b.into_boxed_slice())
    }

    /// The decided action, read without unpacking.
    pub fn action(&self) -> Action {
        action_of(self.0[0])
    }

    pub fn unpack(&self) -> Decision {
        let mut r = Reader(&self.0);
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
}

/// The action of a code [`PackedDecision::pack`] wrote (only it writes
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

/// Reads back what [`PackedDecision::pack`] wrote. The bytes never come
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
        let packed = PackedDecision::pack(&d);
        assert_eq!(packed.action(), Action::Challenge);
        assert_eq!(packed.unpack(), d);
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
            let packed = PackedDecision::pack(&d);
            assert_eq!(packed.action(), action);
            assert_eq!(packed.unpack(), d);
        }
    }
}
