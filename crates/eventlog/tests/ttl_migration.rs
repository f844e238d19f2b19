//! `coffer setup --remove-message-ttl` against a real nats-server: a stream made with per-message
//! TTLs (as builds before it made them) is moved onto one without, keeping every message.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use domain::{AccountId, Amount, Currency, Event, OpenAccount, OverdraftLimit};
use eventlog::ttl_migration::{self, Stage};
use eventlog::{Error, EventLog, EventMetadata, StreamSettings};
use testkit::NatsServer;

/// One stored message, as a reader of the stream sees it.
#[derive(Debug, PartialEq)]
struct Stored {
    position: u64,
    subject: String,
    time: time::OffsetDateTime,
    headers: Vec<(String, Vec<String>)>,
    payload: Vec<u8>,
}

async fn everything(context: &jetstream::Context, name: &str) -> Vec<Stored> {
    let stream = context.get_stream(name).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut found = Vec::new();
    for position in 1..=last {
        if let Ok(message) = stream.get_raw_message(position).await {
            let mut headers: Vec<(String, Vec<String>)> = message
                .headers
                .iter()
                .map(|(name, values)| {
                    (
                        name.to_string(),
                        values.iter().map(|value| value.to_string()).collect(),
                    )
                })
                .collect();
            headers.sort();
            found.push(Stored {
                position,
                subject: message.subject.to_string(),
                time: message.time,
                headers,
                payload: message.payload.to_vec(),
            });
        }
    }
    found
}

async fn info_of(context: &jetstream::Context, name: &str) -> stream::Info {
    context
        .get_stream(name)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
}

/// The event stream as builds before this one made it: per-message TTLs allowed.
async fn stream_with_ttls(context: &jetstream::Context) {
    context
        .create_stream(stream::Config {
            allow_message_ttl: true,
            ..StreamSettings::default().config()
        })
        .await
        .unwrap();
}

fn account(name: &str) -> AccountId {
    AccountId::parse(&format!("{name}-{}", uuid::Uuid::now_v7().simple())).unwrap()
}

fn metadata() -> EventMetadata {
    EventMetadata {
        command_id: uuid::Uuid::now_v7().to_string(),
        correlation_id: "migration-test".into(),
        traceparent: None,
    }
}

/// Events of two accounts, markers that expire (one at the very end of the stream), one that
/// would in an hour, and an event someone appended with `Nats-TTL`.
async fn history(context: &jetstream::Context, log: &EventLog) -> (AccountId, AccountId) {
    let (a, b) = (account("a"), account("b"));
    let opened = Event::AccountOpened(OpenAccount {
        metadata: Default::default(),
        currency: Currency::parse("EUR").unwrap(),
        owner: None,
        overdraft_limit: OverdraftLimit::default(),
    });
    let deposited = |units| Event::Deposited {
        metadata: Default::default(),
        amount: Amount::new(units).unwrap(),
        reference: None,
    };
    let publish_with_ttl = |subject: String, ttl: &'static str| async move {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-TTL", ttl);
        context
            .publish_with_headers(subject, headers, "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    };
    publish_with_ttl("coffer.ids.key.a.early".into(), "1s").await;
    let mut position_a = log
        .append(&a, 0, &opened, &metadata())
        .await
        .unwrap()
        .last_position;
    let mut position_b = log
        .append(&b, 0, &opened, &metadata())
        .await
        .unwrap()
        .last_position;
    publish_with_ttl("coffer.ids.key.a.kept".into(), "1h").await;
    for units in 1..=5 {
        position_a = log
            .append(&a, position_a, &deposited(units), &metadata())
            .await
            .unwrap()
            .last_position;
        position_b = log
            .append(&b, position_b, &deposited(units * 10), &metadata())
            .await
            .unwrap()
            .last_position;
    }
    publish_with_ttl(format!("coffer.append.{a}.deposited"), "1h").await;
    publish_with_ttl("coffer.ids.key.a.late".into(), "1s").await;
    // Both short-lived markers are gone; the last stored message is no longer the last position.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    (a, b)
}

/// `stored` as a mirror copies it: the server drops the `Nats-Expected-*` and `Nats-Batch-*`
/// headers of what it mirrors. Loading then walks an account's migrated history instead of
/// trusting its last event's stated predecessor, and readers check migrated events by their
/// chain alone; events appended later carry the headers again.
fn as_mirrored(stored: &[Stored]) -> Vec<Stored> {
    stored
        .iter()
        .map(|stored| Stored {
            headers: stored
                .headers
                .iter()
                .filter(|(name, _)| {
                    !name.starts_with("Nats-Expected-") && !name.starts_with("Nats-Batch-")
                })
                .cloned()
                .collect(),
            subject: stored.subject.clone(),
            payload: stored.payload.clone(),
            ..*stored
        })
        .collect()
}

fn no_progress(_: &str, _: u64, _: u64) {}

#[tokio::test]
async fn a_stream_with_ttls_is_moved_keeping_every_position_time_and_header() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let context = jetstream::new(client.clone());
    stream_with_ttls(&context).await;
    let settings = StreamSettings::default();
    let log = EventLog::open(client.clone(), &settings).await.unwrap();
    let (a, b) = history(&context, &log).await;
    let before = everything(&context, &settings.name).await;
    let old_last = info_of(&context, &settings.name).await.state.last_sequence;
    assert!(before.len() >= 14, "{}", before.len());
    assert!(before
        .iter()
        .all(|stored| stored.subject != "coffer.ids.key.a.late"));
    assert_eq!(
        ttl_migration::stage(&context, &settings).await.unwrap(),
        Stage::NotStarted
    );

    let steps = Mutex::new(Vec::new());
    let record = |step: &str, _: u64, _: u64| steps.lock().unwrap().push(step.to_owned());
    let found = ttl_migration::remove_message_ttl(&context, &settings, Duration::ZERO, &record)
        .await
        .unwrap();
    assert_eq!(found, Stage::NotStarted);
    let steps = steps.into_inner().unwrap();
    assert!(
        steps.iter().any(|step| step.starts_with("sealing")),
        "{steps:?}"
    );
    assert!(
        steps.iter().any(|step| step.starts_with("promoting")),
        "{steps:?}"
    );

    // Every message is where it was, with its time, headers and payload; the removal's marker
    // comes after them, at the position after the old stream's last.
    let after = everything(&context, &settings.name).await;
    let (moved, added) = after.split_at(before.len());
    assert_eq!(moved, as_mirrored(&before).as_slice());
    assert_ne!(
        as_mirrored(&before),
        before,
        "the events stated their predecessors"
    );
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0].subject, ttl_migration::REMOVAL_MARKER);
    assert_eq!(added[0].position, old_last + 1);
    let info = info_of(&context, &settings.name).await;
    let config = &info.config;
    assert!(!config.allow_message_ttl && !config.sealed && config.mirror.is_none());
    assert_eq!(config.subjects, settings.config().subjects);
    assert_eq!(
        config.subject_transform,
        settings.config().subject_transform
    );
    assert_eq!(config.republish, settings.config().republish);
    assert!(config.allow_atomic_publish && config.deny_delete && config.deny_purge);
    assert!(
        ttl_migration::stream_info(&context, &ttl_migration::migrating_name(&settings))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        ttl_migration::stage(&context, &settings).await.unwrap(),
        Stage::Done
    );

    // The log works on: histories load, appends continue after the last position, the event
    // carrying Nats-TTL is still refused as an event, and a message that could expire is not
    // stored.
    let log = EventLog::open(client.clone(), &settings).await.unwrap();
    let history_b = log.load_account(&b, 0).await.unwrap();
    assert_eq!(history_b.len(), 6);
    let appended = log
        .append(
            &b,
            history_b.last().unwrap().position,
            &Event::Deposited {
                metadata: Default::default(),
                amount: Amount::new(7).unwrap(),
                reference: None,
            },
            &metadata(),
        )
        .await
        .unwrap();
    assert_eq!(appended.last_position, old_last + 2);
    let refused = log.load_account(&a, 0).await;
    assert!(
        matches!(&refused, Err(Error::Unreadable(unreadable)) if unreadable.to_string().contains("Nats-TTL")),
        "{refused:?}"
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-TTL", "1s");
    let ttl = async {
        context
            .publish_with_headers(format!("coffer.append.{b}.deposited"), headers, "x".into())
            .await?
            .await
    }
    .await;
    assert!(ttl.is_err(), "{ttl:?}");

    // Running it again changes nothing.
    let again =
        ttl_migration::remove_message_ttl(&context, &settings, Duration::ZERO, &no_progress)
            .await
            .unwrap();
    assert_eq!(again, Stage::Done);
    assert_eq!(
        everything(&context, &settings.name).await.len(),
        after.len() + 1
    );
}

/// A run stopped after the old stream was deleted leaves the log only in the copy: services
/// refuse to start (one would make an empty event stream), a stream made anyway is not taken
/// for the log, and running the migration again finishes it.
#[tokio::test]
async fn a_run_stopped_midway_is_finished_by_the_next_and_nothing_starts_in_between() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let context = jetstream::new(client.clone());
    stream_with_ttls(&context).await;
    let settings = StreamSettings::default();
    let log = EventLog::open(client.clone(), &settings).await.unwrap();
    history(&context, &log).await;
    let before = everything(&context, &settings.name).await;

    // The first steps by hand, up to where a run would stop after deleting the old stream.
    let copy = ttl_migration::migrating_name(&settings);
    let mut sealed = info_of(&context, &settings.name).await.config;
    sealed.sealed = true;
    context.update_stream(sealed).await.unwrap();
    context
        .create_stream(stream::Config {
            name: copy.clone(),
            mirror: Some(stream::Source {
                name: settings.name.clone(),
                ..Default::default()
            }),
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut copied = 0;
    for _ in 0..100 {
        copied = info_of(&context, &copy).await.state.messages;
        if copied == before.len() as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(copied, before.len() as u64);
    context.delete_stream(&settings.name).await.unwrap();
    assert_eq!(
        ttl_migration::stage(&context, &settings).await.unwrap(),
        Stage::Moved
    );

    let refused = EventLog::open(client.clone(), &settings).await;
    assert!(
        matches!(&refused, Err(Error::Configuration(text)) if text.contains(&copy)),
        "{:?}",
        refused.err()
    );
    assert!(ttl_migration::stream_info(&context, &settings.name)
        .await
        .unwrap()
        .is_none());

    // Something made an empty event stream anyway: it is not taken for the log.
    context.create_stream(settings.config()).await.unwrap();
    let refused =
        ttl_migration::remove_message_ttl(&context, &settings, Duration::ZERO, &no_progress).await;
    assert!(
        matches!(&refused, Err(Error::Configuration(text)) if text.contains("both exist")),
        "{refused:?}"
    );
    assert!(ttl_migration::stream_info(&context, &copy)
        .await
        .unwrap()
        .is_some());
    context.delete_stream(&settings.name).await.unwrap();

    let found =
        ttl_migration::remove_message_ttl(&context, &settings, Duration::ZERO, &no_progress)
            .await
            .unwrap();
    assert_eq!(found, Stage::Moved);
    assert_eq!(
        everything(&context, &settings.name).await,
        as_mirrored(&before)
    );
    assert!(ttl_migration::stream_info(&context, &copy)
        .await
        .unwrap()
        .is_none());
    EventLog::open(client, &settings).await.unwrap();
}

/// On three nodes the copies are replicated as the stream was: the moved stream has its three
/// replicas, every message where it was on each, and takes appends again.
#[tokio::test]
async fn on_three_nodes_the_moved_stream_keeps_its_replicas_and_every_message() {
    let cluster = testkit::NatsCluster::start();
    let urls: Vec<async_nats::ServerAddr> = cluster
        .urls()
        .split(',')
        .map(|url| url.parse().unwrap())
        .collect();
    let client = async_nats::connect(urls).await.unwrap();
    let context = jetstream::new(client.clone());
    let settings = StreamSettings {
        replicas: 3,
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let made = context
            .create_stream(stream::Config {
                allow_message_ttl: true,
                ..settings.config()
            })
            .await;
        match made {
            Ok(_) => break,
            Err(error) if std::time::Instant::now() < deadline => {
                eprintln!("cluster not ready yet: {error}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => panic!("{error}"),
        }
    }
    let log = EventLog::open(client.clone(), &settings).await.unwrap();
    history(&context, &log).await;
    let before = everything(&context, &settings.name).await;

    ttl_migration::remove_message_ttl(&context, &settings, Duration::ZERO, &no_progress)
        .await
        .unwrap();
    let after = everything(&context, &settings.name).await;
    assert_eq!(&after[..before.len()], as_mirrored(&before).as_slice());
    let info = info_of(&context, &settings.name).await;
    assert_eq!(info.config.num_replicas, 3);
    assert!(!info.config.allow_message_ttl);
    let cluster_info = info.cluster.expect("clustered");
    assert_eq!(cluster_info.replicas.len(), 2, "{cluster_info:?}");
    let b = account("b-after");
    EventLog::open(client, &settings)
        .await
        .unwrap()
        .append(
            &b,
            0,
            &Event::AccountOpened(OpenAccount {
                metadata: Default::default(),
                currency: Currency::parse("EUR").unwrap(),
                owner: None,
                overdraft_limit: OverdraftLimit::default(),
            }),
            &metadata(),
        )
        .await
        .unwrap();
}
