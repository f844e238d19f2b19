//! Bulks through a writer killed with SIGKILL: clients keep sending bulks of keyed deposits and
//! resend a bulk (same keys) until every command in it is answered; the writer dies hard in the
//! middle and comes back. Every deposit is then in the stream exactly once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::NatsServer;

use crate::support::{self, read_stream, Http};

const ACCOUNTS: usize = 50;
const CLIENTS: usize = 4;
const BULKS_PER_CLIENT: usize = 12;
const BULK_SIZE: usize = 100;

/// Sends `commands` until each is answered with its outcome (below 500), resending the whole
/// bulk after a transport error or an `outcome_unknown`/`unavailable`: the keys make that safe.
async fn until_answered(
    http: &Http,
    writer: &str,
    commands: &Value,
    resent: &AtomicUsize,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            resent.fetch_add(1, Ordering::SeqCst);
        }
        assert!(Instant::now() < deadline, "a bulk was never fully answered");
        if let Ok(reply) = http
            .post(&format!("{writer}/v1/batch"), commands, None)
            .await
        {
            if reply.status == 200 {
                let results = reply.body["results"].as_array().unwrap().clone();
                if results
                    .iter()
                    .all(|result| result["status"].as_u64() < Some(500))
                {
                    return results;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_bulk_command_is_stored_once_through_a_writer_sigkill() {
    let nats = NatsServer::start();
    let mut writer = support::writer("bulk-writer", &nats.url(), &[]);
    let url = writer.url();
    let http = Http::new();
    let accounts: Vec<String> = (0..ACCOUNTS).map(|_| support::unique("bulk")).collect();
    let opens: Vec<Value> = accounts
        .iter()
        .map(|account| json!({"op": "open", "account_id": account, "currency": "EUR"}))
        .collect();
    let resent = Arc::new(AtomicUsize::new(0));
    let opened = until_answered(&http, &url, &json!({ "commands": opens }), &resent).await;
    assert!(opened.iter().all(|result| result["status"] == 201));

    let accounts = Arc::new(accounts);
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (http, url, accounts, answered, resent) = (
            http.clone(),
            url.clone(),
            accounts.clone(),
            answered.clone(),
            resent.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut expected: BTreeMap<String, i64> = BTreeMap::new();
            for bulk in 0..BULKS_PER_CLIENT {
                let commands: Vec<Value> = (0..BULK_SIZE)
                    .map(|index| {
                        let account = &accounts[(client * 7 + bulk * 3 + index) % ACCOUNTS];
                        let amount = 1 + (index % 5) as i64;
                        *expected.entry(account.clone()).or_default() += amount;
                        json!({"op": "deposit", "account_id": account, "amount": amount,
                            "idempotency_key": format!("k-{client}-{bulk}-{index}")})
                    })
                    .collect();
                let results =
                    until_answered(&http, &url, &json!({ "commands": commands }), &resent).await;
                for result in &results {
                    assert_eq!(result["status"], 200, "{result}");
                }
                answered.fetch_add(1, Ordering::SeqCst);
            }
            expected
        }));
    }
    // Kill the writer once some bulks are answered and others are on their way.
    while answered.load(Ordering::SeqCst) < CLIENTS {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    writer.restart();
    support::wait_ready(&writer.url());

    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for client in clients {
        for (account, amount) in client.await.unwrap() {
            *expected.entry(account).or_default() += amount;
        }
    }
    // The kill caught bulks on their way: they were sent again.
    assert!(resent.load(Ordering::SeqCst) > 0, "no bulk was interrupted");
    let events = read_stream(&nats.url()).await;
    let mut deposits = 0;
    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    for recorded in &events {
        if let domain::Event::Deposited { .. } = recorded.event {
            deposits += 1;
        }
        *balances.entry(recorded.account_id.to_string()).or_default() +=
            recorded.event.balance_change();
    }
    assert_eq!(deposits, CLIENTS * BULKS_PER_CLIENT * BULK_SIZE);
    for (account, amount) in &expected {
        assert_eq!(balances.get(account), Some(amount), "account {account}");
    }
}
