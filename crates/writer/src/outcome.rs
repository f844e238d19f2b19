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
    /// The first answer to a keyed request, read back from its marker.
    Replayed { status: u16, body: Value },
}

impl Outcome {
    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Outcome::Opened { .. } | Outcome::TransferCompleted { .. } => 201,
            Outcome::Replayed { status, .. } => *status,
            Outcome::BalanceChanged { .. } | Outcome::Closed { .. } => 200,
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
            Outcome::Replayed { body, .. } => body.clone(),
        }
    }

    pub fn position(&self) -> u64 {
        match self {
            Outcome::Opened { position, .. }
            | Outcome::BalanceChanged { position, .. }
            | Outcome::TransferCompleted { position, .. }
            | Outcome::Closed { position, .. } => *position,
            Outcome::Replayed { body, .. } => body["position"].as_u64().unwrap_or(0),
        }
    }

    /// The transfer this answer is about, for the `Location` header.
    pub fn transfer_id(&self) -> Option<String> {
        match self {
            Outcome::TransferCompleted { transfer_id, .. } => Some(transfer_id.to_string()),
            Outcome::Replayed { body, .. } => body["transfer_id"].as_str().map(str::to_owned),
            _ => None,
        }
    }
}
