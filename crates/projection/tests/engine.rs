//! The engine against a real nats-server and a real redb file.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use eventlog::{EventLog, RecordedEvent, StreamSettings};
use projection::{Engine, Projector};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use testkit::NatsServer;
use tokio::sync::watch;

/// Counts applications per position: any event applied twice shows up as a count of 2.
const APPLIED: TableDefinition<u64, u64> = TableDefinition::new("applied");

struct CountingView;

impl Projector for CountingView {
    fn initialize(&self, transaction: &WriteTransaction) -> Result<(), redb::Error> {
        transaction.open_table(APPLIED)?;
        Ok(())
    }

    fn apply(
        &self,
        transaction: &WriteTransaction,
        events: &[RecordedEvent],
    ) -> Result<(), projection::ApplyError> {
        let mut table = transaction.open_table(APPLIED)?;
        for event in events {
            let count = table.get(event.position)?.map_or(0, |value| value.value());
            table.insert(event.position, count + 1)?;
        }
        Ok(())
    }

    fn history_gap(
        &self,
        _transaction: &WriteTransaction,
        _gap: &projection::Gap,
    ) -> Result<(), projection::ApplyError> {
        Ok(())
    }

    fn unreadable(
        &self,
        transaction: &WriteTransaction,
        message: &eventlog::Unreadable,
    ) -> Result<(), projection::ApplyError> {
        // Marked as applied zero times, so the order among events shows.
        let mut table = transaction.open_table(APPLIED)?;
        table.insert(message.position, 0)?;
        let mut unreadable = transaction.open_table(UNREADABLE)?;
        let account = message
            .account
            .as_ref()
            .map_or(String::new(), |account| account.to_string());
        unreadable.insert(message.position, account.as_str())?;
        Ok(())
    }
}

/// Accounts marked for a hole in their history, with the missing position.
const MARKED: TableDefinition<&str, u64> = TableDefinition::new("marked");

/// [`CountingView`] that finds a hole before every event at a position divisible by 5 whose
/// account is not marked yet (as the reader's views find an event built on one they never got).
struct HoleyView;

impl Projector for HoleyView {
    fn initialize(&self, transaction: &WriteTransaction) -> Result<(), redb::Error> {
        transaction.open_table(MARKED)?;
        CountingView.initialize(transaction)
    }

    fn apply(
        &self,
        transaction: &WriteTransaction,
        events: &[RecordedEvent],
    ) -> Result<(), projection::ApplyError> {
        {
            let marked = transaction.open_table(MARKED)?;
            for event in events {
                let account = event.account_id.as_str();
                if event.position % 5 == 0 && marked.get(account)?.is_none() {
                    return Err(projection::ApplyError::Missed {
                        account: account.to_owned(),
                        position: event.position,
                        previous: event.position - 1,
                        applied: 0,
                    });
                }
            }
        }
        CountingView.apply(transaction, events)
    }

    fn history_gap(
        &self,
        transaction: &WriteTransaction,
        gap: &projection::Gap,
    ) -> Result<(), projection::ApplyError> {
        let mut marked = transaction.open_table(MARKED)?;
        assert!(
            marked.get(gap.account.as_str())?.is_none(),
            "{} marked twice",
            gap.account
        );
        marked.insert(gap.account.as_str(), gap.missing)?;
        Ok(())
    }

    fn unreadable(
        &self,
        transaction: &WriteTransaction,
        message: &eventlog::Unreadable,
    ) -> Result<(), projection::ApplyError> {
        CountingView.unreadable(transaction, message)
    }
}

/// Unreadable messages by position, with the account their subject names.
const UNREADABLE: TableDefinition<u64, &str> = TableDefinition::new("unreadable");

async fn append_events(log: &EventLog, count: usize) {
    fixtures::append_histories(&Arc::new(log.clone()), 1, count, || {}).await;
}

async fn run_until(
    database: Arc<Database>,
    name: &str,
    log: &EventLog,
    position: u64,
) -> Arc<projection::ViewHealth> {
    run_engine_until(
        Engine::open(database, CountingView, name).unwrap(),
        log,
        position,
    )
    .await
}

async fn run_engine_until<P: Projector>(
    engine: Engine<P>,
    log: &EventLog,
    position: u64,
) -> Arc<projection::ViewHealth> {
    let mut applied = engine.applied();
    let health = engine.health();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(engine.run(log.clone(), stopped));
    tokio::time::timeout(
        Duration::from_secs(20),
        applied.wait_for(|applied| *applied >= position),
    )
    .await
    .expect("view caught up")
    .unwrap();
    stop.send(true).unwrap();
    task.await.unwrap();
    health
}

/// A server whose stream holds `accounts` histories of `per_account` events, its last
/// position, and an empty view file (the server and directory live as long as the test holds
/// them).
async fn histories(
    accounts: usize,
    per_account: usize,
) -> (
    NatsServer,
    Arc<EventLog>,
    u64,
    tempfile::TempDir,
    Arc<Database>,
) {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let log = Arc::new(
        EventLog::open(client, &StreamSettings::default())
            .await
            .unwrap(),
    );
    fixtures::append_histories(&log, accounts, per_account, || {}).await;
    let last = log.last_position().await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let database = Arc::new(Database::create(directory.path().join("views.redb")).unwrap());
    (server, log, last, directory, database)
}

/// Every position up to `last` was applied exactly once.
fn assert_each_applied_once(database: &Database, last: u64) {
    let counts = counts(database);
    assert_eq!(counts.len() as u64, last);
    assert!(counts.iter().all(|(_, count)| *count == 1), "applied twice");
}

fn counts(database: &Database) -> Vec<(u64, u64)> {
    let transaction = database.begin_read().unwrap();
    let table = transaction.open_table(APPLIED).unwrap();
    table
        .range(0..)
        .unwrap()
        .map(|row| {
            let (key, value) = row.unwrap();
            (key.value(), value.value())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_at_or_below_the_stored_position_are_skipped() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let log = EventLog::open(client, &StreamSettings::default())
        .await
        .unwrap();
    append_events(&log, 20).await;
    let directory = tempfile::tempdir().unwrap();
    let database = Arc::new(Database::create(directory.path().join("views.redb")).unwrap());
    // The view reaches position 20 through one consumer...
    run_until(database.clone(), "first", &log, 20).await;
    // ...then a second consumer that starts from the beginning of the stream feeds it: it is
    // reused (it is not ahead of the view), delivers 1..31, and 1..20 must be skipped.
    let stream = log.context().get_stream("COFFER_EVENTS").await.unwrap();
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("second".into()),
            ack_policy: consumer::AckPolicy::All,
            filter_subject: "coffer.events.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A marker at position 21 leaves a hole in the event positions the view sees: it is not a
    // lost delivery, and must not stop the view.
    log.append_atomic(&[eventlog::Entry::Marker {
        subject: "coffer.ids.transfer.hole".into(),
        payload: Vec::new(),
    }])
    .await
    .unwrap();
    append_events(&log, 10).await;
    let health = run_until(database.clone(), "second", &log, 31).await;
    assert_eq!(health.redeliveries_skipped.get(), 20);
    assert_eq!(health.consumer_recreations.get(), 0);
    // Reused, with the room the pipeline needs (it was made with the server's default).
    let mut second = stream
        .get_consumer::<consumer::pull::Config>("second")
        .await
        .unwrap();
    assert_eq!(
        second.info().await.unwrap().config.max_ack_pending,
        projection::MAX_ACK_PENDING
    );
    let counts = counts(&database);
    assert_eq!(counts.len(), 30);
    assert!(!counts.iter().any(|(position, _)| *position == 21));
    assert!(
        counts.iter().all(|(_, count)| *count == 1),
        "applied twice: {counts:?}"
    );
    assert_eq!(projection::stored_position(&database).unwrap(), 31);
}

/// A catch-up longer than two transactions: the next batch is gathered while one commits, and
/// still every event is applied once, in order, and the checkpoint is the last position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_catch_up_applies_every_event_once() {
    let (_server, log, last, _directory, database) = histories(20, 150).await;
    assert_eq!(last, 3_000);
    // Gathering stops once a transaction has 250 events; the pull that crossed it (up to
    // 1 000) stays in it. So at least three transactions, each gathered behind the last.
    let engine = Engine::open(database.clone(), CountingView, "view")
        .unwrap()
        .transaction_events_max(250);
    let health = run_engine_until(engine, &log, last).await;
    assert_each_applied_once(&database, last);
    assert_eq!(projection::stored_position(&database).unwrap(), last);
    assert_eq!(health.events_applied.get(), last);
    assert!(
        health.batches_committed.get() >= 3,
        "{} transactions for {last} events",
        health.batches_committed.get()
    );
    let stream = log.context().get_stream("COFFER_EVENTS").await.unwrap();
    let mut consumer = stream
        .get_consumer::<consumer::pull::Config>("view")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.max_ack_pending, projection::MAX_ACK_PENDING);
    assert_eq!(info.ack_floor.stream_sequence, last, "all acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_ahead_of_the_view_is_recreated_from_the_stored_position() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let log = EventLog::open(client, &StreamSettings::default())
        .await
        .unwrap();
    append_events(&log, 15).await;
    let first = tempfile::tempdir().unwrap();
    let database = Arc::new(Database::create(first.path().join("views.redb")).unwrap());
    run_until(database, "view", &log, 15).await;
    // The views are lost (a new volume): the consumer has acknowledged 15, the file has 0.
    let second = tempfile::tempdir().unwrap();
    let fresh = Arc::new(Database::create(second.path().join("views.redb")).unwrap());
    let health = run_until(fresh.clone(), "view", &log, 15).await;
    assert_eq!(health.consumer_recreations.get(), 1);
    assert_eq!(counts(&fresh).len(), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_is_recorded_in_its_place_and_the_view_goes_on() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let log = EventLog::open(client.clone(), &StreamSettings::default())
        .await
        .unwrap();
    append_events(&log, 3).await;
    let context = async_nats::jetstream::new(client);
    // What a stolen writer credential can append: JSON, no headers.
    context
        .publish(
            "coffer.append.someone.deposited",
            r#"{"amount":1000000}"#.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    append_events(&log, 2).await;
    let directory = tempfile::tempdir().unwrap();
    let database = Arc::new(Database::create(directory.path().join("views.redb")).unwrap());
    let health = run_until(database.clone(), "poisoned", &log, 6).await;
    assert_eq!(health.failure(), None);
    assert_eq!(health.decode_failures.get(), 1);
    assert!(health.caught_up(0));
    // Every event applied once, the unreadable message recorded in its place (count 0).
    assert_eq!(
        counts(&database),
        vec![(1, 1), (2, 1), (3, 1), (4, 0), (5, 1), (6, 1)]
    );
    let transaction = database.begin_read().unwrap();
    let unreadable = transaction.open_table(UNREADABLE).unwrap();
    assert_eq!(
        unreadable
            .get(4)
            .unwrap()
            .map(|account| account.value().to_owned()),
        Some("someone".to_owned())
    );
    let mut registry = prometheus_client::registry::Registry::default();
    health.register(&mut registry);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    assert!(out.contains("coffer_projection_failed 0"), "{out}");
    assert!(
        out.contains("coffer_projection_decode_failures_total 1"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_ahead_of_a_recreated_stream_stops_instead_of_consuming() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let settings = StreamSettings::default();
    let log = EventLog::open(client.clone(), &settings).await.unwrap();
    append_events(&log, 10).await;
    let directory = tempfile::tempdir().unwrap();
    let database = Arc::new(Database::create(directory.path().join("views.redb")).unwrap());
    run_until(database.clone(), "view", &log, 10).await;
    // The stream is lost and re-created with fewer events than the view applied.
    log.context().delete_stream("COFFER_EVENTS").await.unwrap();
    let log = EventLog::open(client, &settings).await.unwrap();
    append_events(&log, 3).await;
    let engine = Engine::open(database.clone(), CountingView, "view").unwrap();
    let health = engine.health();
    let (_stop, stopped) = watch::channel(false);
    tokio::time::timeout(Duration::from_secs(20), engine.run(log, stopped))
        .await
        .expect("view stops");
    let failure = health.failure().expect("failure recorded");
    // Re-created: its creation time differs from the one stored with the checkpoint.
    assert!(failure.contains("created at"), "{failure}");
    assert_eq!(
        counts(&database).len(),
        10,
        "nothing from the new stream was applied"
    );
}

/// A fresh view meets in one batch the holes a live one met one at a time (a writer credential
/// can erase many events with `Nats-TTL`): each costs its account, however many fall in a batch,
/// and every event is still applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_cost_their_accounts_however_many_fall_in_one_batch() {
    let (_server, log, last, _directory, database) = histories(400, 10).await;
    let engine = Engine::open(database.clone(), HoleyView, "holey").unwrap();
    let health = run_engine_until(engine, &log, last).await;
    assert_eq!(health.failure(), None);
    assert_each_applied_once(&database, last);
    assert_eq!(projection::stored_position(&database).unwrap(), last);
    let transaction = database.begin_read().unwrap();
    let marked = transaction.open_table(MARKED).unwrap().len().unwrap();
    // About 360 of the 400 accounts have an event at a multiple of 5; deliveries come in
    // pulls of 1 000 events, so every batch holds far more than a handful of holes.
    assert!(marked > 250, "{marked} accounts marked");
    assert_eq!(health.history_gaps.get(), marked);
    assert_eq!(health.events_applied.get(), last);
}

/// A stolen reader password can update the view's consumer: to deliver headers only (each
/// delivery would read as an unreadable message and cost its account) or one message at a
/// time (a silent stall). The view applies none of those deliveries, makes its consumer again
/// from the stored position, and goes on with nothing lost or marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_changed_to_strip_payloads_or_stall_is_made_again_and_nothing_is_lost() {
    use async_nats::jetstream::consumer::FromConsumer;
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let log = EventLog::open(client, &StreamSettings::default())
        .await
        .unwrap();
    append_events(&log, 10).await;
    let directory = tempfile::tempdir().unwrap();
    let database = Arc::new(Database::create(directory.path().join("views.redb")).unwrap());
    let engine = Engine::open(database.clone(), CountingView, "tampered").unwrap();
    let mut applied = engine.applied();
    let health = engine.health();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(engine.run(log.clone(), stopped));
    let wait = |target: u64| {
        let mut applied = applied.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(20),
                applied.wait_for(|applied| *applied >= target),
            )
            .await
            .expect("view caught up")
            .unwrap();
        }
    };
    wait(10).await;
    let stream = log.context().get_stream("COFFER_EVENTS").await.unwrap();
    let mut consumer = stream
        .get_consumer::<consumer::pull::Config>("tampered")
        .await
        .unwrap();
    let mut config = consumer.info().await.unwrap().config.clone();
    config.headers_only = true;
    config.max_ack_pending = 1;
    stream
        .update_consumer(consumer::pull::Config::try_from_consumer_config(config).unwrap())
        .await
        .unwrap();
    append_events(&log, 10).await;
    wait(20).await;
    // Paced down alone (it still delivers payloads): made again by the periodic check.
    let made_again = health.consumer_recreations.get();
    let mut config = consumer.info().await.unwrap().config.clone();
    assert!(!config.headers_only);
    config.max_ack_pending = 1;
    stream
        .update_consumer(consumer::pull::Config::try_from_consumer_config(config).unwrap())
        .await
        .unwrap();
    append_events(&log, 10).await;
    wait(30).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while health.consumer_recreations.get() == made_again {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a consumer paced down was not made again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    append_events(&log, 5).await;
    wait(35).await;
    applied.borrow_and_update();
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(health.failure(), None);
    let counts = counts(&database);
    assert_eq!(counts.len(), 35);
    assert!(
        counts.iter().all(|(_, count)| *count == 1),
        "not applied once each: {counts:?}"
    );
    let transaction = database.begin_read().unwrap();
    match transaction.open_table(UNREADABLE) {
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        table => assert_eq!(table.unwrap().len().unwrap(), 0, "accounts marked"),
    }
    assert!(health.consumer_changes.get() >= 2);
    assert!(health.consumer_recreations.get() >= 3);
    let mut consumer = stream
        .get_consumer::<consumer::pull::Config>("tampered")
        .await
        .unwrap();
    let config = consumer.info().await.unwrap().config.clone();
    assert!(!config.headers_only);
    assert_eq!(config.max_ack_pending, projection::MAX_ACK_PENDING);
}

/// A transaction takes deliveries up to a number of bytes as well as of events, splitting a
/// pull when it must: whatever the messages' size, a reader's memory stays bounded; and every
/// event is still applied once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_takes_deliveries_up_to_its_byte_budget() {
    let (_server, log, last, _directory, database) = histories(10, 300).await;
    // Each delivery is a few hundred bytes: 16 KiB is a few dozen events, where one pull
    // alone holds up to 1 000.
    let engine = Engine::open(database.clone(), CountingView, "budget")
        .unwrap()
        .transaction_bytes_max(16 * 1024);
    let health = run_engine_until(engine, &log, last).await;
    assert_each_applied_once(&database, last);
    assert_eq!(projection::stored_position(&database).unwrap(), last);
    // 3 000 events of at least 150 bytes each are over 440 KiB: at least 27 transactions of
    // 16 KiB (and one delivery) each.
    assert!(
        health.batches_committed.get() >= 27,
        "{} transactions for {last} events",
        health.batches_committed.get()
    );
}
