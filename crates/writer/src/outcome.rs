//! What a command that succeeded answers. A retry with the same key or transfer id gets the same
//! answer again, read back from the marker written with the first one.

use domain::{AccountId, Metadata, TransferId};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// `201` to an open, `200` to a close: the account and the position of its event.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountPosition {
    pub account_id: AccountId,
    /// The stream position of the event: pass it as `min_position` to a reader.
    pub position: u64,
}

/// `200` to a metadata change: the account's metadata right after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountMetadata {
    pub account_id: AccountId,
    pub metadata: Metadata,
    pub position: u64,
}

/// `200` to a deposit or withdrawal: the balance right after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Balance {
    pub account_id: AccountId,
    /// Signed minor units.
    pub balance: i64,
    pub position: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    Completed,
}

/// `201` to a transfer: committed, debit and credit together.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransferCompleted {
    pub transfer_id: TransferId,
    pub status: TransferStatus,
    pub position: u64,
}

/// `201` to a transaction or a reversal: every posting committed together.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransactionCompleted {
    pub transaction_id: TransferId,
    /// On a reversal: the transfer or transaction it moved back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverses: Option<TransferId>,
    pub status: TransferStatus,
    /// The position of the transaction's last event: a reader that shows it shows every part.
    pub position: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeldStatus {
    Held,
}

/// `201` to a hold.
#[derive(Debug, Serialize, ToSchema)]
pub struct HoldPlaced {
    pub hold_id: TransferId,
    pub status: HeldStatus,
    #[schema(format = DateTime)]
    pub expires_at: String,
    pub position: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CapturedStatus {
    Captured,
}

/// `200` to a capture: the captured amount moved, the rest released.
#[derive(Debug, Serialize, ToSchema)]
pub struct HoldCaptured {
    pub hold_id: TransferId,
    pub status: CapturedStatus,
    pub amount: u64,
    pub position: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleasedStatus {
    Voided,
    Expired,
}

/// `200` to a void (`expired` is what the expiry worker's release says).
#[derive(Debug, Serialize, ToSchema)]
pub struct HoldReleased {
    pub hold_id: TransferId,
    pub status: ReleasedStatus,
    pub position: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Opened {
        account_id: AccountId,
        position: u64,
    },
    BalanceChanged {
        account_id: AccountId,
        balance: i64,
        position: u64,
    },
    /// Both sides of the transfer are committed; `position` is the credit's.
    TransferCompleted {
        transfer_id: TransferId,
        position: u64,
    },
    Closed {
        account_id: AccountId,
        position: u64,
    },
    /// The account's metadata changed; `metadata` is all of it after the change.
    MetadataChanged {
        account_id: AccountId,
        metadata: Metadata,
        position: u64,
    },
    /// A hold is placed; `expires_at` in unix seconds.
    HoldPlaced {
        hold_id: TransferId,
        expires_at: i64,
        position: u64,
    },
    /// A hold is captured; `position` is the receiver's credit.
    HoldCaptured {
        hold_id: TransferId,
        amount: u64,
        position: u64,
    },
    /// A hold is released: `status` is `voided` or `expired`.
    HoldReleased {
        hold_id: TransferId,
        status: &'static str,
        position: u64,
    },
    /// Every part of a transaction (or reversal) is committed; `position` is the last part's.
    TransactionCompleted {
        transaction_id: TransferId,
        reverses: Option<TransferId>,
        position: u64,
    },
    /// The first answer to a keyed request, read back from its marker.
    Replayed { status: u16, body: Value },
}

/// Unix seconds as RFC 3339.
pub fn rfc3339(unix_seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|time| {
            time.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl Outcome {
    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Outcome::Opened { .. }
            | Outcome::TransferCompleted { .. }
            | Outcome::TransactionCompleted { .. }
            | Outcome::HoldPlaced { .. } => 201,
            Outcome::Replayed { status, .. } => *status,
            Outcome::BalanceChanged { .. }
            | Outcome::Closed { .. }
            | Outcome::MetadataChanged { .. }
            | Outcome::HoldCaptured { .. }
            | Outcome::HoldReleased { .. } => 200,
        }
    }

    pub fn body(&self) -> Value {
        let body = match self {
            Outcome::Opened {
                account_id,
                position,
            }
            | Outcome::Closed {
                account_id,
                position,
            } => serde_json::to_value(AccountPosition {
                account_id: account_id.clone(),
                position: *position,
            }),
            Outcome::MetadataChanged {
                account_id,
                metadata,
                position,
            } => serde_json::to_value(AccountMetadata {
                account_id: account_id.clone(),
                metadata: metadata.clone(),
                position: *position,
            }),
            Outcome::BalanceChanged {
                account_id,
                balance,
                position,
            } => serde_json::to_value(Balance {
                account_id: account_id.clone(),
                balance: *balance,
                position: *position,
            }),
            Outcome::TransferCompleted {
                transfer_id,
                position,
            } => serde_json::to_value(TransferCompleted {
                transfer_id: transfer_id.clone(),
                status: TransferStatus::Completed,
                position: *position,
            }),
            Outcome::HoldPlaced {
                hold_id,
                expires_at,
                position,
            } => serde_json::to_value(HoldPlaced {
                hold_id: hold_id.clone(),
                status: HeldStatus::Held,
                expires_at: rfc3339(*expires_at),
                position: *position,
            }),
            Outcome::HoldCaptured {
                hold_id,
                amount,
                position,
            } => serde_json::to_value(HoldCaptured {
                hold_id: hold_id.clone(),
                status: CapturedStatus::Captured,
                amount: *amount,
                position: *position,
            }),
            Outcome::HoldReleased {
                hold_id,
                status,
                position,
            } => serde_json::to_value(HoldReleased {
                hold_id: hold_id.clone(),
                status: if *status == "expired" {
                    ReleasedStatus::Expired
                } else {
                    ReleasedStatus::Voided
                },
                position: *position,
            }),
            Outcome::TransactionCompleted {
                transaction_id,
                reverses,
                position,
            } => serde_json::to_value(TransactionCompleted {
                transaction_id: transaction_id.clone(),
                reverses: reverses.clone(),
                status: TransferStatus::Completed,
                position: *position,
            }),
            Outcome::Replayed { body, .. } => return body.clone(),
        };
        // Serializing these plain structs to a JSON value cannot fail (string keys, no maps).
        body.unwrap_or_default()
    }

    pub fn position(&self) -> u64 {
        match self {
            Outcome::Opened { position, .. }
            | Outcome::BalanceChanged { position, .. }
            | Outcome::TransferCompleted { position, .. }
            | Outcome::Closed { position, .. }
            | Outcome::MetadataChanged { position, .. }
            | Outcome::HoldPlaced { position, .. }
            | Outcome::HoldCaptured { position, .. }
            | Outcome::HoldReleased { position, .. }
            | Outcome::TransactionCompleted { position, .. } => *position,
            Outcome::Replayed { body, .. } => body["position"].as_u64().unwrap_or(0),
        }
    }

    /// The query path of what this answer created, for the `Location` header.
    pub fn location(&self) -> Option<String> {
        match self {
            Outcome::TransferCompleted { transfer_id, .. } => {
                Some(format!("/v1/transfers/{transfer_id}"))
            }
            Outcome::HoldPlaced { hold_id, .. } => Some(format!("/v1/holds/{hold_id}")),
            Outcome::TransactionCompleted { transaction_id, .. } => {
                Some(format!("/v1/transactions/{transaction_id}"))
            }
            Outcome::Replayed { status: 201, body } => {
                if let Some(id) = body["transaction_id"].as_str() {
                    Some(format!("/v1/transactions/{id}"))
                } else if let Some(id) = body["transfer_id"].as_str() {
                    Some(format!("/v1/transfers/{id}"))
                } else {
                    body["hold_id"].as_str().map(|id| format!("/v1/holds/{id}"))
                }
            }
            _ => None,
        }
    }

    /// The same answer at `position` (decided before the append knew it).
    pub fn at(self, position: u64) -> Self {
        match self {
            Outcome::Opened { account_id, .. } => Outcome::Opened {
                account_id,
                position,
            },
            Outcome::BalanceChanged {
                account_id,
                balance,
                ..
            } => Outcome::BalanceChanged {
                account_id,
                balance,
                position,
            },
            Outcome::MetadataChanged {
                account_id,
                metadata,
                ..
            } => Outcome::MetadataChanged {
                account_id,
                metadata,
                position,
            },
            Outcome::TransferCompleted { transfer_id, .. } => Outcome::TransferCompleted {
                transfer_id,
                position,
            },
            Outcome::Closed { account_id, .. } => Outcome::Closed {
                account_id,
                position,
            },
            Outcome::HoldPlaced {
                hold_id,
                expires_at,
                ..
            } => Outcome::HoldPlaced {
                hold_id,
                expires_at,
                position,
            },
            Outcome::HoldCaptured {
                hold_id, amount, ..
            } => Outcome::HoldCaptured {
                hold_id,
                amount,
                position,
            },
            Outcome::HoldReleased {
                hold_id, status, ..
            } => Outcome::HoldReleased {
                hold_id,
                status,
                position,
            },
            Outcome::TransactionCompleted {
                transaction_id,
                reverses,
                ..
            } => Outcome::TransactionCompleted {
                transaction_id,
                reverses,
                position,
            },
            replayed @ Outcome::Replayed { .. } => replayed,
        }
    }
}
