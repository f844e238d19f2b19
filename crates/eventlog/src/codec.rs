//! Wire payloads: MessagePack maps with named fields (`rmp_serde::to_vec_named`), so tools that
//! know nothing of Coffer can still read them.
//!
//! Every event type has a version, carried in the `Coffer-Event-Version` header. Decoding goes
//! through [`upcast`], which turns an older payload into the current shape; new versions add a
//! branch there and never change what an old version means.
//!
//! History: `account_opened` v1 had no `overdraft_limit` (every account had a limit of 0); v2
//! added it. Contract v2 started from an empty stream and dropped the saga's `transfer_refunded`
//! and `transfer_completed`: no stream in use holds them, so they are unknown types now rather
//! than upcast.

use domain::{
    AccountId, Amount, Currency, Event, Leg, OpenAccount, OverdraftLimit, TransferId, ValueError,
};
use serde::{Deserialize, Serialize};

/// The version each event type is written with today.
pub const CURRENT_VERSIONS: &[(&str, u32)] = &[
    ("account_opened", 2),
    ("deposited", 1),
    ("withdrawn", 1),
    ("transfer_debited", 1),
    ("transfer_credited", 1),
    ("account_closed", 1),
    ("hold_placed", 1),
    ("hold_captured", 1),
    ("hold_voided", 1),
    ("hold_expired", 1),
    ("opening_balance", 1),
    ("transaction_posted", 1),
];

/// Why a stored payload could not become an event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("{event_type} version {version} is newer than this build understands")]
    UnknownVersion { event_type: String, version: u32 },
    #[error("malformed MessagePack payload for {event_type}: {message}")]
    Payload { event_type: String, message: String },
    #[error("invalid value in {event_type}: {source}")]
    Value {
        event_type: String,
        source: ValueError,
    },
    #[error("missing or invalid header {0}")]
    Header(&'static str),
}

pub fn current_version(event_type: &str) -> u32 {
    CURRENT_VERSIONS
        .iter()
        .find(|(name, _)| *name == event_type)
        .map_or(1, |(_, version)| *version)
}

#[derive(Debug, Serialize, Deserialize)]
struct AccountOpenedV1 {
    currency: String,
    owner: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct AccountOpened {
    currency: String,
    owner: Option<String>,
    overdraft_limit: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct MoneyMoved {
    amount: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TransferDebited {
    transfer_id: String,
    to: String,
    amount: u64,
    currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TransferCredited {
    transfer_id: String,
    from: String,
    amount: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct AccountClosed {}

#[derive(Debug, Serialize, Deserialize)]
struct HoldPlaced {
    hold_id: String,
    to: String,
    amount: u64,
    /// RFC 3339, as everywhere else times are shown.
    expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct HoldCaptured {
    hold_id: String,
    amount: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct OpeningBalance {
    balance: i64,
}

/// One posting of a transaction as an account's `transaction_posted` carries it.
#[derive(Debug, Serialize, Deserialize)]
struct PostingWire {
    /// Its index in the transaction (0-based).
    posting: u16,
    from: String,
    to: String,
    amount: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct TransactionPosted {
    transaction_id: String,
    currency: String,
    /// Signed: this account's net change.
    net: i64,
    /// The postings that name this account.
    postings: Vec<PostingWire>,
    /// How many accounts (events) the transaction has.
    parts: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reverses: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
}

/// `hold_voided` and `hold_expired`.
#[derive(Debug, Serialize, Deserialize)]
struct HoldReleased {
    hold_id: String,
}

fn rfc3339(unix_seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|time| {
            time.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn unix_seconds(event_type: &str, text: &str) -> Result<i64, DecodeError> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(time::OffsetDateTime::unix_timestamp)
        .map_err(|error| DecodeError::Payload {
            event_type: event_type.into(),
            message: format!("expires_at: {error}"),
        })
}

/// The current wire shape of an event, one variant per type.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Payload {
    AccountOpened(AccountOpened),
    MoneyMoved(MoneyMoved),
    TransferDebited(TransferDebited),
    TransferCredited(TransferCredited),
    AccountClosed(AccountClosed),
    HoldPlaced(HoldPlaced),
    HoldCaptured(HoldCaptured),
    HoldReleased(HoldReleased),
    OpeningBalance(OpeningBalance),
    TransactionPosted(TransactionPosted),
}

fn payload(event: &Event) -> Payload {
    match event {
        Event::AccountOpened(open) => Payload::AccountOpened(AccountOpened {
            currency: open.currency.to_string(),
            owner: open.owner.clone(),
            overdraft_limit: open.overdraft_limit.minor_units(),
        }),
        Event::Deposited { amount, reference } | Event::Withdrawn { amount, reference } => {
            Payload::MoneyMoved(MoneyMoved {
                amount: amount.minor_units(),
                reference: reference.clone(),
            })
        }
        Event::TransferDebited {
            transfer_id,
            to,
            amount,
            currency,
            reference,
        } => Payload::TransferDebited(TransferDebited {
            transfer_id: transfer_id.to_string(),
            to: to.to_string(),
            amount: amount.minor_units(),
            currency: currency.to_string(),
            reference: reference.clone(),
        }),
        Event::TransferCredited {
            transfer_id,
            from,
            amount,
            reference,
        } => Payload::TransferCredited(TransferCredited {
            transfer_id: transfer_id.to_string(),
            from: from.to_string(),
            amount: amount.minor_units(),
            reference: reference.clone(),
        }),
        Event::AccountClosed => Payload::AccountClosed(AccountClosed {}),
        Event::HoldPlaced {
            hold_id,
            to,
            amount,
            expires_at,
            reference,
        } => Payload::HoldPlaced(HoldPlaced {
            hold_id: hold_id.to_string(),
            to: to.to_string(),
            amount: amount.minor_units(),
            expires_at: rfc3339(*expires_at),
            reference: reference.clone(),
        }),
        Event::HoldCaptured { hold_id, amount } => Payload::HoldCaptured(HoldCaptured {
            hold_id: hold_id.to_string(),
            amount: amount.minor_units(),
        }),
        Event::HoldVoided { hold_id } | Event::HoldExpired { hold_id } => {
            Payload::HoldReleased(HoldReleased {
                hold_id: hold_id.to_string(),
            })
        }
        Event::OpeningBalance { balance } => {
            Payload::OpeningBalance(OpeningBalance { balance: *balance })
        }
        Event::TransactionPosted {
            transaction_id,
            currency,
            net,
            legs,
            parts,
            reverses,
            reference,
        } => Payload::TransactionPosted(TransactionPosted {
            transaction_id: transaction_id.to_string(),
            currency: currency.to_string(),
            net: *net,
            postings: legs
                .iter()
                .map(|leg| PostingWire {
                    posting: leg.posting,
                    from: leg.from.to_string(),
                    to: leg.to.to_string(),
                    amount: leg.amount.minor_units(),
                })
                .collect(),
            parts: *parts,
            reverses: reverses.as_ref().map(ToString::to_string),
            reference: reference.clone(),
        }),
    }
}

/// Encodes an event as a MessagePack map with named fields; returns `(type, version, bytes)`.
pub fn encode(event: &Event) -> Result<(&'static str, u32, Vec<u8>), crate::Error> {
    let event_type = event.event_type();
    let bytes = rmp_serde::to_vec_named(&payload(event))
        .map_err(|error| crate::Error::Encode(error.to_string()))?;
    Ok((event_type, current_version(event_type), bytes))
}

/// The event's own fields as JSON, for the events endpoint and `coffer decode`.
pub fn to_json(event: &Event) -> serde_json::Value {
    serde_json::to_value(payload(event)).unwrap_or(serde_json::Value::Null)
}

/// Turns any stored MessagePack payload into generic JSON, without knowing its type.
pub fn msgpack_to_json(bytes: &[u8]) -> Result<serde_json::Value, DecodeError> {
    rmp_serde::from_slice(bytes).map_err(|error| DecodeError::Payload {
        event_type: "unknown".into(),
        message: error.to_string(),
    })
}

fn read<'de, T: Deserialize<'de>>(event_type: &str, bytes: &'de [u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(bytes).map_err(|error| DecodeError::Payload {
        event_type: event_type.into(),
        message: error.to_string(),
    })
}

/// The upcasting hook: older versions are read in their own shape and lifted to the current one.
fn upcast_account_opened(version: u32, bytes: &[u8]) -> Result<AccountOpened, DecodeError> {
    match version {
        1 => {
            let old: AccountOpenedV1 = read("account_opened", bytes)?;
            Ok(AccountOpened {
                currency: old.currency,
                owner: old.owner,
                overdraft_limit: 0,
            })
        }
        2 => read("account_opened", bytes),
        _ => Err(unknown_version("account_opened", version)),
    }
}

fn unknown_version(event_type: &str, version: u32) -> DecodeError {
    DecodeError::UnknownVersion {
        event_type: event_type.into(),
        version,
    }
}

fn checked<T>(event_type: &str, result: Result<T, ValueError>) -> Result<T, DecodeError> {
    result.map_err(|source| DecodeError::Value {
        event_type: event_type.into(),
        source,
    })
}

/// Decodes a stored payload of the given type and version into the current domain event.
pub fn decode(event_type: &str, version: u32, bytes: &[u8]) -> Result<Event, DecodeError> {
    if event_type == "account_opened" {
        let wire = upcast_account_opened(version, bytes)?;
        return Ok(Event::AccountOpened(OpenAccount {
            currency: checked(event_type, Currency::parse(&wire.currency))?,
            owner: wire.owner,
            overdraft_limit: checked(event_type, OverdraftLimit::new(wire.overdraft_limit.into()))?,
        }));
    }
    let known = CURRENT_VERSIONS.iter().any(|(name, _)| *name == event_type);
    if !known {
        return Err(DecodeError::UnknownType(event_type.into()));
    }
    if version != current_version(event_type) {
        return Err(unknown_version(event_type, version));
    }
    let event = match event_type {
        "deposited" | "withdrawn" => {
            let wire: MoneyMoved = read(event_type, bytes)?;
            let amount = checked(event_type, Amount::new(wire.amount.into()))?;
            if event_type == "deposited" {
                Event::Deposited {
                    amount,
                    reference: wire.reference,
                }
            } else {
                Event::Withdrawn {
                    amount,
                    reference: wire.reference,
                }
            }
        }
        "transfer_debited" => {
            let wire: TransferDebited = read(event_type, bytes)?;
            Event::TransferDebited {
                transfer_id: checked(event_type, TransferId::parse(&wire.transfer_id))?,
                to: checked(event_type, AccountId::parse(&wire.to))?,
                amount: checked(event_type, Amount::new(wire.amount.into()))?,
                currency: checked(event_type, Currency::parse(&wire.currency))?,
                reference: wire.reference,
            }
        }
        "transfer_credited" => {
            let wire: TransferCredited = read(event_type, bytes)?;
            Event::TransferCredited {
                transfer_id: checked(event_type, TransferId::parse(&wire.transfer_id))?,
                from: checked(event_type, AccountId::parse(&wire.from))?,
                amount: checked(event_type, Amount::new(wire.amount.into()))?,
                reference: wire.reference,
            }
        }
        "hold_placed" => {
            let wire: HoldPlaced = read(event_type, bytes)?;
            Event::HoldPlaced {
                hold_id: checked(event_type, TransferId::parse(&wire.hold_id))?,
                to: checked(event_type, AccountId::parse(&wire.to))?,
                amount: checked(event_type, Amount::new(wire.amount.into()))?,
                expires_at: unix_seconds(event_type, &wire.expires_at)?,
                reference: wire.reference,
            }
        }
        "hold_captured" => {
            let wire: HoldCaptured = read(event_type, bytes)?;
            Event::HoldCaptured {
                hold_id: checked(event_type, TransferId::parse(&wire.hold_id))?,
                amount: checked(event_type, Amount::new(wire.amount.into()))?,
            }
        }
        "opening_balance" => {
            let wire: OpeningBalance = read(event_type, bytes)?;
            Event::OpeningBalance {
                balance: wire.balance,
            }
        }
        "transaction_posted" => {
            let wire: TransactionPosted = read(event_type, bytes)?;
            let mut legs = Vec::with_capacity(wire.postings.len());
            for leg in wire.postings {
                legs.push(Leg {
                    posting: leg.posting,
                    from: checked(event_type, AccountId::parse(&leg.from))?,
                    to: checked(event_type, AccountId::parse(&leg.to))?,
                    amount: checked(event_type, Amount::new(leg.amount.into()))?,
                });
            }
            Event::TransactionPosted {
                transaction_id: checked(event_type, TransferId::parse(&wire.transaction_id))?,
                currency: checked(event_type, Currency::parse(&wire.currency))?,
                net: wire.net,
                legs,
                parts: wire.parts,
                reverses: wire
                    .reverses
                    .map(|id| checked(event_type, TransferId::parse(&id)))
                    .transpose()?,
                reference: wire.reference,
            }
        }
        "hold_voided" | "hold_expired" => {
            let wire: HoldReleased = read(event_type, bytes)?;
            let hold_id = checked(event_type, TransferId::parse(&wire.hold_id))?;
            if event_type == "hold_voided" {
                Event::HoldVoided { hold_id }
            } else {
                Event::HoldExpired { hold_id }
            }
        }
        _ => {
            let _: AccountClosed = read(event_type, bytes)?;
            Event::AccountClosed
        }
    };
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(event: Event) {
        let (event_type, version, bytes) = encode(&event).unwrap();
        assert_eq!(decode(event_type, version, &bytes).unwrap(), event);
    }

    #[test]
    fn every_event_round_trips() {
        let account = AccountId::parse("b").unwrap();
        let transfer = TransferId::parse("t1").unwrap();
        let amount = Amount::new(42).unwrap();
        round_trip(Event::AccountOpened(OpenAccount {
            currency: Currency::parse("EUR").unwrap(),
            owner: Some("o".into()),
            overdraft_limit: OverdraftLimit::new(7).unwrap(),
        }));
        round_trip(Event::Deposited {
            amount,
            reference: Some("r".into()),
        });
        round_trip(Event::Withdrawn {
            amount,
            reference: None,
        });
        round_trip(Event::TransferDebited {
            transfer_id: transfer.clone(),
            to: account.clone(),
            amount,
            currency: Currency::parse("USD").unwrap(),
            reference: None,
        });
        round_trip(Event::TransferCredited {
            transfer_id: transfer.clone(),
            from: account.clone(),
            amount,
            reference: Some("x".into()),
        });
        round_trip(Event::AccountClosed);
        let hold = TransferId::parse("h1").unwrap();
        round_trip(Event::HoldPlaced {
            hold_id: hold.clone(),
            to: AccountId::parse("b").unwrap(),
            amount,
            expires_at: 1_800_000_000,
            reference: Some("booking".into()),
        });
        round_trip(Event::HoldCaptured {
            hold_id: hold.clone(),
            amount,
        });
        round_trip(Event::HoldVoided {
            hold_id: hold.clone(),
        });
        round_trip(Event::HoldExpired { hold_id: hold });
        round_trip(Event::OpeningBalance { balance: -42 });
        round_trip(Event::TransactionPosted {
            transaction_id: TransferId::parse("tx").unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            net: -40,
            legs: vec![
                Leg {
                    posting: 0,
                    from: AccountId::parse("a").unwrap(),
                    to: account.clone(),
                    amount,
                },
                Leg {
                    posting: 3,
                    from: account.clone(),
                    to: AccountId::parse("a").unwrap(),
                    amount: Amount::new(2).unwrap(),
                },
            ],
            parts: 4,
            reverses: Some(transfer),
            reference: Some("order".into()),
        });
    }

    #[test]
    fn payloads_use_named_fields() {
        let (_, _, bytes) = encode(&Event::Deposited {
            amount: Amount::new(5).unwrap(),
            reference: None,
        })
        .unwrap();
        assert_eq!(
            msgpack_to_json(&bytes).unwrap(),
            serde_json::json!({"amount": 5})
        );
    }

    #[test]
    fn account_opened_version_1_is_upcast_with_a_zero_limit() {
        let old = rmp_serde::to_vec_named(&AccountOpenedV1 {
            currency: "EUR".into(),
            owner: Some("legacy".into()),
        })
        .unwrap();
        let event = decode("account_opened", 1, &old).unwrap();
        assert_eq!(
            event,
            Event::AccountOpened(OpenAccount {
                currency: Currency::parse("EUR").unwrap(),
                owner: Some("legacy".into()),
                overdraft_limit: OverdraftLimit::default(),
            })
        );
    }

    #[test]
    fn unknown_types_versions_and_bad_values_are_errors_not_panics() {
        let (_, _, bytes) = encode(&Event::AccountClosed).unwrap();
        assert!(matches!(
            decode("exploded", 1, &bytes),
            Err(DecodeError::UnknownType(_))
        ));
        assert!(matches!(
            decode("deposited", 9, &bytes),
            Err(DecodeError::UnknownVersion { .. })
        ));
        assert!(matches!(
            decode("deposited", 1, b"\xff\x00"),
            Err(DecodeError::Payload { .. })
        ));
        let zero = rmp_serde::to_vec_named(&MoneyMoved {
            amount: 0,
            reference: None,
        })
        .unwrap();
        assert!(matches!(
            decode("deposited", 1, &zero),
            Err(DecodeError::Value { .. })
        ));
    }
}
