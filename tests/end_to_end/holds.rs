//! Holds expire without a client: a thousand of them, all due in the same second, come due
//! while one writer is killed with SIGKILL and the other restarted, and each still expires within
//! 2 s of its `expires_at`, exactly once, with the money back where it was. The test prints when
//! the server fired each schedule (ahead of `expires_at`, by design) and how long after that the
//! expiry was stored, so a slow run says which side was slow.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use testkit::NatsServer;
use time::OffsetDateTime;

use crate::support::{self, read_stream, Http};

const HOLDS: usize = 1_000;
const PAYERS: usize = 20;
const CLIENTS: usize = 16;
/// Seconds from the start to the common due second: long enough to place every hold and
/// restart the writers before it.
const DUE_AFTER_SECONDS: i64 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_holds_expire_on_time_across_writer_restarts() {
    let nats = NatsServer::start();
    let mut first = support::writer("hold-writer-a", &nats.url(), &[]);
    let mut second = support::writer("hold-writer-b", &nats.url(), &[]);
    let http = Http::new();
    let (a, b) = (first.url(), second.url());
    let payee = support::unique("payee");
    http.open_account(&a, &payee).await;
    let payers: Vec<String> = (0..PAYERS).map(|_| support::unique("payer")).collect();
    for payer in &payers {
        http.open_account(&a, payer).await;
        http.deposit(&a, payer, &json!({"amount": 1_000_000}), None)
            .await
            .unwrap();
    }
    let payers = Arc::new(payers);
    // Every hold asks for the lifetime that ends at the same second.
    let due = OffsetDateTime::now_utc().unix_timestamp() + DUE_AFTER_SECONDS;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (http, payers, payee) = (http.clone(), payers.clone(), payee.clone());
        let writer = if client % 2 == 0 {
            a.clone()
        } else {
            b.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut placed = Vec::new();
            for index in (client..HOLDS).step_by(CLIENTS) {
                let expires_in = due - OffsetDateTime::now_utc().unix_timestamp();
                let body = json!({"from": payers[index % PAYERS], "to": payee, "amount": 10,
                    "expires_in_seconds": expires_in});
                let reply = http
                    .post(&format!("{writer}/v1/holds"), &body, None)
                    .await
                    .unwrap();
                assert_eq!(reply.status, 201, "{:?}", reply.body);
                let expires_at = OffsetDateTime::parse(
                    reply.body["expires_at"].as_str().unwrap(),
                    &time::format_description::well_known::Rfc3339,
                )
                .unwrap();
                placed.push((
                    reply.body["hold_id"].as_str().unwrap().to_owned(),
                    expires_at,
                ));
            }
            placed
        }));
    }
    let mut placed = Vec::new();
    for task in tasks {
        placed.extend(task.await.unwrap());
    }
    let first_due = placed.iter().map(|(_, at)| *at).min().unwrap();
    let last_due = placed.iter().map(|(_, at)| *at).max().unwrap();
    // The writer's clock and ours may straddle a second boundary: at most two seconds.
    assert!(
        last_due - first_due <= time::Duration::seconds(1),
        "holds due from {first_due} to {last_due}"
    );
    assert!(
        first_due > OffsetDateTime::now_utc() + Duration::from_secs(2),
        "placing the holds took too long to restart the writers before they came due"
    );
    // One writer dies hard, the other restarts; the dead one comes back after the holds are due.
    first.kill();
    second.terminate(Duration::from_secs(10));
    second.restart();
    support::wait_ready(&second.url());
    let until_due = last_due - OffsetDateTime::now_utc();
    if until_due.is_positive() {
        tokio::time::sleep(until_due.unsigned_abs()).await;
    }
    first.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let events = read_stream(&nats.url()).await;
    let mut expired = std::collections::HashMap::new();
    for event in &events {
        if let domain::Event::HoldExpired { hold_id } = &event.event {
            assert!(
                expired.insert(hold_id.to_string(), event.time).is_none(),
                "{hold_id} expired twice"
            );
        }
    }
    let mut latest = time::Duration::ZERO;
    for (hold_id, expires_at) in &placed {
        let at = expired
            .get(hold_id)
            .unwrap_or_else(|| panic!("{hold_id} never expired"));
        let late = *at - *expires_at;
        assert!(!late.is_negative(), "{hold_id} expired {late} early");
        latest = latest.max(late);
    }
    println!(
        "holds: {} expired, latest {latest} after its expires_at",
        placed.len()
    );
    // Where the time went: when the server fired each schedule, and how long after that its
    // expiry was stored.
    let fired = due_messages(&nats.url()).await;
    let mut firing = Vec::new();
    let mut handling = Vec::new();
    for (hold_id, expires_at) in &placed {
        if let (Some(fired_at), Some(at)) = (fired.get(hold_id), expired.get(hold_id)) {
            firing.push(*fired_at - *expires_at);
            handling.push(*at - *fired_at);
        }
    }
    println!(
        "holds: schedules fired {} after expires_at; expiries stored {} after firing",
        spread(&mut firing),
        spread(&mut handling)
    );
    assert!(
        latest <= time::Duration::seconds(2),
        "a hold expired {latest} after its expires_at"
    );
    // Every payer has its money available again: a withdrawal of all of it succeeds.
    let payer = &payers[0];
    let withdrawn = http
        .post(
            &format!("{}/v1/accounts/{payer}/withdrawals", second.url()),
            &json!({"amount": 1_000_000}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(withdrawn.status, 200, "{:?}", withdrawn.body);
}

/// When the server stored each due hold expiry, by hold id.
async fn due_messages(url: &str) -> std::collections::HashMap<String, OffsetDateTime> {
    use futures::StreamExt;
    let context = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let stream = context.get_stream("COFFER_SCHEDULES").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: eventlog::subject::DUE_HOLD_EXPIRIES.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.unwrap().take(pending as usize);
    let mut fired = std::collections::HashMap::new();
    while let Some(message) = messages.next().await {
        let message = message.unwrap();
        let (_, hold_id) = eventlog::subject::parse_hold_expiry_due(&message.subject).unwrap();
        fired.insert(hold_id.to_owned(), message.info().unwrap().published);
    }
    fired
}

/// "min / median / p90 / max" of `durations`.
fn spread(durations: &mut [time::Duration]) -> String {
    if durations.is_empty() {
        return "(none)".into();
    }
    durations.sort();
    let at = |share: f64| durations[((durations.len() - 1) as f64 * share) as usize];
    format!(
        "min {} / median {} / p90 {} / max {}",
        at(0.0),
        at(0.5),
        at(0.9),
        at(1.0)
    )
}

/// A hold whose scheduled expiry never comes (here the schedules stream is emptied, as a stolen
/// writer credential's roll-up could; a due message dropped or aged out is the same) would keep
/// its money held for good: capture and void are refused from `expires_at` on. The backstop,
/// which reads placed holds from the event stream, expires it once; a hold settled before its
/// expiry is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_whose_due_message_never_comes_is_expired_by_the_backstop() {
    let nats = NatsServer::start();
    let writer = support::writer(
        "w",
        &nats.url(),
        &[("COFFER_HOLD_BACKSTOP_DELAY_MS", "2000".into())],
    );
    let http = Http::new();
    let url = writer.url();
    let (payer, payee) = (support::unique("payer"), support::unique("payee"));
    http.open_account(&url, &payer).await;
    http.open_account(&url, &payee).await;
    http.deposit(&url, &payer, &json!({"amount": 100}), None)
        .await
        .unwrap();
    let place = |hold_id: &str, amount: i64| {
        json!({"from": payer, "to": payee, "amount": amount, "hold_id": hold_id,
            "expires_in_seconds": 2})
    };
    let (forgotten, voided) = (support::unique("forgotten"), support::unique("voided"));
    for (hold_id, amount) in [(&forgotten, 60), (&voided, 40)] {
        let reply = http
            .post(&format!("{url}/v1/holds"), &place(hold_id, amount), None)
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{:?}", reply.body);
    }
    let void = http
        .post(&format!("{url}/v1/holds/{voided}/void"), &json!({}), None)
        .await
        .unwrap();
    assert_eq!(void.status, 200, "{:?}", void.body);
    // The schedules are gone before they fire.
    let context = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    context
        .get_stream("COFFER_SCHEDULES")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();

    // Due at expires_at (2 s) + the backstop's delay (2 s); allow for a slow machine.
    let started = std::time::Instant::now();
    let expired = loop {
        let events = read_stream(&nats.url()).await;
        let expired: Vec<String> = events
            .iter()
            .filter_map(|event| match &event.event {
                domain::Event::HoldExpired { hold_id } => Some(hold_id.to_string()),
                _ => None,
            })
            .collect();
        if !expired.is_empty() || started.elapsed() > Duration::from_secs(20) {
            break expired;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(expired, vec![forgotten.clone()], "expired: {expired:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "expired before its expiry and the backstop's delay: {:?}",
        started.elapsed()
    );
    // Its money is available again; the voided hold's was already.
    let withdrawn = http
        .post(
            &format!("{url}/v1/accounts/{payer}/withdrawals"),
            &json!({"amount": 100}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(withdrawn.status, 200, "{:?}", withdrawn.body);
    assert_eq!(
        http.metric(&url, "coffer_writer_holds_expired_by_backstop_total")
            .await,
        Some(1.0)
    );
    // Nothing more comes of it: still one expiry a moment later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let expiries = read_stream(&nats.url())
        .await
        .iter()
        .filter(|event| matches!(event.event, domain::Event::HoldExpired { .. }))
        .count();
    assert_eq!(expiries, 1);
}
