//! What the query API answers: one serde type per response body, each with its OpenAPI schema,
//! built from a view row. The rows are the storage format; these are the wire format.

use std::collections::BTreeMap;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::views::{
    AccountRow, AuditRow, CurrencySums, HoldRow, StatementEntry, TransactionRow, TransferRow,
};

fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&Rfc3339).unwrap_or_default()
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    Open,
    Closed,
}

/// `GET /v1/accounts/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    pub account_id: String,
    pub currency: String,
    pub owner: Option<String>,
    /// Signed minor units.
    pub balance: i64,
    pub overdraft_limit: u64,
    /// Open holds from this account, summed.
    pub held: i64,
    /// What a withdrawal may take now: balance + overdraft limit - held.
    pub available: i64,
    pub status: AccountStatus,
    /// How many events the account has.
    pub version: u64,
    /// The position of the account's last event.
    pub position: u64,
    #[schema(format = DateTime)]
    pub opened_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// Your labels on the account (empty when none).
    pub metadata: BTreeMap<String, String>,
}

impl From<&AccountRow> for AccountView {
    fn from(row: &AccountRow) -> Self {
        Self {
            account_id: row.account_id.clone(),
            currency: row.currency.clone(),
            owner: row.owner.clone(),
            balance: row.balance,
            overdraft_limit: row.overdraft_limit,
            held: row.held,
            available: row
                .balance
                .saturating_add(row.overdraft_limit as i64)
                .saturating_sub(row.held),
            status: if row.closed {
                AccountStatus::Closed
            } else {
                AccountStatus::Open
            },
            version: row.version,
            position: row.position,
            opened_at: rfc3339(row.opened_at),
            updated_at: rfc3339(row.updated_at),
            metadata: row.metadata.clone(),
        }
    }
}

/// `GET /v1/accounts`: by account id ascending.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountList {
    pub accounts: Vec<AccountView>,
    /// Pass as `after` for the next page; null when there is none. A page of filters that
    /// rarely meet may hold fewer accounts than `limit` (even none) and still have a `next`:
    /// it stopped after 10 000 index seeks. Follow `next` until it is null.
    pub next: Option<String>,
}

/// One line of a statement.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatementItem {
    pub position: u64,
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Signed: credits positive, debits negative.
    pub amount: i64,
    pub balance_after: i64,
    #[schema(format = DateTime)]
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counterparty: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// On a transaction's (or reversal's) line: its id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    /// On a transaction's line: every account this one moved money with in it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub counterparties: Vec<String>,
    /// On a reversal's line: the transfer or transaction it moved back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverses: Option<String>,
    /// The movement's labels (empty when none).
    pub metadata: BTreeMap<String, String>,
}

impl From<&StatementEntry> for StatementItem {
    fn from(entry: &StatementEntry) -> Self {
        Self {
            position: entry.position,
            event_type: entry.event_type.clone(),
            amount: entry.amount,
            balance_after: entry.balance_after,
            time: rfc3339(entry.time),
            transfer_id: entry.transfer_id.clone(),
            counterparty: entry.counterparty.clone(),
            reference: entry.reference.clone(),
            transaction_id: entry.transaction_id.clone(),
            counterparties: entry.counterparties.clone(),
            reverses: entry.reverses.clone(),
            metadata: entry.metadata.clone(),
        }
    }
}

/// `GET /v1/accounts/{id}/transactions`: ascending by position.
#[derive(Debug, Serialize, ToSchema)]
pub struct Statement {
    pub items: Vec<StatementItem>,
    /// The position of the last item returned, or `after` when the page is empty.
    pub next: u64,
}

/// `GET /v1/accounts/{id}/balance`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BalanceAsOf {
    pub account_id: String,
    pub balance: i64,
    /// The position of the account's last event at or before the bound.
    pub position: u64,
    /// The time of that event.
    #[schema(format = DateTime)]
    pub time: String,
}

impl BalanceAsOf {
    pub fn new(account_id: &str, entry: &StatementEntry) -> Self {
        Self {
            account_id: account_id.to_owned(),
            balance: entry.balance_after,
            position: entry.position,
            time: rfc3339(entry.time),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    Completed,
}

/// `GET /v1/transfers/{id}`: committed whole, so always completed.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransferView {
    pub transfer_id: String,
    pub from: String,
    pub to: String,
    pub amount: u64,
    pub currency: String,
    pub status: TransferStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The position of the transfer's credit.
    pub position: u64,
    #[schema(format = DateTime)]
    pub time: String,
    /// The transaction that reversed this transfer, once one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reversed_by: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

impl From<&TransferRow> for TransferView {
    fn from(row: &TransferRow) -> Self {
        Self {
            transfer_id: row.transfer_id.clone(),
            from: row.from.clone(),
            to: row.to.clone(),
            amount: row.amount,
            currency: row.currency.clone(),
            status: TransferStatus::Completed,
            reference: row.reference.clone(),
            position: row.position,
            time: rfc3339(row.time),
            reversed_by: row.reversed_by.clone(),
            metadata: row.metadata.clone(),
        }
    }
}

/// One posting of a transaction view.
#[derive(Debug, Serialize, ToSchema)]
pub struct PostingView {
    pub from: String,
    pub to: String,
    pub amount: u64,
    pub currency: String,
}

/// `GET /v1/transactions/{id}`: committed whole, so always completed.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransactionView {
    pub transaction_id: String,
    /// In the order they were given.
    pub postings: Vec<PostingView>,
    pub status: TransferStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Set on a reversal: the transfer or transaction it moved back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverses: Option<String>,
    /// The reversal of this transaction, once there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reversed_by: Option<String>,
    /// The position of the transaction's last event.
    pub position: u64,
    #[schema(format = DateTime)]
    pub time: String,
    pub metadata: BTreeMap<String, String>,
}

impl From<&TransactionRow> for TransactionView {
    fn from(row: &TransactionRow) -> Self {
        Self {
            transaction_id: row.transaction_id.clone(),
            postings: row
                .postings
                .values()
                .map(|posting| PostingView {
                    from: posting.from.clone(),
                    to: posting.to.clone(),
                    amount: posting.amount,
                    currency: posting.currency.clone(),
                })
                .collect(),
            status: TransferStatus::Completed,
            reference: row.reference.clone(),
            reverses: row.reverses.clone(),
            reversed_by: row.reversed_by.clone(),
            position: row.position,
            time: rfc3339(row.time),
            metadata: row.metadata.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    Held,
    Captured,
    Voided,
    Expired,
}

/// `GET /v1/holds/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HoldView {
    pub hold_id: String,
    pub from: String,
    pub to: String,
    pub amount: u64,
    pub status: HoldStatus,
    /// What a capture took (the rest was released).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captured_amount: Option<u64>,
    #[schema(format = DateTime)]
    pub expires_at: String,
    /// The position of the hold's last event.
    pub position: u64,
    pub metadata: BTreeMap<String, String>,
}

impl From<&HoldRow> for HoldView {
    fn from(row: &HoldRow) -> Self {
        let status = match row.status.as_str() {
            "captured" => HoldStatus::Captured,
            "voided" => HoldStatus::Voided,
            "expired" => HoldStatus::Expired,
            _ => HoldStatus::Held,
        };
        Self {
            hold_id: row.hold_id.clone(),
            from: row.from.clone(),
            to: row.to.clone(),
            amount: row.amount,
            status,
            captured_amount: row.captured_amount,
            expires_at: OffsetDateTime::from_unix_timestamp(row.expires_at)
                .map(rfc3339)
                .unwrap_or_default(),
            position: row.position,
            metadata: row.metadata.clone(),
        }
    }
}

/// A sum of money: a JSON integer, or a decimal string beyond what a signed 64-bit integer
/// holds (sums of many balances can be).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Sum {
    Exact(i64),
    /// A decimal integer: `^-?[0-9]+$`.
    Decimal(String),
}

impl From<i128> for Sum {
    fn from(sum: i128) -> Self {
        match i64::try_from(sum) {
            Ok(value) => Sum::Exact(value),
            Err(_) => Sum::Decimal(sum.to_string()),
        }
    }
}

/// One currency's sums: balanced when `balances == external_in - external_out`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CurrencyAudit {
    pub balances: Sum,
    pub external_in: Sum,
    pub external_out: Sum,
}

impl From<&CurrencySums> for CurrencyAudit {
    fn from(sums: &CurrencySums) -> Self {
        Self {
            balances: sums.balances.into(),
            external_in: sums.external_in.into(),
            external_out: sums.external_out.into(),
        }
    }
}

/// `GET /v1/audit`: at the last position the view applied with no transfer half applied.
#[derive(Debug, Serialize, ToSchema)]
pub struct Audit {
    pub position: u64,
    /// By currency code.
    pub currencies: BTreeMap<String, CurrencyAudit>,
    pub balanced: bool,
}

impl From<&AuditRow> for Audit {
    fn from(row: &AuditRow) -> Self {
        Self {
            position: row.position,
            currencies: row
                .currencies
                .iter()
                .map(|(currency, sums)| (currency.clone(), sums.into()))
                .collect(),
            balanced: row.balanced(),
        }
    }
}
