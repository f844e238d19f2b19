//! A 3-node JetStream cluster with the stream at R3: the stream leader is killed with SIGKILL
//! under a deposit load and restarted. No acknowledged deposit is lost or duplicated, the writer
//! keeps serving after a stall we measure, and the reader's views equal a replay of the stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::NatsCluster;

use crate::support::{self, assert_views_equal_replay, read_stream, Http, Replay};

const LOAD_TASKS: usize = 4;

pub async fn stream_leader(urls: &str) -> Option<String> {
    let servers: Vec<async_nats::ServerAddr> =
        urls.split(',').filter_map(|url| url.parse().ok()).collect();
    let client = async_nats::connect(servers).await.ok()?;
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        client.request("$JS.API.STREAM.INFO.COFFER_EVENTS", "".into()),
    )
    .await
    .ok()?
    .ok()?;
    let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    info["cluster"]["leader"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_under_load_loses_and_duplicates_nothing() {
    let mut cluster = NatsCluster::start();
    let urls = cluster.urls();
    let replicas = [("COFFER_STREAM_REPLICAS", "3".to_string())];
    let writer = support::writer("cluster-writer", &urls, &replicas);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("cluster-reader", &urls, data.path(), &replicas);
    let http = Http::new();
    let w = writer.url();
    let accounts: Vec<String> = (0..LOAD_TASKS)
        .map(|index| support::unique(&format!("r3-{index}")))
        .collect();
    for account in &accounts {
        let reply = http
            .post(
                &format!("{w}/v1/accounts"),
                &json!({"account_id": account, "currency": "EUR"}),
                None,
            )
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{:?}", reply.body);
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acknowledged: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let successes: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut tasks = Vec::new();
    for (index, account) in accounts.iter().enumerate() {
        let (http, w, account) = (http.clone(), w.clone(), account.clone());
        let (stop, acknowledged, successes) =
            (stop.clone(), acknowledged.clone(), successes.clone());
        tasks.push(tokio::spawn(async move {
            let mut operation = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("load-{index}-{operation}");
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let reply = http
                        .post(
                            &format!("{w}/v1/accounts/{account}/deposits"),
                            // The reference names the deposit, to count it in the stream.
                            &json!({"amount": 1, "reference": key}),
                            Some(&key),
                        )
                        .await;
                    if let Ok(reply) = reply {
                        if reply.status == 200 {
                            break;
                        }
                        assert!(
                            reply.status >= 500,
                            "unexpected {} {:?}",
                            reply.status,
                            reply.body
                        );
                    }
                    assert!(Instant::now() < deadline, "deposit {key} never succeeded");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                acknowledged.lock().unwrap().insert(key, account.clone());
                successes.lock().unwrap().push(Instant::now());
                operation += 1;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = stream_leader(&urls).await.expect("stream has a leader");
    let killed_at = Instant::now();
    cluster
        .node_by_name(&leader)
        .expect("leader is one of ours")
        .kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.node_by_name(&leader).unwrap().restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }

    let mut times = successes.lock().unwrap().clone();
    times.sort();
    let after_kill: Vec<&Instant> = times.iter().filter(|time| **time > killed_at).collect();
    assert!(
        !after_kill.is_empty(),
        "the writer never served again after the leader died"
    );
    let stall = times
        .windows(2)
        .map(|pair| pair[1].duration_since(pair[0]))
        .max()
        .unwrap_or_default();
    println!(
        "cluster: killed leader {leader}; {} deposits acknowledged; longest gap between acknowledgements {stall:?}; first after kill {:?}",
        times.len(),
        after_kill[0].duration_since(killed_at)
    );

    let events = read_stream(&urls).await;
    let replay = Replay::of(&events);
    let seen = &replay.references;
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    for key in acknowledged.keys() {
        assert_eq!(
            seen.get(key).copied().unwrap_or(0),
            1,
            "acknowledged deposit {key} is in the stream {:?} times",
            seen.get(key)
        );
    }
    assert!(
        seen.values().all(|count| *count == 1),
        "a deposit was appended twice"
    );
    for account in &accounts {
        let count = acknowledged
            .values()
            .filter(|owner| *owner == account)
            .count() as i64;
        assert_eq!(replay.accounts[account].0, count, "{account}");
    }
    let last = events.last().unwrap().position;
    assert_views_equal_replay(&http, &reader.url(), &replay, last).await;
}
