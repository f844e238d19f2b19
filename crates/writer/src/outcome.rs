//! What a command that succeeded answers. A retry with the same key or transfer id gets the same
//! answer again, read back from the marker written with the first one.

use domain::{AccountId, TransferId};
use serde_json::{json, Value};

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
            | Outcome::HoldPlaced { .. } => 201,
            Outcome::Replayed { status, .. } => *status,
            Outcome::BalanceChanged { .. }
            | Outcome::Closed { .. }
            | Outcome::HoldCaptured { .. }
            | Outcome::HoldReleased { .. } => 200,
        }
    }

    pub fn body(&self) -> Value {
        match self {
            Outcome::Opened {
                account_id,
                position,
            }
            | Outcome::Closed {
                account_id,
                position,
            } => json!({"account_id": account_id.as_str(), "position": position}),
            Outcome::BalanceChanged {
                account_id,
                balance,
                position,
            } => {
                json!({"account_id": account_id.as_str(), "balance": balance, "position": position})
            }
            Outcome::TransferCompleted {
                transfer_id,
                position,
            } => {
                json!({"transfer_id": transfer_id.as_str(), "status": "completed", "position": position})
            }
            Outcome::HoldPlaced {
                hold_id,
                expires_at,
                position,
            } => json!({"hold_id": hold_id.as_str(), "status": "held",
                "expires_at": rfc3339(*expires_at), "position": position}),
            Outcome::HoldCaptured {
                hold_id,
                amount,
                position,
            } => json!({"hold_id": hold_id.as_str(), "status": "captured",
                "amount": amount, "position": position}),
            Outcome::HoldReleased {
                hold_id,
                status,
                position,
            } => json!({"hold_id": hold_id.as_str(), "status": status, "position": position}),
            Outcome::Replayed { body, .. } => body.clone(),
        }
    }

    pub fn position(&self) -> u64 {
        match self {
            Outcome::Opened { position, .. }
            | Outcome::BalanceChanged { position, .. }
            | Outcome::TransferCompleted { position, .. }
            | Outcome::Closed { position, .. }
            | Outcome::HoldPlaced { position, .. }
            | Outcome::HoldCaptured { position, .. }
            | Outcome::HoldReleased { position, .. } => *position,
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
            Outcome::Replayed { status: 201, body } => {
                if let Some(id) = body["transfer_id"].as_str() {
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
            replayed @ Outcome::Replayed { .. } => replayed,
        }
    }
}
