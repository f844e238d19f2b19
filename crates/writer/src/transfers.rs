//! The transfer process manager: turns each `transfer_debited` into a credit of the receiver, or
//! a refund of the sender when the receiver cannot take it, and each `transfer_credited` into the
//! sender's `transfer_completed`.
//!
//! It runs in every writer on one shared durable consumer ([`CONSUMER_NAME`]), so each event is
//! handled by one writer at a time and redelivered if that writer dies before acking. Every step
//! is idempotent by transfer id through the account's own history (the receiver remembers every
//! credited transfer, the sender every settled one), however late a redelivery comes. A
//! redelivered debit first asks the sender whether the transfer is already settled, so a late
//! redelivery cannot credit a transfer that was refunded meanwhile.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use domain::account::{refund_reason, Settlement};
use domain::{Command, DomainError, Event};
use eventlog::{log::decode_stored, subject, EventLog, RecordedEvent};
use futures::StreamExt;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::request::CommandRequest;
use crate::Error;

/// The durable consumer all writers share.
pub const CONSUMER_NAME: &str = "coffer-transfers";
/// Transfer events handled at once by one writer.
const CONCURRENCY_MAX: usize = 64;
/// Messages asked for in one pull: no more than are handled at once, so none waits locally
/// while its ack wait runs out.
const PULL_BATCH_SIZE_MAX: usize = CONCURRENCY_MAX;
/// How long one pull waits for messages before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Redelivery delay after a transient failure (NATS down, account busy).
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Pause before re-creating the consumer after an error.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// How long the server waits for an ack before redelivering to another writer.
const ACK_WAIT: Duration = Duration::from_secs(30);

pub fn consumer_config() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER_NAME.into()),
        description: Some("Coffer transfer process manager".into()),
        filter_subjects: vec![
            subject::type_filter("transfer_debited"),
            subject::type_filter("transfer_credited"),
        ],
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// Runs until `shutdown` turns true.
pub async fn run(
    log: EventLog,
    registry: Registry,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        match pull_once(&log, &registry, &metrics).await {
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(%error, "transfer process manager: pull failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}

async fn pull_once(
    log: &EventLog,
    registry: &Registry,
    metrics: &Arc<Metrics>,
) -> Result<(), String> {
    if !log.is_connected() {
        return Err("not connected".into());
    }
    let stream = log
        .context()
        .get_stream_no_info(log.stream_name())
        .await
        .map_err(|error| error.to_string())?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(CONSUMER_NAME, consumer_config())
        .await
        .map_err(|error| error.to_string())?;
    let messages = consumer
        .batch()
        .max_messages(PULL_BATCH_SIZE_MAX)
        .expires(PULL_EXPIRES)
        .messages()
        .await
        .map_err(|error| error.to_string())?;
    messages
        .for_each_concurrent(CONCURRENCY_MAX, |message| async move {
            match message {
                Ok(message) => handle_message(message, registry, metrics).await,
                Err(error) => tracing::debug!(%error, "transfer pull ended"),
            }
        })
        .await;
    Ok(())
}

async fn handle_message(message: jetstream::Message, registry: &Registry, metrics: &Metrics) {
    let recorded = match decode(&message) {
        Ok(recorded) => recorded,
        Err(error) => {
            // Not a transfer event this build understands: leave it for a newer writer rather
            // than losing it, and say so loudly.
            tracing::error!(subject = %message.subject, %error, "undecodable transfer event");
            let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY * 30))).await;
            return;
        }
    };
    // Tell the server the step is under way, so its ack wait starts now and not at delivery.
    let _ = message.ack_with(AckKind::Progress).await;
    let result = step(&recorded, registry, metrics).await;
    let acknowledgement = match result {
        Ok(()) => message.ack().await,
        Err(error) => {
            metrics.transfer_step_retries.increment();
            tracing::warn!(position = recorded.position, %error, "transfer step failed; will retry");
            message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await
        }
    };
    if let Err(error) = acknowledgement {
        // The step is idempotent: a redelivery after a lost ack repeats nothing.
        tracing::warn!(position = recorded.position, %error, "transfer ack failed");
    }
}

fn decode(message: &jetstream::Message) -> Result<RecordedEvent, String> {
    let info = message.info().map_err(|error| error.to_string())?;
    let headers = message.headers.clone().unwrap_or_default();
    decode_stored(
        &message.subject,
        info.stream_sequence,
        info.published,
        &headers,
        &message.payload,
    )
    .map_err(|error| error.to_string())
}

/// One idempotent step of the saga.
async fn step(
    recorded: &RecordedEvent,
    registry: &Registry,
    metrics: &Metrics,
) -> Result<(), Error> {
    match &recorded.event {
        Event::TransferDebited {
            transfer_id,
            to,
            amount,
            currency,
            reference,
        } => {
            let from = &recorded.account_id;
            match registry.settlement(from, transfer_id).await? {
                Some(Settlement::Pending) => {}
                Some(settled) => {
                    tracing::debug!(%transfer_id, ?settled, "transfer already settled");
                    return Ok(());
                }
                // The sender must know a debit that is in the stream: retry, never drop it.
                None => {
                    return Err(Error::Unavailable(format!(
                        "sender {from} does not show transfer {transfer_id} yet"
                    )))
                }
            }
            let credit = CommandRequest {
                account_id: to.clone(),
                command: Command::CreditTransfer {
                    transfer_id: transfer_id.clone(),
                    from: from.clone(),
                    amount: *amount,
                    currency: *currency,
                    reference: reference.clone(),
                },
                idempotency_key: None,
                correlation_id: transfer_id.to_string(),
            };
            let reason = match registry.execute(credit).await {
                Ok(_) => {
                    metrics.transfer_credits.increment();
                    return Ok(());
                }
                Err(Error::Rejected(DomainError::AccountNotFound)) => {
                    refund_reason::ACCOUNT_NOT_FOUND
                }
                Err(Error::Rejected(DomainError::AccountClosed)) => refund_reason::ACCOUNT_CLOSED,
                Err(Error::Rejected(DomainError::CurrencyMismatch { .. })) => {
                    refund_reason::CURRENCY_MISMATCH
                }
                Err(Error::Rejected(DomainError::BalanceOverflow)) => {
                    refund_reason::BALANCE_OVERFLOW
                }
                Err(other) => return Err(other),
            };
            let refund = CommandRequest {
                account_id: from.clone(),
                command: Command::RefundTransfer {
                    transfer_id: transfer_id.clone(),
                    reason: reason.into(),
                },
                idempotency_key: None,
                correlation_id: transfer_id.to_string(),
            };
            registry.execute(refund).await?;
            metrics.transfer_refunds.increment();
            tracing::info!(%transfer_id, %from, %to, reason, "transfer refunded");
            Ok(())
        }
        Event::TransferCredited {
            transfer_id, from, ..
        } => {
            let complete = CommandRequest {
                account_id: from.clone(),
                command: Command::CompleteTransfer {
                    transfer_id: transfer_id.clone(),
                },
                idempotency_key: None,
                correlation_id: transfer_id.to_string(),
            };
            match registry.execute(complete).await {
                Ok(_) => {
                    metrics.transfer_completions.increment();
                    Ok(())
                }
                // A credit whose debit this build cannot find is not retried forever.
                Err(Error::Rejected(rejection)) => {
                    tracing::error!(%transfer_id, %from, %rejection, "cannot complete transfer");
                    Ok(())
                }
                Err(other) => Err(other),
            }
        }
        _ => Ok(()),
    }
}
