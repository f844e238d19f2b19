//! Hold expiry without a client. Placing a hold first schedules a message with the schedules
//! stream (`Nats-Schedule: @at {expires_at}`), which the server stores on
//! `coffer.due.hold-expiry.{from}.{hold_id}` when it is due. Every writer pulls those from one
//! shared durable consumer and hands each to the hold's account, which appends `hold_expired`
//! if the hold is still open (a capture or void that came first wins; the account's
//! concurrency check and the settlement marker make the hold settle once).
//!
//! The schedule lives in the stream, so expiry survives any writer restart: a due message waits
//! in the consumer until some writer is up, then is handled at once. A message is acknowledged
//! only once its hold is settled; a failure is retried after [`RETRY_DELAY`], and a schedule that
//! fired before this writer's clock reached `expires_at` is retried when it has.
//!
//! A schedule can fail a hold: its due message is dropped when the hold is still not in the
//! stream a minute after it fired (a commit buffered across a reconnect), due messages age out
//! of the schedules stream after 8 days, and the schedules stream can be emptied by someone
//! with a writer's credential. Capture and void are refused from `expires_at` on, so such a hold
//! would keep its money held for good. So a **backstop** reads the source of truth instead: a
//! second shared durable consumer, [`BACKSTOP_CONSUMER_NAME`], on the event stream's
//! `hold_placed` events. Each placed hold is held back (negatively acknowledged with a delay)
//! until [`Backstop::delay`] after its `expires_at`, then expired through its account like a due
//! message: a hold the schedule already settled is answered "settled" and acknowledged, so in
//! the normal case the backstop costs one look at the account per hold.

use std::time::Duration;

use async_nats::jetstream::{consumer, AckKind};
use domain::{DomainError, Release};
use eventlog::{subject, EventLog};
use futures::StreamExt;
use tokio::sync::watch;

use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::request::{CommandRequest, Intent};
use crate::Error;

/// The durable consumer all writers share.
pub const CONSUMER_NAME: &str = "coffer-hold-expiry";
/// The backstop's durable consumer on the event stream, shared by all writers.
pub const BACKSTOP_CONSUMER_NAME: &str = "coffer-hold-backstop";
/// Placed holds the backstop keeps waiting at once. Each open hold is one pending message until
/// it is due; beyond this many, newer holds wait for older ones to be acknowledged.
const BACKSTOP_PENDING_MAX: i64 = 1_000_000;
/// Default of [`Backstop::delay`]: long after the schedule's own expiry (at most ~1 s late,
/// retried for a minute when the hold was late).
pub const BACKSTOP_DELAY_DEFAULT: Duration = Duration::from_secs(90);
/// Placed holds one writer looks at at once: few, so that a first start on a stream with many
/// old holds (each one look at its account) does not crowd out clients' commands.
const BACKSTOP_CONCURRENCY_MAX: usize = 8;
/// The backstop's ack wait: its messages are handled while a command runs (progress is reported),
/// and a long wait keeps the server's scans of the many pending ones rare.
const BACKSTOP_ACK_WAIT: Duration = Duration::from_secs(30);
/// The longest pause between retries of a hold whose expiry keeps failing.
const BACKSTOP_RETRY_MAX: Duration = Duration::from_secs(60);
/// The longest a placed hold is held back in one go (the server redelivers it then, and it is
/// held back again): bounds what a clock jump can do.
const BACKSTOP_WAIT_MAX: Duration = Duration::from_secs(6 * 3_600);
/// Due expiries one writer handles at once.
const CONCURRENCY_MAX: usize = 256;
/// Redelivery delay after a transient failure (NATS down, account busy).
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long a stopping writer waits for its expiry consumer to give back the messages in its
/// hands and finish the expiries it started.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause before re-creating the consumer after an error.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// How long the server waits for an ack before redelivering to another writer. Short, so a
/// writer that dies holding due expiries delays them by no more than this; a handler that
/// takes longer tells the server it is still working ([`PROGRESS_PERIOD`]).
const ACK_WAIT: Duration = Duration::from_secs(2);
/// How often a handler in progress says so.
const PROGRESS_PERIOD: Duration = Duration::from_millis(700);
/// The longest a due message is held in hand before its hold's `expires_at`: the schedule's
/// lead and some more for a burst the server fires late. One due further ahead (clocks apart)
/// is given back to the server until it is about the lead away.
const IN_HAND_MAX: Duration = Duration::from_secs(5);
/// Due expiries asked for at once: a few, so none waits long in this writer's hands.
const PULL_BATCH_SIZE_MAX: usize = 16;
/// How long after it fired a due expiry whose hold is not (yet) in the stream is retried: the
/// schedule is written before the hold's batch, which may still be on its way (the longest a
/// command may take is its deadline plus the answer grace, well below this).
const UNPLACED_RETRY_WINDOW: Duration = Duration::from_secs(60);

pub fn consumer_config() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER_NAME.into()),
        description: Some("Coffer hold expiries, shared by the writers".into()),
        filter_subject: subject::DUE_HOLD_EXPIRIES.into(),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// The backstop consumer: every `hold_placed` event of the event stream.
pub fn backstop_consumer_config() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(BACKSTOP_CONSUMER_NAME.into()),
        description: Some(
            "Coffer hold expiry backstop: placed holds, expired if their schedule did not".into(),
        ),
        filter_subject: subject::type_filter("hold_placed"),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: BACKSTOP_ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: BACKSTOP_PENDING_MAX,
        ..Default::default()
    }
}

/// How the backstop runs.
#[derive(Debug, Clone, Copy)]
pub struct Backstop {
    /// How long after a hold's `expires_at` the backstop expires it if it is still open
    /// (`COFFER_HOLD_BACKSTOP_DELAY_MS`, default 90 s).
    pub delay: Duration,
}

impl Default for Backstop {
    fn default() -> Self {
        Self {
            delay: BACKSTOP_DELAY_DEFAULT,
        }
    }
}

/// Runs the schedule's expiries and the backstop until `shutdown` turns true.
pub async fn run(
    log: EventLog,
    commands: Dispatcher,
    metrics: std::sync::Arc<Metrics>,
    backstop: Backstop,
    shutdown: watch::Receiver<bool>,
) {
    let placed = {
        let (log, commands, shutdown) = (log.clone(), commands.clone(), shutdown.clone());
        tokio::spawn(async move {
            resuming("hold expiry backstop", shutdown, || {
                consume_placed(&log, &commands, &metrics, backstop)
            })
            .await
        })
    };
    let stopping = shutdown.clone();
    resuming("hold expiry consumer", shutdown, || {
        consume(&log, &commands, &stopping)
    })
    .await;
    let _ = placed.await;
}

/// Runs `consumer` again after a pause whenever it ends, until `shutdown` turns true.
async fn resuming<F, Fut>(name: &str, mut shutdown: watch::Receiver<bool>, consumer: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    loop {
        let running = consumer();
        tokio::pin!(running);
        let stopping = tokio::select! {
            result = &mut running => {
                if let Err(error) = result {
                    tracing::warn!(%error, consumer = name, "interrupted; resuming");
                }
                false
            }
            _ = shutdown.wait_for(|stop| *stop) => true,
        };
        if stopping {
            // A consumer that watches the shutdown too gives back what it holds and ends.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, running).await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_DELAY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn consume(
    log: &EventLog,
    commands: &Dispatcher,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), Error> {
    let nats = |error: &dyn std::fmt::Display| Error::Unavailable(error.to_string());
    let stream = log
        .context()
        .get_stream(log.schedules_name())
        .await
        .map_err(|error| nats(&error))?;
    let consumer = stream
        .get_or_create_consumer(CONSUMER_NAME, consumer_config())
        .await
        .map_err(|error| nats(&error))?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH_SIZE_MAX)
        .messages()
        .await
        .map_err(|error| nats(&error))?;
    // Messages waiting in hand for their hold's `expires_at` take no turn: only handling does
    // (the consumer's max ack pending bounds how many are in hand).
    let turns = tokio::sync::Semaphore::new(CONCURRENCY_MAX);
    let stopping = {
        let mut shutdown = shutdown.clone();
        async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        }
    };
    // At shutdown no more are taken, and the ones in hand are given back at once.
    messages
        .take_until(stopping)
        .for_each_concurrent(None, |message| {
            let (turns, shutdown) = (&turns, shutdown.clone());
            async move {
                match message {
                    Ok(message) => handle(log, commands, turns, shutdown, message).await,
                    Err(error) => tracing::warn!(%error, "hold expiry delivery failed"),
                }
            }
        })
        .await;
    if *shutdown.borrow() {
        return Ok(());
    }
    Err(Error::Unavailable(
        "hold expiry message stream ended".into(),
    ))
}

async fn handle(
    log: &EventLog,
    commands: &Dispatcher,
    turns: &tokio::sync::Semaphore,
    shutdown: watch::Receiver<bool>,
    message: async_nats::jetstream::Message,
) {
    let Some((from, hold_id)) =
        subject::parse_hold_expiry_due(&message.subject).and_then(|(from, hold_id)| {
            Some((
                domain::AccountId::parse(from).ok()?,
                domain::TransferId::parse(hold_id).ok()?,
            ))
        })
    else {
        tracing::error!(subject = %message.subject, "unreadable hold expiry; dropping it");
        let _ = message.ack_with(AckKind::Term).await;
        return;
    };
    // Fired ahead of the hold's expiry (schedules written before this header existed fire at
    // it and carry none): held until then.
    let expires_at = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(eventlog::log::header::HOLD_EXPIRES_AT))
        .and_then(|value| value.as_str().parse::<u64>().ok());
    if let Some(expires_at) = expires_at {
        let acknowledgement = match hold_until(&message, expires_at, shutdown).await {
            InHand::Due => None,
            InHand::Later(delay) => Some(AckKind::Nak(Some(delay))),
            // Another writer takes it at once rather than after the ack wait.
            InHand::ShuttingDown => Some(AckKind::Nak(None)),
        };
        if let Some(acknowledgement) = acknowledgement {
            if let Err(error) = message.ack_with(acknowledgement).await {
                tracing::debug!(%error, "hold expiry nak failed; it will be redelivered");
            }
            return;
        }
    }
    let answer = match turns.acquire().await {
        Ok(_turn) => expire(commands, &message, &from, &hold_id).await,
        Err(_) => Err(Error::Unavailable("hold expiry consumer closed".into())),
    };
    let acknowledgement = match answer {
        Ok(_) => {
            tracing::info!(account = %from, hold = %hold_id, "hold expired");
            AckKind::Ack
        }
        // Settled before it was due, or already expired by another writer: nothing to do.
        Err(Error::Rejected(DomainError::HoldSettled(_))) => AckKind::Ack,
        // Not on the account: settled (its id is claimed), refused (never claimed), or still on
        // its way (the schedule goes first): the last is retried for a while.
        Err(Error::Rejected(DomainError::HoldNotFound(_))) => {
            let claimed = log
                .read_marker(&subject::transfer_marker(&hold_id))
                .await
                .map(|claim| claim.is_some());
            let fired_recently = message.info().is_ok_and(|info| {
                time::OffsetDateTime::now_utc() - info.published < UNPLACED_RETRY_WINDOW
            });
            match claimed {
                Ok(false) if fired_recently => AckKind::Nak(Some(RETRY_DELAY)),
                Ok(_) => AckKind::Ack,
                Err(_) => AckKind::Nak(Some(RETRY_DELAY)),
            }
        }
        Err(Error::Rejected(DomainError::HoldNotDue { seconds, .. })) => {
            AckKind::Nak(Some(Duration::from_secs(seconds.clamp(1, 60) as u64)))
        }
        Err(error) => {
            tracing::warn!(account = %from, hold = %hold_id, %error, "hold expiry failed; retrying");
            AckKind::Nak(Some(RETRY_DELAY))
        }
    };
    if let Err(error) = message.ack_with(acknowledgement).await {
        tracing::debug!(%error, "hold expiry ack failed; it will be redelivered");
    }
}

/// What became of a due message held until its hold's `expires_at`.
enum InHand {
    /// `expires_at` has come.
    Due,
    /// Too far ahead to hold (a clock apart from the server's): given back for this long.
    Later(Duration),
    /// This writer is stopping.
    ShuttingDown,
}

/// Holds `message` until `expires_at` (Unix seconds) by this writer's clock, telling the server
/// it is still being handled.
async fn hold_until(
    message: &async_nats::jetstream::Message,
    expires_at: u64,
    mut shutdown: watch::Receiver<bool>,
) -> InHand {
    let due = std::time::UNIX_EPOCH + Duration::from_secs(expires_at);
    let Ok(wait) = due.duration_since(std::time::SystemTime::now()) else {
        return InHand::Due;
    };
    if wait > IN_HAND_MAX {
        let ahead = wait.saturating_sub(crate::plan::EXPIRY_LEAD);
        return InHand::Later(ahead.clamp(RETRY_DELAY, Duration::from_secs(60)));
    }
    let due = tokio::time::sleep(wait);
    let stopping = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    tokio::pin!(due, stopping);
    let mut progress = tokio::time::interval(PROGRESS_PERIOD);
    progress.tick().await;
    loop {
        tokio::select! {
            _ = &mut due => return InHand::Due,
            _ = progress.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
            _ = &mut stopping => return InHand::ShuttingDown,
        }
    }
}

/// Expires `hold_id` through its account `from`, telling the server that `message` is still
/// being handled while it runs.
async fn expire(
    commands: &Dispatcher,
    message: &async_nats::jetstream::Message,
    from: &domain::AccountId,
    hold_id: &domain::TransferId,
) -> Result<Outcome, Error> {
    let request = CommandRequest::new(
        from.clone(),
        Intent::Release(hold_id.clone(), Release::Expire),
        None,
        format!("hold-expiry-{hold_id}"),
    );
    let handled = commands.execute(request);
    tokio::pin!(handled);
    let mut progress = tokio::time::interval(PROGRESS_PERIOD);
    progress.tick().await;
    loop {
        tokio::select! {
            answer = &mut handled => return answer,
            _ = progress.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

async fn consume_placed(
    log: &EventLog,
    commands: &Dispatcher,
    metrics: &Metrics,
    backstop: Backstop,
) -> Result<(), Error> {
    let nats = |error: &dyn std::fmt::Display| Error::Unavailable(error.to_string());
    let stream = log
        .context()
        .get_stream(log.stream_name())
        .await
        .map_err(|error| nats(&error))?;
    let consumer = stream
        .get_or_create_consumer(BACKSTOP_CONSUMER_NAME, backstop_consumer_config())
        .await
        .map_err(|error| nats(&error))?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(BACKSTOP_CONCURRENCY_MAX)
        .messages()
        .await
        .map_err(|error| nats(&error))?;
    metrics.hold_backstop_running.set(1);
    messages
        .for_each_concurrent(BACKSTOP_CONCURRENCY_MAX, |message| async move {
            match message {
                Ok(message) => handle_placed(commands, metrics, backstop, message).await,
                Err(error) => tracing::warn!(%error, "hold backstop delivery failed"),
            }
        })
        .await;
    metrics.hold_backstop_running.set(0);
    Err(Error::Unavailable(
        "hold backstop message stream ended".into(),
    ))
}

/// One placed hold: held back until it is due for the backstop, then expired if still open.
async fn handle_placed(
    commands: &Dispatcher,
    metrics: &Metrics,
    backstop: Backstop,
    message: async_nats::jetstream::Message,
) {
    let placed = message
        .info()
        .map_err(|error| error.to_string())
        .and_then(|info| {
            eventlog::log::decode_stored(
                &message.subject,
                info.stream_sequence,
                info.published,
                &message.headers.clone().unwrap_or_default(),
                message.payload.clone(),
            )
            .map_err(|error| error.to_string())
        });
    let (from, hold_id, expires_at) = match placed {
        Ok(recorded) => match recorded.event {
            domain::Event::HoldPlaced {
                hold_id,
                expires_at,
                ..
            } => (recorded.account_id, hold_id, expires_at),
            other => {
                tracing::error!(subject = %message.subject, event = other.event_type(), "the hold backstop got an event that is not a placed hold; skipping it");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        },
        Err(error) => {
            // Its account's commands are refused while it cannot be read; the hold cannot be
            // expired either. Come back to it later rather than lose it.
            tracing::error!(subject = %message.subject, %error, "the hold backstop cannot read a placed hold; retrying later");
            let _ = message
                .ack_with(AckKind::Nak(Some(BACKSTOP_WAIT_MAX)))
                .await;
            return;
        }
    };
    let due = std::time::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(expires_at).unwrap_or(0))
        + backstop.delay;
    if let Ok(wait) = due.duration_since(std::time::SystemTime::now()) {
        if !wait.is_zero() {
            let wait = wait.clamp(Duration::from_secs(1), BACKSTOP_WAIT_MAX);
            let _ = message.ack_with(AckKind::Nak(Some(wait))).await;
            return;
        }
    }
    let acknowledgement = match expire(commands, &message, &from, &hold_id).await {
        Ok(_) => {
            metrics.holds_expired_by_backstop.inc();
            tracing::warn!(account = %from, hold = %hold_id, expires_at, "the backstop expired a hold whose scheduled expiry never came");
            AckKind::Ack
        }
        Err(Error::Rejected(DomainError::HoldSettled(_))) => AckKind::Ack,
        // The event is in the stream, so its account holds it: not being found means the hold
        // is settled under a reading this writer does not share; nothing to do here.
        Err(Error::Rejected(DomainError::HoldNotFound(_))) => {
            tracing::warn!(account = %from, hold = %hold_id, "the hold backstop found no such hold on its account");
            AckKind::Ack
        }
        Err(Error::Rejected(DomainError::HoldNotDue { seconds, .. })) => {
            AckKind::Nak(Some(Duration::from_secs(seconds.clamp(1, 60) as u64)))
        }
        Err(error) => {
            // Backs off: an account that cannot take the command now may not for a while.
            let deliveries = message.info().map_or(1, |info| info.delivered.max(1));
            let backoff = RETRY_DELAY
                .saturating_mul(1 << deliveries.clamp(1, 7).saturating_sub(1))
                .min(BACKSTOP_RETRY_MAX);
            tracing::warn!(account = %from, hold = %hold_id, %error, ?backoff, "hold backstop expiry failed; retrying");
            AckKind::Nak(Some(backoff))
        }
    };
    if let Err(error) = message.ack_with(acknowledgement).await {
        tracing::debug!(%error, "hold backstop ack failed; it will be redelivered");
    }
}
