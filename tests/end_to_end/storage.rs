//! A reader whose disk fails: the view stops with a reason, reads say so, and it resumes by
//! itself, nothing lost or doubled, once the disk takes writes again.

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::NatsServer;

use crate::support::{self, assert_views_equal_replay, read_stream, Http, Reply};

async fn until(
    what: &str,
    bound: Duration,
    mut check: impl AsyncFnMut() -> Option<Reply>,
) -> Reply {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(reply) = check().await {
            return reply;
        }
        assert!(Instant::now() < deadline, "{what} within {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_stops_the_view_and_it_resumes_when_the_disk_recovers() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let failpoint = tempfile::tempdir().unwrap();
    let disk_full = failpoint.path().join("disk-full");
    let reader = support::reader(
        "disk",
        &nats.url(),
        data.path(),
        &[(
            "COFFER_FAILPOINT_STORAGE_FILE",
            disk_full.display().to_string(),
        )],
    );
    support::wait_ready(&reader.url());
    let (w, r) = (writer.url(), reader.url());
    let http = Http::new();
    let account = support::unique("disk");
    http.open_account(&w, &account).await;
    let first = http
        .deposit(&w, &account, &json!({"amount": 10}), None)
        .await
        .unwrap();
    let position = first.body["position"].as_u64().unwrap();
    let read = http
        .get(&format!(
            "{r}/v1/accounts/{account}?min_position={position}"
        ))
        .await
        .unwrap();
    assert_eq!(read.body["balance"], 10);

    // The disk fills up; the next commit fails.
    std::fs::write(&disk_full, b"").unwrap();
    for _ in 0..3 {
        let reply = http
            .deposit(&w, &account, &json!({"amount": 5}), None)
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    let ready = until(
        "readyz says the storage failed",
        Duration::from_secs(10),
        async || {
            let reply = http.get(&format!("{r}/readyz")).await.unwrap();
            (reply.code() == "view_failed").then_some(reply)
        },
    )
    .await;
    let detail = ready.body["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("storage"), "{detail}");
    let closed = until(
        "reads say the view is being reopened",
        Duration::from_secs(10),
        async || {
            let reply = http
                .get(&format!("{r}/v1/accounts/{account}"))
                .await
                .unwrap();
            (reply.status == 503).then_some(reply)
        },
    )
    .await;
    assert_eq!(closed.code(), "unavailable");
    assert!(closed.body["detail"].as_str().unwrap().contains("reopened"));

    // The disk is freed: the view reopens by itself and catches up.
    std::fs::remove_file(&disk_full).unwrap();
    let last = http
        .deposit(&w, &account, &json!({"amount": 1}), None)
        .await
        .unwrap();
    let last_position = last.body["position"].as_u64().unwrap();
    until("the view resumes", Duration::from_secs(30), async || {
        let reply = http.get(&format!("{r}/readyz")).await.unwrap();
        (reply.status == 200).then_some(reply)
    })
    .await;
    let read = http
        .get(&format!(
            "{r}/v1/accounts/{account}?min_position={last_position}"
        ))
        .await
        .unwrap();
    assert_eq!((read.status, &read.body["balance"]), (200, &json!(26)));
    let events = read_stream(&nats.url()).await;
    assert_views_equal_replay(&http, &r, &support::Replay::of(&events), last_position).await;
}
