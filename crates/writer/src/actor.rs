//! The account actor: one per live account, handling that account's commands one at a time.
//!
//! On its first message it loads the account's history from the stream. For each command it
//! decides on its current state, appends the resulting event stating the last position it saw,
//! evolves and replies. When another writer got there first the append is refused (`Conflict`):
//! the actor loads the events it missed and decides again, at most [`CONFLICT_RETRIES_MAX`]
//! times. Its state is only a cache of the stream, so a crashed or stopped actor loses nothing
//! that was acknowledged.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use domain::account::Settlement;
use domain::{decide, evolve, AccountId, AccountState, Command, Event, TransferId};
use eventlog::{EventLog, EventMetadata, RecordedEvent};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use time::OffsetDateTime;

use crate::idempotency::{self, AnswerStore, TransferIdClaims, KEY_RETENTION};
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::request::CommandRequest;
use crate::{Error, Result};

/// How many times a command is re-decided after losing a race to another writer.
pub const CONFLICT_RETRIES_MAX: usize = 8;
/// Keyed outcomes an actor keeps in memory; older ones are still answered from the KV bucket.
pub const KEYS_PER_ACCOUNT_MAX: usize = 10_000;
/// How many times a writer re-reads an account while a replica lags behind the stream leader.
const FRESH_READ_ATTEMPTS_MAX: usize = 50;
/// Pause between those re-reads.
const FRESH_READ_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// What every account actor shares.
pub struct ActorContext {
    pub log: EventLog,
    pub answers: AnswerStore,
    pub transfer_ids: TransferIdClaims,
    pub metrics: Arc<Metrics>,
}

pub enum AccountMessage {
    Execute(Box<CommandRequest>, RpcReplyPort<Result<Outcome>>),
    /// Where an outgoing transfer stands, after catching up with the stream.
    Settlement(TransferId, RpcReplyPort<Result<Option<Settlement>>>),
}

pub struct AccountActor;

pub struct AccountActorState {
    context: Arc<ActorContext>,
    account: AccountState,
    loaded: bool,
    /// Position of the account's last event seen; 0 before the first.
    last_position: u64,
    keys: KeyMemory,
    /// Where each outgoing transfer was debited, to answer a retried transfer request.
    debit_positions: HashMap<TransferId, u64>,
}

pub struct ActorArguments {
    pub context: Arc<ActorContext>,
    pub account_id: AccountId,
}

impl Actor for AccountActor {
    type Msg = AccountMessage;
    type State = AccountActorState;
    type Arguments = ActorArguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        arguments: ActorArguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // History is loaded on the first message, not here, so that spawning never waits on NATS.
        Ok(AccountActorState {
            context: arguments.context,
            account: AccountState::new(arguments.account_id),
            loaded: false,
            last_position: 0,
            keys: KeyMemory::default(),
            debit_positions: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AccountMessage::Execute(request, reply) => {
                let answer = state.execute(*request).await;
                // The caller may have timed out and gone; the outcome is in the stream anyway.
                let _ = reply.send(answer);
            }
            AccountMessage::Settlement(transfer_id, reply) => {
                let answer = state.catch_up_with_leader().await.map(|()| {
                    state
                        .account
                        .account()
                        .and_then(|account| account.outgoing.get(&transfer_id))
                        .map(|transfer| transfer.settlement)
                });
                let _ = reply.send(answer);
            }
        }
        Ok(())
    }
}

impl AccountActorState {
    fn id(&self) -> &AccountId {
        self.account.id()
    }

    /// Loads the events appended after the last one this actor has seen.
    async fn catch_up(&mut self) -> Result<()> {
        let events = self
            .context
            .log
            .load_account(self.account.id(), self.last_position)
            .await
            .map_err(log_error)?;
        for recorded in events {
            self.apply(&recorded);
        }
        self.loaded = true;
        Ok(())
    }

    /// Catches up at least to the position the stream leader has for this account. Direct gets
    /// may come from a lagging replica; refusals and saga decisions must not.
    async fn catch_up_with_leader(&mut self) -> Result<()> {
        let leader_position = self
            .context
            .log
            .last_account_position(self.account.id())
            .await
            .map_err(log_error)?;
        for _ in 0..FRESH_READ_ATTEMPTS_MAX {
            self.catch_up().await?;
            if self.last_position >= leader_position {
                return Ok(());
            }
            tokio::time::sleep(FRESH_READ_PAUSE).await;
        }
        Err(Error::Unavailable(format!(
            "replica lags behind position {leader_position} of account {}",
            self.account.id()
        )))
    }

    fn apply(&mut self, recorded: &RecordedEvent) {
        evolve(&mut self.account, &recorded.event);
        self.last_position = recorded.position;
        if let Event::TransferDebited { transfer_id, .. } = &recorded.event {
            self.debit_positions
                .insert(transfer_id.clone(), recorded.position);
        }
        if let (Some(key), Some(hash)) = (
            &recorded.metadata.idempotency_key,
            &recorded.metadata.request_hash,
        ) {
            let outcome = Outcome::of_event(
                self.account.id(),
                &recorded.event,
                self.account.balance(),
                recorded.position,
            );
            self.keys.remember(key, hash, outcome, recorded.time);
        }
    }

    async fn execute(&mut self, request: CommandRequest) -> Result<Outcome> {
        if !self.loaded {
            self.catch_up().await?;
        }
        let request_hash = idempotency::request_hash(self.id(), &request.command);
        if let Some(key) = &request.idempotency_key {
            if let Some(outcome) = self.keys.recall(key.as_str(), &request_hash) {
                self.context.metrics.idempotent_replays.increment();
                // The first writer may have died before storing it: store it now, so the
                // answer outlives this actor's bounded memory.
                if outcome.is_ok() {
                    self.context
                        .answers
                        .remember(self.id(), key, &request_hash, &outcome)
                        .await;
                }
                return outcome;
            }
            if let Some(outcome) = self
                .context
                .answers
                .lookup(self.id(), key, &request_hash)
                .await?
            {
                self.context.metrics.idempotent_replays.increment();
                return Ok(outcome);
            }
        }
        let answer = self.decide_and_append(&request, &request_hash).await;
        if let Some(key) = &request.idempotency_key {
            let definitive = match &answer {
                Ok(_) => true,
                Err(error) => matches!(
                    error,
                    Error::Rejected(_) | Error::InvalidRequest(_) | Error::IdempotencyKeyReused
                ),
            };
            if definitive {
                self.context
                    .answers
                    .remember(self.id(), key, &request_hash, &answer)
                    .await;
            }
        }
        answer
    }

    async fn decide_and_append(
        &mut self,
        request: &CommandRequest,
        request_hash: &str,
    ) -> Result<Outcome> {
        let metadata = EventMetadata {
            command_id: match &request.idempotency_key {
                Some(key) => idempotency::command_id(self.id(), key),
                None => saga_command_id(&request.command)
                    .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
            },
            correlation_id: request.correlation_id.clone(),
            idempotency_key: request
                .idempotency_key
                .as_ref()
                .map(|key| key.as_str().to_owned()),
            request_hash: request
                .idempotency_key
                .as_ref()
                .map(|_| request_hash.to_owned()),
        };
        // A refusal is final only once the state it was decided on is known to be current.
        let mut verified_current = false;
        let mut transfer_id_claimed = false;
        for _attempt in 0..=CONFLICT_RETRIES_MAX {
            let events = match decide(&self.account, &request.command) {
                Ok(events) => events,
                Err(rejection) if !verified_current => {
                    tracing::debug!(account = %self.id(), %rejection, "refusal on cached state; re-reading");
                    self.catch_up_with_leader().await?;
                    verified_current = true;
                    continue;
                }
                Err(rejection) => return Err(rejection.into()),
            };
            let Some(event) = events.into_iter().next() else {
                return Ok(self.already_applied(&request.command));
            };
            if let (Event::TransferDebited { transfer_id, .. }, false) =
                (&event, transfer_id_claimed)
            {
                self.context
                    .transfer_ids
                    .claim(transfer_id, self.account.id())
                    .await?;
                transfer_id_claimed = true;
            }
            let appended = self
                .context
                .log
                .append(self.id(), self.last_position, &event, &metadata)
                .await;
            match appended {
                Ok(appended) if !appended.duplicate => {
                    let recorded = RecordedEvent {
                        position: appended.position,
                        subject: String::new(),
                        account_id: self.id().clone(),
                        time: OffsetDateTime::now_utc(),
                        event: event.clone(),
                        metadata: metadata.clone(),
                    };
                    self.apply(&recorded);
                    return Ok(Outcome::of_event(
                        self.id(),
                        &event,
                        self.account.balance(),
                        appended.position,
                    ));
                }
                Ok(_) | Err(eventlog::Error::Conflict { .. }) => {
                    // Another writer (or our own earlier, unacknowledged attempt) appended first.
                    self.context.metrics.conflicts.increment();
                    self.catch_up().await?;
                    if let Some(key) = &request.idempotency_key {
                        if let Some(outcome) = self.keys.recall(key.as_str(), request_hash) {
                            return outcome;
                        }
                    }
                }
                Err(error) => return Err(log_error(error)),
            }
        }
        Err(Error::TooManyConflicts(CONFLICT_RETRIES_MAX))
    }

    /// The answer to a command that `decide` found already applied.
    fn already_applied(&self, command: &Command) -> Outcome {
        match command {
            Command::DebitTransfer { transfer_id, .. } => Outcome::TransferAccepted {
                transfer_id: transfer_id.clone(),
                position: self.debit_positions.get(transfer_id).copied().unwrap_or(0),
            },
            _ => Outcome::TransferStep { position: 0 },
        }
    }
}

/// Saga steps get a deterministic command id, so the server's duplicate window drops a step
/// repeated by a second process-manager instance.
fn saga_command_id(command: &Command) -> Option<String> {
    match command {
        Command::CreditTransfer {
            transfer_id, from, ..
        } => Some(format!("credit-{from}-{transfer_id}")),
        Command::RefundTransfer { transfer_id, .. } => Some(format!("refund-{transfer_id}")),
        Command::CompleteTransfer { transfer_id } => Some(format!("complete-{transfer_id}")),
        _ => None,
    }
}

fn log_error(error: eventlog::Error) -> Error {
    match error {
        eventlog::Error::Unavailable(detail) => Error::Unavailable(detail),
        eventlog::Error::OutcomeUnknown(detail) => Error::OutcomeUnknown(detail),
        eventlog::Error::Conflict { .. } => Error::TooManyConflicts(0),
        other => Error::Internal(other.to_string()),
    }
}

/// Outcomes of keyed commands rebuilt from the stream, newest [`KEYS_PER_ACCOUNT_MAX`] within
/// [`KEY_RETENTION`].
#[derive(Default)]
struct KeyMemory {
    by_key: HashMap<String, (String, Outcome)>,
    order: VecDeque<(OffsetDateTime, String)>,
}

impl KeyMemory {
    fn remember(&mut self, key: &str, request_hash: &str, outcome: Outcome, time: OffsetDateTime) {
        if self.by_key.contains_key(key) {
            return; // The first outcome is the one a retry gets.
        }
        self.by_key
            .insert(key.to_owned(), (request_hash.to_owned(), outcome));
        self.order.push_back((time, key.to_owned()));
        let horizon = OffsetDateTime::now_utc() - KEY_RETENTION;
        while let Some((oldest_time, _)) = self.order.front() {
            if self.order.len() <= KEYS_PER_ACCOUNT_MAX && *oldest_time >= horizon {
                break;
            }
            if let Some((_, oldest_key)) = self.order.pop_front() {
                self.by_key.remove(&oldest_key);
            }
        }
    }

    fn recall(&self, key: &str, request_hash: &str) -> Option<Result<Outcome>> {
        let (first_hash, outcome) = self.by_key.get(key)?;
        Some(if first_hash == request_hash {
            Ok(outcome.clone())
        } else {
            Err(Error::IdempotencyKeyReused)
        })
    }
}
