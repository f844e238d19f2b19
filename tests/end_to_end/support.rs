//! Shared helpers: processes, an HTTP client, and a replay of the stream to compare views with.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use domain::Event;
use eventlog::{EventLog, RecordedEvent, StreamSettings};
use serde_json::Value;
use testkit::CofferProcess;

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

pub fn writer(name: &str, nats_urls: &str, extra: &[(&str, String)]) -> CofferProcess {
    let mut environment = vec![("COFFER_NATS_URL", nats_urls.to_string())];
    environment.extend(extra.iter().cloned());
    let process = CofferProcess::start(name, "writer", &environment);
    started(process)
}

/// `process` once it answers ready. A fresh three-node cluster on a loaded two-core machine can
/// take a while to elect its JetStream leaders, so it gets longer than [`wait_ready`]; if it never
/// gets there, the panic shows the end of its log.
fn started(process: CofferProcess) -> CofferProcess {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if status_of(&format!("{}/readyz", process.url())).is_ok_and(|status| status == 200) {
            return process;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = process.log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    panic!(
        "{} not ready within 90 s; the end of its log:\n{}",
        process.url(),
        tail.join("\n")
    );
}

pub fn reader(
    name: &str,
    nats_urls: &str,
    data_dir: &std::path::Path,
    extra: &[(&str, String)],
) -> CofferProcess {
    let mut environment = vec![
        ("COFFER_NATS_URL", nats_urls.to_string()),
        ("COFFER_READER_NAME", name.to_string()),
        ("COFFER_DATA_DIR", data_dir.display().to_string()),
    ];
    environment.extend(extra.iter().cloned());
    CofferProcess::start(name, "reader", &environment)
}

pub fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if status_of(&format!("{url}/readyz")).is_ok_and(|status| status == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{url} not ready within 30 s");
}

/// The status of a GET over a plain TCP connection: usable outside an async runtime.
pub fn status_of(url: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))
}

/// HTTP helpers over async reqwest.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

impl Http {
    pub fn new() -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap(),
        }
    }

    pub async fn post(&self, url: &str, body: &Value, key: Option<&str>) -> Result<Reply, String> {
        let mut request = self.client.post(url).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }

    pub async fn get(&self, url: &str) -> Result<Reply, String> {
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }

    /// Opens a EUR account through the writer at `writer`.
    pub async fn open_account(&self, writer: &str, account: &str) -> Reply {
        let body = serde_json::json!({"account_id": account, "currency": "EUR"});
        self.post(&format!("{writer}/v1/accounts"), &body, None)
            .await
            .unwrap()
    }

    /// Deposits `body` (`{"amount", "reference"?}`) through the writer at `writer`.
    pub async fn deposit(
        &self,
        writer: &str,
        account: &str,
        body: &Value,
        key: Option<&str>,
    ) -> Result<Reply, String> {
        self.post(
            &format!("{writer}/v1/accounts/{account}/deposits"),
            body,
            key,
        )
        .await
    }

    /// The value of a metric on `/metrics`.
    pub async fn metric(&self, base: &str, name: &str) -> Option<f64> {
        let text = self
            .client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        testkit::metric_value(&text, name)
    }
}

/// Every event of the stream, in order.
pub async fn read_stream(nats_urls: &str) -> Vec<RecordedEvent> {
    let servers: Vec<async_nats::ServerAddr> = nats_urls
        .split(',')
        .map(|url| url.parse().unwrap())
        .collect();
    let client = async_nats::connect(servers).await.unwrap();
    let log = EventLog::new(client, &StreamSettings::default());
    let mut events = Vec::new();
    loop {
        let after = events
            .last()
            .map_or(0, |event: &RecordedEvent| event.position);
        let page = log.read_after(after, 1_000).await.unwrap();
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

/// What the stream says, folded independently of the reader's code.
#[derive(Debug, Default)]
pub struct Replay {
    /// Account -> (balance, version, overdraft limit, closed).
    pub accounts: BTreeMap<String, (i64, u64, u64, bool)>,
    pub deposited: i64,
    pub withdrawn: i64,
    pub debits: HashMap<String, usize>,
    pub credits: HashMap<String, usize>,
    /// How many deposits carry each reference (tests use unique references).
    pub references: HashMap<String, usize>,
    /// Transaction id -> (parts stored, parts it says it has).
    pub transactions: HashMap<String, (usize, usize)>,
    /// Original -> the distinct transactions that reversed it.
    pub reversals: HashMap<String, std::collections::BTreeSet<String>>,
}

impl Replay {
    pub fn of(events: &[RecordedEvent]) -> Self {
        let mut replay = Replay::default();
        for recorded in events {
            let account = recorded.account_id.to_string();
            if let Event::AccountOpened(open) = &recorded.event {
                replay.accounts.insert(
                    account.clone(),
                    (0, 0, open.overdraft_limit.minor_units(), false),
                );
            }
            let Some(entry) = replay.accounts.get_mut(&account) else {
                continue;
            };
            entry.0 += recorded.event.balance_change();
            entry.1 += 1;
            match &recorded.event {
                Event::AccountClosed => entry.3 = true,
                Event::Deposited {
                    amount, reference, ..
                } => {
                    replay.deposited += amount.signed();
                    if let Some(reference) = reference {
                        *replay.references.entry(reference.clone()).or_default() += 1;
                    }
                }
                Event::Withdrawn { amount, .. } => replay.withdrawn += amount.signed(),
                Event::TransferDebited { transfer_id, .. } => {
                    *replay.debits.entry(transfer_id.to_string()).or_default() += 1
                }
                Event::TransferCredited { transfer_id, .. } => {
                    *replay.credits.entry(transfer_id.to_string()).or_default() += 1
                }
                Event::TransactionPosted {
                    transaction_id,
                    parts,
                    reverses,
                    ..
                } => {
                    let entry = replay
                        .transactions
                        .entry(transaction_id.to_string())
                        .or_insert((0, usize::from(*parts)));
                    entry.0 += 1;
                    if let Some(original) = reverses {
                        replay
                            .reversals
                            .entry(original.to_string())
                            .or_default()
                            .insert(transaction_id.to_string());
                    }
                }
                _ => {}
            }
        }
        replay
    }

    pub fn total_balance(&self) -> i64 {
        self.accounts.values().map(|entry| entry.0).sum()
    }
}

/// Checks that a reader's account views equal the replay, after it applied `position`.
pub async fn assert_views_equal_replay(
    http: &Http,
    reader_url: &str,
    replay: &Replay,
    position: u64,
) {
    for (account, (balance, version, limit, closed)) in &replay.accounts {
        let reply = http
            .get(&format!(
                "{reader_url}/v1/accounts/{account}?min_position={position}"
            ))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{account}: {:?}", reply.body);
        assert_eq!(
            reply.body["balance"].as_i64(),
            Some(*balance),
            "{account} balance"
        );
        assert_eq!(
            reply.body["version"].as_u64(),
            Some(*version),
            "{account} version"
        );
        assert_eq!(
            reply.body["overdraft_limit"].as_u64(),
            Some(*limit),
            "{account} limit"
        );
        let status = if *closed { "closed" } else { "open" };
        assert_eq!(reply.body["status"], status, "{account} status");
    }
}

/// Runs `coffer` with `args` and `environment` against `nats_url` until it exits (at most
/// 30 s; a process still running then fails the test): (success, stderr).
pub fn run_to_exit(
    nats_url: &str,
    args: &[&str],
    environment: &[(&str, String)],
) -> (bool, String) {
    let mut child = std::process::Command::new(testkit::coffer_binary())
        .args(args)
        .env("COFFER_NATS_URL", nats_url)
        .env(
            "COFFER_HTTP_ADDR",
            format!("127.0.0.1:{}", testkit::free_port()),
        )
        .envs(environment.iter().map(|(key, value)| (key, value)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            return (status.success(), stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("coffer {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
