//! `coffer account ...`: the ledger for people at a terminal. Writes go over NATS to the
//! `coffer` service (any writer answers), reads over a reader's HTTP API; the output is a table
//! or the API's JSON.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use crate::reader_api::{ReaderAccess, ReaderClient};
use crate::NatsArgs;

#[derive(Subcommand)]
pub enum AccountCommand {
    /// Opens an account (NATS).
    Open(OpenArgs),
    /// Deposits minor units into an account (NATS).
    Deposit(MoneyArgs),
    /// Withdraws minor units from an account (NATS).
    Withdraw(MoneyArgs),
    /// Transfers minor units between two accounts of one currency, atomically (NATS).
    Transfer(TransferArgs),
    /// Shows an account and a page of its statement (a reader's HTTP API).
    Show(ShowArgs),
    /// Lists accounts by id, filtered by currency, owner, status and metadata (a reader's HTTP
    /// API).
    List(ListArgs),
    /// Sets and unsets entries of an account's metadata (NATS).
    Metadata(MetadataArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, for scripts (`jq`).
    Json,
}

/// What every write takes.
#[derive(Args)]
pub struct WriteArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Makes a retry safe: the same key and body answer the first outcome again (24 h). One is
    /// made if not given, and shown when the outcome is unknown.
    #[arg(long)]
    idempotency_key: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args)]
pub struct OpenArgs {
    /// The account id (1-64 of `A-Za-z0-9_-`).
    account: String,
    /// ISO 4217 code, e.g. EUR.
    #[arg(long)]
    currency: String,
    #[arg(long)]
    owner: Option<String>,
    /// How far below zero the balance may go, in minor units.
    #[arg(long)]
    overdraft_limit: Option<u64>,
    /// A metadata entry, `key=value` (repeat for more).
    #[arg(long = "metadata", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    #[command(flatten)]
    write: WriteArgs,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    reader: ReaderAccess,
    #[arg(long)]
    currency: Option<String>,
    #[arg(long)]
    owner: Option<String>,
    /// `open` or `closed`.
    #[arg(long)]
    status: Option<String>,
    /// Only accounts with this metadata entry, `key=value` (repeat: all of them).
    #[arg(long = "metadata", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// Accounts after this id (the `next` a page printed).
    #[arg(long)]
    after: Option<String>,
    /// Most accounts shown (1-1000).
    #[arg(long, default_value_t = 100)]
    limit: u64,
    /// Wait until the reader has applied this position.
    #[arg(long)]
    min_position: Option<u64>,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args)]
pub struct MetadataArgs {
    account: String,
    /// An entry to set, `key=value` (repeat for more).
    #[arg(long = "set", value_parser = key_value)]
    set: Vec<(String, String)>,
    /// A key to remove (repeat for more).
    #[arg(long = "unset")]
    unset: Vec<String>,
    #[command(flatten)]
    write: WriteArgs,
}

/// `key=value`.
fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

/// Metadata arguments as the JSON object the API takes.
fn metadata_object(entries: &[(String, String)]) -> Value {
    Value::Object(
        entries
            .iter()
            .map(|(key, value)| (key.clone(), Value::from(value.clone())))
            .collect(),
    )
}

#[derive(Args)]
pub struct MoneyArgs {
    account: String,
    /// Minor units (cents), a positive integer.
    amount: u64,
    #[arg(long)]
    reference: Option<String>,
    /// A metadata entry, `key=value` (repeat for more).
    #[arg(long = "metadata", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    #[command(flatten)]
    write: WriteArgs,
}

#[derive(Args)]
pub struct TransferArgs {
    from: String,
    to: String,
    /// Minor units (cents), a positive integer.
    amount: u64,
    /// Your id for the transfer (the server makes one otherwise).
    #[arg(long)]
    transfer_id: Option<String>,
    #[arg(long)]
    reference: Option<String>,
    /// A metadata entry, `key=value` (repeat for more).
    #[arg(long = "metadata", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    #[command(flatten)]
    write: WriteArgs,
}

#[derive(Args)]
pub struct ShowArgs {
    account: String,
    #[command(flatten)]
    reader: ReaderAccess,
    /// Wait until the reader has applied this position (read your own write: the `position`
    /// a write printed).
    #[arg(long)]
    min_position: Option<u64>,
    /// Statement lines after this position.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Most statement lines shown (1-1000).
    #[arg(long, default_value_t = 20)]
    limit: u64,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

/// The writer waits up to its command deadline (10 s by default) plus a grace period before it
/// answers `outcome_unknown`; wait a little longer than that.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs one account command; returns whether it succeeded (the exit status).
pub async fn run(command: AccountCommand) -> anyhow::Result<bool> {
    match command {
        AccountCommand::Open(args) => {
            let mut body = json!({"currency": args.currency});
            insert_some(&mut body, "owner", args.owner.map(Value::from));
            insert_some(
                &mut body,
                "overdraft_limit",
                args.overdraft_limit.map(Value::from),
            );
            insert_metadata(&mut body, &args.metadata);
            write(&args.write, &args.account, "open", body).await
        }
        AccountCommand::Deposit(args) => {
            let mut body = json!({"amount": args.amount});
            insert_some(&mut body, "reference", args.reference.map(Value::from));
            insert_metadata(&mut body, &args.metadata);
            write(&args.write, &args.account, "deposit", body).await
        }
        AccountCommand::Withdraw(args) => {
            let mut body = json!({"amount": args.amount});
            insert_some(&mut body, "reference", args.reference.map(Value::from));
            insert_metadata(&mut body, &args.metadata);
            write(&args.write, &args.account, "withdraw", body).await
        }
        AccountCommand::Transfer(args) => {
            let mut body = json!({"to": args.to, "amount": args.amount});
            insert_some(&mut body, "transfer_id", args.transfer_id.map(Value::from));
            insert_some(&mut body, "reference", args.reference.map(Value::from));
            insert_metadata(&mut body, &args.metadata);
            write(&args.write, &args.from, "transfer", body).await
        }
        AccountCommand::Show(args) => show(args).await,
        AccountCommand::List(args) => list(args).await,
        AccountCommand::Metadata(args) => {
            let body = json!({"set": metadata_object(&args.set), "unset": args.unset});
            write(&args.write, &args.account, "metadata", body).await
        }
    }
}

fn insert_metadata(body: &mut Value, entries: &[(String, String)]) {
    if !entries.is_empty() {
        insert_some(body, "metadata", Some(metadata_object(entries)));
    }
}

/// Percent-encodes a query value (the listing's filters are free text).
fn query_value(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

async fn list(args: ListArgs) -> anyhow::Result<bool> {
    let client = ReaderClient::new(&args.reader)?;
    let mut query = vec![format!("limit={}", args.limit)];
    for (name, value) in [
        ("currency", &args.currency),
        ("owner", &args.owner),
        ("status", &args.status),
        ("after", &args.after),
    ] {
        if let Some(value) = value {
            query.push(format!("{name}={}", query_value(value)));
        }
    }
    for (key, value) in &args.metadata {
        query.push(format!(
            "metadata.{}={}",
            query_value(key),
            query_value(value)
        ));
    }
    if let Some(position) = args.min_position {
        query.push(format!("min_position={position}"));
    }
    let page = client
        .get(&format!("/v1/accounts?{}", query.join("&")))
        .await?;
    if page.status != 200 {
        report_problem(&page.body, page.status, args.output)?;
        return Ok(false);
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&page.body)?),
        Output::Table => {
            let accounts = page.body["accounts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if accounts.is_empty() {
                println!("no accounts");
            } else {
                print!("{}", accounts_table(&accounts));
            }
            if let Some(next) = page.body["next"].as_str() {
                println!("\nmore: --after {next}");
            }
        }
    }
    Ok(true)
}

/// Accounts as a table: id, currency, owner, balance (right-aligned), status, metadata.
fn accounts_table(accounts: &[Value]) -> String {
    let rows: Vec<[String; 6]> = accounts
        .iter()
        .map(|account| {
            let metadata = account["metadata"]
                .as_object()
                .map(|entries| {
                    entries
                        .iter()
                        .map(|(key, value)| format!("{key}={}", text(value)))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            [
                text(&account["account_id"]),
                text(&account["currency"]),
                text(&account["owner"]),
                text(&account["balance"]),
                text(&account["status"]),
                metadata,
            ]
        })
        .collect();
    let header = [
        "account_id",
        "currency",
        "owner",
        "balance",
        "status",
        "metadata",
    ];
    let mut widths: Vec<usize> = header.iter().map(|name| name.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| -> String {
        let mut line = String::new();
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if index == 3 {
                line.push_str(&format!("{cell:>width$}  "));
            } else if index == 5 {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        format!("{}\n", line.trim_end())
    };
    let mut table = line(header);
    for row in &rows {
        table.push_str(&line([
            row[0].as_str(),
            row[1].as_str(),
            row[2].as_str(),
            row[3].as_str(),
            row[4].as_str(),
            row[5].as_str(),
        ]));
    }
    table
}

fn insert_some(body: &mut Value, field: &str, value: Option<Value>) {
    if let (Some(object), Some(value)) = (body.as_object_mut(), value) {
        object.insert(field.to_owned(), value);
    }
}

/// Sends `body` to `coffer.cmd.{account}.{verb}` and prints the answer.
async fn write(args: &WriteArgs, account: &str, verb: &str, body: Value) -> anyhow::Result<bool> {
    let client = crate::connected(&args.nats, "coffer-account").await?;
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Idempotency-Key", key.as_str());
    let subject = format!("coffer.cmd.{account}.{verb}");
    let request = async_nats::Request::new()
        .payload(serde_json::to_vec(&body)?.into())
        .headers(headers)
        .timeout(Some(COMMAND_TIMEOUT));
    let reply = match client.send_request(subject.clone(), request).await {
        Ok(reply) => reply,
        Err(error) => {
            use async_nats::client::RequestErrorKind;
            anyhow::bail!(match error.kind() {
                RequestErrorKind::NoResponders =>
                    format!("no writer answers on {subject}: is a writer running?"),
                RequestErrorKind::TimedOut => format!(
                    "no answer within {COMMAND_TIMEOUT:?}: the outcome is unknown; \
                     retry with --idempotency-key {key} (safe)"
                ),
                _ => format!("request {subject}: {error}"),
            });
        }
    };
    let failed = reply
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Nats-Service-Error-Code"))
        .map(|code| code.as_str().to_owned());
    let answer: Value = serde_json::from_slice(&reply.payload)
        .with_context(|| format!("the writer's answer is not JSON: {:?}", reply.payload))?;
    match (failed, args.output) {
        (None, Output::Json) => println!("{}", serde_json::to_string_pretty(&answer)?),
        (None, Output::Table) => print!("{}", key_values(&answer)),
        (Some(_), Output::Json) => println!("{}", serde_json::to_string_pretty(&answer)?),
        (Some(status), Output::Table) => eprintln!("{}", problem_line(&status, &answer, &key)),
    }
    Ok(reply
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Nats-Service-Error-Code"))
        .is_none())
}

/// `error 422 insufficient_funds: ...`, with the key when a retry is the answer.
fn problem_line(status: &str, problem: &Value, key: &str) -> String {
    let code = problem["code"].as_str().unwrap_or("error");
    let detail = problem["detail"].as_str().unwrap_or("");
    let mut line = format!("error {status} {code}: {detail}");
    if code == "outcome_unknown" || code == "unavailable" {
        line.push_str(&format!(" (retry with --idempotency-key {key}: safe)"));
    }
    line
}

async fn show(args: ShowArgs) -> anyhow::Result<bool> {
    let client = ReaderClient::new(&args.reader)?;
    let wait = args
        .min_position
        .map_or_else(String::new, |position| format!("?min_position={position}"));
    let account = client
        .get(&format!("/v1/accounts/{}{wait}", args.account))
        .await?;
    if account.status != 200 {
        report_problem(&account.body, account.status, args.output)?;
        return Ok(false);
    }
    let statement = client
        .get(&format!(
            "/v1/accounts/{}/transactions?after={}&limit={}",
            args.account, args.after, args.limit
        ))
        .await?;
    if statement.status != 200 {
        report_problem(&statement.body, statement.status, args.output)?;
        return Ok(false);
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"account": account.body, "transactions": statement.body})
            )?
        ),
        Output::Table => {
            print!("{}", key_values(&account.body));
            let items = statement.body["items"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if items.is_empty() {
                println!("\nno statement lines after position {}", args.after);
            } else {
                println!();
                print!("{}", statement_table(&items));
            }
        }
    }
    Ok(true)
}

fn report_problem(problem: &Value, status: u16, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(problem)?),
        Output::Table => {
            let code = problem["code"].as_str().unwrap_or("error");
            let detail = problem["detail"].as_str().unwrap_or("");
            eprintln!("error {status} {code}: {detail}");
        }
    }
    Ok(())
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// An object as `field  value` lines, fields aligned.
fn key_values(value: &Value) -> String {
    let empty = Map::new();
    let object = value.as_object().unwrap_or(&empty);
    let width = object.keys().map(String::len).max().unwrap_or(0);
    object
        .iter()
        .map(|(field, value)| format!("{field:<width$}  {}\n", text(value)))
        .collect()
}

/// Statement lines as a table, amounts right-aligned.
fn statement_table(items: &[Value]) -> String {
    const COLUMNS: [&str; 6] = [
        "position",
        "type",
        "amount",
        "balance_after",
        "time",
        "detail",
    ];
    let rows: Vec<[String; 6]> = items
        .iter()
        .map(|item| {
            let detail = ["transfer_id", "counterparty", "reference"]
                .iter()
                .filter_map(|field| {
                    item[*field]
                        .as_str()
                        .map(|value| format!("{field}={value}"))
                })
                .collect::<Vec<_>>()
                .join(" ");
            [
                text(&item["position"]),
                text(&item["type"]),
                text(&item["amount"]),
                text(&item["balance_after"]),
                text(&item["time"]),
                detail,
            ]
        })
        .collect();
    let mut widths = COLUMNS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
            let numeric = matches!(index, 0 | 2 | 3);
            if numeric {
                out.push_str(&format!("{cell:>width$}  "));
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut table = line(
        COLUMNS
            .map(str::to_uppercase)
            .each_ref()
            .map(String::as_str),
    );
    for row in &rows {
        table.push_str(&line(row.each_ref().map(String::as_str)));
    }
    table
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_fields_and_right_align_amounts() {
        let out = key_values(&json!({"account_id": "a-1", "balance": 500, "owner": null}));
        assert_eq!(out, "account_id  a-1\nbalance     500\nowner       -\n");
        let table = statement_table(&[
            json!({"position": 3, "type": "deposited", "amount": 500, "balance_after": 500,
                "time": "2026-01-01T00:00:00Z", "reference": "r1"}),
            json!({"position": 12, "type": "transfer_debited", "amount": -20, "balance_after": 480,
                "time": "2026-01-01T00:00:01Z", "transfer_id": "t", "counterparty": "b"}),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("POSITION  TYPE"), "{table}");
        assert!(lines[1].starts_with("       3  deposited"), "{table}");
        assert!(lines[2].contains("transfer_id=t counterparty=b"), "{table}");
        assert!(lines[1].contains("   500            500"), "{table}");
    }
}
