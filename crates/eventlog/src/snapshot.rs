//! Account snapshots: an account's state as of one of its events, so that loading a long history
//! reads the snapshot and the events after it instead of every event.
//!
//! Snapshots live in their own stream (`COFFER_SNAPSHOTS`), one per account (the stream keeps
//! the last message per subject), outside the log: they are a cache of a fold of the log, never
//! a source of truth. A snapshot is used only when it can be shown to belong to the log as it is:
//! the account's event at the snapshot's position must carry the snapshot's chain value (the
//! hash chain covers the account's whole history), so a snapshot of a re-created stream, of
//! another history, or written by a bug that broke the chain is ignored, and the history is
//! replayed from the start. A snapshot in a format this build does not know is ignored too.

use std::collections::BTreeMap;

use domain::account::{Account, OpenHold, Status};
use domain::{AccountId, AccountState, Amount, Currency, Metadata, OverdraftLimit, TransferId};
use serde::{Deserialize, Serialize};

use crate::codec::DecodeError;

/// The snapshot format this build writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;

/// An account's state as of its event at `position`, whose chain value is `chain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSnapshot {
    pub state: AccountState,
    pub position: u64,
    pub chain: String,
}

/// Only the version, read first so that a newer format is recognised and not misread.
#[derive(Deserialize)]
struct Version {
    version: u32,
}

#[derive(Serialize, Deserialize)]
struct SnapshotV1 {
    version: u32,
    /// `domain::account::STATE_VERSION` of the build that folded the state: the chain check
    /// proves which events a snapshot covers, not that this build would fold them the same way.
    #[serde(default)]
    state_version: u32,
    account_id: String,
    position: u64,
    chain: String,
    /// None: the account has no event yet (never snapshotted, but representable).
    account: Option<AccountV1>,
}

#[derive(Serialize, Deserialize)]
struct AccountV1 {
    currency: String,
    owner: Option<String>,
    overdraft_limit: u64,
    balance: i64,
    closed: bool,
    holds: Vec<HoldV1>,
    held: i64,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct HoldV1 {
    hold_id: String,
    to: String,
    amount: u64,
    expires_at: i64,
    reference: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

fn invalid(what: &str, error: impl std::fmt::Display) -> DecodeError {
    DecodeError::Payload {
        event_type: "snapshot".into(),
        message: format!("{what}: {error}"),
    }
}

impl AccountSnapshot {
    /// The MessagePack payload (named fields, so that a later version can add some).
    pub fn encode(&self) -> Result<Vec<u8>, crate::Error> {
        let account = self.state.account().map(|account| AccountV1 {
            currency: account.currency.as_str().to_owned(),
            owner: account.owner.clone(),
            overdraft_limit: account.overdraft_limit.minor_units(),
            balance: account.balance,
            closed: account.status == Status::Closed,
            holds: account
                .holds
                .iter()
                .map(|(hold_id, hold)| HoldV1 {
                    hold_id: hold_id.as_str().to_owned(),
                    to: hold.to.as_str().to_owned(),
                    amount: hold.amount.minor_units(),
                    expires_at: hold.expires_at,
                    reference: hold.reference.clone(),
                    metadata: hold.metadata.entries().clone(),
                })
                .collect(),
            held: account.held,
            metadata: account.metadata.entries().clone(),
        });
        let snapshot = SnapshotV1 {
            version: SNAPSHOT_VERSION,
            state_version: domain::account::STATE_VERSION,
            account_id: self.state.id().as_str().to_owned(),
            position: self.position,
            chain: self.chain.clone(),
            account,
        };
        rmp_serde::to_vec_named(&snapshot).map_err(|error| crate::Error::Encode(error.to_string()))
    }

    /// Reads a payload; `Ok(None)` for a format this build does not know.
    pub fn decode(bytes: &[u8]) -> Result<Option<Self>, DecodeError> {
        let version: Version =
            rmp_serde::from_slice(bytes).map_err(|error| invalid("version", error))?;
        if version.version != SNAPSHOT_VERSION {
            return Ok(None);
        }
        let snapshot: SnapshotV1 =
            rmp_serde::from_slice(bytes).map_err(|error| invalid("payload", error))?;
        if snapshot.state_version != domain::account::STATE_VERSION {
            return Ok(None);
        }
        let id = AccountId::parse(&snapshot.account_id).map_err(|error| invalid("id", error))?;
        let state = match snapshot.account {
            None => AccountState::new(id),
            Some(account) => {
                let mut holds = BTreeMap::new();
                for hold in account.holds {
                    holds.insert(
                        TransferId::parse(&hold.hold_id).map_err(|e| invalid("hold id", e))?,
                        OpenHold {
                            to: AccountId::parse(&hold.to).map_err(|e| invalid("hold to", e))?,
                            amount: Amount::new(hold.amount.into())
                                .map_err(|e| invalid("hold amount", e))?,
                            expires_at: hold.expires_at,
                            reference: hold.reference,
                            metadata: Metadata::new(hold.metadata)
                                .map_err(|e| invalid("hold metadata", e))?,
                        },
                    );
                }
                AccountState::Opened(Account {
                    id,
                    currency: Currency::parse(&account.currency)
                        .map_err(|e| invalid("currency", e))?,
                    owner: account.owner,
                    overdraft_limit: OverdraftLimit::new(account.overdraft_limit.into())
                        .map_err(|e| invalid("overdraft limit", e))?,
                    balance: account.balance,
                    status: if account.closed {
                        Status::Closed
                    } else {
                        Status::Open
                    },
                    holds,
                    held: account.held,
                    metadata: Metadata::new(account.metadata)
                        .map_err(|e| invalid("metadata", e))?,
                })
            }
        };
        Ok(Some(Self {
            state,
            position: snapshot.position,
            chain: snapshot.chain,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opened() -> AccountState {
        let id = AccountId::parse("snap-1").unwrap();
        let mut holds = BTreeMap::new();
        holds.insert(
            TransferId::parse("h-1").unwrap(),
            OpenHold {
                to: AccountId::parse("other").unwrap(),
                amount: Amount::new(40).unwrap(),
                expires_at: 1_800_000_000,
                reference: Some("rent".into()),
                metadata: Metadata::new([("flat".to_string(), "3b".to_string())].into()).unwrap(),
            },
        );
        AccountState::Opened(Account {
            id,
            currency: Currency::parse("EUR").unwrap(),
            owner: Some("Ada".into()),
            overdraft_limit: OverdraftLimit::new(100).unwrap(),
            balance: -20,
            status: Status::Open,
            holds,
            held: 40,
            metadata: Metadata::new([("user".to_string(), "u-7".to_string())].into()).unwrap(),
        })
    }

    #[test]
    fn a_snapshot_reads_back_as_it_was_written() {
        let snapshot = AccountSnapshot {
            state: opened(),
            position: 42,
            chain: "abc".into(),
        };
        let decoded = AccountSnapshot::decode(&snapshot.encode().unwrap()).unwrap();
        assert_eq!(decoded, Some(snapshot));
    }

    #[test]
    fn another_version_is_not_read_and_garbage_is_an_error() {
        #[derive(Serialize)]
        struct Later {
            version: u32,
            everything_else: String,
        }
        let later = rmp_serde::to_vec_named(&Later {
            version: 2,
            everything_else: "new".into(),
        })
        .unwrap();
        assert_eq!(AccountSnapshot::decode(&later).unwrap(), None);
        assert!(AccountSnapshot::decode(b"\xff\x00garbage").is_err());
        // Same format, folded by another `evolve`: not reused.
        let mut other_fold: SnapshotV1 = rmp_serde::from_slice(
            &AccountSnapshot {
                state: opened(),
                position: 7,
                chain: "c".into(),
            }
            .encode()
            .unwrap(),
        )
        .unwrap();
        other_fold.state_version = domain::account::STATE_VERSION + 1;
        let bytes = rmp_serde::to_vec_named(&other_fold).unwrap();
        assert_eq!(AccountSnapshot::decode(&bytes).unwrap(), None);
    }
}
