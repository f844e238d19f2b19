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

use std::time::Duration;

use async_nats::jetstream::{consumer, AckKind};
use domain::{DomainError, Release};
use eventlog::{subject, EventLog};
use futures::StreamExt;
use tokio::sync::watch;

use crate::dispatch::Dispatcher;
use crate::request::{CommandRequest, Intent};
use crate::Error;

/// The durable consumer all writers share.
pub const CONSUMER_NAME: &str = "coffer-hold-expiry";
/// Due expiries one writer handles at once.
const CONCURRENCY_MAX: usize = 64;
/// Redelivery delay after a transient failure (NATS down, account busy).
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Pause before re-creating the consumer after an error.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// How long the server waits for an ack before redelivering to another writer. Short, so a
/// writer that dies holding due expiries delays them by no more than this; a handler that
/// takes longer tells the server it is still working ([`PROGRESS_PERIOD`]).
const ACK_WAIT: Duration = Duration::from_secs(2);
/// How often a handler in progress says so.
const PROGRESS_PERIOD: Duration = Duration::from_millis(700);
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

/// Runs until `shutdown` turns true.
pub async fn run(log: EventLog, commands: Dispatcher, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            result = consume(&log, &commands) => {
                if let Err(error) = result {
                    tracing::warn!(%error, "hold expiry consumer interrupted; resuming");
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_DELAY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn consume(log: &EventLog, commands: &Dispatcher) -> Result<(), Error> {
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
    messages
        .for_each_concurrent(CONCURRENCY_MAX, |message| async move {
            match message {
                Ok(message) => handle(log, commands, message).await,
                Err(error) => tracing::warn!(%error, "hold expiry delivery failed"),
            }
        })
        .await;
    Err(Error::Unavailable(
        "hold expiry message stream ended".into(),
    ))
}

async fn handle(log: &EventLog, commands: &Dispatcher, message: async_nats::jetstream::Message) {
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
    let answer = loop {
        tokio::select! {
            answer = &mut handled => break answer,
            _ = progress.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
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
