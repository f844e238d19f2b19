//! The account aggregate.
//!
//! `decide` holds every business rule and never mutates; `evolve` only applies facts and never
//! refuses (an event is something that already happened). A single-account command yields one
//! event; a transfer is a decision over two accounts ([`decide_transfer`]) that yields the debit of
//! the sender and the credit of the receiver, which the event log commits together or not at all.
//! State is bounded: it holds no per-transfer or per-request memory, so an account's cost does not
//! grow with its history.

use std::collections::BTreeMap;

use crate::flow::{decide_postings, Leg, Posting, Released};
use crate::metadata::Metadata;
use crate::values::{AccountId, Amount, Currency, OverdraftLimit, TransferId};

/// What opening an account needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpenAccount {
    pub currency: Currency,
    pub owner: Option<String>,
    pub overdraft_limit: OverdraftLimit,
    #[serde(default)]
    pub metadata: Metadata,
}

/// A request to change one account.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Command {
    Open(OpenAccount),
    Deposit {
        amount: Amount,
        reference: Option<String>,
        #[serde(default)]
        metadata: Metadata,
    },
    Withdraw {
        amount: Amount,
        reference: Option<String>,
        #[serde(default)]
        metadata: Metadata,
    },
    Close,
    /// Sets the entries of `set` on the account's metadata, then removes the keys of `unset`.
    ChangeMetadata {
        set: Metadata,
        unset: Vec<String>,
    },
}

/// A request to move money from one account (the one it is addressed to) to another.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Transfer {
    pub transfer_id: TransferId,
    pub to: AccountId,
    pub amount: Amount,
    pub reference: Option<String>,
    #[serde(default)]
    pub metadata: Metadata,
}

/// A request to reserve money on the account it is addressed to (`from`) for `to`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlaceHold {
    /// Hold ids share one namespace with transfer ids.
    pub hold_id: TransferId,
    pub to: AccountId,
    pub amount: Amount,
    /// Seconds from placement to expiry (1 to [`HOLD_SECONDS_MAX`]).
    pub expires_in_seconds: i64,
    pub reference: Option<String>,
    #[serde(default)]
    pub metadata: Metadata,
}

/// Longest a hold may live: one week.
pub const HOLD_SECONDS_MAX: i64 = 604_800;

/// A request to move some or all of a held amount to the hold's receiver.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capture {
    pub hold_id: TransferId,
    /// Default: all of it.
    pub amount: Option<Amount>,
}

/// How a hold ends without a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Release {
    /// A client voided it.
    Void,
    /// Its time ran out (the system, no client).
    Expire,
}

/// A hold not yet settled, as the account that placed it knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenHold {
    pub to: AccountId,
    pub amount: Amount,
    /// Unix seconds from which the hold can no longer be captured or voided.
    pub expires_at: i64,
    pub reference: Option<String>,
    /// Carried to the receiver's credit when the hold is captured.
    pub metadata: Metadata,
}

/// A fact about one account. Names are past tense; amounts are positive and the type gives the
/// direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    AccountOpened(OpenAccount),
    Deposited {
        amount: Amount,
        reference: Option<String>,
        metadata: Metadata,
    },
    Withdrawn {
        amount: Amount,
        reference: Option<String>,
        metadata: Metadata,
    },
    /// The sender's half of a transfer; always committed together with the receiver's
    /// [`Event::TransferCredited`].
    TransferDebited {
        transfer_id: TransferId,
        to: AccountId,
        amount: Amount,
        currency: Currency,
        reference: Option<String>,
        metadata: Metadata,
    },
    TransferCredited {
        transfer_id: TransferId,
        from: AccountId,
        amount: Amount,
        reference: Option<String>,
        metadata: Metadata,
    },
    AccountClosed,
    /// The account's metadata changed: `set` written over it, then `unset` removed.
    MetadataChanged {
        set: Metadata,
        unset: Vec<String>,
    },
    /// Money reserved on this account for `to`; the balance does not change, what is
    /// available does.
    HoldPlaced {
        hold_id: TransferId,
        to: AccountId,
        amount: Amount,
        /// Unix seconds.
        expires_at: i64,
        reference: Option<String>,
        metadata: Metadata,
    },
    /// `amount` of the hold left this account (credited to the hold's `to` in the same batch);
    /// the rest of the hold is released.
    HoldCaptured {
        hold_id: TransferId,
        amount: Amount,
    },
    HoldVoided {
        hold_id: TransferId,
    },
    HoldExpired {
        hold_id: TransferId,
    },
    /// The balance an account had in the system it was imported from (`coffer import`), booked
    /// right after its opening; may be negative down to the overdraft limit.
    OpeningBalance {
        balance: i64,
    },
    /// This account's part of a multi-posting transaction (or a reversal): its net change and
    /// the postings that name it. Every touched account gets one, all committed together.
    TransactionPosted {
        transaction_id: TransferId,
        /// The account's currency, which every posting naming it uses.
        currency: Currency,
        /// Signed: credits minus debits of this account in the transaction (may be 0).
        net: i64,
        legs: Vec<Leg>,
        /// How many accounts the transaction touched: a reader knows it has seen the whole
        /// transaction once it applied that many parts.
        parts: u16,
        /// Set on a reversal: the transfer or transaction it moves back.
        reverses: Option<TransferId>,
        reference: Option<String>,
        metadata: Metadata,
    },
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
            Event::MetadataChanged { .. } => "account_metadata_changed",
            Event::HoldPlaced { .. } => "hold_placed",
            Event::HoldCaptured { .. } => "hold_captured",
            Event::HoldVoided { .. } => "hold_voided",
            Event::HoldExpired { .. } => "hold_expired",
            Event::OpeningBalance { .. } => "opening_balance",
            Event::TransactionPosted { .. } => "transaction_posted",
        }
    }

    /// The signed change this event makes to the balance.
    pub fn balance_change(&self) -> i64 {
        match self {
            Event::Deposited { amount, .. } | Event::TransferCredited { amount, .. } => {
                amount.signed()
            }
            Event::Withdrawn { amount, .. }
            | Event::TransferDebited { amount, .. }
            | Event::HoldCaptured { amount, .. } => -amount.signed(),
            Event::OpeningBalance { balance } | Event::TransactionPosted { net: balance, .. } => {
                *balance
            }
            Event::AccountOpened(_)
            | Event::AccountClosed
            | Event::MetadataChanged { .. }
            | Event::HoldPlaced { .. }
            | Event::HoldVoided { .. }
            | Event::HoldExpired { .. } => 0,
        }
    }
}

/// The two events of an accepted transfer (or capture), in the order they are committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferEvents {
    /// On the sender: `transfer_debited`, or `hold_captured`.
    pub debit: Event,
    /// On the receiver.
    pub credit: Event,
}

/// A business rule refused the command. Nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
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
    #[error("no hold {0} on this account")]
    HoldNotFound(TransferId),
    #[error("hold {0} is settled (captured, voided or expired)")]
    HoldSettled(TransferId),
    #[error("capture of {requested} exceeds the {held} held")]
    AmountExceedsHold { held: u64, requested: u64 },
    #[error("{count} hold(s) from this account are open")]
    HoldsOpen { count: usize },
    #[error("hold {hold_id} expires in {seconds} s, not yet")]
    HoldNotDue { hold_id: TransferId, seconds: i64 },
    #[error("a transaction needs 1 to {max} postings, got {count}", max = crate::flow::POSTINGS_MAX)]
    PostingCount { count: usize },
    #[error("{original} was already reversed by {reversal}")]
    AlreadyReversed {
        original: TransferId,
        reversal: TransferId,
    },
    #[error("metadata: the account would have {entries} entries, at most {max}", max = crate::metadata::METADATA_ENTRIES_MAX)]
    MetadataFull { entries: usize },
}

/// Lifecycle of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    Closed,
}

/// An opened account: everything `decide` needs, and nothing that grows with its history (open
/// holds are bounded by what is reserved now, not by how many there ever were).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub currency: Currency,
    pub owner: Option<String>,
    pub overdraft_limit: OverdraftLimit,
    pub balance: i64,
    pub status: Status,
    /// Holds from this account not yet settled.
    pub holds: BTreeMap<TransferId, OpenHold>,
    /// Their amounts summed.
    pub held: i64,
    pub metadata: Metadata,
}

impl Account {
    /// What withdrawals, transfers and new holds may take: balance + overdraft limit - held.
    pub fn available(&self) -> i64 {
        self.balance
            .saturating_add(self.overdraft_limit.minor_units() as i64)
            .saturating_sub(self.held)
    }
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
        Command::Deposit {
            amount,
            reference,
            metadata,
        } => {
            credit(account, *amount)?;
            Ok(vec![Event::Deposited {
                amount: *amount,
                reference: reference.clone(),
                metadata: metadata.clone(),
            }])
        }
        Command::Withdraw {
            amount,
            reference,
            metadata,
        } => {
            debit(account, *amount)?;
            Ok(vec![Event::Withdrawn {
                amount: *amount,
                reference: reference.clone(),
                metadata: metadata.clone(),
            }])
        }
        Command::ChangeMetadata { set, unset } => {
            let mut changed = account.metadata.clone();
            changed.apply(set, unset);
            if changed.len() > crate::metadata::METADATA_ENTRIES_MAX {
                return Err(DomainError::MetadataFull {
                    entries: changed.len(),
                });
            }
            Ok(vec![Event::MetadataChanged {
                set: set.clone(),
                unset: unset.clone(),
            }])
        }
        Command::Close => {
            if account.balance != 0 {
                return Err(DomainError::BalanceNotZero {
                    balance: account.balance,
                });
            }
            if !account.holds.is_empty() {
                return Err(DomainError::HoldsOpen {
                    count: account.holds.len(),
                });
            }
            Ok(vec![Event::AccountClosed])
        }
    }
}

/// Decides a transfer on the current state of both accounts: a flow of one posting
/// ([`crate::flow::decide_postings`]). Both must exist, be open and hold the same currency; the
/// sender must have the amount available and the receiver must not overflow. Pure, like
/// [`decide`].
pub fn decide_transfer(
    from: &AccountState,
    to: &AccountState,
    transfer: &Transfer,
) -> Result<TransferEvents, DomainError> {
    if to.id() != &transfer.to {
        // The caller passed another account's state than the one named: never decide on it.
        return Err(DomainError::SameAccount);
    }
    let posting = Posting {
        from: from.id().clone(),
        to: transfer.to.clone(),
        amount: transfer.amount,
    };
    let movements =
        decide_postings(either(from, to), &[posting], None).map_err(|refusal| refusal.error)?;
    let currency = movements
        .first()
        .map(|movement| movement.currency)
        .ok_or_else(|| DomainError::AccountNotFound(from.id().clone()))?;
    Ok(TransferEvents {
        debit: Event::TransferDebited {
            transfer_id: transfer.transfer_id.clone(),
            to: transfer.to.clone(),
            amount: transfer.amount,
            currency,
            reference: transfer.reference.clone(),
            metadata: transfer.metadata.clone(),
        },
        credit: Event::TransferCredited {
            transfer_id: transfer.transfer_id.clone(),
            from: from.id().clone(),
            amount: transfer.amount,
            reference: transfer.reference.clone(),
            metadata: transfer.metadata.clone(),
        },
    })
}

/// Looks an account up among two states.
fn either<'a>(
    first: &'a AccountState,
    second: &'a AccountState,
) -> impl Fn(&AccountId) -> Option<&'a AccountState> {
    move |id| [first, second].into_iter().find(|state| state.id() == id)
}

/// Decides importing an account with the balance it had elsewhere: it must not exist yet, and
/// a negative balance needs an overdraft limit at least as large. Yields `account_opened` and
/// `opening_balance`, appended together.
pub fn decide_import(
    state: &AccountState,
    open: &OpenAccount,
    balance: i64,
) -> Result<Vec<Event>, DomainError> {
    if state.account().is_some() {
        return Err(DomainError::AccountExists);
    }
    let floor = open.overdraft_limit.floor();
    if balance < floor {
        return Err(DomainError::InsufficientFunds {
            balance: 0,
            amount: balance.unsigned_abs(),
            floor,
        });
    }
    Ok(vec![
        Event::AccountOpened(open.clone()),
        Event::OpeningBalance { balance },
    ])
}

/// Checks the receiver of a transfer, hold or capture against the sender: both open, one
/// currency, and different accounts.
fn counterparties<'a>(
    from: &'a AccountState,
    to: &'a AccountState,
    named_to: &AccountId,
) -> Result<(&'a Account, &'a Account), DomainError> {
    if from.id() == to.id() || to.id() != named_to {
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
    Ok((sender, receiver))
}

/// Decides placing a hold at `now` (unix seconds): both accounts exist, are open and share the
/// currency, and `from` has the amount available. The event goes on `from` alone.
pub fn decide_hold(
    from: &AccountState,
    to: &AccountState,
    hold: &PlaceHold,
    now: i64,
) -> Result<Event, DomainError> {
    let (sender, _) = counterparties(from, to, &hold.to)?;
    debit(sender, hold.amount)?;
    Ok(Event::HoldPlaced {
        hold_id: hold.hold_id.clone(),
        to: hold.to.clone(),
        amount: hold.amount,
        expires_at: now.saturating_add(hold.expires_in_seconds),
        reference: hold.reference.clone(),
        metadata: hold.metadata.clone(),
    })
}

/// The open hold `hold_id` of `from`, if it can still be settled by a client at `now`.
fn live_hold<'a>(
    from: &'a AccountState,
    hold_id: &TransferId,
    now: i64,
) -> Result<(&'a Account, &'a OpenHold), DomainError> {
    let account = from.opened()?;
    let hold = account
        .holds
        .get(hold_id)
        .ok_or_else(|| DomainError::HoldNotFound(hold_id.clone()))?;
    if now >= hold.expires_at {
        return Err(DomainError::HoldSettled(hold_id.clone()));
    }
    Ok((account, hold))
}

/// Decides a capture at `now`: the hold is open and not expired and the amount at most the held
/// one; then the capture is a flow of one posting out of the hold
/// ([`crate::flow::decide_postings`], the hold's whole reservation released): the receiver is
/// still open, in the currency, and does not overflow. Yields `hold_captured` on `from` and
/// `transfer_credited` on `to` (transfer id = hold id).
pub fn decide_capture(
    from: &AccountState,
    to: &AccountState,
    capture: &Capture,
    now: i64,
) -> Result<TransferEvents, DomainError> {
    let (_, hold) = live_hold(from, &capture.hold_id, now)?;
    let amount = capture.amount.unwrap_or(hold.amount);
    if amount > hold.amount {
        return Err(DomainError::AmountExceedsHold {
            held: hold.amount.minor_units(),
            requested: amount.minor_units(),
        });
    }
    let posting = Posting {
        from: from.id().clone(),
        to: hold.to.clone(),
        amount,
    };
    let released = Released {
        account: from.id(),
        held: hold.amount.signed(),
    };
    decide_postings(either(from, to), &[posting], Some(released))
        .map_err(|refusal| refusal.error)?;
    Ok(TransferEvents {
        debit: Event::HoldCaptured {
            hold_id: capture.hold_id.clone(),
            amount,
        },
        credit: Event::TransferCredited {
            transfer_id: capture.hold_id.clone(),
            from: from.id().clone(),
            amount,
            reference: hold.reference.clone(),
            metadata: hold.metadata.clone(),
        },
    })
}

/// Decides releasing a hold: a void needs it open and not expired at `now`; an expiry needs it
/// open and due (`now >= expires_at`).
pub fn decide_release(
    from: &AccountState,
    hold_id: &TransferId,
    release: Release,
    now: i64,
) -> Result<Event, DomainError> {
    match release {
        Release::Void => {
            live_hold(from, hold_id, now)?;
            Ok(Event::HoldVoided {
                hold_id: hold_id.clone(),
            })
        }
        Release::Expire => {
            let account = from.opened()?;
            let hold = account
                .holds
                .get(hold_id)
                .ok_or_else(|| DomainError::HoldNotFound(hold_id.clone()))?;
            if now < hold.expires_at {
                return Err(DomainError::HoldNotDue {
                    hold_id: hold_id.clone(),
                    seconds: hold.expires_at - now,
                });
            }
            Ok(Event::HoldExpired {
                hold_id: hold_id.clone(),
            })
        }
    }
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

/// Takes `amount` from what is available (holds count against it).
fn debit(account: &Account, amount: Amount) -> Result<i64, DomainError> {
    let floor = account.overdraft_limit.floor();
    let after = account.balance.checked_sub(amount.signed());
    match after.and_then(|after| after.checked_sub(account.held)) {
        Some(available_after) if available_after >= floor => Ok(after.unwrap_or(0)),
        _ => Err(DomainError::InsufficientFunds {
            balance: account.balance,
            amount: amount.minor_units(),
            floor,
        }),
    }
}

/// The version of what [`evolve`] makes of the events. Bump it with any change to `evolve` or to
/// the state it builds: a state folded by another version (a snapshot) is then not reused.
pub const STATE_VERSION: u32 = 2;

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
                holds: BTreeMap::new(),
                held: 0,
                metadata: open.metadata.clone(),
            });
        }
        return;
    }
    let AccountState::Opened(account) = state else {
        return;
    };
    account.balance = account.balance.saturating_add(event.balance_change());
    match event {
        Event::AccountClosed => account.status = Status::Closed,
        Event::MetadataChanged { set, unset } => account.metadata.apply(set, unset),
        Event::HoldPlaced {
            hold_id,
            to,
            amount,
            expires_at,
            reference,
            metadata,
        } => {
            account.held = account.held.saturating_add(amount.signed());
            account.holds.insert(
                hold_id.clone(),
                OpenHold {
                    to: to.clone(),
                    amount: *amount,
                    expires_at: *expires_at,
                    reference: reference.clone(),
                    metadata: metadata.clone(),
                },
            );
        }
        Event::HoldCaptured { hold_id, .. }
        | Event::HoldVoided { hold_id }
        | Event::HoldExpired { hold_id } => {
            if let Some(hold) = account.holds.remove(hold_id) {
                account.held = account.held.saturating_sub(hold.amount.signed());
            }
        }
        _ => {}
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
