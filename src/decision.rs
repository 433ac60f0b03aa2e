//! Actions, hits and how they combine into one decision.
//!
//! Strongest action wins (block > challenge > allow), scores add up, optional
//! score thresholds escalate, and shadow hits are carried along without ever
//! changing the action.

use std::sync::Arc;

use crate::pack::manifest::Policy;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Challenge,
    Block,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Challenge => "challenge",
            Action::Block => "block",
        }
    }

    /// The action as one byte, in packed forms (snapshots, kept decisions):
    /// stable, since snapshot files hold it.
    pub fn code(self) -> u8 {
        match self {
            Action::Allow => 0,
            Action::Challenge => 1,
            Action::Block => 2,
        }
    }

    /// The action of a [`Action::code`]; None for any other byte.
    pub fn from_code(code: u8) -> Option<Action> {
        match code {
            0 => Some(Action::Allow),
            1 => Some(Action::Challenge),
            2 => Some(Action::Block),
            _ => None,
        }
    }
}

/// What one rule reported.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reason {
    pub rule_id: Arc<str>,
    /// Stable, upper snake case.
    pub code: String,
    /// Human readable; safe to show the end user.
    pub message: String,
    pub action: Action,
    pub score: i64,
    /// For challenges: what to ask for (sms, captcha, real_name...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub challenge: String,
}

/// Where a hit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Changes the decision.
    Enforce,
    /// Reported in shadow_reasons only.
    Shadow,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    pub request_id: String,
    pub action: Action,
    pub challenge: String,
    pub score: i64,
    pub reasons: Vec<Reason>,
    pub shadow_reasons: Vec<Reason>,
    pub ruleset_version: Arc<str>,
}

impl Decision {
    /// Whether this decision may teach the user's profile the request's
    /// region: an allow, unless only leniency made it one (`lenient`, see
    /// [`Leniency::applies`]): one small probe must not make a new region
    /// "usual" for large amounts. Shadow notes play no part: a shadow rule
    /// never changes a decision, later ones included.
    pub fn teaches_profile(&self, lenient: bool) -> bool {
        self.action == Action::Allow && !lenient
    }
}

/// The code of the reason added when a score threshold escalates.
pub const SCORE_THRESHOLD: &str = "SCORE_THRESHOLD";

/// The small-amount leniency, resolved to numbers at pack load.
#[derive(Debug, Clone)]
pub struct Leniency {
    pub below_amount: i64,
    pub demote: Vec<String>,
}

impl Leniency {
    /// Whether it lets a request of `amount` with these enforcing hits
    /// through: below its amount, and every hit that weighs (see
    /// [`Reason::weighs`]) one it demotes. A rule that failed and was
    /// skipped, or state that could not be reached under `open`, is a note
    /// that weighs nothing: it does not take the leniency away.
    pub fn applies(&self, amount: i64, reasons: &[Reason]) -> bool {
        let mut weighing = reasons.iter().filter(|r| r.weighs()).peekable();
        amount < self.below_amount
            && weighing.peek().is_some()
            && weighing.all(|r| self.demote.contains(&r.code))
    }
}

impl Reason {
    /// Whether it can change a decision: an action above allow, or a score
    /// toward the thresholds.
    pub fn weighs(&self) -> bool {
        self.action > Action::Allow || self.score != 0
    }
}

/// Combines the hits of one request into a decision.
///
/// `amount` is needed for leniency: below its amount, when every enforcing hit
/// carries a code it names, those hits are only notes (they move to shadow).
pub fn combine(
    request_id: String,
    amount: i64,
    mut reasons: Vec<Reason>,
    mut shadow_reasons: Vec<Reason>,
    policy: &Policy,
    leniency: Option<&Leniency>,
    ruleset_version: Arc<str>,
) -> Decision {
    if leniency.is_some_and(|l| l.applies(amount, &reasons)) {
        shadow_reasons.append(&mut reasons);
    }
    // Strongest first; ties keep rule order (the sort is stable).
    reasons.sort_by(|a, b| b.action.cmp(&a.action).then(b.score.cmp(&a.score)));

    // Saturating: a rule may give any score, and a sum that wrapped would
    // turn a huge score negative, under every threshold.
    let score = (reasons.iter()).fold(0i64, |sum, r| sum.saturating_add(r.score));
    let mut action = reasons.first().map_or(Action::Allow, |r| r.action);
    let mut challenge = String::new();
    let escalate = |threshold: Option<i64>| threshold.is_some_and(|t| score >= t);
    if action < Action::Block && escalate(policy.block_score) {
        action = Action::Block;
        reasons.insert(0, threshold_reason(Action::Block, score, String::new()));
    } else if action < Action::Challenge && escalate(policy.challenge_score) {
        action = Action::Challenge;
        let kind = policy.default_challenge.clone();
        reasons.insert(0, threshold_reason(Action::Challenge, score, kind));
    }
    if action == Action::Challenge {
        challenge = reasons
            .iter()
            .find(|r| r.action == Action::Challenge)
            .map(|r| r.challenge.clone())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| policy.default_challenge.clone());
    }
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

fn threshold_reason(action: Action, score: i64, challenge: String) -> Reason {
    Reason {
        rule_id: Arc::from("policy"),
        code: SCORE_THRESHOLD.to_string(),
        message: format!("risk score {score} reached the {} threshold", action.name()),
        action,
        score: 0,
        challenge,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(code: &str, action: Action, score: i64) -> Reason {
        Reason {
            rule_id: Arc::from(code.to_lowercase()),
            code: code.to_string(),
            message: String::new(),
            action,
            score,
            challenge: if action == Action::Challenge {
                "sms".into()
            } else {
                String::new()
            },
        }
    }

    fn decide(reasons: Vec<Reason>, policy: &Policy, leniency: Option<&Leniency>) -> Decision {
        combine(
            "r".into(),
            1000,
            reasons,
            vec![],
            policy,
            leniency,
            Arc::from("v"),
        )
    }

    #[test]
    fn strongest_action_wins_and_scores_add() {
        let d = decide(
            vec![
                reason("A", Action::Challenge, 10),
                reason("B", Action::Block, 5),
                reason("C", Action::Allow, 1),
            ],
            &Policy::default(),
            None,
        );
        assert_eq!(d.action, Action::Block);
        assert_eq!(d.score, 16);
        let codes: Vec<_> = d.reasons.iter().map(|r| r.code.as_str()).collect();
        assert_eq!(codes, ["B", "A", "C"]);
        assert_eq!(d.challenge, "");
    }

    #[test]
    fn challenge_kind_comes_from_the_strongest_challenge() {
        let d = decide(
            vec![reason("A", Action::Challenge, 10)],
            &Policy::default(),
            None,
        );
        assert_eq!((d.action, d.challenge.as_str()), (Action::Challenge, "sms"));
    }

    #[test]
    fn score_thresholds_escalate() {
        let policy = Policy {
            challenge_score: Some(20),
            block_score: Some(40),
            ..Policy::default()
        };
        let d = decide(vec![reason("A", Action::Allow, 25)], &policy, None);
        assert_eq!(d.action, Action::Challenge);
        assert_eq!(d.challenge, "captcha");
        assert_eq!(d.reasons[0].code, SCORE_THRESHOLD);
        let d = decide(
            vec![
                reason("A", Action::Allow, 25),
                reason("B", Action::Challenge, 25),
            ],
            &policy,
            None,
        );
        assert_eq!(d.action, Action::Block);
        let d = decide(vec![reason("A", Action::Allow, 5)], &policy, None);
        assert_eq!(d.action, Action::Allow);
    }

    #[test]
    fn leniency_demotes_only_when_alone_and_small() {
        let l = Leniency {
            below_amount: 5000,
            demote: vec!["LOC".into()],
        };
        let d = decide(
            vec![reason("LOC", Action::Challenge, 10)],
            &Policy::default(),
            Some(&l),
        );
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.shadow_reasons.len(), 1);
        let d = decide(
            vec![
                reason("LOC", Action::Challenge, 10),
                reason("X", Action::Challenge, 1),
            ],
            &Policy::default(),
            Some(&l),
        );
        assert_eq!(d.action, Action::Challenge);
        let big = combine(
            "r".into(),
            9000,
            vec![reason("LOC", Action::Challenge, 10)],
            vec![],
            &Policy::default(),
            Some(&l),
            Arc::from("v"),
        );
        assert_eq!(big.action, Action::Challenge);
        // A skipped rule error (allow, no score) does not take it away; a
        // scored flag does.
        let d = decide(
            vec![
                reason("LOC", Action::Challenge, 10),
                reason("RULE_ERROR", Action::Allow, 0),
            ],
            &Policy::default(),
            Some(&l),
        );
        assert_eq!(d.action, Action::Allow);
        assert_eq!(d.shadow_reasons.len(), 2);
        let d = decide(
            vec![
                reason("LOC", Action::Challenge, 10),
                reason("FLAG", Action::Allow, 5),
            ],
            &Policy::default(),
            Some(&l),
        );
        assert_eq!(d.action, Action::Challenge);
        // Nothing but notes: nothing to be lenient about.
        assert!(!l.applies(100, &[reason("RULE_ERROR", Action::Allow, 0)]));
    }

    #[test]
    fn huge_scores_saturate_instead_of_wrapping() {
        let policy = Policy {
            block_score: Some(100),
            ..Policy::default()
        };
        let d = decide(
            vec![
                reason("A", Action::Allow, i64::MAX),
                reason("B", Action::Allow, 10),
            ],
            &policy,
            None,
        );
        assert_eq!(d.score, i64::MAX);
        assert_eq!(d.action, Action::Block);
    }
}
