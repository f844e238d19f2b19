//! The writer against a real nats-server, over real HTTP: status codes, idempotency across
//! restarts and writers, concurrent writers, passivation, crashes and NATS outages.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::AccountId;
use eventlog::{EventLog, NatsSettings, StreamSettings};
use serde_json::{json, Value};
use testkit::NatsServer;
use writer::actor::{AccountStates, ActorContext};
use writer::metrics::Metrics;
use writer::registry::{Registry, RegistrySettings};
use writer::request::{CommandRequest, Intent};
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
    async fn start(nats_url: &str, registry: RegistrySettings) -> Self {
        Self::start_with(nats_url, registry, StreamSettings::default(), None).await
    }

    async fn start_with(
        nats_url: &str,
        registry: RegistrySettings,
        stream: StreamSettings,
        failpoint_actor_delay: Option<Duration>,
    ) -> Self {
        Self::start_configured(
            nats_url,
            registry,
            stream,
            failpoint_actor_delay,
            true,
            problem::HttpLimits::default(),
        )
        .await
    }

    /// Without ownership: every writer decides for any account, and the stream arbitrates.
    async fn start_racing(nats_url: &str) -> Self {
        Self::start_configured(
            nats_url,
            RegistrySettings::default(),
            StreamSettings::default(),
            None,
            false,
            problem::HttpLimits::default(),
        )
        .await
    }

    async fn start_configured(
        nats_url: &str,
        registry: RegistrySettings,
        stream: StreamSettings,
        failpoint_actor_delay: Option<Duration>,
        ownership: bool,
        http_limits: problem::HttpLimits,
    ) -> Self {
        let port = testkit::free_port();
        let config = WriterConfig {
            nats: NatsSettings {
                url: nats_url.into(),
                client_name: "test-writer".into(),
                ..Default::default()
            },
            http_address: format!("127.0.0.1:{port}").parse().unwrap(),
            stream,
            registry,
            group_commit: Default::default(),
            snapshot_every: 1_000,
            failpoint_actor_delay,
            http_token: None,
            http_limits,
            ownership,
            writer_name: Some("test-writer".into()),
            hold_backstop: Default::default(),
            account_batch_max: 100,
            nats_monitor_urls: Vec::new(),
            signing_key: None,
            trusted_keys: None,
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
        // A fresh three-node cluster on a loaded two-core machine can take a while to elect
        // its JetStream leaders.
        let deadline = Instant::now() + Duration::from_secs(90);
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
        testkit::metric_value(&text, name).unwrap_or_else(|| panic!("metric {name} missing"))
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
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
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
    assert_eq!(transfer.status, 201);
    assert_eq!(transfer.body["status"], "completed");
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
    assert_eq!((retried.status, &retried.body), (201, &transfer.body));
    assert_eq!(retried.headers["location"], "/v1/transfers/t-1");

    // Both sides moved at once: a has 0 and can close, b has the 70.
    let closed_a = writer
        .post(&format!("/v1/accounts/{a}/close"), json!({}), None)
        .await;
    assert_eq!(closed_a.status, 200, "{:?}", closed_a.body);
    let not_zero = writer
        .post(&format!("/v1/accounts/{b}/close"), json!({}), None)
        .await;
    assert_eq!(
        (not_zero.status, not_zero.code()),
        (422, "balance_not_zero")
    );
    let closed = writer.deposit(&a, 5, None).await;
    assert_eq!((closed.status, closed.code()), (409, "account_closed"));
    let to_closed = writer
        .post(
            "/v1/transfers",
            json!({"from": b, "to": a, "amount": 1}),
            None,
        )
        .await;
    assert_eq!(
        (to_closed.status, to_closed.code()),
        (409, "account_closed")
    );
    let to_nobody = writer
        .post(
            "/v1/transfers",
            json!({"from": b, "to": unique("ghost"), "amount": 1}),
            None,
        )
        .await;
    assert_eq!(
        (to_nobody.status, to_nobody.code()),
        (404, "account_not_found")
    );
    let unknown_field = writer
        .post(
            &format!("/v1/accounts/{b}/deposits"),
            json!({"amount": 5, "account_id": "other"}),
            None,
        )
        .await;
    assert_eq!(
        (unknown_field.status, unknown_field.code()),
        (400, "invalid_request")
    );
    assert!(unknown_field.body["detail"]
        .as_str()
        .unwrap()
        .contains("account_id"));

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
    let first = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
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

    let restarted = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
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

    let second = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
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

    // A keyed transfer without an id: the server makes one, and a retry (through another
    // writer) answers the first transfer, id included, without moving money again.
    let other = unique("payee");
    second.open(&other, 0).await;
    let transfer_key = unique("transfer-key");
    let sent = second
        .post(
            "/v1/transfers",
            json!({"from": a, "to": other, "amount": 5}),
            Some(&transfer_key),
        )
        .await;
    let resent = restarted
        .post(
            "/v1/transfers",
            json!({"from": a, "to": other, "amount": 5}),
            Some(&transfer_key),
        )
        .await;
    assert_eq!((sent.status, resent.status), (201, 201));
    assert_eq!(sent.body, resent.body);
    let changed = restarted
        .post(
            "/v1/transfers",
            json!({"from": a, "to": other, "amount": 6}),
            Some(&transfer_key),
        )
        .await;
    assert_eq!(
        (changed.status, changed.code()),
        (409, "idempotency_key_reused")
    );
    assert_eq!(
        second.deposit(&other, 1, None).await.body["balance"].as_i64(),
        Some(6)
    );
    assert_eq!(
        second.deposit(&a, 1, None).await.body["balance"].as_i64(),
        Some(250 + 10_000 + 7 + 1 - 5 + 1)
    );

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
    // Ownership off (`COFFER_OWNERSHIP=false`, and what a view a beat old or a frozen owner
    // waking up amounts to): both writers decide for the same accounts and the stream's
    // concurrency check is all that keeps updates from being lost.
    let nats = NatsServer::start();
    let writers = Arc::new([
        TestWriter::start_racing(&nats.url()).await,
        TestWriter::start_racing(&nats.url()).await,
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
    let writer = TestWriter::start(&nats.url(), settings).await;
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
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
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
    // Counted as the alert on it expects: an outcome_unknown answer, and nothing else.
    assert_eq!(
        writer
            .metric("coffer_writer_commands_outcome_unknown_total")
            .await,
        if refused.code() == "outcome_unknown" {
            1.0
        } else {
            0.0
        }
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
    let (registry, metrics) = fresh_registry(&nats.url(), 1_000).await;
    let account = AccountId::parse(&unique("crash")).unwrap();
    let request = |body: &[u8], open: bool| {
        let command = if open {
            writer::request::open(body, Some(account.as_str()), None)
                .unwrap()
                .1
        } else {
            writer::request::deposit(body).unwrap()
        };
        CommandRequest::new(
            account.clone(),
            Intent::Account(command),
            None,
            "test".into(),
        )
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
    let first = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
    let second = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
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
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
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
    assert_eq!(first.status, 201);
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
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
    let document: Value = writer
        .http
        .get(format!("{}/openapi.json", writer.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operations = testkit::documented_operations(&document);
    // The contract's command routes, all documented, nothing else.
    assert_eq!(
        operations,
        [
            "get /v1/events",
            "post /v1/accounts",
            "post /v1/accounts/{id}/close",
            "post /v1/accounts/{id}/deposits",
            "post /v1/accounts/{id}/metadata",
            "post /v1/accounts/{id}/withdrawals",
            "post /v1/batch",
            "post /v1/holds",
            "post /v1/holds/{id}/capture",
            "post /v1/holds/{id}/void",
            "post /v1/transactions",
            "post /v1/transactions/{id}/reverse",
            "post /v1/transfers",
            "post /v1/transfers/{id}/reverse",
        ]
    );
    for operation in &operations {
        let (method, path) = operation.split_once(' ').unwrap();
        let url = format!("{}{}", writer.url, path.replace("{id}", "nobody"));
        let response = match method {
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
        assert_ne!(status, 405, "{operation} not routed");
        assert_ne!(body["code"], "not_found", "{operation} not routed");
    }
    // Strict bodies are in the document: no property beyond the listed ones.
    for schema in [
        "OpenAccountBody",
        "MoneyMovement",
        "TransferBody",
        "HoldBody",
        "CaptureBody",
        "TransactionBody",
        "ReverseBody",
        "BulkBody",
        "MetadataBody",
    ] {
        assert_eq!(
            document["components"]["schemas"][schema]["additionalProperties"],
            Value::Bool(false),
            "{schema}"
        );
    }
    // A transaction's postings are strict objects too, 1 to 64 of them.
    let postings = &document["components"]["schemas"]["Postings"];
    assert_eq!(
        postings["items"]["additionalProperties"],
        Value::Bool(false)
    );
    assert_eq!(
        (postings["minItems"].as_u64(), postings["maxItems"].as_u64()),
        (Some(1), Some(64))
    );
    // The browsable UI comes with its assets (vendored in the build, nothing fetched).
    let page = writer
        .http
        .get(format!("{}/docs/", writer.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("swagger-ui"));
    let script = writer
        .http
        .get(format!("{}/docs/swagger-ui-bundle.js", writer.url))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status().as_u16(), 200);
    assert!(script.bytes().await.unwrap().len() > 100_000);
    // Every error code the writer can answer is documented.
    let text = document.to_string();
    for code in [
        "invalid_request",
        "account_not_found",
        "account_exists",
        "account_closed",
        "insufficient_funds",
        "balance_not_zero",
        "same_account",
        "idempotency_key_reused",
        "payload_too_large",
        "unsupported_media_type",
        "unavailable",
        "outcome_unknown",
        "already_reversed",
        "transfer_not_found",
        "transaction_not_found",
    ] {
        assert!(text.contains(code), "{code} undocumented");
    }
}

/// Every event of the stream, in order.
async fn stored_events(nats_url: &str) -> Vec<eventlog::RecordedEvent> {
    let client = async_nats::connect(nats_url).await.unwrap();
    let log = EventLog::new(client, &StreamSettings::default());
    let mut events = Vec::new();
    loop {
        let after = events
            .last()
            .map_or(0, |event: &eventlog::RecordedEvent| event.position);
        let page = log.read_after(after, 1_000).await.unwrap();
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

#[tokio::test]
async fn transfers_racing_the_receivers_opening_through_slow_actors_are_all_or_nothing() {
    // Two writers whose actors take 100 ms per command, with a 300 ms deadline: most queued
    // transfers outlive their deadline. Meanwhile the receiver is being opened. The old saga
    // could refund a transfer and later credit it; here every transfer must be wholly applied
    // or wholly absent, and nothing may be appended for a command after its deadline.
    let nats = NatsServer::start();
    let deadline = Duration::from_millis(300);
    let slow = Some(Duration::from_millis(100));
    let settings = || RegistrySettings {
        call_timeout: deadline,
        ..Default::default()
    };
    let writers = Arc::new([
        TestWriter::start_with(&nats.url(), settings(), StreamSettings::default(), slow).await,
        TestWriter::start_with(&nats.url(), settings(), StreamSettings::default(), slow).await,
    ]);
    let senders: Vec<String> = (0..2).map(|_| unique("sender")).collect();
    for sender in &senders {
        assert_eq!(writers[0].open(sender, 0).await.status, 201);
        assert_eq!(writers[0].deposit(sender, 10_000, None).await.status, 200);
    }
    let receiver = unique("receiver");
    let mut tasks = Vec::new();
    for index in 0..40usize {
        let (task_writers, sender, to) = (
            writers.clone(),
            senders[index % 2].clone(),
            receiver.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let writers = task_writers;
            let receiver = to;
            let transfer_id = format!("race-{index}-{}", uuid::Uuid::now_v7().simple());
            let sent = time::OffsetDateTime::now_utc();
            let reply = writers[index % 2]
                .post(
                    "/v1/transfers",
                    json!({"transfer_id": transfer_id, "from": sender, "to": receiver, "amount": 10}),
                    None,
                )
                .await;
            (transfer_id, sent, reply.status, reply.code().to_owned())
        }));
        if index == 10 {
            let (writers, receiver) = (writers.clone(), receiver.clone());
            tasks.push(tokio::spawn(async move {
                let reply = writers[1].open(&receiver, 0).await;
                (
                    "open".to_owned(),
                    time::OffsetDateTime::now_utc(),
                    reply.status,
                    reply.code().to_owned(),
                )
            }));
        }
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let opened = outcomes
        .iter()
        .any(|(id, _, status, _)| id == "open" && *status == 201);
    if !opened {
        // The open itself may have expired in the slow queue; open it now.
        assert_eq!(writers[0].open(&receiver, 0).await.status, 201);
    }
    let events = stored_events(&nats.url()).await;
    let mut debits = std::collections::HashMap::new();
    let mut credits = std::collections::HashMap::new();
    for event in &events {
        match &event.event {
            domain::Event::TransferDebited { transfer_id, .. } => {
                debits.insert(transfer_id.to_string(), event.time);
            }
            domain::Event::TransferCredited { transfer_id, .. } => {
                credits.insert(transfer_id.to_string(), event.time);
            }
            _ => {}
        }
    }
    let mut expired = 0;
    for (transfer_id, sent, status, code) in outcomes.iter().filter(|(id, ..)| id != "open") {
        let debited = debits.get(transfer_id);
        assert_eq!(
            debited.is_some(),
            credits.contains_key(transfer_id),
            "{transfer_id} is half applied"
        );
        match (*status, code.as_str()) {
            (201, _) => assert!(debited.is_some(), "{transfer_id} acknowledged but absent"),
            (404, "account_not_found") => {
                assert!(debited.is_none(), "{transfer_id} refused but applied")
            }
            (503, "outcome_unknown" | "unavailable") => expired += 1,
            other => panic!("{transfer_id}: unexpected answer {other:?}"),
        }
        if let Some(stored) = debited {
            // Appends are sent before the deadline; the ack arrives within a few milliseconds.
            let latest = *sent + deadline + Duration::from_millis(500);
            assert!(
                *stored <= latest,
                "{transfer_id} was stored at {stored}, after its deadline ({latest})"
            );
        }
    }
    assert!(
        expired > 0,
        "no command outlived its deadline; the test proves nothing"
    );
    // Money is conserved: 20 000 deposited, moved only by whole transfers. Balances are read
    // by keyed deposits of 1, retried until answered: the 300 ms deadline is short on a busy
    // machine, and a keyed retry is applied once.
    let balance_after_deposit = |writer: usize, account: String| {
        let writers = writers.clone();
        async move {
            let key = uuid::Uuid::now_v7().to_string();
            for _ in 0..50 {
                let reply = writers[writer].deposit(&account, 1, Some(&key)).await;
                if reply.status == 200 {
                    return reply.body["balance"].as_i64().unwrap();
                }
                assert_eq!(reply.status, 503, "{:?}", reply.body);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("no answer for a deposit to {account}");
        }
    };
    let moved = 10 * debits.len() as i64;
    let mut total = 0;
    for (writer_index, account) in senders.iter().chain([&receiver]).enumerate() {
        total += balance_after_deposit(writer_index % 2, account.clone()).await - 1;
    }
    assert_eq!(total, 20_000);
    let receiver_balance = balance_after_deposit(0, receiver.clone()).await;
    assert_eq!(receiver_balance, moved + 2);
    let expired_in_actors = writers[0]
        .metric("coffer_writer_commands_expired_total")
        .await
        + writers[1]
            .metric("coffer_writer_commands_expired_total")
            .await;
    assert!(
        expired_in_actors > 0.0,
        "no actor skipped an expired command"
    );
}

#[tokio::test]
async fn idempotency_holds_past_the_duplicate_window_for_any_number_of_keys() {
    let nats = NatsServer::start();
    let stream = StreamSettings {
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    };
    let writer = TestWriter::start_with(
        &nats.url(),
        RegistrySettings::default(),
        stream.clone(),
        None,
    )
    .await;
    let account = unique("merchant");
    writer.open(&account, 0).await;
    let first = writer.deposit(&account, 5, Some("key-0")).await;
    assert_eq!(first.status, 200);
    let refused = writer
        .withdraw_keyed(&account, 1_000_000, "refused-key")
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (422, "insufficient_funds")
    );
    // More keyed commands than any in-memory key window would hold.
    let writer = Arc::new(writer);
    let mut tasks = Vec::new();
    for client in 0..16usize {
        let (writer, account) = (writer.clone(), account.clone());
        tasks.push(tokio::spawn(async move {
            for index in (1 + client..=10_000).step_by(16) {
                let reply = writer
                    .deposit(&account, 1, Some(&format!("key-{index}")))
                    .await;
                assert_eq!(reply.status, 200, "{:?}", reply.body);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let writer = Arc::into_inner(writer).unwrap();
    writer.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await; // past the server's duplicate window
    let restarted =
        TestWriter::start_with(&nats.url(), RegistrySettings::default(), stream, None).await;
    let before = stored_events(&nats.url()).await.len();
    let retried = restarted.deposit(&account, 5, Some("key-0")).await;
    assert_eq!((retried.status, &retried.body), (200, &first.body));
    let refused_again = restarted
        .withdraw_keyed(&account, 1_000_000, "refused-key")
        .await;
    assert_eq!(
        (refused_again.status, &refused_again.body),
        (422, &refused.body)
    );
    let reused = restarted.deposit(&account, 6, Some("key-0")).await;
    assert_eq!(
        (reused.status, reused.code()),
        (409, "idempotency_key_reused")
    );
    assert_eq!(
        stored_events(&nats.url()).await.len(),
        before,
        "a retry appended"
    );
    let balance = restarted.deposit(&account, 1, None).await.body["balance"].as_i64();
    assert_eq!(balance, Some(5 + 10_000 + 1));
    restarted.stop().await;
}

/// A hold's expiry is scheduled to fire ahead of its `expires_at` and waits in a writer's hands
/// until then. A hold shorter than that lead (its schedule fires at once, maybe before the hold
/// is stored) still expires at its time and not before; a writer that stops while holding
/// expiries gives them back, so another writer expires them on time, not an ack wait later.
#[tokio::test]
async fn expiries_held_ahead_of_their_time_expire_on_time_when_their_writer_stops() {
    let nats = NatsServer::start();
    let first = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
    let (a, b) = (unique("payer"), unique("payee"));
    first.open(&a, 0).await;
    first.open(&b, 0).await;
    first.deposit(&a, 1_000, None).await;
    let place = |seconds: i64| {
        let body = json!({"from": a, "to": b, "amount": 10, "expires_in_seconds": seconds});
        let first = &first;
        async move {
            let reply = first.post("/v1/holds", body, None).await;
            assert_eq!(reply.status, 201, "{:?}", reply.body);
            let expires_at = time::OffsetDateTime::parse(
                reply.body["expires_at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            (
                reply.body["hold_id"].as_str().unwrap().to_owned(),
                expires_at,
            )
        }
    };
    let mut short = Vec::new();
    for _ in 0..5 {
        short.push(place(1).await);
    }
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(place(4).await);
    }
    let due = held.iter().map(|(_, at)| *at).min().unwrap();
    let last_due = held.iter().map(|(_, at)| *at).max().unwrap();
    assert!(last_due - due <= time::Duration::seconds(1));
    let until = |at: time::OffsetDateTime| async move {
        let wait = at - time::OffsetDateTime::now_utc();
        if wait.is_positive() {
            tokio::time::sleep(wait.unsigned_abs()).await;
        }
    };
    // The held ones have fired and are in the first writer's hands.
    until(last_due - time::Duration::milliseconds(1_500)).await;
    let context = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = context
        .get_stream("COFFER_SCHEDULES")
        .await
        .unwrap()
        .get_consumer(writer::expiry::CONSUMER_NAME)
        .await
        .unwrap();
    let in_hand = consumer.info().await.unwrap().num_ack_pending;
    assert!(
        in_hand >= held.len(),
        "{in_hand} due expiries in hand 1.5 s before the last expires_at"
    );
    let second = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
    // The first stops just before they are due: without giving them back, they would come to
    // the second writer only an ack wait (2 s) after the first last said it was working on them.
    until(due - time::Duration::milliseconds(400)).await;
    first.stop().await;
    until(due + time::Duration::seconds(3)).await;
    let expired: std::collections::HashMap<String, time::OffsetDateTime> =
        stored_events(&nats.url())
            .await
            .into_iter()
            .filter_map(|event| match event.event {
                domain::Event::HoldExpired { hold_id } => Some((hold_id.to_string(), event.time)),
                _ => None,
            })
            .collect();
    for (hold, expires_at) in short.iter().chain(&held) {
        let at = expired
            .get(hold)
            .unwrap_or_else(|| panic!("{hold} did not expire"));
        let late = *at - *expires_at;
        assert!(!late.is_negative(), "{hold} expired {late} early");
        assert!(
            late <= time::Duration::milliseconds(900),
            "{hold} expired {late} after its expires_at"
        );
    }
    // The payer's holds came due together and were expired together: the second writer's only
    // commands were those expiries, appended as batches of several.
    let batches = second.metric("coffer_writer_account_batches_total").await;
    let batched = second
        .metric("coffer_writer_account_batch_commands_total")
        .await;
    assert!(
        batches > 0.0 && batched >= 2.0 * batches,
        "expiries were not appended together: {batched} in {batches} batches"
    );
    second.stop().await;
}

#[tokio::test]
async fn capture_void_and_expiry_racing_through_two_writers_settle_each_hold_once() {
    let nats = NatsServer::start();
    let writers = Arc::new([
        TestWriter::start(&nats.url(), RegistrySettings::default()).await,
        TestWriter::start(&nats.url(), RegistrySettings::default()).await,
    ]);
    let (a, b) = (unique("payer"), unique("payee"));
    writers[0].open(&a, 0).await;
    writers[0].open(&b, 0).await;
    writers[0].deposit(&a, 100_000, None).await;
    // Three groups of ten holds: settled early (capture then void, or void then capture), raced
    // at the edge of expiry (capture and void at once, through different writers), and left
    // alone (only the system expires them).
    let mut placed = Vec::new();
    for index in 0..30usize {
        let hold = unique(&format!("h{index}"));
        let reply = writers[index % 2]
            .post(
                "/v1/holds",
                json!({"hold_id": hold, "from": a, "to": b, "amount": 100, "expires_in_seconds": 4}),
                None,
            )
            .await;
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        assert_eq!(
            reply.headers["location"],
            format!("/v1/holds/{hold}").as_str()
        );
        let expires_at = time::OffsetDateTime::parse(
            reply.body["expires_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        placed.push((index, hold, expires_at));
    }
    let mut tasks = Vec::new();
    for (index, hold, expires_at) in placed.clone() {
        let writers = writers.clone();
        tasks.push(tokio::spawn(async move {
            let capture_path = format!("/v1/holds/{hold}/capture");
            let void_path = format!("/v1/holds/{hold}/void");
            let capture = || writers[index % 2].post(&capture_path, json!({"amount": 60}), None);
            let void = || writers[(index + 1) % 2].post(&void_path, json!({}), None);
            let (first, second) = match index / 10 {
                0 if index % 2 == 0 => {
                    let first = capture().await;
                    (first, void().await)
                }
                0 => {
                    let first = void().await;
                    (capture().await, first)
                }
                1 => {
                    let edge = expires_at
                        - time::OffsetDateTime::now_utc()
                        - time::Duration::milliseconds(50);
                    if edge.is_positive() {
                        tokio::time::sleep(edge.unsigned_abs()).await;
                    }
                    tokio::join!(capture(), void())
                }
                _ => return (index, hold, 0, String::new(), 0, String::new()),
            };
            (
                index,
                hold,
                first.status,
                first.code().to_owned(),
                second.status,
                second.code().to_owned(),
            )
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    // Expiry comes without a client, within 2 s of expires_at.
    let last_expiry = placed.iter().map(|(_, _, at)| *at).max().unwrap();
    let wait = last_expiry - time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    if wait.is_positive() {
        tokio::time::sleep(wait.unsigned_abs()).await;
    }
    let events = stored_events(&nats.url()).await;
    let mut captured_total = 0;
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for (index, hold, capture_status, capture_code, void_status, void_code) in &answers {
        let settlements: Vec<(&str, time::OffsetDateTime)> = events
            .iter()
            .filter_map(|event| {
                let kind = match &event.event {
                    domain::Event::HoldCaptured { hold_id, amount } if hold_id.as_str() == hold => {
                        captured_total += amount.minor_units();
                        "captured"
                    }
                    domain::Event::HoldVoided { hold_id } if hold_id.as_str() == hold => "voided",
                    domain::Event::HoldExpired { hold_id } if hold_id.as_str() == hold => "expired",
                    _ => return None,
                };
                Some((kind, event.time))
            })
            .collect();
        assert_eq!(settlements.len(), 1, "{hold} settled as {settlements:?}");
        let (kind, at) = settlements[0];
        let answered = match (*capture_status, *void_status) {
            (200, 409) => "captured",
            (409, 200) => "voided",
            (409, 409) | (0, 0) => "expired",
            other => {
                panic!("{hold}: capture and void answered {other:?} ({capture_code}, {void_code})")
            }
        };
        assert_eq!(kind, answered, "{hold}");
        match index / 10 {
            0 => assert_eq!(kind, if index % 2 == 0 { "captured" } else { "voided" }),
            2 => {
                assert_eq!(kind, "expired");
                let expires_at = placed[*index].2;
                assert!(
                    at - expires_at <= time::Duration::seconds(2),
                    "{hold} expired at {at}, due {expires_at}"
                );
            }
            _ => {}
        }
        for (status, code) in [(capture_status, capture_code), (void_status, void_code)] {
            if *status == 409 {
                assert_eq!(code, "hold_settled");
            }
        }
        *kinds.entry(kind).or_default() += 1;
    }
    println!("holds settled: {kinds:?}");
    // Money is conserved and nothing stays reserved.
    let payer = writers[0].deposit(&a, 1, None).await.body["balance"]
        .as_i64()
        .unwrap()
        - 1;
    let payee = writers[1].deposit(&b, 1, None).await.body["balance"]
        .as_i64()
        .unwrap()
        - 1;
    assert_eq!(payee as u64, captured_total);
    assert_eq!(payer + payee, 100_000);
    let withdraw_all = writers[0].withdraw(&a, payer + 1).await;
    assert_eq!(
        withdraw_all.status, 200,
        "money still held: {:?}",
        withdraw_all.body
    );
}

/// A registry of its own (its own actors and cached states, as a restarted writer has) on the
/// log at `nats_url`, snapshotting every `snapshot_every` events.
async fn fresh_registry(nats_url: &str, snapshot_every: u64) -> (Registry, Arc<Metrics>) {
    let fill = (
        eventlog::group_commit::FILL_WAIT_DEFAULT,
        eventlog::group_commit::FILL_QUIET_DEFAULT,
    );
    fresh_registry_filling(nats_url, snapshot_every, fill).await
}

/// [`fresh_registry`] whose account batches wait up to `fill` (wait, quiet) for the callers
/// their last batch answered.
async fn fresh_registry_filling(
    nats_url: &str,
    snapshot_every: u64,
    fill: (Duration, Duration),
) -> (Registry, Arc<Metrics>) {
    let client = async_nats::connect(nats_url).await.unwrap();
    let log = EventLog::open(client, &StreamSettings::default())
        .await
        .unwrap();
    let metrics = Arc::new(Metrics::default());
    let context = Arc::new(ActorContext {
        committer: eventlog::GroupCommit::start(log.clone(), Default::default()),
        snapshot_every,
        log,
        metrics: metrics.clone(),
        states: AccountStates::default(),
        failpoint_delay: None,
        account_batch_max: 100,
        account_batching_refused: Default::default(),
        account_fill: fill,
    });
    let registry = Registry::start(context, RegistrySettings::default())
        .await
        .unwrap();
    (registry, metrics)
}

fn deposit_request(account: &AccountId, amount: u64) -> CommandRequest {
    let command = writer::request::deposit(format!(r#"{{"amount":{amount}}}"#).as_bytes()).unwrap();
    CommandRequest::new(
        account.clone(),
        Intent::Account(command),
        None,
        "test".into(),
    )
}

#[tokio::test]
async fn a_history_loads_from_its_snapshot_and_falls_back_to_a_full_replay_when_it_cannot() {
    let nats = NatsServer::start();
    let account = AccountId::parse(&unique("snap")).unwrap();
    // 1 opening and 24 deposits: snapshots after the 10th and the 20th event.
    let (first, metrics) = fresh_registry(&nats.url(), 10).await;
    let open = writer::request::open(br#"{"currency":"EUR"}"#, Some(account.as_str()), None)
        .unwrap()
        .1;
    first
        .execute(CommandRequest::new(
            account.clone(),
            Intent::Account(open),
            None,
            "test".into(),
        ))
        .await
        .unwrap();
    for amount in 1..=24 {
        first
            .execute(deposit_request(&account, amount))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics.snapshots_written.get() < 2 {
        assert!(Instant::now() < deadline, "snapshots not written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.stop();
    let total: i64 = (1..=24).sum();

    // A restarted writer starts from the snapshot of the 20th event: 5 events replayed.
    let (second, metrics) = fresh_registry(&nats.url(), 10).await;
    let answer = second
        .execute(deposit_request(&account, 100))
        .await
        .unwrap();
    assert_eq!(answer.body()["balance"].as_i64(), Some(total + 100));
    assert_eq!(metrics.snapshots_loaded.get(), 1);
    assert_eq!(metrics.events_replayed.get(), 5);
    second.stop();

    // A snapshot in a format this build does not know: the whole history is replayed.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    #[derive(serde::Serialize)]
    struct Later {
        version: u32,
    }
    let later = rmp_serde::to_vec_named(&Later { version: 2 }).unwrap();
    jetstream
        .publish(eventlog::subject::snapshot(&account), later.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (third, metrics) = fresh_registry(&nats.url(), 10).await;
    let answer = third.execute(deposit_request(&account, 1)).await.unwrap();
    assert_eq!(answer.body()["balance"].as_i64(), Some(total + 101));
    assert_eq!(metrics.snapshots_loaded.get(), 0);
    assert_eq!(metrics.events_replayed.get(), 26);
    // It snapshots what it replayed (in the background): let that land before the next step.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics.snapshots_written.get() < 1 {
        assert!(Instant::now() < deadline, "snapshot not written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    third.stop();

    // A snapshot whose chain does not match the log (of another history): replayed in full.
    let log = EventLog::open(
        async_nats::connect(nats.url()).await.unwrap(),
        &StreamSettings::default(),
    )
    .await
    .unwrap();
    let wrong = eventlog::AccountSnapshot {
        state: domain::AccountState::new(account.clone()),
        position: answer.position(),
        chain: "0".repeat(64),
    };
    log.save_snapshot(&wrong).await.unwrap();
    assert_eq!(log.load_snapshot(&account).await.unwrap(), None);
    let (fourth, metrics) = fresh_registry(&nats.url(), 10).await;
    let answer = fourth.execute(deposit_request(&account, 1)).await.unwrap();
    assert_eq!(answer.body()["balance"].as_i64(), Some(total + 102));
    assert_eq!(metrics.snapshots_loaded.get(), 0);
    assert_eq!(metrics.events_replayed.get(), 27);
    fourth.stop();
}

#[tokio::test]
async fn queued_deposits_of_one_account_go_in_one_batch_and_refusals_go_alone() {
    // 48 clients on one account: while one append is in flight the others queue, and the actor
    // decides them together and appends them in one batch, each event stating the position
    // before the batch. Withdrawals larger than the balance are refused on their own. The
    // stream must hold exactly the acknowledged events, chained, with the balance never below
    // zero.
    let nats = NatsServer::start();
    let writer = Arc::new(TestWriter::start(&nats.url(), RegistrySettings::default()).await);
    let account = unique("batched");
    assert_eq!(writer.open(&account, 0).await.status, 201);
    let mut tasks = Vec::new();
    for client in 0..48usize {
        let (writer, account) = (writer.clone(), account.clone());
        tasks.push(tokio::spawn(async move {
            let mut moved = 0i64;
            let mut refused = 0;
            for step in 0..15usize {
                if (client + step) % 5 == 0 {
                    let reply = writer.withdraw(&account, 7).await;
                    match reply.status {
                        200 => moved -= 7,
                        422 => {
                            assert_eq!(reply.code(), "insufficient_funds");
                            refused += 1;
                        }
                        other => panic!("withdrawal answered {other}: {:?}", reply.body),
                    }
                } else {
                    let reply = writer.deposit(&account, 3, None).await;
                    assert_eq!(reply.status, 200, "{:?}", reply.body);
                    moved += 3;
                }
            }
            (moved, refused)
        }));
    }
    let mut expected = 0;
    let mut refused = 0;
    for task in tasks {
        let (moved, refusals) = task.await.unwrap();
        expected += moved;
        refused += refusals;
    }
    let events = stored_events(&nats.url()).await;
    let mut verifier = eventlog::chain::Verifier::default();
    let mut balance = 0i64;
    let mut appended = 0;
    for recorded in events
        .iter()
        .filter(|event| event.account_id.as_str() == account)
    {
        assert!(verifier.check_recorded(recorded));
        balance += recorded.event.balance_change();
        assert!(balance >= 0, "balance {balance} at {}", recorded.position);
        appended += 1;
    }
    assert_eq!(balance, expected);
    // The open, and one event per acknowledged deposit or withdrawal.
    assert_eq!(appended, 1 + 48 * 15 - refused);
    let reply = writer.deposit(&account, 1, None).await;
    assert_eq!(reply.body["balance"].as_i64(), Some(expected + 1));
    // Committed batches of several commands, not merely sent ones.
    let batches = writer.metric("coffer_writer_account_batches_total").await;
    let batched = writer
        .metric("coffer_writer_account_batch_commands_total")
        .await;
    assert!(
        batches > 0.0 && batched >= 2.0 * batches,
        "no committed append carried several commands: {batched} in {batches}"
    );
}

/// A transaction body over `postings` of (from, to, amount).
fn transaction_body(id: Option<&str>, postings: &[(&str, &str, i64)]) -> Value {
    let postings: Vec<Value> = postings
        .iter()
        .map(|(from, to, amount)| json!({"from": from, "to": to, "amount": amount}))
        .collect();
    match id {
        Some(id) => json!({"transaction_id": id, "postings": postings, "reference": "order"}),
        None => json!({"postings": postings, "reference": "order"}),
    }
}

/// Balances replayed from the stream, with the position of the last event.
async fn replayed_balances(nats_url: &str) -> (std::collections::BTreeMap<String, i64>, u64) {
    let events = stored_events(nats_url).await;
    let mut balances = std::collections::BTreeMap::new();
    for recorded in &events {
        *balances.entry(recorded.account_id.to_string()).or_insert(0) +=
            recorded.event.balance_change();
    }
    (balances, events.last().map_or(0, |event| event.position))
}

#[tokio::test]
async fn transactions_and_reversals_are_exactly_once_over_http_and_nats() {
    let nats = NatsServer::start();
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
    let [a, b, c] = [unique("a"), unique("b"), unique("c")];
    for account in [&a, &b, &c] {
        assert_eq!(writer.open(account, 0).await.status, 201);
    }
    assert_eq!(writer.deposit(&a, 1000, None).await.status, 200);

    // Three postings, one account twice: all together, each account's net once.
    let id = unique("tx");
    let body = transaction_body(Some(&id), &[(&a, &b, 600), (&a, &c, 100), (&b, &c, 50)]);
    let first = writer.post("/v1/transactions", body.clone(), None).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(
        first.headers["location"],
        format!("/v1/transactions/{id}").as_str()
    );
    let position = first.body["position"].as_u64().unwrap();
    let (balances, last) = replayed_balances(&nats.url()).await;
    assert_eq!((balances[&a], balances[&b], balances[&c]), (300, 550, 150));
    // The answer is the last part's position; the id's marker follows outside the events.
    assert_eq!(last, position);

    // The same id and body: the first answer, nothing appended; another body: 409.
    let again = writer.post("/v1/transactions", body.clone(), None).await;
    assert_eq!((again.status, &again.body), (201, &first.body));
    let other = transaction_body(Some(&id), &[(&a, &b, 1)]);
    let reused = writer.post("/v1/transactions", other, None).await;
    assert_eq!(
        (reused.status, reused.code()),
        (409, "idempotency_key_reused")
    );
    // A transfer may not take a transaction's id either.
    let transfer = json!({"transfer_id": id, "from": a, "to": b, "amount": 1});
    let taken = writer.post("/v1/transfers", transfer, None).await;
    assert_eq!(
        (taken.status, taken.code()),
        (409, "idempotency_key_reused")
    );

    // An Idempotency-Key without an id: one transaction, the same answer twice.
    let keyed = transaction_body(None, &[(&a, &b, 10)]);
    let once = writer
        .post("/v1/transactions", keyed.clone(), Some("k-tx"))
        .await;
    let twice = writer.post("/v1/transactions", keyed, Some("k-tx")).await;
    assert_eq!(once.status, 201, "{:?}", once.body);
    assert_eq!(once.body, twice.body);

    // Refusals name the posting and append nothing.
    let (_, before) = replayed_balances(&nats.url()).await;
    let refused = writer
        .post(
            "/v1/transactions",
            transaction_body(None, &[(&b, &c, 1), (&a, &c, 5_000)]),
            None,
        )
        .await;
    assert_eq!(
        (
            refused.status,
            refused.code(),
            refused.body["posting"].as_u64()
        ),
        (422, "insufficient_funds", Some(1))
    );
    let ghost = writer
        .post(
            "/v1/transactions",
            transaction_body(None, &[(&a, "ghost-account", 1)]),
            None,
        )
        .await;
    assert_eq!(
        (ghost.status, ghost.code(), ghost.body["posting"].as_u64()),
        (404, "account_not_found", Some(0))
    );
    let (_, after) = replayed_balances(&nats.url()).await;
    assert_eq!(before, after, "a refused transaction appended");

    // Over NATS: addressed to the first posting's sender.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let body = serde_json::to_vec(&transaction_body(None, &[(&b, &c, 5)])).unwrap();
    let wrong = client
        .request(format!("coffer.cmd.{a}.transaction"), body.clone().into())
        .await
        .unwrap();
    let code = wrong
        .headers
        .as_ref()
        .unwrap()
        .get("Nats-Service-Error-Code");
    assert_eq!(code.map(|code| code.as_str()), Some("400"));
    let right = client
        .request(format!("coffer.cmd.{b}.transaction"), body.into())
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&right.payload).unwrap();
    assert_eq!(answer["status"], "completed", "{answer}");

    // Reversal: once, with a keyed retry answered the same; a second one is refused.
    let path = format!("/v1/transactions/{id}/reverse");
    let reversal = writer
        .post(&path, json!({"reason": "refund"}), Some("k-rev"))
        .await;
    assert_eq!(reversal.status, 201, "{:?}", reversal.body);
    assert_eq!(reversal.body["reverses"], id.as_str());
    let retried = writer
        .post(&path, json!({"reason": "refund"}), Some("k-rev"))
        .await;
    assert_eq!((retried.status, &retried.body), (201, &reversal.body));
    let second = writer.post(&path, json!({}), None).await;
    assert_eq!((second.status, second.code()), (409, "already_reversed"));
    let (balances, _) = replayed_balances(&nats.url()).await;
    // 300 + 600 + 100 back on a; b paid back 600 and got its 50 back from c.
    assert_eq!(
        (balances[&a], balances[&b], balances[&c]),
        (1000 - 10, 10 - 5, 5)
    );
    // The reversal is a transaction too, and can itself be reversed (once).
    let reversal_id = reversal.body["transaction_id"].as_str().unwrap();
    let redo = writer
        .post(
            &format!("/v1/transactions/{reversal_id}/reverse"),
            json!({}),
            None,
        )
        .await;
    assert_eq!(redo.status, 201, "{:?}", redo.body);

    // Unknown ids, and ids of the other kind, are not found.
    let unknown = writer
        .post("/v1/transfers/no-such-transfer/reverse", json!({}), None)
        .await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (404, "transfer_not_found")
    );
    let wrong_kind = writer
        .post(&format!("/v1/transfers/{id}/reverse"), json!({}), None)
        .await;
    assert_eq!(
        (wrong_kind.status, wrong_kind.code()),
        (404, "transfer_not_found")
    );
    let hold = json!({"hold_id": unique("h"), "from": a, "to": b, "amount": 5});
    let placed = writer.post("/v1/holds", hold.clone(), None).await;
    assert_eq!(placed.status, 201, "{:?}", placed.body);
    let hold_id = hold["hold_id"].as_str().unwrap();
    let captured = writer
        .post(&format!("/v1/holds/{hold_id}/capture"), json!({}), None)
        .await;
    assert_eq!(captured.status, 200, "{:?}", captured.body);
    // A capture is a transfer of what was captured: reversible, once.
    let capture_reversal = writer
        .post(&format!("/v1/transfers/{hold_id}/reverse"), json!({}), None)
        .await;
    assert_eq!(capture_reversal.status, 201, "{:?}", capture_reversal.body);
    let (balances, _) = replayed_balances(&nats.url()).await;
    assert_eq!((balances[&a], balances[&b]), (290, 555));
    let twice = writer
        .post(&format!("/v1/transfers/{hold_id}/reverse"), json!({}), None)
        .await;
    assert_eq!((twice.status, twice.code()), (409, "already_reversed"));
    // A hold voided (or never settled) moved nothing: no transfer to reverse.
    let voided_id = unique("h");
    let voided = json!({"hold_id": voided_id, "from": a, "to": b, "amount": 5});
    assert_eq!(writer.post("/v1/holds", voided, None).await.status, 201);
    for settle in [None, Some("void")] {
        if let Some(settle) = settle {
            let path = format!("/v1/holds/{voided_id}/{settle}");
            assert_eq!(writer.post(&path, json!({}), None).await.status, 200);
        }
        let refused = writer
            .post(
                &format!("/v1/transfers/{voided_id}/reverse"),
                json!({}),
                None,
            )
            .await;
        assert_eq!(
            (refused.status, refused.code()),
            (404, "transfer_not_found")
        );
    }

    // Every chain is intact: each event built on its account's previous one.
    let mut verifier = eventlog::chain::Verifier::default();
    for recorded in stored_events(&nats.url()).await {
        verifier.check_recorded(&recorded);
    }
    assert!(
        verifier.first_breaks.is_empty(),
        "{:?}",
        verifier.first_breaks
    );
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_racing_over_overlapping_accounts_through_two_writers_commit_only_on_fresh_state(
) {
    // Ownership off: both writers decide transactions over the same accounts at once, each on
    // its own copy of them. Only the stream's per-account checks stand between a stale copy
    // and a commit; a lost race must be retried, not answered as an error.
    let nats = NatsServer::start();
    let writers = Arc::new([
        TestWriter::start_racing(&nats.url()).await,
        TestWriter::start_racing(&nats.url()).await,
    ]);
    let accounts: Arc<Vec<String>> = Arc::new((0..6).map(|_| unique("race")).collect());
    for account in accounts.iter() {
        assert_eq!(writers[0].open(account, 0).await.status, 201);
        assert_eq!(writers[0].deposit(account, 1_000, None).await.status, 200);
    }
    let mut tasks = Vec::new();
    for client in 0..8usize {
        let writers = writers.clone();
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for step in 0..15usize {
                let count = 2 + (client + step) % 3;
                let postings: Vec<(&str, &str, i64)> = (0..count)
                    .map(|leg| {
                        let from = (client + step + leg) % accounts.len();
                        let to =
                            (from + 1 + (client * 3 + leg) % (accounts.len() - 1)) % accounts.len();
                        let amount = 1 + ((client * 31 + step * 17 + leg * 7) % 300) as i64;
                        (accounts[from].as_str(), accounts[to].as_str(), amount)
                    })
                    .collect();
                let id = format!("race-{client}-{step}-{}", uuid::Uuid::now_v7().simple());
                let body = transaction_body(Some(&id), &postings);
                let reply = writers[(client + step) % 2]
                    .post("/v1/transactions", body, None)
                    .await;
                match (reply.status, reply.code()) {
                    (201, _) => acknowledged.push(id),
                    (422, "insufficient_funds") => {}
                    other => panic!("{other:?}: {:?}", reply.body),
                }
            }
            acknowledged
        }));
    }
    let mut acknowledged = std::collections::BTreeSet::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    let events = stored_events(&nats.url()).await;
    // Never on a stale state: every event builds on its account's previous one.
    let mut verifier = eventlog::chain::Verifier::default();
    let mut balances: std::collections::BTreeMap<String, i64> = Default::default();
    let mut parts: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for recorded in &events {
        verifier.check_recorded(recorded);
        let balance = balances.entry(recorded.account_id.to_string()).or_insert(0);
        *balance += recorded.event.balance_change();
        assert!(
            *balance >= 0,
            "{} went below its limit",
            recorded.account_id
        );
        if let domain::Event::TransactionPosted {
            transaction_id,
            parts: total,
            ..
        } = &recorded.event
        {
            let entry = parts
                .entry(transaction_id.to_string())
                .or_insert((0, usize::from(*total)));
            entry.0 += 1;
        }
    }
    assert!(
        verifier.first_breaks.is_empty(),
        "{:?}",
        verifier.first_breaks
    );
    assert_eq!(
        balances.values().sum::<i64>(),
        6_000,
        "money created or lost"
    );
    for (id, (stored, total)) in &parts {
        assert_eq!(stored, total, "{id} half applied");
    }
    let stored: std::collections::BTreeSet<String> = parts.keys().cloned().collect();
    assert_eq!(stored, acknowledged, "acknowledged and stored differ");
    let conflicts = writers[0]
        .metric("coffer_writer_append_conflicts_total")
        .await
        + writers[1]
            .metric("coffer_writer_append_conflicts_total")
            .await;
    println!(
        "{} transactions acknowledged, {conflicts} conflicts retried",
        acknowledged.len()
    );
    assert!(
        conflicts > 0.0,
        "the writers never raced; the test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_into_an_account_hot_on_the_same_writer_and_its_own_deposits_both_go_through() {
    // Sixteen clients deposit into one account as fast as they can, so its actor always has a
    // batch in flight, while four clients keep sending transfers and transactions into it
    // through the same writer, for four seconds. Whoever loses a race (a flow decided while the
    // account's batch was in flight, or the account's batch overtaken by a flow) retries holding
    // the accounts it appends to, in queue order: neither side may starve or give up.
    let nats = NatsServer::start();
    let writer = Arc::new(TestWriter::start(&nats.url(), RegistrySettings::default()).await);
    let hot = unique("hot");
    let side = unique("side");
    assert_eq!(writer.open(&hot, 0).await.status, 201);
    assert_eq!(writer.open(&side, 0).await.status, 201);
    let senders: Vec<String> = (0..4).map(|_| unique("sender")).collect();
    for sender in &senders {
        assert_eq!(writer.open(sender, 0).await.status, 201);
        assert_eq!(writer.deposit(sender, 1_000_000, None).await.status, 200);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut depositors = Vec::new();
    for _ in 0..16 {
        let (writer, hot, stop) = (writer.clone(), hot.clone(), stop.clone());
        depositors.push(tokio::spawn(async move {
            let mut deposited = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = writer.deposit(&hot, 1, None).await;
                assert_eq!(reply.status, 200, "{:?}", reply.body);
                deposited += 1;
            }
            deposited
        }));
    }
    let mut flows = Vec::new();
    for sender in senders.clone() {
        let (writer, hot, side, stop) = (writer.clone(), hot.clone(), side.clone(), stop.clone());
        flows.push(tokio::spawn(async move {
            let (mut moved, mut count) = (0i64, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = if count % 2 == 0 {
                    let body = json!({"from": sender, "to": hot, "amount": 3});
                    writer.post("/v1/transfers", body, None).await
                } else {
                    let body = transaction_body(None, &[(&sender, &hot, 5), (&sender, &side, 1)]);
                    writer.post("/v1/transactions", body, None).await
                };
                assert_eq!(reply.status, 201, "flow {count}: {:?}", reply.body);
                moved += if count % 2 == 0 { 3 } else { 5 };
                count += 1;
            }
            (moved, count)
        }));
    }
    let (moved, flows_done, deposited) = stop_after_four_seconds(&stop, flows, depositors).await;
    let (balances, _) = replayed_balances(&nats.url()).await;
    assert_eq!(balances[&hot], deposited + moved);
    let conflicts = writer.metric("coffer_writer_append_conflicts_total").await;
    let reservations = writer
        .metric("coffer_writer_group_commit_reservations_total")
        .await;
    println!(
        "{deposited} deposits and {flows_done} flows in 4 s, {conflicts} conflicts retried, \
         {reservations} reservations"
    );
    assert!(reservations > 0.0, "no retry held its accounts");
    assert!(
        deposited > 100 && flows_done > 40,
        "one side starved: {deposited} deposits, {flows_done} flows"
    );
}

/// Lets `flows` (each answering what it moved and how many flows it ran) and `depositors` (each
/// answering what it deposited) run for four seconds, stops them, and sums what they did:
/// (moved, flows, deposited).
async fn stop_after_four_seconds(
    stop: &std::sync::atomic::AtomicBool,
    flows: Vec<tokio::task::JoinHandle<(i64, usize)>>,
    depositors: Vec<tokio::task::JoinHandle<i64>>,
) -> (i64, usize, i64) {
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut moved, mut flows_done) = (0, 0);
    for flow in flows {
        let (amount, count) = flow.await.unwrap();
        moved += amount;
        flows_done += count;
    }
    let mut deposited = 0;
    for depositor in depositors {
        deposited += depositor.await.unwrap();
    }
    (moved, flows_done, deposited)
}

#[tokio::test]
async fn bulk_commands_are_each_exactly_once_and_answered_as_if_sent_alone() {
    let nats = NatsServer::start();
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
    let [a, b, lone] = [unique("a"), unique("b"), unique("lone")];
    assert_eq!(writer.open(&lone, 0).await.status, 201);
    let commands = json!({"commands": [
        {"op": "open", "account_id": a, "currency": "EUR", "idempotency_key": format!("o-{a}")},
        {"op": "open", "account_id": b, "currency": "EUR", "idempotency_key": format!("o-{b}")},
        {"op": "deposit", "account_id": a, "amount": 100, "idempotency_key": format!("d-{a}")},
        {"op": "withdraw", "account_id": b, "amount": 1000, "idempotency_key": format!("w-{b}")},
        {"op": "transfer", "from": a, "to": b, "amount": 30, "transfer_id": unique("t")},
        {"op": "deposit", "account_id": b, "amount": 5},
        {"op": "deposit", "account_id": a, "amount": 0},
        {"op": "open", "account_id": lone, "currency": "EUR"},
        {"op": "close", "account_id": unique("ghost")},
        {"op": "transaction", "postings": [{"from": b, "to": lone, "amount": 1}]},
    ]});
    let first = writer.post("/v1/batch", commands.clone(), None).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let results = first.body["results"].as_array().unwrap().clone();
    let statuses: Vec<u64> = results
        .iter()
        .map(|result| result["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [201, 201, 200, 422, 201, 200, 400, 409, 404, 201]);
    // In request order per account: the deposit saw the open, the transfer the deposit.
    assert_eq!(results[2]["body"]["balance"], 100);
    assert_eq!(results[5]["body"]["balance"], 35);
    assert_eq!(results[3]["body"]["code"], "insufficient_funds");

    // Each refusal is the one its single request gets.
    let single = writer
        .post(
            &format!("/v1/accounts/{a}/deposits"),
            json!({"amount": 0}),
            None,
        )
        .await;
    assert_eq!(results[6]["body"], single.body);
    let single = writer
        .post(
            "/v1/accounts",
            json!({"account_id": lone, "currency": "EUR"}),
            None,
        )
        .await;
    assert_eq!(
        (results[7]["body"]["code"].as_str(), single.status),
        (Some(single.code()), 409)
    );

    // The retried bulk: keyed and id'd commands answer their first answers and append nothing;
    // the unkeyed deposit is a new deposit, as it would be sent alone.
    let (_, before) = replayed_balances(&nats.url()).await;
    let again = writer.post("/v1/batch", commands.clone(), None).await;
    let again = again.body["results"].as_array().unwrap().clone();
    for index in [0, 1, 2, 3, 4] {
        assert_eq!(again[index], results[index], "command {index}");
    }
    assert_eq!(again[5]["body"]["balance"], 39);
    let events = stored_events(&nats.url()).await;
    let appended: Vec<_> = events
        .iter()
        .filter(|recorded| recorded.position > before)
        .collect();
    assert_eq!(
        appended.len(),
        3,
        "a deposit and the transaction's two parts"
    );
    // A keyed single request after the bulk is a replay too.
    let replay = writer
        .post(
            &format!("/v1/accounts/{a}/deposits"),
            json!({"amount": 100}),
            Some(&format!("d-{a}")),
        )
        .await;
    assert_eq!(replay.body, results[2]["body"]);
    let (balances, last) = replayed_balances(&nats.url()).await;
    assert_eq!((balances[&a], balances[&b], balances[&lone]), (70, 38, 2));

    // A malformed envelope runs nothing; so does a bulk with the header key.
    for malformed in [
        json!({"commands": [{"op": "deposit", "account_id": a, "amount": 1}, {"op": "teleport"}]}),
        json!({"commands": []}),
        json!({"commands": [{"op": "deposit", "account_id": a, "amount": 1}], "atomic": true}),
    ] {
        let refused = writer.post("/v1/batch", malformed.clone(), None).await;
        assert_eq!(
            (refused.status, refused.code()),
            (400, "invalid_request"),
            "{malformed}"
        );
    }
    let keyed = writer
        .post(
            "/v1/batch",
            json!({"commands": [{"op": "deposit", "account_id": a, "amount": 1}]}),
            Some("bulk-key"),
        )
        .await;
    assert_eq!(keyed.status, 400);
    assert_eq!(replayed_balances(&nats.url()).await.1, last);

    // Over NATS: the same bulk answers the same keyed results.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let reply = client
        .request(
            "coffer.cmd.batch",
            serde_json::to_vec(&commands).unwrap().into(),
        )
        .await
        .unwrap();
    let over_nats: Value = serde_json::from_slice(&reply.payload).unwrap();
    for index in [0, 1, 2, 3, 4] {
        assert_eq!(
            over_nats["results"][index], results[index],
            "command {index}"
        );
    }
    let reply = client
        .request("coffer.cmd.batch", r#"{"commands":[]}"#.into())
        .await
        .unwrap();
    let headers = reply.headers.unwrap();
    assert_eq!(
        headers.get("Nats-Service-Error-Code").unwrap().as_str(),
        "400"
    );
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_keeps_each_accounts_order_and_shares_batches_across_accounts() {
    let nats = NatsServer::start();
    let writer = TestWriter::start(&nats.url(), RegistrySettings::default()).await;
    let accounts: Vec<String> = (0..100).map(|_| unique("bulk")).collect();
    let mut commands: Vec<Value> = accounts
        .iter()
        .map(|account| json!({"op": "open", "account_id": account, "currency": "EUR"}))
        .collect();
    for round in 1..=9 {
        commands.extend(
            accounts
                .iter()
                .map(|account| json!({"op": "deposit", "account_id": account, "amount": round})),
        );
    }
    assert_eq!(commands.len(), 1_000);
    let batches_before = writer
        .metric("coffer_writer_group_commit_batches_total")
        .await;
    let reply = writer
        .post("/v1/batch", json!({ "commands": commands }), None)
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let results = reply.body["results"].as_array().unwrap();
    assert!(results[..100].iter().all(|result| result["status"] == 201));
    // Each account's deposits ran in request order: its balances after them are the running sums.
    for (index, account) in accounts.iter().enumerate() {
        let seen: Vec<i64> = (1..=9)
            .map(|round| {
                results[round * 100 + index]["body"]["balance"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        let expected: Vec<i64> = (1..=9).map(|round| (1..=round).sum()).collect();
        assert_eq!(seen, expected, "account {account}");
    }
    let (balances, _) = replayed_balances(&nats.url()).await;
    assert!(accounts.iter().all(|account| balances[account] == 45));
    // The accounts' commands went to the stream together, not one batch each.
    let batches = writer
        .metric("coffer_writer_group_commit_batches_total")
        .await
        - batches_before;
    assert!(
        batches < 200.0,
        "{batches} group commit batches for 1 000 commands"
    );
    writer.stop().await;
}

/// A bulk never outlasts its request: commands that could not start within its window (the
/// request timeout less a command's deadline and grace) are answered `503` and not applied,
/// and the ones before them are answered with their outcomes.
#[tokio::test]
async fn a_bulk_out_of_time_refuses_the_commands_it_did_not_start_and_applies_none_of_them() {
    let nats = NatsServer::start();
    let registry = RegistrySettings {
        call_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    // Window: 7 s - (1 s + 3.5 s grace + 2 s margin) = 0.5 s; each command takes 0.3 s.
    let limits = problem::HttpLimits {
        request_timeout: Duration::from_secs(7),
        ..Default::default()
    };
    let writer = TestWriter::start_configured(
        &nats.url(),
        registry,
        StreamSettings::default(),
        Some(Duration::from_millis(300)),
        true,
        limits,
    )
    .await;
    let account = unique("slow");
    assert_eq!(writer.open(&account, 0).await.status, 201);
    let commands: Vec<Value> = (1..=4)
        .map(|amount| {
            json!({"op": "deposit", "account_id": account, "amount": amount,
            "idempotency_key": format!("k-{amount}")})
        })
        .collect();
    let reply = writer
        .post("/v1/batch", json!({ "commands": commands }), None)
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let statuses: Vec<u64> = reply.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|result| result["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 503, 503], "{:?}", reply.body);
    let (balances, _) = replayed_balances(&nats.url()).await;
    assert_eq!(balances[&account], 3, "only the two started deposits");
    writer.stop().await;
}

/// A NATS request that carries its client's deadline (`Coffer-Deadline`, Unix ms) is never
/// started after it: one that waits past it (a busy account) is refused `503` and not applied;
/// a deadline already past is refused at once, a malformed one is `400`, a later one runs. A
/// bulk takes the same header.
#[tokio::test]
async fn a_nats_command_never_starts_after_its_clients_deadline() {
    let nats = NatsServer::start();
    // Every command waits 500 ms in its actor before it is looked at.
    let writer = TestWriter::start_with(
        &nats.url(),
        RegistrySettings::default(),
        StreamSettings::default(),
        Some(Duration::from_millis(500)),
    )
    .await;
    let account = unique("deadline");
    assert_eq!(writer.open(&account, 0).await.status, 201);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let in_ms = |offset: i64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        (now + offset).to_string()
    };
    let ask = |subject: String, deadline: String, body: &'static str| {
        let client = client.clone();
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Coffer-Deadline", deadline.as_str());
            let answer = client
                .request_with_headers(subject, headers, body.into())
                .await
                .unwrap();
            let status = answer
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Service-Error-Code"))
                .map_or(200, |code| code.as_str().parse::<u16>().unwrap());
            let body: Value = serde_json::from_slice(&answer.payload).unwrap();
            (status, body)
        }
    };
    let deposit = format!("coffer.cmd.{account}.deposit");
    // Due while the actor still holds it.
    let (status, body) = ask(deposit.clone(), in_ms(200), r#"{"amount":100}"#).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    // Already past: refused without waiting for the actor.
    let asked = Instant::now();
    let (status, body) = ask(deposit.clone(), in_ms(-1), r#"{"amount":100}"#).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert!(
        asked.elapsed() < Duration::from_millis(400),
        "{:?}",
        asked.elapsed()
    );
    let (status, body) = ask(deposit.clone(), "soon".into(), r#"{"amount":100}"#).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    assert!(
        body["detail"].as_str().unwrap().contains("Coffer-Deadline"),
        "{body}"
    );
    // Far enough ahead: it runs.
    let (status, body) = ask(deposit.clone(), in_ms(5_000), r#"{"amount":7}"#).await;
    assert_eq!((status, &body["balance"]), (200, &json!(7)), "{body}");
    let (status, body) = ask(
        "coffer.cmd.batch".into(),
        in_ms(-1),
        r#"{"commands":[{"op":"open","account_id":"never-opened","currency":"EUR"}]}"#,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    // A bulk's commands are bounded by it too: this one waits in its actor past it.
    let bulk: &'static str = Box::leak(
        format!(r#"{{"commands":[{{"op":"deposit","account_id":"{account}","amount":1000}}]}}"#)
            .into_boxed_str(),
    );
    let (status, body) = ask("coffer.cmd.batch".into(), in_ms(200), bulk).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            &body["results"][0]["status"],
            body["results"][0]["body"]["code"].as_str()
        ),
        (&json!(503), Some("unavailable")),
        "{body}"
    );
    // Only the deposit that ran is stored.
    assert_eq!(writer.deposit(&account, 1, None).await.body["balance"], 8);
    writer.stop().await;
}

#[tokio::test]
async fn a_command_not_answered_by_its_deadline_counts_as_outcome_unknown() {
    // The actor takes 5 s before it looks at a command with a 1 s deadline: the caller gives up
    // at the deadline plus the grace and answers outcome_unknown, which the alert counts.
    let nats = NatsServer::start();
    let settings = RegistrySettings {
        call_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let writer = TestWriter::start_with(
        &nats.url(),
        settings,
        StreamSettings::default(),
        Some(Duration::from_secs(5)),
    )
    .await;
    let reply = writer.open(&unique("stuck"), 0).await;
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    assert_eq!(reply.code(), "outcome_unknown");
    assert_eq!(
        writer
            .metric("coffer_writer_commands_outcome_unknown_total")
            .await,
        1.0
    );
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_into_an_account_another_writer_owns_and_keeps_busy_go_through_on_a_replicated_stream(
) {
    // On a replicated stream the leader refuses a check on an account while an append to it is
    // still being replicated. Sixteen depositors keep one account busy at its owner, so an
    // append to it is in flight nearly all the time; four clients send transfers into it from
    // accounts the other writer owns, for four seconds. Deciding those at the senders' owner,
    // they lost nearly every race (4 flows in 4 s against 2 939 deposits, 2026-12-05): after a
    // few losses a flow goes to the busy account's owner, and for a while the next ones go
    // there at once (43 flows without that memory, about 300 with it). None may give up,
    // neither side may starve, and no money may appear or vanish.
    let cluster = testkit::NatsCluster::start();
    let urls = cluster.urls();
    let first_node = urls.split(',').next().unwrap_or_default().to_owned();
    let stream = StreamSettings {
        replicas: 3,
        ..StreamSettings::default()
    };
    let start = |stream: StreamSettings| {
        TestWriter::start_configured(
            &urls,
            RegistrySettings::default(),
            stream,
            None,
            true,
            problem::HttpLimits::default(),
        )
    };
    let writers = Arc::new([start(stream.clone()).await, start(stream).await]);
    let owners = settled_owners(&first_node, writers.as_slice()).await;
    let hot = unique("hot");
    let hot_owner = &owners[&writer::ownership::partition_of(&AccountId::parse(&hot).unwrap())];
    let senders: Vec<String> = std::iter::repeat_with(|| unique("sender"))
        .filter(|sender| {
            let partition = writer::ownership::partition_of(&AccountId::parse(sender).unwrap());
            &owners[&partition] != hot_owner
        })
        .take(4)
        .collect();
    assert_eq!(writers[0].open(&hot, 0).await.status, 201);
    for sender in &senders {
        assert_eq!(writers[1].open(sender, 0).await.status, 201);
        assert_eq!(
            writers[1].deposit(sender, 1_000_000, None).await.status,
            200
        );
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut depositors = Vec::new();
    for client in 0..16 {
        let (writers, hot, stop) = (writers.clone(), hot.clone(), stop.clone());
        depositors.push(tokio::spawn(async move {
            let mut deposited = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = writers[client % 2].deposit(&hot, 1, None).await;
                assert_eq!(reply.status, 200, "{:?}", reply.body);
                deposited += 1;
            }
            deposited
        }));
    }
    let mut flows = Vec::new();
    let senders_opened = senders.clone();
    for (client, sender) in senders.into_iter().enumerate() {
        let (writers, hot, stop) = (writers.clone(), hot.clone(), stop.clone());
        flows.push(tokio::spawn(async move {
            let (mut moved, mut count) = (0i64, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = json!({"from": sender, "to": hot, "amount": 3});
                let reply = writers[client % 2].post("/v1/transfers", body, None).await;
                assert_eq!(reply.status, 201, "flow {count}: {:?}", reply.body);
                moved += 3;
                count += 1;
            }
            (moved, count)
        }));
    }
    let (moved, flows_done, deposited) = stop_after_four_seconds(&stop, flows, depositors).await;
    let (balances, _) = replayed_balances(&first_node).await;
    assert_eq!(balances[&hot], deposited + moved);
    let sent: i64 = senders_opened
        .iter()
        .map(|sender| 1_000_000 - balances[sender])
        .sum();
    assert_eq!(
        sent, moved,
        "the senders lost other than what the hot account got"
    );
    let mut handed = 0.0;
    for writer in writers.iter() {
        handed += writer
            .metric("coffer_writer_handovers_contended_total")
            .await;
    }
    println!("{deposited} deposits and {flows_done} flows in 4 s, {handed} flows handed to the busy account's owner");
    assert!(handed > 0.0, "no flow went to the busy account's owner");
    assert!(
        deposited > 100 && flows_done > 80,
        "one side starved: {deposited} deposits, {flows_done} flows"
    );
}

/// Each partition's owner (its lease's writer id) once `writers` hold all of them between them,
/// each some.
async fn settled_owners(nats_url: &str, writers: &[TestWriter]) -> HashMap<u32, String> {
    let client = async_nats::connect(nats_url).await.unwrap();
    let context = async_nats::jetstream::new(client.clone());
    let leases = eventlog::leases::Leases::open(client, &context)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut held = Vec::new();
        for writer in writers {
            held.push(writer.metric("coffer_writer_partitions_owned").await);
        }
        let total: f64 = held.iter().sum();
        if total == f64::from(writer::ownership::PARTITIONS)
            && held.iter().all(|count| *count > 0.0)
        {
            let owners: HashMap<u32, String> = leases
                .read_all()
                .await
                .unwrap()
                .into_iter()
                .filter_map(|entry| {
                    let partition = entry
                        .key
                        .strip_prefix(eventlog::leases::PARTITIONS_PREFIX)?
                        .parse()
                        .ok()?;
                    Some((
                        partition,
                        String::from_utf8_lossy(&entry.value).into_owned(),
                    ))
                })
                .collect();
            if owners.len() == writer::ownership::PARTITIONS as usize {
                return owners;
            }
        }
        assert!(
            Instant::now() < deadline,
            "partitions never settled: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_next_batch_waits_for_the_callers_its_last_one_answered() {
    // Sixteen closed-loop clients on one account, each back 1 ms after its answer (as a client
    // over the network is). Sent as soon as the last batch is acknowledged, the next batch
    // would take only those that queued meanwhile, and the clients settle into two halves of
    // eight, each paying a batch's fixed cost. Waiting for the callers just answered (at most
    // the fill wait) keeps them together. The quiet spell is longer than the default 2 ms
    // here: tokio's timer makes the 1 ms pause last up to 2 ms, all sixteen at once.
    let nats = NatsServer::start();
    let fill = (Duration::from_millis(20), Duration::from_millis(10));
    let (registry, metrics) = fresh_registry_filling(&nats.url(), 0, fill).await;
    let account = AccountId::parse(&unique("filled")).unwrap();
    let open = writer::request::open(br#"{"currency":"EUR"}"#, Some(account.as_str()), None)
        .unwrap()
        .1;
    let open = CommandRequest::new(account.clone(), Intent::Account(open), None, "test".into());
    registry.execute(open).await.unwrap();
    let registry = Arc::new(registry);
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (registry, account) = (registry.clone(), account.clone());
        clients.push(tokio::spawn(async move {
            for _ in 0..40 {
                registry
                    .execute(deposit_request(&account, 1))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let (balances, _) = replayed_balances(&nats.url()).await;
    assert_eq!(balances[account.as_str()], 16 * 40);
    let batches = metrics.account_batches.get();
    let batched = metrics.account_batch_commands.get();
    let mean = batched as f64 / batches.max(1) as f64;
    println!("{batched} deposits in {batches} account batches, {mean:.1} on average");
    assert!(
        mean >= 12.0,
        "the account's batches did not wait for the callers answered: {batched} deposits in \
         {batches} batches ({mean:.1} on average)"
    );
}
