//! `coffer decode`: a stored MessagePack payload on stdin becomes JSON on stdout, as
//! `nats sub --translate 'coffer decode'` uses it.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use testkit::NatsServer;

use crate::support::{self, Http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_turns_a_stored_payload_into_json() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let http = Http::new();
    let account = support::unique("decode");
    let w = writer.url();
    http.open_account(&w, &account).await;
    http.deposit(
        &w,
        &account,
        &json!({"amount": 500, "reference": "invoice 7"}),
        None,
    )
    .await
    .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("COFFER_EVENTS")
        .await
        .unwrap();
    let stored = stream
        .get_last_raw_message_by_subject(&format!("coffer.events.{account}.deposited"))
        .await
        .unwrap();

    let mut child = Command::new(testkit::coffer_binary())
        .arg("decode")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&stored.payload)
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let decoded: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(decoded, json!({"amount": 500, "reference": "invoice 7"}));

    let mut garbage = Command::new(testkit::coffer_binary())
        .arg("decode")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    garbage
        .stdin
        .take()
        .unwrap()
        .write_all(b"\xc1not msgpack")
        .unwrap();
    let failed = garbage.wait_with_output().unwrap();
    assert!(!failed.status.success(), "garbage decoded");
    assert!(String::from_utf8_lossy(&failed.stderr).contains("decode MessagePack"));
}
