//! What a command that succeeded answers. The same outcome is rebuilt from the stream for a
//! retried request, so a retry gets the first answer whichever writer served it.

use domain::{AccountId, Event, TransferId};
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
    TransferAccepted {
        transfer_id: TransferId,
        position: u64,
    },
    Closed {
        account_id: AccountId,
        position: u64,
    },
    /// A step of the transfer saga (credit, refund, completion); `position` is 0 when the step
    /// had already been applied and nothing was appended.
    TransferStep { position: u64 },
    /// The first answer to a keyed request, read back from the idempotency bucket.
    Replayed { status: u16, body: Value },
}

impl Outcome {
    /// The answer the command got, given the event it appended and the balance after it.
    pub fn of_event(account_id: &AccountId, event: &Event, balance: i64, position: u64) -> Self {
        match event {
            Event::AccountOpened(_) => Outcome::Opened {
                account_id: account_id.clone(),
                position,
            },
            Event::Deposited { .. } | Event::Withdrawn { .. } => Outcome::BalanceChanged {
                account_id: account_id.clone(),
                balance,
                position,
            },
            Event::TransferDebited { transfer_id, .. } => Outcome::TransferAccepted {
                transfer_id: transfer_id.clone(),
                position,
            },
            Event::AccountClosed => Outcome::Closed {
                account_id: account_id.clone(),
                position,
            },
            Event::TransferCredited { .. }
            | Event::TransferRefunded { .. }
            | Event::TransferCompleted { .. } => Outcome::TransferStep { position },
        }
    }

    /// The HTTP status of the answer (also used for NATS replies' logging).
    pub fn status(&self) -> u16 {
        match self {
            Outcome::Opened { .. } => 201,
            Outcome::TransferAccepted { .. } => 202,
            Outcome::Replayed { status, .. } => *status,
            _ => 200,
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
            Outcome::TransferAccepted {
                transfer_id,
                position,
            } => {
                json!({"transfer_id": transfer_id.as_str(), "status": "pending", "position": position})
            }
            Outcome::TransferStep { position } => json!({"position": position}),
            Outcome::Replayed { body, .. } => body.clone(),
        }
    }

    pub fn position(&self) -> u64 {
        match self {
            Outcome::Opened { position, .. }
            | Outcome::BalanceChanged { position, .. }
            | Outcome::TransferAccepted { position, .. }
            | Outcome::Closed { position, .. }
            | Outcome::TransferStep { position } => *position,
            Outcome::Replayed { body, .. } => body["position"].as_u64().unwrap_or(0),
        }
    }
}
