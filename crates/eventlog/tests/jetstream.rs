//! The event log against a real nats-server.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use domain::{AccountId, Amount, Currency, Event, OpenAccount, OverdraftLimit};
use std::time::Duration;

use domain::TransferId;
use eventlog::{subject, Entry, Error, EventLog, EventMetadata, StreamSettings};
use futures::StreamExt;
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
        metadata: Default::default(),
        currency: Currency::parse("EUR").unwrap(),
        owner: Some("test".into()),
        overdraft_limit: OverdraftLimit::default(),
    })
}

fn deposited(units: i128) -> Event {
    Event::Deposited {
        metadata: Default::default(),
        amount: Amount::new(units).unwrap(),
        reference: None,
    }
}

fn metadata() -> EventMetadata {
    EventMetadata {
        command_id: uuid::Uuid::now_v7().to_string(),
        correlation_id: "test".into(),
        traceparent: None,
    }
}

/// The load path skips the walk through the stream when the server shows the account's last
/// event is the only one after the caller's position (its count of the account's events from
/// nothing; the checked expected position, the batch and the chain value after a known one);
/// whichever way it goes, it returns exactly the events after the caller's position.
#[tokio::test]
async fn loading_after_a_known_position_and_chain_returns_exactly_the_later_events() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let a = account("a");
    let single = account("single");
    let mut position = log.append(&a, 0, &opened(), &metadata()).await.unwrap();
    log.append(&single, 0, &opened(), &metadata())
        .await
        .unwrap();
    for units in 1..=3 {
        position = log
            .append(&a, position.last_position, &deposited(units), &metadata())
            .await
            .unwrap();
    }
    let history = log.load_account(&a, 0).await.unwrap();
    assert_eq!(history.len(), 4);
    for (index, known) in history.iter().enumerate() {
        let chain = known.chain.clone().unwrap();
        let later = log
            .load_account_after(&a, known.position, &chain)
            .await
            .unwrap();
        let positions: Vec<u64> = later.iter().map(|event| event.position).collect();
        let expected: Vec<u64> = history[index + 1..]
            .iter()
            .map(|event| event.position)
            .collect();
        assert_eq!(positions, expected, "after the event at index {index}");
        // A chain value that is not the one at that position only costs the walk.
        let walked = log
            .load_account_after(&a, known.position, eventlog::chain::GENESIS)
            .await
            .unwrap();
        assert_eq!(walked.len(), history.len() - index - 1);
    }
    // Two events of one account in one batch both state the position before the batch (as
    // an actor's batch of queued deposits does); from that position both are loaded.
    let before = log.load_account(&a, 0).await.unwrap();
    let known = before.last().unwrap();
    let known_chain = known.chain.clone().unwrap();
    let (first_event, second_event) = (deposited(10), deposited(20));
    let first_chain = eventlog::chain::next(&known_chain, &a, &first_event).unwrap();
    let second_chain = eventlog::chain::next(&first_chain, &a, &second_event).unwrap();
    log.append_atomic(&[
        Entry::Event {
            account: a.clone(),
            expected_last_position: known.position,
            event: first_event,
            metadata: metadata(),
            chain: first_chain,
        },
        Entry::Event {
            account: a.clone(),
            expected_last_position: known.position,
            event: second_event,
            metadata: metadata(),
            chain: second_chain,
        },
    ])
    .await
    .unwrap();
    let batch = log
        .load_account_after(&a, known.position, &known_chain)
        .await
        .unwrap();
    assert_eq!(
        batch
            .iter()
            .map(|event| event.event.clone())
            .collect::<Vec<_>>(),
        vec![deposited(10), deposited(20)]
    );
    // The same two events with chain values that do not link (the server does not check
    // them): the batch's earlier member is still found.
    let before = log.load_account(&a, 0).await.unwrap();
    let known = before.last().unwrap();
    let known_chain = known.chain.clone().unwrap();
    let unlinked = |event: Event| Entry::Event {
        account: a.clone(),
        expected_last_position: known.position,
        chain: eventlog::chain::next(&known_chain, &a, &event).unwrap(),
        event,
        metadata: metadata(),
    };
    log.append_atomic(&[unlinked(deposited(30)), unlinked(deposited(40))])
        .await
        .unwrap();
    let batch = log
        .load_account_after(&a, known.position, &known_chain)
        .await
        .unwrap();
    assert_eq!(batch.len(), 2);
    let first = log
        .load_account_after(&single, 0, eventlog::chain::GENESIS)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].event, opened());
    assert!(log
        .load_account_after(&account("none"), 0, eventlog::chain::GENESIS)
        .await
        .unwrap()
        .is_empty());
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
        .append(&a, p1.last_position, &deposited(10), &metadata())
        .await
        .unwrap();
    assert!(p1.last_position < other.last_position && other.last_position < p2.last_position);

    let history = log.load_account(&a, 0).await.unwrap();
    assert_eq!(
        history
            .iter()
            .map(|e| (e.position, e.event.clone()))
            .collect::<Vec<_>>(),
        vec![
            (p1.last_position, opened()),
            (p2.last_position, deposited(10))
        ]
    );
    assert_eq!(history[1].subject, format!("coffer.events.{a}.deposited"));
    assert_eq!(history[1].metadata.correlation_id, "test");
    // Loading from a position skips what the caller already has.
    let tail = log.load_account(&a, p1.last_position).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert!(log
        .load_account(&account("none"), 0)
        .await
        .unwrap()
        .is_empty());

    assert_eq!(
        log.last_account_position(&a).await.unwrap(),
        p2.last_position
    );
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
        .last_position;
    for _ in 0..2_500 {
        last = log
            .append(&a, last, &deposited(1), &metadata())
            .await
            .unwrap()
            .last_position;
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
    log.append(&a, p1.last_position, &deposited(1), &metadata())
        .await
        .unwrap();
    let stale = log
        .append(&a, p1.last_position, &deposited(2), &metadata())
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

/// An event entry; these tests check positions and conditions, not chains, so every event is
/// chained as if it were its account's first.
fn event_entry(account: &AccountId, expected: u64, event: Event) -> Entry {
    Entry::Event {
        account: account.clone(),
        expected_last_position: expected,
        chain: eventlog::chain::next(eventlog::chain::GENESIS, account, &event).unwrap(),
        event,
        metadata: metadata(),
    }
}

fn marker(subject: String) -> Entry {
    Entry::Marker {
        subject,
        payload: b"first".to_vec(),
    }
}

#[tokio::test]
async fn an_atomic_batch_commits_every_message_at_consecutive_positions_or_none() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let (a, b) = (account("from"), account("to"));
    let pa = log.append(&a, 0, &opened(), &metadata()).await.unwrap();
    let pb = log.append(&b, 0, &opened(), &metadata()).await.unwrap();
    let claim = subject::transfer_marker(&TransferId::parse("t-1").unwrap());
    let batch = vec![
        event_entry(&a, pa.last_position, deposited(1)),
        event_entry(&b, pb.last_position, deposited(2)),
        marker(claim.clone()),
    ];
    let appended = log.append_atomic(&batch).await.unwrap();
    assert_eq!(appended.last_position, appended.first_position + 2);
    assert_eq!(appended.first_position, pb.last_position + 1);
    let stored = log.read_marker(&claim).await.unwrap().unwrap();
    assert_eq!(
        (stored.position, stored.payload.as_slice()),
        (appended.last_position, &b"first"[..])
    );

    // The same claim again fails the whole batch, although both accounts' checks pass.
    let again = vec![
        event_entry(&a, appended.first_position, deposited(5)),
        event_entry(&b, appended.first_position + 1, deposited(5)),
        marker(claim.clone()),
    ];
    let refused = log.append_atomic(&again).await;
    assert!(
        matches!(refused, Err(Error::Conflict { .. })),
        "{refused:?}"
    );
    // A stale expectation on the second account fails it too, and says where that account is.
    let stale = vec![
        event_entry(&a, appended.first_position, deposited(5)),
        event_entry(&b, pb.last_position, deposited(5)),
        marker(subject::transfer_marker(&TransferId::parse("t-2").unwrap())),
    ];
    let refused = log.append_atomic(&stale).await;
    assert!(
        matches!(refused, Err(Error::Conflict { current_last_position: Some(position) }) if position == appended.first_position + 1),
        "{refused:?}"
    );
    assert!(log
        .read_marker(&subject::transfer_marker(
            &TransferId::parse("t-2").unwrap()
        ))
        .await
        .unwrap()
        .is_none());
    assert_eq!(log.load_account(&a, 0).await.unwrap().len(), 2);
    assert_eq!(log.load_account(&b, 0).await.unwrap().len(), 2);
    // The events endpoint's reads skip markers.
    let everything = log.read_after(0, 100).await.unwrap();
    assert_eq!(everything.len(), 4);
    assert_eq!(log.last_position().await.unwrap(), appended.last_position);
}

#[tokio::test]
async fn core_subscribers_see_only_committed_events_with_their_positions() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let mut events = log.client().subscribe("coffer.events.>").await.unwrap();
    let a = account("sub");
    let opened_at = log.append(&a, 0, &opened(), &metadata()).await.unwrap();
    // Refused: a stale expectation, and a batch whose marker exists.
    assert!(log.append(&a, 0, &opened(), &metadata()).await.is_err());
    let claim = subject::transfer_marker(&TransferId::parse("sub-claim").unwrap());
    log.append_atomic(&[marker(claim.clone())]).await.unwrap();
    let failed = log
        .append_atomic(&[
            event_entry(&a, opened_at.last_position, deposited(1)),
            marker(claim),
        ])
        .await;
    assert!(matches!(failed, Err(Error::Conflict { .. })), "{failed:?}");
    let deposit = log
        .append(&a, opened_at.last_position, &deposited(3), &metadata())
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(300), events.next()).await
    {
        let headers = message.headers.unwrap();
        seen.push((
            message.subject.to_string(),
            headers.get("Nats-Sequence").unwrap().as_str().to_owned(),
        ));
    }
    assert_eq!(
        seen,
        vec![
            (
                subject::event(&a, "account_opened"),
                opened_at.last_position.to_string()
            ),
            (
                subject::event(&a, "deposited"),
                deposit.last_position.to_string()
            ),
        ]
    );
}

async fn events_info(
    context: &async_nats::jetstream::Context,
) -> async_nats::jetstream::stream::Info {
    let mut stream = context.get_stream("COFFER_EVENTS").await.unwrap();
    stream.info().await.unwrap().clone()
}

/// A key marker claims its subject for good, and the stream stores nothing that could expire:
/// with `Nats-TTL` a writer credential could append an event that vanishes after it was spent.
#[tokio::test]
async fn a_marker_claims_its_subject_for_good_and_nothing_that_could_expire_is_stored() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let key = "coffer.ids.key.acc.no-ttl".to_owned();
    log.append_atomic(&[marker(key.clone())]).await.unwrap();
    let second = log.append_atomic(&[marker(key.clone())]).await;
    assert!(matches!(second, Err(Error::Conflict { .. })), "{second:?}");
    let context = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    for subject in [
        "coffer.append.acc-ttl.deposited".to_owned(),
        "coffer.ids.key.acc.vanishing".to_owned(),
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-TTL", "2s");
        let refused = async {
            context
                .publish_with_headers(subject.clone(), headers, "x".into())
                .await?
                .await
        }
        .await;
        let error = refused.expect_err("a message with Nats-TTL is refused");
        assert!(error.to_string().to_lowercase().contains("ttl"), "{error}");
    }
    let info = events_info(&context).await;
    assert_eq!(info.state.messages, 1, "only the first marker is stored");
}

#[tokio::test]
async fn stream_has_the_contract_configuration_and_ensure_is_idempotent() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let settings = StreamSettings::default();
    EventLog::open(client.clone(), &settings).await.unwrap();
    EventLog::open(client.clone(), &settings).await.unwrap();
    let context = async_nats::jetstream::new(client);
    let info = events_info(&context).await;
    let config = info.config;
    assert_eq!(
        config.subjects,
        vec!["coffer.append.>".to_string(), "coffer.ids.>".to_string()]
    );
    assert_eq!(
        config
            .subject_transform
            .map(|transform| transform.destination),
        Some("coffer.events.>".to_string())
    );
    assert!(config.allow_atomic_publish && !config.allow_message_ttl);
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

#[tokio::test]
async fn single_appends_chain_each_event_to_its_accounts_previous_one() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let a = account("chain");
    let first = log.append(&a, 0, &opened(), &metadata()).await.unwrap();
    log.append(&a, first.last_position, &deposited(4), &metadata())
        .await
        .unwrap();
    let history = log.load_account(&a, 0).await.unwrap();
    let mut previous = eventlog::chain::GENESIS.to_owned();
    for recorded in &history {
        let stored = recorded
            .chain
            .clone()
            .expect("every event carries Coffer-Chain");
        assert_eq!(stored, recorded.expected_chain(&previous));
        previous = stored;
    }
    assert_eq!(history.len(), 2);
}

#[tokio::test]
async fn a_schedule_delivers_its_message_at_its_time_and_the_first_one_stays() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let a = account("sched");
    let hold = TransferId::parse("sched-hold").unwrap();
    let due = subject::hold_expiry_due(&a, &hold);
    let at = time::OffsetDateTime::now_utc() + Duration::from_secs(2);
    let schedule = subject::hold_expiry_schedule(&a, &hold, at.unix_timestamp());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(eventlog::log::header::HOLD_EXPIRES_AT, "1234");
    assert!(log
        .schedule(&schedule, &due, at, headers, b"first".to_vec())
        .await
        .unwrap());
    // A retry does not move it.
    assert!(!log
        .schedule(
            &schedule,
            &due,
            at + Duration::from_secs(60),
            async_nats::HeaderMap::new(),
            b"second".to_vec()
        )
        .await
        .unwrap());
    assert!(
        log.read_scheduled(&due).await.unwrap().is_none(),
        "fired early"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let fired = loop {
        if let Some(message) = log.read_scheduled(&due).await.unwrap() {
            break message;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the schedule never fired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(fired.payload, b"first");
    // The schedule's own headers travel with the message it stores.
    let stored = log
        .context()
        .get_stream("COFFER_SCHEDULES")
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&due)
        .await
        .unwrap();
    assert_eq!(
        stored
            .headers
            .get(eventlog::log::header::HOLD_EXPIRES_AT)
            .map(|value| value.as_str()),
        Some("1234")
    );
    assert!(time::OffsetDateTime::now_utc() >= at.replace_nanosecond(0).unwrap());
    // The event log itself keeps its protections: no purge, no roll-ups.
    let events = log
        .context()
        .get_stream("COFFER_EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert!(events.deny_purge && !events.allow_rollup && !events.allow_message_schedules);
}

mod group_commit {
    use std::sync::atomic::Ordering::Relaxed;

    use eventlog::{GroupCommit, GroupCommitSettings};

    use super::*;

    /// Sends every append of `members` to `committer` before the committer runs (the test
    /// runtime has one thread, and the committer is a task of it), so they all wait for the same
    /// batch.
    async fn together(
        committer: &GroupCommit,
        members: Vec<Vec<Entry>>,
    ) -> Vec<Result<eventlog::Appended, Error>> {
        futures::future::join_all(
            members
                .into_iter()
                .map(|entries| committer.append(entries, None)),
        )
        .await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn appends_of_many_accounts_share_one_batch_and_each_gets_its_positions() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        let committer = GroupCommit::start(log.clone(), GroupCommitSettings::default());
        let accounts: Vec<AccountId> = (0..50).map(|_| account("many")).collect();
        let members = accounts
            .iter()
            .map(|id| {
                vec![
                    event_entry(id, 0, opened()),
                    marker(format!("coffer.ids.test.{id}")),
                ]
            })
            .collect();
        let results = together(&committer, members).await;
        let counters = committer.counters();
        assert_eq!(counters.batches.load(Relaxed), 1, "one batch for all 50");
        assert_eq!(counters.members.load(Relaxed), 50);
        for (id, result) in accounts.iter().zip(results) {
            let appended = result.unwrap();
            assert_eq!(appended.last_position, appended.first_position + 1);
            // The member's own event is at the position it was told.
            let history = log.load_account(id, 0).await.unwrap();
            assert_eq!(history.len(), 1);
            assert_eq!(history[0].position, appended.first_position);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_with_one_stale_member_still_commits_the_others() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        let stale = account("stale");
        let first = log.append(&stale, 0, &opened(), &metadata()).await.unwrap();
        let committer = GroupCommit::start(log.clone(), GroupCommitSettings::default());
        let fresh: Vec<AccountId> = (0..5).map(|_| account("fresh")).collect();
        let mut members: Vec<Vec<Entry>> = fresh
            .iter()
            .map(|id| vec![event_entry(id, 0, opened())])
            .collect();
        // Decided as if the account had no event yet: its check fails.
        members.insert(2, vec![event_entry(&stale, 0, opened())]);
        let results = together(&committer, members).await;
        assert_eq!(
            committer.counters().split.load(Relaxed),
            1,
            "refused whole, then split"
        );
        for (index, result) in results.iter().enumerate() {
            if index == 2 {
                assert!(
                    matches!(result, Err(Error::Conflict { current_last_position: Some(position) }) if *position == first.last_position),
                    "{result:?}"
                );
            } else {
                assert!(result.is_ok(), "{index}: {result:?}");
            }
        }
        for id in &fresh {
            assert_eq!(log.load_account(id, 0).await.unwrap().len(), 1);
        }
        assert_eq!(log.load_account(&stale, 0).await.unwrap().len(), 1);
    }

    /// JetStream checks every condition of a batch against the stream before the batch, so two
    /// credits of one receiver decided on the same copy of it would both pass in one batch. The
    /// committer keeps them in separate batches, where the second fails as it would alone.
    #[tokio::test(flavor = "current_thread")]
    async fn two_appends_on_one_account_never_share_a_batch() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        let receiver = account("receiver");
        let opened_at = log
            .append(&receiver, 0, &opened(), &metadata())
            .await
            .unwrap();
        let committer = GroupCommit::start(log.clone(), GroupCommitSettings::default());
        let credit = || {
            vec![event_entry(
                &receiver,
                opened_at.last_position,
                deposited(5),
            )]
        };
        let results = together(&committer, vec![credit(), credit()]).await;
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(
            matches!(results[1], Err(Error::Conflict { .. })),
            "{:?}",
            results[1]
        );
        assert_eq!(committer.counters().batches.load(Relaxed), 2);
        assert_eq!(log.load_account(&receiver, 0).await.unwrap().len(), 2);
        // The same goes for a marker subject: the first claim wins.
        let claim = format!("coffer.ids.test.{}", account("claim"));
        let results = together(
            &committer,
            vec![vec![marker(claim.clone())], vec![marker(claim.clone())]],
        )
        .await;
        assert!(results[0].is_ok() && matches!(results[1], Err(Error::Conflict { .. })));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_append_past_its_deadline_is_not_sent() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        let committer = GroupCommit::start(log.clone(), GroupCommitSettings::default());
        let late = account("late");
        let past = tokio::time::Instant::now() - Duration::from_millis(1);
        let result = committer
            .append(vec![event_entry(&late, 0, opened())], Some(past))
            .await;
        assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
        assert_eq!(committer.counters().expired.load(Relaxed), 1);
        assert!(log.load_account(&late, 0).await.unwrap().is_empty());
    }

    /// A member whose deadline passes while its batch is staged costs only itself: the batch is
    /// not committed, and the others are sent again without it, again when that happens twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_expiring_while_its_batch_is_staged_is_dropped_and_the_rest_commit() {
        let server = NatsServer::start();
        let log = log_on(&server)
            .await
            .with_failpoint_commit_delay(Duration::from_secs(1));
        let committer = GroupCommit::start(log.clone(), GroupCommitSettings::default());
        // One append in flight (1 s), so the next three wait and go as one batch.
        let started = tokio::time::Instant::now();
        let first = account("first");
        let in_flight = {
            let committer = committer.clone();
            let first = first.clone();
            tokio::spawn(async move {
                committer
                    .append(vec![event_entry(&first, 0, opened())], None)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (nearly, later) = (account("nearly"), account("later"));
        let others = [account("ok-1"), account("ok-2")];
        // Alive when the batch is gathered (~1 s), past while it is staged (~1 s more).
        let nearly_due = started + Duration::from_millis(1_500);
        // Alive when the rest is sent again (~2 s), past while that is staged (~1 s more).
        let later_due = started + Duration::from_millis(2_500);
        let (expired, expired_later, kept_1, kept_2) = tokio::join!(
            committer.append(vec![event_entry(&nearly, 0, opened())], Some(nearly_due)),
            committer.append(vec![event_entry(&later, 0, opened())], Some(later_due)),
            committer.append(vec![event_entry(&others[0], 0, opened())], None),
            committer.append(vec![event_entry(&others[1], 0, opened())], None),
        );
        in_flight.await.unwrap().unwrap();
        assert!(matches!(expired, Err(Error::Unavailable(_))), "{expired:?}");
        assert!(
            matches!(expired_later, Err(Error::Unavailable(_))),
            "{expired_later:?}"
        );
        kept_1.unwrap();
        kept_2.unwrap();
        assert_eq!(committer.counters().expired.load(Relaxed), 2);
        assert_eq!(committer.counters().batches.load(Relaxed), 2);
        assert!(log.load_account(&nearly, 0).await.unwrap().is_empty());
        assert!(log.load_account(&later, 0).await.unwrap().is_empty());
        for id in others.iter().chain([&first]) {
            assert_eq!(log.load_account(id, 0).await.unwrap().len(), 1);
        }
    }

    /// An append held back (behind a reservation) is answered at its own deadline, unsent, while
    /// the reservation is still held; the committer keeps serving other accounts meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_held_back_past_its_deadline_is_answered_then_and_never_sent() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        let hot = account("held");
        let committer = GroupCommit::start(log.clone(), GroupCommitSettings::default());
        let reserved = committer
            .reserve(std::slice::from_ref(&hot), None)
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let deadline = started + Duration::from_millis(300);
        let held = committer
            .append(vec![event_entry(&hot, 0, opened())], Some(deadline))
            .await;
        let waited = started.elapsed();
        assert!(matches!(held, Err(Error::Unavailable(_))), "{held:?}");
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
            "answered after {waited:?}"
        );
        assert_eq!(committer.counters().expired.load(Relaxed), 1);
        let other = account("free");
        committer
            .append(vec![event_entry(&other, 0, opened())], None)
            .await
            .unwrap();
        drop(reserved);
        assert!(log.load_account(&hot, 0).await.unwrap().is_empty());
    }

    /// A reservation holds back every later append touching its accounts until its holder
    /// appends under it (that append goes first) or lets it go; other accounts are not held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reservation_goes_before_later_appends_to_its_accounts_and_ends_when_dropped() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        let hot = account("hot");
        let opened_at = log.append(&hot, 0, &opened(), &metadata()).await.unwrap();
        let committer = GroupCommit::start(log.clone(), GroupCommitSettings::default());
        let reserved = committer
            .reserve(std::slice::from_ref(&hot), None)
            .await
            .unwrap();
        // Decided on the same state as the holder's, queued after the reservation.
        let later = {
            let committer = committer.clone();
            let entry = event_entry(&hot, opened_at.last_position, deposited(1));
            tokio::spawn(async move { committer.append(vec![entry], None).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !later.is_finished(),
            "an append to a reserved account was sent"
        );
        // Another account is not held.
        let other = account("other");
        committer
            .append(vec![event_entry(&other, 0, opened())], None)
            .await
            .unwrap();
        let holder = committer
            .append_reserved(
                vec![event_entry(&hot, opened_at.last_position, deposited(2))],
                None,
                &reserved,
            )
            .await;
        assert!(holder.is_ok(), "{holder:?}");
        // The later append went after the holder's and found the account moved.
        let later = later.await.unwrap();
        assert!(matches!(later, Err(Error::Conflict { .. })), "{later:?}");
        assert_eq!(committer.counters().reservations.load(Relaxed), 1);
        // A reservation let go without appending holds nothing back.
        let last = log
            .load_account(&hot, 0)
            .await
            .unwrap()
            .last()
            .unwrap()
            .position;
        let dropped = committer
            .reserve(std::slice::from_ref(&hot), None)
            .await
            .unwrap();
        drop(dropped);
        let after = tokio::time::timeout(
            Duration::from_secs(5),
            committer.append(vec![event_entry(&hot, last, deposited(3))], None),
        )
        .await
        .expect("held back after the reservation was dropped");
        assert!(after.is_ok(), "{after:?}");
        // A reservation of accounts held by another waits for it: here past its deadline.
        let held = committer
            .reserve(std::slice::from_ref(&hot), None)
            .await
            .unwrap();
        let soon = tokio::time::Instant::now() + Duration::from_millis(200);
        let refused = committer
            .reserve(std::slice::from_ref(&hot), Some(soon))
            .await;
        assert!(matches!(refused, Err(Error::Unavailable(_))));
        drop(held);
    }

    /// A committer whose batches wait to fill for as long as a test could take, and the sizes
    /// of the batches it sends.
    fn filling_committer(
        log: &EventLog,
        fill_wait: Duration,
    ) -> (GroupCommit, std::sync::Arc<std::sync::Mutex<Vec<usize>>>) {
        let committer = GroupCommit::start(
            log.clone(),
            GroupCommitSettings {
                fill_wait,
                fill_quiet: fill_wait,
                ..Default::default()
            },
        );
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let observer: eventlog::group_commit::BatchObserver =
            Box::new(move |messages| seen.lock().unwrap().push(messages));
        assert!(committer.counters().on_batch.set(observer).is_ok());
        (committer, sizes)
    }

    /// Opens `count` new accounts in one batch (their callers are answered together).
    async fn opened_together(committer: &GroupCommit, name: &str, count: usize) -> Vec<AccountId> {
        let accounts: Vec<AccountId> = (0..count).map(|_| account(name)).collect();
        let members = accounts
            .iter()
            .map(|id| vec![event_entry(id, 0, opened())])
            .collect();
        assert!(together(committer, members).await.iter().all(Result::is_ok));
        accounts
    }

    /// Opens a new account on its own.
    async fn opened_alone(committer: &GroupCommit, name: &str) {
        let entries = vec![event_entry(&account(name), 0, opened())];
        committer.append(entries, None).await.unwrap();
    }

    /// Opens each account, each sent after the committer has taken the previous one in (the
    /// test runtime has one thread: yielding lets the committer run), as callers answered one
    /// after the other would, and waits for all of them.
    async fn opened_one_by_one(committer: &GroupCommit, accounts: &[AccountId]) {
        let mut handles = Vec::new();
        for id in accounts {
            let (committer, entries) = (committer.clone(), vec![event_entry(id, 0, opened())]);
            handles.push(tokio::spawn(async move {
                committer.append(entries, None).await
            }));
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        for handle in handles {
            handle.await.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn after_an_acknowledgement_the_next_batch_waits_for_the_callers_just_answered() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        // Waits end only when filled: a wait that was not would hang the test.
        let (committer, sizes) = filling_committer(&log, Duration::from_secs(600));
        // One caller, one command at a time: each batch is full at one and goes at once.
        let alone = account("alone");
        let mut expected = 0;
        for event in [opened(), deposited(1), deposited(2)] {
            let entries = vec![event_entry(&alone, expected, event)];
            let appended =
                tokio::time::timeout(Duration::from_secs(30), committer.append(entries, None))
                    .await
                    .expect("a lone caller never waits for others")
                    .unwrap();
            expected = appended.last_position;
        }
        // Ten callers answered together come back one by one: one batch, not ten.
        let first = opened_together(&committer, "cohort", 10).await;
        let again: Vec<AccountId> = (0..10).map(|_| account("back")).collect();
        opened_one_by_one(&committer, &again).await;
        assert_eq!(*sizes.lock().unwrap(), vec![1, 1, 1, 10, 10]);
        // Only the ten coming back one by one were held back; the lone caller's waits and the
        // ten arriving at once held nothing.
        assert_eq!(committer.counters().fills.load(Relaxed), 1);
        assert_eq!(committer.counters().fills_short.load(Relaxed), 0);
        for id in first.iter().chain(&again) {
            assert_eq!(log.load_account(id, 0).await.unwrap().len(), 1);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_a_fill_wait_the_first_caller_back_goes_alone() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        let (committer, sizes) = filling_committer(&log, Duration::ZERO);
        opened_together(&committer, "cohort", 10).await;
        let again: Vec<AccountId> = (0..10).map(|_| account("back")).collect();
        opened_one_by_one(&committer, &again).await;
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes[..2], [10, 1], "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 20);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_wait_that_nobody_fills_ends_at_its_limit_and_the_next_batches_go_at_once() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        let (committer, sizes) = filling_committer(&log, Duration::from_millis(300));
        opened_together(&committer, "cohort", 10).await;
        // Only one of the ten comes back: it waits the whole limit (counted from the ten's
        // acknowledgement, a little before this), then goes short.
        let started = tokio::time::Instant::now();
        opened_alone(&committer, "late").await;
        assert!(started.elapsed() >= Duration::from_millis(250));
        let counters = committer.counters();
        assert_eq!(counters.fills_short.load(Relaxed), 1);
        // Filling is paused now: after ten answered together, one coming back goes at once.
        opened_together(&committer, "paused", 10).await;
        let started = tokio::time::Instant::now();
        opened_alone(&committer, "one").await;
        assert!(started.elapsed() < Duration::from_millis(300));
        assert_eq!(counters.fills.load(Relaxed), 0);
        assert_eq!(counters.fills_short.load(Relaxed), 1);
        assert_eq!(*sizes.lock().unwrap(), vec![10, 1, 10, 1]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_limit_of_one_message_sends_every_append_alone() {
        let server = NatsServer::start();
        let log = log_on(&server).await;
        let committer = GroupCommit::start(
            log.clone(),
            GroupCommitSettings {
                messages_max: 1,
                ..Default::default()
            },
        );
        let members = (0..4)
            .map(|_| vec![event_entry(&account("alone"), 0, opened())])
            .collect();
        let results = together(&committer, members).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(committer.counters().batches.load(Relaxed), 4);
    }
}

#[tokio::test]
async fn a_batch_whose_deadline_passes_while_staging_is_never_committed() {
    let server = NatsServer::start();
    let log = log_on(&server).await;
    let (a, b) = (account("late-a"), account("late-b"));
    let past = tokio::time::Instant::now() - Duration::from_millis(1);
    let batch = vec![event_entry(&a, 0, opened()), event_entry(&b, 0, opened())];
    let refused = log.append_atomic_before(&batch, Some(past)).await;
    assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");
    // The staged messages were abandoned: nothing of the batch is stored, and the accounts can
    // still be opened.
    assert!(log.load_account(&a, 0).await.unwrap().is_empty());
    assert!(log.load_account(&b, 0).await.unwrap().is_empty());
    let batch = vec![event_entry(&a, 0, opened()), event_entry(&b, 0, opened())];
    log.append_atomic(&batch).await.unwrap();
    assert_eq!(log.load_account(&a, 0).await.unwrap().len(), 1);
}
