//! The writer against a real nats-server, over real HTTP: status codes, idempotency across
//! restarts and writers, concurrent writers, passivation, crashes and NATS outages.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::AccountId;
use eventlog::{EventLog, NatsSettings, StreamSettings};
use serde_json::{json, Value};
use testkit::NatsServer;
use writer::actor::ActorContext;
use writer::idempotency::{AnswerStore, TransferIdClaims};
use writer::metrics::Metrics;
use writer::registry::{Registry, RegistrySettings};
use writer::request::CommandRequest;
use writer::WriterConfig;

/// A writer running in this process on its own port, stopped on drop.
struct TestWriter {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

impl TestWriter {
    async fn start(nats_url: &str, registry: RegistrySettings, process_transfers: bool) -> Self {
        let port = testkit::free_port();
        let config = WriterConfig {
            nats: NatsSettings {
                url: nats_url.into(),
                client_name: "test-writer".into(),
                ..Default::default()
            },
            http_address: format!("127.0.0.1:{port}").parse().unwrap(),
            stream: StreamSettings::default(),
            registry,
            process_transfers,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            writer::run(config, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let writer = Self {
            url: format!("http://127.0.0.1:{port}"),
            stop: Some(stop),
            task: Some(task),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(response) = writer
                .http
                .get(format!("{}/readyz", writer.url))
                .send()
                .await
            {
                if response.status() == 200 {
                    return writer;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("writer not ready");
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("writer stops within 10 s")
                .unwrap();
        }
    }

    async fn post(&self, path: &str, body: Value, key: Option<&str>) -> Reply {
        let mut request = self.http.post(format!("{}{path}", self.url)).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        reply(request.send().await.unwrap()).await
    }

    async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Reply {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        reply(response).await
    }

    async fn open(&self, id: &str, overdraft: u64) -> Reply {
        self.post(
            "/v1/accounts",
            json!({"account_id": id, "currency": "EUR", "overdraft_limit": overdraft}),
            None,
        )
        .await
    }

    async fn deposit(&self, id: &str, amount: i64, key: Option<&str>) -> Reply {
        self.post(
            &format!("/v1/accounts/{id}/deposits"),
            json!({"amount": amount}),
            key,
        )
        .await
    }

    async fn withdraw(&self, id: &str, amount: i64) -> Reply {
        self.post(
            &format!("/v1/accounts/{id}/withdrawals"),
            json!({"amount": amount}),
            None,
        )
        .await
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

impl Drop for TestWriter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn reply(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

#[tokio::test]
async fn every_command_status_code_of_the_contract() {
    let nats = NatsServer::start();
    // Without the process manager transfers stay pending, which `transfer_pending` needs.
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default(), false).await;
    let a = unique("a");
    let b = unique("b");

    let opened = writer.open(&a, 0).await;
    assert_eq!(opened.status, 201);
    assert_eq!(opened.body["account_id"], a.as_str());
    assert!(opened.body["position"].as_u64().unwrap() > 0);
    assert_eq!(writer.open(&b, 0).await.status, 201);
    let again = writer.open(&a, 0).await;
    assert_eq!((again.status, again.code()), (409, "account_exists"));
    assert!(again.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/problem+json"));

    let bad = writer
        .post("/v1/accounts", json!({"currency": "eur"}), None)
        .await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_request"));
    let missing = writer.deposit(&unique("ghost"), 5, None).await;
    assert_eq!((missing.status, missing.code()), (404, "account_not_found"));

    let deposited = writer.deposit(&a, 100, None).await;
    assert_eq!(
        (deposited.status, deposited.body["balance"].as_i64()),
        (200, Some(100))
    );
    let withdrawn = writer.withdraw(&a, 30).await;
    assert_eq!(
        (withdrawn.status, withdrawn.body["balance"].as_i64()),
        (200, Some(70))
    );
    let overdraw = writer.withdraw(&a, 71).await;
    assert_eq!(
        (overdraw.status, overdraw.code()),
        (422, "insufficient_funds")
    );

    let to_self = writer
        .post(
            "/v1/transfers",
            json!({"from": a, "to": a, "amount": 1}),
            None,
        )
        .await;
    assert_eq!((to_self.status, to_self.code()), (422, "same_account"));
    let transfer = writer
        .post(
            "/v1/transfers",
            json!({"transfer_id": "t-1", "from": a, "to": b, "amount": 70}),
            None,
        )
        .await;
    assert_eq!(transfer.status, 202);
    assert_eq!(transfer.body["status"], "pending");
    assert_eq!(transfer.headers["location"], "/v1/transfers/t-1");
    let reused = writer
        .post(
            "/v1/transfers",
            json!({"transfer_id": "t-1", "from": a, "to": b, "amount": 71}),
            None,
        )
        .await;
    assert_eq!(
        (reused.status, reused.code()),
        (409, "idempotency_key_reused")
    );
    let retried = writer
        .post(
            "/v1/transfers",
            json!({"transfer_id": "t-1", "from": a, "to": b, "amount": 70}),
            None,
        )
        .await;
    assert_eq!((retried.status, &retried.body), (202, &transfer.body));

    let pending = writer
        .post(&format!("/v1/accounts/{a}/close"), json!({}), None)
        .await;
    assert_eq!((pending.status, pending.code()), (422, "transfer_pending"));
    let not_zero = writer
        .post(&format!("/v1/accounts/{b}/close"), json!({}), None)
        .await;
    assert_eq!(
        not_zero.status, 200,
        "b has balance 0 (credit not processed): {:?}",
        not_zero.body
    );
    let closed = writer.deposit(&b, 5, None).await;
    assert_eq!((closed.status, closed.code()), (409, "account_closed"));
    writer.deposit(&a, 5, None).await;

    let c = unique("c");
    writer.open(&c, 0).await;
    writer.deposit(&c, 5, None).await;
    let balance = writer
        .post(&format!("/v1/accounts/{c}/close"), json!({}), None)
        .await;
    assert_eq!((balance.status, balance.code()), (422, "balance_not_zero"));

    let key = unique("key");
    assert_eq!(writer.deposit(&c, 1, Some(&key)).await.status, 200);
    let reuse = writer.deposit(&c, 2, Some(&key)).await;
    assert_eq!(
        (reuse.status, reuse.code()),
        (409, "idempotency_key_reused")
    );

    let large = writer
        .post_raw(
            &format!("/v1/accounts/{c}/deposits"),
            "application/json",
            vec![b' '; 65 * 1024],
        )
        .await;
    assert_eq!((large.status, large.code()), (413, "payload_too_large"));
    let text = writer
        .post_raw(
            &format!("/v1/accounts/{c}/deposits"),
            "text/plain",
            br#"{"amount":1}"#.to_vec(),
        )
        .await;
    assert_eq!((text.status, text.code()), (415, "unsupported_media_type"));
    let overflow = writer.deposit(&c, 9_007_199_254_740_992, None).await;
    assert_eq!((overflow.status, overflow.code()), (400, "invalid_request"));

    // Refused commands appended nothing: c's balance is exactly 5 + 1.
    let last = writer.deposit(&c, 1, None).await;
    assert_eq!(last.body["balance"].as_i64(), Some(7));
    writer.stop().await;
}

#[tokio::test]
async fn idempotent_retry_in_process_after_restart_and_through_another_writer() {
    let nats = NatsServer::start();
    let first = TestWriter::start(&nats.url(), RegistrySettings::default(), true).await;
    let a = unique("idem");
    first.open(&a, 0).await;
    let key = unique("k");
    let original = first.deposit(&a, 250, Some(&key)).await;
    assert_eq!(original.status, 200);
    let same_process = first.deposit(&a, 250, Some(&key)).await;
    assert_eq!(
        (same_process.status, &same_process.body),
        (200, &original.body)
    );

    // A refusal is also repeated as it was, even after the balance would allow the request.
    let refusal_key = unique("r");
    let refused = first.withdraw_keyed(&a, 1_000, &refusal_key).await;
    assert_eq!(refused.code(), "insufficient_funds");
    first.deposit(&a, 10_000, None).await;
    first.stop().await;

    let restarted = TestWriter::start(&nats.url(), RegistrySettings::default(), true).await;
    let after_restart = restarted.deposit(&a, 250, Some(&key)).await;
    assert_eq!(
        (after_restart.status, &after_restart.body),
        (200, &original.body)
    );
    let refused_again = restarted.withdraw_keyed(&a, 1_000, &refusal_key).await;
    assert_eq!(
        (refused_again.status, refused_again.code()),
        (422, "insufficient_funds")
    );

    let second = TestWriter::start(&nats.url(), RegistrySettings::default(), true).await;
    let through_second = second.deposit(&a, 250, Some(&key)).await;
    assert_eq!(
        (through_second.status, &through_second.body),
        (200, &original.body)
    );
    // Two writers racing the same new key: one appends, both answer the same.
    let race_key = unique("race");
    let (x, y) = tokio::join!(
        restarted.deposit(&a, 7, Some(&race_key)),
        second.deposit(&a, 7, Some(&race_key))
    );
    assert_eq!((x.status, y.status), (200, 200));
    assert_eq!(x.body, y.body);
    // 250 once, 10 000, 7 once.
    let check = second.deposit(&a, 1, None).await;
    assert_eq!(check.body["balance"].as_i64(), Some(250 + 10_000 + 7 + 1));

    // A create without an id but with a key makes one account, however often it is retried.
    let create_key = unique("create");
    let created = second
        .post(
            "/v1/accounts",
            json!({"currency": "USD"}),
            Some(&create_key),
        )
        .await;
    let created_again = restarted
        .post(
            "/v1/accounts",
            json!({"currency": "USD"}),
            Some(&create_key),
        )
        .await;
    assert_eq!((created.status, created_again.status), (201, 201));
    assert_eq!(created.body, created_again.body);
    restarted.stop().await;
    second.stop().await;
}

impl TestWriter {
    async fn withdraw_keyed(&self, id: &str, amount: i64, key: &str) -> Reply {
        self.post(
            &format!("/v1/accounts/{id}/withdrawals"),
            json!({"amount": amount}),
            Some(key),
        )
        .await
    }
}

#[tokio::test]
async fn two_writers_hammering_the_same_accounts_lose_no_update() {
    let nats = NatsServer::start();
    let writers = Arc::new([
        TestWriter::start(&nats.url(), RegistrySettings::default(), false).await,
        TestWriter::start(&nats.url(), RegistrySettings::default(), false).await,
    ]);
    let accounts: Vec<String> = (0..4).map(|_| unique("hot")).collect();
    for account in &accounts {
        assert_eq!(writers[0].open(account, 1_000_000).await.status, 201);
    }
    let mut tasks = Vec::new();
    for client in 0..8usize {
        let writers = writers.clone();
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = vec![0i64; accounts.len()];
            for step in 0..40usize {
                let index = (client + step) % accounts.len();
                // Clients alternate writers by parity, accounts rotate: every account is hit
                // through both writers at once.
                let writer = &writers[client % 2];
                let amount = 1 + ((client * 7 + step * 13) % 50) as i64;
                let reply = if step % 3 == 2 {
                    writer.withdraw(&accounts[index], amount).await
                } else {
                    writer.deposit(&accounts[index], amount, None).await
                };
                assert_eq!(reply.status, 200, "{:?}", reply.body);
                acknowledged[index] += if step % 3 == 2 { -amount } else { amount };
            }
            acknowledged
        }));
    }
    let mut expected = vec![0i64; accounts.len()];
    for task in tasks {
        for (index, delta) in task.await.unwrap().into_iter().enumerate() {
            expected[index] += delta;
        }
    }
    for (index, account) in accounts.iter().enumerate() {
        // A deposit of 1 through the other writer reports the balance it appended on.
        let reply = writers[1].deposit(account, 1, None).await;
        assert_eq!(
            reply.body["balance"].as_i64(),
            Some(expected[index] + 1),
            "{account}"
        );
    }
    let conflicts = writers[0]
        .metric("coffer_writer_append_conflicts_total")
        .await
        + writers[1]
            .metric("coffer_writer_append_conflicts_total")
            .await;
    assert!(
        conflicts > 0.0,
        "the writers never raced; the test proves nothing"
    );
}

#[tokio::test]
async fn passivation_under_a_low_actor_cap_keeps_balances_right() {
    let nats = NatsServer::start();
    let settings = RegistrySettings {
        actors_live_max: 3,
        idle_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let writer = TestWriter::start(&nats.url(), settings, false).await;
    let accounts: Vec<String> = (0..12).map(|_| unique("cold")).collect();
    for account in &accounts {
        writer.open(account, 0).await;
    }
    for round in 1..=5i64 {
        for account in &accounts {
            let reply = writer.deposit(account, round, None).await;
            assert_eq!(reply.status, 200);
        }
        if round == 3 {
            tokio::time::sleep(Duration::from_millis(300)).await; // let the sweeper stop them all
        }
    }
    for account in &accounts {
        let reply = writer.withdraw(account, 15).await; // 1+2+3+4+5
        assert_eq!(reply.body["balance"].as_i64(), Some(0), "{account}");
    }
    assert!(writer.metric("coffer_writer_actors_live").await <= 3.0);
    assert!(writer.metric("coffer_writer_actors_passivated_total").await >= 12.0);
}

#[tokio::test]
async fn nats_down_gives_503_quickly_and_recovers_without_a_restart() {
    let mut nats = NatsServer::start();
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default(), false).await;
    let a = unique("outage");
    writer.open(&a, 0).await;
    writer.deposit(&a, 10, None).await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let refused = writer.deposit(&a, 5, None).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(["unavailable", "outcome_unknown"].contains(&refused.code()));
    assert!(refused.headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let ready = writer
        .http
        .get(format!("{}/readyz", writer.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let balance = loop {
        let reply = writer.deposit(&a, 1, Some("after-outage")).await;
        if reply.status == 200 {
            break reply.body["balance"].as_i64().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "writer did not recover: {:?}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // "unavailable" means nothing was sent; "outcome_unknown" means it may have landed.
    if refused.code() == "unavailable" {
        assert_eq!(balance, 11);
    } else {
        assert!(balance == 11 || balance == 16, "balance {balance}");
    }
    writer.stop().await;
}

#[tokio::test]
async fn a_crashed_actor_is_replaced_and_loses_no_acknowledged_state() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let log = EventLog::open(client, &StreamSettings::default())
        .await
        .unwrap();
    let answers = AnswerStore::open(log.context(), 1).await.unwrap();
    let transfer_ids = TransferIdClaims::open(log.context(), 1).await.unwrap();
    let metrics = Arc::new(Metrics::default());
    let context = Arc::new(ActorContext {
        log,
        answers,
        transfer_ids,
        metrics: metrics.clone(),
    });
    let registry = Registry::start(context, RegistrySettings::default())
        .await
        .unwrap();
    let account = AccountId::parse(&unique("crash")).unwrap();
    let request = |body: &[u8], open: bool| CommandRequest {
        account_id: account.clone(),
        command: if open {
            writer::request::open(body, Some(account.as_str()), None)
                .unwrap()
                .1
        } else {
            writer::request::deposit(body).unwrap()
        },
        idempotency_key: None,
        correlation_id: "test".into(),
    };
    registry
        .execute(request(br#"{"currency":"EUR"}"#, true))
        .await
        .unwrap();
    registry
        .execute(request(br#"{"amount":40}"#, false))
        .await
        .unwrap();
    assert!(registry.kill_actor(&account));
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics.actors_live.get() != 0 {
        assert!(
            Instant::now() < deadline,
            "supervisor did not remove the dead actor"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = registry
        .execute(request(br#"{"amount":2}"#, false))
        .await
        .unwrap();
    assert_eq!(after.body()["balance"].as_i64(), Some(42));
    registry.stop();
}

#[tokio::test]
async fn a_refusal_is_never_decided_on_a_stale_cache() {
    let nats = NatsServer::start();
    let first = TestWriter::start(&nats.url(), RegistrySettings::default(), false).await;
    let second = TestWriter::start(&nats.url(), RegistrySettings::default(), false).await;
    let a = unique("stale");
    first.open(&a, 0).await; // the first writer's actor now holds a balance of 0
    assert_eq!(second.deposit(&a, 100, None).await.status, 200);
    // On its cached state the first writer would refuse this; it must re-read and accept.
    let withdrawn = first.withdraw(&a, 60).await;
    assert_eq!(
        (withdrawn.status, withdrawn.body["balance"].as_i64()),
        (200, Some(40))
    );
    // A genuine refusal is still refused after the re-read.
    let refused = first.withdraw(&a, 41).await;
    assert_eq!(
        (refused.status, refused.code()),
        (422, "insufficient_funds")
    );
}

#[tokio::test]
async fn a_transfer_id_belongs_to_the_first_sender() {
    let nats = NatsServer::start();
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default(), false).await;
    let (a, b, c) = (unique("a"), unique("b"), unique("c"));
    for account in [&a, &b, &c] {
        writer.open(account, 0).await;
        writer.deposit(account, 100, None).await;
    }
    let transfer_id = unique("shared");
    let first = writer
        .post(
            "/v1/transfers",
            json!({"transfer_id": transfer_id, "from": a, "to": b, "amount": 10}),
            None,
        )
        .await;
    assert_eq!(first.status, 202);
    let other_sender = writer
        .post(
            "/v1/transfers",
            json!({"transfer_id": transfer_id, "from": c, "to": b, "amount": 10}),
            None,
        )
        .await;
    assert_eq!(
        (other_sender.status, other_sender.code()),
        (409, "idempotency_key_reused")
    );
    // C was not debited.
    assert_eq!(
        writer.deposit(&c, 1, None).await.body["balance"].as_i64(),
        Some(101)
    );
}

#[tokio::test]
async fn every_documented_route_is_served_and_the_document_is_served_too() {
    let nats = NatsServer::start();
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default(), false).await;
    for (method, path) in writer::openapi::ROUTES {
        let url = format!("{}{}", writer.url, path.replace("{id}", "nobody"));
        let response = match *method {
            "post" => writer
                .http
                .post(&url)
                .header("Content-Type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap(),
            _ => writer.http.get(&url).send().await.unwrap(),
        };
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_ne!(status, 405, "{method} {path} not routed");
        assert_ne!(body["code"], "not_found", "{method} {path} not routed");
    }
    let document: Value = writer
        .http
        .get(format!("{}/openapi.json", writer.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (method, path) in writer::openapi::ROUTES {
        assert!(
            document["paths"][path][method].is_object(),
            "{method} {path} undocumented"
        );
    }
    // Every error code the writer can answer is documented.
    let text = document.to_string();
    for code in [
        "invalid_request",
        "account_not_found",
        "account_exists",
        "account_closed",
        "insufficient_funds",
        "balance_not_zero",
        "transfer_pending",
        "same_account",
        "idempotency_key_reused",
        "payload_too_large",
        "unsupported_media_type",
        "unavailable",
        "outcome_unknown",
    ] {
        assert!(text.contains(code), "{code} undocumented");
    }
}
