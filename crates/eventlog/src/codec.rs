//! Wire payloads: MessagePack maps with named fields (`rmp_serde::to_vec_named`), so tools that
//! know nothing of Coffer can still read them.
//!
//! Every event type has a version, carried in the `Coffer-Event-Version` header. Decoding goes
//! through [`upcast`], which turns an older payload into the current shape; new versions add a
//! branch there and never change what an old version means.
//!
//! History: `account_opened` v1 had no `overdraft_limit` (every account had a limit of 0); v2
//! added it. Contract v3 added `metadata` (a map, absent when empty) to `account_opened` (v3),
//! `deposited`, `withdrawn`, `transfer_debited`, `transfer_credited`, `hold_placed` and
//! `transaction_posted` (v2 each): an older version is read with no metadata. Contract v2 started from an empty stream and dropped the saga's `transfer_refunded`
//! and `transfer_completed`: no stream in use holds them, so they are unknown types now rather
//! than upcast.

use std::collections::BTreeMap;

use domain::{
    AccountId, Amount, Currency, Event, Leg, Metadata, OpenAccount, OverdraftLimit, TransferId,
    ValueError,
};
use serde::{Deserialize, Serialize};

/// The version each event type is written with today.
pub const CURRENT_VERSIONS: &[(&str, u32)] = &[
    ("account_opened", 3),
    ("deposited", 2),
    ("withdrawn", 2),
    ("transfer_debited", 2),
    ("transfer_credited", 2),
    ("account_closed", 1),
    ("account_metadata_changed", 1),
    ("hold_placed", 2),
    ("hold_captured", 1),
    ("hold_voided", 1),
    ("hold_expired", 1),
    ("opening_balance", 1),
    ("transaction_posted", 2),
];

/// The event types whose current version only added `metadata` to the one before: the older
/// version reads as the current one with none.
const METADATA_ADDED_IN: &[(&str, u32)] = &[
    ("deposited", 2),
    ("withdrawn", 2),
    ("transfer_debited", 2),
    ("transfer_credited", 2),
    ("hold_placed", 2),
    ("transaction_posted", 2),
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
    /// The event carries a header that lets the server erase it (`Nats-TTL`) or what came before
    /// it (`Nats-Rollup`). Writers never set one on an event; a writer credential can, so such an
    /// event is not built on: it may be gone tomorrow (issue 26).
    #[error("the event carries {0}: the stream may erase it, so nothing is built on it")]
    Erasable(&'static str),
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
struct AccountOpenedV2 {
    currency: String,
    owner: Option<String>,
    overdraft_limit: u64,
}

/// Metadata on the wire: a map of text, absent when empty.
type MetadataWire = BTreeMap<String, String>;

#[derive(Debug, Serialize, Deserialize)]
struct AccountOpened {
    currency: String,
    owner: Option<String>,
    overdraft_limit: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: MetadataWire,
}

#[derive(Debug, Serialize, Deserialize)]
struct MoneyMoved {
    amount: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: MetadataWire,
}

#[derive(Debug, Serialize, Deserialize)]
struct MetadataChanged {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    set: MetadataWire,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unset: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TransferDebited {
    transfer_id: String,
    to: String,
    amount: u64,
    currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: MetadataWire,
}

#[derive(Debug, Serialize, Deserialize)]
struct TransferCredited {
    transfer_id: String,
    from: String,
    amount: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: MetadataWire,
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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: MetadataWire,
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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: MetadataWire,
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
    MetadataChanged(MetadataChanged),
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
            metadata: open.metadata.entries().clone(),
        }),
        Event::Deposited {
            amount,
            reference,
            metadata,
        }
        | Event::Withdrawn {
            amount,
            reference,
            metadata,
        } => Payload::MoneyMoved(MoneyMoved {
            amount: amount.minor_units(),
            reference: reference.clone(),
            metadata: metadata.entries().clone(),
        }),
        Event::TransferDebited {
            transfer_id,
            to,
            amount,
            currency,
            reference,
            metadata,
        } => Payload::TransferDebited(TransferDebited {
            transfer_id: transfer_id.to_string(),
            to: to.to_string(),
            amount: amount.minor_units(),
            currency: currency.to_string(),
            reference: reference.clone(),
            metadata: metadata.entries().clone(),
        }),
        Event::TransferCredited {
            transfer_id,
            from,
            amount,
            reference,
            metadata,
        } => Payload::TransferCredited(TransferCredited {
            transfer_id: transfer_id.to_string(),
            from: from.to_string(),
            amount: amount.minor_units(),
            reference: reference.clone(),
            metadata: metadata.entries().clone(),
        }),
        Event::AccountClosed => Payload::AccountClosed(AccountClosed {}),
        Event::MetadataChanged { set, unset } => Payload::MetadataChanged(MetadataChanged {
            set: set.entries().clone(),
            unset: unset.clone(),
        }),
        Event::HoldPlaced {
            hold_id,
            to,
            amount,
            expires_at,
            reference,
            metadata,
        } => Payload::HoldPlaced(HoldPlaced {
            hold_id: hold_id.to_string(),
            to: to.to_string(),
            amount: amount.minor_units(),
            expires_at: rfc3339(*expires_at),
            reference: reference.clone(),
            metadata: metadata.entries().clone(),
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
            metadata,
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
            metadata: metadata.entries().clone(),
        }),
    }
}

/// Encodes an event as a MessagePack map with named fields; returns `(type, version, bytes)`.
///
/// An event without metadata is written with the version before metadata existed: its payload is
/// that version's byte for byte (the field is left out when empty), and builds from before it
/// (readers and writers during a rolling upgrade) read it.
pub fn encode(event: &Event) -> Result<(&'static str, u32, Vec<u8>), crate::Error> {
    let event_type = event.event_type();
    let bytes = rmp_serde::to_vec_named(&payload(event))
        .map_err(|error| crate::Error::Encode(error.to_string()))?;
    let version = if carries_metadata(event) {
        current_version(event_type)
    } else if event_type == "account_opened" {
        2
    } else {
        METADATA_ADDED_IN
            .iter()
            .find(|(name, _)| *name == event_type)
            .map_or(current_version(event_type), |(_, added)| added - 1)
    };
    Ok((event_type, version, bytes))
}

/// Whether an event has metadata of its own to write.
fn carries_metadata(event: &Event) -> bool {
    match event {
        Event::AccountOpened(open) => !open.metadata.is_empty(),
        Event::Deposited { metadata, .. }
        | Event::Withdrawn { metadata, .. }
        | Event::TransferDebited { metadata, .. }
        | Event::TransferCredited { metadata, .. }
        | Event::HoldPlaced { metadata, .. }
        | Event::TransactionPosted { metadata, .. } => !metadata.is_empty(),
        _ => false,
    }
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
                metadata: MetadataWire::new(),
            })
        }
        2 => {
            let old: AccountOpenedV2 = read("account_opened", bytes)?;
            Ok(AccountOpened {
                currency: old.currency,
                owner: old.owner,
                overdraft_limit: old.overdraft_limit,
                metadata: MetadataWire::new(),
            })
        }
        3 => read("account_opened", bytes),
        _ => Err(unknown_version("account_opened", version)),
    }
}

fn unknown_version(event_type: &str, version: u32) -> DecodeError {
    DecodeError::UnknownVersion {
        event_type: event_type.into(),
        version,
    }
}

fn metadata(event_type: &str, entries: MetadataWire) -> Result<Metadata, DecodeError> {
    checked(event_type, Metadata::new(entries))
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
            metadata: metadata(event_type, wire.metadata)?,
        }));
    }
    let known = CURRENT_VERSIONS.iter().any(|(name, _)| *name == event_type);
    if !known {
        return Err(DecodeError::UnknownType(event_type.into()));
    }
    // Upcasting: a version before `metadata` was added has the same fields without it, which
    // the current shape reads as empty.
    let older_without_metadata = METADATA_ADDED_IN
        .iter()
        .any(|(name, added)| *name == event_type && version.saturating_add(1) == *added);
    if version != current_version(event_type) && !older_without_metadata {
        return Err(unknown_version(event_type, version));
    }
    let event = match event_type {
        "deposited" | "withdrawn" => {
            let wire: MoneyMoved = read(event_type, bytes)?;
            let amount = checked(event_type, Amount::new(wire.amount.into()))?;
            let metadata = metadata(event_type, wire.metadata)?;
            if event_type == "deposited" {
                Event::Deposited {
                    amount,
                    reference: wire.reference,
                    metadata,
                }
            } else {
                Event::Withdrawn {
                    amount,
                    reference: wire.reference,
                    metadata,
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
                metadata: metadata(event_type, wire.metadata)?,
            }
        }
        "transfer_credited" => {
            let wire: TransferCredited = read(event_type, bytes)?;
            Event::TransferCredited {
                transfer_id: checked(event_type, TransferId::parse(&wire.transfer_id))?,
                from: checked(event_type, AccountId::parse(&wire.from))?,
                amount: checked(event_type, Amount::new(wire.amount.into()))?,
                reference: wire.reference,
                metadata: metadata(event_type, wire.metadata)?,
            }
        }
        "account_metadata_changed" => {
            let wire: MetadataChanged = read(event_type, bytes)?;
            Event::MetadataChanged {
                set: metadata(event_type, wire.set)?,
                unset: wire.unset,
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
                metadata: metadata(event_type, wire.metadata)?,
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
                metadata: metadata(event_type, wire.metadata)?,
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

    fn labels(pairs: &[(&str, &str)]) -> Metadata {
        Metadata::new(
            pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        )
        .unwrap()
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
            metadata: labels(&[("user", "u-1")]),
        }));
        round_trip(Event::Deposited {
            amount,
            reference: Some("r".into()),
            metadata: labels(&[("invoice", "9")]),
        });
        round_trip(Event::Withdrawn {
            amount,
            reference: None,
            metadata: Metadata::default(),
        });
        round_trip(Event::MetadataChanged {
            set: labels(&[("tier", "gold")]),
            unset: vec!["batch".into()],
        });
        round_trip(Event::TransferDebited {
            transfer_id: transfer.clone(),
            to: account.clone(),
            amount,
            currency: Currency::parse("USD").unwrap(),
            reference: None,
            metadata: labels(&[("order", "17")]),
        });
        round_trip(Event::TransferCredited {
            transfer_id: transfer.clone(),
            from: account.clone(),
            amount,
            reference: Some("x".into()),
            metadata: labels(&[("order", "17")]),
        });
        round_trip(Event::AccountClosed);
        let hold = TransferId::parse("h1").unwrap();
        round_trip(Event::HoldPlaced {
            hold_id: hold.clone(),
            to: AccountId::parse("b").unwrap(),
            amount,
            expires_at: 1_800_000_000,
            reference: Some("booking".into()),
            metadata: labels(&[("room", "12")]),
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
            metadata: labels(&[("cart", "c-3")]),
        });
    }

    #[test]
    fn payloads_use_named_fields() {
        let (_, _, bytes) = encode(&Event::Deposited {
            amount: Amount::new(5).unwrap(),
            reference: None,
            metadata: Metadata::default(),
        })
        .unwrap();
        assert_eq!(
            msgpack_to_json(&bytes).unwrap(),
            serde_json::json!({"amount": 5})
        );
        let (_, _, bytes) = encode(&Event::Deposited {
            amount: Amount::new(5).unwrap(),
            reference: None,
            metadata: labels(&[("invoice", "9")]),
        })
        .unwrap();
        assert_eq!(
            msgpack_to_json(&bytes).unwrap(),
            serde_json::json!({"amount": 5, "metadata": {"invoice": "9"}})
        );
    }

    /// Events written before metadata existed (version 1; `account_opened` 2) read as the
    /// current version with none; the current versions are the ones written.
    #[test]
    fn events_from_before_metadata_are_upcast_with_none() {
        #[derive(Serialize)]
        struct DepositedV1 {
            amount: u64,
            reference: Option<String>,
        }
        let old = rmp_serde::to_vec_named(&DepositedV1 {
            amount: 5,
            reference: Some("r".into()),
        })
        .unwrap();
        for event_type in ["deposited", "withdrawn"] {
            let event = decode(event_type, 1, &old).unwrap();
            assert_eq!(event.event_type(), event_type);
            assert!(
                matches!(&event, Event::Deposited { metadata, .. } | Event::Withdrawn { metadata, .. } if metadata.is_empty())
            );
        }
        #[derive(Serialize)]
        struct HoldPlacedV1 {
            hold_id: String,
            to: String,
            amount: u64,
            expires_at: String,
        }
        let old = rmp_serde::to_vec_named(&HoldPlacedV1 {
            hold_id: "h".into(),
            to: "b".into(),
            amount: 3,
            expires_at: "2027-01-01T00:00:00Z".into(),
        })
        .unwrap();
        assert!(matches!(
            decode("hold_placed", 1, &old).unwrap(),
            Event::HoldPlaced { metadata, .. } if metadata.is_empty()
        ));
        let old = rmp_serde::to_vec_named(&AccountOpenedV2 {
            currency: "EUR".into(),
            owner: None,
            overdraft_limit: 5,
        })
        .unwrap();
        assert_eq!(
            decode("account_opened", 2, &old).unwrap(),
            Event::AccountOpened(OpenAccount {
                currency: Currency::parse("EUR").unwrap(),
                owner: None,
                overdraft_limit: OverdraftLimit::new(5).unwrap(),
                metadata: Metadata::default(),
            })
        );
        // Without metadata the version before it is written, so older builds read it.
        let plain = encode(&Event::Deposited {
            amount: Amount::new(5).unwrap(),
            reference: None,
            metadata: Metadata::default(),
        })
        .unwrap();
        assert_eq!((plain.0, plain.1), ("deposited", 1));
        let labelled = encode(&Event::Deposited {
            amount: Amount::new(5).unwrap(),
            reference: None,
            metadata: labels(&[("k", "v")]),
        })
        .unwrap();
        assert_eq!(labelled.1, 2);
        for (event_type, version) in [
            ("account_opened", 3),
            ("deposited", 2),
            ("transfer_credited", 2),
            ("hold_placed", 2),
            ("transaction_posted", 2),
            ("account_metadata_changed", 1),
        ] {
            assert_eq!(current_version(event_type), version, "{event_type}");
        }
        // Metadata that breaks the bounds is a decode error, not a panic or a silent drop.
        let bad = rmp_serde::to_vec_named(&MoneyMoved {
            amount: 5,
            reference: None,
            metadata: [("bad key!".to_string(), "x".to_string())].into(),
        })
        .unwrap();
        assert!(matches!(
            decode("deposited", 2, &bad),
            Err(DecodeError::Value { .. })
        ));
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
                metadata: Metadata::default(),
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
            decode("deposited", 3, &bytes),
            Err(DecodeError::UnknownVersion { .. })
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
            metadata: MetadataWire::new(),
        })
        .unwrap();
        assert!(matches!(
            decode("deposited", 1, &zero),
            Err(DecodeError::Value { .. })
        ));
    }
}
