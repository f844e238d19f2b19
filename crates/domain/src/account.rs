//! The account aggregate.
//!
//! `decide` holds every business rule and never mutates; `evolve` only applies facts and never
//! refuses (an event is something that already happened). Every command yields zero or one event:
//! zero when the command was already applied (a redelivered transfer step), one otherwise.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::values::{AccountId, Amount, Currency, OverdraftLimit, TransferId};

/// Why a refund happened: machine-readable, stored in `transfer_refunded`.
pub mod refund_reason {
    pub const ACCOUNT_NOT_FOUND: &str = "account_not_found";
    pub const ACCOUNT_CLOSED: &str = "account_closed";
    pub const CURRENCY_MISMATCH: &str = "currency_mismatch";
    pub const BALANCE_OVERFLOW: &str = "balance_overflow";
}

/// What opening an account needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAccount {
    pub currency: Currency,
    pub owner: Option<String>,
    pub overdraft_limit: OverdraftLimit,
}

/// A request to change one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Open(OpenAccount),
    Deposit {
        amount: Amount,
        reference: Option<String>,
    },
    Withdraw {
        amount: Amount,
        reference: Option<String>,
    },
    /// The sender's half of a transfer: money leaves at once.
    DebitTransfer {
        transfer_id: TransferId,
        to: AccountId,
        amount: Amount,
        reference: Option<String>,
    },
    /// The receiver's half, sent by the transfer process manager.
    CreditTransfer {
        transfer_id: TransferId,
        from: AccountId,
        amount: Amount,
        currency: Currency,
        reference: Option<String>,
    },
    /// Gives a failed transfer's money back to the sender.
    RefundTransfer {
        transfer_id: TransferId,
        reason: String,
    },
    /// Tells the sender that the receiver was credited, so the transfer no longer blocks closing.
    CompleteTransfer {
        transfer_id: TransferId,
    },
    Close,
}

/// A fact about one account. Names are past tense; amounts are positive and the type gives the
/// direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    AccountOpened(OpenAccount),
    Deposited {
        amount: Amount,
        reference: Option<String>,
    },
    Withdrawn {
        amount: Amount,
        reference: Option<String>,
    },
    TransferDebited {
        transfer_id: TransferId,
        to: AccountId,
        amount: Amount,
        currency: Currency,
        reference: Option<String>,
    },
    TransferCredited {
        transfer_id: TransferId,
        from: AccountId,
        amount: Amount,
        reference: Option<String>,
    },
    TransferRefunded {
        transfer_id: TransferId,
        to: AccountId,
        amount: Amount,
        reason: String,
    },
    TransferCompleted {
        transfer_id: TransferId,
        to: AccountId,
    },
    AccountClosed,
}

impl Event {
    /// The snake_case type used in subjects, headers and JSON.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::AccountOpened(_) => "account_opened",
            Event::Deposited { .. } => "deposited",
            Event::Withdrawn { .. } => "withdrawn",
            Event::TransferDebited { .. } => "transfer_debited",
            Event::TransferCredited { .. } => "transfer_credited",
            Event::TransferRefunded { .. } => "transfer_refunded",
            Event::TransferCompleted { .. } => "transfer_completed",
            Event::AccountClosed => "account_closed",
        }
    }

    /// The signed change this event makes to the balance.
    pub fn balance_change(&self) -> i64 {
        match self {
            Event::Deposited { amount, .. }
            | Event::TransferCredited { amount, .. }
            | Event::TransferRefunded { amount, .. } => amount.signed(),
            Event::Withdrawn { amount, .. } | Event::TransferDebited { amount, .. } => {
                -amount.signed()
            }
            Event::AccountOpened(_) | Event::TransferCompleted { .. } | Event::AccountClosed => 0,
        }
    }
}

/// A business rule refused the command. Nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("account not found")]
    AccountNotFound,
    #[error("account already exists")]
    AccountExists,
    #[error("account is closed")]
    AccountClosed,
    #[error("account holds {expected}, the operation is in {actual}")]
    CurrencyMismatch {
        expected: Currency,
        actual: Currency,
    },
    #[error("balance {balance} minus {amount} would go below the limit {floor}")]
    InsufficientFunds {
        balance: i64,
        amount: u64,
        floor: i64,
    },
    #[error("the balance would overflow a signed 64-bit integer")]
    BalanceOverflow,
    #[error("balance is {balance}, it must be zero to close")]
    BalanceNotZero { balance: i64 },
    #[error("{pending} outgoing transfer(s) still pending")]
    TransferPending { pending: usize },
    #[error("a transfer needs two different accounts")]
    SameAccount,
    #[error("transfer id {0} was already used with other parameters")]
    TransferIdReused(TransferId),
    #[error("no outgoing transfer {0} on this account")]
    UnknownTransfer(TransferId),
}

/// Lifecycle of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    Closed,
}

/// An outgoing transfer as the sender knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingTransfer {
    pub to: AccountId,
    pub amount: Amount,
    pub reference: Option<String>,
    pub settlement: Settlement,
}

/// What became of an outgoing transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Pending,
    Completed,
    Refunded,
}

/// An opened account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub currency: Currency,
    pub owner: Option<String>,
    pub overdraft_limit: OverdraftLimit,
    pub balance: i64,
    pub status: Status,
    /// Every transfer this account sent, so a redelivered or retried step is recognised however
    /// late it comes (the stream's dedup window is only minutes long).
    pub outgoing: HashMap<TransferId, OutgoingTransfer>,
    /// Every transfer credited to this account, by sender and id, for the same reason. The
    /// sender is part of the key so that two senders' equal ids can never shadow each other.
    pub credited: HashSet<(AccountId, TransferId)>,
    /// Transfers sent and not yet completed or refunded; closing waits for them.
    pub pending: BTreeMap<TransferId, Amount>,
}

/// The state `decide` needs, rebuilt by folding the account's events with `evolve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountState {
    /// No event yet: the account does not exist.
    Unopened(AccountId),
    Opened(Account),
}

impl AccountState {
    pub fn new(id: AccountId) -> Self {
        AccountState::Unopened(id)
    }

    pub fn id(&self) -> &AccountId {
        match self {
            AccountState::Unopened(id) => id,
            AccountState::Opened(account) => &account.id,
        }
    }

    pub fn account(&self) -> Option<&Account> {
        match self {
            AccountState::Unopened(_) => None,
            AccountState::Opened(account) => Some(account),
        }
    }

    pub fn balance(&self) -> i64 {
        self.account().map_or(0, |account| account.balance)
    }
}

/// Decides what a command does to an account. Pure: the same state and command always give the
/// same answer.
pub fn decide(state: &AccountState, command: &Command) -> Result<Vec<Event>, DomainError> {
    let account = match (state, command) {
        (AccountState::Unopened(_), Command::Open(open)) => {
            return Ok(vec![Event::AccountOpened(open.clone())]);
        }
        (AccountState::Opened(_), Command::Open(_)) => return Err(DomainError::AccountExists),
        (AccountState::Unopened(_), _) => return Err(DomainError::AccountNotFound),
        (AccountState::Opened(account), _) => account,
    };
    match command {
        Command::Open(_) => Err(DomainError::AccountExists),
        Command::Deposit { amount, reference } => {
            ensure_open(account)?;
            credit(account, *amount)?;
            Ok(vec![Event::Deposited {
                amount: *amount,
                reference: reference.clone(),
            }])
        }
        Command::Withdraw { amount, reference } => {
            ensure_open(account)?;
            debit(account, *amount)?;
            Ok(vec![Event::Withdrawn {
                amount: *amount,
                reference: reference.clone(),
            }])
        }
        Command::DebitTransfer {
            transfer_id,
            to,
            amount,
            reference,
        } => {
            if let Some(existing) = account.outgoing.get(transfer_id) {
                return if existing.to == *to
                    && existing.amount == *amount
                    && existing.reference == *reference
                {
                    Ok(Vec::new())
                } else {
                    Err(DomainError::TransferIdReused(transfer_id.clone()))
                };
            }
            if *to == account.id {
                return Err(DomainError::SameAccount);
            }
            ensure_open(account)?;
            debit(account, *amount)?;
            Ok(vec![Event::TransferDebited {
                transfer_id: transfer_id.clone(),
                to: to.clone(),
                amount: *amount,
                currency: account.currency,
                reference: reference.clone(),
            }])
        }
        Command::CreditTransfer {
            transfer_id,
            from,
            amount,
            currency,
            reference,
        } => {
            if account
                .credited
                .contains(&(from.clone(), transfer_id.clone()))
            {
                return Ok(Vec::new());
            }
            ensure_open(account)?;
            if *currency != account.currency {
                return Err(DomainError::CurrencyMismatch {
                    expected: account.currency,
                    actual: *currency,
                });
            }
            credit(account, *amount)?;
            Ok(vec![Event::TransferCredited {
                transfer_id: transfer_id.clone(),
                from: from.clone(),
                amount: *amount,
                reference: reference.clone(),
            }])
        }
        Command::RefundTransfer {
            transfer_id,
            reason,
        } => {
            let transfer = account
                .outgoing
                .get(transfer_id)
                .ok_or_else(|| DomainError::UnknownTransfer(transfer_id.clone()))?;
            if transfer.settlement != Settlement::Pending {
                return Ok(Vec::new());
            }
            // A refund returns money this account already held, so it can only overflow if the
            // balance rose by other credits meanwhile; refuse rather than wrap.
            credit(account, transfer.amount)?;
            Ok(vec![Event::TransferRefunded {
                transfer_id: transfer_id.clone(),
                to: transfer.to.clone(),
                amount: transfer.amount,
                reason: reason.clone(),
            }])
        }
        Command::CompleteTransfer { transfer_id } => {
            let transfer = account
                .outgoing
                .get(transfer_id)
                .ok_or_else(|| DomainError::UnknownTransfer(transfer_id.clone()))?;
            if transfer.settlement != Settlement::Pending {
                return Ok(Vec::new());
            }
            Ok(vec![Event::TransferCompleted {
                transfer_id: transfer_id.clone(),
                to: transfer.to.clone(),
            }])
        }
        Command::Close => {
            ensure_open(account)?;
            if account.balance != 0 {
                return Err(DomainError::BalanceNotZero {
                    balance: account.balance,
                });
            }
            if !account.pending.is_empty() {
                return Err(DomainError::TransferPending {
                    pending: account.pending.len(),
                });
            }
            Ok(vec![Event::AccountClosed])
        }
    }
}

fn ensure_open(account: &Account) -> Result<(), DomainError> {
    match account.status {
        Status::Open => Ok(()),
        Status::Closed => Err(DomainError::AccountClosed),
    }
}

fn credit(account: &Account, amount: Amount) -> Result<i64, DomainError> {
    account
        .balance
        .checked_add(amount.signed())
        .ok_or(DomainError::BalanceOverflow)
}

fn debit(account: &Account, amount: Amount) -> Result<i64, DomainError> {
    let floor = account.overdraft_limit.floor();
    match account.balance.checked_sub(amount.signed()) {
        Some(after) if after >= floor => Ok(after),
        _ => Err(DomainError::InsufficientFunds {
            balance: account.balance,
            amount: amount.minor_units(),
            floor,
        }),
    }
}

/// Applies one event. Never refuses: events are facts. Balances use saturating arithmetic only as
/// a last line of defence; `decide` has already refused anything that would overflow.
pub fn evolve(state: &mut AccountState, event: &Event) {
    if let Event::AccountOpened(open) = event {
        if let AccountState::Unopened(id) = state {
            *state = AccountState::Opened(Account {
                id: id.clone(),
                currency: open.currency,
                owner: open.owner.clone(),
                overdraft_limit: open.overdraft_limit,
                balance: 0,
                status: Status::Open,
                outgoing: HashMap::new(),
                credited: HashSet::new(),
                pending: BTreeMap::new(),
            });
        }
        return;
    }
    let AccountState::Opened(account) = state else {
        return;
    };
    account.balance = account.balance.saturating_add(event.balance_change());
    match event {
        Event::AccountOpened(_) | Event::Deposited { .. } | Event::Withdrawn { .. } => {}
        Event::TransferDebited {
            transfer_id,
            to,
            amount,
            reference,
            ..
        } => {
            account.outgoing.insert(
                transfer_id.clone(),
                OutgoingTransfer {
                    to: to.clone(),
                    amount: *amount,
                    reference: reference.clone(),
                    settlement: Settlement::Pending,
                },
            );
            account.pending.insert(transfer_id.clone(), *amount);
        }
        Event::TransferCredited {
            transfer_id, from, ..
        } => {
            account.credited.insert((from.clone(), transfer_id.clone()));
        }
        Event::TransferRefunded { transfer_id, .. } => {
            settle(account, transfer_id, Settlement::Refunded);
        }
        Event::TransferCompleted { transfer_id, .. } => {
            settle(account, transfer_id, Settlement::Completed);
        }
        Event::AccountClosed => account.status = Status::Closed,
    }
}

fn settle(account: &mut Account, transfer_id: &TransferId, settlement: Settlement) {
    account.pending.remove(transfer_id);
    if let Some(transfer) = account.outgoing.get_mut(transfer_id) {
        transfer.settlement = settlement;
    }
}

/// Folds a history into a state.
pub fn replay<'a>(id: AccountId, events: impl IntoIterator<Item = &'a Event>) -> AccountState {
    let mut state = AccountState::new(id);
    for event in events {
        evolve(&mut state, event);
    }
    state
}
