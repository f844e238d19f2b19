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
        // The stored value is what the next event must build on, whatever it is.
        let chain = recorded
            .chain
            .clone()
            .unwrap_or_else(|| recorded.expected_chain(&known.chain));
        known.apply(&recorded.event, recorded.position, chain);
    }
    Ok((known, applied))
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
