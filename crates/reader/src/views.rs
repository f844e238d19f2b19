//! The views, as pure functions of the old row and an event, plus the redb code that stores
//! them. Rows are MessagePack (named fields) so a field can be added without a migration.
//!
//! Integrity rides along in the same transaction: every event's `Coffer-Chain` is checked
//! against its account's previous value, and the conservation audit keeps per-currency sums
//! (no full scan per request).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;

use domain::Event;
use eventlog::RecordedEvent;
use projection::ApplyError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Account id -> [`AccountRow`].
pub const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
/// (account id, position) -> [`StatementEntry`]: a range scan gives a statement page.
pub const STATEMENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("statements");
/// Transfer id -> [`TransferRow`].
pub const TRANSFERS: TableDefinition<&str, &[u8]> = TableDefinition::new("transfers");
/// (account id, event time in unix nanoseconds) -> position: finds the statement line in force
/// at a time without scanning the history (`GET /v1/accounts/{id}/balance?at=`).
pub const STATEMENT_TIMES: TableDefinition<(&str, i128), u64> =
    TableDefinition::new("statement_times");
/// Transaction id -> [`TransactionRow`] (multi-posting transactions and reversals).
pub const TRANSACTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("transactions");
/// Hold id -> [`HoldRow`].
pub const HOLDS: TableDefinition<&str, &[u8]> = TableDefinition::new("holds");
/// (term, account id) -> (): the accounts listing's index. A term is one thing a listing filters
/// on ([`account_terms`]): `currency`, `owner`, `status`, and each metadata entry. A page of a
/// filtered listing is a range scan of its most selective term, in account-id order.
pub const ACCOUNT_INDEX: TableDefinition<(&str, &str), ()> = TableDefinition::new("account_index");
/// (account id, reference, position) -> (): a statement filtered by reference.
pub const STATEMENT_REFERENCES: TableDefinition<(&str, &str, u64), ()> =
    TableDefinition::new("statement_references");
/// Position -> [`UnreadableRow`]: stored messages that could not be read as events.
pub const UNREADABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("unreadable");
/// Account id -> position of its first unreadable message: the account's views are not served.
pub const UNREADABLE_ACCOUNTS: TableDefinition<&str, u64> =
    TableDefinition::new("unreadable_accounts");
/// What the views file holds besides rows: [`SCHEMA_VERSION_KEY`].
pub const VIEW_META: TableDefinition<&str, u64> = TableDefinition::new("view_meta");
pub const SCHEMA_VERSION_KEY: &str = "schema_version";
/// The position of the last event whose indexes were written, with the views, by a build that
/// keeps them. A build that does not know them (a rollback) moves the views on without it; back
/// on this build, the file is rebuilt rather than served with indexes that miss those events.
pub const INDEXED_POSITION_KEY: &str = "indexed_position";
/// The layout of the views (tables, rows, indexes) this build writes. A file of another version
/// is rebuilt from the stream at start (`reader::service`). History: 1 (no record of it): before
/// metadata, the accounts listing and the reference index; 2: those.
pub const SCHEMA_VERSION: u64 = 2;

/// The schema version recorded in a views file: `None` for an empty file (nothing applied yet)
/// and 1 for a file written before versions were recorded.
pub fn stored_schema_version(database: &redb::Database) -> Result<Option<u64>, redb::Error> {
    let applied = applied_position(database)?;
    Ok(match view_meta(database, SCHEMA_VERSION_KEY)? {
        Some(version) => Some(version),
        None if applied > 0 => Some(1),
        None => None,
    })
}

/// `(indexed, applied)` when the views moved past the last event whose indexes were written:
/// a build without the indexes applied events to this file (see [`INDEXED_POSITION_KEY`]).
/// `None` when they agree, or for a file that does not record it.
pub fn indexes_behind(database: &redb::Database) -> Result<Option<(u64, u64)>, redb::Error> {
    let applied = applied_position(database)?;
    Ok(view_meta(database, INDEXED_POSITION_KEY)?
        .filter(|indexed| *indexed != applied)
        .map(|indexed| (indexed, applied)))
}

fn applied_position(database: &redb::Database) -> Result<u64, redb::Error> {
    projection::stored_position(database).map_err(|error| redb::Error::Corrupted(error.to_string()))
}

/// One value of [`VIEW_META`]; `None` when it (or the table) is not there.
fn view_meta(database: &redb::Database, key: &str) -> Result<Option<u64>, redb::Error> {
    use redb::ReadableDatabase;
    let transaction = database.begin_read()?;
    match transaction.open_table(VIEW_META) {
        Ok(table) => Ok(table.get(key)?.map(|value| value.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// [`AUDIT_RUNNING`] and [`AUDIT_SETTLED`] -> [`AuditRow`].
pub const AUDIT: TableDefinition<&str, &[u8]> = TableDefinition::new("audit");
/// The sums after the last applied event.
pub const AUDIT_RUNNING: &str = "running";
/// The sums at the last position where no transfer was half applied (its debit and credit are
/// consecutive events, but a batch may end between them): what `GET /v1/audit` answers.
pub const AUDIT_SETTLED: &str = "settled";

fn genesis() -> String {
    eventlog::chain::GENESIS.to_owned()
}

/// Money in one currency, in minor units. `i128`: the sum of many `i64` balances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencySums {
    /// Every account's balance, summed.
    pub balances: i128,
    /// Deposits (and opening balances) summed.
    pub external_in: i128,
    /// Withdrawals summed.
    pub external_out: i128,
}

impl CurrencySums {
    pub fn balanced(&self) -> bool {
        self.balances == self.external_in - self.external_out
    }
}

/// The conservation audit as of `position`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    pub position: u64,
    pub currencies: BTreeMap<String, CurrencySums>,
    /// A transfer whose debit is applied and whose credit is not yet, or a transaction some of
    /// whose parts are not applied yet.
    pub transfer_in_flight: Option<String>,
    /// For a transaction in flight: how many of its parts are still to come.
    #[serde(default)]
    pub parts_remaining: u16,
}

impl AuditRow {
    pub fn balanced(&self) -> bool {
        self.currencies.values().all(CurrencySums::balanced)
    }

    /// Adds `recorded`, an event of an account held in `currency`. Returns false when a debit
    /// was not followed by its credit (they are committed together, one after the other): the
    /// pair is broken, the sums keep the debit, and the audit will say so.
    pub fn apply(&mut self, currency: &str, recorded: &RecordedEvent) -> bool {
        let mut paired = true;
        if let Some(open) = self.transfer_in_flight.take() {
            let continues = match &recorded.event {
                Event::TransferCredited { transfer_id, .. } => transfer_id.as_str() == open,
                Event::TransactionPosted { transaction_id, .. } => transaction_id.as_str() == open,
                _ => false,
            };
            if continues {
                self.transfer_in_flight = Some(open);
            } else {
                paired = false;
                self.parts_remaining = 0;
            }
        }
        let sums = self.currencies.entry(currency.to_owned()).or_default();
        let change = i128::from(recorded.event.balance_change());
        sums.balances += change;
        match &recorded.event {
            // Money from outside: deposits, and what imported accounts held elsewhere.
            Event::Deposited { .. } | Event::OpeningBalance { .. } => sums.external_in += change,
            Event::Withdrawn { .. } => sums.external_out -= change,
            Event::TransferDebited { transfer_id, .. }
            | Event::HoldCaptured {
                hold_id: transfer_id,
                ..
            } => {
                self.transfer_in_flight = Some(transfer_id.to_string());
            }
            Event::TransferCredited { transfer_id, .. } => {
                if self.transfer_in_flight.as_deref() == Some(transfer_id.as_str()) {
                    self.transfer_in_flight = None;
                }
            }
            // Internal too: its parts' nets sum to zero in each currency once all are applied.
            Event::TransactionPosted {
                transaction_id,
                parts,
                ..
            } => {
                if self.transfer_in_flight.as_deref() == Some(transaction_id.as_str()) {
                    self.parts_remaining = self.parts_remaining.saturating_sub(1);
                } else {
                    self.transfer_in_flight = Some(transaction_id.to_string());
                    self.parts_remaining = parts.saturating_sub(1);
                }
                if self.parts_remaining == 0 {
                    self.transfer_in_flight = None;
                }
            }
            Event::AccountOpened(_)
            | Event::AccountClosed
            | Event::MetadataChanged { .. }
            | Event::HoldPlaced { .. }
            | Event::HoldVoided { .. }
            | Event::HoldExpired { .. } => {}
        }
        self.position = recorded.position;
        paired
    }
}

/// A stored message of the event stream that could not be read as an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadableRow {
    pub account_id: Option<String>,
    pub subject: String,
    pub reason: String,
}

/// Records that `account`'s views can no longer be trusted from `position` on (the first such
/// position stays), and why.
fn mark_unverifiable(
    transaction: &WriteTransaction,
    account: &str,
    position: u64,
    row: UnreadableRow,
) -> Result<(), ApplyError> {
    transaction
        .open_table(UNREADABLE)?
        .insert(position, encode(&row)?.as_slice())?;
    let mut accounts = transaction.open_table(UNREADABLE_ACCOUNTS)?;
    if accounts.get(account)?.is_none() {
        accounts.insert(account, position)?;
    }
    Ok(())
}

/// The position of `account`'s first unreadable message, if it has one.
pub fn unreadable_at(
    transaction: &redb::ReadTransaction,
    account: &str,
) -> Result<Option<(u64, UnreadableRow)>, redb::Error> {
    let accounts = match transaction.open_table(UNREADABLE_ACCOUNTS) {
        Ok(table) => table,
        // A file no build of this kind wrote to yet.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let Some(position) = accounts.get(account)?.map(|position| position.value()) else {
        return Ok(None);
    };
    let messages = transaction.open_table(UNREADABLE)?;
    let row = match messages.get(position)? {
        Some(bytes) => decode(bytes.value())?,
        None => UnreadableRow {
            account_id: Some(account.to_owned()),
            subject: String::new(),
            reason: String::new(),
        },
    };
    Ok(Some((position, row)))
}

/// Integrity findings, counted for `/metrics`.
#[derive(Debug, Default)]
pub struct Integrity {
    pub chain_breaks: Counter,
    pub audit_unbalanced: Counter,
    /// Events without a trusted writer's signature (when trusted keys are configured).
    pub signature_failures: Counter,
    /// Events that named a transfer, hold or transaction row they may not change.
    pub rows_refused: Counter,
}

impl Integrity {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "coffer_reader_chain_breaks",
            "Events whose Coffer-Chain does not follow from their account's previous event.",
            self.chain_breaks.clone(),
        );
        registry.register(
            "coffer_reader_signature_failures",
            "Events without a valid signature by a trusted writer key (COFFER_TRUSTED_KEYS_FILE); each makes its account's views unreadable.",
            self.signature_failures.clone(),
        );
        registry.register(
            "coffer_reader_rows_refused",
            "Events that named a transfer, hold or transaction row they may not change (an id already used, another account's hold, a transaction that does not name their account); the row is kept as it was.",
            self.rows_refused.clone(),
        );
        registry.register(
            "coffer_reader_audit_unbalanced",
            "Settled positions at which some currency's balances did not equal deposits minus withdrawals.",
            self.audit_unbalanced.clone(),
        );
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRow {
    pub account_id: String,
    pub currency: String,
    pub owner: Option<String>,
    pub balance: i64,
    pub overdraft_limit: u64,
    pub closed: bool,
    /// `Coffer-Chain` of the account's last event, which its next one must build on.
    #[serde(default = "genesis")]
    pub chain: String,
    /// Open holds from this account, summed.
    #[serde(default)]
    pub held: i64,
    /// Number of events of the account applied.
    pub version: u64,
    /// Position of the account's last event.
    pub position: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// The listing terms of an account: what `GET /v1/accounts` filters on. Each is a tag, a NUL
/// and the value (metadata: the key, a NUL, the value), so no two filters share a term.
pub fn account_terms(row: &AccountRow) -> Vec<String> {
    let mut terms = vec![
        currency_term(&row.currency),
        status_term(if row.closed { "closed" } else { "open" }),
    ];
    if let Some(owner) = &row.owner {
        terms.push(owner_term(owner));
    }
    terms.extend(
        row.metadata
            .iter()
            .map(|(key, value)| metadata_term(key, value)),
    );
    terms
}

pub fn currency_term(currency: &str) -> String {
    format!("c\0{currency}")
}

pub fn status_term(status: &str) -> String {
    format!("s\0{status}")
}

pub fn owner_term(owner: &str) -> String {
    format!("o\0{owner}")
}

pub fn metadata_term(key: &str, value: &str) -> String {
    format!("m\0{key}\0{value}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementEntry {
    pub position: u64,
    pub event_type: String,
    /// Signed: credits positive, debits negative.
    pub amount: i64,
    pub balance_after: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub transfer_id: Option<String>,
    pub counterparty: Option<String>,
    pub reference: Option<String>,
    /// A transaction's (or reversal's) line: its id and every account this one moved money with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counterparties: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverses: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A transfer: committed whole (debit and credit in one atomic batch), so it is always
/// completed; the row is written from the debit and given the credit's position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRow {
    pub transfer_id: String,
    pub from: String,
    pub to: String,
    pub amount: u64,
    pub currency: String,
    pub reference: Option<String>,
    /// Position of the transfer's last event (the credit).
    pub position: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The transaction that reversed it, once one did.
    #[serde(default)]
    pub reversed_by: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// One posting of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostingRow {
    pub from: String,
    pub to: String,
    pub amount: u64,
    pub currency: String,
}

/// A multi-posting transaction (or a reversal), gathered from its parts: each touched account's
/// `transaction_posted` carries the postings that name it, so the row is whole once `parts`
/// of them are applied (they are committed together, but a batch may end between them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionRow {
    pub transaction_id: String,
    /// By index in the transaction.
    pub postings: BTreeMap<u16, PostingRow>,
    pub parts: u16,
    pub parts_applied: u16,
    pub reference: Option<String>,
    pub reverses: Option<String>,
    pub reversed_by: Option<String>,
    /// Position of the transaction's last part applied.
    pub position: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl TransactionRow {
    /// Whether every part is applied: only then is it shown.
    pub fn complete(&self) -> bool {
        self.parts_applied >= self.parts
    }
}

/// The transaction row after `recorded`, or `None` when the event is not a transaction's part.
pub fn fold_transaction(
    row: Option<TransactionRow>,
    recorded: &RecordedEvent,
) -> Option<TransactionRow> {
    let Event::TransactionPosted {
        transaction_id,
        currency,
        legs,
        parts,
        reverses,
        reference,
        metadata,
        ..
    } = &recorded.event
    else {
        return None;
    };
    let mut row = row.unwrap_or_else(|| TransactionRow {
        transaction_id: transaction_id.to_string(),
        postings: BTreeMap::new(),
        parts: *parts,
        parts_applied: 0,
        reference: reference.clone(),
        reverses: reverses.as_ref().map(ToString::to_string),
        reversed_by: None,
        position: 0,
        time: recorded.time,
        metadata: metadata.entries().clone(),
    });
    for leg in legs {
        row.postings
            .entry(leg.posting)
            .or_insert_with(|| PostingRow {
                from: leg.from.to_string(),
                to: leg.to.to_string(),
                amount: leg.amount.minor_units(),
                currency: currency.to_string(),
            });
    }
    row.parts_applied = row.parts_applied.saturating_add(1);
    row.position = recorded.position;
    Some(row)
}

/// A hold and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRow {
    pub hold_id: String,
    pub from: String,
    pub to: String,
    pub amount: u64,
    /// `held`, `captured`, `voided` or `expired`.
    pub status: String,
    pub captured_amount: Option<u64>,
    /// Unix seconds.
    pub expires_at: i64,
    /// Position of the hold's last event (for a capture: the receiver's credit).
    pub position: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// The hold row after `recorded` (an event of the hold's `from`), or `None` when the event is
/// not about a hold.
pub fn fold_hold(row: Option<HoldRow>, recorded: &RecordedEvent) -> Option<HoldRow> {
    let (mut row, status) = match (&recorded.event, row) {
        (
            Event::HoldPlaced {
                hold_id,
                to,
                amount,
                expires_at,
                metadata,
                ..
            },
            _,
        ) => (
            HoldRow {
                hold_id: hold_id.to_string(),
                from: recorded.account_id.to_string(),
                to: to.to_string(),
                amount: amount.minor_units(),
                status: String::new(),
                captured_amount: None,
                expires_at: *expires_at,
                position: 0,
                metadata: metadata.entries().clone(),
            },
            "held",
        ),
        (Event::HoldCaptured { amount, .. }, Some(mut row)) => {
            row.captured_amount = Some(amount.minor_units());
            (row, "captured")
        }
        (Event::HoldVoided { .. }, Some(row)) => (row, "voided"),
        (Event::HoldExpired { .. }, Some(row)) => (row, "expired"),
        _ => return None,
    };
    row.status = status.into();
    row.position = recorded.position;
    Some(row)
}

/// The hold an event of its `from` is about.
fn hold_of(event: &Event) -> Option<&domain::TransferId> {
    match event {
        Event::HoldPlaced { hold_id, .. }
        | Event::HoldCaptured { hold_id, .. }
        | Event::HoldVoided { hold_id }
        | Event::HoldExpired { hold_id } => Some(hold_id),
        _ => None,
    }
}

/// The account row after `recorded`. Events before the account was opened leave it absent.
pub fn fold_account(row: Option<AccountRow>, recorded: &RecordedEvent) -> Option<AccountRow> {
    let mut row = match (&recorded.event, row) {
        (Event::AccountOpened(open), None) => AccountRow {
            account_id: recorded.account_id.to_string(),
            currency: open.currency.to_string(),
            owner: open.owner.clone(),
            balance: 0,
            overdraft_limit: open.overdraft_limit.minor_units(),
            closed: false,
            chain: genesis(),
            held: 0,
            version: 0,
            position: 0,
            opened_at: recorded.time,
            updated_at: recorded.time,
            metadata: open.metadata.entries().clone(),
        },
        (_, Some(row)) => row,
        (_, None) => return None,
    };
    row.balance = row.balance.saturating_add(recorded.event.balance_change());
    match &recorded.event {
        Event::AccountClosed => row.closed = true,
        Event::MetadataChanged { set, unset } => {
            for (key, value) in set.entries() {
                row.metadata.insert(key.clone(), value.clone());
            }
            for key in unset {
                row.metadata.remove(key);
            }
        }
        _ => {}
    }
    row.version += 1;
    row.position = recorded.position;
    row.updated_at = recorded.time;
    Some(row)
}

/// The statement line `recorded` adds, given the account row after it.
pub fn statement_entry(after: &AccountRow, recorded: &RecordedEvent) -> Option<StatementEntry> {
    let metadata = match &recorded.event {
        Event::Deposited { metadata, .. }
        | Event::Withdrawn { metadata, .. }
        | Event::TransferDebited { metadata, .. }
        | Event::TransferCredited { metadata, .. }
        | Event::HoldPlaced { metadata, .. }
        | Event::TransactionPosted { metadata, .. } => metadata.entries().clone(),
        // A change of the account's labels is not a line of its statement.
        Event::MetadataChanged { .. } => return None,
        _ => BTreeMap::new(),
    };
    let (transfer_id, counterparty, reference) = match &recorded.event {
        Event::Deposited { reference, .. } | Event::Withdrawn { reference, .. } => {
            (None, None, reference.clone())
        }
        Event::TransferDebited {
            transfer_id,
            to,
            reference,
            ..
        } => (Some(transfer_id), Some(to), reference.clone()),
        Event::TransferCredited {
            transfer_id,
            from,
            reference,
            ..
        } => (Some(transfer_id), Some(from), reference.clone()),
        Event::HoldPlaced {
            hold_id,
            to,
            reference,
            ..
        } => (Some(hold_id), Some(to), reference.clone()),
        Event::HoldCaptured { hold_id, .. }
        | Event::HoldVoided { hold_id }
        | Event::HoldExpired { hold_id } => (Some(hold_id), None, None),
        Event::AccountOpened(_)
        | Event::AccountClosed
        | Event::MetadataChanged { .. }
        | Event::OpeningBalance { .. } => (None, None, None),
        Event::TransactionPosted { reference, .. } => (None, None, reference.clone()),
    };
    let (transaction_id, counterparties, reverses) = match &recorded.event {
        Event::TransactionPosted {
            transaction_id,
            legs,
            reverses,
            ..
        } => (
            Some(transaction_id.to_string()),
            counterparties_of(&recorded.account_id, legs),
            reverses.as_ref().map(ToString::to_string),
        ),
        _ => (None, Vec::new(), None),
    };
    let counterparty =
        counterparty
            .map(ToString::to_string)
            .or_else(|| match counterparties.as_slice() {
                [only] => Some(only.clone()),
                _ => None,
            });
    Some(StatementEntry {
        position: recorded.position,
        event_type: recorded.event.event_type().into(),
        amount: recorded.event.balance_change(),
        balance_after: after.balance,
        time: recorded.time,
        transfer_id: transfer_id.map(ToString::to_string),
        counterparty,
        reference,
        transaction_id,
        counterparties,
        reverses,
        metadata,
    })
}

/// Every account `account` moved money with in a transaction's `legs`, in posting order, once.
fn counterparties_of(account: &domain::AccountId, legs: &[domain::Leg]) -> Vec<String> {
    let mut counterparties: Vec<String> = Vec::new();
    for leg in legs {
        let other = if &leg.from == account {
            &leg.to
        } else {
            &leg.from
        };
        if !counterparties.iter().any(|known| known == other.as_str()) {
            counterparties.push(other.to_string());
        }
    }
    counterparties
}

/// The transfer row `recorded` creates, if any. The row is written from the credit, the
/// transfer's last event: debit and credit are committed together, but a reader's batch may end
/// between them, and the transfer must not show before the receiver has its money.
/// `receiver_currency` is the currency of the credited account (the sender's too).
pub fn transfer_row(recorded: &RecordedEvent, receiver_currency: &str) -> Option<TransferRow> {
    match &recorded.event {
        Event::TransferCredited {
            transfer_id,
            from,
            amount,
            reference,
            metadata,
        } => Some(TransferRow {
            transfer_id: transfer_id.to_string(),
            from: from.to_string(),
            to: recorded.account_id.to_string(),
            amount: amount.minor_units(),
            currency: receiver_currency.to_owned(),
            reference: reference.clone(),
            position: recorded.position,
            time: recorded.time,
            reversed_by: None,
            metadata: metadata.entries().clone(),
        }),
        _ => None,
    }
}

fn encode<T: Serialize>(row: &T) -> Result<Vec<u8>, redb::Error> {
    rmp_serde::to_vec_named(row).map_err(|error| redb::Error::Corrupted(error.to_string()))
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, redb::Error> {
    rmp_serde::from_slice(bytes).map_err(|error| redb::Error::Corrupted(error.to_string()))
}

/// Records on the transfer or transaction `original` that `reversal` moved it back.
fn mark_reversed(
    transfers: &mut redb::Table<&str, &[u8]>,
    transactions: &mut redb::Table<&str, &[u8]>,
    original: &str,
    reversal: &str,
) -> Result<(), redb::Error> {
    if let Some(mut row) = read_row::<TransferRow>(transfers, original)? {
        row.reversed_by = Some(reversal.to_owned());
        transfers.insert(original, encode(&row)?.as_slice())?;
    } else if let Some(mut row) = read_row::<TransactionRow>(transactions, original)? {
        row.reversed_by = Some(reversal.to_owned());
        transactions.insert(original, encode(&row)?.as_slice())?;
    }
    Ok(())
}

/// A statement line of a batch, written with the batch's others in key order.
struct Line<'a> {
    account_id: &'a str,
    position: u64,
    /// Unix nanoseconds.
    time: i128,
    bytes: Vec<u8>,
    reference: Option<String>,
}

/// The account, statement, transfer and audit views.
#[derive(Default)]
pub struct LedgerViews {
    pub integrity: Arc<Integrity>,
    /// Whose signature every event must carry; `None`: signatures are not checked.
    pub trusted: Option<Arc<eventlog::TrustedKeys>>,
}

/// The accounts whose last event in `events` carries a trusted signature. Their earlier events
/// in the batch need no verification of their own: the chain, checked event by event, makes that
/// last chain value commit to each of them, and a trusted writer signs only on top of a history
/// it checked (it recomputes the chain and verifies every event it loads, and the stream's
/// concurrency check makes it load whatever was appended since it last looked). So a catch-up
/// pays one verification per account per batch, not one per event; an account whose last
/// signature fails has each of its events verified, to name the first.
fn vouched_accounts<'a>(
    trusted: &eventlog::TrustedKeys,
    events: &'a [RecordedEvent],
) -> std::collections::HashSet<&'a str> {
    let mut last: HashMap<&str, &RecordedEvent> = HashMap::new();
    for recorded in events {
        last.insert(recorded.account_id.as_str(), recorded);
    }
    last.into_iter()
        .filter(|(_, recorded)| {
            trusted
                .verify_event(
                    recorded.position,
                    recorded.chain.as_deref(),
                    recorded.signature.as_deref(),
                )
                .is_ok()
        })
        .map(|(account, _)| account)
        .collect()
}

impl LedgerViews {
    /// An event that named a row it may not change: the row stays as it was.
    fn refuse(&self, recorded: &RecordedEvent, row: &str, id: &str) {
        self.integrity.rows_refused.inc();
        tracing::error!(
            account = recorded.account_id.as_str(),
            position = recorded.position,
            row,
            id,
            "an event named a row it may not change; the row is kept as it was"
        );
    }
}

/// Reads one MessagePack row.
fn read_row<T: for<'de> Deserialize<'de>>(
    table: &redb::Table<&str, &[u8]>,
    key: &str,
) -> Result<Option<T>, redb::Error> {
    match table.get(key)? {
        Some(bytes) => Ok(Some(decode(bytes.value())?)),
        None => Ok(None),
    }
}

impl projection::Projector for LedgerViews {
    fn initialize(&self, transaction: &WriteTransaction) -> Result<(), redb::Error> {
        transaction.open_table(ACCOUNTS)?;
        transaction.open_table(STATEMENTS)?;
        transaction.open_table(TRANSFERS)?;
        transaction.open_table(TRANSACTIONS)?;
        transaction.open_table(AUDIT)?;
        transaction.open_table(HOLDS)?;
        transaction.open_table(STATEMENT_TIMES)?;
        transaction.open_table(ACCOUNT_INDEX)?;
        transaction.open_table(STATEMENT_REFERENCES)?;
        transaction.open_table(UNREADABLE)?;
        transaction.open_table(UNREADABLE_ACCOUNTS)?;
        // Opened on a file of this layout (or an empty one): it is this version from now on.
        transaction
            .open_table(VIEW_META)?
            .insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION)?;
        Ok(())
    }

    fn unreadable(
        &self,
        transaction: &WriteTransaction,
        message: &eventlog::Unreadable,
    ) -> Result<(), ApplyError> {
        let account_id = message.account.as_ref().map(|account| account.to_string());
        let row = UnreadableRow {
            account_id: account_id.clone(),
            subject: message.subject.clone(),
            reason: message.reason.clone(),
        };
        match account_id {
            Some(account_id) => mark_unverifiable(transaction, &account_id, message.position, row),
            None => {
                transaction
                    .open_table(UNREADABLE)?
                    .insert(message.position, encode(&row)?.as_slice())?;
                Ok(())
            }
        }
    }

    fn history_gap(
        &self,
        transaction: &WriteTransaction,
        gap: &projection::Gap,
    ) -> Result<(), ApplyError> {
        let missing = gap.missing;
        let reason = if gap.erased {
            format!(
                "its event at position {missing} is no longer in the stream (erased, by a \
                 per-message TTL or otherwise), and later events build on it"
            )
        } else {
            format!(
                "later events build on the message at position {missing}, which this view \
                 could not apply as one of the account's events"
            )
        };
        let row = UnreadableRow {
            account_id: Some(gap.account.clone()),
            subject: String::new(),
            reason,
        };
        mark_unverifiable(transaction, &gap.account, missing, row)
    }

    fn apply(
        &self,
        transaction: &WriteTransaction,
        events: &[RecordedEvent],
    ) -> Result<(), ApplyError> {
        let mut accounts = transaction.open_table(ACCOUNTS)?;
        let mut statements = transaction.open_table(STATEMENTS)?;
        let mut transfers = transaction.open_table(TRANSFERS)?;
        let mut transactions = transaction.open_table(TRANSACTIONS)?;
        let mut audit_table = transaction.open_table(AUDIT)?;
        let mut holds = transaction.open_table(HOLDS)?;
        let mut statement_times = transaction.open_table(STATEMENT_TIMES)?;
        let mut account_index = transaction.open_table(ACCOUNT_INDEX)?;
        let mut statement_references = transaction.open_table(STATEMENT_REFERENCES)?;
        // The listing terms of accounts whose terms this batch may change (opened, closed,
        // metadata changed), as they were before it: only those are re-indexed.
        let mut terms_before: HashMap<&str, Vec<String>> = HashMap::new();
        let mut lines: Vec<Line> = Vec::with_capacity(events.len());
        let mut audit: AuditRow = read_row(&audit_table, AUDIT_RUNNING)?.unwrap_or_default();
        let mut settled: Option<AuditRow> = None;
        // Account rows as the batch leaves them: each is read and written once per batch, not
        // once per event (a catch-up applies up to 1 000 events of few accounts at a time).
        let mut rows: HashMap<&str, Option<AccountRow>> = HashMap::new();
        let vouched = self
            .trusted
            .as_deref()
            .map(|trusted| vouched_accounts(trusted, events))
            .unwrap_or_default();
        for recorded in events {
            let account_id = recorded.account_id.as_str();
            let old: Option<AccountRow> = match rows.remove(account_id) {
                Some(row) => row,
                None => read_row(&accounts, account_id)?,
            };
            if matches!(
                recorded.event,
                Event::AccountOpened(_) | Event::AccountClosed | Event::MetadataChanged { .. }
            ) && !terms_before.contains_key(account_id)
            {
                terms_before.insert(
                    account_id,
                    old.as_ref().map(account_terms).unwrap_or_default(),
                );
            }
            // An account already marked (an unreadable message, a broken chain) is not served,
            // and what follows cannot be checked against it.
            let marked = |transaction: &WriteTransaction| -> Result<bool, ApplyError> {
                Ok(transaction
                    .open_table(UNREADABLE_ACCOUNTS)?
                    .get(account_id)?
                    .is_some())
            };
            let applied_before = old.as_ref().map_or(0, |row| row.position);
            if recorded
                .previous_position
                .is_some_and(|previous| previous > applied_before)
                && !marked(transaction)?
            {
                // The stream checked this append against an event of the account that these
                // views never got: their consumer skips events (its filter was changed), or a
                // delivery was lost. Every balance from here could be wrong.
                return Err(ApplyError::Missed {
                    account: account_id.to_owned(),
                    position: recorded.position,
                    previous: recorded.previous_position.unwrap_or_default(),
                    applied: applied_before,
                });
            }
            let previous_chain = old.as_ref().map_or_else(genesis, |row| row.chain.clone());
            let expected_chain = recorded.expected_chain(&previous_chain);
            // An event the views cannot trust costs its account, like an unreadable message:
            // one that does not chain from the account's history (forged, altered, or copied
            // from another ledger; a missed event was checked above), or whose chain value no
            // trusted writer signed (appended with a NATS credential alone).
            let untrusted = if recorded.chain.as_deref() != Some(expected_chain.as_str()) {
                Some((
                    &self.integrity.chain_breaks,
                    "its Coffer-Chain does not follow from the account's previous event (forged \
                     or altered)"
                        .to_owned(),
                ))
            } else {
                self.trusted
                    .as_ref()
                    .filter(|_| !vouched.contains(account_id))
                    .and_then(|trusted| {
                        trusted
                            .verify_event(
                                recorded.position,
                                recorded.chain.as_deref(),
                                recorded.signature.as_deref(),
                            )
                            .err()
                    })
                    .map(|error| {
                        (
                            &self.integrity.signature_failures,
                            format!("no trusted writer signed it: {error}"),
                        )
                    })
            };
            // An event the views cannot trust changes its own account's rows only (which are
            // no longer served): never a transfer, hold or transaction row, which other
            // accounts' callers read, nor the audit's sums.
            let forged = untrusted.is_some();
            if let Some((counter, reason)) = untrusted {
                if !marked(transaction)? {
                    counter.inc();
                    tracing::error!(
                        account = account_id,
                        position = recorded.position,
                        %reason,
                        "an event the views cannot trust; the account's views are no longer served"
                    );
                    mark_unverifiable(
                        transaction,
                        account_id,
                        recorded.position,
                        UnreadableRow {
                            account_id: Some(account_id.to_owned()),
                            subject: recorded.subject.clone(),
                            reason,
                        },
                    )?;
                }
            }
            if let Some(mut row) = fold_account(old, recorded) {
                // Later events build on what is stored, so one break is counted once.
                row.chain = recorded.chain.clone().unwrap_or(expected_chain);
                if let Some(hold_id) = hold_of(&recorded.event).filter(|_| !forged) {
                    let before: Option<HoldRow> = read_row(&holds, hold_id.as_str())?;
                    // Placed once, and changed only by the account that placed it.
                    let allowed = match (&recorded.event, &before) {
                        (Event::HoldPlaced { .. }, before) => before.is_none(),
                        (_, Some(hold)) => hold.from == account_id,
                        (_, None) => true,
                    };
                    if !allowed {
                        self.refuse(recorded, "hold", hold_id.as_str());
                    }
                    let held_before = before
                        .as_ref()
                        .filter(|hold| hold.status == "held")
                        .map_or(0, |hold| hold.amount as i64);
                    if let Some(hold) = fold_hold(before, recorded).filter(|_| allowed) {
                        let held_after = if hold.status == "held" {
                            hold.amount as i64
                        } else {
                            0
                        };
                        row.held = row.held.saturating_add(held_after - held_before);
                        holds.insert(hold_id.as_str(), encode(&hold)?.as_slice())?;
                    }
                }
                if !forged && !audit.apply(&row.currency, recorded) {
                    self.integrity.audit_unbalanced.inc();
                    tracing::error!(
                        position = recorded.position,
                        "conservation audit: a debit at the previous position has no credit"
                    );
                }
                if audit.transfer_in_flight.is_none() {
                    settled = Some(audit.clone());
                }
                if let Some(transfer) = transfer_row(recorded, &row.currency).filter(|_| !forged) {
                    // A transfer id is used once: a later credit naming it is not that transfer.
                    if transfers.get(transfer.transfer_id.as_str())?.is_some() {
                        self.refuse(recorded, "transfer", &transfer.transfer_id);
                    } else {
                        transfers
                            .insert(transfer.transfer_id.as_str(), encode(&transfer)?.as_slice())?;
                    }
                }
                if let Event::TransactionPosted {
                    transaction_id,
                    legs,
                    parts,
                    ..
                } = &recorded.event
                {
                    let before: Option<TransactionRow> =
                        read_row(&transactions, transaction_id.as_str())?;
                    // A part names its account in its postings, and agrees on how many parts
                    // the transaction has.
                    let allowed = !forged
                        && legs.iter().any(|leg| {
                            leg.from == recorded.account_id || leg.to == recorded.account_id
                        })
                        && before
                            .as_ref()
                            .is_none_or(|row| row.parts == *parts && row.parts_applied < row.parts);
                    if !allowed && !forged {
                        self.refuse(recorded, "transaction", transaction_id.as_str());
                    }
                    if let Some(done) = fold_transaction(before, recorded).filter(|_| allowed) {
                        if done.complete() {
                            if let Some(original) = &done.reverses {
                                mark_reversed(
                                    &mut transfers,
                                    &mut transactions,
                                    original,
                                    &done.transaction_id,
                                )?;
                            }
                        }
                        transactions.insert(transaction_id.as_str(), encode(&done)?.as_slice())?;
                    }
                }
                if let Some(entry) = statement_entry(&row, recorded) {
                    lines.push(Line {
                        account_id,
                        position: recorded.position,
                        time: recorded.time.unix_timestamp_nanos(),
                        bytes: encode(&entry)?,
                        reference: entry.reference,
                    });
                }
                rows.insert(account_id, Some(row));
            } else {
                rows.insert(account_id, None);
            }
        }
        // Statement lines go in by account and position: a batch interleaves many accounts,
        // and inserting in key order keeps each insert on the leaf page the previous one used.
        lines.sort_unstable_by(|a, b| (a.account_id, a.position).cmp(&(b.account_id, b.position)));
        for line in &lines {
            statements.insert((line.account_id, line.position), line.bytes.as_slice())?;
            statement_times.insert((line.account_id, line.time), line.position)?;
        }
        for line in &lines {
            if let Some(reference) = &line.reference {
                statement_references
                    .insert((line.account_id, reference.as_str(), line.position), ())?;
            }
        }
        for (account_id, row) in &rows {
            if let Some(row) = row {
                accounts.insert(*account_id, encode(row)?.as_slice())?;
            }
        }
        for (account_id, before) in &terms_before {
            let after = rows
                .get(account_id)
                .and_then(Option::as_ref)
                .map(account_terms)
                .unwrap_or_default();
            for term in before.iter().filter(|term| !after.contains(term)) {
                account_index.remove((term.as_str(), *account_id))?;
            }
            for term in after.iter().filter(|term| !before.contains(term)) {
                account_index.insert((term.as_str(), *account_id), ())?;
            }
        }
        audit_table.insert(AUDIT_RUNNING, encode(&audit)?.as_slice())?;
        if let Some(settled) = settled {
            if !settled.balanced() {
                self.integrity.audit_unbalanced.inc();
                tracing::error!(
                    position = settled.position,
                    currencies = ?settled.currencies,
                    "conservation audit unbalanced: balances differ from deposits minus withdrawals"
                );
            }
            audit_table.insert(AUDIT_SETTLED, encode(&settled)?.as_slice())?;
        }
        if let Some(last) = events.last() {
            transaction
                .open_table(VIEW_META)?
                .insert(INDEXED_POSITION_KEY, last.position)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{AccountId, Amount, Currency, OpenAccount, OverdraftLimit, TransferId};
    use eventlog::EventMetadata;

    fn recorded(account: &str, position: u64, event: Event) -> RecordedEvent {
        RecordedEvent {
            position,
            subject: String::new(),
            account_id: AccountId::parse(account).unwrap(),
            time: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(position as i64),
            event,
            metadata: EventMetadata::default(),
            chain: None,
            signature: None,
            previous_position: None,
            version: 1,
            payload: Default::default(),
        }
    }

    /// `event` of `account` at `position`, chained from `previous_chain` and claiming
    /// `previous_position` as the append's check.
    fn chained(
        account: &str,
        position: u64,
        event: Event,
        previous_chain: &str,
        previous_position: u64,
    ) -> RecordedEvent {
        let mut recorded = recorded(account, position, event);
        recorded.chain = Some(recorded.expected_chain(previous_chain));
        recorded.previous_position = Some(previous_position);
        recorded
    }

    fn deposit_event(amount: i128) -> Event {
        Event::Deposited {
            metadata: Default::default(),
            amount: Amount::new(amount).unwrap(),
            reference: None,
        }
    }

    #[test]
    fn an_event_after_one_the_views_never_got_stops_them_and_a_broken_chain_marks_its_account() {
        use projection::Projector;
        let directory = tempfile::tempdir().unwrap();
        let database = redb::Database::create(directory.path().join("views.redb")).unwrap();
        let views = LedgerViews {
            integrity: Arc::new(Integrity::default()),
            trusted: None,
        };
        let opened = chained(
            "a",
            1,
            Event::AccountOpened(OpenAccount {
                metadata: Default::default(),
                currency: Currency::parse("EUR").unwrap(),
                owner: None,
                overdraft_limit: OverdraftLimit::new(0).unwrap(),
            }),
            &genesis(),
            0,
        );
        let deposit = chained("a", 4, deposit_event(10), opened.chain.as_ref().unwrap(), 1);
        let transaction = database.begin_write().unwrap();
        views.initialize(&transaction).unwrap();
        views
            .apply(&transaction, &[opened.clone(), deposit.clone()])
            .unwrap();
        transaction.commit().unwrap();

        // The stream checked position 9 against the account's event at 7, never delivered here.
        let after_missed = chained("a", 9, deposit_event(5), "whatever", 7);
        let transaction = database.begin_write().unwrap();
        let refused = views.apply(&transaction, &[after_missed]);
        assert!(
            matches!(
                &refused,
                Err(ApplyError::Missed { account, position: 9, previous: 7, applied: 4 }) if account == "a"
            ),
            "{refused:?}"
        );
        drop(transaction);

        // A well-placed event (checked against 4, which the views have) that does not chain:
        // applied, counted, and the account marked.
        let mut forged = chained("a", 9, deposit_event(1_000), "not the chain", 4);
        forged.subject = "coffer.events.a.deposited".into();
        let transaction = database.begin_write().unwrap();
        views.apply(&transaction, &[forged]).unwrap();
        transaction.commit().unwrap();
        assert_eq!(views.integrity.chain_breaks.get(), 1);
        let read = redb::ReadableDatabase::begin_read(&database).unwrap();
        let (position, row) = unreadable_at(&read, "a").unwrap().unwrap();
        assert_eq!(position, 9);
        assert!(row.reason.contains("Coffer-Chain"), "{row:?}");
        // An account without a mark is not reported.
        assert!(unreadable_at(&read, "b").unwrap().is_none());
    }

    /// Appends events as the stream would: positions in order, each chained from its account's
    /// previous event and checked against its position.
    #[derive(Default)]
    struct Chains {
        position: u64,
        last: HashMap<String, (String, u64)>,
    }

    impl Chains {
        fn next(&mut self, account: &str, event: Event) -> RecordedEvent {
            self.position += 1;
            let (chain, previous) = self
                .last
                .get(account)
                .cloned()
                .unwrap_or_else(|| (genesis(), 0));
            let recorded = chained(account, self.position, event, &chain, previous);
            self.last.insert(
                account.to_owned(),
                (recorded.chain.clone().unwrap(), self.position),
            );
            recorded
        }

        /// An event that does not chain from its account's history.
        fn forged(&mut self, account: &str, event: Event) -> RecordedEvent {
            self.position += 1;
            let previous = self.last.get(account).map_or(0, |(_, position)| *position);
            chained(account, self.position, event, "not the chain", previous)
        }
    }

    fn open_event() -> Event {
        Event::AccountOpened(OpenAccount {
            metadata: Default::default(),
            currency: Currency::parse("EUR").unwrap(),
            owner: None,
            overdraft_limit: OverdraftLimit::new(0).unwrap(),
        })
    }

    fn read_view<T: for<'de> Deserialize<'de>>(
        database: &redb::Database,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Option<T> {
        let read = redb::ReadableDatabase::begin_read(database).unwrap();
        let table = read.open_table(table).unwrap();
        table
            .get(key)
            .unwrap()
            .map(|bytes| decode(bytes.value()).unwrap())
    }

    /// A transfer, hold or transaction row is read by the callers of every account it names: an
    /// event of another account (a writer credential can append one, chained correctly, on a
    /// throwaway account) must not overwrite it, and an event the views cannot trust changes no
    /// such row nor the audit.
    #[test]
    fn an_event_cannot_take_over_another_accounts_rows_and_a_forged_one_changes_no_shared_row() {
        use projection::Projector;
        let directory = tempfile::tempdir().unwrap();
        let database = redb::Database::create(directory.path().join("views.redb")).unwrap();
        let views = LedgerViews::default();
        let apply = |events: &[RecordedEvent]| {
            let transaction = database.begin_write().unwrap();
            views.initialize(&transaction).unwrap();
            views.apply(&transaction, events).unwrap();
            transaction.commit().unwrap();
        };
        let id = |id: &str| TransferId::parse(id).unwrap();
        let account = |id: &str| AccountId::parse(id).unwrap();
        let legs = |from: &str, to: &str| {
            vec![domain::Leg {
                posting: 0,
                from: account(from),
                to: account(to),
                amount: Amount::new(5).unwrap(),
            }]
        };
        let posted_as =
            |transaction: &str, legs: Vec<domain::Leg>, net: i64| Event::TransactionPosted {
                metadata: Default::default(),
                transaction_id: id(transaction),
                currency: Currency::parse("EUR").unwrap(),
                net,
                legs,
                parts: 2,
                reverses: None,
                reference: None,
            };
        let posted = |legs: Vec<domain::Leg>, net: i64| posted_as("tx", legs, net);
        let mut chains = Chains::default();
        let history = vec![
            chains.next("a", open_event()),
            chains.next("b", open_event()),
            chains.next("x", open_event()),
            chains.next("a", deposit_event(100)),
            chains.next(
                "a",
                Event::TransferDebited {
                    metadata: Default::default(),
                    transfer_id: id("t"),
                    to: account("b"),
                    amount: Amount::new(30).unwrap(),
                    currency: Currency::parse("EUR").unwrap(),
                    reference: None,
                },
            ),
            chains.next(
                "b",
                Event::TransferCredited {
                    metadata: Default::default(),
                    transfer_id: id("t"),
                    from: account("a"),
                    amount: Amount::new(30).unwrap(),
                    reference: None,
                },
            ),
            chains.next(
                "a",
                Event::HoldPlaced {
                    hold_id: id("h"),
                    to: account("b"),
                    amount: Amount::new(20).unwrap(),
                    expires_at: 4_000_000_000,
                    reference: None,
                    metadata: Default::default(),
                },
            ),
            chains.next("a", posted(legs("a", "b"), -5)),
            chains.next("b", posted(legs("a", "b"), 5)),
            // Half of another transaction: b's part is still to come.
            chains.next("a", posted_as("tx2", legs("a", "b"), -5)),
        ];
        apply(&history);
        let transfer: TransferRow = read_view(&database, TRANSFERS, "t").unwrap();
        let hold: HoldRow = read_view(&database, HOLDS, "h").unwrap();
        let whole: TransactionRow = read_view(&database, TRANSACTIONS, "tx").unwrap();
        let audit: AuditRow = read_view(&database, AUDIT, AUDIT_SETTLED).unwrap();
        assert!(whole.complete());
        assert!(audit.balanced());

        // A forged deposit marks its account and leaves the audit as it was.
        apply(&[chains.forged("b", deposit_event(1_000))]);
        assert_eq!(views.integrity.chain_breaks.get(), 1);
        let after: AuditRow = read_view(&database, AUDIT, AUDIT_SETTLED).unwrap();
        assert_eq!(after.currencies, audit.currencies);

        // Correctly chained events of x that name a's and b's rows: each refused.
        let forged_hold = Event::HoldPlaced {
            hold_id: id("h"),
            to: account("x"),
            amount: Amount::new(1).unwrap(),
            expires_at: 1,
            reference: None,
            metadata: Default::default(),
        };
        apply(&[
            chains.next(
                "x",
                Event::TransferCredited {
                    metadata: Default::default(),
                    transfer_id: id("t"),
                    from: account("a"),
                    amount: Amount::new(999).unwrap(),
                    reference: None,
                },
            ),
            chains.next("x", Event::HoldVoided { hold_id: id("h") }),
            chains.next("x", forged_hold.clone()),
            chains.next("x", posted(legs("a", "b"), 0)),
            // A part that does not name x, of a transaction not yet whole.
            chains.next("x", posted_as("tx2", legs("a", "b"), 0)),
        ]);
        assert_eq!(views.integrity.rows_refused.get(), 5);
        let half: TransactionRow = read_view(&database, TRANSACTIONS, "tx2").unwrap();
        assert_eq!(half.parts_applied, 1);
        // A forged event of the hold's own account changes it neither.
        apply(&[chains.forged("a", Event::HoldVoided { hold_id: id("h") })]);
        assert_eq!(
            read_view::<TransferRow>(&database, TRANSFERS, "t"),
            Some(transfer)
        );
        assert_eq!(read_view::<HoldRow>(&database, HOLDS, "h"), Some(hold));
        assert_eq!(
            read_view::<TransactionRow>(&database, TRANSACTIONS, "tx"),
            Some(whole)
        );
    }

    #[test]
    fn account_fold_tracks_balance_version_and_status() {
        let opened = recorded(
            "a",
            1,
            Event::AccountOpened(OpenAccount {
                metadata: Default::default(),
                currency: Currency::parse("EUR").unwrap(),
                owner: None,
                overdraft_limit: OverdraftLimit::new(5).unwrap(),
            }),
        );
        let row = fold_account(None, &opened).unwrap();
        let deposit = recorded(
            "a",
            4,
            Event::Deposited {
                metadata: Default::default(),
                amount: Amount::new(10).unwrap(),
                reference: Some("r".into()),
            },
        );
        let row = fold_account(Some(row), &deposit).unwrap();
        assert_eq!((row.balance, row.version, row.position), (10, 2, 4));
        let entry = statement_entry(&row, &deposit).unwrap();
        assert_eq!(
            (
                entry.amount,
                entry.balance_after,
                entry.reference.as_deref()
            ),
            (10, 10, Some("r"))
        );
        let row = fold_account(Some(row), &recorded("a", 9, Event::AccountClosed)).unwrap();
        assert!(row.closed);
        assert!(fold_account(None, &deposit).is_none());
    }

    #[test]
    fn the_audit_settles_only_after_a_credit_and_flags_a_debit_without_one() {
        let transfer_id = TransferId::parse("t").unwrap();
        let debit = recorded(
            "a",
            2,
            Event::TransferDebited {
                metadata: Default::default(),
                transfer_id: transfer_id.clone(),
                to: AccountId::parse("b").unwrap(),
                amount: Amount::new(3).unwrap(),
                currency: Currency::parse("EUR").unwrap(),
                reference: None,
            },
        );
        let credit = recorded(
            "b",
            3,
            Event::TransferCredited {
                metadata: Default::default(),
                transfer_id,
                from: AccountId::parse("a").unwrap(),
                amount: Amount::new(3).unwrap(),
                reference: None,
            },
        );
        let deposit = recorded(
            "a",
            1,
            Event::Deposited {
                metadata: Default::default(),
                amount: Amount::new(10).unwrap(),
                reference: None,
            },
        );
        let mut audit = AuditRow::default();
        assert!(audit.apply("EUR", &deposit));
        assert!(audit.apply("EUR", &debit));
        assert!(audit.transfer_in_flight.is_some() && !audit.balanced());
        assert!(audit.apply("EUR", &credit));
        assert!(audit.transfer_in_flight.is_none() && audit.balanced());
        // A debit followed by anything but its credit is a broken pair, and stays unbalanced.
        assert!(audit.apply("EUR", &debit));
        assert!(!audit.apply("EUR", &deposit));
        assert!(audit.transfer_in_flight.is_none() && !audit.balanced());
    }

    #[test]
    fn a_transfer_row_comes_from_the_credit_alone() {
        let transfer_id = TransferId::parse("t").unwrap();
        let debit = recorded(
            "a",
            2,
            Event::TransferDebited {
                metadata: Default::default(),
                transfer_id: transfer_id.clone(),
                to: AccountId::parse("b").unwrap(),
                amount: Amount::new(3).unwrap(),
                currency: Currency::parse("EUR").unwrap(),
                reference: Some("rent".into()),
            },
        );
        assert!(transfer_row(&debit, "EUR").is_none());
        let credit = recorded(
            "b",
            3,
            Event::TransferCredited {
                metadata: Default::default(),
                transfer_id,
                from: AccountId::parse("a").unwrap(),
                amount: Amount::new(3).unwrap(),
                reference: Some("rent".into()),
            },
        );
        let row = transfer_row(&credit, "EUR").unwrap();
        assert_eq!(
            (row.from.as_str(), row.to.as_str(), row.amount, row.position),
            ("a", "b", 3, 3)
        );
        assert_eq!(
            (row.currency.as_str(), row.reference.as_deref()),
            ("EUR", Some("rent"))
        );
    }

    fn part(
        account: &str,
        position: u64,
        net: i64,
        legs: &[(u16, &str, &str, i128)],
    ) -> RecordedEvent {
        recorded(
            account,
            position,
            Event::TransactionPosted {
                metadata: Default::default(),
                transaction_id: TransferId::parse("tx").unwrap(),
                currency: Currency::parse("EUR").unwrap(),
                net,
                legs: legs
                    .iter()
                    .map(|(posting, from, to, amount)| domain::Leg {
                        posting: *posting,
                        from: AccountId::parse(from).unwrap(),
                        to: AccountId::parse(to).unwrap(),
                        amount: Amount::new(*amount).unwrap(),
                    })
                    .collect(),
                parts: 3,
                reverses: Some(TransferId::parse("t-0").unwrap()),
                reference: Some("order".into()),
            },
        )
    }

    #[test]
    fn a_transaction_is_whole_once_every_part_is_applied_and_the_audit_settles_then() {
        let parts = [
            part("a", 2, -100, &[(0, "a", "b", 70), (1, "a", "c", 30)]),
            part("b", 3, 70, &[(0, "a", "b", 70)]),
            part("c", 4, 30, &[(1, "a", "c", 30)]),
        ];
        let mut audit = AuditRow::default();
        assert!(audit.apply(
            "EUR",
            &recorded(
                "a",
                1,
                Event::Deposited {
                    metadata: Default::default(),
                    amount: Amount::new(100).unwrap(),
                    reference: None,
                },
            )
        ));
        let mut row = None;
        for (index, recorded) in parts.iter().enumerate() {
            assert!(audit.apply("EUR", recorded));
            row = fold_transaction(row, recorded);
            let whole = index == parts.len() - 1;
            assert_eq!(row.as_ref().unwrap().complete(), whole);
            // In flight until the last part: the settled audit waits for it.
            assert_eq!(audit.transfer_in_flight.is_none(), whole);
        }
        assert!(audit.balanced());
        let row = row.unwrap();
        assert_eq!(row.postings.len(), 2);
        assert_eq!((row.position, row.reverses.as_deref()), (4, Some("t-0")));
        // The statement line shows the net and every counterparty.
        let account = AccountRow {
            metadata: Default::default(),
            account_id: "a".into(),
            currency: "EUR".into(),
            owner: None,
            balance: 0,
            overdraft_limit: 0,
            closed: false,
            chain: genesis(),
            held: 0,
            version: 3,
            position: 2,
            opened_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        };
        let line = statement_entry(&account, &parts[0]).unwrap();
        assert_eq!(line.amount, -100);
        assert_eq!(line.counterparties, vec!["b".to_owned(), "c".to_owned()]);
        assert_eq!(line.counterparty, None);
        assert_eq!(line.transaction_id.as_deref(), Some("tx"));
        // A part followed by anything but the rest of its transaction is a broken one.
        let mut broken = AuditRow::default();
        assert!(broken.apply("EUR", &parts[0]));
        assert!(!broken.apply("EUR", &recorded("z", 9, Event::AccountClosed)));
    }
}
