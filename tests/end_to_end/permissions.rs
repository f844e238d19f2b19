//! The whole system under the shipped least-privilege configuration (`nats/accounts.conf`):
//! `coffer setup` (setup role) makes the streams, writer and reader run as their own users, and
//! every forbidden action is refused for each role.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::json;
use testkit::NatsServer;

use crate::support::{self, Http};

const PASSWORDS: [(&str, &str); 5] = [
    ("COFFER_NATS_SETUP_PASSWORD", "setup-secret"),
    ("COFFER_NATS_WRITER_PASSWORD", "writer-secret"),
    ("COFFER_NATS_READER_0_PASSWORD", "reader-0-secret"),
    ("COFFER_NATS_READER_1_PASSWORD", "reader-1-secret"),
    ("COFFER_NATS_READER_2_PASSWORD", "reader-2-secret"),
];

fn server() -> NatsServer {
    // nats-server resolves includes against the including file's directory: inline the file.
    let accounts =
        std::fs::read_to_string(testkit::workspace_root().join("nats/accounts.conf")).unwrap();
    // The server holds bcrypt hashes only, as the Kubernetes deployment gives it (a NATS pod's
    // environment then reveals no client's password); the clients log in with the passwords.
    // The lowest cost keeps the many logins of these tests fast; deployments use 11 or more.
    // nats-server parses a variable's value as configuration, where a bare `$2b$...` would be
    // a variable reference: the hash goes in quotes.
    let hashed: Vec<(&str, String)> = PASSWORDS
        .iter()
        .map(|(variable, password)| {
            (
                *variable,
                format!("\"{}\"", bcrypt::hash(password, 4).unwrap()),
            )
        })
        .collect();
    let environment: Vec<(&str, &str)> = hashed
        .iter()
        .map(|(variable, hash)| (*variable, hash.as_str()))
        .collect();
    NatsServer::start_with(&accounts, &environment)
}

fn role_environment(user: &str, password: &str) -> Vec<(&'static str, String)> {
    vec![
        ("COFFER_NATS_USER", user.to_owned()),
        ("COFFER_NATS_PASSWORD", password.to_owned()),
        ("COFFER_NATS_INBOX_PREFIX", format!("_INBOX_{user}")),
    ]
}

/// A durable consumer of every event, as a reader makes it.
fn every_event_consumer(name: &str) -> jetstream::consumer::pull::Config {
    jetstream::consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        filter_subject: "coffer.events.>".into(),
        ack_policy: jetstream::consumer::AckPolicy::All,
        ..Default::default()
    }
}

async fn connect_as(url: &str, user: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .request_timeout(Some(Duration::from_millis(1_500)))
        .connect(url)
        .await
        .unwrap()
}

/// `coffer setup` as the setup role, then one writer as the writer role, ready.
fn set_up_with_writer(url: &str) -> testkit::CofferProcess {
    set_up_with_writer_and(url, &[])
}

/// [`set_up_with_writer`] with more environment for the writer.
fn set_up_with_writer_and(url: &str, extra: &[(&'static str, String)]) -> testkit::CofferProcess {
    let output = std::process::Command::new(testkit::coffer_binary())
        .arg("setup")
        .env("COFFER_NATS_URL", url)
        .env("COFFER_NATS_USER", "setup")
        .env("COFFER_NATS_PASSWORD", "setup-secret")
        .output()
        .unwrap();
    assert!(output.status.success());
    let mut environment = role_environment("writer", "writer-secret");
    environment.push(("COFFER_NATS_URL", url.to_owned()));
    environment.extend(extra.iter().cloned());
    let writer = testkit::CofferProcess::start("w", "writer", &environment);
    support::wait_ready(&writer.url());
    writer
}

/// Reader `coffer-reader-0` as its own NATS user, keeping its views under `data`; its password
/// from a file, as a Kubernetes reader reads it (`COFFER_NATS_PASSWORD_FILE`).
fn reader_as_role(url: &str, data: &std::path::Path) -> testkit::CofferProcess {
    reader_replica_as_role(0, url, data)
}

/// Reader `coffer-reader-{replica}` as its own NATS user (its own consumers), as
/// [`reader_as_role`].
fn reader_replica_as_role(
    replica: u8,
    url: &str,
    data: &std::path::Path,
) -> testkit::CofferProcess {
    let password = data.join("nats-password");
    std::fs::write(&password, format!("reader-{replica}-secret\n")).unwrap();
    let name = format!("coffer-reader-{replica}");
    support::reader(
        &name,
        url,
        data,
        &[
            ("COFFER_NATS_USER", name.clone()),
            ("COFFER_NATS_PASSWORD_FILE", password.display().to_string()),
            ("COFFER_NATS_INBOX_PREFIX", format!("_INBOX_{name}")),
        ],
    )
}

/// Messages and configuration of the event stream, as the setup role sees them.
async fn events_state(setup: &jetstream::Context) -> (u64, i64) {
    let mut stream = setup.get_stream("COFFER_EVENTS").await.unwrap();
    let info = stream.info().await.unwrap();
    (info.state.last_sequence, info.config.max_messages)
}

/// Whether anything arrives on `subscription` within a short while.
async fn receives(mut subscription: async_nats::Subscriber) -> bool {
    tokio::time::timeout(Duration::from_millis(400), subscription.next())
        .await
        .is_ok_and(|message| message.is_some())
}

/// The forbidden JetStream actions a role may try; each must fail and change nothing.
async fn assert_no_stream_management(role: &str, context: &jetstream::Context) {
    assert!(
        context.delete_stream("COFFER_EVENTS").await.is_err(),
        "{role} deleted the stream"
    );
    let mut config = jetstream::stream::Config {
        name: "COFFER_EVENTS".into(),
        max_messages: 1,
        ..Default::default()
    };
    config.subjects = vec!["coffer.append.>".into()];
    assert!(
        context.update_stream(config).await.is_err(),
        "{role} updated the stream"
    );
    assert!(
        context
            .create_stream(jetstream::stream::Config {
                name: format!("ROGUE_{}", role.to_uppercase()),
                subjects: vec![format!("rogue.{role}.>")],
                ..Default::default()
            })
            .await
            .is_err(),
        "{role} created a stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_its_work_and_nothing_else() {
    let nats = server();
    let url = nats.url();
    let writer_environment = {
        let mut environment = role_environment("writer", "writer-secret");
        environment.push(("COFFER_NATS_URL", url.clone()));
        // The backstop looks at the expiring hold below soon after it expired.
        environment.push(("COFFER_HOLD_BACKSTOP_DELAY_MS", "1000".into()));
        environment
    };
    let writer = testkit::CofferProcess::start("w", "writer", &writer_environment);
    // A second writer: partition leases and hand-overs work under the writer role too.
    let second_writer = testkit::CofferProcess::start("w2", "writer", &writer_environment);
    let data = tempfile::tempdir().unwrap();
    let reader = reader_as_role(&url, data.path());
    // Without the streams, and without the right to make them, the services wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        support::status_of(&format!("{}/readyz", writer.url())).unwrap(),
        503
    );

    let output = std::process::Command::new(testkit::coffer_binary())
        .arg("setup")
        .env("COFFER_NATS_URL", &url)
        .env("COFFER_NATS_USER", "setup")
        .env("COFFER_NATS_PASSWORD", "setup-secret")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    support::wait_ready(&writer.url());
    support::wait_ready(&second_writer.url());
    support::wait_ready(&reader.url());

    // The work: accounts, a transfer, a hold that expires (the shared consumer), reads.
    let http = Http::new();
    let (w, r) = (writer.url(), reader.url());
    let (a, b) = (support::unique("perm-a"), support::unique("perm-b"));
    for account in [&a, &b] {
        assert_eq!(http.open_account(&w, account).await.status, 201);
    }
    http.deposit(&w, &a, &json!({"amount": 100}), None)
        .await
        .unwrap();
    let transfer = http
        .post(
            &format!("{w}/v1/transfers"),
            &json!({"from": a, "to": b, "amount": 30}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(transfer.status, 201, "{:?}", transfer.body);
    let hold = http
        .post(
            &format!("{w}/v1/holds"),
            &json!({"from": a, "to": b, "amount": 20, "expires_in_seconds": 1}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(hold.status, 201, "{:?}", hold.body);
    let hold_id = hold.body["hold_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = http.get(&format!("{r}/v1/holds/{hold_id}")).await.unwrap();
        if view.body["status"] == "expired" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hold never expired: {:?}",
            view.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let read = http
        .get(&format!(
            "{r}/v1/accounts/{b}?min_position={}",
            transfer.body["position"]
        ))
        .await
        .unwrap();
    assert_eq!(read.body["balance"], 30);
    // The two writers share the partitions, and each hands the other's accounts over.
    let w2 = second_writer.url();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let first = http.metric(&w, "coffer_writer_partitions_owned").await;
        let second = http.metric(&w2, "coffer_writer_partitions_owned").await;
        if let (Some(first), Some(second)) = (first, second) {
            if first > 0.0 && second > 0.0 && first + second == 64.0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the writers never shared the partitions: {first:?} + {second:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for index in 0..16 {
        let account = support::unique(&format!("perm-owned-{index}"));
        assert_eq!(http.open_account(&w, &account).await.status, 201);
        let deposit = http
            .deposit(&w2, &account, &serde_json::json!({"amount": 5}), None)
            .await
            .unwrap();
        assert_eq!(deposit.status, 200, "{:?}", deposit.body);
    }
    let handed = http
        .metric(&w, "coffer_writer_commands_forwarded_total")
        .await
        .unwrap_or(0.0)
        + http
            .metric(&w2, "coffer_writer_commands_forwarded_total")
            .await
            .unwrap_or(0.0);
    assert!(handed > 0.0, "no command was handed to its owner");

    // NATS clients reach the writers' micro service (here as the setup role).
    let setup_client = connect_as(&url, "setup", "setup-secret").await;
    let reply = setup_client
        .request(format!("coffer.cmd.{a}.deposit"), r#"{"amount":1}"#.into())
        .await
        .unwrap();
    assert!(reply.headers.is_none(), "{:?}", reply.payload);

    let setup = jetstream::new(setup_client.clone());
    let (last_before, max_before) = events_state(&setup).await;
    // What `nats sub 'coffer.events.>'` users see: only the stream may publish there.
    let watcher = setup_client.subscribe("coffer.events.>").await.unwrap();
    setup_client.flush().await.unwrap();

    // The writer's user.
    let writer_client = connect_as(&url, "writer", "writer-secret").await;
    let writer_js = jetstream::new(writer_client.clone());
    writer_client
        .publish(format!("coffer.events.{a}.deposited"), "forged".into())
        .await
        .unwrap();
    writer_client.flush().await.unwrap();
    assert_no_stream_management("writer", &writer_js).await;
    let readers_consumer = writer_js
        .get_stream("COFFER_EVENTS")
        .await
        .unwrap()
        .delete_consumer("coffer-reader-0")
        .await;
    assert!(
        readers_consumer.is_err(),
        "the writer deleted a reader's consumer"
    );
    let snooping = writer_client
        .subscribe("_INBOX_coffer-reader-0.>")
        .await
        .unwrap();
    let plain_inboxes = writer_client.subscribe("_INBOX.>").await.unwrap();

    // The reader's user.
    let reader_client = connect_as(&url, "coffer-reader-0", "reader-0-secret").await;
    let reader_js = jetstream::new(reader_client.clone());
    for subject in [
        format!("coffer.append.{a}.deposited"),
        format!("coffer.events.{a}.deposited"),
        format!("coffer.ids.transfer.{a}"),
        // A snapshot's state is trusted once its chain matches the log, and any reader can see
        // the chain: only writers may store snapshots.
        format!("coffer.snapshots.{a}"),
        // Leases and hand-overs are the writers' alone.
        "$KV.COFFER_OWNERS.partitions.0".to_owned(),
        "coffer.owner.any".to_owned(),
    ] {
        reader_client
            .publish(subject, "forged".into())
            .await
            .unwrap();
    }
    reader_client.flush().await.unwrap();
    assert_no_stream_management("reader", &reader_js).await;
    // Stream info is allowed; the writers' consumer is not.
    let reader_schedules = reader_js.get_stream("COFFER_SCHEDULES").await.unwrap();
    assert!(
        reader_schedules
            .get_consumer::<jetstream::consumer::pull::Config>("coffer-hold-expiry")
            .await
            .is_err(),
        "the reader reached the writers' consumer"
    );
    assert!(
        reader_schedules
            .delete_consumer("coffer-hold-expiry")
            .await
            .is_err(),
        "the reader deleted the writers' consumer"
    );
    // Nor the writers' backstop consumer on the event stream it reads.
    let mut reader_events = reader_js.get_stream("COFFER_EVENTS").await.unwrap();
    assert!(
        reader_events
            .get_consumer::<jetstream::consumer::pull::Config>("coffer-hold-backstop")
            .await
            .is_err(),
        "the reader reached the writers' backstop consumer"
    );
    assert!(
        reader_events
            .delete_consumer("coffer-hold-backstop")
            .await
            .is_err(),
        "the reader deleted the writers' backstop consumer"
    );
    assert!(
        reader_events
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("coffer-hold-backstop".into()),
                filter_subject: "coffer.events.*.withdrawn".into(),
                ..Default::default()
            })
            .await
            .is_err(),
        "the reader re-configured the writers' backstop consumer"
    );
    // Each reader is its own user and manages its own two consumers only (its view's and its
    // rebuild's): another reader's consumer is out of reach, whatever its name.
    setup
        .get_stream("COFFER_EVENTS")
        .await
        .unwrap()
        .create_consumer(every_event_consumer("coffer-reader-1"))
        .await
        .unwrap();
    assert!(
        reader_events
            .consumer_info("coffer-reader-1")
            .await
            .is_err(),
        "a reader read another reader's consumer"
    );
    assert!(
        reader_events
            .delete_consumer("coffer-reader-1")
            .await
            .is_err(),
        "a reader deleted another reader's consumer"
    );
    assert!(
        reader_events
            .create_consumer(every_event_consumer("coffer-reader-1"))
            .await
            .is_err(),
        "a reader re-configured another reader's consumer"
    );
    assert!(
        reader_events
            .create_consumer(every_event_consumer("flood-0"))
            .await
            .is_err(),
        "a reader created a consumer of another name"
    );
    let rebuild = reader_events
        .create_consumer(every_event_consumer("coffer-reader-0-rebuild"))
        .await;
    assert!(rebuild.is_ok(), "its rebuild's consumer: {rebuild:?}");
    reader_events
        .delete_consumer("coffer-reader-0-rebuild")
        .await
        .unwrap();
    // And the stream caps consumers anyway (an operator's slip, a future role).
    assert_eq!(
        reader_events.info().await.unwrap().config.max_consumers,
        eventlog::stream::EVENTS_MAX_CONSUMERS
    );
    assert!(
        reader_client
            .request(format!("coffer.cmd.{a}.deposit"), r#"{"amount":1}"#.into())
            .await
            .is_err(),
        "the reader sent a command"
    );
    let reader_snooping = reader_client.subscribe("_INBOX_writer.>").await.unwrap();

    // Someone replies to the other roles' inboxes: the snoopers get nothing.
    setup_client
        .publish("_INBOX_coffer-reader-0.x", "private".into())
        .await
        .unwrap();
    setup_client
        .publish("_INBOX.x", "private".into())
        .await
        .unwrap();
    setup_client
        .publish("_INBOX_writer.x", "private".into())
        .await
        .unwrap();
    setup_client.flush().await.unwrap();
    assert!(
        !receives(snooping).await,
        "the writer read a reader's replies"
    );
    assert!(
        !receives(plain_inboxes).await,
        "the writer read other replies"
    );
    assert!(
        !receives(reader_snooping).await,
        "the reader read a writer's replies"
    );
    assert!(
        !receives(watcher).await,
        "a forged event reached coffer.events.> subscribers"
    );

    // Nothing forged was stored, nothing was reconfigured, and both consumers still exist.
    let (last_after, max_after) = events_state(&setup).await;
    assert_eq!((last_after, max_after), (last_before, max_before));
    let events = setup.get_stream("COFFER_EVENTS").await.unwrap();
    assert!(events.consumer_info("coffer-reader-0").await.is_ok());
    assert!(events.consumer_info("coffer-reader-1").await.is_ok());
    let backstop = events.consumer_info("coffer-hold-backstop").await.unwrap();
    assert_eq!(
        backstop.config.filter_subject, "coffer.events.*.hold_placed",
        "the backstop consumer was re-configured"
    );
    // The writers worked it under their role: the expired hold was looked at and acknowledged.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let backstop = events.consumer_info("coffer-hold-backstop").await.unwrap();
        if backstop.ack_floor.stream_sequence > 0 && backstop.num_ack_pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the writers never worked the backstop consumer: {backstop:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let schedules = setup.get_stream("COFFER_SCHEDULES").await.unwrap();
    assert!(schedules.consumer_info("coffer-hold-expiry").await.is_ok());
    let snapshots = setup.get_stream("COFFER_SNAPSHOTS").await.unwrap();
    assert!(
        snapshots
            .get_last_raw_message_by_subject(&format!("coffer.snapshots.{a}"))
            .await
            .is_err(),
        "the reader stored a snapshot"
    );
    assert!(setup.get_stream("ROGUE_WRITER").await.is_err());
    let owners = setup.get_key_value("COFFER_OWNERS").await.unwrap();
    let lease = owners.get("partitions.0").await.unwrap();
    assert_ne!(
        lease.as_deref(),
        Some(&b"forged"[..]),
        "the reader wrote a partition lease"
    );
    assert!(setup.get_stream("ROGUE_READER").await.is_err());
    // And the system still works for its own users.
    let after = http
        .deposit(&w, &b, &json!({"amount": 5}), None)
        .await
        .unwrap();
    assert_eq!(after.status, 200);
}

/// What the writer's NATS credential can append that is not an event (here JSON without headers,
/// as a stolen credential or a buggy client might) costs the account it names, not the service:
/// readers stay ready, apply what comes after it and serve every other account; the account's
/// views and commands are refused with `account_unreadable` naming the position; a rebuild ends
/// done; `coffer verify` reports it and checks the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_append_costs_its_account_not_the_service() {
    let nats = server();
    let url = nats.url();
    let writer = set_up_with_writer(&url);
    let data = tempfile::tempdir().unwrap();
    let reader = reader_as_role(&url, data.path());
    support::wait_ready(&writer.url());
    support::wait_ready(&reader.url());
    let http = Http::new();
    let (w, r) = (writer.url(), reader.url());
    let (victim, other) = (support::unique("victim"), support::unique("other"));
    for account in [&victim, &other] {
        assert_eq!(http.open_account(&w, account).await.status, 201);
        http.deposit(&w, account, &json!({"amount": 100}), None)
            .await
            .unwrap();
    }
    let writer_client = connect_as(&url, "writer", "writer-secret").await;
    let poison = jetstream::new(writer_client)
        .publish(
            format!("coffer.append.{victim}.deposited"),
            r#"{"amount":1000000}"#.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    // Events the views cannot place: deposits on an account that was never opened, the second
    // checked against the first (the stream accepts both). Before, the second stopped every
    // reader; now it costs that account only.
    let unopened = support::unique("unopened");
    let writer_js = jetstream::new(connect_as(&url, "writer", "writer-secret").await);
    for _ in 0..2 {
        forge_deposit(&writer_js, &unopened, 5, None).await;
    }
    // Life goes on after it.
    let later = http
        .deposit(&w, &other, &json!({"amount": 5}), None)
        .await
        .unwrap();
    assert_eq!(later.status, 200, "{:?}", later.body);
    let read = http
        .get(&format!(
            "{r}/v1/accounts/{other}?min_position={}",
            later.body["position"]
        ))
        .await
        .unwrap();
    assert_eq!(read.status, 200, "{:?}", read.body);
    assert_eq!(read.body["balance"], 105);
    assert_eq!(
        support::status_of(&format!("{r}/readyz")).unwrap(),
        200,
        "the reader is not ready"
    );
    assert_eq!(
        http.metric(&r, "coffer_projection_decode_failures_total")
            .await,
        Some(1.0)
    );
    assert_eq!(http.metric(&r, "coffer_projection_failed").await, Some(0.0));
    // The victim's views and commands say why they are refused.
    for path in [
        format!("{r}/v1/accounts/{victim}"),
        format!("{r}/v1/accounts/{victim}/transactions"),
    ] {
        let refused = http.get(&path).await.unwrap();
        assert_eq!(refused.status, 500, "{path}: {:?}", refused.body);
        assert_eq!(refused.body["code"], "account_unreadable");
        assert!(
            refused.body["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("position {poison}")),
            "{:?}",
            refused.body
        );
    }
    let command = http
        .deposit(&w, &victim, &json!({"amount": 1}), None)
        .await
        .unwrap();
    assert_eq!(command.status, 500, "{:?}", command.body);
    assert_eq!(command.body["code"], "account_unreadable");
    // A transfer to the victim is refused too, and moves nothing.
    let transfer = http
        .post(
            &format!("{w}/v1/transfers"),
            &json!({"from": other, "to": victim, "amount": 1}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        transfer.body["code"], "account_unreadable",
        "{:?}",
        transfer.body
    );
    // The writer's event page shows it in its place and goes past it.
    let page = http
        .get(&format!("{w}/v1/events?after={}&limit=10", poison - 1))
        .await
        .unwrap();
    assert_eq!(page.status, 200, "{:?}", page.body);
    assert_eq!(page.body["events"][0]["type"], "unreadable");
    assert_eq!(page.body["events"][0]["position"], poison);
    assert_eq!(page.body["events"][1]["account_id"], unopened.as_str());
    // The unplaceable pair cost its account.
    let refused = http
        .get(&format!("{r}/v1/accounts/{unopened}"))
        .await
        .unwrap();
    assert_eq!(
        refused.body["code"], "account_unreadable",
        "{:?}",
        refused.body
    );
    // A rebuild goes past it the same way.
    let rebuilt = crate::rebuild::rebuild(&r).await;
    assert!(
        rebuilt.status.success(),
        "{}{}",
        String::from_utf8_lossy(&rebuilt.stdout),
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    let read = http.get(&format!("{r}/v1/accounts/{other}")).await.unwrap();
    assert_eq!(read.body["balance"], 105, "{:?}", read.body);
    // `coffer verify` names it and checks every event.
    let verified = std::process::Command::new(testkit::coffer_binary())
        .arg("verify")
        .env("COFFER_NATS_URL", &url)
        .env("COFFER_NATS_USER", "setup")
        .env("COFFER_NATS_PASSWORD", "setup-secret")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verified.stdout);
    assert!(!verified.status.success(), "{report}");
    assert!(
        report.contains(&format!("{victim}: unreadable event at position {poison}")),
        "{report}"
    );
    // Two opens, two deposits, the unopened account's two and the one after: every event was
    // checked, none broken (the unopened pair chains from the start).
    assert!(
        report
            .contains("7 events checked, 0 account(s) with a broken chain, 1 unreadable event(s)"),
        "{report}"
    );
}

/// A consumer that skips events (here `withdrawn`) would make a reader serve balances the ledger
/// never had. The reader role may manage its consumers but only with the every-event filter, so
/// a stolen reader credential (or another reader pod) is refused such a change; someone with
/// more rights (the setup role, an operator's slip) is not, and the reader checks its consumer
/// while it runs and stops its view instead: `/readyz` 503, `coffer_projection_failed` 1
/// (alerted on), and what it had applied stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_whose_consumer_is_changed_behind_its_back_stops_its_view() {
    let nats = server();
    let url = nats.url();
    let writer = set_up_with_writer(&url);
    let data = tempfile::tempdir().unwrap();
    let reader = reader_as_role(&url, data.path());
    support::wait_ready(&writer.url());
    support::wait_ready(&reader.url());
    let http = Http::new();
    let (w, r) = (writer.url(), reader.url());
    let account = support::unique("skewed");
    assert_eq!(http.open_account(&w, &account).await.status, 201);
    let deposited = http
        .deposit(&w, &account, &json!({"amount": 1_000}), None)
        .await
        .unwrap();
    let read = http
        .get(&format!(
            "{r}/v1/accounts/{account}?min_position={}",
            deposited.body["position"]
        ))
        .await
        .unwrap();
    assert_eq!(read.body["balance"], 1_000);

    // The same consumer, now without withdrawals: refused to the reader role, in both forms
    // (a filter list, a narrower filter).
    let reader_client = connect_as(&url, "coffer-reader-0", "reader-0-secret").await;
    let reader_stream = jetstream::new(reader_client)
        .get_stream("COFFER_EVENTS")
        .await
        .unwrap();
    let setup_client = connect_as(&url, "setup", "setup-secret").await;
    let stream = jetstream::new(setup_client)
        .get_stream("COFFER_EVENTS")
        .await
        .unwrap();
    let mut config = stream
        .consumer_info("coffer-reader-0")
        .await
        .unwrap()
        .config
        .clone();
    config.filter_subject = String::new();
    config.filter_subjects = [
        "account_opened",
        "deposited",
        "transfer_debited",
        "transfer_credited",
    ]
    .iter()
    .map(|kind| format!("coffer.events.*.{kind}"))
    .collect();
    let skipping =
        |filter_subject: String, filter_subjects: Vec<String>| jetstream::consumer::pull::Config {
            durable_name: config.durable_name.clone(),
            filter_subject,
            filter_subjects,
            deliver_policy: config.deliver_policy,
            ack_policy: config.ack_policy,
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver,
            max_ack_pending: config.max_ack_pending,
            description: config.description.clone(),
            ..Default::default()
        };
    assert!(
        reader_stream
            .update_consumer(skipping(String::new(), config.filter_subjects.clone()))
            .await
            .is_err(),
        "the reader role gave its consumer a filter list"
    );
    assert!(
        reader_stream
            .update_consumer(skipping("coffer.events.*.deposited".into(), Vec::new()))
            .await
            .is_err(),
        "the reader role narrowed its consumer's filter"
    );
    assert!(
        reader_stream
            .create_consumer(skipping("coffer.events.*.deposited".into(), Vec::new()))
            .await
            .is_err(),
        "the reader role re-created its consumer with a narrower filter"
    );
    stream
        .update_consumer(skipping(String::new(), config.filter_subjects.clone()))
        .await
        .expect("the setup role may update any consumer");
    let withdrawn = http
        .post(
            &format!("{w}/v1/accounts/{account}/withdrawals"),
            &json!({"amount": 800}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(withdrawn.status, 200, "{:?}", withdrawn.body);
    // Within the check period (2 s) the view stops and says why.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ready = http.get(&format!("{r}/readyz")).await.unwrap();
        if ready.status == 503 {
            let detail = ready.body.to_string();
            assert!(
                detail.contains("consumer coffer-reader-0 was changed"),
                "{detail}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the reader stayed ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http.metric(&r, "coffer_projection_failed").await, Some(1.0));
    assert_eq!(
        http.metric(&r, "coffer_projection_consumer_changes_total")
            .await,
        Some(1.0)
    );
    // Out of rotation, it shows what it had applied before it stopped (the balance before the
    // withdrawal), never a balance built on a filtered feed.
    let read = http
        .get(&format!("{r}/v1/accounts/{account}"))
        .await
        .unwrap();
    assert_eq!(read.body["balance"], 1_000, "{:?}", read.body);
}

/// A stream made before TTLs were removed (builds before `coffer setup --remove-message-ttl`)
/// allows per-message TTLs, so the writer's credential can append an event that later vanishes
/// (`Nats-TTL`). While it is there, nothing is built on it: the writer refuses to decide on its
/// account and a reader marks that account, both naming the header. The forger can still chain
/// more events on it; once it is gone, a reader that never saw it learns from the stream that it
/// is gone (not skipped by its own feed): it marks that account unreadable, naming the position,
/// and goes on serving the rest, instead of stopping or serving a balance with a hole. Then the
/// way out: with the writer stopped, `coffer setup --remove-message-ttl` moves the log onto a
/// stream without TTLs, every position kept, where the credential can append nothing that
/// vanishes, and the writer serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_can_vanish_is_never_built_on_and_once_gone_costs_only_its_account() {
    let nats = server();
    let url = nats.url();
    // The stream as earlier builds made it.
    jetstream::new(connect_as(&url, "setup", "setup-secret").await)
        .create_stream(jetstream::stream::Config {
            allow_message_ttl: true,
            ..eventlog::StreamSettings::default().config()
        })
        .await
        .unwrap();
    let writer = set_up_with_writer(&url);
    support::wait_ready(&writer.url());
    let live_data = tempfile::tempdir().unwrap();
    let live = reader_as_role(&url, live_data.path());
    support::wait_ready(&live.url());
    let http = Http::new();
    let w = writer.url();
    let (victim, other) = (support::unique("erased"), support::unique("intact"));
    for account in [&victim, &other] {
        assert_eq!(http.open_account(&w, account).await.status, 201);
        let deposited = http
            .deposit(&w, account, &json!({"amount": 100}), None)
            .await
            .unwrap();
        assert_eq!(deposited.status, 200);
    }
    // The forgery: a deposit chained and checked like a real append, with a lifetime of a few
    // seconds; then a withdrawal chained on it, without one.
    let writer_client = connect_as(&url, "writer", "writer-secret").await;
    let writer_js = jetstream::new(writer_client.clone());
    let events = writer_js.get_stream("COFFER_EVENTS").await.unwrap();
    let last = events
        .get_last_raw_message_by_subject(&format!("coffer.events.{victim}.deposited"))
        .await
        .unwrap();
    let previous_chain = last
        .headers
        .get("Coffer-Chain")
        .unwrap()
        .as_str()
        .to_owned();
    let append = |event: domain::Event, after: (u64, String), ttl: Option<&'static str>| {
        let (writer_js, victim) = (writer_js.clone(), victim.clone());
        async move {
            let (event_type, version, payload) = eventlog::codec::encode(&event).unwrap();
            let chain = eventlog::chain::link(&after.1, &victim, event_type, version, &payload);
            let mut headers = async_nats::HeaderMap::new();
            for (name, value) in [
                ("Nats-Expected-Last-Subject-Sequence", after.0.to_string()),
                (
                    "Nats-Expected-Last-Subject-Sequence-Subject",
                    format!("coffer.events.{victim}.>"),
                ),
                ("Coffer-Event-Type", event_type.to_owned()),
                ("Coffer-Event-Version", version.to_string()),
                ("Coffer-Account-Id", victim.clone()),
                ("Coffer-Chain", chain.clone()),
                ("Content-Type", "application/msgpack".to_owned()),
            ] {
                headers.insert(name, value.as_str());
            }
            if let Some(ttl) = ttl {
                headers.insert("Nats-TTL", ttl);
            }
            let position = writer_js
                .publish_with_headers(
                    format!("coffer.append.{victim}.{event_type}"),
                    headers,
                    payload.into(),
                )
                .await
                .unwrap()
                .await
                .expect("the writer role may append, with a TTL too (what this test is about)")
                .sequence;
            (position, chain)
        }
    };
    let amount = |minor| domain::Amount::new(minor).unwrap();
    let erased = append(
        domain::Event::Deposited {
            amount: amount(100),
            reference: None,
            metadata: Default::default(),
        },
        (last.sequence, previous_chain),
        Some("6s"),
    )
    .await;

    // While it is there, the writer does not decide on it ...
    let withdrawn = http
        .post(
            &format!("{w}/v1/accounts/{victim}/withdrawals"),
            &json!({"amount": 150}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(withdrawn.status, 500, "{:?}", withdrawn.body);
    assert_eq!(withdrawn.body["code"], "account_unreadable");
    assert!(
        withdrawn.body["detail"]
            .as_str()
            .unwrap()
            .contains("Nats-TTL"),
        "{:?}",
        withdrawn.body
    );
    // ... and a reader that meets it marks its account, naming the header and the position.
    let l = live.url();
    let deadline = Instant::now() + Duration::from_secs(3);
    let marked = loop {
        let read = http
            .get(&format!("{l}/v1/accounts/{victim}"))
            .await
            .unwrap();
        if read.status == 500 {
            break read;
        }
        assert!(
            Instant::now() < deadline,
            "the live reader served {:?}",
            read.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(marked.body["code"], "account_unreadable");
    let detail = marked.body["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("position {}", erased.0)) && detail.contains("Nats-TTL"),
        "{detail}"
    );

    // `coffer verify` names it too, and goes on.
    let verified = std::process::Command::new(testkit::coffer_binary())
        .arg("verify")
        .env("COFFER_NATS_URL", &url)
        .env("COFFER_NATS_USER", "setup")
        .env("COFFER_NATS_PASSWORD", "setup-secret")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verified.stdout);
    assert!(!verified.status.success(), "{report}");
    assert!(
        report.contains(&format!(
            "{victim}: unreadable event at position {}: the event carries Nats-TTL",
            erased.0
        )),
        "{report}"
    );
    assert!(
        events.get_raw_message(erased.0).await.is_ok(),
        "the TTL ran out too soon for this test"
    );

    // The forger builds on it anyway, and then it vanishes.
    append(
        domain::Event::Withdrawn {
            amount: amount(150),
            reference: None,
            metadata: Default::default(),
        },
        erased.clone(),
        None,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while events.get_raw_message(erased.0).await.is_ok() {
        assert!(Instant::now() < deadline, "the TTL never erased the event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let later = http
        .deposit(&w, &other, &json!({"amount": 5}), None)
        .await
        .unwrap();

    // A reader that starts now never sees the erased event.
    let data = tempfile::tempdir().unwrap();
    let reader = reader_replica_as_role(1, &url, data.path());
    support::wait_ready(&reader.url());
    for r in [reader.url(), l] {
        let read = http
            .get(&format!(
                "{r}/v1/accounts/{other}?min_position={}",
                later.body["position"]
            ))
            .await
            .unwrap();
        assert_eq!(read.status, 200, "{:?}", read.body);
        assert_eq!(read.body["balance"], 105);
        assert_eq!(support::status_of(&format!("{r}/readyz")).unwrap(), 200);
        assert_eq!(http.metric(&r, "coffer_projection_failed").await, Some(0.0));
    }
    let r = reader.url();
    let refused = http
        .get(&format!("{r}/v1/accounts/{victim}"))
        .await
        .unwrap();
    assert_eq!(refused.status, 500, "{:?}", refused.body);
    assert_eq!(refused.body["code"], "account_unreadable");
    let detail = refused.body["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("position {}", erased.0))
            && detail.contains("no longer in the stream"),
        "{detail}"
    );
    assert_eq!(
        http.metric(&r, "coffer_projection_history_gaps_total")
            .await,
        Some(1.0)
    );

    // The way out. Setup says it is needed ...
    let setup = |extra: &[&str]| {
        std::process::Command::new(testkit::coffer_binary())
            .arg("setup")
            .args(extra)
            .env("COFFER_NATS_URL", &url)
            .env("COFFER_NATS_USER", "setup")
            .env("COFFER_NATS_PASSWORD", "setup-secret")
            .output()
            .unwrap()
    };
    let warned = setup(&[]);
    assert!(warned.status.success());
    assert!(
        String::from_utf8_lossy(&warned.stderr).contains("coffer setup --remove-message-ttl"),
        "{warned:?}"
    );
    // ... and, with the writer stopped, moves the log.
    drop(writer);
    // The test server syncs every write: nothing to wait for.
    let moved = setup(&["--remove-message-ttl", "--settle-seconds", "0"]);
    assert!(moved.status.success(), "{moved:?}");
    let summary: serde_json::Value = serde_json::from_slice(&moved.stdout).unwrap();
    assert_eq!(summary["streams"][0]["message_ttl"], false, "{summary}");
    assert_eq!(summary["message_ttl_removal"], "NotStarted", "{summary}");
    let stored_later = events
        .get_raw_message(later.body["position"].as_u64().unwrap())
        .await
        .unwrap();
    assert_eq!(
        stored_later.subject.as_str(),
        format!("coffer.events.{other}.deposited")
    );
    assert_ttl_refused(&writer_js, &format!("coffer.append.{victim}.deposited")).await;
    let writer = set_up_with_writer(&url);
    let w = writer.url();
    let deposited = http
        .deposit(&w, &other, &json!({"amount": 5}), None)
        .await
        .unwrap();
    assert_eq!(deposited.status, 200, "{:?}", deposited.body);
    assert_eq!(deposited.body["balance"], 110);
    assert!(deposited.body["position"].as_u64() > later.body["position"].as_u64());
}

/// Publishing on `subject` with `Nats-TTL` is refused, for that header (nothing stored).
async fn assert_ttl_refused(js: &jetstream::Context, subject: &str) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-TTL", "1h");
    let answer = async {
        js.publish_with_headers(subject.to_owned(), headers, "x".into())
            .await?
            .await
    }
    .await;
    let error = answer.expect_err("stored a message that could vanish");
    assert!(
        error.to_string().to_lowercase().contains("ttl"),
        "{subject}: {error}"
    );
}

/// On the stream `coffer setup` makes, the writer's credential cannot append anything that
/// could vanish: the server refuses `Nats-TTL` on events and markers alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_stream_setup_makes_nothing_that_could_vanish_is_stored() {
    let nats = server();
    let url = nats.url();
    let _writer = set_up_with_writer(&url);
    let writer_js = jetstream::new(connect_as(&url, "writer", "writer-secret").await);
    for subject in [
        "coffer.append.acc-ttl.deposited",
        "coffer.ids.key.acc-ttl.0123456789abcdef",
        "coffer.ids.transfer.t-ttl",
    ] {
        assert_ttl_refused(&writer_js, subject).await;
    }
}

/// Generates a signing key with `coffer keys generate` into `directory`; returns the key file
/// and its trusted-keys line.
fn generate_key(directory: &std::path::Path, key_id: &str) -> (std::path::PathBuf, String) {
    let path = directory.join(format!("{key_id}.key"));
    let output = std::process::Command::new(testkit::coffer_binary())
        .args(["keys", "generate", "--key-id", key_id, "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    (
        path,
        String::from_utf8(output.stdout).unwrap().trim().to_owned(),
    )
}

/// `coffer setup` (setup role), a signing key `writers-1` with its trusted-keys file under `keys`,
/// and the writer role's environment signing with it; also the trusted file's path.
fn set_up_signed(url: &str, keys: &std::path::Path) -> (Vec<(&'static str, String)>, String) {
    let (signing_key, public_line) = generate_key(keys, "writers-1");
    let trusted_file = keys.join("trusted.keys");
    std::fs::write(&trusted_file, format!("{public_line}\n")).unwrap();
    let trusted = trusted_file.to_string_lossy().into_owned();
    let output = std::process::Command::new(testkit::coffer_binary())
        .arg("setup")
        .env("COFFER_NATS_URL", url)
        .env("COFFER_NATS_USER", "setup")
        .env("COFFER_NATS_PASSWORD", "setup-secret")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let mut environment = role_environment("writer", "writer-secret");
    environment.extend([
        ("COFFER_NATS_URL", url.to_owned()),
        (
            "COFFER_SIGNING_KEY_FILE",
            signing_key.to_string_lossy().into_owned(),
        ),
        ("COFFER_TRUSTED_KEYS_FILE", trusted.clone()),
    ]);
    (environment, trusted)
}

/// A `deposited` of `amount` appended to `account` with only the writer's NATS credential: the
/// last event's chain value read back (a permitted MSG.GET), the next one computed, the append
/// checked against the last position like a writer's. `signature`, if any, is its header.
async fn forge_deposit(
    writer_js: &jetstream::Context,
    account: &str,
    amount: i128,
    signature: Option<&eventlog::SigningKey>,
) -> u64 {
    let events = writer_js.get_stream_no_info("COFFER_EVENTS").await.unwrap();
    let mut last = (0, eventlog::chain::GENESIS.to_owned());
    for event_type in ["account_opened", "deposited"] {
        if let Ok(message) = events
            .get_last_raw_message_by_subject(&format!("coffer.events.{account}.{event_type}"))
            .await
        {
            if message.sequence > last.0 {
                let chain = message.headers.get("Coffer-Chain").unwrap().as_str();
                last = (message.sequence, chain.to_owned());
            }
        }
    }
    let payload = eventlog::codec::encode(&domain::Event::Deposited {
        metadata: Default::default(),
        amount: domain::Amount::new(amount).unwrap(),
        reference: None,
    })
    .unwrap()
    .2;
    let chain = eventlog::chain::link(&last.1, account, "deposited", 1, &payload);
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in [
        ("Nats-Expected-Last-Subject-Sequence", last.0.to_string()),
        (
            "Nats-Expected-Last-Subject-Sequence-Subject",
            format!("coffer.events.{account}.>"),
        ),
        ("Coffer-Event-Type", "deposited".to_owned()),
        ("Coffer-Event-Version", "1".to_owned()),
        ("Coffer-Account-Id", account.to_owned()),
        ("Coffer-Chain", chain.clone()),
    ] {
        headers.insert(name, value.as_str());
    }
    if let Some(key) = signature {
        headers.insert("Coffer-Signature", key.sign_event(&chain).as_str());
    }
    writer_js
        .publish_with_headers(
            format!("coffer.append.{account}.deposited"),
            headers,
            payload.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// Issue 26, item 1: the writer's NATS password lets anyone append an event with the right chain
/// value, and before signatures such a deposit could be spent over HTTP while `coffer verify`
/// found nothing. With a signing key the NATS credential does not have, a forged deposit (unsigned,
/// or signed by a key that is not trusted) costs its account in the reader, the writer refuses to
/// decide on it, `coffer verify` names it; a forged snapshot is ignored; the rest goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_writer_password_cannot_mint_money_no_trusted_key_signed() {
    let keys = tempfile::tempdir().unwrap();
    let nats = server();
    let url = nats.url();
    let (mut environment, trusted) = set_up_signed(&url, keys.path());
    // Snapshots after two events, so one can be forged below.
    environment.push(("COFFER_SNAPSHOT_EVERY", "2".to_owned()));
    let mut writer = testkit::CofferProcess::start("w", "writer", &environment);
    support::wait_ready(&writer.url());
    let data = tempfile::tempdir().unwrap();
    let mut reader_environment = role_environment("coffer-reader-0", "reader-0-secret");
    reader_environment.push(("COFFER_TRUSTED_KEYS_FILE", trusted.clone()));
    let reader = support::reader("coffer-reader-0", &url, data.path(), &reader_environment);
    support::wait_ready(&reader.url());
    let http = Http::new();
    let (w, r) = (writer.url(), reader.url());
    let (unsigned, badly_signed, other) = (
        support::unique("unsigned"),
        support::unique("badly-signed"),
        support::unique("other"),
    );
    for account in [&unsigned, &badly_signed, &other] {
        assert_eq!(http.open_account(&w, account).await.status, 201);
        let deposited = http
            .deposit(&w, account, &json!({"amount": 100}), None)
            .await
            .unwrap();
        assert_eq!(deposited.status, 200, "{:?}", deposited.body);
    }

    let writer_js = jetstream::new(connect_as(&url, "writer", "writer-secret").await);
    let forged_unsigned = forge_deposit(&writer_js, &unsigned, 1_000_000, None).await;
    // Signed, but by the thief's own key under the trusted key's id.
    let thief = eventlog::SigningKey::from_seed("writers-1", [7; 32]).unwrap();
    let forged_signed = forge_deposit(&writer_js, &badly_signed, 1_000_000, Some(&thief)).await;
    let later = http
        .deposit(&w, &other, &json!({"amount": 5}), None)
        .await
        .unwrap();
    assert_eq!(later.status, 200, "{:?}", later.body);

    // The reader: the other account is served as before, the two are not, and it stays ready.
    let read = http
        .get(&format!(
            "{r}/v1/accounts/{other}?min_position={}",
            later.body["position"]
        ))
        .await
        .unwrap();
    assert_eq!(read.body["balance"], 105, "{:?}", read.body);
    for (account, position, why) in [
        (&unsigned, forged_unsigned, "carries no Coffer-Signature"),
        (&badly_signed, forged_signed, "does not match its content"),
    ] {
        let refused = http
            .get(&format!("{r}/v1/accounts/{account}"))
            .await
            .unwrap();
        assert_eq!(refused.status, 500, "{account}: {:?}", refused.body);
        assert_eq!(refused.body["code"], "account_unreadable");
        let detail = refused.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("position {position}")) && detail.contains(why),
            "{detail}"
        );
        // The writer will not spend it: it refuses to decide on an untrusted history.
        let spent = http
            .post(
                &format!("{w}/v1/transfers"),
                &json!({"from": account, "to": other, "amount": 500_000}),
                None,
            )
            .await
            .unwrap();
        assert_eq!(spent.status, 500, "{account}: {:?}", spent.body);
        assert_eq!(spent.body["code"], "account_unreadable");
    }
    assert_eq!(
        http.metric(&r, "coffer_reader_signature_failures_total")
            .await,
        Some(2.0)
    );
    assert_eq!(support::status_of(&format!("{r}/readyz")).unwrap(), 200);

    // `coffer verify` with the trusted keys names both; the chains alone are intact.
    let verified = std::process::Command::new(testkit::coffer_binary())
        .arg("verify")
        .env("COFFER_NATS_URL", &url)
        .env("COFFER_NATS_USER", "setup")
        .env("COFFER_NATS_PASSWORD", "setup-secret")
        .env("COFFER_TRUSTED_KEYS_FILE", &trusted)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verified.stdout);
    assert!(!verified.status.success(), "{report}");
    for (account, position) in [(&unsigned, forged_unsigned), (&badly_signed, forged_signed)] {
        assert!(
            report.contains(&format!(
                "{account}: untrusted event at position {position}"
            )),
            "{report}"
        );
    }
    assert!(
        report.contains("0 account(s) with a broken chain, 0 unreadable event(s), 2 event(s) without a trusted signature"),
        "{report}"
    );

    // A forged snapshot: the other account's real one, a million richer, unsigned. A writer that
    // starts from it would pay out money that never came in; this one replays the history.
    let snapshots = writer_js
        .get_stream_no_info("COFFER_SNAPSHOTS")
        .await
        .unwrap();
    let other_id = domain::AccountId::parse(&other).unwrap();
    let subject = eventlog::subject::snapshot(&other_id);
    let deadline = Instant::now() + Duration::from_secs(10);
    let real = loop {
        if let Ok(message) = snapshots.get_last_raw_message_by_subject(&subject).await {
            break message;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot of {other} was written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        real.headers.get("Coffer-Signature").is_some(),
        "the writer signs its snapshots"
    );
    let mut snapshot = eventlog::AccountSnapshot::decode(&real.payload)
        .unwrap()
        .unwrap();
    domain::account::evolve(
        &mut snapshot.state,
        &domain::Event::Deposited {
            metadata: Default::default(),
            amount: domain::Amount::new(1_000_000).unwrap(),
            reference: None,
        },
    );
    writer_js
        .publish(subject.clone(), snapshot.encode().unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    writer.restart();
    support::wait_ready(&w);
    let overdrawn = http
        .post(
            &format!("{w}/v1/accounts/{other}/withdrawals"),
            &json!({"amount": 500_000}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(overdrawn.status, 422, "{:?}", overdrawn.body);
    let withdrawn = http
        .post(
            &format!("{w}/v1/accounts/{other}/withdrawals"),
            &json!({"amount": 105}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(withdrawn.status, 200, "{:?}", withdrawn.body);
    assert_eq!(withdrawn.body["balance"], 0, "{:?}", withdrawn.body);
    assert!(
        writer
            .log()
            .contains("a snapshot without a trusted signature"),
        "{}",
        writer.log()
    );
}

/// Issue 26, item 1, beyond events: what a writer decides on that is not an event of the account
/// must not be forgeable with the writer NATS password either. A hand-over (a command one writer
/// gives the owner of its account) recorded from `coffer.owner.*` and sent again, or sent without
/// its signature, is not run; a transfer's record (the marker a reversal reads its postings from)
/// overwritten with another transfer's is refused instead of reversing money the victim never got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_writer_password_cannot_hand_over_commands_or_rewrite_transfer_records() {
    let keys = tempfile::tempdir().unwrap();
    let nats = server();
    let url = nats.url();
    let (environment, _) = set_up_signed(&url, keys.path());
    let first = testkit::CofferProcess::start("w1", "writer", &environment);
    let second = testkit::CofferProcess::start("w2", "writer", &environment);
    let http = Http::new();
    let (w1, w2) = (first.url(), second.url());
    for writer in [&w1, &w2] {
        support::wait_ready(writer);
    }
    // Both own partitions, so commands sent to one are handed to the other for half the accounts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .metric(&w1, "coffer_writer_partitions_owned")
        .await
        .unwrap_or_default()
        < 1.0
        || http
            .metric(&w2, "coffer_writer_partitions_owned")
            .await
            .unwrap_or_default()
            < 1.0
    {
        assert!(Instant::now() < deadline, "the partitions were not shared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let thief = connect_as(&url, "writer", "writer-secret").await;
    let mut handovers = thief.subscribe("coffer.owner.*").await.unwrap();
    thief.flush().await.unwrap();
    let accounts: Vec<String> = (0..16).map(|_| support::unique("handed")).collect();
    for account in &accounts {
        assert_eq!(http.open_account(&w1, account).await.status, 201);
        let deposited = http
            .deposit(&w1, account, &json!({"amount": 10}), None)
            .await
            .unwrap();
        assert_eq!(deposited.status, 200, "{:?}", deposited.body);
    }
    // A recorded hand-over of one of those deposits.
    let recorded = loop {
        let message = tokio::time::timeout(Duration::from_secs(5), handovers.next())
            .await
            .expect("no hand-over seen")
            .unwrap();
        if String::from_utf8_lossy(&message.payload).contains("Deposit") {
            break message;
        }
    };
    let account = accounts
        .iter()
        .find(|account| String::from_utf8_lossy(&recorded.payload).contains(account.as_str()))
        .unwrap()
        .clone();
    let replayed = thief
        .request_with_headers(
            recorded.subject.clone(),
            recorded.headers.clone().unwrap(),
            recorded.payload.clone(),
        )
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&replayed.payload);
    assert!(answer.contains("taken before"), "{answer}");
    let unsigned = thief
        .request(recorded.subject.clone(), recorded.payload.clone())
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&unsigned.payload);
    assert!(answer.contains("untrusted hand-over"), "{answer}");
    // Neither ran: the account holds its one deposit.
    let next = http
        .deposit(&w2, &account, &json!({"amount": 1}), None)
        .await
        .unwrap();
    assert_eq!(next.body["balance"], 11, "{:?}", next.body);

    // A reversal reads the transfer's postings from its record. The thief copies the record of
    // its own payment to the victim onto a small transfer the victim made it, hoping that
    // reversing the small one pays the big one back.
    let (attacker, victim) = (support::unique("attacker"), support::unique("victim"));
    for (account, amount) in [(&attacker, 100), (&victim, 1_000)] {
        assert_eq!(http.open_account(&w1, account).await.status, 201);
        http.deposit(&w1, account, &json!({"amount": amount}), None)
            .await
            .unwrap();
    }
    let (small, big) = (support::unique("t-small"), support::unique("t-big"));
    for (id, from, to, amount) in [
        (&small, &victim, &attacker, 5),
        (&big, &attacker, &victim, 50),
    ] {
        let moved = http
            .post(
                &format!("{w1}/v1/transfers"),
                &json!({"transfer_id": id, "from": from, "to": to, "amount": amount}),
                None,
            )
            .await
            .unwrap();
        assert_eq!(moved.status, 201, "{:?}", moved.body);
    }
    let events = jetstream::new(thief.clone())
        .get_stream_no_info("COFFER_EVENTS")
        .await
        .unwrap();
    let marker =
        |id: &str| eventlog::subject::transfer_marker(&domain::TransferId::parse(id).unwrap());
    let big_record = events
        .get_last_raw_message_by_subject(&marker(&big))
        .await
        .unwrap();
    jetstream::new(thief.clone())
        .publish(marker(&small), big_record.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let reversed = http
        .post(
            &format!("{w1}/v1/transfers/{small}/reverse"),
            &json!({}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(reversed.status, 500, "{:?}", reversed.body);
    assert_eq!(
        reversed.body["code"], "account_unreadable",
        "{:?}",
        reversed.body
    );
    assert!(
        reversed.body["detail"]
            .as_str()
            .unwrap()
            .contains("cannot be trusted"),
        "{:?}",
        reversed.body
    );
    // Nothing moved: 1 000 - 5 + 50, and the deposit.
    let after = http
        .deposit(&w1, &victim, &json!({"amount": 1}), None)
        .await
        .unwrap();
    assert_eq!(after.body["balance"], 1_046, "{:?}", after.body);
}

/// A writer credential may write hold schedules, and a roll-up (`Nats-Rollup: all`, which the
/// server allows on a stream of message schedules) on one of them empties the schedules stream:
/// no permission can refuse a header. The hold still expires, by the backstop, which reads the
/// placed holds from the event stream instead; and the money comes back to the payer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_whose_schedule_a_stolen_writer_password_rolled_up_still_expires() {
    let nats = server();
    let url = nats.url();
    let writer = set_up_with_writer_and(&url, &[("COFFER_HOLD_BACKSTOP_DELAY_MS", "1000".into())]);
    let w = writer.url();
    let http = Http::new();
    let (payer, payee) = (support::unique("payer"), support::unique("payee"));
    http.open_account(&w, &payer).await;
    http.open_account(&w, &payee).await;
    http.deposit(&w, &payer, &json!({"amount": 100}), None)
        .await
        .unwrap();
    let hold_id = support::unique("frozen");
    let placed = http
        .post(
            &format!("{w}/v1/holds"),
            &json!({"from": payer, "to": payee, "amount": 60, "hold_id": hold_id,
                "expires_in_seconds": 2}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(placed.status, 201, "{:?}", placed.body);

    let thief = connect_as(&url, "writer", "writer-secret").await;
    let schedules = jetstream::new(thief.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "all");
    let rolled = schedules
        .publish_with_headers("coffer.schedules.x", headers, "".into())
        .await
        .unwrap()
        .await;
    assert!(rolled.is_ok(), "the roll-up was refused: {rolled:?}");
    let setup = jetstream::new(connect_as(&url, "setup", "setup-secret").await);
    let state = setup
        .get_stream("COFFER_SCHEDULES")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone();
    assert_eq!(state.messages, 1, "the roll-up left the hold's schedule");

    // Due at 2 s, and the backstop looks 1 s later; allow for a slow machine.
    let events = setup.get_stream("COFFER_EVENTS").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let expired = loop {
        if let Ok(message) = events
            .get_last_raw_message_by_subject(&format!("coffer.events.{payer}.hold_expired"))
            .await
        {
            break message;
        }
        assert!(Instant::now() < deadline, "the hold stayed frozen");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let expired = eventlog::log::decode_stored(
        &expired.subject,
        expired.sequence,
        expired.time,
        &expired.headers,
        expired.payload,
    )
    .unwrap();
    assert_eq!(
        expired.event,
        domain::Event::HoldExpired {
            hold_id: domain::TransferId::parse(&hold_id).unwrap()
        }
    );
}
