//! Loading what the actors decide on: an account's state brought up to its last event (from
//! what this writer knows, or its snapshot, or nothing), and up to what the stream leader has
//! when a refusal must not rest on a lagging replica.

use std::time::Duration;

use domain::AccountId;
use eventlog::EventLog;

use crate::actor::ActorContext;
use crate::states::Known;
use crate::{Error, Result};

/// How many times a writer re-reads an account while a replica lags behind the stream leader.
const FRESH_READ_ATTEMPTS_MAX: usize = 50;
/// Pause between those re-reads.
const FRESH_READ_PAUSE: Duration = Duration::from_millis(10);

/// `known` brought up to the account's last event as a direct get (any replica) sees it.
pub(crate) async fn load(log: &EventLog, known: Known) -> Result<Known> {
    load_counting(log, known).await.map(|(known, _)| known)
}

/// `known` brought up to the account's last event, with how many events that applied.
pub(crate) async fn load_counting(log: &EventLog, mut known: Known) -> Result<(Known, u64)> {
    let events = log
        .load_account_after(known.state.id(), known.position, &known.chain)
        .await
        .map_err(Error::from)?;
    let applied = events.len() as u64;
    for recorded in events {
        if let Some(trusted) = log.trusted_keys() {
            trust(trusted, &known.chain, &recorded)?;
        }
        // The stored value is what the next event must build on, whatever it is.
        let chain = recorded
            .chain
            .clone()
            .unwrap_or_else(|| recorded.expected_chain(&known.chain));
        known.apply(&recorded.event, recorded.position, chain);
    }
    Ok((known, applied))
}

/// Refuses to decide on an account whose history holds an event no trusted writer signed (with
/// a NATS credential alone, anyone who may append could otherwise deposit money and spend it
/// here), or whose chain value does not follow from the one before (the value is what the
/// signature vouches for).
fn trust(
    trusted: &eventlog::TrustedKeys,
    previous_chain: &str,
    recorded: &eventlog::RecordedEvent,
) -> Result<()> {
    let expected = recorded.expected_chain(previous_chain);
    let reason = if recorded.chain.as_deref() != Some(expected.as_str()) {
        "its Coffer-Chain does not follow from the account's previous event".to_owned()
    } else {
        match trusted.verify_event(
            recorded.position,
            recorded.chain.as_deref(),
            recorded.signature.as_deref(),
        ) {
            Ok(()) => return Ok(()),
            Err(error) => format!("no trusted writer signed it: {error}"),
        }
    };
    tracing::error!(account = %recorded.account_id, position = recorded.position, %reason, "an account's history cannot be trusted; its commands are refused");
    Err(Error::AccountUnreadable(format!(
        "account {}: the event at position {} cannot be trusted: {reason}; this account's \
         commands are refused until an operator repairs it (docs/operations.md, \
         \"CofferSignatureInvalid\")",
        recorded.account_id, recorded.position
    )))
}

/// Where loading `account` starts without a state in memory: its snapshot when it has a usable
/// one (see [`eventlog::snapshot`]), otherwise before its first event. A snapshot that cannot
/// be read only costs the full replay.
pub(crate) async fn start_from_snapshot(context: &ActorContext, account: &AccountId) -> Known {
    if context.snapshot_every == 0 {
        return Known::new(account.clone());
    }
    match context.log.load_snapshot(account).await {
        Ok(Some(snapshot)) => {
            context.metrics.snapshots_loaded.inc();
            Known {
                state: snapshot.state,
                position: snapshot.position,
                chain: snapshot.chain,
            }
        }
        Ok(None) => Known::new(account.clone()),
        Err(error) => {
            tracing::debug!(%account, %error, "snapshot not read; replaying the history");
            Known::new(account.clone())
        }
    }
}

/// `known` brought up at least to the position the stream leader has for the account.
pub(crate) async fn fresh_from_leader(log: &EventLog, known: Known) -> Result<Known> {
    let leader_position = log
        .last_account_position(known.state.id())
        .await
        .map_err(Error::from)?;
    let mut known = known;
    for _ in 0..FRESH_READ_ATTEMPTS_MAX {
        known = load(log, known).await?;
        if known.position >= leader_position {
            return Ok(known);
        }
        tokio::time::sleep(FRESH_READ_PAUSE).await;
    }
    Err(Error::Unavailable(format!(
        "replica lags behind position {leader_position} of account {}",
        known.state.id()
    )))
}
