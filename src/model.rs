//! Domain types: what the API layer hands the engine after validation.
//!
//! Everything here is already checked (see `api::validate`), so the engine and
//! the rules never see a missing user, a negative amount or a bad address.

use std::collections::HashMap;
use std::net::IpAddr;

/// One recharge request to score.
#[derive(Debug, Clone)]
pub struct Recharge {
    pub request_id: String,
    /// The keyed fields: user, amount, target, address, device... (see [`Facts`]).
    pub facts: Facts,
    pub ip: IpAddr,
    pub account: Account,
    pub attributes: HashMap<String, String>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Account {
    pub real_name_verified: bool,
    pub status: AccountStatus,
    /// Unix ms; 0 when unknown.
    pub created_at_ms: i64,
    pub has_purchase_history: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AccountStatus {
    #[default]
    Unspecified,
    Active,
    Frozen,
    Lost,
    Arrears,
    Closed,
}

impl AccountStatus {
    /// The lower-case name scripts compare against (`account.status == "frozen"`).
    pub fn name(self) -> &'static str {
        match self {
            AccountStatus::Unspecified => "unspecified",
            AccountStatus::Active => "active",
            AccountStatus::Frozen => "frozen",
            AccountStatus::Lost => "lost",
            AccountStatus::Arrears => "arrears",
            AccountStatus::Closed => "closed",
        }
    }
}

/// A login, successful or not.
#[derive(Debug, Clone)]
pub struct Login {
    pub event_id: String,
    pub user_id: String,
    pub succeeded: bool,
    pub ip: Option<IpAddr>,
    pub ip_text: String,
    pub device_id: String,
    pub timestamp_ms: i64,
}

/// What became of a decided request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    Succeeded,
    Failed,
    Chargeback,
    ChallengePassed,
    ChallengeFailed,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 5] = [
        OutcomeKind::Succeeded,
        OutcomeKind::Failed,
        OutcomeKind::Chargeback,
        OutcomeKind::ChallengePassed,
        OutcomeKind::ChallengeFailed,
    ];

    /// The outcomes that cannot both be true of one request: a payment
    /// that failed neither succeeded nor was charged back, and a challenge
    /// was either passed or failed. The second of such a pair is refused,
    /// so that (say) FAILED then SUCCEEDED cannot release a reservation
    /// and leave the payment it stood for uncounted.
    pub fn contradicts(self, other: OutcomeKind) -> bool {
        use OutcomeKind::*;
        matches!(
            (self, other),
            (Succeeded | Chargeback, Failed)
                | (Failed, Succeeded | Chargeback)
                | (ChallengePassed, ChallengeFailed)
                | (ChallengeFailed, ChallengePassed)
        )
    }

    /// The lower-case name (logs, messages, Redis record fields).
    pub fn name(self) -> &'static str {
        match self {
            OutcomeKind::Succeeded => "succeeded",
            OutcomeKind::Failed => "failed",
            OutcomeKind::Chargeback => "chargeback",
            OutcomeKind::ChallengePassed => "challenge_passed",
            OutcomeKind::ChallengeFailed => "challenge_failed",
        }
    }

    pub fn bit(self) -> u8 {
        match self {
            OutcomeKind::Succeeded => 1,
            OutcomeKind::Failed => 2,
            OutcomeKind::Chargeback => 4,
            OutcomeKind::ChallengePassed => 8,
            OutcomeKind::ChallengeFailed => 16,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub request_id: String,
    /// Empty when the caller did not say; otherwise it must match the request.
    pub user_id: String,
    pub kind: OutcomeKind,
    pub timestamp_ms: i64,
}

/// A request field a window key or a distinct count can be made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    UserId,
    Ip,
    DeviceId,
    Target,
    Channel,
    Product,
    Amount,
    Currency,
}

impl Field {
    pub fn parse(name: &str) -> Option<Field> {
        Some(match name {
            "user_id" => Field::UserId,
            "ip" => Field::Ip,
            "device_id" => Field::DeviceId,
            "target" => Field::Target,
            "channel" => Field::Channel,
            "product" => Field::Product,
            "amount" => Field::Amount,
            "currency" => Field::Currency,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Field::UserId => "user_id",
            Field::Ip => "ip",
            Field::DeviceId => "device_id",
            Field::Target => "target",
            Field::Channel => "channel",
            Field::Product => "product",
            Field::Amount => "amount",
            Field::Currency => "currency",
        }
    }

    /// Fields a login event carries.
    pub fn on_login(self) -> bool {
        matches!(self, Field::UserId | Field::Ip | Field::DeviceId)
    }
}

/// The fields of a recharge that windows are keyed on, kept after the decision
/// so outcomes can find the same keys.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    pub user_id: String,
    /// The address in canonical text form, so one address is one key.
    pub ip_text: String,
    pub device_id: String,
    pub target: String,
    pub channel: String,
    pub product: String,
    /// ISO 4217, upper case; "CNY" when the caller sent none.
    pub currency: String,
    /// Minor units (fen), > 0 for recharges.
    pub amount: i64,
    /// Event time, Unix ms (the server's clock when the caller sent 0).
    pub timestamp_ms: i64,
}

impl Facts {
    /// user_id, ip_text, device_id, target, channel, product, currency.
    pub fn texts(&self) -> [&str; 7] {
        [
            &self.user_id,
            &self.ip_text,
            &self.device_id,
            &self.target,
            &self.channel,
            &self.product,
            &self.currency,
        ]
    }

    /// Facts from their texts, in [`Facts::texts`] order.
    pub fn from_texts(texts: [&str; 7], amount: i64, timestamp_ms: i64) -> Facts {
        let [user_id, ip_text, device_id, target, channel, product, currency] =
            texts.map(str::to_string);
        Facts {
            user_id,
            ip_text,
            device_id,
            target,
            channel,
            product,
            currency,
            amount,
            timestamp_ms,
        }
    }

    /// A field's value as text, without building a string (amount: None,
    /// see [`Facts::write`]).
    pub fn text(&self, field: Field) -> Option<&str> {
        Some(match field {
            Field::UserId => &self.user_id,
            Field::Ip => &self.ip_text,
            Field::DeviceId => &self.device_id,
            Field::Target => &self.target,
            Field::Channel => &self.channel,
            Field::Product => &self.product,
            Field::Currency => &self.currency,
            Field::Amount => return None,
        })
    }

    /// Writes the value of `field` to `out`; false when it is empty (a window
    /// keyed on an empty field does not apply to this request).
    pub fn write(&self, field: Field, out: &mut String) -> bool {
        match self.text(field) {
            Some(text) => {
                out.push_str(text);
                !text.is_empty()
            }
            None => {
                // Every request with an order window writes its amount into
                // a key: itoa, not `write!`, keeps the formatting machinery
                // off the hot path.
                out.push_str(itoa::Buffer::new().format(self.amount));
                true
            }
        }
    }
}

impl Login {
    pub fn facts(&self) -> Facts {
        Facts {
            user_id: self.user_id.clone(),
            ip_text: self.ip_text.clone(),
            device_id: self.device_id.clone(),
            timestamp_ms: self.timestamp_ms,
            ..Facts::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Window keys are kept in snapshots and in Redis, so the text of an
    /// amount in a key must not change between releases: plain decimal.
    #[test]
    fn an_amount_goes_into_a_key_as_plain_decimal() {
        for (amount, text) in [
            (0, "0"),
            (50_000, "50000"),
            (i64::MAX, "9223372036854775807"),
        ] {
            let facts = Facts {
                amount,
                ..Facts::default()
            };
            let mut key = String::from("k\x1f");
            assert!(facts.write(Field::Amount, &mut key));
            assert_eq!(key, format!("k\x1f{text}"));
        }
    }

    #[test]
    fn an_empty_field_does_not_apply() {
        let facts = Facts {
            user_id: "u1".into(),
            ..Facts::default()
        };
        let mut key = String::new();
        assert!(facts.write(Field::UserId, &mut key));
        assert!(!facts.write(Field::DeviceId, &mut key));
    }
}
