//! The account aggregate.
//!
//! `decide` holds every business rule and never mutates; `evolve` only applies facts and never
//! refuses (an event is something that already happened). A single-account command yields one
//! event; a transfer is a decision over two accounts ([`decide_transfer`]) that yields the debit of
//! the sender and the credit of the receiver, which the event log commits together or not at all.
//! State is bounded: it holds no per-transfer or per-request memory, so an account's cost does not
//! grow with its history.

use crate::values::{AccountId, Amount, Currency, OverdraftLimit, TransferId};

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
    Close,
}

/// A request to move money from one account (the one it is addressed to) to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub transfer_id: TransferId,
    pub to: AccountId,
    pub amount: Amount,
    pub reference: Option<String>,
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
    /// The sender's half of a transfer; always committed together with the receiver's
    /// [`Event::TransferCredited`].
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
            Event::AccountClosed => "account_closed",
        }
    }

    /// The signed change this event makes to the balance.
    pub fn balance_change(&self) -> i64 {
        match self {
            Event::Deposited { amount, .. } | Event::TransferCredited { amount, .. } => {
                amount.signed()
            }
            Event::Withdrawn { amount, .. } | Event::TransferDebited { amount, .. } => {
                -amount.signed()
            }
            Event::AccountOpened(_) | Event::AccountClosed => 0,
        }
    }
}

/// The two events of an accepted transfer, in the order they are committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferEvents {
    /// On the sender.
    pub debit: Event,
    /// On the receiver.
    pub credit: Event,
}

/// A business rule refused the command. Nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("account {0} not found")]
    AccountNotFound(AccountId),
    #[error("account already exists")]
    AccountExists,
    #[error("account {0} is closed")]
    AccountClosed(AccountId),
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
    #[error("the balance of {0} would overflow a signed 64-bit integer")]
    BalanceOverflow(AccountId),
    #[error("balance is {balance}, it must be zero to close")]
    BalanceNotZero { balance: i64 },
    #[error("a transfer needs two different accounts")]
    SameAccount,
}

/// Lifecycle of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    Closed,
}

/// An opened account: everything `decide` needs, and nothing that grows with its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub currency: Currency,
    pub owner: Option<String>,
    pub overdraft_limit: OverdraftLimit,
    pub balance: i64,
    pub status: Status,
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

    fn opened(&self) -> Result<&Account, DomainError> {
        self.account()
            .ok_or_else(|| DomainError::AccountNotFound(self.id().clone()))
    }
}

/// Decides what a single-account command does. Pure: the same state and command always give the
/// same answer.
pub fn decide(state: &AccountState, command: &Command) -> Result<Vec<Event>, DomainError> {
    if let Command::Open(open) = command {
        return match state {
            AccountState::Unopened(_) => Ok(vec![Event::AccountOpened(open.clone())]),
            AccountState::Opened(_) => Err(DomainError::AccountExists),
        };
    }
    let account = state.opened()?;
    ensure_open(account)?;
    match command {
        Command::Open(_) => Err(DomainError::AccountExists),
        Command::Deposit { amount, reference } => {
            credit(account, *amount)?;
            Ok(vec![Event::Deposited {
                amount: *amount,
                reference: reference.clone(),
            }])
        }
        Command::Withdraw { amount, reference } => {
            debit(account, *amount)?;
            Ok(vec![Event::Withdrawn {
                amount: *amount,
                reference: reference.clone(),
            }])
        }
        Command::Close => {
            if account.balance != 0 {
                return Err(DomainError::BalanceNotZero {
                    balance: account.balance,
                });
            }
            Ok(vec![Event::AccountClosed])
        }
    }
}

/// Decides a transfer on the current state of both accounts. Both must exist, be open and hold
/// the same currency; the sender must have the amount available and the receiver must not
/// overflow. Pure, like [`decide`].
pub fn decide_transfer(
    from: &AccountState,
    to: &AccountState,
    transfer: &Transfer,
) -> Result<TransferEvents, DomainError> {
    if from.id() == to.id() || *to.id() != transfer.to {
        return Err(DomainError::SameAccount);
    }
    let sender = from.opened()?;
    let receiver = to.opened()?;
    ensure_open(sender)?;
    ensure_open(receiver)?;
    if sender.currency != receiver.currency {
        return Err(DomainError::CurrencyMismatch {
            expected: receiver.currency,
            actual: sender.currency,
        });
    }
    debit(sender, transfer.amount)?;
    credit(receiver, transfer.amount)?;
    Ok(TransferEvents {
        debit: Event::TransferDebited {
            transfer_id: transfer.transfer_id.clone(),
            to: receiver.id.clone(),
            amount: transfer.amount,
            currency: sender.currency,
            reference: transfer.reference.clone(),
        },
        credit: Event::TransferCredited {
            transfer_id: transfer.transfer_id.clone(),
            from: sender.id.clone(),
            amount: transfer.amount,
            reference: transfer.reference.clone(),
        },
    })
}

fn ensure_open(account: &Account) -> Result<(), DomainError> {
    match account.status {
        Status::Open => Ok(()),
        Status::Closed => Err(DomainError::AccountClosed(account.id.clone())),
    }
}

fn credit(account: &Account, amount: Amount) -> Result<i64, DomainError> {
    account
        .balance
        .checked_add(amount.signed())
        .ok_or_else(|| DomainError::BalanceOverflow(account.id.clone()))
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
            });
        }
        return;
    }
    let AccountState::Opened(account) = state else {
        return;
    };
    account.balance = account.balance.saturating_add(event.balance_change());
    if matches!(event, Event::AccountClosed) {
        account.status = Status::Closed;
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
