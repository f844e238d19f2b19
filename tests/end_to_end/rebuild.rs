//! `coffer projection rebuild`: a fresh view built beside the serving one and swapped in while
//! reads and writes go on; no read fails and no read goes back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventlog::{EventLog, StreamSettings};
use serde_json::json;
use testkit::NatsServer;

use crate::support::{self, assert_views_equal_replay, read_stream, Http, Replay};

async fn applied(http: &Http, url: &str) -> u64 {
    http.metric(url, "coffer_projection_applied_position")
        .await
        .unwrap_or(0.0) as u64
}

/// The readers' consumers on the event stream (the writers' hold backstop is not one).
async fn consumer_names(nats_url: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let client = async_nats::connect(nats_url).await.unwrap();
    let context = async_nats::jetstream::new(client);
    let stream = context.get_stream("COFFER_EVENTS").await.unwrap();
    let names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    names
        .into_iter()
        .filter(|name| name != writer::expiry::BACKSTOP_CONSUMER_NAME)
        .collect()
}

/// Runs `coffer projection rebuild` against the reader at `url`, off the async runtime.
pub(crate) async fn rebuild(url: &str) -> std::process::Output {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(testkit::coffer_binary())
            .args(["projection", "rebuild", "--reader-url", &url])
            .env_remove("COFFER_HTTP_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// What the loop of reads saw.
#[derive(Default)]
struct ReadLoop {
    reads: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

impl ReadLoop {
    fn fail(&self, why: String) {
        self.failures.lock().unwrap().push(why);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_swaps_in_a_fresh_view_without_a_failed_or_regressing_read() {
    let nats = NatsServer::start();
    // A history to replay, so the rebuild takes a while.
    {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let log = Arc::new(
            EventLog::open(client, &StreamSettings::default())
                .await
                .unwrap(),
        );
        fixtures::append_histories(&log, 20, 150, || {}).await;
    }
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let mut reader = support::reader("rb", &nats.url(), data.path(), &[]);
    support::wait_ready(&reader.url());
    let http = Http::new();
    let account = support::unique("rebuild");
    let opened = http.open_account(&writer.url(), &account).await;
    assert_eq!(opened.status, 201);
    let visible = http
        .get(&format!(
            "{}/v1/accounts/{account}?min_position={}",
            reader.url(),
            opened.body["position"]
        ))
        .await
        .unwrap();
    assert_eq!(visible.status, 200, "{:?}", visible.body);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(ReadLoop::default());
    // Writes go on during the rebuild; each acknowledged deposit is then read with its
    // position as min_position, and must be there.
    let writes = {
        let (http, stop, seen) = (http.clone(), stop.clone(), seen.clone());
        let (writer_url, reader_url, account) = (writer.url(), reader.url(), account.clone());
        tokio::spawn(async move {
            let mut deposited = 0;
            while !stop.load(Ordering::Relaxed) {
                let reply = http
                    .deposit(&writer_url, &account, &json!({"amount": 1}), None)
                    .await
                    .unwrap();
                assert_eq!(reply.status, 200, "{:?}", reply.body);
                deposited += 1;
                let position = reply.body["position"].as_u64().unwrap();
                let read = http
                    .get(&format!(
                        "{reader_url}/v1/accounts/{account}?min_position={position}"
                    ))
                    .await;
                match read {
                    Ok(read) if read.status == 200 => {
                        let balance = read.body["balance"].as_i64().unwrap();
                        if balance < deposited {
                            seen.fail(format!("read-your-write: {balance} < {deposited}"));
                        }
                    }
                    Ok(read) => seen.fail(format!(
                        "min_position read: {} {:?}",
                        read.status, read.body
                    )),
                    Err(error) => seen.fail(format!("min_position read: {error}")),
                }
                seen.reads.fetch_add(1, Ordering::Relaxed);
            }
            deposited
        })
    };
    // More writers on the same account, so commits keep landing while the views swap.
    let busy: Vec<_> = (0..3)
        .map(|_| {
            let (http, stop) = (http.clone(), stop.clone());
            let (writer_url, account) = (writer.url(), account.clone());
            tokio::spawn(async move {
                let mut deposited = 0;
                while !stop.load(Ordering::Relaxed) {
                    let reply = http
                        .deposit(&writer_url, &account, &json!({"amount": 1}), None)
                        .await
                        .unwrap();
                    assert_eq!(reply.status, 200, "{:?}", reply.body);
                    deposited += 1;
                }
                deposited
            })
        })
        .collect();
    // Plain reads: the stated position and the balance never go back.
    let reads = {
        let (stop, seen) = (stop.clone(), seen.clone());
        let (reader_url, account) = (reader.url(), account.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut last_position, mut last_balance) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let response = client
                    .get(format!("{reader_url}/v1/accounts/{account}"))
                    .send()
                    .await;
                let response = match response {
                    Ok(response) => response,
                    Err(error) => {
                        seen.fail(format!("read: {error}"));
                        continue;
                    }
                };
                let position: u64 = response.headers()["x-coffer-position"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap();
                if status != 200 {
                    seen.fail(format!("read: {status} {body}"));
                    continue;
                }
                let balance = body["balance"].as_i64().unwrap();
                if position < last_position || balance < last_balance {
                    seen.fail(format!(
                        "went back: position {last_position} -> {position}, balance {last_balance} -> {balance}"
                    ));
                }
                (last_position, last_balance) = (position, balance);
                seen.reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(300)).await;
    let reads_before = seen.reads.load(Ordering::Relaxed);
    let output = rebuild(&reader.url()).await;
    assert!(
        output.status.success(),
        "rebuild failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["state"], "completed", "{status}");
    assert!(
        status["events_applied"].as_u64().unwrap() >= 3_000,
        "{status}"
    );
    let reads_during = seen.reads.load(Ordering::Relaxed) - reads_before;
    // Keep writing and reading a little after the swap, on the moved engine.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut deposited = writes.await.unwrap();
    for task in busy {
        deposited += task.await.unwrap();
    }
    reads.await.unwrap();
    let failures = seen.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed reads: {failures:?}",
        failures.len()
    );
    assert!(reads_during > 0, "no read ran during the rebuild");
    assert!(deposited > 0);

    // The rebuilt view equals the stream, lives in views.redb and on the reader's consumer.
    let events = read_stream(&nats.url()).await;
    let last = events.last().unwrap().position;
    assert_views_equal_replay(&http, &reader.url(), &Replay::of(&events), last).await;
    assert_eq!(
        consumer_names(&nats.url()).await,
        vec!["rb".to_string()],
        "the old and the rebuild consumers are gone, the reader's own is back"
    );
    let mut files: Vec<String> = std::fs::read_dir(data.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["views.redb"]);
    let rebuild_status = http
        .get(&format!("{}/v1/projection/rebuild", reader.url()))
        .await
        .unwrap();
    assert_eq!(rebuild_status.body["state"], "completed");

    // A restart serves the rebuilt file at once; a half-built file left by a crash is removed.
    reader.kill();
    std::fs::write(data.path().join("views.rebuild.redb"), b"half built").unwrap();
    reader.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied(&http, &reader.url()).await < last {
        assert!(
            Instant::now() < deadline,
            "restarted reader did not load the view"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!data.path().join("views.rebuild.redb").exists());
    let reply = http
        .get(&format!("{}/v1/accounts/{account}", reader.url()))
        .await
        .unwrap();
    assert_eq!(reply.body["balance"].as_i64(), Some(deposited));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_behind_the_token_and_without_a_reader() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader(
        "tok",
        &nats.url(),
        data.path(),
        &[("COFFER_HTTP_TOKEN", "s3cret".to_string())],
    );
    support::wait_ready(&reader.url());
    let run = |extra: &[&str]| {
        std::process::Command::new(testkit::coffer_binary())
            .args(["projection", "rebuild", "--reader-url", &reader.url()])
            .args(extra)
            .env_remove("COFFER_HTTP_TOKEN")
            .output()
            .unwrap()
    };
    let refused = run(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let done = run(&["--http-token", "s3cret"]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(status["state"], "completed");

    let nowhere = std::process::Command::new(testkit::coffer_binary())
        .args(["projection", "rebuild", "--reader-url"])
        .arg(format!("http://127.0.0.1:{}", testkit::free_port()))
        .output()
        .unwrap();
    assert!(!nowhere.status.success());
    assert!(String::from_utf8_lossy(&nowhere.stderr).contains("reach the reader"));
}

/// The runbook's repair: the stream was re-created, so the view is ahead of it and stopped;
/// a rebuild replaces it with a view of the new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_repairs_a_view_ahead_of_a_re_created_stream() {
    repair_after_re_creation(5, 10, 1, 3).await;
}

/// The same when the new stream has grown past the view's position: the positions look
/// plausible, the stream's creation time tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_notices_a_re_created_stream_that_grew_past_it_and_a_rebuild_repairs_it() {
    repair_after_re_creation(2, 5, 6, 10).await;
}

async fn repair_after_re_creation(
    old_accounts: usize,
    old_each: usize,
    new_accounts: usize,
    new_each: usize,
) {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let populate = |accounts, per_account| {
        let client = client.clone();
        async move {
            let log = Arc::new(
                EventLog::open(client, &StreamSettings::default())
                    .await
                    .unwrap(),
            );
            fixtures::append_histories(&log, accounts, per_account, || {}).await;
            log.last_position().await.unwrap()
        }
    };
    let old_last = populate(old_accounts, old_each).await;
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("rp", &nats.url(), data.path(), &[]);
    support::wait_ready(&reader.url());
    let http = Http::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied(&http, &reader.url()).await < old_last {
        assert!(Instant::now() < deadline, "reader did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    async_nats::jetstream::new(client.clone())
        .delete_stream("COFFER_EVENTS")
        .await
        .unwrap();
    let new_last = populate(new_accounts, new_each).await;
    assert_eq!(
        new_last < old_last,
        new_accounts * new_each < old_accounts * old_each
    );
    let failed = loop {
        let ready = http.get(&format!("{}/readyz", reader.url())).await.unwrap();
        if ready.code() == "view_failed" {
            break ready;
        }
        assert!(
            Instant::now() < deadline,
            "the view did not stop: {:?}",
            ready.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(failed.body["detail"]
        .as_str()
        .unwrap()
        .contains("rebuild the view"));

    let output = rebuild(&reader.url()).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ready = http.get(&format!("{}/readyz", reader.url())).await.unwrap();
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    let events = read_stream(&nats.url()).await;
    assert_views_equal_replay(&http, &reader.url(), &Replay::of(&events), new_last).await;
    assert_eq!(applied(&http, &reader.url()).await, new_last);
}
