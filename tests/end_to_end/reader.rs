//! The reader as a process: exactly-once under crashes, replicas, NATS outages and
//! read-your-writes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventlog::{EventLog, StreamSettings};
use serde_json::json;
use testkit::NatsServer;

use crate::support::{self, assert_views_equal_replay, read_stream, Http, Replay};

/// Appends `accounts` histories of `per_account` events straight to the stream.
async fn populate(nats_url: &str, accounts: usize, per_account: usize) -> u64 {
    let client = async_nats::connect(nats_url).await.unwrap();
    let log = Arc::new(
        EventLog::open(client, &StreamSettings::default())
            .await
            .unwrap(),
    );
    fixtures::append_histories(&log, accounts, per_account, || {}).await;
    log.last_position().await.unwrap()
}

async fn applied(http: &Http, url: &str) -> u64 {
    http.metric(url, "coffer_projection_applied_position")
        .await
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_crashes_between_commit_and_ack_and_mid_catch_up_yet_views_equal_the_replay() {
    let nats = NatsServer::start();
    // A catch-up commits up to 19 000 events per transaction: 60 000 make at least four.
    let last = populate(&nats.url(), 150, 400).await;
    assert_eq!(last, 60_000);
    let data = tempfile::tempdir().unwrap();
    let http = Http::new();

    // 1. A failpoint aborts the reader right after its third commit, before the ack.
    let mut reader = support::reader(
        "crashy",
        &nats.url(),
        data.path(),
        &[("COFFER_FAILPOINT_CRASH_AFTER_COMMITS", "3".into())],
    );
    assert!(
        reader.wait_exit(Duration::from_secs(30)),
        "failpoint did not fire"
    );

    // 2. Restarted without it, then killed with SIGKILL in the middle of the catch-up.
    reader.set_env("COFFER_FAILPOINT_CRASH_AFTER_COMMITS", None);
    reader.restart();
    let url = reader.url();
    // The consumer still held the uncommitted deliveries of the aborted process: it is
    // re-created from the stored position instead of waiting out the ack wait. Wait for that
    // event itself (the applied position is loaded from the file at start, so it says nothing
    // about the consumer), then kill the reader while it catches up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let recreated = http
            .metric(&url, "coffer_projection_consumer_recreations_total")
            .await
            .unwrap_or(0.0);
        if recreated >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumer was not re-created after the crash"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reader.kill();

    // 3. Restarted again: it finishes and its views equal a replay of the stream.
    reader.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    while applied(&http, &url).await < last {
        assert!(Instant::now() < deadline, "reader did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replay = Replay::of(&read_stream(&nats.url()).await);
    assert_eq!(replay.accounts.len(), 150);
    assert_views_equal_replay(&http, &url, &replay, last).await;
    // Statements have one line per event: nothing applied twice, nothing lost.
    let (account, (_, version, _, _)) = replay.accounts.iter().next().unwrap();
    let page = http
        .get(&format!(
            "{url}/v1/accounts/{account}/transactions?limit=1000"
        ))
        .await
        .unwrap();
    assert_eq!(
        page.body["items"].as_array().unwrap().len() as u64,
        *version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_readers_with_different_names_see_the_same_views() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let (one_dir, two_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = support::reader("one", &nats.url(), one_dir.path(), &[]);
    let http = Http::new();
    let w = writer.url();
    let accounts: Vec<String> = (0..5).map(|_| support::unique("pair")).collect();
    for account in &accounts {
        http.open_account(&w, account).await;
        http.deposit(&w, account, &json!({"amount": 100}), None)
            .await
            .unwrap();
    }
    let transfer = http
        .post(
            &format!("{w}/v1/transfers"),
            &json!({"from": accounts[0], "to": accounts[1], "amount": 40}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(transfer.status, 201);
    // The second reader starts late and catches up from the start of the stream.
    let two = support::reader("two", &nats.url(), two_dir.path(), &[]);
    let transfer_id = transfer.body["transfer_id"].as_str().unwrap().to_string();
    let position = transfer.body["position"].as_u64().unwrap();
    let done = http
        .get(&format!(
            "{}/v1/transfers/{transfer_id}?min_position={position}",
            two.url()
        ))
        .await
        .unwrap();
    assert_eq!(
        (
            done.status,
            &done.body["status"],
            done.body["position"].as_u64()
        ),
        (200, &json!("completed"), Some(position))
    );
    let events = read_stream(&nats.url()).await;
    let last = events.last().unwrap().position;
    let replay = Replay::of(&events);
    for reader in [&one, &two] {
        assert_views_equal_replay(&http, &reader.url(), &replay, last).await;
    }
    let views: Vec<_> = futures::future::join_all([&one, &two].map(|reader| {
        let http = http.clone();
        let url = format!(
            "{}/v1/transfers/{transfer_id}?min_position={last}",
            reader.url()
        );
        async move { http.get(&url).await.unwrap().body }
    }))
    .await;
    assert_eq!(views[0], views[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_served_while_nats_is_down_and_resume_after() {
    let mut nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("r", &nats.url(), data.path(), &[]);
    let http = Http::new();
    let (w, r) = (writer.url(), reader.url());
    let account = support::unique("offline");
    http.open_account(&w, &account).await;
    let deposit = http
        .deposit(&w, &account, &json!({"amount": 9}), None)
        .await
        .unwrap();
    let position = deposit.body["position"].as_u64().unwrap();
    assert_eq!(
        http.get(&format!(
            "{r}/v1/accounts/{account}?min_position={position}"
        ))
        .await
        .unwrap()
        .status,
        200
    );

    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let offline = http
        .get(&format!("{r}/v1/accounts/{account}"))
        .await
        .unwrap();
    assert_eq!(
        (offline.status, offline.body["balance"].as_i64()),
        (200, Some(9))
    );
    assert_eq!(http.get(&format!("{r}/readyz")).await.unwrap().status, 503);
    // The probe Kubernetes routes reads by stays green: the views are local.
    let probe = http.get(&format!("{r}/readyz?reads=1")).await.unwrap();
    assert_eq!(probe.status, 200, "{:?}", probe.body);

    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let position = loop {
        let reply = http
            .deposit(&w, &account, &json!({"amount": 1}), Some("after"))
            .await;
        if let Ok(reply) = reply {
            if reply.status == 200 {
                break reply.body["position"].as_u64().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "writer did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let caught_up = http
        .get(&format!(
            "{r}/v1/accounts/{account}?min_position={position}"
        ))
        .await
        .unwrap();
    assert_eq!(
        (caught_up.status, caught_up.body["balance"].as_i64()),
        (200, Some(10))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_position_answers_once_applied_and_at_once_beyond_the_stream() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader(
        "r",
        &nats.url(),
        data.path(),
        &[("COFFER_MIN_POSITION_WAIT_MS", "400".into())],
    );
    support::wait_ready(&reader.url());
    let http = Http::new();
    let (w, r) = (writer.url(), reader.url());
    let account = support::unique("ryw");
    http.open_account(&w, &account).await;
    let mut waits = Vec::new();
    for amount in 1..=50i64 {
        let deposit = http
            .deposit(&w, &account, &json!({"amount": amount}), None)
            .await
            .unwrap();
        let position = deposit.body["position"].as_u64().unwrap();
        let started = Instant::now();
        let read = http
            .get(&format!(
                "{r}/v1/accounts/{account}?min_position={position}"
            ))
            .await
            .unwrap();
        waits.push(started.elapsed());
        assert_eq!(read.status, 200);
        assert_eq!(
            read.body["balance"].as_i64(),
            Some(amount * (amount + 1) / 2)
        );
    }
    waits.sort();
    println!(
        "read-your-writes: read after write, p50 {:?}, p99 {:?} (includes the HTTP round trip)",
        waits[waits.len() / 2],
        waits[waits.len() * 99 / 100]
    );
    let started = Instant::now();
    let stale = http
        .get(&format!("{r}/v1/accounts/{account}?min_position=99999999"))
        .await
        .unwrap();
    // Beyond the stream's end: stale at once, not after the 400 ms bound (a wait within the
    // stream is the reader unit test's).
    assert_eq!((stale.status, stale.code()), (503, "stale"));
    assert!(stale.body["detail"].as_str().unwrap().contains("beyond"));
    assert!(started.elapsed() < Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_query_route_is_served() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("routes", &nats.url(), data.path(), &[]);
    let http = Http::new();
    let document = http
        .get(&format!("{}/openapi.json", reader.url()))
        .await
        .unwrap()
        .body;
    let operations = testkit::documented_operations(&document);
    assert_eq!(
        operations,
        [
            "get /v1/accounts",
            "get /v1/accounts/{id}",
            "get /v1/accounts/{id}/balance",
            "get /v1/accounts/{id}/transactions",
            "get /v1/audit",
            "get /v1/holds/{id}",
            "get /v1/projection/rebuild",
            "get /v1/transactions/{id}",
            "get /v1/transfers/{id}",
            "post /v1/projection/rebuild",
        ]
    );
    for operation in operations
        .iter()
        .filter(|operation| operation.starts_with("get "))
    {
        let path = &operation["get ".len()..];
        let reply = http
            .get(&format!(
                "{}{}",
                reader.url(),
                path.replace("{id}", "nobody")
            ))
            .await
            .unwrap();
        // Routes with an id answer 404 for an unknown one (or 400: the balance needs a bound);
        // the others always answer.
        let expected: &[u16] = if path.contains("{id}") {
            &[404, 400]
        } else {
            &[200]
        };
        assert!(expected.contains(&reply.status), "{path}: {}", reply.status);
        assert_ne!(reply.code(), "not_found", "{path} is not routed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_reader_is_ready_only_once_caught_up_with_the_stream_at_its_start() {
    let nats = NatsServer::start();
    let last = populate(&nats.url(), 40, 250).await;
    let data = tempfile::tempdir().unwrap();
    let http = Http::new();
    let reader = support::reader(
        "late",
        &nats.url(),
        data.path(),
        &[("COFFER_READY_MAX_LAG", "0".into())],
    );
    let url = reader.url();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refused = 0;
    loop {
        // Both probes: the contract's, and the one Kubernetes routes reads by.
        let plain = support::status_of(&format!("{url}/readyz")).unwrap_or(0);
        let reads = support::status_of(&format!("{url}/readyz?reads=1")).unwrap_or(0);
        if plain == 200 || reads == 200 {
            // Ready means every event that existed at start is applied.
            assert!(
                applied(&http, &url).await >= last,
                "ready before catching up"
            );
            break;
        }
        refused += 1;
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(refused > 0, "ready at once: the test proves nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balance_as_of_a_position_or_a_time_comes_from_the_statement() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader(
        "as-of",
        &nats.url(),
        data.path(),
        &[("COFFER_MIN_POSITION_WAIT_MS", "300".into())],
    );
    let http = Http::new();
    let (w, r) = (writer.url(), reader.url());
    let account = support::unique("asof");
    let opened = http.open_account(&w, &account).await;
    let opened_at = opened.body["position"].as_u64().unwrap();
    let mut positions = Vec::new();
    for amount in [100, 50, 25] {
        let reply = http
            .deposit(&w, &account, &json!({"amount": amount}), None)
            .await
            .unwrap();
        positions.push(reply.body["position"].as_u64().unwrap());
    }
    let as_of = |query: String| {
        let http = http.clone();
        let url = format!("{r}/v1/accounts/{account}/balance?{query}");
        async move { http.get(&url).await.unwrap() }
    };
    let at_second = as_of(format!("position={}", positions[1])).await;
    assert_eq!(
        (at_second.status, at_second.body["balance"].as_i64()),
        (200, Some(150))
    );
    // Between two events: the earlier one's balance and position.
    let between = as_of(format!("position={}", positions[2] - 1)).await;
    assert_eq!(
        (
            between.body["balance"].as_i64(),
            between.body["position"].as_u64()
        ),
        (Some(150), Some(positions[1]))
    );
    let opening = as_of(format!("position={opened_at}")).await;
    assert_eq!(opening.body["balance"].as_i64(), Some(0));
    // By time: the second deposit's own time gives its balance.
    let time = at_second.body["time"].as_str().unwrap().to_owned();
    let by_time = as_of(format!("at={time}")).await;
    assert_eq!(
        (
            by_time.body["balance"].as_i64(),
            by_time.body["position"].as_u64()
        ),
        (Some(150), Some(positions[1]))
    );
    let before = as_of("at=2000-01-01T00:00:00Z".into()).await;
    assert_eq!((before.status, before.code()), (404, "account_not_found"));
    let bad = as_of("position=1&at=2000-01-01T00:00:00Z".into()).await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_request"));
    // A position the view has not applied is waited for, then 503 stale.
    let future = as_of(format!("position={}", positions[2] + 1_000)).await;
    assert_eq!((future.status, future.code()), (503, "stale"));
}

fn projection_status(nats_url: &str, reader_name: &str) -> serde_json::Value {
    let output = std::process::Command::new(testkit::coffer_binary())
        .args(["projection", "status", "--reader-name", reader_name])
        .env("COFFER_NATS_URL", nats_url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_status_shows_the_applied_position_and_the_lag() {
    let nats = NatsServer::start();
    let last = populate(&nats.url(), 5, 20).await;
    let data = tempfile::tempdir().unwrap();
    let http = Http::new();
    let mut reader = support::reader("status", &nats.url(), data.path(), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied(&http, &reader.url()).await < last {
        assert!(Instant::now() < deadline, "reader did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The ack follows the commit: wait for the consumer to show it.
    let caught_up = loop {
        let status = projection_status(&nats.url(), "status");
        if status["applied_position"].as_u64() == Some(last) {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the view caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(caught_up["applied_position"].as_u64(), Some(last));
    assert_eq!(caught_up["lag_events"].as_u64(), Some(0));
    // The reader stops; the stream moves on without it.
    reader.kill();
    let newer = populate(&nats.url(), 1, 7).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let behind = projection_status(&nats.url(), "status");
    assert_eq!(behind["applied_position"].as_u64(), Some(last));
    assert_eq!(behind["stream_last_position"].as_u64(), Some(newer));
    assert_eq!(behind["lag_events"].as_u64(), Some(7));
    assert!(behind["lag_seconds"].as_f64().unwrap() > 0.0);
}
