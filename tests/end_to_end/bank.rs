//! The bank workload (after Jepsen's "bank" test): concurrent clients move money between
//! accounts over HTTP and NATS with transfers and multi-posting transactions, retrying with the
//! same id, and reverse some of what went through (with an Idempotency-Key), while a fault
//! strikes: a
//! writer process killed with SIGKILL and restarted, nats-server killed and restarted,
//! nats-server frozen (SIGSTOP) for five seconds, or, on a 3-node cluster with the streams at
//! R3, the stream leader killed and restarted. Transfers are atomic: each one in the stream has exactly one
//! debit and exactly one credit, every acknowledged one is there, every refused one is not;
//! every transaction in the stream has all its parts, once; nothing is reversed twice; money
//! is conserved, no balance is below its limit, and the views equal a replay.
//!
//! `COFFER_SOAK=1` (`just soak`) runs ten times as many operations.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use testkit::{NatsCluster, NatsServer};

use crate::support::{self, assert_views_equal_replay, read_stream, Http, Replay};

const EUR_ACCOUNTS: usize = 20;
const CLIENTS: usize = 8;
const SEED_DEPOSIT: i64 = 10_000;
const ATTEMPTS_MAX: usize = 20;

#[derive(Default)]
struct Ledger {
    /// Transfers the system acknowledged (201), with their answer.
    acknowledged: HashMap<String, Value>,
    /// Transfers refused (4xx), with the problem code: none of them may be in the stream.
    refused: HashMap<String, String>,
    /// Transfers never answered definitely despite retries: may or may not exist.
    unknown: HashSet<String>,
    retried_acknowledged: usize,
    /// Reversals acknowledged (201): original -> the reversal's transaction id.
    reversed: HashMap<String, String>,
    /// Reversals refused, with the code (`insufficient_funds`, `already_reversed`).
    reversals_refused: HashMap<String, String>,
    /// When each acknowledgement arrived: the longest gap is the stall a fault caused.
    acknowledged_at: Vec<Instant>,
}

/// What strikes mid-run.
#[derive(Debug, Clone, Copy)]
enum Fault {
    WriterKilled,
    NatsKilled,
    NatsPaused,
    LeaderKilled,
}

/// One server, or a 3-node cluster for the leader fault.
enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Nats {
    fn urls(&self) -> String {
        match self {
            Nats::Single(server) => server.url(),
            Nats::Cluster(cluster) => cluster.urls(),
        }
    }

    fn single(&mut self) -> &mut NatsServer {
        match self {
            Nats::Single(server) => server,
            Nats::Cluster(_) => panic!("a single-server fault on a cluster"),
        }
    }
}

enum Channel {
    Http(Vec<String>),
    Nats(async_nats::Client),
}

/// Sends one transfer (a request with `transfer_id`) or transaction (with `transaction_id`)
/// once; returns (status, body) when an answer came.
async fn send(
    channel: &Channel,
    http: &Http,
    request: &Value,
    attempt: usize,
) -> Option<(u16, Value)> {
    let transaction = request.get("postings").is_some();
    match channel {
        Channel::Http(writers) => {
            let path = if transaction {
                "transactions"
            } else {
                "transfers"
            };
            let url = format!("{}/v1/{path}", writers[attempt % writers.len()]);
            let reply = http.post(&url, request, None).await.ok()?;
            Some((reply.status, reply.body))
        }
        Channel::Nats(client) => {
            let (subject, body) = if transaction {
                let from = request["postings"][0]["from"].as_str()?;
                (format!("coffer.cmd.{from}.transaction"), request.clone())
            } else {
                let from = request["from"].as_str()?;
                let body = json!({"to": request["to"], "amount": request["amount"], "transfer_id": request["transfer_id"]});
                (format!("coffer.cmd.{from}.transfer"), body)
            };
            let future = client.request(subject, serde_json::to_vec(&body).ok()?.into());
            let message = tokio::time::timeout(Duration::from_secs(5), future)
                .await
                .ok()?
                .ok()?;
            let status = match message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Service-Error-Code"))
            {
                Some(code) => code.as_str().parse().unwrap_or(500),
                None => 201,
            };
            Some((
                status,
                serde_json::from_slice(&message.payload).unwrap_or(Value::Null),
            ))
        }
    }
}

async fn client(
    seed: u64,
    operations: usize,
    channel: Channel,
    targets: Arc<Vec<String>>,
    senders: Arc<Vec<String>>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let http = Http::new();
    let mut random = rand::rngs::StdRng::seed_from_u64(seed);
    // What this client saw go through, to reverse some of it: (id, is a transaction).
    let mut done: Vec<(String, bool)> = Vec::new();
    for operation in 0..operations {
        if !done.is_empty() && random.random_bool(0.1) {
            let (original, transaction) = done.swap_remove(random.random_range(0..done.len()));
            reverse(&http, &channel, &original, transaction, &ledger).await;
            continue;
        }
        let pick = |random: &mut rand::rngs::StdRng| {
            let from = senders[random.random_range(0..senders.len())].clone();
            let to = loop {
                let candidate = targets[random.random_range(0..targets.len())].clone();
                if candidate != from {
                    break candidate;
                }
            };
            (from, to)
        };
        let is_transaction = random.random_bool(0.3);
        let transfer_id = format!("bank-{seed}-{operation}");
        let request = if is_transaction {
            let count = random.random_range(2..=4);
            let postings: Vec<Value> = (0..count)
                .map(|_| {
                    let (from, to) = pick(&mut random);
                    json!({"from": from, "to": to, "amount": random.random_range(1..=400)})
                })
                .collect();
            json!({"transaction_id": transfer_id, "postings": postings})
        } else {
            let (from, to) = pick(&mut random);
            json!({"transfer_id": transfer_id, "from": from, "to": to, "amount": random.random_range(1..=700)})
        };
        let mut outcome = None;
        for attempt in 0..ATTEMPTS_MAX {
            match send(&channel, &http, &request, attempt).await {
                Some((201, body)) => {
                    assert_eq!(body["status"], "completed", "{body}");
                    outcome = Some(Ok(body));
                    break;
                }
                Some((status, body))
                    if matches!(
                        (status, body["code"].as_str().unwrap_or("")),
                        (422, "insufficient_funds")
                            | (404, "account_not_found")
                            | (409, "account_closed" | "currency_mismatch")
                    ) =>
                {
                    if is_transaction {
                        assert!(body["posting"].is_u64(), "no posting named: {body}");
                    }
                    outcome = Some(Err(body["code"].as_str().unwrap_or("").to_owned()));
                    break;
                }
                Some((status, body)) if status < 500 => {
                    panic!("unexpected {status} {body} for {request}")
                }
                // Back off: a restarting nats-server takes a second or two.
                _ => {
                    let pause = 100 * (attempt as u64 + 1);
                    tokio::time::sleep(Duration::from_millis(pause.min(1_000))).await
                }
            }
        }
        match outcome {
            Some(Ok(body)) => {
                {
                    let mut ledger = ledger.lock().unwrap();
                    ledger
                        .acknowledged
                        .insert(transfer_id.clone(), body.clone());
                    ledger.acknowledged_at.push(Instant::now());
                }
                done.push((transfer_id.clone(), is_transaction));
                // Some clients retry an acknowledged transfer on purpose: same answer, no effect.
                if random.random_bool(0.1) {
                    if let Some((status, repeated)) =
                        send(&channel, &http, &request, operation).await
                    {
                        assert!(
                            status == 201 || status >= 500,
                            "retry gave {status} {repeated}"
                        );
                        if status == 201 {
                            assert_eq!(
                                repeated["position"], body["position"],
                                "retry appended again"
                            );
                            ledger.lock().unwrap().retried_acknowledged += 1;
                        }
                    }
                }
            }
            Some(Err(code)) => {
                ledger.lock().unwrap().refused.insert(transfer_id, code);
            }
            None => {
                ledger.lock().unwrap().unknown.insert(transfer_id);
            }
        }
    }
}

/// Reverses `original` over HTTP with an Idempotency-Key, retrying until a definite answer.
async fn reverse(
    http: &Http,
    channel: &Channel,
    original: &str,
    transaction: bool,
    ledger: &Mutex<Ledger>,
) {
    let Channel::Http(writers) = channel else {
        // Reversals are HTTP only; NATS clients leave theirs to the HTTP ones.
        return;
    };
    let kind = if transaction {
        "transactions"
    } else {
        "transfers"
    };
    let key = format!("reverse-{original}");
    for attempt in 0..ATTEMPTS_MAX {
        let url = format!(
            "{}/v1/{kind}/{original}/reverse",
            writers[attempt % writers.len()]
        );
        match http
            .post(&url, &json!({"reason": "bank"}), Some(&key))
            .await
        {
            Ok(reply) if reply.status == 201 => {
                assert_eq!(reply.body["reverses"], original, "{:?}", reply.body);
                let reversal = reply.body["transaction_id"].as_str().unwrap().to_owned();
                ledger
                    .lock()
                    .unwrap()
                    .reversed
                    .insert(original.to_owned(), reversal);
                return;
            }
            Ok(reply) if matches!(reply.code(), "insufficient_funds" | "account_closed") => {
                ledger
                    .lock()
                    .unwrap()
                    .reversals_refused
                    .insert(original.to_owned(), reply.code().to_owned());
                return;
            }
            Ok(reply) if reply.status < 500 => {
                panic!("reversal of {original}: {} {:?}", reply.status, reply.body)
            }
            _ => {
                let pause = 100 * (attempt as u64 + 1);
                tokio::time::sleep(Duration::from_millis(pause.min(1_000))).await
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_workload_conserves_money_through_a_writer_crash() {
    bank(Fault::WriterKilled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_workload_conserves_money_through_nats_killed_and_restarted() {
    bank(Fault::NatsKilled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_workload_conserves_money_through_nats_frozen_for_five_seconds() {
    bank(Fault::NatsPaused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_workload_conserves_money_through_the_r3_stream_leader_killed() {
    bank(Fault::LeaderKilled).await;
}

async fn bank(fault: Fault) {
    let soak = std::env::var("COFFER_SOAK").is_ok();
    let operations = if soak { 400 } else { 40 };
    let mut nats = match fault {
        Fault::LeaderKilled => Nats::Cluster(NatsCluster::start()),
        _ => Nats::Single(NatsServer::start()),
    };
    let urls = nats.urls();
    let replicas = match fault {
        Fault::LeaderKilled => vec![("COFFER_STREAM_REPLICAS", "3".to_string())],
        _ => Vec::new(),
    };
    let mut first = support::writer("writer-a", &urls, &replicas);
    let second = support::writer("writer-b", &urls, &replicas);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("bank-reader", &urls, data.path(), &replicas);
    let http = Http::new();
    let (a, b) = (first.url(), second.url());

    let open = |id: &str, currency: &str| {
        let http = http.clone();
        let body = json!({"account_id": id, "currency": currency, "overdraft_limit": 0});
        let url = format!("{a}/v1/accounts");
        async move { assert_eq!(http.post(&url, &body, None).await.unwrap().status, 201) }
    };
    let eur: Vec<String> = (0..EUR_ACCOUNTS)
        .map(|index| support::unique(&format!("eur{index}")))
        .collect();
    for account in &eur {
        open(account, "EUR").await;
        let deposit = http
            .post(
                &format!("{a}/v1/accounts/{account}/deposits"),
                &json!({"amount": SEED_DEPOSIT}),
                None,
            )
            .await
            .unwrap();
        assert_eq!(deposit.status, 200);
    }
    let usd: Vec<String> = (0..2)
        .map(|index| support::unique(&format!("usd{index}")))
        .collect();
    let closed: Vec<String> = (0..2)
        .map(|index| support::unique(&format!("closed{index}")))
        .collect();
    for account in &usd {
        open(account, "USD").await;
    }
    for account in &closed {
        open(account, "EUR").await;
        let close = http
            .post(
                &format!("{a}/v1/accounts/{account}/close"),
                &json!({}),
                None,
            )
            .await
            .unwrap();
        assert_eq!(close.status, 200);
    }
    // Targets: mostly EUR accounts, some that must be refused.
    let mut targets = eur.clone();
    targets.extend(usd.iter().cloned());
    targets.extend(closed.iter().cloned());
    targets.extend((0..2).map(|index| support::unique(&format!("ghost{index}"))));
    let targets = Arc::new(targets);
    let senders = Arc::new(eur.clone());
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    let servers: Vec<async_nats::ServerAddr> =
        urls.split(',').map(|url| url.parse().unwrap()).collect();
    let nats_client = async_nats::connect(servers).await.unwrap();
    let mut clients = Vec::new();
    for seed in 0..CLIENTS as u64 {
        let channel = if seed % 2 == 0 {
            Channel::Http(vec![a.clone(), b.clone()])
        } else {
            Channel::Nats(nats_client.clone())
        };
        clients.push(tokio::spawn(client(
            seed,
            operations,
            channel,
            targets.clone(),
            senders.clone(),
            ledger.clone(),
        )));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(if soak { 5_000 } else { 700 })).await;
    match fault {
        Fault::WriterKilled => {
            first.kill();
            tokio::time::sleep(Duration::from_millis(800)).await;
            first.restart();
        }
        Fault::NatsKilled => {
            nats.single().kill();
            tokio::time::sleep(Duration::from_millis(800)).await;
            nats.single().restart();
        }
        Fault::NatsPaused => {
            nats.single().pause();
            tokio::time::sleep(Duration::from_secs(5)).await;
            nats.single().resume();
        }
        Fault::LeaderKilled => {
            let leader = crate::cluster::stream_leader(&urls)
                .await
                .expect("the stream has a leader");
            let Nats::Cluster(cluster) = &mut nats else {
                unreachable!("the leader fault runs on a cluster")
            };
            let node = cluster.node_by_name(&leader).expect("the leader is a node");
            node.kill();
            tokio::time::sleep(Duration::from_millis(800)).await;
            node.restart();
        }
    }
    for client in clients {
        client.await.unwrap();
    }
    let finished = Instant::now();

    // No saga to wait for: once every client has its answer, the stream is final.
    let events = read_stream(&urls).await;
    let replay = Replay::of(&events);
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        ledger.acknowledged.len() > CLIENTS * operations / 4,
        "too few transfers went through"
    );
    for (transfer_id, debits) in &replay.debits {
        assert_eq!(*debits, 1, "{transfer_id} debited {debits} times");
        let credits = replay.credits.get(transfer_id).copied().unwrap_or(0);
        assert_eq!(credits, 1, "{transfer_id} credited {credits} times");
    }
    assert_eq!(
        replay.credits.len(),
        replay.debits.len(),
        "a credit without its debit"
    );
    for (transaction_id, (stored, parts)) in &replay.transactions {
        assert_eq!(
            stored, parts,
            "{transaction_id} has {stored} of its {parts} parts in the stream"
        );
    }
    let applied = |id: &str| replay.debits.contains_key(id) || replay.transactions.contains_key(id);
    for transfer_id in ledger.acknowledged.keys() {
        assert!(
            applied(transfer_id),
            "acknowledged {transfer_id} is not in the stream"
        );
    }
    for (transfer_id, code) in &ledger.refused {
        assert!(
            !applied(transfer_id),
            "{transfer_id} was refused ({code}) yet applied"
        );
    }
    for (original, reversals) in &replay.reversals {
        assert_eq!(
            reversals.len(),
            1,
            "{original} was reversed {} times: {reversals:?}",
            reversals.len()
        );
        assert!(
            applied(original),
            "a reversal of {original}, which is not in the stream"
        );
    }
    for (original, reversal) in &ledger.reversed {
        assert_eq!(
            replay
                .reversals
                .get(original)
                .and_then(|set| set.iter().next()),
            Some(reversal),
            "the acknowledged reversal of {original} is not in the stream"
        );
    }
    for (original, code) in &ledger.reversals_refused {
        assert!(
            !replay.reversals.contains_key(original),
            "the reversal of {original} was refused ({code}) yet applied"
        );
    }
    let transactions_through = ledger
        .acknowledged
        .keys()
        .filter(|id| replay.transactions.contains_key(*id))
        .count();
    assert!(
        transactions_through > 0 && !ledger.reversed.is_empty(),
        "no transaction ({transactions_through}) or no reversal ({}) went through",
        ledger.reversed.len()
    );
    let refused_for_the_receiver = ledger
        .refused
        .values()
        .filter(|code| code.as_str() != "insufficient_funds")
        .count();
    assert!(
        refused_for_the_receiver > 0,
        "no transfer was refused for its receiver; the failure paths were not exercised"
    );
    let seeded = SEED_DEPOSIT * EUR_ACCOUNTS as i64;
    assert_eq!(replay.deposited - replay.withdrawn, seeded);
    assert_eq!(
        replay.total_balance(),
        seeded,
        "money was created or destroyed"
    );
    for (account, (balance, _, limit, _)) in &replay.accounts {
        assert!(
            *balance >= -(*limit as i64),
            "{account} at {balance} is below its limit"
        );
    }
    for account in usd.iter().chain(&closed) {
        assert_eq!(
            replay.accounts[account].0, 0,
            "{account} received money it must refuse"
        );
    }
    let last = events.last().unwrap().position;
    // The reader resumes by itself; after a leader change its pull may wait out a missed
    // heartbeat first, so allow it more than the 5 s a read waits.
    let catching_up = Instant::now();
    loop {
        let applied = http
            .metric(&reader.url(), "coffer_projection_applied_position")
            .await
            .unwrap_or(0.0) as u64;
        if applied >= last {
            break;
        }
        assert!(
            catching_up.elapsed() < Duration::from_secs(60),
            "the reader stayed at {applied} of {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reader_caught_up = catching_up.elapsed();
    assert_views_equal_replay(&http, &reader.url(), &replay, last).await;
    // Every transaction's view is whole, and shows its reversal once it has one.
    for transaction_id in replay.transactions.keys() {
        let view = http
            .get(&format!(
                "{}/v1/transactions/{transaction_id}?min_position={last}",
                reader.url()
            ))
            .await
            .unwrap();
        assert_eq!(view.status, 200, "{transaction_id}: {:?}", view.body);
        assert_eq!(view.body["status"], "completed");
        let reversal = replay
            .reversals
            .get(transaction_id)
            .and_then(|reversals| reversals.iter().next());
        assert_eq!(
            view.body["reversed_by"].as_str(),
            reversal.map(String::as_str),
            "{transaction_id}"
        );
    }
    // The reader's conservation audit agrees, and every account's hash chain is intact.
    let audit = http
        .get(&format!("{}/v1/audit?min_position={last}", reader.url()))
        .await
        .unwrap();
    assert_eq!(audit.status, 200, "{:?}", audit.body);
    assert_eq!(audit.body["balanced"], true, "{:?}", audit.body);
    assert_eq!(
        audit.body["currencies"]["EUR"]["balances"].as_i64(),
        Some(seeded)
    );
    let breaks = http
        .metric(&reader.url(), "coffer_reader_chain_breaks_total")
        .await;
    assert_eq!(breaks, Some(0.0), "the reader found chain breaks");
    let verify = std::process::Command::new(testkit::coffer_binary())
        .args(["verify"])
        .env("COFFER_NATS_URL", &urls)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "coffer verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let mut times = ledger.acknowledged_at.clone();
    times.insert(0, started);
    times.push(finished);
    times.sort();
    let stall = times
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default();
    let duplicates = replay.debits.values().filter(|debits| **debits > 1).count();
    println!(
        "bank ({fault:?}): {} attempted, {} acknowledged ({transactions_through} transactions, {} reversals, {} reversals refused), {} in the stream, {} duplicates, {} refused ({} for the receiver), {} unknown, {} retried acknowledged, longest stall {stall:?}, {} events, reader caught up {reader_caught_up:?} after the last answer",
        CLIENTS * operations,
        ledger.acknowledged.len(),
        ledger.reversed.len(),
        ledger.reversals_refused.len(),
        replay.debits.len() + replay.transactions.len(),
        duplicates,
        ledger.refused.len(),
        refused_for_the_receiver,
        ledger.unknown.len(),
        ledger.retried_acknowledged,
        events.len()
    );
}
