//! Tamper evidence and holds over NATS: an event appended behind the service's back with a
//! wrong chain is named by `coffer verify`, and the reader counts it and stops serving that
//! account; the hold verbs work over the NATS micro service as over HTTP.

use std::process::Command;

use async_nats::HeaderMap;
use serde_json::{json, Value};
use testkit::NatsServer;

use crate::support::{self, Http};

fn verify(nats_url: &str, account: &str) -> (bool, String) {
    let output = Command::new(testkit::coffer_binary())
        .args(["verify", "--account", account])
        .env("COFFER_NATS_URL", nats_url)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_event_is_named_by_verify_and_costs_its_account_in_the_reader() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("integrity", &nats.url(), data.path(), &[]);
    let http = Http::new();
    let account = support::unique("chained");
    http.open_account(&writer.url(), &account).await;
    let deposit = http
        .deposit(&writer.url(), &account, &json!({"amount": 5}), None)
        .await
        .unwrap();
    assert_eq!(deposit.status, 200);
    let (intact, report) = verify(&nats.url(), &account);
    assert!(intact, "{report}");

    // Re-publish the deposit's payload as a new event with a forged chain value.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client.clone())
        .get_stream("COFFER_EVENTS")
        .await
        .unwrap();
    let stored = stream
        .get_last_raw_message_by_subject(&format!("coffer.events.{account}.deposited"))
        .await
        .unwrap();
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("Coffer-Event-Type", "deposited"),
        ("Coffer-Event-Version", "1"),
        ("Coffer-Account-Id", account.as_str()),
        ("Coffer-Chain", &"f".repeat(64)),
        ("Content-Type", "application/msgpack"),
    ] {
        headers.insert(name, value);
    }
    let reply = client
        .request_with_headers(
            format!("coffer.append.{account}.deposited"),
            headers,
            stored.payload.clone(),
        )
        .await
        .unwrap();
    let forged: Value = serde_json::from_slice(&reply.payload).unwrap();
    let position = forged["seq"].as_u64().expect("the forged event was stored");

    let (intact, report) = verify(&nats.url(), &account);
    assert!(!intact, "verify missed the forgery: {report}");
    assert!(
        report.contains(&format!("{account}: chain broken at position {position}")),
        "{report}"
    );
    // The reader counts the break and stops serving that account (its balance would include
    // the forgery); the others are served and the reader stays ready.
    let read = http
        .get(&format!(
            "{}/v1/accounts/{account}?min_position={position}",
            reader.url()
        ))
        .await
        .unwrap();
    assert_eq!(read.status, 500, "{:?}", read.body);
    assert_eq!(read.body["code"], "account_unreadable");
    assert!(
        read.body["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("position {position}")),
        "{:?}",
        read.body
    );
    assert_eq!(
        http.metric(&reader.url(), "coffer_reader_chain_breaks_total")
            .await,
        Some(1.0)
    );
    let other = support::unique("other");
    let opened = http.open_account(&writer.url(), &other).await;
    let read = http
        .get(&format!(
            "{}/v1/accounts/{other}?min_position={}",
            reader.url(),
            opened.body["position"]
        ))
        .await
        .unwrap();
    assert_eq!(read.status, 200, "{:?}", read.body);
    assert_eq!(
        support::status_of(&format!("{}/readyz", reader.url())).unwrap(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_placed_captured_and_voided_over_nats() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let http = Http::new();
    let (from, to) = (support::unique("from"), support::unique("to"));
    for account in [&from, &to] {
        http.open_account(&writer.url(), account).await;
    }
    http.deposit(&writer.url(), &from, &json!({"amount": 100}), None)
        .await
        .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let request = |verb: &str, body: Value| {
        let client = client.clone();
        let subject = format!("coffer.cmd.{from}.{verb}");
        async move {
            let reply = client
                .request(subject, serde_json::to_vec(&body).unwrap().into())
                .await
                .unwrap();
            let code = reply
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Service-Error-Code"))
                .map(|code| code.as_str().to_owned());
            (
                code,
                serde_json::from_slice::<Value>(&reply.payload).unwrap(),
            )
        }
    };
    let (error, placed) = request("hold", json!({"to": to, "amount": 70, "hold_id": "nh-1"})).await;
    assert_eq!((error, placed["status"].as_str()), (None, Some("held")));
    let (error, refused) = request("hold", json!({"to": to, "amount": 31})).await;
    assert_eq!(
        (error.as_deref(), refused["code"].as_str()),
        (Some("422"), Some("insufficient_funds"))
    );
    let (error, captured) = request("capture", json!({"hold_id": "nh-1", "amount": 20})).await;
    assert_eq!((error, captured["amount"].as_u64()), (None, Some(20)));
    let (error, settled) = request("void", json!({"hold_id": "nh-1"})).await;
    assert_eq!(
        (error.as_deref(), settled["code"].as_str()),
        (Some("409"), Some("hold_settled"))
    );
    let (error, unknown) = request("void", json!({"hold_id": "nobody"})).await;
    assert_eq!(
        (error.as_deref(), unknown["code"].as_str()),
        (Some("404"), Some("hold_not_found"))
    );
    let (error, second) = request("hold", json!({"to": to, "amount": 80, "hold_id": "nh-2"})).await;
    assert_eq!((error, second["status"].as_str()), (None, Some("held")));
    let (error, voided) = request("void", json!({"hold_id": "nh-2"})).await;
    assert_eq!((error, voided["status"].as_str()), (None, Some("voided")));
    // 100 - 20 captured; nothing held: all 80 can leave.
    let withdrawn = http
        .post(
            &format!("{}/v1/accounts/{from}/withdrawals", writer.url()),
            &json!({"amount": 80}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(withdrawn.status, 200, "{:?}", withdrawn.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_readers_and_setup_refuse_an_event_stream_with_a_retention_limit() {
    // An operator's `max_age` on the event stream would age accounts' events and the markers
    // that keep transfers once out of the log: money disappears, an id opens again. The
    // services and `coffer setup` refuse to run on it and say what to change.
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let context = async_nats::jetstream::new(client);
    let aging = async_nats::jetstream::stream::Config {
        max_age: std::time::Duration::from_secs(3_600),
        ..eventlog::StreamSettings::default().config()
    };
    context.create_stream(aging).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    for args in [&["writer"][..], &["reader"], &["setup"]] {
        let (succeeded, stderr) = support::run_to_exit(
            &nats.url(),
            args,
            &[("COFFER_DATA_DIR", data.path().display().to_string())],
        );
        assert!(!succeeded, "coffer {args:?} ran on an aging stream");
        assert!(
            stderr.contains("max_age") && stderr.contains("nats stream edit"),
            "coffer {args:?} did not say why: {stderr}"
        );
    }
    // Without the limit they run.
    let mut stream = context.get_stream("COFFER_EVENTS").await.unwrap();
    let mut fixed = stream.info().await.unwrap().config.clone();
    fixed.max_age = std::time::Duration::ZERO;
    context.update_stream(fixed).await.unwrap();
    let writer = support::writer("w", &nats.url(), &[]);
    let http = Http::new();
    http.open_account(&writer.url(), &support::unique("kept"))
        .await;
}
