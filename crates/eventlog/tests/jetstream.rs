//! The event log against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use domain::{AccountId, Amount, Currency, Event, OpenAccount, OverdraftLimit};
use eventlog::{Error, EventLog, EventMetadata, StreamSettings};
use testkit::NatsServer;

async fn log_on(server: &NatsServer) -> EventLog {
    let client = async_nats::connect(server.url()).await.unwrap();
    EventLog::open(client, &StreamSettings::default())
        .await
        .unwrap()
}

fn account(name: &str) -> AccountId {
    AccountId::parse(&format!("{name}-{}", uuid::Uuid::now_v7().simple())).unwrap()
}

fn opened() -> Event {
    Event::AccountOpened(OpenAccount {
        currency: Currency::parse("EUR").unwrap(),
        owner: Some("test".into()),
        overdraft_limit: OverdraftLimit::default(),
    })
}

fn deposited(units: i128) -> Event {
    Event::Deposited {
        amount: Amount::new(units).unwrap(),
        reference: None,
    }
}

fn metadata() -> EventMetadata {
    EventMetadata {
        command_id: uuid::Uuid::now_v7().to_string(),
        correlation_id: "test".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn append_and_load_round_trip_with_positions() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let a = account("a");
    let b = account("b");
    let p1 = log.append(&a, 0, &opened(), &metadata()).await.unwrap();
    let other = log.append(&b, 0, &opened(), &metadata()).await.unwrap();
    let p2 = log
        .append(&a, p1.position, &deposited(10), &metadata())
        .await
        .unwrap();
    assert!(p1.position < other.position && other.position < p2.position);

    let history = log.load_account(&a, 0).await.unwrap();
    assert_eq!(
        history
            .iter()
            .map(|e| (e.position, e.event.clone()))
            .collect::<Vec<_>>(),
        vec![(p1.position, opened()), (p2.position, deposited(10))]
    );
    assert_eq!(history[1].subject, format!("coffer.events.{a}.deposited"));
    assert_eq!(history[1].metadata.correlation_id, "test");
    // Loading from a position skips what the caller already has.
    let tail = log.load_account(&a, p1.position).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert!(log
        .load_account(&account("none"), 0)
        .await
        .unwrap()
        .is_empty());

    assert_eq!(log.last_account_position(&a).await.unwrap(), p2.position);
    assert_eq!(
        log.last_account_position(&account("none")).await.unwrap(),
        0
    );
    assert!(log.read_after(u64::MAX, 10).await.unwrap().is_empty());

    let all = log.read_after(0, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(log.last_position().await.unwrap(), 3);
}

#[tokio::test]
async fn long_histories_load_across_batches() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let a = account("long");
    let mut last = log
        .append(&a, 0, &opened(), &metadata())
        .await
        .unwrap()
        .position;
    for _ in 0..2_500 {
        last = log
            .append(&a, last, &deposited(1), &metadata())
            .await
            .unwrap()
            .position;
    }
    let history = log.load_account(&a, 0).await.unwrap();
    assert_eq!(history.len(), 2_501);
    assert!(history
        .windows(2)
        .all(|pair| pair[0].position < pair[1].position));
}

#[tokio::test]
async fn stale_expected_position_is_a_conflict() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let a = account("c");
    let p1 = log.append(&a, 0, &opened(), &metadata()).await.unwrap();
    log.append(&a, p1.position, &deposited(1), &metadata())
        .await
        .unwrap();
    let stale = log
        .append(&a, p1.position, &deposited(2), &metadata())
        .await;
    assert!(matches!(stale, Err(Error::Conflict { .. })), "{stale:?}");
    // Other accounts' appends do not conflict with this one's.
    let b = account("d");
    log.append(&b, 0, &opened(), &metadata()).await.unwrap();
    assert_eq!(log.load_account(&a, 0).await.unwrap().len(), 2);
}

#[tokio::test]
async fn two_concurrent_opens_of_one_id_exactly_one_wins() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    for round in 0..20 {
        let a = account(&format!("race{round}"));
        let (event, first_meta, second_meta) = (opened(), metadata(), metadata());
        let (first, second) = tokio::join!(
            log.append(&a, 0, &event, &first_meta),
            log.append(&a, 0, &event, &second_meta)
        );
        let wins = [&first, &second].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "{first:?} {second:?}");
        assert!([&first, &second]
            .iter()
            .any(|r| matches!(r, Err(Error::Conflict { .. }))));
        assert_eq!(log.load_account(&a, 0).await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn same_message_id_is_deduplicated() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let a = account("dup");
    let meta = metadata();
    let first = log.append(&a, 0, &opened(), &meta).await.unwrap();
    // The server checks the expected sequence before the message id: a resend with the stale
    // expectation is a conflict, and a resend on fresh state is dropped as a duplicate.
    let stale = log.append(&a, 0, &opened(), &meta).await;
    assert!(matches!(stale, Err(Error::Conflict { .. })), "{stale:?}");
    let again = log
        .append(&a, first.position, &opened(), &meta)
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.position, first.position);
    assert_eq!(log.load_account(&a, 0).await.unwrap().len(), 1);
}

#[tokio::test]
async fn stream_has_the_contract_configuration_and_ensure_is_idempotent() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let settings = StreamSettings::default();
    EventLog::open(client.clone(), &settings).await.unwrap();
    EventLog::open(client.clone(), &settings).await.unwrap();
    let context = async_nats::jetstream::new(client);
    let info = context
        .get_stream("COFFER_EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    let config = info.config;
    assert_eq!(config.subjects, vec!["coffer.events.>".to_string()]);
    assert_eq!(
        config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert!(config.allow_direct && config.deny_delete && config.deny_purge);
}

#[tokio::test]
async fn nats_down_is_unavailable_not_a_hang() {
    let mut server = NatsServer::start();
    let log = log_on(&server).await;
    let a = account("down");
    server.kill();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let result = log.append(&a, 0, &opened(), &metadata()).await;
    assert!(
        matches!(
            result,
            Err(Error::Unavailable(_)) | Err(Error::OutcomeUnknown(_))
        ),
        "{result:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(log.load_account(&a, 0).await.is_err());
}
