//! `coffer import`: a file of accounts with their balances from another system becomes
//! `account_opened` + `opening_balance` per row; the same file again appends nothing; bad rows
//! are named by line; the reader shows the balances and the audit counts them as money in.
//!
//! `COFFER_SOAK=1` imports 100 000 rows (twice) instead of 2 000.

use std::process::Command;

use serde_json::json;
use testkit::NatsServer;

use crate::support::{self, read_stream, Http};

fn import(nats_url: &str, file: &std::path::Path) -> (i32, String) {
    let output = Command::new(testkit::coffer_binary())
        .arg("import")
        .arg(file)
        .env("COFFER_NATS_URL", nats_url)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_books_opening_balances_once() {
    let rows: usize = if std::env::var("COFFER_SOAK").is_ok() {
        100_000
    } else {
        2_000
    };
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("import", &nats.url(), data.path(), &[]);
    let prefix = support::unique("imp");
    let mut csv = String::from("account_id,currency,balance,owner,overdraft_limit\n");
    let mut expected_total = 0i64;
    for index in 0..rows {
        // Every tenth account is overdrawn, within a limit.
        let balance = if index % 10 == 0 {
            -(index as i64 % 500)
        } else {
            index as i64 * 3
        };
        expected_total += balance;
        csv.push_str(&format!(
            "{prefix}-{index},EUR,{balance},owner {index},500\n"
        ));
    }
    // Two rows that must be refused, by line: a bad id and a balance below its limit.
    csv.push_str("not an id,EUR,5,,\n");
    csv.push_str(&format!("{prefix}-deep,EUR,-10,,0\n"));
    let file = data.path().join("accounts.csv");
    std::fs::write(&file, &csv).unwrap();

    let (code, summary) = import(&nats.url(), &file);
    assert_eq!(code, 1, "refused rows make the exit status 1: {summary}");
    assert!(
        summary.contains(&format!("imported {rows}, already present 0, refused 2")),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("line {}: refused", rows + 2)),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("line {}: refused", rows + 3)),
        "{summary}"
    );
    let events = read_stream(&nats.url()).await;
    assert_eq!(events.len(), 2 * rows);

    let (_, again) = import(&nats.url(), &file);
    assert!(
        again.contains(&format!("imported 0, already present {rows}, refused 2")),
        "{again}"
    );
    assert_eq!(
        read_stream(&nats.url()).await.len(),
        2 * rows,
        "a re-run appended"
    );

    let last = events.last().unwrap().position;
    let http = Http::new();
    let audit = http
        .get(&format!("{}/v1/audit?min_position={last}", reader.url()))
        .await
        .unwrap();
    assert_eq!(audit.body["balanced"], true, "{:?}", audit.body);
    assert_eq!(
        audit.body["currencies"]["EUR"]["balances"].as_i64(),
        Some(expected_total)
    );
    assert_eq!(
        audit.body["currencies"]["EUR"]["external_in"].as_i64(),
        Some(expected_total)
    );
    let overdrawn = http
        .get(&format!("{}/v1/accounts/{prefix}-10", reader.url()))
        .await
        .unwrap();
    assert_eq!(
        (
            overdrawn.body["balance"].as_i64(),
            overdrawn.body["owner"].clone()
        ),
        (Some(-10), json!("owner 10"))
    );
    let statement = http
        .get(&format!(
            "{}/v1/accounts/{prefix}-7/transactions",
            reader.url()
        ))
        .await
        .unwrap();
    assert_eq!(statement.body["items"][1]["type"], "opening_balance");
    assert_eq!(statement.body["items"][1]["balance_after"], 21);
}
