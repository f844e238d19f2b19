//! `coffer-bench`: starts nats-server, a writer and a reader (release builds, free ports, temp
//! dirs) and measures throughput, latency and memory. Results are printed and written as a
//! Markdown table (`--report`); `docs/benchmarks.md` records a run with its machine.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use domain::{AccountId, Amount, Currency, Event, OpenAccount, OverdraftLimit, TransferId};
use eventlog::{Entry, EventLog, EventMetadata, StreamSettings};
use futures::{FutureExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use testkit::{CofferProcess, NatsServer};

#[derive(Parser)]
#[command(about = "Coffer benchmarks against real processes")]
struct Options {
    /// Write the results as Markdown here.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Write the results as JSON here (suite, durability, machine, rows).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// nats-server durability: `always` (a sync per write, what Coffer deploys) or `default`
    /// (the NATS default, a sync every 2 minutes).
    #[arg(long, value_enum, default_value_t = Durability::Always)]
    durability: Durability,
    /// Multiply the operation counts (1 = a few minutes on 2 cores).
    #[arg(long, default_value_t = 1)]
    scale: usize,
    /// Which benchmarks: the throughput and latency suite, the first command on a long
    /// history with and without a snapshot, or writer memory over many accounts.
    #[arg(long, value_enum, default_value_t = Suite::Throughput)]
    suite: Suite,
    /// Events in the long history (`--suite snapshot`).
    #[arg(long, default_value_t = 100_000)]
    history_events: usize,
    /// Deposits per configuration (`--suite hot-account`).
    #[arg(long, default_value_t = 4_000)]
    hot_deposits: usize,
    /// Seconds per row (`--suite deposits`).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Accounts touched once (`--suite memory`).
    #[arg(long, default_value_t = 1_000_000)]
    memory_accounts: usize,
    /// Accounts opened with metadata, 1% of them matching the filter (`--suite listing`).
    #[arg(long, default_value_t = 1_000_000)]
    listing_accounts: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Durability {
    Always,
    Default,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Suite {
    Throughput,
    Snapshot,
    Memory,
    CatchUp,
    HotAccount,
    HalfLoad,
    Deposits,
    Flows,
    CostModel,
    Listing,
    /// What signatures cost: Ed25519 sign and verify per event in-process, and a reader's
    /// catch-up of signed events with and without checking them (COFFER_TRUSTED_KEYS_FILE).
    Signing,
}

struct Results {
    rows: Vec<(String, String)>,
}

impl Results {
    fn add(&mut self, name: &str, value: String) {
        println!("{name}: {value}");
        self.rows.push((name.into(), value));
    }

    /// Adds a row and gives back `rate`, for ratios.
    fn add_rate(&mut self, name: &str, rate: f64, value: String) -> f64 {
        self.add(name, value);
        rate
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 * fraction) as usize).min(sorted.len() - 1);
    sorted[index]
}

fn summary(mut latencies: Vec<Duration>, elapsed: Duration) -> String {
    latencies.sort();
    format!(
        "{:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms ({} ops)",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.len()
    )
}

/// Latency percentiles only, for loops whose elapsed time includes other requests.
fn latency_summary(mut latencies: Vec<Duration>) -> String {
    latencies.sort();
    format!(
        "p50 {:.2} ms, p99 {:.2} ms ({} samples)",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.len()
    )
}

/// The latencies the client tasks measured, once all have finished; clears their progress bar.
async fn join_latencies(
    tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>,
    bar: &ProgressBar,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    bar.finish_and_clear();
    latencies
}

fn progress(length: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> Value {
    let response = client.post(url).json(&body).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// User plus system CPU seconds `pid` has used (`/proc/{pid}/stat`, clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces): state is the first.
            let rest = stat.rsplit_once(") ")?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Busy and total clock ticks of the whole machine (`/proc/stat`, all cores): busy is every
/// state but idle and iowait.
fn machine_ticks() -> (f64, f64) {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            let line = stat.lines().next()?.strip_prefix("cpu ")?;
            // user nice system idle iowait irq softirq steal: guest time is inside user and
            // nice already.
            let ticks: Vec<f64> = line
                .split_whitespace()
                .take(8)
                .filter_map(|field| field.parse().ok())
                .collect();
            let total: f64 = ticks.iter().sum();
            let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0.0);
            Some((total - idle, total))
        })
        .unwrap_or((0.0, 0.0))
}

/// Where the machine's CPU went at one moment, to compare two of them: the nats-servers, this
/// load generator, and the whole machine. On two shared cores a ratio goal is a CPU budget: the
/// commands per second the machine can hold is at most its cores over the CPU all processes
/// spend on one command.
struct CpuSample {
    servers: f64,
    load: f64,
    busy: f64,
    total: f64,
}

impl CpuSample {
    fn take(servers: &[u32]) -> Self {
        let (busy, total) = machine_ticks();
        Self {
            servers: servers.iter().copied().map(cpu_seconds).sum(),
            load: cpu_seconds(std::process::id()),
            busy,
            total,
        }
    }

    /// nats-server and load generator CPU per operation, and how busy the machine was.
    fn cost(&self, later: &CpuSample, operations: usize) -> String {
        let per = |before: f64, after: f64| (after - before) / operations.max(1) as f64 * 1e6;
        let busy = (later.busy - self.busy) / (later.total - self.total).max(1.0);
        format!(
            "nats-server CPU {:.0} us, load generator CPU {:.0} us per operation, machine busy {:.0}%",
            per(self.servers, later.servers),
            per(self.load, later.load),
            busy * 100.0
        )
    }
}

/// The writer's CPU time and group commit histogram at one moment, to compare two of them.
struct WriterSample {
    cpu: f64,
    /// The rest of the machine at the same moment.
    others: CpuSample,
    /// `le` bound -> cumulative count of `coffer_writer_group_commit_batch_messages`.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
    /// `coffer_writer_group_commit_fills` and `_fills_short`.
    fills: f64,
    fills_short: f64,
}

impl WriterSample {
    async fn take(http: &reqwest::Client, url: &str, pid: u32, servers: &[u32]) -> Self {
        let cpu = cpu_seconds(pid);
        let others = CpuSample::take(servers);
        let text = match http.get(format!("{url}/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let name = "coffer_writer_group_commit_batch_messages";
        let mut buckets = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&format!("{name}_bucket{{le=\"")) {
                if let Some((bound, value)) = rest.split_once("\"} ") {
                    let bound = if bound == "+Inf" {
                        f64::INFINITY
                    } else {
                        bound.parse().unwrap_or(f64::INFINITY)
                    };
                    buckets.push((bound, value.trim().parse().unwrap_or(0.0)));
                }
            }
        }
        let metric = |suffix: &str| testkit::metric_value(&text, &format!("{name}_{suffix}"));
        Self {
            cpu,
            others,
            buckets,
            sum: metric("sum").unwrap_or(0.0),
            count: metric("count").unwrap_or(0.0),
            fills: testkit::metric_value(&text, "coffer_writer_group_commit_fills_total")
                .unwrap_or(0.0),
            fills_short: testkit::metric_value(
                &text,
                "coffer_writer_group_commit_fills_short_total",
            )
            .unwrap_or(0.0),
        }
    }

    /// What happened between `self` and `later`: writer CPU per command and batch sizes.
    fn cost(&self, later: &WriterSample, commands: usize) -> String {
        let per_command = (later.cpu - self.cpu) / commands.max(1) as f64 * 1e6;
        let batches = later.count - self.count;
        let mean = (later.sum - self.sum) / batches.max(1.0);
        // The smallest bucket bound under which a fraction of this run's batches fall.
        let quantile = |fraction: f64| {
            later
                .buckets
                .iter()
                .zip(&self.buckets)
                .find(|((_, after), (_, before))| after - before >= fraction * batches)
                .map_or(f64::NAN, |((bound, _), _)| *bound)
        };
        format!(
            "writer CPU {per_command:.0} us/command, {}; {batches:.0} batches, mean {mean:.1} messages, p50 <= {} p99 <= {} messages; waited to fill {:.0}, short {:.0}",
            self.others.cost(&later.others, commands),
            quantile(0.5),
            quantile(0.99),
            later.fills - self.fills,
            later.fills_short - self.fills_short,
        )
    }
}

/// The deposits suite's closed-loop rows against one writer, each with the writer's and the
/// server's CPU per operation and the group commit's batches over the row.
struct WriterRows<'a> {
    http: &'a reqwest::Client,
    url: &'a str,
    pid: u32,
    servers: &'a [u32],
}

impl WriterRows<'_> {
    /// Runs `operation` from `clients` clients for `seconds` and adds the row; its rate.
    async fn add<F>(
        &self,
        results: &mut Results,
        name: String,
        clients: usize,
        seconds: u64,
        operation: F,
    ) -> f64
    where
        F: Fn(usize) -> futures::future::BoxFuture<'static, bool> + Clone + Send + 'static,
    {
        let before = WriterSample::take(self.http, self.url, self.pid, self.servers).await;
        let measured = timed(clients, seconds, &name, operation).await;
        let after = WriterSample::take(self.http, self.url, self.pid, self.servers).await;
        let cost = before.cost(&after, measured.1.len());
        rate_row(results, name, measured, cost)
    }
}

/// Deposits of `amount` over HTTP on the suite's accounts: an operation succeeds when answered
/// 2xx (or 4xx for an amount the API refuses), and its client pauses `pause` after each answer.
fn posted_deposits(
    http: &reqwest::Client,
    url: &str,
    prefix: &str,
    accounts: usize,
    amount: i64,
    pause: Duration,
) -> impl Fn(usize) -> futures::future::BoxFuture<'static, bool> + Clone + Send + 'static {
    let (http, url, prefix) = (http.clone(), url.to_owned(), prefix.to_owned());
    move |index| {
        let request = http
            .post(format!(
                "{url}/v1/accounts/{prefix}-{}/deposits",
                index % accounts
            ))
            .json(&json!({ "amount": amount }))
            .send();
        async move {
            let answered = request.await.is_ok_and(|answer| {
                if amount > 0 {
                    answer.status().is_success()
                } else {
                    answer.status().is_client_error()
                }
            });
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            answered
        }
        .boxed()
    }
}

/// One deposit of 1 over the writer's NATS service; whether it was applied.
async fn deposit_over_nats(client: async_nats::Client, subject: String) -> bool {
    client
        .request(subject, "{\"amount\":1}".into())
        .await
        .is_ok_and(|answer| {
            answer
                .headers
                .as_ref()
                .is_none_or(|headers| headers.get("Nats-Service-Error").is_none())
        })
}

/// A row of a timed run: its rate, latencies, errors and (for the writer) its cost.
fn rate_row(
    results: &mut Results,
    name: String,
    (rate, latencies, errors): (f64, Vec<Duration>, usize),
    cost: String,
) -> f64 {
    let cost = if cost.is_empty() {
        cost
    } else {
        format!("; {cost}")
    };
    results.add(
        &name,
        format!(
            "{rate:.0}/s, {}, {errors} errors{cost}",
            latency_summary(latencies)
        ),
    );
    rate
}

/// Deposits from `clients` concurrent clients, each on its own account (or all on one).
async fn deposits(writer: &str, clients: usize, per_client: usize, one_account: bool) -> String {
    let http = reqwest::Client::new();
    let shared = format!("hot-{}", uuid::Uuid::now_v7().simple());
    post(
        &http,
        format!("{writer}/v1/accounts"),
        json!({"account_id": shared, "currency": "EUR"}),
    )
    .await;
    let bar = progress(
        (clients * per_client) as u64,
        &format!(
            "deposits, {clients} clients{}",
            if one_account { ", one account" } else { "" }
        ),
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, writer, shared, bar) = (
                http.clone(),
                writer.to_string(),
                shared.clone(),
                bar.clone(),
            );
            tokio::spawn(async move {
                let account = if one_account {
                    shared
                } else {
                    let id = format!("b-{}", uuid::Uuid::now_v7().simple());
                    post(
                        &http,
                        format!("{writer}/v1/accounts"),
                        json!({"account_id": id, "currency": "EUR"}),
                    )
                    .await;
                    id
                };
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let begun = Instant::now();
                    post(
                        &http,
                        format!("{writer}/v1/accounts/{account}/deposits"),
                        json!({"amount": 1}),
                    )
                    .await;
                    latencies.push(begun.elapsed());
                    bar.inc(1);
                }
                latencies
            })
        })
        .collect();
    let latencies = join_latencies(tasks, &bar).await;
    summary(latencies, started.elapsed())
}

/// Transfers (one atomic batch each: debit, credit, transfer-id marker) from `clients`
/// concurrent clients, each between its own two accounts: the latency of a 201, comparable to a
/// deposit's in the same run.
async fn transfers(writer: &str, clients: usize, per_client: usize) -> String {
    let http = reqwest::Client::new();
    let bar = progress(
        (clients * per_client) as u64,
        &format!("transfers, {clients} clients"),
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, writer, bar) = (http.clone(), writer.to_string(), bar.clone());
            tokio::spawn(async move {
                let (from, to) = (
                    format!("tf-{}", uuid::Uuid::now_v7().simple()),
                    format!("tt-{}", uuid::Uuid::now_v7().simple()),
                );
                for id in [&from, &to] {
                    post(
                        &http,
                        format!("{writer}/v1/accounts"),
                        json!({"account_id": id, "currency": "EUR"}),
                    )
                    .await;
                }
                post(
                    &http,
                    format!("{writer}/v1/accounts/{from}/deposits"),
                    json!({"amount": 1_000_000}),
                )
                .await;
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let begun = Instant::now();
                    let answer = post(
                        &http,
                        format!("{writer}/v1/transfers"),
                        json!({"from": from, "to": to, "amount": 1}),
                    )
                    .await;
                    assert_eq!(answer["status"], "completed", "{answer}");
                    latencies.push(begun.elapsed());
                    bar.inc(1);
                }
                latencies
            })
        })
        .collect();
    let latencies = join_latencies(tasks, &bar).await;
    summary(latencies, started.elapsed())
}

/// Read-your-writes: a read with `min_position` right after each write, against a plain read.
async fn read_your_writes(writer: &str, reader: &str, reads: usize) -> (String, String) {
    let http = reqwest::Client::new();
    let account = format!("ryw-{}", uuid::Uuid::now_v7().simple());
    post(
        &http,
        format!("{writer}/v1/accounts"),
        json!({"account_id": account, "currency": "EUR"}),
    )
    .await;
    let bar = progress(reads as u64, "read-your-writes");
    let (mut waiting, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..reads {
        let reply = post(
            &http,
            format!("{writer}/v1/accounts/{account}/deposits"),
            json!({"amount": 1}),
        )
        .await;
        let position = reply["position"].as_u64().unwrap();
        let begun = Instant::now();
        let response = http
            .get(format!(
                "{reader}/v1/accounts/{account}?min_position={position}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        waiting.push(begun.elapsed());
        let begun = Instant::now();
        http.get(format!("{reader}/v1/accounts/{account}"))
            .send()
            .await
            .unwrap();
        plain.push(begun.elapsed());
        bar.inc(1);
    }
    bar.finish_and_clear();
    (latency_summary(waiting), latency_summary(plain))
}

/// Appends `accounts` x `per_account` events straight to the stream.
async fn append_bulk(log: &Arc<EventLog>, accounts: usize, per_account: usize) -> Vec<AccountId> {
    let bar = progress((accounts * per_account) as u64, "appending events");
    let ticker = bar.clone();
    let ids = fixtures::append_histories(log, accounts, per_account, move || ticker.inc(1)).await;
    bar.finish_and_clear();
    ids
}

/// The raw JetStream cost of what a command appends, one append at a time on two fresh
/// accounts: a single publish with its concurrency check (a deposit's event) against an atomic
/// batch of two checked events and a marker (a transfer). The writer's figures sit on top.
async fn append_baseline(log: &EventLog, appends: usize) -> (String, String) {
    let metadata = EventMetadata {
        command_id: "bench".into(),
        correlation_id: "bench".into(),
        traceparent: None,
    };
    let deposit = || Event::Deposited {
        metadata: Default::default(),
        amount: Amount::new(1).unwrap(),
        reference: None,
    };
    let opened = Event::AccountOpened(OpenAccount {
        metadata: Default::default(),
        currency: Currency::parse("EUR").unwrap(),
        owner: None,
        overdraft_limit: OverdraftLimit::default(),
    });
    let (a, b) = (
        AccountId::parse(&format!("raw-a-{}", uuid::Uuid::now_v7().simple())).unwrap(),
        AccountId::parse(&format!("raw-b-{}", uuid::Uuid::now_v7().simple())).unwrap(),
    );
    let mut last_a = log
        .append(&a, 0, &opened, &metadata)
        .await
        .unwrap()
        .last_position;
    let mut last_b = log
        .append(&b, 0, &opened, &metadata)
        .await
        .unwrap()
        .last_position;
    // Chains are not what is measured: each batch event is chained as if it were the first.
    let chain = |account: &AccountId| {
        eventlog::chain::next(eventlog::chain::GENESIS, account, &deposit()).unwrap()
    };
    let bar = progress((2 * appends) as u64, "raw appends");
    let mut single = Vec::with_capacity(appends);
    for _ in 0..appends {
        let begun = Instant::now();
        last_a = log
            .append(&a, last_a, &deposit(), &metadata)
            .await
            .unwrap()
            .last_position;
        single.push(begun.elapsed());
        bar.inc(1);
    }
    let mut batches = Vec::with_capacity(appends);
    for _ in 0..appends {
        let transfer_id = TransferId::parse(&uuid::Uuid::now_v7().simple().to_string()).unwrap();
        let batch = [
            Entry::Event {
                account: a.clone(),
                expected_last_position: last_a,
                event: deposit(),
                metadata: metadata.clone(),
                chain: chain(&a),
            },
            Entry::Event {
                account: b.clone(),
                expected_last_position: last_b,
                event: deposit(),
                metadata: metadata.clone(),
                chain: chain(&b),
            },
            Entry::Marker {
                subject: eventlog::subject::transfer_marker(&transfer_id),
                payload: vec![0],
            },
        ];
        let begun = Instant::now();
        let appended = log.append_atomic(&batch).await.unwrap();
        batches.push(begun.elapsed());
        last_a = appended.position_of(0);
        last_b = appended.position_of(1);
        bar.inc(1);
    }
    bar.finish_and_clear();
    (latency_summary(single), latency_summary(batches))
}

/// A raw atomic batch of `events` checked events (each on its own account) and a marker, the
/// shape of a transaction over that many accounts: latency of `batches` sequential batches.
async fn raw_flow_batches(log: &EventLog, events: usize, batches: usize) -> String {
    let metadata = EventMetadata::default();
    let deposit = || Event::Deposited {
        metadata: Default::default(),
        amount: Amount::new(1).unwrap(),
        reference: None,
    };
    let accounts: Vec<AccountId> = (0..events)
        .map(|index| {
            AccountId::parse(&format!(
                "rawflow-{index}-{}",
                uuid::Uuid::now_v7().simple()
            ))
            .unwrap()
        })
        .collect();
    let mut last = vec![0u64; events];
    let mut latencies = Vec::with_capacity(batches);
    for _ in 0..batches {
        let id = TransferId::parse(&uuid::Uuid::now_v7().simple().to_string()).unwrap();
        let mut batch: Vec<Entry> = accounts
            .iter()
            .zip(&last)
            .map(|(account, position)| Entry::Event {
                account: account.clone(),
                expected_last_position: *position,
                event: deposit(),
                metadata: metadata.clone(),
                chain: eventlog::chain::next(eventlog::chain::GENESIS, account, &deposit())
                    .unwrap(),
            })
            .collect();
        batch.push(Entry::Marker {
            subject: eventlog::subject::transfer_marker(&id),
            payload: vec![0],
        });
        let begun = Instant::now();
        let appended = log.append_atomic(&batch).await.unwrap();
        latencies.push(begun.elapsed());
        for (index, position) in last.iter_mut().enumerate() {
            *position = appended.position_of(index);
        }
    }
    latency_summary(latencies)
}

/// Money flows: the latency of a transfer and of transactions with 2, 8 and 64 postings (each
/// posting between two accounts of its own, so 2, 4, 16 and 128 accounts), from one client
/// through a writer, next to raw atomic batches of the same sizes in the same run.
async fn flows_suite(
    nats: &NatsServer,
    results: &mut Results,
    repeats: usize,
) -> anyhow::Result<()> {
    let writer = CofferProcess::start(
        "bench-writer",
        "writer",
        &[("COFFER_NATS_URL", nats.url()), ("RUST_LOG", "warn".into())],
    );
    let http = reqwest::Client::new();
    let w = writer.url();
    wait_ready(&http, &w).await?;
    let client = async_nats::connect(nats.url()).await?;
    let log = EventLog::open(client, &StreamSettings::default()).await?;
    for postings in [1usize, 2, 8, 64] {
        let pairs: Vec<(String, String)> = (0..postings)
            .map(|index| {
                (
                    format!("flow-from-{index}-{}", uuid::Uuid::now_v7().simple()),
                    format!("flow-to-{index}-{}", uuid::Uuid::now_v7().simple()),
                )
            })
            .collect();
        for (from, to) in &pairs {
            for id in [from, to] {
                post(
                    &http,
                    format!("{w}/v1/accounts"),
                    json!({"account_id": id, "currency": "EUR"}),
                )
                .await;
            }
            post(
                &http,
                format!("{w}/v1/accounts/{from}/deposits"),
                json!({"amount": 1_000_000}),
            )
            .await;
        }
        let label = if postings == 1 {
            "transfer (1 posting, 2 accounts)".to_owned()
        } else {
            format!(
                "transaction, {postings} postings ({} accounts)",
                2 * postings
            )
        };
        let bar = progress(repeats as u64, &label);
        let mut latencies = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let (path, body) = if postings == 1 {
                let (from, to) = &pairs[0];
                ("transfers", json!({"from": from, "to": to, "amount": 1}))
            } else {
                let list: Vec<Value> = pairs
                    .iter()
                    .map(|(from, to)| json!({"from": from, "to": to, "amount": 1}))
                    .collect();
                ("transactions", json!({"postings": list}))
            };
            let begun = Instant::now();
            let answer = post(&http, format!("{w}/v1/{path}"), body).await;
            latencies.push(begun.elapsed());
            assert_eq!(answer["status"], "completed", "{answer}");
            bar.inc(1);
        }
        bar.finish_and_clear();
        results.add(&format!("{label}, 1 client"), latency_summary(latencies));
        // The model of gathering: one last-by-subject get per other account, all at once.
        let others: Vec<AccountId> = pairs
            .iter()
            .flat_map(|(from, to)| [from, to])
            .skip(1)
            .map(|id| AccountId::parse(id).unwrap())
            .collect();
        let mut gathers = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let begun = Instant::now();
            futures::future::try_join_all(
                others
                    .iter()
                    .map(|account| log.last_account_position(account)),
            )
            .await?;
            gathers.push(begun.elapsed());
        }
        results.add(
            &format!(
                "raw JetStream: {} concurrent last-by-subject gets (gathering the others)",
                others.len()
            ),
            latency_summary(gathers),
        );
        results.add(
            &format!(
                "raw JetStream: atomic batch of {} checked events + marker",
                2 * postings
            ),
            raw_flow_batches(&log, 2 * postings, repeats).await,
        );
    }
    Ok(())
}

/// Loading one account's history: batched direct get (what the actors use) against an
/// ordered consumer.
async fn history_load(log: &EventLog, account: &AccountId, repeats: usize) -> (String, String) {
    let mut direct = Vec::new();
    let mut ordered = Vec::new();
    let filter = eventlog::subject::account_filter(account);
    let stream = log
        .context()
        .get_stream_no_info(log.stream_name())
        .await
        .unwrap();
    let expected = log.load_account(account, 0).await.unwrap().len();
    for _ in 0..repeats {
        let begun = Instant::now();
        let events = log.load_account(account, 0).await.unwrap();
        direct.push(begun.elapsed());
        assert_eq!(events.len(), expected);

        let begun = Instant::now();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = consumer.cached_info().num_pending as usize;
        let mut messages = consumer.messages().await.unwrap();
        let mut count = 0;
        while count < pending {
            let message = messages.next().await.unwrap().unwrap();
            // Decode as the direct-get path does, so both measure the same work.
            let info = message.info().unwrap();
            let headers = message.headers.clone().unwrap_or_default();
            eventlog::log::decode_stored(
                &message.subject,
                info.stream_sequence,
                info.published,
                &headers,
                message.payload.clone(),
            )
            .unwrap();
            count += 1;
        }
        ordered.push(begun.elapsed());
        assert_eq!(count, expected);
    }
    let describe = |mut samples: Vec<Duration>| {
        samples.sort();
        format!(
            "p50 {:.2} ms, p99 {:.2} ms ({expected} events, {} loads)",
            percentile(&samples, 0.5).as_secs_f64() * 1e3,
            percentile(&samples, 0.99).as_secs_f64() * 1e3,
            samples.len()
        )
    };
    (describe(direct), describe(ordered))
}

/// How long a durable explicit-ack pull consumer takes to receive and acknowledge the events of
/// `coffer.events.>` from the start up to position `last`, acking the last of each batch (AckAll), as the reader's
/// engine does, without decoding or storing anything: the ceiling a reader's catch-up is held to.
async fn raw_consume(log: &EventLog, last: u64) -> Duration {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let stream = log
        .context()
        .get_stream_no_info(log.stream_name())
        .await
        .unwrap();
    let name = format!("bench-raw-{}", uuid::Uuid::now_v7().simple());
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: eventlog::subject::ALL_EVENTS.into(),
            ack_policy: AckPolicy::All,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1_000)
        .messages()
        .await
        .unwrap()
        .ready_chunks(1_000);
    // Until the message at position `last` (markers in between are not events: not delivered).
    let mut reached = 0u64;
    while reached < last {
        let chunk = messages.next().await.unwrap();
        if let Some(Ok(newest)) = chunk.last() {
            reached = newest.info().map_or(reached, |info| info.stream_sequence);
            newest.ack().await.unwrap();
        }
    }
    let elapsed = started.elapsed();
    stream.delete_consumer(&name).await.unwrap();
    elapsed
}

/// A new reader applies the whole stream from scratch (after `100 x events_per_account` more
/// events), next to a raw explicit-ack consume of the same stream in the same run.
async fn catch_up_suite(
    nats: &NatsServer,
    log: &Arc<EventLog>,
    results: &mut Results,
    events_per_account: usize,
) -> anyhow::Result<()> {
    append_bulk(log, 100, events_per_account).await;
    let last = log.last_position().await?;
    let fresh_data = tempfile::tempdir()?;
    let started = Instant::now();
    // The process start (binary, redb file, NATS connection) is not the catch-up: the raw
    // consume below starts from a connected client too. Both figures are reported.
    let (fresh, listening) = start_fresh_reader(nats, fresh_data.path(), "catch-up").await;
    wait_applied(&fresh.url(), last, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    let caught_up = listening.elapsed();
    results.add(
        "reader catch-up from empty (incl. process start)",
        format!(
            "{last} events in {:.2} s = {:.0} events/s",
            elapsed.as_secs_f64(),
            last as f64 / elapsed.as_secs_f64()
        ),
    );
    results.add(
        "reader catch-up from empty (from the process listening)",
        format!(
            "{last} events in {:.2} s = {:.0} events/s",
            caught_up.as_secs_f64(),
            last as f64 / caught_up.as_secs_f64()
        ),
    );
    let raw = raw_consume(log, last).await;
    results.add(
        "raw JetStream: explicit-ack pull consume of the same stream (batches of 1000, ack all)",
        format!(
            "{last} events in {:.2} s = {:.0} events/s; catch-up / raw = {:.2} (incl. start {:.2})",
            raw.as_secs_f64(),
            last as f64 / raw.as_secs_f64(),
            raw.as_secs_f64() / caught_up.as_secs_f64(),
            raw.as_secs_f64() / elapsed.as_secs_f64()
        ),
    );
    let size = std::fs::metadata(fresh_data.path().join("views.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    results.add(
        "reader views.redb size after catch-up",
        format!("{:.1} MiB for {last} events", size as f64 / 1_048_576.0),
    );

    Ok(())
}

/// What signatures cost (`--suite signing`): Ed25519 sign and verify per event in this process,
/// then `100 x events_per_account` signed events caught up by a fresh reader that checks them and
/// by one that does not, next to a raw explicit-ack consume of the same stream, in one run.
async fn signing_suite(
    nats: &NatsServer,
    results: &mut Results,
    events_per_account: usize,
) -> anyhow::Result<()> {
    let key = Arc::new(eventlog::SigningKey::from_seed("bench-1", [42; 32])?);
    let trusted = eventlog::TrustedKeys::parse(&key.public_line())?;
    let chains: Vec<String> = (0..20_000u32)
        .map(|index| {
            eventlog::chain::link(
                eventlog::chain::GENESIS,
                "a",
                "deposited",
                1,
                &index.to_be_bytes(),
            )
        })
        .collect();
    let started = Instant::now();
    let signatures: Vec<String> = chains.iter().map(|chain| key.sign_event(chain)).collect();
    let signing = started.elapsed();
    let started = Instant::now();
    for (position, (chain, signature)) in chains.iter().zip(&signatures).enumerate() {
        trusted
            .verify_event(position as u64 + 1, Some(chain), Some(signature))
            .map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    let verifying = started.elapsed();
    let per = |elapsed: Duration| elapsed.as_secs_f64() * 1e6 / chains.len() as f64;
    results.add(
        "Ed25519 per event, in-process (ed25519-dalek, 20 000 events)",
        format!(
            "sign {:.1} us, verify {:.1} us",
            per(signing),
            per(verifying)
        ),
    );

    let client = async_nats::connect(nats.url()).await?;
    let log = Arc::new(
        EventLog::open(client, &StreamSettings::default())
            .await?
            .with_signer(key.clone()),
    );
    append_bulk(&log, 100, events_per_account).await;
    let last = log.last_position().await?;
    let keys = tempfile::tempdir()?;
    let trusted_file = keys.path().join("trusted.keys");
    std::fs::write(&trusted_file, key.public_line())?;
    let mut rates = Vec::new();
    for (name, extra) in [
        (
            "signed",
            vec![(
                "COFFER_TRUSTED_KEYS_FILE",
                trusted_file.display().to_string(),
            )],
        ),
        ("unchecked", Vec::new()),
    ] {
        let data = tempfile::tempdir()?;
        let (reader, listening) = start_fresh_reader_with(nats, data.path(), name, &extra).await;
        wait_applied(&reader.url(), last, Duration::from_secs(600)).await;
        let caught_up = listening.elapsed();
        let failures = reqwest::get(format!("{}/metrics", reader.url()))
            .await?
            .text()
            .await?
            .lines()
            .find_map(|line| line.strip_prefix("coffer_reader_signature_failures_total "))
            .map(str::to_owned)
            .unwrap_or_default();
        let rate = last as f64 / caught_up.as_secs_f64();
        rates.push(rate);
        results.add(
            &format!(
                "reader catch-up of {last} signed events, signatures {}",
                if name == "signed" {
                    "checked"
                } else {
                    "not checked"
                }
            ),
            format!(
                "{:.2} s = {rate:.0} events/s (signature failures: {failures})",
                caught_up.as_secs_f64()
            ),
        );
    }
    let raw = raw_consume(&log, last).await;
    let raw_rate = last as f64 / raw.as_secs_f64();
    results.add(
        "raw JetStream: explicit-ack pull consume of the same stream",
        format!(
            "{raw_rate:.0} events/s; checked / raw = {:.2}, unchecked / raw = {:.2}, checked / unchecked = {:.2}",
            rates[0] / raw_rate,
            rates[1] / raw_rate,
            rates[0] / rates[1]
        ),
    );
    Ok(())
}

/// Starts a reader on an empty data directory; returns it and when it began listening.
async fn start_fresh_reader(
    nats: &NatsServer,
    data: &std::path::Path,
    name: &str,
) -> (CofferProcess, Instant) {
    start_fresh_reader_with(nats, data, name, &[]).await
}

/// [`start_fresh_reader`] with more environment.
async fn start_fresh_reader_with(
    nats: &NatsServer,
    data: &std::path::Path,
    name: &str,
    extra: &[(&str, String)],
) -> (CofferProcess, Instant) {
    let mut environment = vec![
        ("COFFER_NATS_URL", nats.url()),
        ("COFFER_DATA_DIR", data.display().to_string()),
        ("COFFER_READER_NAME", name.into()),
        ("COFFER_MIN_POSITION_WAIT_MS", "600000".into()),
        ("RUST_LOG", "warn".into()),
    ];
    environment.extend(extra.iter().cloned());
    let reader = CofferProcess::start(&format!("bench-{name}"), "reader", &environment);
    let http = reqwest::Client::new();
    loop {
        let up = http
            .get(format!("{}/healthz", reader.url()))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        if up {
            return (reader, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_applied(reader: &str, position: u64, timeout: Duration) -> Duration {
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let status = http
            .get(format!("{reader}/v1/accounts/none?min_position={position}"))
            .timeout(timeout)
            .send()
            .await
            .unwrap()
            .status();
        // `none` is not an account: 404 once the view has the position. Anything else is an
        // unfinished wait: the reader ends one request after its request timeout (30 s, `408`)
        // whatever `min_position` wait it was given, so a long catch-up takes several.
        if status == reqwest::StatusCode::NOT_FOUND {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "reader did not reach position {position} in {timeout:?}: {status}"
        );
    }
}

/// How long one deposit takes, from sending it to its answer.
async fn timed_deposit(http: &reqwest::Client, writer: &str, account: &str) -> Duration {
    let started = Instant::now();
    post(
        http,
        format!("{writer}/v1/accounts/{account}/deposits"),
        json!({"amount": 1}),
    )
    .await;
    started.elapsed()
}

/// Sequential checked publish-and-ack on one subject with the official client: the ceiling of
/// one account's commands when each is its own fsynced append.
async fn sequential_publish_rate(client: &async_nats::Client, publishes: usize) -> f64 {
    let context = async_nats::jetstream::new(client.clone());
    let subject = format!(
        "coffer.append.raw-hot-{}.deposited",
        uuid::Uuid::now_v7().simple()
    );
    let mut last = 0u64;
    let started = Instant::now();
    for _ in 0..publishes {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last.to_string().as_str(),
        );
        let ack = context
            .publish_with_headers(subject.clone(), headers, "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
        last = ack.sequence;
    }
    publishes as f64 / started.elapsed().as_secs_f64()
}

/// Deposits from `clients` clients, each on its own account, paced so that together they send
/// `rate` per second (0: as fast as they can); (ops/s, latencies).
async fn paced_deposits(
    writer: &str,
    clients: usize,
    per_client: usize,
    rate: f64,
) -> (f64, Vec<Duration>) {
    let http = reqwest::Client::new();
    let mut accounts = Vec::with_capacity(clients);
    for _ in 0..clients {
        let id = format!("paced-{}", uuid::Uuid::now_v7().simple());
        post(
            &http,
            format!("{writer}/v1/accounts"),
            json!({"account_id": id, "currency": "EUR"}),
        )
        .await;
        accounts.push(id);
    }
    let bar = progress(
        (clients * per_client) as u64,
        &format!("deposits, {clients} clients, {rate:.0}/s"),
    );
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(clients as f64 / rate));
    let started = Instant::now();
    let tasks: Vec<_> = accounts
        .into_iter()
        .enumerate()
        .map(|(index, account)| {
            let (http, bar) = (http.clone(), bar.clone());
            let url = format!("{writer}/v1/accounts/{account}/deposits");
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                // Spread the clients' first sends over one interval.
                let offset = interval.map_or(Duration::ZERO, |interval| {
                    interval.mul_f64(index as f64 / clients as f64)
                });
                let start = tokio::time::Instant::now() + offset;
                for sent in 0..per_client {
                    if let Some(interval) = interval {
                        tokio::time::sleep_until(start + interval * sent as u32).await;
                    }
                    let begun = Instant::now();
                    post(&http, url.clone(), json!({"amount": 1})).await;
                    latencies.push(begun.elapsed());
                    bar.inc(1);
                }
                latencies
            })
        })
        .collect();
    let latencies = join_latencies(tasks, &bar).await;
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    (rate, latencies)
}

/// Waits until the service at `url` says it is ready (30 s at most).
async fn wait_ready(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .is_ok_and(|response| response.status().is_success())
    {
        anyhow::ensure!(Instant::now() < deadline, "{url} not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Command latency at half the maximum load: deposits from `clients` clients as fast as they
/// go, then paced at half that rate, each on its own account.
async fn half_load_suite(
    nats: &NatsServer,
    results: &mut Results,
    clients: usize,
) -> anyhow::Result<()> {
    let writer = CofferProcess::start(
        "half-load-writer",
        "writer",
        &[("COFFER_NATS_URL", nats.url()), ("RUST_LOG", "warn".into())],
    );
    let http = reqwest::Client::new();
    wait_ready(&http, &writer.url()).await?;
    let (maximum, latencies) = paced_deposits(&writer.url(), clients, 100, 0.0).await;
    results.add(
        &format!("deposit, {clients} clients, own accounts, as fast as they go"),
        format!("{maximum:.0} ops/s, {}", latency_summary(latencies)),
    );
    let half = maximum / 2.0;
    let per_client = ((half * 10.0) as usize / clients).max(10);
    let (rate, latencies) = paced_deposits(&writer.url(), clients, per_client, half).await;
    results.add(
        &format!("deposit, {clients} clients, own accounts, paced at half of that"),
        format!("{rate:.0} ops/s, {}", latency_summary(latencies)),
    );
    Ok(())
}

/// Publishes with up to `in_flight` acknowledgements outstanding (no per-subject check: the
/// stream's own ceiling for one subject).
async fn pipelined_publish_rate(
    client: &async_nats::Client,
    publishes: usize,
    in_flight: usize,
) -> f64 {
    let context = async_nats::jetstream::new(client.clone());
    let subject = format!(
        "coffer.append.raw-pipelined-{}.deposited",
        uuid::Uuid::now_v7().simple()
    );
    let started = Instant::now();
    futures::stream::iter(0..publishes)
        .map(|_| {
            let (context, subject) = (context.clone(), subject.clone());
            async move {
                context
                    .publish(subject, "x".into())
                    .await
                    .unwrap()
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(in_flight)
        .for_each(|_| async {})
        .await;
    publishes as f64 / started.elapsed().as_secs_f64()
}

/// Deposits to one account from `clients` clients spread over `writers`; (ops/s, summary,
/// errors). Errors are counted, not fatal: the goal is zero.
async fn hot_deposits(writers: &[String], clients: usize, total: usize) -> (f64, String, usize) {
    let http = reqwest::Client::new();
    let account = format!("hot-{}", uuid::Uuid::now_v7().simple());
    post(
        &http,
        format!("{}/v1/accounts", writers[0]),
        json!({"account_id": account, "currency": "EUR"}),
    )
    .await;
    let per_client = total / clients;
    let bar = progress(
        (clients * per_client) as u64,
        &format!("hot account, {} writer(s)", writers.len()),
    );
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let url = format!(
                "{}/v1/accounts/{account}/deposits",
                writers[client % writers.len()]
            );
            let (http, bar, errors) = (http.clone(), bar.clone(), errors.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let begun = Instant::now();
                    let ok = http
                        .post(&url)
                        .json(&json!({"amount": 1}))
                        .send()
                        .await
                        .is_ok_and(|response| response.status().is_success());
                    if ok {
                        latencies.push(begun.elapsed());
                    } else {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    bar.inc(1);
                }
                latencies
            })
        })
        .collect();
    let latencies = join_latencies(tasks, &bar).await;
    let elapsed = started.elapsed();
    let rate = latencies.len() as f64 / elapsed.as_secs_f64();
    (
        rate,
        summary(latencies, elapsed),
        errors.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// One hot account through one, two and three writers, with one owner per account and without
/// (every writer deciding, the stream arbitrating), next to the sequential publish-and-ack
/// ceiling measured in the same run.
async fn hot_account_suite(
    nats: &NatsServer,
    results: &mut Results,
    total: usize,
) -> anyhow::Result<()> {
    let client = async_nats::connect(nats.url()).await?;
    EventLog::open(client.clone(), &StreamSettings::default()).await?;
    let ceiling = sequential_publish_rate(&client, 2_000).await;
    results.add(
        "raw JetStream: sequential checked publish-and-ack, one subject",
        format!("{ceiling:.0} ops/s"),
    );
    let pipelined = pipelined_publish_rate(&client, 10_000, 64).await;
    results.add(
        "raw JetStream: pipelined publish, 64 acks outstanding, one subject",
        format!("{pipelined:.0} ops/s"),
    );
    let http = reqwest::Client::new();
    let mut one_writer = None;
    for (count, ownership) in [(1, true), (2, true), (3, true), (2, false), (3, false)] {
        let writers: Vec<CofferProcess> = (0..count)
            .map(|index| {
                CofferProcess::start(
                    &format!("hot-writer-{index}"),
                    "writer",
                    &[
                        ("COFFER_NATS_URL", nats.url()),
                        ("COFFER_OWNERSHIP", ownership.to_string()),
                        ("RUST_LOG", "warn".into()),
                    ],
                )
            })
            .collect();
        let urls: Vec<String> = writers.iter().map(CofferProcess::url).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut ready = 0;
            let mut owned = 0;
            for url in &urls {
                if http
                    .get(format!("{url}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|response| response.status().is_success())
                {
                    ready += 1;
                }
                owned += writer_metric(&http, url, "coffer_writer_partitions_owned").await;
            }
            let shared = !ownership || owned == 64;
            if ready == count && shared {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "writers not ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Every writer's view of the owners is at most a beat (1 s) old; wait two.
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        let (rate, summary, errors) = hot_deposits(&urls, 16, total).await;
        let (mut conflicts, mut batches, mut batched) = (0, 0, 0);
        for url in &urls {
            conflicts += writer_metric(&http, url, "coffer_writer_append_conflicts_total").await;
            batches += writer_metric(&http, url, "coffer_writer_account_batches_total").await;
            batched +=
                writer_metric(&http, url, "coffer_writer_account_batch_commands_total").await;
        }
        let base = *one_writer.get_or_insert(rate);
        results.add(
            &format!(
                "deposit, 16 clients, one hot account, {count} writer(s), ownership {}",
                if ownership { "on" } else { "off" }
            ),
            format!(
                "{summary}, {errors} errors, {conflicts} conflicts, {batches} account batches of {:.1} deposits on average ({} deposits alone); {:.2}x one writer, {:.2}x the sequential ceiling",
                batched as f64 / batches.max(1) as f64,
                (total as u64).saturating_sub(batched),
                rate / base,
                rate / ceiling
            ),
        );
        drop(writers);
    }
    Ok(())
}

/// A counter's value in the writer's `/metrics`.
async fn writer_metric(http: &reqwest::Client, writer: &str, name: &str) -> u64 {
    let text = http
        .get(format!("{writer}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    testkit::metric_value(&text, name).map_or(0, |value| value as u64)
}

/// The first command on an account with a long history: replayed in full by a writer that has
/// no snapshot, then, after a restart, from the snapshot that writer left.
async fn snapshot_suite(nats: &NatsServer, results: &mut Results, events: usize) {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let log = EventLog::open(client, &StreamSettings::default())
        .await
        .unwrap();
    let bar = progress(events as u64, "appending the long history");
    let account = fixtures::append_long_history(&log, events, |count| bar.inc(count as u64)).await;
    bar.finish_and_clear();
    let environment = [("COFFER_NATS_URL", nats.url()), ("RUST_LOG", "warn".into())];
    let http = reqwest::Client::new();
    let first = CofferProcess::start("bench-writer-1", "writer", &environment);
    // Listening is not ready: the writer answers 503 until its stream and buckets are set up.
    wait_ready(&http, &first.url()).await.unwrap();
    let replayed = timed_deposit(&http, &first.url(), account.as_str()).await;
    let warm = timed_deposit(&http, &first.url(), account.as_str()).await;
    let written = "coffer_writer_snapshots_written_total";
    let deadline = Instant::now() + Duration::from_secs(60);
    while writer_metric(&http, &first.url(), written).await == 0 {
        assert!(Instant::now() < deadline, "no snapshot written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(first);
    let second = CofferProcess::start("bench-writer-2", "writer", &environment);
    wait_ready(&http, &second.url()).await.unwrap();
    let from_snapshot = timed_deposit(&http, &second.url(), account.as_str()).await;
    let replayed_after =
        writer_metric(&http, &second.url(), "coffer_writer_events_replayed_total").await;
    results.add(
        &format!("first command on an account with {events} events, no snapshot (full replay)"),
        format!("{:.1} ms", replayed.as_secs_f64() * 1e3),
    );
    results.add(
        &format!("first command on an account with {events} events, from its snapshot (restarted writer)"),
        format!(
            "{:.1} ms ({replayed_after} events replayed after the snapshot)",
            from_snapshot.as_secs_f64() * 1e3
        ),
    );
    results.add(
        "next command on that account (actor in memory)",
        format!("{:.1} ms", warm.as_secs_f64() * 1e3),
    );
}

/// Writer memory while `accounts` accounts are each touched once: the live-actor cap and the
/// bounded state cache must hold it flat.
async fn memory_suite(nats: &NatsServer, results: &mut Results, accounts: usize) {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let log = EventLog::open(client, &StreamSettings::default())
        .await
        .unwrap();
    let prefix = format!("mem-{}", uuid::Uuid::now_v7().simple());
    let bar = progress(accounts as u64, "opening accounts (fixture batches)");
    fixtures::open_many(&log, &prefix, accounts, |count| bar.inc(count as u64)).await;
    bar.finish_and_clear();
    let writer = CofferProcess::start(
        "bench-writer-memory",
        "writer",
        &[("COFFER_NATS_URL", nats.url()), ("RUST_LOG", "warn".into())],
    );
    let pid = writer.pid().unwrap();
    let started_kib = rss_kib(pid);
    let http = reqwest::Client::new();
    let bar = progress(accounts as u64, "one deposit per account");
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(started_kib));
    let begun = Instant::now();
    futures::stream::iter(0..accounts)
        .for_each_concurrent(64, |number| {
            let (http, url, bar, peak) = (http.clone(), writer.url(), bar.clone(), peak.clone());
            let account = format!("{prefix}-{number}");
            async move {
                post(
                    &http,
                    format!("{url}/v1/accounts/{account}/deposits"),
                    json!({"amount": 1}),
                )
                .await;
                bar.inc(1);
                if number % 10_000 == 0 {
                    peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
        .await;
    bar.finish_and_clear();
    let elapsed = begun.elapsed();
    let end_kib = rss_kib(pid);
    let peak_kib = peak.load(std::sync::atomic::Ordering::Relaxed).max(end_kib);
    results.add(
        &format!("writer RSS, {accounts} accounts touched once (one deposit each)"),
        format!(
            "start {:.0} MiB, peak {:.0} MiB, end {:.0} MiB ({:.0} deposits/s, 64 HTTP clients)",
            started_kib as f64 / 1024.0,
            peak_kib as f64 / 1024.0,
            end_kib as f64 / 1024.0,
            accounts as f64 / elapsed.as_secs_f64()
        ),
    );
}

/// `GET /v1/accounts` pages: `requests` sequential requests of `query`, timed from the client.
/// Client-side latencies of `requests` sequential listings, the reader's own time for each
/// (its `Server-Timing`), and how many accounts the last page listed.
async fn listing_latencies(
    http: &reqwest::Client,
    reader: &str,
    query: &str,
    requests: usize,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let mut latencies = Vec::with_capacity(requests);
    let mut server = Vec::with_capacity(requests);
    let mut listed = 0;
    for _ in 0..requests {
        let asked = Instant::now();
        let response = http
            .get(format!("{reader}/v1/accounts?{query}"))
            .send()
            .await
            .unwrap();
        let timing = response
            .headers()
            .get("server-timing")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("app;dur="))
            .and_then(|millis| millis.parse::<f64>().ok());
        let page: Value = response.json().await.unwrap();
        latencies.push(asked.elapsed());
        if let Some(millis) = timing {
            server.push(Duration::from_secs_f64(millis / 1_000.0));
        }
        listed = page["accounts"].as_array().map_or(0, Vec::len);
    }
    (latencies, server, listed)
}

/// Accounts with metadata, 1% of them `segment=target`: a fresh reader applies them (with the
/// listing index), then pages of listings are timed over HTTP, next to a raw consume of the
/// same stream.
async fn listing_suite(
    nats: &NatsServer,
    results: &mut Results,
    accounts: usize,
) -> anyhow::Result<()> {
    let client = async_nats::connect(nats.url()).await?;
    let log = EventLog::open(client, &StreamSettings::default()).await?;
    let bar = progress(
        accounts as u64,
        "opening accounts with metadata (fixture batches)",
    );
    let label = |number: usize| {
        let segment = if number.is_multiple_of(100) {
            "target"
        } else {
            "other"
        };
        domain::Metadata::new(
            [
                ("segment".to_string(), segment.to_string()),
                ("user".to_string(), format!("u{number}")),
            ]
            .into(),
        )
        .unwrap_or_default()
    };
    fixtures::open_many_labelled(&log, "ls", accounts, label, |count| bar.inc(count as u64)).await;
    bar.finish_and_clear();
    let last = log.last_position().await?;
    let data = tempfile::tempdir()?;
    let (reader, listening) = start_fresh_reader(nats, data.path(), "listing").await;
    let http = reqwest::Client::new();
    wait_applied(&reader.url(), last, Duration::from_secs(1_800)).await;
    let caught_up = listening.elapsed();
    let raw = raw_consume(&log, last).await;
    results.add(
        &format!("reader catch-up of {accounts} opened accounts (2 metadata entries each, 4 index entries)"),
        format!(
            "{:.0} events/s; raw consume {:.0} events/s; catch-up / raw = {:.2}",
            last as f64 / caught_up.as_secs_f64(),
            last as f64 / raw.as_secs_f64(),
            raw.as_secs_f64() / caught_up.as_secs_f64()
        ),
    );
    let size = std::fs::metadata(data.path().join("views.redb")).map_or(0, |m| m.len());
    results.add(
        "views.redb after the catch-up",
        format!(
            "{:.0} MiB ({:.0} bytes per account)",
            size as f64 / 1_048_576.0,
            size as f64 / accounts as f64
        ),
    );
    let url = reader.url();
    // Warm the page cache as a serving reader's is.
    listing_latencies(&http, &url, "metadata.segment=target&limit=100", 20).await;
    let queries = [
        (
            "first page, metadata.segment=target (1%), limit 100",
            "metadata.segment=target&limit=100".to_string(),
        ),
        (
            "a middle page, metadata.segment=target (after ls-500000)",
            "metadata.segment=target&limit=100&after=ls-500000".to_string(),
        ),
        (
            "metadata.segment=target&currency=EUR&status=open, limit 100",
            "metadata.segment=target&currency=EUR&status=open&limit=100".to_string(),
        ),
        (
            "one account by metadata.user (1 match)",
            format!("metadata.user=u{}&limit=100", accounts / 2),
        ),
        (
            "currency=EUR (all match), limit 100",
            "currency=EUR&limit=100".to_string(),
        ),
        ("no filter, limit 1000", "limit=1000".to_string()),
        (
            "metadata.segment=target&status=closed (no match: scans the 1%)",
            "metadata.segment=target&status=closed&limit=100".to_string(),
        ),
    ];
    for (name, query) in queries {
        // A serving reader has the pages it serves in memory: warm them first.
        listing_latencies(&http, &url, &query, 10).await;
        let (latencies, server, listed) = listing_latencies(&http, &url, &query, 1_000).await;
        results.add(
            &format!("GET /v1/accounts: {name}"),
            format!(
                "{listed} listed; {}; in the reader (Server-Timing) {}",
                latency_summary(latencies),
                latency_summary(server)
            ),
        );
    }
    Ok(())
}

/// Runs `operation(index)` from `clients` concurrent tasks for `seconds`, each task taking the
/// indexes `number, number + clients, ...`; (successes per second, latencies, errors).
async fn timed<F, Fut>(
    clients: usize,
    seconds: u64,
    label: &str,
    operation: F,
) -> (f64, Vec<Duration>, usize)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let bar = progress(seconds, label);
    let stop = Instant::now() + Duration::from_secs(seconds);
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            while Instant::now() < stop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                bar.inc(1);
            }
        })
    };
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|number| {
            let operation = operation.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut index) = (Vec::new(), 0usize, number);
                while Instant::now() < stop {
                    let begun = Instant::now();
                    if operation(index).await {
                        latencies.push(begun.elapsed());
                    } else {
                        errors += 1;
                    }
                    index += clients;
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (done, failed) = task.await.unwrap();
        latencies.extend(done);
        errors += failed;
    }
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    (
        latencies.len() as f64 / elapsed.as_secs_f64(),
        latencies,
        errors,
    )
}

/// Deposits from `clients` clients on `accounts` accounts over HTTP and over NATS (the writer's
/// NATS service, with the official Rust client), next to raw JetStream measured in the same run
/// on the same server with the same concurrency: per-message publish-and-ack on a side stream
/// with the events stream's storage, a pipelined publish, and an explicit-ack consume of the
/// events the deposits stored.
async fn deposits_suite(
    nats: &NatsServer,
    results: &mut Results,
    clients: usize,
    accounts: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let client = async_nats::connect(nats.url()).await?;
    let log = EventLog::open(client.clone(), &StreamSettings::default()).await?;
    let prefix = format!("dep-{}", uuid::Uuid::now_v7().simple());
    fixtures::open_many(&log, &prefix, accounts, |_| {}).await;
    let mut environment = vec![("COFFER_NATS_URL", nats.url()), ("RUST_LOG", "warn".into())];
    // The writer's tokio worker threads (tokio's own variable), for comparing runtimes.
    if let Ok(workers) = std::env::var("BENCH_WRITER_WORKER_THREADS") {
        environment.push(("TOKIO_WORKER_THREADS", workers));
    }
    let writer = CofferProcess::start("deposits-writer", "writer", &environment);
    let http = reqwest::Client::new();
    wait_ready(&http, &writer.url()).await?;
    let pid = writer.pid().context("writer pid")?;
    let url = writer.url();
    // Warm: every account's actor loaded (one deposit each, in bulks), so the rows measure
    // commands on live accounts, not first loads (measured separately: the memory suite).
    for chunk in (0..accounts).collect::<Vec<_>>().chunks(1_000) {
        let commands: Vec<Value> = chunk
            .iter()
            .map(|index| json!({"op": "deposit", "account_id": format!("{prefix}-{index}"), "amount": 1}))
            .collect();
        http.post(format!("{url}/v1/batch"))
            .json(&json!({ "commands": commands }))
            .send()
            .await?
            .error_for_status()?;
    }
    let first = log.last_position().await?;
    let servers: Vec<u32> = nats.pid().into_iter().collect();
    let rows = WriterRows {
        http: &http,
        url: &url,
        pid,
        servers: &servers,
    };
    let mut over_http = Vec::new();
    for clients in [clients, clients * 4] {
        over_http.push(
            rows.add(
                results,
                format!("deposits over HTTP, {clients} clients, {accounts} accounts"),
                clients,
                seconds,
                posted_deposits(&http, &url, &prefix, accounts, 1, Duration::ZERO),
            )
            .await,
        );
    }
    // The HTTP path without the command: what the writer spends on a request that reaches no
    // actor (a probe, and a deposit refused for its body), next to the deposits above.
    rows.add(
        results,
        format!("HTTP floor: GET /healthz, {clients} clients"),
        clients,
        seconds,
        {
            let (http, url) = (http.clone(), url.clone());
            move |_| {
                let request = http.get(format!("{url}/healthz")).send();
                async move {
                    request
                        .await
                        .is_ok_and(|answer| answer.status().is_success())
                }
                .boxed()
            }
        },
    )
    .await;
    rows.add(
        results,
        format!("HTTP floor: deposits refused for their body (amount 0), {clients} clients"),
        clients,
        seconds,
        posted_deposits(&http, &url, &prefix, accounts, 0, Duration::ZERO),
    )
    .await;
    // The same at about a deposit row's rate: each client pauses 10 ms after each answer, so
    // the writer's per-request costs are shared by as few requests per wake as under deposits.
    rows.add(
        results,
        format!(
            "HTTP floor: deposits refused for their body, {clients} clients pausing 10 ms after each answer"
        ),
        clients,
        seconds,
        posted_deposits(&http, &url, &prefix, accounts, 0, Duration::from_millis(10)),
    )
    .await;
    let over_nats = rows
        .add(
            results,
            format!(
                "deposits over NATS (async-nats request), {clients} clients, {accounts} accounts"
            ),
            clients,
            seconds,
            {
                let (client, prefix) = (client.clone(), prefix.clone());
                move |index| {
                    let (client, subject) = (
                        client.clone(),
                        format!("coffer.cmd.{prefix}-{}.deposit", index % accounts),
                    );
                    deposit_over_nats(client, subject).boxed()
                }
            },
        )
        .await;
    // Bulks of 1 000 deposits on distinct accounts from 8 clients; a row counts commands.
    const BULK: usize = 1_000;
    const BULK_CLIENTS: usize = 8;
    let before = WriterSample::take(&http, &url, pid, &servers).await;
    let (bulks_per_second, latencies, errors) = timed(BULK_CLIENTS, seconds, "bulk deposits", {
        let (http, prefix, url) = (http.clone(), prefix.clone(), url.clone());
        move |index| {
            let commands: Vec<Value> = (0..BULK)
                .map(|offset| {
                    json!({"op": "deposit", "account_id": format!("{prefix}-{}", (index * BULK + offset) % accounts), "amount": 1})
                })
                .collect();
            let request = http
                .post(format!("{url}/v1/batch"))
                .json(&json!({ "commands": commands }))
                .send();
            async move {
                match request.await {
                    Ok(answer) if answer.status().is_success() => answer
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|body| {
                            body["results"].as_array().map(|results| {
                                results.iter().all(|result| result["status"] == 200)
                            })
                        })
                        .unwrap_or(false),
                    _ => false,
                }
            }
        }
    })
    .await;
    let after = WriterSample::take(&http, &url, pid, &servers).await;
    let commands = latencies.len() * BULK;
    let over_bulk = results.add_rate(
        &format!(
            "bulk deposits (POST /v1/batch of {BULK}), {BULK_CLIENTS} clients, {accounts} accounts"
        ),
        bulks_per_second * BULK as f64,
        format!(
            "{:.0} commands/s, bulk {}, {errors} errors; {}",
            bulks_per_second * BULK as f64,
            latency_summary(latencies),
            before.cost(&after, commands)
        ),
    );
    let last = log.last_position().await?;

    let context = async_nats::jetstream::new(client.clone());
    let side = format!("BENCH_{}", uuid::Uuid::now_v7().simple());
    let events = log
        .context()
        .get_stream(log.stream_name())
        .await?
        .cached_info()
        .config
        .clone();
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: side.clone(),
            subjects: vec![format!("bench.{side}.>")],
            storage: events.storage,
            num_replicas: events.num_replicas,
            ..Default::default()
        })
        .await?;
    let payload = bytes::Bytes::from(vec![b'x'; 200]);
    let before = CpuSample::take(&servers);
    let measured = timed(clients, seconds, "raw publish-and-ack", {
        let (context, side, payload) = (context.clone(), side.clone(), payload.clone());
        move |index| {
            let (context, subject, payload) = (
                context.clone(),
                format!("bench.{side}.{}", index % accounts),
                payload.clone(),
            );
            async move {
                match context.publish(subject, payload).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                }
            }
        }
    })
    .await;
    let cost = before.cost(&CpuSample::take(&servers), measured.1.len());
    let raw = rate_row(
        results,
        format!("raw JetStream publish-and-ack, {clients} clients, {accounts} subjects"),
        measured,
        cost,
    );
    results.add(
        "ratio deposits / raw publish-and-ack, same concurrency",
        format!(
            "HTTP {:.2} ({} clients: {:.2}), NATS {:.2}, bulk {:.2}",
            over_http[0] / raw.max(1.0),
            clients * 4,
            over_http[1] / raw.max(1.0),
            over_nats / raw.max(1.0),
            over_bulk / raw.max(1.0)
        ),
    );
    let publishes = (raw * seconds as f64) as usize;
    results.add(
        "raw JetStream pipelined publish, 1 024 acks outstanding",
        format!(
            "{:.0}/s",
            pipelined_publish_rate(&client, publishes.max(10_000), 1_024).await
        ),
    );
    context.delete_stream(&side).await?;
    let stored = last.saturating_sub(first);
    let consumed = raw_consume(&log, last).await;
    results.add(
        "raw JetStream explicit-ack consume of the stream (AckAll per 1 000)",
        format!(
            "{:.0} messages/s ({} messages, {stored} of them stored by this suite)",
            last as f64 / consumed.as_secs_f64(),
            last
        ),
    );
    Ok(())
}

/// Raw JetStream atomic batches of `size` messages (200 bytes, no concurrency check, each on one
/// of 10 000 subjects) with `in_flight` batches awaiting their acknowledgement, for `seconds`:
/// messages stored per second. `size` 1 is a plain publish-and-ack.
async fn raw_atomic_rate(
    client: &async_nats::Client,
    prefix: &str,
    size: usize,
    in_flight: usize,
    seconds: u64,
) -> anyhow::Result<(f64, usize)> {
    let stop = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let payload = bytes::Bytes::from(vec![b'x'; 200]);
    let tasks: Vec<_> = (0..in_flight)
        .map(|task| {
            let (client, prefix, payload) = (client.clone(), prefix.to_owned(), payload.clone());
            tokio::spawn(async move {
                let (mut stored, mut next) = (0usize, task * 1_000_003);
                while Instant::now() < stop {
                    let batch = uuid::Uuid::now_v7().simple().to_string();
                    for index in 0..size {
                        let subject = format!("{prefix}.{}", next % 10_000);
                        next += 1;
                        let mut headers = async_nats::HeaderMap::new();
                        if size > 1 {
                            headers.insert("Nats-Batch-Id", batch.as_str());
                            headers.insert("Nats-Batch-Sequence", (index + 1).to_string().as_str());
                        }
                        if index + 1 < size {
                            client
                                .publish_with_headers(subject, headers, payload.clone())
                                .await?;
                            continue;
                        }
                        if size > 1 {
                            headers.insert("Nats-Batch-Commit", "1");
                        }
                        let reply = client
                            .request_with_headers(subject, headers, payload.clone())
                            .await?;
                        let answer: Value = serde_json::from_slice(&reply.payload)?;
                        anyhow::ensure!(answer.get("error").is_none(), "refused: {answer}");
                        stored += size;
                    }
                }
                anyhow::Ok(stored)
            })
        })
        .collect();
    let mut stored = 0;
    for task in tasks {
        stored += task.await??;
    }
    Ok((stored as f64 / started.elapsed().as_secs_f64(), stored))
}

/// The cost model's R1 `always` row again with the event log's own messages on Coffer's stream
/// (one batch in flight, 10 000 accounts): what Coffer's message shape costs the server beyond
/// the raw messages, before any writer, HTTP or actor.
async fn event_log_cost(
    results: &mut Results,
    nats: &NatsServer,
    seconds: u64,
) -> anyhow::Result<()> {
    const SIZES: [usize; 5] = [1, 10, 35, 100, 300];
    const ACCOUNTS: usize = 10_000;
    let client = async_nats::connect(nats.url()).await?;
    let log = EventLog::open(client, &StreamSettings::default()).await?;
    let prefix = format!("cost-{}", uuid::Uuid::now_v7().simple());
    let opened = Event::AccountOpened(OpenAccount {
        metadata: Default::default(),
        currency: Currency::parse("EUR").context("currency")?,
        owner: None,
        overdraft_limit: OverdraftLimit::new(0).context("limit")?,
    });
    let mut accounts = Vec::with_capacity(ACCOUNTS);
    for chunk in (0..ACCOUNTS).collect::<Vec<_>>().chunks(500) {
        let mut entries = Vec::with_capacity(chunk.len());
        let mut ids = Vec::with_capacity(chunk.len());
        for index in chunk {
            let account = AccountId::parse(&format!("{prefix}-{index}")).context("account id")?;
            let chain = eventlog::chain::next(eventlog::chain::GENESIS, &account, &opened)?;
            entries.push(Entry::Event {
                account: account.clone(),
                expected_last_position: 0,
                event: opened.clone(),
                metadata: EventMetadata {
                    command_id: uuid::Uuid::now_v7().to_string(),
                    correlation_id: "bench".into(),
                    traceparent: None,
                },
                chain: chain.clone(),
            });
            ids.push((account, chain));
        }
        let appended = log.append_atomic(&entries).await?;
        for (index, (account, chain)) in ids.into_iter().enumerate() {
            accounts.push((account, appended.position_of(index), chain));
        }
    }
    let servers: Vec<u32> = nats.pid().into_iter().collect();
    let mut points = CostPoints::default();
    for size in SIZES {
        let before = CpuSample::take(&servers);
        let measured = event_log_atomic_rate(&log, &mut accounts, size, seconds).await?;
        points.add(size, 1, measured, &before, &CpuSample::take(&servers));
    }
    results.add(
        "event log atomic batches of deposits (Coffer's subjects, headers, per-account checks, republish), R1, sync_interval: always, 1 in flight (batch size: messages/s (server CPU per batch))",
        points.summary(),
    );
    Ok(())
}

/// One cost-model row: messages per second and the servers' CPU per batch at each batch size,
/// and the lines fitted to the time and the CPU per batch.
#[derive(Default)]
struct CostPoints {
    /// (batch size, seconds per batch as one batch in flight sees it).
    wall: Vec<(f64, f64)>,
    /// (batch size, the servers' CPU seconds per batch: all three nodes at R3).
    cpu: Vec<(f64, f64)>,
    cells: Vec<String>,
}

impl CostPoints {
    /// `stored` messages at `rate` in batches of `size`, `in_flight` at once, between two
    /// samples of the servers' CPU.
    fn add(
        &mut self,
        size: usize,
        in_flight: usize,
        (rate, stored): (f64, usize),
        before: &CpuSample,
        after: &CpuSample,
    ) {
        self.wall
            .push((size as f64, in_flight as f64 * size as f64 / rate.max(1.0)));
        let cpu = (after.servers - before.servers) / (stored / size).max(1) as f64;
        self.cpu.push((size as f64, cpu));
        self.cells
            .push(format!("{size}: {rate:.0} ({:.2} ms CPU)", cpu * 1e3));
    }

    fn summary(&self) -> String {
        let (fixed, per_message) = fit_line(&self.wall);
        let (cpu_fixed, cpu_per_message) = fit_line(&self.cpu);
        format!(
            "{}; fit: {:.2} ms per batch + {:.1} us per message; server CPU fit: {:.2} ms per batch + {:.1} us per message",
            self.cells.join(", "),
            fixed * 1e3,
            per_message * 1e6,
            cpu_fixed * 1e3,
            cpu_per_message * 1e6
        )
    }
}

/// Atomic batches of `size` deposits as the event log appends them (Coffer's subjects through
/// the stream's transform, a dozen headers, each event checked against its account's last
/// position on the account's `>` filter, the chain, the republish), one batch in flight, over
/// `accounts` opened first: messages per second and how many were stored.
async fn event_log_atomic_rate(
    log: &EventLog,
    accounts: &mut [(AccountId, u64, String)],
    size: usize,
    seconds: u64,
) -> anyhow::Result<(f64, usize)> {
    let stop = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let (mut stored, mut next) = (0usize, 0usize);
    let event = Event::Deposited {
        metadata: Default::default(),
        amount: Amount::new(1).context("amount")?,
        reference: None,
    };
    while Instant::now() < stop {
        let members: Vec<usize> = (0..size)
            .map(|offset| (next + offset) % accounts.len())
            .collect();
        next += size;
        let mut entries = Vec::with_capacity(size);
        for &member in &members {
            let (account, position, chain) = &accounts[member];
            let chain = eventlog::chain::next(chain, account, &event)?;
            entries.push(Entry::Event {
                account: account.clone(),
                expected_last_position: *position,
                event: event.clone(),
                metadata: EventMetadata {
                    command_id: uuid::Uuid::now_v7().to_string(),
                    correlation_id: uuid::Uuid::now_v7().to_string(),
                    traceparent: Some(format!(
                        "00-{}-{}-01",
                        uuid::Uuid::now_v7().simple(),
                        &uuid::Uuid::now_v7().simple().to_string()[..16]
                    )),
                },
                chain,
            });
        }
        let appended = log.append_atomic(&entries).await?;
        for (index, (member, entry)) in members.into_iter().zip(entries).enumerate() {
            if let Entry::Event { chain, .. } = entry {
                accounts[member].1 = appended.position_of(index);
                accounts[member].2 = chain;
            }
        }
        stored += size;
    }
    Ok((stored as f64 / started.elapsed().as_secs_f64(), stored))
}

/// The server's cost model, measured: raw atomic batches of 1/10/35/100/300 messages with one and
/// eight in flight, under `sync_interval: always` and the NATS default (R1), and at R3 on a
/// three-node cluster (`always`). Each row also gives the fixed and per-message cost fitted to
/// its sizes (least squares on the time per batch).
async fn cost_model_suite(results: &mut Results, seconds: u64) -> anyhow::Result<()> {
    const SIZES: [usize; 5] = [1, 10, 35, 100, 300];
    let always = NatsServer::start();
    let default = NatsServer::start_with_default_sync();
    let cluster = testkit::NatsCluster::start();
    let pids = |servers: &[&NatsServer]| -> Vec<u32> {
        servers.iter().filter_map(|server| server.pid()).collect()
    };
    event_log_cost(results, &always, seconds).await?;
    let setups: [(&str, String, usize, Vec<u32>); 3] = [
        (
            "R1, sync_interval: always",
            always.url(),
            1,
            pids(&[&always]),
        ),
        ("R1, NATS default sync", default.url(), 1, pids(&[&default])),
        (
            "R3 (3 nodes), sync_interval: always",
            cluster.urls(),
            3,
            pids(&cluster.nodes.iter().collect::<Vec<_>>()),
        ),
    ];
    for (label, url, replicas, pids) in setups {
        let servers = url
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<async_nats::ServerAddr>, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(10))
            .connect(servers)
            .await?;
        let context = async_nats::jetstream::new(client.clone());
        let name = format!("COST_{}", uuid::Uuid::now_v7().simple());
        let prefix = format!("cost.{name}");
        let mut created = None;
        for _ in 0..50 {
            match context
                .create_stream(async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{prefix}.>")],
                    storage: async_nats::jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    allow_atomic_publish: true,
                    ..Default::default()
                })
                .await
            {
                Ok(stream) => {
                    created = Some(stream);
                    break;
                }
                // A cluster still electing its meta leader.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        anyhow::ensure!(created.is_some(), "create the cost-model stream on {label}");
        for in_flight in [1usize, 8] {
            let mut points = CostPoints::default();
            for size in SIZES {
                let before = CpuSample::take(&pids);
                let measured = raw_atomic_rate(&client, &prefix, size, in_flight, seconds).await?;
                points.add(size, in_flight, measured, &before, &CpuSample::take(&pids));
            }
            results.add(
                &format!(
                    "raw atomic batches, {label}, {in_flight} in flight (batch size: messages/s (server CPU per batch))"
                ),
                points.summary(),
            );
        }
        if replicas == 3 {
            let (raw, _) = raw_atomic_rate(&client, &prefix, 1, 64, seconds * 2).await?;
            let deposits = writer_deposits_over_nats(&url, &pids, &client, 64, seconds * 2).await?;
            results.add(
                &format!(
                    "{label}: deposits over NATS through a writer, 64 clients, 10000 accounts"
                ),
                format!("{deposits}; raw publish-and-ack, 64 in flight: {raw:.0}/s"),
            );
        }
        context.delete_stream(&name).await?;
    }
    Ok(())
}

/// Deposits over NATS through a writer on `urls` (the events stream at R3), `clients` at once
/// on 10 000 warm accounts: the rate and the writer's batch sizes.
async fn writer_deposits_over_nats(
    urls: &str,
    servers: &[u32],
    client: &async_nats::Client,
    clients: usize,
    seconds: u64,
) -> anyhow::Result<String> {
    const ACCOUNTS: usize = 10_000;
    let writer = CofferProcess::start(
        "cost-writer",
        "writer",
        &[
            ("COFFER_NATS_URL", urls.to_owned()),
            ("COFFER_STREAM_REPLICAS", "3".into()),
            ("RUST_LOG", "warn".into()),
        ],
    );
    let http = reqwest::Client::new();
    wait_ready(&http, &writer.url()).await?;
    let url = writer.url();
    let prefix = format!("r3-{}", uuid::Uuid::now_v7().simple());
    for op in ["open", "deposit"] {
        for chunk in (0..ACCOUNTS).collect::<Vec<_>>().chunks(1_000) {
            let commands: Vec<Value> = chunk
                .iter()
                .map(|index| json!({"op": op, "account_id": format!("{prefix}-{index}"), "currency": "EUR", "amount": 1}))
                .map(|mut command| {
                    // Each op takes only its own fields.
                    let fields = command.as_object_mut().unwrap();
                    if op == "open" {
                        fields.remove("amount");
                    } else {
                        fields.remove("currency");
                    }
                    command
                })
                .collect();
            http.post(format!("{url}/v1/batch"))
                .json(&json!({ "commands": commands }))
                .send()
                .await?
                .error_for_status()?;
        }
    }
    let pid = writer.pid().context("writer pid")?;
    let before = WriterSample::take(&http, &url, pid, servers).await;
    let (rate, latencies, errors) = timed(clients, seconds, "R3 deposits over NATS", {
        let (client, prefix) = (client.clone(), prefix.clone());
        move |index| {
            let (client, subject) = (
                client.clone(),
                format!("coffer.cmd.{prefix}-{}.deposit", index % ACCOUNTS),
            );
            deposit_over_nats(client, subject)
        }
    })
    .await;
    let after = WriterSample::take(&http, &url, pid, servers).await;
    let commands = latencies.len();
    Ok(format!(
        "{rate:.0}/s, {}, {errors} errors; {}",
        latency_summary(latencies),
        before.cost(&after, commands)
    ))
}

/// Least-squares line through `points`: (intercept, slope).
fn fit_line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in points {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - slope * mx, slope)
}

fn write_report(results: &Results, options: &Options) -> anyhow::Result<()> {
    if let Some(path) = &options.json {
        let machine = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("model name"))
                    .map(|model| model.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        let rows: Vec<Value> = results
            .rows
            .iter()
            .map(|(name, value)| json!({"benchmark": name, "result": value}))
            .collect();
        let document = json!({
            "suite": format!("{:?}", options.suite),
            "durability": format!("{:?}", options.durability),
            "machine": {
                "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
                "model": machine,
            },
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&document)?)
            .with_context(|| format!("write {}", path.display()))?;
        println!("JSON written to {}", path.display());
    }
    if let Some(path) = &options.report {
        let mut markdown = String::from("| benchmark | result |\n|---|---|\n");
        for (name, value) in &results.rows {
            markdown.push_str(&format!("| {name} | {value} |\n"));
        }
        std::fs::write(path, markdown).with_context(|| format!("write {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let scale = options.scale.max(1);
    let mut results = Results { rows: Vec::new() };
    let nats = match options.durability {
        Durability::Always => NatsServer::start(),
        Durability::Default => NatsServer::start_with_default_sync(),
    };
    match options.suite {
        Suite::Throughput => {}
        Suite::Snapshot => {
            snapshot_suite(&nats, &mut results, options.history_events).await;
            return write_report(&results, &options);
        }
        Suite::Memory => {
            memory_suite(&nats, &mut results, options.memory_accounts).await;
            return write_report(&results, &options);
        }
        Suite::Deposits => {
            deposits_suite(&nats, &mut results, 64, 10_000, options.seconds).await?;
            return write_report(&results, &options);
        }
        Suite::HalfLoad => {
            half_load_suite(&nats, &mut results, 64).await?;
            return write_report(&results, &options);
        }
        Suite::HotAccount => {
            hot_account_suite(&nats, &mut results, options.hot_deposits).await?;
            return write_report(&results, &options);
        }
        Suite::Flows => {
            flows_suite(&nats, &mut results, 200 * scale).await?;
            return write_report(&results, &options);
        }
        Suite::CostModel => {
            drop(nats);
            cost_model_suite(&mut results, options.seconds.clamp(1, 5)).await?;
            return write_report(&results, &options);
        }
        Suite::Listing => {
            listing_suite(&nats, &mut results, options.listing_accounts).await?;
            return write_report(&results, &options);
        }
        Suite::Signing => {
            signing_suite(&nats, &mut results, 1_000 * scale).await?;
            return write_report(&results, &options);
        }
        Suite::CatchUp => {
            let client = async_nats::connect(nats.url()).await?;
            let log = Arc::new(EventLog::open(client, &StreamSettings::default()).await?);
            catch_up_suite(&nats, &log, &mut results, 1_000 * scale).await?;
            return write_report(&results, &options);
        }
    }
    let writer = CofferProcess::start(
        "bench-writer",
        "writer",
        &[("COFFER_NATS_URL", nats.url()), ("RUST_LOG", "warn".into())],
    );
    let data = tempfile::tempdir().context("temp dir")?;
    let reader_env = [
        ("COFFER_NATS_URL", nats.url()),
        ("COFFER_DATA_DIR", data.path().display().to_string()),
        ("COFFER_READER_NAME", "bench".into()),
        ("COFFER_MIN_POSITION_WAIT_MS", "60000".into()),
        ("RUST_LOG", "warn".into()),
    ];
    let reader = CofferProcess::start("bench-reader", "reader", &reader_env);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (w, r) = (writer.url(), reader.url());

    results.add(
        "deposit, 1 client",
        deposits(&w, 1, 500 * scale, false).await,
    );
    results.add(
        "deposit, 16 clients, 16 accounts",
        deposits(&w, 16, 200 * scale, false).await,
    );
    results.add(
        "deposit, 64 clients, 64 accounts",
        deposits(&w, 64, 60 * scale, false).await,
    );
    results.add(
        "deposit, 16 clients, one hot account",
        deposits(&w, 16, 60 * scale, true).await,
    );
    results.add(
        "transfer (atomic, 201 completed), 1 client",
        transfers(&w, 1, 500 * scale).await,
    );
    results.add(
        "transfer (atomic, 201 completed), 16 clients, 16 account pairs",
        transfers(&w, 16, 200 * scale).await,
    );
    let (waiting, plain) = read_your_writes(&w, &r, 300 * scale).await;
    results.add(
        "reader GET with min_position right after the write",
        waiting,
    );
    results.add("reader GET without min_position", plain);

    let client = async_nats::connect(nats.url()).await?;
    let log = Arc::new(EventLog::open(client, &StreamSettings::default()).await?);
    let long = append_bulk(&log, 1, 1_000).await;
    let short = append_bulk(&log, 1, 10).await;
    let (direct, ordered) = history_load(&log, &long[0], 30).await;
    results.add("history load, batched direct get, 1000 events", direct);
    results.add("history load, ordered consumer, 1000 events", ordered);
    let (direct, ordered) = history_load(&log, &short[0], 100).await;
    results.add("history load, batched direct get, 10 events", direct);
    results.add("history load, ordered consumer, 10 events", ordered);
    let (single, batch) = append_baseline(&log, 300).await;
    results.add("raw JetStream: one checked publish (R1)", single);
    results.add(
        "raw JetStream: atomic batch, 2 checked events + marker (R1)",
        batch,
    );

    catch_up_suite(&nats, &log, &mut results, 200 * scale).await?;

    // Memory per live account actor: touch many accounts through the writer.
    let writer_pid = writer.pid().context("writer pid")?;
    let before = rss_kib(writer_pid);
    let accounts = 5_000 * scale;
    let http = reqwest::Client::new();
    let bar = progress(accounts as u64, "opening accounts (actor memory)");
    let ids: Vec<String> = (0..accounts)
        .map(|index| format!("mem-{index}-{}", uuid::Uuid::now_v7().simple()))
        .collect();
    futures::stream::iter(ids)
        .for_each_concurrent(32, |id| {
            let (http, w, bar) = (http.clone(), w.clone(), bar.clone());
            async move {
                post(
                    &http,
                    format!("{w}/v1/accounts"),
                    json!({"account_id": id, "currency": "EUR"}),
                )
                .await;
                post(
                    &http,
                    format!("{w}/v1/accounts/{id}/deposits"),
                    json!({"amount": 5}),
                )
                .await;
                bar.inc(1);
            }
        })
        .await;
    bar.finish_and_clear();
    let after = rss_kib(writer_pid);
    results.add(
        "writer RSS per live account actor",
        format!(
            "{:.0} bytes ({accounts} actors, RSS {before} KiB -> {after} KiB)",
            (after.saturating_sub(before) * 1024) as f64 / accounts as f64
        ),
    );
    results.add("writer RSS", format!("{after} KiB"));
    results.add(
        "reader RSS after the workloads",
        format!("{} KiB", rss_kib(reader.pid().unwrap_or(0))),
    );

    write_report(&results, &options)
}
