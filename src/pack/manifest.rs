//! The rule pack manifest (`pack.toml`), as written by analysts.
//!
//! Only shapes live here; meaning (checking names, resolving parameters,
//! compiling scripts) is the loader's job in `pack::load`.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub pack: PackInfo,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub profile: ProfileSettings,
    /// Numbers, strings and booleans the scripts read as `param.NAME`.
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
    /// Sliding windows, by name; scripts read them as `window.NAME`.
    #[serde(default)]
    pub windows: BTreeMap<String, WindowDef>,
    /// Block and allow lists, by name; scripts read membership as `list.NAME`.
    #[serde(default)]
    pub lists: BTreeMap<String, ListDef>,
    /// Rules, run in this order.
    #[serde(default)]
    pub rules: Vec<RuleDef>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackInfo {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// How hits combine into one decision.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// What a rule that errors or runs out of its limits does.
    #[serde(default)]
    pub on_error: OnError,
    /// The challenge asked for when a score threshold (not a rule) escalates.
    #[serde(default = "default_challenge")]
    pub default_challenge: String,
    /// A total score at or above this challenges, whatever the rules said.
    pub challenge_score: Option<i64>,
    /// A total score at or above this blocks.
    pub block_score: Option<i64>,
    /// Lists whose membership marks a request allow-listed: soft rules skip it.
    #[serde(default)]
    pub allowlists: Vec<String>,
    /// Small-amount leniency: below an amount, some codes alone only note.
    pub leniency: Option<Leniency>,
    /// What a request gets when shared state (Redis) cannot be reached in
    /// time: `open` decides on what needs no state, `challenge` or `block`.
    /// Every such decision carries a STATE_UNAVAILABLE reason.
    #[serde(default)]
    pub on_state_unavailable: StateFailure,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            on_error: OnError::default(),
            default_challenge: default_challenge(),
            challenge_score: None,
            block_score: None,
            allowlists: Vec::new(),
            leniency: None,
            on_state_unavailable: StateFailure::default(),
        }
    }
}

fn default_challenge() -> String {
    "captcha".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Leniency {
    /// Amount in fen, or the name of a parameter holding it.
    pub below_amount: Amount,
    /// Codes that, when they are the only enforcing hits, become shadow notes.
    pub demote: Vec<String>,
}

/// A literal amount in fen, or a parameter name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Amount {
    Fen(i64),
    Param(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The rule is skipped; the decision notes RULE_ERROR with action allow.
    #[default]
    Skip,
    /// The request is challenged.
    Challenge,
    /// The request is blocked.
    Block,
}

/// What to do without state (see [`Policy::on_state_unavailable`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateFailure {
    /// Fail open: the rules run on empty windows and profile, so whatever
    /// needs no state (lists, account status, real name, single amounts)
    /// still decides; the STATE_UNAVAILABLE reason itself allows.
    #[default]
    Open,
    /// Fail closed, softly: at least a challenge.
    Challenge,
    /// Fail closed: block.
    Block,
}

/// Sandbox limits for every script in the pack.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_max_operations")]
    pub max_operations: u64,
    #[serde(default = "default_max_call_depth")]
    pub max_call_depth: usize,
    #[serde(default = "default_max_string_size")]
    pub max_string_size: usize,
    #[serde(default = "default_max_array_size")]
    pub max_array_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: default_max_operations(),
            max_call_depth: default_max_call_depth(),
            max_string_size: default_max_string_size(),
            max_array_size: default_max_array_size(),
        }
    }
}

fn default_max_operations() -> u64 {
    10_000
}
fn default_max_call_depth() -> usize {
    16
}
fn default_max_string_size() -> usize {
    4096
}
fn default_max_array_size() -> usize {
    1024
}

/// How user profiles (usual regions, last location) are learned.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSettings {
    /// How far back located events count towards usual regions.
    #[serde(default = "default_profile_span")]
    pub span: String,
}

impl Default for ProfileSettings {
    fn default() -> Self {
        ProfileSettings {
            span: default_profile_span(),
        }
    }
}

fn default_profile_span() -> String {
    "30d".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowDef {
    /// Request fields that make the key: user_id, ip, device_id, target,
    /// channel, product, amount, currency.
    pub key: Vec<String>,
    /// count, sum (of amount) or distinct (values of `of`).
    pub aggregate: String,
    /// For `distinct`: the field whose distinct values are counted.
    pub of: Option<String>,
    /// e.g. "90s", "10m", "24h", "30d".
    pub span: String,
    /// What is counted: attempts, allowed, succeeded, failed, chargeback,
    /// challenge_failed, login_succeeded, login_failed.
    #[serde(default = "default_counts")]
    pub counts: String,
    /// Only recharges of at least this amount (fen, or a parameter name) count.
    pub min_amount: Option<Amount>,
}

fn default_counts() -> String {
    "attempts".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListDef {
    /// ip (CIDR ranges), user or device.
    pub kind: String,
    /// Path relative to the pack folder; one entry per line, `#` comments.
    pub file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    pub id: String,
    pub file: String,
    /// enforce (default) or shadow.
    #[serde(default)]
    pub mode: Mode,
    /// Soft rules are skipped for allow-listed requests.
    #[serde(default)]
    pub soft: bool,
    /// Score of a hit unless the script sets one.
    #[serde(default)]
    pub score: i64,
    #[serde(default)]
    pub description: String,
    /// Overrides the policy's `on_error` for this rule.
    pub on_error: Option<OnError>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// The longest span or interval: ten years. Far beyond any window or TTL,
/// and far enough below `i64::MAX` milliseconds that a time plus a span
/// never overflows.
pub const MAX_SPAN_MS: i64 = 3_650 * 86_400_000;

/// Parses "90s", "10m", "24h", "30d" (or plain seconds) into milliseconds,
/// from 1 ms to [`MAX_SPAN_MS`].
pub fn parse_span(text: &str) -> Option<i64> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: i64 = digits.parse().ok()?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms)
        .filter(|ms| (1..=MAX_SPAN_MS).contains(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(parse_span("10m"), Some(600_000));
        assert_eq!(parse_span("30d"), Some(30 * 86_400_000));
        assert_eq!(parse_span("45"), Some(45_000));
        assert_eq!(parse_span("0s"), None);
        assert_eq!(parse_span("3650d"), Some(MAX_SPAN_MS));
        assert_eq!(parse_span("3651d"), None);
        assert_eq!(parse_span("9223372036854775s"), None);
        assert_eq!(parse_span("10 parsecs"), None);
        assert_eq!(parse_span(""), None);
    }
}
