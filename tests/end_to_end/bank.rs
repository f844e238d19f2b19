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
//! One account is hot: a client deposits to it and withdraws from it without pause (keyed), and
//! transfers touch it often; no command may give up on contention ("gave up after N
//! concurrent-update retries"). Some transfers arrive as bodies trickled over seconds, finishing
//! across the fault and just before the request timeout: once taken, their answer is their
//! outcome, never a `408` (which the clients treat as a bug).
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
/// The writers' command deadline and request timeout in this workload: short, so a trickled
/// body can finish just before the request timeout within the run (the timeout must exceed the
/// deadline + 5.5 s).
const COMMAND_DEADLINE_MS: u64 = 3_000;
const REQUEST_TIMEOUT_MS: u64 = 9_000;
/// When the trickled transfers' bodies are complete, from the start of the workload.
const TRICKLES_DONE_AT_MS: [u64; 4] = [1_500, 3_500, 5_500, 8_500];
/// Transfers touch the hot account this often (as sender or receiver).
const HOT_SHARE: f64 = 0.3;

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
    /// Answers that gave up on contention (`gave up after N concurrent-update retries`).
    gave_up: Vec<String>,
    /// The hot account's own deposits minus withdrawals, as acknowledged.
    hot_net: i64,
    /// Hot-account commands never answered definitely: the net above is then not exact.
    hot_unknown: usize,
    hot_acknowledged: usize,
    trickled_acknowledged: usize,
}

impl Ledger {
    /// Notes an answer that gave up on contention: none may.
    fn note(&mut self, answer: &Option<(u16, Value)>) {
        if let Some((503, body)) = answer {
            let detail = body["detail"].as_str().unwrap_or("");
            if detail.contains("gave up after") {
                self.gave_up.push(detail.to_owned());
            }
        }
    }
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
        // The hot account is `senders[0]`: often the sender, often the receiver.
        let pick = |random: &mut rand::rngs::StdRng| {
            let hot = random.random_bool(HOT_SHARE);
            let from = if hot && random.random_bool(0.5) {
                senders[0].clone()
            } else {
                senders[random.random_range(0..senders.len())].clone()
            };
            let to = loop {
                let candidate = if hot && from != senders[0] {
                    senders[0].clone()
                } else {
                    targets[random.random_range(0..targets.len())].clone()
                };
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
        let outcome = settle(&channel, &http, &request, is_transaction, None, &ledger).await;
        record(
            outcome,
            &transfer_id,
            is_transaction,
            &mut done,
            &ledger,
            &channel,
            &http,
            &request,
            operation,
            &mut random,
        )
        .await;
    }
}

/// Sends a transfer or transaction until a definite answer (the first attempt trickled when
/// `trickle_until` is given): `Some(Ok(body))` acknowledged, `Some(Err(code))` refused, `None`
/// unknown.
async fn settle(
    channel: &Channel,
    http: &Http,
    request: &Value,
    is_transaction: bool,
    trickle_until: Option<Instant>,
    ledger: &Mutex<Ledger>,
) -> Option<Result<Value, String>> {
    let mut outcome = None;
    for attempt in 0..ATTEMPTS_MAX {
        let answer = match (attempt, trickle_until, channel) {
            (0, Some(until), Channel::Http(writers)) => {
                send_trickled(&writers[0], request, until).await
            }
            _ => send(channel, http, request, attempt).await,
        };
        ledger.lock().unwrap().note(&answer);
        match answer {
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
    outcome
}

/// Records a transfer's or transaction's outcome in the ledger; retries some acknowledged ones
/// on purpose (same answer, no effect).
#[allow(clippy::too_many_arguments)]
async fn record(
    outcome: Option<Result<Value, String>>,
    transfer_id: &str,
    is_transaction: bool,
    done: &mut Vec<(String, bool)>,
    ledger: &Mutex<Ledger>,
    channel: &Channel,
    http: &Http,
    request: &Value,
    operation: usize,
    random: &mut rand::rngs::StdRng,
) {
    match outcome {
        Some(Ok(body)) => {
            {
                let mut ledger = ledger.lock().unwrap();
                ledger
                    .acknowledged
                    .insert(transfer_id.to_owned(), body.clone());
                ledger.acknowledged_at.push(Instant::now());
            }
            done.push((transfer_id.to_owned(), is_transaction));
            if random.random_bool(0.1) {
                if let Some((status, repeated)) = send(channel, http, request, operation).await {
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
            ledger
                .lock()
                .unwrap()
                .refused
                .insert(transfer_id.to_owned(), code);
        }
        None => {
            ledger
                .lock()
                .unwrap()
                .unknown
                .insert(transfer_id.to_owned());
        }
    }
}

/// Sends one transfer over HTTP with its body trickled in until `until` (a byte at a time, the
/// last one then), and reads the answer.
async fn send_trickled(writer: &str, request: &Value, until: Instant) -> Option<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::to_vec(request).ok()?;
    let address = writer.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let head = format!(
        "POST /v1/transfers HTTP/1.1\r\nHost: coffer\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    for (index, byte) in body.iter().enumerate() {
        let left = (body.len() - index) as u32;
        let pause = until.saturating_duration_since(Instant::now()) / left;
        tokio::time::sleep(pause).await;
        stream.write_all(&[*byte]).await.ok()?;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// Sends trickled transfers between EUR accounts, finishing at [`TRICKLES_DONE_AT_MS`] after
/// `started`; retried (not trickled) until definite, like any client's.
async fn trickling_client(
    writers: Vec<String>,
    senders: Arc<Vec<String>>,
    ledger: Arc<Mutex<Ledger>>,
    started: Instant,
) {
    let http = Http::new();
    let channel = Channel::Http(writers);
    let sends = TRICKLES_DONE_AT_MS
        .iter()
        .enumerate()
        .map(|(index, done_at)| {
            let (http, channel, ledger) = (&http, &channel, &ledger);
            let transfer_id = format!("trickle-{index}");
            let request = json!({"transfer_id": transfer_id, "from": senders[index + 1],
            "to": senders[index + 2], "amount": 5});
            async move {
                let until = started + Duration::from_millis(*done_at);
                let outcome = settle(channel, http, &request, false, Some(until), ledger).await;
                let acknowledged = matches!(outcome, Some(Ok(_)));
                let mut random = rand::rngs::StdRng::seed_from_u64(index as u64);
                record(
                    outcome,
                    &transfer_id,
                    false,
                    &mut Vec::new(),
                    ledger,
                    channel,
                    http,
                    &request,
                    0,
                    &mut random,
                )
                .await;
                if acknowledged {
                    ledger.lock().unwrap().trickled_acknowledged += 1;
                }
            }
        });
    futures::future::join_all(sends).await;
}

/// Deposits to and withdraws from the hot account without pause, each keyed and retried with
/// its key until definite, until `operations` are done.
async fn hot_client(
    writers: Vec<String>,
    hot: String,
    operations: usize,
    ledger: Arc<Mutex<Ledger>>,
) {
    let http = Http::new();
    for operation in 0..operations {
        let (kind, sign) = if operation % 2 == 0 {
            ("deposits", 1)
        } else {
            ("withdrawals", -1)
        };
        let amount = 1 + (operation as i64 % 50);
        let key = format!("hot-{operation}");
        let mut definite = false;
        for attempt in 0..ATTEMPTS_MAX {
            let url = format!(
                "{}/v1/accounts/{hot}/{kind}",
                writers[attempt % writers.len()]
            );
            let answer = http
                .post(&url, &json!({"amount": amount}), Some(&key))
                .await
                .ok()
                .map(|reply| (reply.status, reply.body));
            ledger.lock().unwrap().note(&answer);
            match answer {
                Some((200, _)) => {
                    let mut ledger = ledger.lock().unwrap();
                    ledger.hot_net += sign * amount;
                    ledger.hot_acknowledged += 1;
                    definite = true;
                    break;
                }
                Some((422, body)) if body["code"] == "insufficient_funds" => {
                    definite = true;
                    break;
                }
                Some((status, body)) if status < 500 => {
                    panic!("hot {kind} {key}: unexpected {status} {body}")
                }
                _ => {
                    let pause = 100 * (attempt as u64 + 1);
                    tokio::time::sleep(Duration::from_millis(pause.min(1_000))).await
                }
            }
        }
        if !definite {
            ledger.lock().unwrap().hot_unknown += 1;
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
    let mut writer_settings = replicas.clone();
    writer_settings.extend([
        (
            "COFFER_COMMAND_DEADLINE_MS",
            COMMAND_DEADLINE_MS.to_string(),
        ),
        (
            "COFFER_HTTP_REQUEST_TIMEOUT_MS",
            REQUEST_TIMEOUT_MS.to_string(),
        ),
    ]);
    let mut first = support::writer("writer-a", &urls, &writer_settings);
    let second = support::writer("writer-b", &urls, &writer_settings);
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
    clients.push(tokio::spawn(hot_client(
        vec![a.clone(), b.clone()],
        eur[0].clone(),
        operations * 4,
        ledger.clone(),
    )));
    clients.push(tokio::spawn(trickling_client(
        vec![a.clone(), b.clone()],
        senders.clone(),
        ledger.clone(),
        started,
    )));
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
    // No command gave up on contention, the hot account's included.
    assert!(
        ledger.gave_up.is_empty(),
        "{} commands gave up on contention: {:?}",
        ledger.gave_up.len(),
        ledger.gave_up
    );
    assert!(
        ledger.hot_acknowledged > 0,
        "no hot-account command went through"
    );
    let seeded = SEED_DEPOSIT * EUR_ACCOUNTS as i64;
    assert_eq!(
        replay.total_balance(),
        replay.deposited - replay.withdrawn,
        "money was created or destroyed"
    );
    // Every acknowledged hot deposit and withdrawal is in the stream once, and nothing else is.
    if ledger.hot_unknown == 0 {
        assert_eq!(replay.deposited - replay.withdrawn, seeded + ledger.hot_net);
    }
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
    // Only EUR accounts ever hold money (the USD ones refuse every transfer).
    assert_eq!(
        audit.body["currencies"]["EUR"]["balances"].as_i64(),
        Some(replay.total_balance())
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
        "bank ({fault:?}): hot account {} of {} commands acknowledged ({} unknown), {} of {} trickled transfers acknowledged, 0 gave up; {} attempted, {} acknowledged ({transactions_through} transactions, {} reversals, {} reversals refused), {} in the stream, {} duplicates, {} refused ({} for the receiver), {} unknown, {} retried acknowledged, longest stall {stall:?}, {} events, reader caught up {reader_caught_up:?} after the last answer",
        ledger.hot_acknowledged,
        operations * 4,
        ledger.hot_unknown,
        ledger.trickled_acknowledged,
        TRICKLES_DONE_AT_MS.len(),
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
