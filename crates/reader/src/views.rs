//! The views, as pure functions of the old row and an event, plus the redb code that stores
//! them. Rows are MessagePack (named fields) so a field can be added without a migration.

use domain::Event;
use eventlog::RecordedEvent;
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Account id -> [`AccountRow`].
pub const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
/// (account id, position) -> [`StatementEntry`]: a range scan gives a statement page.
pub const STATEMENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("statements");
/// Transfer id -> [`TransferRow`].
pub const TRANSFERS: TableDefinition<&str, &[u8]> = TableDefinition::new("transfers");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRow {
    pub account_id: String,
    pub currency: String,
    pub owner: Option<String>,
    pub balance: i64,
    pub overdraft_limit: u64,
    pub closed: bool,
    /// Number of events of the account applied.
    pub version: u64,
    /// Position of the account's last event.
    pub position: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
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
            version: 0,
            position: 0,
            opened_at: recorded.time,
            updated_at: recorded.time,
        },
        (_, Some(row)) => row,
        (_, None) => return None,
    };
    row.balance = row.balance.saturating_add(recorded.event.balance_change());
    if matches!(recorded.event, Event::AccountClosed) {
        row.closed = true;
    }
    row.version += 1;
    row.position = recorded.position;
    row.updated_at = recorded.time;
    Some(row)
}

/// The statement line `recorded` adds, given the account row after it.
pub fn statement_entry(after: &AccountRow, recorded: &RecordedEvent) -> Option<StatementEntry> {
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
        Event::AccountOpened(_) | Event::AccountClosed => (None, None, None),
    };
    Some(StatementEntry {
        position: recorded.position,
        event_type: recorded.event.event_type().into(),
        amount: recorded.event.balance_change(),
        balance_after: after.balance,
        time: recorded.time,
        transfer_id: transfer_id.map(ToString::to_string),
        counterparty: counterparty.map(ToString::to_string),
        reference,
    })
}

/// The transfer row after `recorded`, or `None` when the event does not concern a transfer.
/// The debit creates the row; the credit, committed in the same batch right after it, gives it
/// its position and time.
pub fn fold_transfer(row: Option<TransferRow>, recorded: &RecordedEvent) -> Option<TransferRow> {
    match (&recorded.event, row) {
        (
            Event::TransferDebited {
                transfer_id,
                to,
                amount,
                currency,
                reference,
            },
            None,
        ) => Some(TransferRow {
            transfer_id: transfer_id.to_string(),
            from: recorded.account_id.to_string(),
            to: to.to_string(),
            amount: amount.minor_units(),
            currency: currency.to_string(),
            reference: reference.clone(),
            position: recorded.position,
            time: recorded.time,
        }),
        (Event::TransferCredited { .. }, Some(mut row)) => {
            row.position = recorded.position;
            row.time = recorded.time;
            Some(row)
        }
        (_, row) => row,
    }
}

/// The transfer an event concerns, if any.
fn transfer_of(event: &Event) -> Option<&domain::TransferId> {
    match event {
        Event::TransferDebited { transfer_id, .. }
        | Event::TransferCredited { transfer_id, .. } => Some(transfer_id),
        _ => None,
    }
}

fn encode<T: Serialize>(row: &T) -> Result<Vec<u8>, redb::Error> {
    rmp_serde::to_vec_named(row).map_err(|error| redb::Error::Corrupted(error.to_string()))
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, redb::Error> {
    rmp_serde::from_slice(bytes).map_err(|error| redb::Error::Corrupted(error.to_string()))
}

/// The account, statement and transfer views.
pub struct LedgerViews;

impl projection::Projector for LedgerViews {
    fn initialize(&self, transaction: &WriteTransaction) -> Result<(), redb::Error> {
        transaction.open_table(ACCOUNTS)?;
        transaction.open_table(STATEMENTS)?;
        transaction.open_table(TRANSFERS)?;
        Ok(())
    }

    fn apply(
        &self,
        transaction: &WriteTransaction,
        events: &[RecordedEvent],
    ) -> Result<(), redb::Error> {
        let mut accounts = transaction.open_table(ACCOUNTS)?;
        let mut statements = transaction.open_table(STATEMENTS)?;
        let mut transfers = transaction.open_table(TRANSFERS)?;
        for recorded in events {
            let account_id = recorded.account_id.as_str();
            let old: Option<AccountRow> = match accounts.get(account_id)? {
                Some(bytes) => Some(decode(bytes.value())?),
                None => None,
            };
            if let Some(row) = fold_account(old, recorded) {
                if let Some(entry) = statement_entry(&row, recorded) {
                    statements
                        .insert((account_id, recorded.position), encode(&entry)?.as_slice())?;
                }
                accounts.insert(account_id, encode(&row)?.as_slice())?;
            }
            if let Some(transfer_id) = transfer_of(&recorded.event) {
                let old: Option<TransferRow> = match transfers.get(transfer_id.as_str())? {
                    Some(bytes) => Some(decode(bytes.value())?),
                    None => None,
                };
                if let Some(row) = fold_transfer(old, recorded) {
                    transfers.insert(transfer_id.as_str(), encode(&row)?.as_slice())?;
                }
            }
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
        }
    }

    #[test]
    fn account_fold_tracks_balance_version_and_status() {
        let opened = recorded(
            "a",
            1,
            Event::AccountOpened(OpenAccount {
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
    fn transfer_fold_takes_the_debit_and_the_credits_position() {
        let transfer_id = TransferId::parse("t").unwrap();
        let debit = recorded(
            "a",
            2,
            Event::TransferDebited {
                transfer_id: transfer_id.clone(),
                to: AccountId::parse("b").unwrap(),
                amount: Amount::new(3).unwrap(),
                currency: Currency::parse("EUR").unwrap(),
                reference: Some("rent".into()),
            },
        );
        let row = fold_transfer(None, &debit).unwrap();
        assert_eq!(
            (row.from.as_str(), row.to.as_str(), row.amount, row.position),
            ("a", "b", 3, 2)
        );
        let credit = recorded(
            "b",
            3,
            Event::TransferCredited {
                transfer_id,
                from: AccountId::parse("a").unwrap(),
                amount: Amount::new(3).unwrap(),
                reference: Some("rent".into()),
            },
        );
        let row = fold_transfer(Some(row), &credit).unwrap();
        assert_eq!((row.position, row.reference.as_deref()), (3, Some("rent")));
        assert!(fold_transfer(None, &recorded("a", 4, Event::AccountClosed)).is_none());
    }
}
