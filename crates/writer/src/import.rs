//! `coffer import`: the retroactive step. Accounts kept by another system come in with the
//! balance they had there: each row opens its account and books an `opening_balance` event, the
//! two in one atomic batch on condition that the account has no events yet. So a row is
//! imported whole or not at all, and a re-run of the same file appends nothing (its accounts
//! exist: "already present"). The audit counts opening balances as money from outside.
//!
//! Rows go in batches of up to [`ROWS_PER_BATCH_MAX`]; a batch with an account that exists
//! already falls back to one row at a time.
//!
//! Input: CSV with the header `account_id,currency,balance[,owner][,overdraft_limit]`, or JSON
//! lines with the same fields. A row that is not valid is refused with its line number and the
//! reason, and the others go on.

use domain::{decide_import, AccountId, AccountState, Currency, OpenAccount, OverdraftLimit};
use eventlog::{Entry, EventLog, EventMetadata};
use serde::Deserialize;

use crate::request::{Text, TEXT_LENGTH_MAX};
use crate::{Error, Result};

/// One account to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRow {
    /// Line in the file (1 is a CSV header), for the summary.
    pub line: usize,
    pub account_id: AccountId,
    pub open: OpenAccount,
    pub balance: i64,
}

/// What became of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    Imported {
        position: u64,
    },
    /// The account has events already (a re-run, or an account opened otherwise).
    AlreadyPresent,
    Refused(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    account_id: String,
    currency: String,
    balance: i64,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    overdraft_limit: Option<u64>,
}

fn row(line: usize, fields: Fields) -> std::result::Result<ImportRow, String> {
    let account_id = AccountId::parse(&fields.account_id).map_err(|error| error.to_string())?;
    let currency = Currency::parse(&fields.currency).map_err(|error| error.to_string())?;
    let overdraft_limit = OverdraftLimit::new(fields.overdraft_limit.unwrap_or(0).into())
        .map_err(|error| error.to_string())?;
    let owner = fields.owner.filter(|owner| !owner.is_empty());
    if owner.as_ref().is_some_and(|owner| !Text::fits(owner)) {
        return Err(format!(
            "owner must be at most {TEXT_LENGTH_MAX} characters"
        ));
    }
    Ok(ImportRow {
        line,
        account_id,
        open: OpenAccount {
            currency,
            owner,
            overdraft_limit,
            metadata: domain::Metadata::default(),
        },
        balance: fields.balance,
    })
}

/// Parses a file: the rows to import, and the lines refused with why.
pub fn parse(text: &str) -> (Vec<ImportRow>, Vec<(usize, String)>) {
    let json_lines = text.trim_start().starts_with('{');
    let mut rows = Vec::new();
    let mut refused = Vec::new();
    if json_lines {
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let number = index + 1;
            match serde_json::from_str::<Fields>(line)
                .map_err(|error| error.to_string())
                .and_then(|fields| row(number, fields))
            {
                Ok(row) => rows.push(row),
                Err(reason) => refused.push((number, reason)),
            }
        }
    } else {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let headers = match reader.headers() {
            Ok(headers) => Some(headers.clone()),
            Err(error) => {
                refused.push((1, format!("header: {error}")));
                None
            }
        };
        for record in reader.records() {
            let (number, fields) = match record {
                Ok(record) => {
                    let number = record
                        .position()
                        .map_or(0, |position| position.line() as usize);
                    (
                        number,
                        record
                            .deserialize::<Fields>(headers.as_ref())
                            .map_err(|error| error.to_string()),
                    )
                }
                Err(error) => (
                    error
                        .position()
                        .map_or(0, |position| position.line() as usize),
                    Err(error.to_string()),
                ),
            };
            match fields.and_then(|fields| row(number, fields)) {
                Ok(row) => rows.push(row),
                Err(reason) => refused.push((number, reason)),
            }
        }
    }
    refuse_repeated_accounts(&mut rows, &mut refused);
    (rows, refused)
}

/// Keeps the first row of each account and refuses the others. Rows are written in atomic
/// batches whose conditions JetStream checks against the stream *before* the batch: two rows of
/// one account in one batch would both pass "no event yet", and both opening balances would be
/// booked (money created, the account's chain forked).
fn refuse_repeated_accounts(rows: &mut Vec<ImportRow>, refused: &mut Vec<(usize, String)>) {
    let mut first_line: std::collections::HashMap<AccountId, usize> =
        std::collections::HashMap::new();
    rows.retain(|row| match first_line.get(&row.account_id) {
        Some(first) => {
            refused.push((
                row.line,
                format!("account {} is already on line {first}", row.account_id),
            ));
            false
        }
        None => {
            first_line.insert(row.account_id.clone(), row.line);
            true
        }
    });
    refused.sort_by_key(|(line, _)| *line);
}

/// Rows written in one atomic batch (two messages each, under the server's 1 000): a batch's
/// cost is mostly per batch, so packing rows is what makes an import fast.
pub const ROWS_PER_BATCH_MAX: usize = 400;

/// Imports up to [`ROWS_PER_BATCH_MAX`] rows in one atomic batch, each row guarded by "its
/// account has no events yet". If any account exists (a re-run, or an account opened
/// otherwise), the batch fails whole and each row of the chunk is imported on its own, so the
/// others still go in.
pub async fn import_chunk(log: &EventLog, rows: &[ImportRow]) -> Vec<(usize, Result<RowOutcome>)> {
    let mut outcomes = Vec::with_capacity(rows.len());
    let mut planned: Vec<(&ImportRow, Vec<Entry>)> = Vec::with_capacity(rows.len());
    for row in rows.iter().take(ROWS_PER_BATCH_MAX) {
        match entries(row) {
            Ok(Ok(entries)) => planned.push((row, entries)),
            Ok(Err(reason)) => outcomes.push((row.line, Ok(RowOutcome::Refused(reason)))),
            Err(error) => outcomes.push((row.line, Err(error))),
        }
    }
    match append_rows(log, &planned).await {
        Ok(imported) => outcomes.extend(imported),
        Err(eventlog::Error::Conflict { .. } | eventlog::Error::Duplicate(_)) => {
            // Some account exists: find which (one cheap leader read each), then write the
            // others together, and only if that races again, one at a time.
            let mut fresh = Vec::new();
            for (row, entries) in planned {
                match log.last_account_position(&row.account_id).await {
                    Ok(0) => fresh.push((row, entries)),
                    Ok(_) => outcomes.push((row.line, Ok(RowOutcome::AlreadyPresent))),
                    Err(error) => outcomes.push((row.line, Err(error.into()))),
                }
            }
            match append_rows(log, &fresh).await {
                Ok(imported) => outcomes.extend(imported),
                Err(_) => {
                    for (row, _) in &fresh {
                        outcomes.push((row.line, import_row(log, row).await));
                    }
                }
            }
        }
        Err(error) => {
            let error = Error::from(error);
            for (row, _) in &planned {
                outcomes.push((row.line, Err(error.clone())));
            }
        }
    }
    outcomes
}

/// Appends the rows' messages in one atomic batch; each row is imported at the position of
/// its last message.
async fn append_rows(
    log: &EventLog,
    rows: &[(&ImportRow, Vec<Entry>)],
) -> eventlog::Result<Vec<(usize, Result<RowOutcome>)>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let batch: Vec<Entry> = rows
        .iter()
        .flat_map(|(_, entries)| entries.iter().cloned())
        .collect();
    let appended = log.append_atomic(&batch).await?;
    let mut index = 0;
    Ok(rows
        .iter()
        .map(|(row, entries)| {
            index += entries.len();
            let position = appended.position_of(index - 1);
            (row.line, Ok(RowOutcome::Imported { position }))
        })
        .collect())
}

/// A row's two messages, or why the row is refused.
fn entries(row: &ImportRow) -> Result<std::result::Result<Vec<Entry>, String>> {
    let events = match decide_import(
        &AccountState::new(row.account_id.clone()),
        &row.open,
        row.balance,
    ) {
        Ok(events) => events,
        Err(refusal) => return Ok(Err(refusal.to_string())),
    };
    let metadata = EventMetadata {
        command_id: uuid::Uuid::now_v7().to_string(),
        correlation_id: format!("import-line-{}", row.line),
        traceparent: None,
    };
    let mut chain = eventlog::chain::GENESIS.to_owned();
    let mut entries = Vec::with_capacity(events.len());
    for event in events {
        chain = eventlog::chain::next(&chain, &row.account_id, &event)?;
        entries.push(Entry::Event {
            account: row.account_id.clone(),
            // Both are checked against the stream before the batch: the account has nothing.
            expected_last_position: 0,
            event,
            metadata: metadata.clone(),
            chain: chain.clone(),
        });
    }
    Ok(Ok(entries))
}

/// Imports one row: `account_opened` and `opening_balance` together, if the account has no
/// events yet.
pub async fn import_row(log: &EventLog, row: &ImportRow) -> Result<RowOutcome> {
    let entries = match entries(row)? {
        Ok(entries) => entries,
        Err(reason) => return Ok(RowOutcome::Refused(reason)),
    };
    match log.append_atomic(&entries).await {
        Ok(appended) => Ok(RowOutcome::Imported {
            position: appended.last_position,
        }),
        Err(eventlog::Error::Conflict { .. }) => Ok(RowOutcome::AlreadyPresent),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_json_lines_give_the_same_rows_and_name_bad_lines() {
        let csv = "account_id,currency,balance,owner,overdraft_limit\n\
                   a-1,EUR,250,Alice,\n\
                   a-2,EUR,-50,,100\n\
                   bad id,EUR,1,,\n\
                   a-3,eur,1,,\n\
                   a-4,EUR,1.5,,\n";
        let (rows, refused) = parse(csv);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].line, rows[0].balance), (2, 250));
        assert_eq!(rows[0].open.owner.as_deref(), Some("Alice"));
        assert_eq!(
            (rows[1].balance, rows[1].open.overdraft_limit.minor_units()),
            (-50, 100)
        );
        let lines: Vec<usize> = refused.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, vec![4, 5, 6]);
        let json = "{\"account_id\":\"a-1\",\"currency\":\"EUR\",\"balance\":250,\"owner\":\"Alice\"}\n\
                    {\"account_id\":\"a-2\",\"currency\":\"EUR\",\"balance\":-50,\"overdraft_limit\":100}\n\
                    {\"account_id\":\"a-3\",\"currency\":\"EUR\",\"balance\":1,\"colour\":\"red\"}\n";
        let (json_rows, json_refused) = parse(json);
        assert_eq!(json_rows.len(), 2);
        assert_eq!(json_rows[0].open, rows[0].open);
        assert_eq!(json_refused.len(), 1);
        assert!(json_refused[0].1.contains("colour"), "{json_refused:?}");
    }

    #[test]
    fn an_account_listed_twice_is_imported_once() {
        let text = "account_id,currency,balance\na-1,EUR,250\nb-1,EUR,10\na-1,EUR,300\n";
        let (rows, refused) = parse(text);
        let ids: Vec<&str> = rows.iter().map(|row| row.account_id.as_str()).collect();
        assert_eq!(ids, ["a-1", "b-1"]);
        assert_eq!(rows[0].balance, 250);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, 4);
        assert!(refused[0].1.contains("line 2"), "{:?}", refused);
    }
}
