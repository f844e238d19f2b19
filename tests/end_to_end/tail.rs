//! `coffer events tail`: committed events as JSON lines, filtered by account and type, from a
//! position, stopping at the end or following new ones.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use testkit::NatsServer;

use crate::support::{self, Http};

fn tail(nats_url: &str, args: &[&str]) -> Vec<Value> {
    let output = Command::new(testkit::coffer_binary())
        .args(["events", "tail"])
        .args(args)
        .env("COFFER_NATS_URL", nats_url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tail_prints_committed_events_filtered_and_follows() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let http = Http::new();
    let (a, b) = (support::unique("tail-a"), support::unique("tail-b"));
    for account in [&a, &b] {
        http.open_account(&writer.url(), account).await;
        http.deposit(&writer.url(), account, &json!({"amount": 10}), None)
            .await
            .unwrap();
    }
    let transfer = http
        .post(
            &format!("{}/v1/transfers", writer.url()),
            &json!({"from": a, "to": b, "amount": 4}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(transfer.status, 201);

    let everything = tail(&nats.url(), &[]);
    let types: Vec<&str> = everything
        .iter()
        .map(|event| event["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "account_opened",
            "deposited",
            "account_opened",
            "deposited",
            "transfer_debited",
            "transfer_credited"
        ]
    );
    let positions: Vec<u64> = everything
        .iter()
        .map(|event| event["position"].as_u64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]));
    let of_b = tail(&nats.url(), &["--account", &b]);
    assert_eq!(of_b.len(), 3);
    assert!(of_b.iter().all(|event| event["account_id"] == b.as_str()));
    let deposits = tail(&nats.url(), &["--type", "deposited"]);
    assert_eq!(deposits.len(), 2);
    assert_eq!(deposits[0]["data"], json!({"amount": 10}));
    let from = positions[4].to_string();
    let late = tail(&nats.url(), &["--from-position", &from]);
    assert_eq!(late.len(), 2);
    assert_eq!(late[1]["data"]["from"], a.as_str());

    // --follow prints what is committed after it started.
    let mut follower = Command::new(testkit::coffer_binary())
        .args(["events", "tail", "--follow", "--type", "withdrawn"])
        .env("COFFER_NATS_URL", nats.url())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let withdrawn = http
        .post(
            &format!("{}/v1/accounts/{b}/withdrawals", writer.url()),
            &json!({"amount": 3}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(withdrawn.status, 200);
    let stdout = follower.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().next().unwrap().unwrap()
    });
    let line = tokio::time::timeout(Duration::from_secs(10), line)
        .await
        .expect("the follower printed the new event")
        .unwrap();
    follower.kill().unwrap();
    let _ = follower.wait();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["position"].as_u64()),
        (Some("withdrawn"), withdrawn.body["position"].as_u64())
    );
}
