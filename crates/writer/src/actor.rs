//! The account actor: one per live account in this writer, handling that account's commands one
//! at a time.
//!
//! On its first command it loads the account's history. For each command it decides on its
//! current state and appends what `decide` yields, together with the markers that make the
//! answer exactly-once ([`crate::idempotency`]), in one atomic batch; every event states the last
//! position seen for its account. A transfer is decided on the current state of both accounts and
//! commits the debit, the credit and the transfer-id marker together, guarded by both accounts'
//! checks: there is no later step that could run twice or in the wrong order.
//!
//! When another writer got there first the batch is refused (`Conflict`): the actor looks for a
//! marker of the same request (a retry that raced its first attempt), else loads what it missed
//! and decides again, until the command's deadline (at most [`CONFLICT_RETRIES_MAX`] times). Its state is only a cache of the
//! stream and is bounded: it holds no per-transfer or per-key memory.
//!
//! Honesty: a command whose deadline has passed is never started, and no append is sent for it
//! after its deadline; its caller has already answered `outcome_unknown`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::{decide, AccountId, DomainError, Transaction};
use eventlog::group_commit::filling::{Filling, Queued as FillQueued};
use eventlog::{Entry, EventLog, EventMetadata};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::time::Instant;

use crate::idempotency::{self, KeyRecord, ReversalRecord, TransactionRecord, TransferRecord};
use crate::loading::{fresh_from_leader, load, load_counting, start_from_snapshot};
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::plan::{others_named, Decider, Plan};
use crate::request::{CommandRequest, Intent};
pub use crate::states::{AccountStates, Known, CACHED_STATES_MAX};
use crate::{Error, Result};

/// At most this many lost races per command; the command's deadline (always set by the
/// registry) usually ends the retries first. A transaction over several accounts races with each
/// of their own traffic, so a lost race is normal under contention and must be retried, not
/// answered as an error. On a replicated stream the leader also refuses a check on an account
/// while another writer's append to it is still being replicated, so a busy account owned by
/// another writer can refuse a long run of attempts that would each have been right: 64 quick
/// retries (until 2026-12) ran out in well under a second there. Now the pauses of [`backoff`]
/// double up to 32 ms, which spreads 256 attempts over several seconds, and a flow that may be handed
/// over goes to the busy account's owner after [`HAND_OVER_AFTER_LOST_RACES`].
pub const CONFLICT_RETRIES_MAX: usize = 256;
/// Lost races after which a flow that may be handed over goes to the owner of its other
/// accounts. On a replicated stream an account its owner keeps busy is refused to everyone else
/// nearly all the time (its next append is already in flight when another writer's reload has
/// seen the last one), while inside the owner the committer's reservations let flows and the
/// account's own commands take turns. A few losses in a row are the sign; a single one is the
/// ordinary race of two writers.
const HAND_OVER_AFTER_LOST_RACES: usize = 3;
/// A flow is handed over only with at least this much of its deadline left: the owner must
/// have time to decide it, and a hand-over can end in `outcome_unknown` where deciding here
/// cannot.
const HAND_OVER_TIME_LEFT_MIN: Duration = Duration::from_secs(1);
/// How many times an account batch is decided again after losing a race, before its commands
/// go alone.
const ACCOUNT_BATCH_RETRIES_MAX: usize = 8;

/// What every account actor shares.
pub struct ActorContext {
    pub log: EventLog,
    /// Sends the actors' appends, gathered into atomic batches.
    pub committer: eventlog::GroupCommit,
    /// An account's state is snapshotted once this many of its events were applied since its
    /// last snapshot (0: never), so a long history loads as a snapshot and the events after it.
    pub snapshot_every: u64,
    pub metrics: Arc<Metrics>,
    pub states: AccountStates,
    /// Failpoint for tests: every command waits this long before it is looked at, as if the
    /// actor were busy, so that queued commands outlive their deadlines.
    pub failpoint_delay: Option<Duration>,
    /// Most queued deposits and withdrawals of one account decided together and appended in
    /// one batch (1: each alone).
    pub account_batch_max: usize,
    /// Set when the server refused a batch of one account's events for its shape rather than a
    /// race (a server that checks each event against the ones before it in the batch): from
    /// then on every command goes alone.
    pub account_batching_refused: AtomicBool,
    /// How long an account's next batch may wait for the callers its last one answered, and
    /// the quiet spell that ends the wait (the group commit's settings; zero: never waits).
    pub account_fill: (Duration, Duration),
}

/// Counts a command from the moment it is queued until its actor is done with it (or drops it
/// unhandled), so the per-account bound counts queued work, not callers still waiting.
pub struct Queued(pub(crate) Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

pub enum AccountMessage {
    Execute {
        request: Box<CommandRequest>,
        reply: RpcReplyPort<Result<Outcome>>,
        queued: Queued,
        /// When it was sent to the actor.
        sent: Instant,
    },
    /// Decide what was set aside to go together ([`AccountActorState::waiting`]): sent by the
    /// actor to itself behind the commands already in its mailbox. A flush of an earlier
    /// generation (its commands already decided) is ignored.
    Flush(u64),
}

/// A command set aside to be decided with the others queued behind it.
struct Waiting {
    request: CommandRequest,
    reply: RpcReplyPort<Result<Outcome>>,
    queued: Queued,
    sent: Instant,
}

impl Waiting {
    fn answer(self, answer: Result<Outcome>) {
        drop(self.queued);
        // The caller may have timed out and gone; then nothing was started after its deadline.
        let _ = self.reply.send(answer);
    }
}

/// Whether a command may be decided together with others of its account: a plain deposit or
/// withdrawal, or a hold's expiry, without an idempotency key (a keyed one needs its marker's
/// answer at a known offset and goes alone). Each is one event of this account alone, so a
/// batch of them is guarded by the account's one concurrency check. Expiries go together
/// because many holds of an account often come due at once.
fn goes_together(request: &CommandRequest) -> bool {
    request.idempotency_key.is_none()
        && matches!(
            request.intent,
            Intent::Account(domain::Command::Deposit { .. } | domain::Command::Withdraw { .. })
                | Intent::Release(_, domain::Release::Expire)
        )
}

/// The event and answer of a command of an account batch ([`goes_together`]) decided on
/// `state` at `now`; `None` when it is refused (or appends nothing): it is then decided alone,
/// where the refusal is checked against the current state.
fn decide_together(
    state: &domain::AccountState,
    intent: &Intent,
    now: i64,
) -> Option<(domain::Event, Outcome)> {
    match intent {
        Intent::Account(command) => {
            let event = decide(state, command).ok()?.into_iter().next()?;
            let outcome = Outcome::BalanceChanged {
                account_id: state.id().clone(),
                balance: 0,
                position: 0,
            };
            Some((event, outcome))
        }
        Intent::Release(hold_id, release @ domain::Release::Expire) => {
            let event = domain::decide_release(state, hold_id, *release, now).ok()?;
            let outcome = Outcome::HoldReleased {
                hold_id: hold_id.clone(),
                status: "expired",
                position: 0,
            };
            Some((event, outcome))
        }
        _ => None,
    }
}

pub struct AccountActor;

pub struct AccountActorState {
    context: Arc<ActorContext>,
    known: Known,
    /// False until the history is loaded, and again after an append whose outcome is unknown.
    loaded: bool,
    /// Events of the account applied since its last snapshot (or since this actor started).
    events_since_snapshot: u64,
    /// Deposits and withdrawals set aside until the `Flush` behind them, in arrival order.
    waiting: Vec<Waiting>,
    /// The generation of `waiting`: bumped whenever a first command is set aside and whenever
    /// what was set aside is taken, so a `Flush` of an earlier generation is ignored.
    flush_generation: u64,
    /// Whether the next account batch waits for the callers the last one answered
    /// ([`eventlog::group_commit::filling`], as the group commit's batches do).
    filling: Filling,
    /// The last account batch stored, until the next flush takes it into account.
    stored: Option<StoredBatch>,
}

/// An account batch the stream acknowledged.
struct StoredBatch {
    commands: usize,
    flight: Duration,
    at: Instant,
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
        // History is loaded on the first command, not here, so that spawning never waits on NATS.
        let (fill_wait, fill_quiet) = arguments.context.account_fill;
        Ok(AccountActorState {
            context: arguments.context,
            known: Known::new(arguments.account_id),
            loaded: false,
            events_since_snapshot: 0,
            waiting: Vec::new(),
            flush_generation: 0,
            filling: Filling::new(fill_wait, fill_quiet),
            stored: None,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.context.states.retire(state.known.state.id());
        // Set aside and never decided: nothing of them was appended.
        for command in std::mem::take(&mut state.waiting) {
            command.answer(Err(Error::Unavailable(
                "the writer stopped this account before the command was started; not applied"
                    .into(),
            )));
        }
        Ok(())
    }

    // Every live actor's task holds this future at its largest for as long as the actor lives:
    // the decision paths are boxed, so an idle actor's task holds a few hundred bytes instead
    // of the ~13 KiB their state machines take (10 000 live actors by default; the box is one
    // allocation per message, freed when it is handled).
    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (request, reply, queued, sent) = match message {
            AccountMessage::Execute {
                request,
                reply,
                queued,
                sent,
            } => (request, reply, queued, sent),
            AccountMessage::Flush(generation) => {
                if generation == state.flush_generation {
                    Box::pin(state.flush_when_filled(&myself, generation)).await;
                }
                return Ok(());
            }
        };
        if let Some(delay) = state.context.failpoint_delay {
            tokio::time::sleep(delay).await;
        }
        let waiting = Waiting {
            request: *request,
            reply,
            queued,
            sent,
        };
        let batching = state.context.account_batch_max > 1
            && !state
                .context
                .account_batching_refused
                .load(Ordering::Relaxed);
        if batching && goes_together(&waiting.request) {
            // Set aside; the `Flush` queued behind whatever else is in the mailbox decides
            // them all. At low load that is the next message: no added wait.
            if state.waiting.is_empty() {
                state.flush_generation += 1;
                let flush = AccountMessage::Flush(state.flush_generation);
                if let Err(error) = myself.send_message(flush) {
                    tracing::debug!(%error, "could not queue a flush; deciding now");
                    state.waiting.push(waiting);
                    Box::pin(state.flush()).await;
                    return Ok(());
                }
            }
            state.waiting.push(waiting);
            let queued = state.queued();
            if state.filling.is_waiting() {
                state.filling.arrived(queued, Instant::now());
            }
            if state.waiting.len() >= state.context.account_batch_max
                || (state.filling.is_waiting() && state.wait_over(Instant::now()))
            {
                Box::pin(state.flush()).await;
            }
            return Ok(());
        }
        // Anything set aside arrived first: it goes first. A wait it cuts short says nothing
        // about whether callers come back.
        state.filling.abandon();
        Box::pin(state.flush()).await;
        let answer = Box::pin(state.execute_unless_expired(waiting.request.clone())).await;
        waiting.answer(answer);
        Ok(())
    }
}

/// `count` commands of an account batch as the filling policy counts them: one event each.
fn one_message_each(count: usize) -> FillQueued {
    FillQueued {
        appends: count,
        messages: count,
    }
}

/// What became of a plan sent to the stream.
enum Commit {
    /// Stored: the answer, at its position.
    Stored(Outcome),
    /// Refused whole for a stale condition (another writer or actor appended first): nothing
    /// was stored; decide again on fresh state. `stream_last`: the position the server holds
    /// for the subject whose check failed, when it said (not while a proposal to that subject
    /// was still in flight).
    LostRace { stream_last: Option<u64> },
}

impl AccountActorState {
    fn id(&self) -> &AccountId {
        self.known.state.id()
    }

    /// Appends through the group committer (under `reserved`, when the command holds its
    /// accounts), timed and counted.
    async fn append(
        &self,
        entries: Vec<Entry>,
        deadline: Option<Instant>,
        reserved: Option<&eventlog::AccountsReserved>,
    ) -> std::result::Result<eventlog::Appended, eventlog::Error> {
        let appending = std::time::Instant::now();
        let messages = entries.len();
        let committer = &self.context.committer;
        let appended = match reserved {
            Some(reserved) => committer.append_reserved(entries, deadline, reserved).await,
            None => committer.append(entries, deadline).await,
        };
        let metrics = &self.context.metrics;
        metrics
            .append_duration
            .observe(appending.elapsed().as_secs_f64());
        metrics.append_batch_messages.observe(messages as f64);
        appended
    }

    /// Runs one command unless its deadline has passed.
    async fn execute_unless_expired(&mut self, request: CommandRequest) -> Result<Outcome> {
        match self.expired(&request) {
            Some(refusal) => Err(refusal),
            None => self.execute(request).await,
        }
    }

    /// The refusal of a command whose deadline has passed: the caller has answered
    /// `outcome_unknown` already, and starting it now would append something nobody is told
    /// about.
    fn expired(&self, request: &CommandRequest) -> Option<Error> {
        let expired = request
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline);
        expired.then(|| {
            self.context.metrics.commands_expired.inc();
            Error::Unavailable("the command waited past its deadline and was not started".into())
        })
    }

    /// The commands set aside, as the filling policy counts them.
    fn queued(&self) -> FillQueued {
        one_message_each(self.waiting.len())
    }

    /// The `Flush` of `generation`: decides what was set aside, unless the last batch was just
    /// acknowledged and the callers it answered are still coming back (the closed-loop clients
    /// of a busy account otherwise split into two halves, each paying a batch's fixed cost):
    /// then it waits for them, at most the fill wait, with a `Flush` of the same generation
    /// due when the wait runs out.
    async fn flush_when_filled(&mut self, myself: &ActorRef<AccountMessage>, generation: u64) {
        let now = Instant::now();
        let queued = self.queued();
        if let Some(stored) = self.stored.take() {
            let during_flight = self
                .waiting
                .iter()
                .filter(|command| command.sent < stored.at)
                .count();
            self.filling.acknowledged(
                stored.commands,
                stored.flight,
                one_message_each(during_flight),
                self.context.account_batch_max,
                stored.at,
            );
            if self.filling.is_waiting() {
                self.filling.arrived(queued, now);
            }
        }
        if self.wait_over(now) {
            self.flush().await;
            return;
        }
        if let Some(wakes_at) = self.filling.wakes_at() {
            myself.send_after(wakes_at.saturating_duration_since(now), move || {
                AccountMessage::Flush(generation)
            });
        } else {
            self.flush().await;
        }
    }

    /// Whether a wait to fill, if any, is over with what is set aside now: filled, run out, or
    /// due to end after the earliest deadline among them (a command never misses its deadline
    /// for a wait, as in the group commit).
    fn wait_over(&self, now: Instant) -> bool {
        let earliest = self
            .waiting
            .iter()
            .filter_map(|command| command.request.deadline)
            .min();
        self.filling.over(self.queued(), earliest, now)
    }

    /// Decides the deposits and withdrawals set aside, in arrival order, on the account's state
    /// as each leaves it, and appends the accepted ones in one atomic batch. Every event states
    /// the account's position before the batch: JetStream checks a batch's conditions against the
    /// stream as it was before the batch, and one actor decided them all in order, so the check
    /// still means "nobody appended since". From the first refusal on, and for all of them after
    /// a conflict, commands run one by one as any other does (a refusal is re-checked against
    /// the stream leader there; a conflict is retried there).
    async fn flush(&mut self) {
        // Whatever ends a wait (filled, ran out, or a command that cannot wait behind it).
        let queued = self.queued();
        self.filling.end(queued, Instant::now());
        // A `Flush` still queued or due for what is taken now is stale: it must neither decide
        // nor start a wait on the batch this one stores.
        self.flush_generation += 1;
        let waiting = std::mem::take(&mut self.waiting);
        let mut live = Vec::with_capacity(waiting.len());
        for command in waiting {
            match self.expired(&command.request) {
                Some(refusal) => command.answer(Err(refusal)),
                None => live.push(command),
            }
        }
        let alone = if live.len() < 2 {
            live
        } else {
            self.execute_together(live).await
        };
        for command in alone {
            let answer = self.execute_unless_expired(command.request.clone()).await;
            command.answer(answer);
        }
    }

    /// The batch of [`AccountActorState::flush`]; returns the commands still to run alone.
    async fn execute_together(&mut self, mut commands: Vec<Waiting>) -> Vec<Waiting> {
        // Held for the next attempt after a lost race: this account's later appends wait.
        let mut reserved: Option<eventlog::AccountsReserved> = None;
        for attempt in 0..=ACCOUNT_BATCH_RETRIES_MAX {
            if let Err(error) = self.refresh().await {
                for command in commands {
                    command.answer(Err(error.clone()));
                }
                return Vec::new();
            }
            let before = self.known.position;
            let mut after = self.known.clone();
            let mut entries = Vec::with_capacity(commands.len());
            let mut decided: Vec<(Waiting, Outcome)> = Vec::with_capacity(commands.len());
            let mut rest = Vec::new();
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for command in commands {
                if !rest.is_empty() {
                    rest.push(command);
                    continue;
                }
                let Some((event, mut outcome)) =
                    decide_together(&after.state, &command.request.intent, now)
                else {
                    // A refusal (or nothing to append) is answered alone, re-checked there.
                    rest.push(command);
                    continue;
                };
                let chain = match eventlog::chain::next(&after.chain, self.id(), &event) {
                    Ok(chain) => chain,
                    Err(_) => {
                        rest.push(command);
                        continue;
                    }
                };
                after.apply(&event, before, chain.clone());
                if let Outcome::BalanceChanged { balance, .. } = &mut outcome {
                    *balance = after.state.balance();
                }
                entries.push(Entry::Event {
                    account: self.id().clone(),
                    expected_last_position: before,
                    event,
                    metadata: EventMetadata {
                        command_id: uuid::Uuid::now_v7().to_string(),
                        correlation_id: command.request.correlation_id.clone(),
                        traceparent: Some(command.request.trace.to_string()),
                    },
                    chain,
                });
                decided.push((command, outcome));
            }
            // Everyone runs alone, in order: the decided ones first, then the rest.
            let alone = |decided: Vec<(Waiting, Outcome)>, rest: Vec<Waiting>| -> Vec<Waiting> {
                decided
                    .into_iter()
                    .map(|(command, _)| command)
                    .chain(rest)
                    .collect()
            };
            if decided.len() < 2 {
                // Nothing gained by a batch.
                return alone(decided, rest);
            }
            // Nothing is sent after the earliest deadline among them: its caller answers by
            // then.
            let deadline = decided
                .iter()
                .filter_map(|(command, _)| command.request.deadline)
                .min();
            let messages = entries.len();
            let sent = Instant::now();
            let appended = self.append(entries, deadline, reserved.as_ref()).await;
            // Used or not, a reservation covers one decide-and-append cycle.
            drop(reserved.take());
            match appended {
                Ok(appended) => {
                    after.position = appended.last_position;
                    self.known = after;
                    self.context.states.publish(&self.known);
                    self.events_since_snapshot += messages as u64;
                    self.context.metrics.account_batches.inc();
                    self.context
                        .metrics
                        .account_batch_commands
                        .inc_by(messages as u64);
                    self.snapshot_when_due();
                    self.stored = Some(StoredBatch {
                        commands: messages,
                        flight: sent.elapsed(),
                        at: Instant::now(),
                    });
                    for (index, (command, outcome)) in decided.into_iter().enumerate() {
                        command.answer(Ok(outcome.at(appended.position_of(index))));
                    }
                    return rest;
                }
                Err(eventlog::Error::Conflict {
                    current_last_position,
                }) if current_last_position == Some(before) => {
                    // Nobody appended since `before`: the server refused the batch's shape.
                    tracing::error!(
                        account = %self.id(),
                        "the stream refused several events of one account in one batch; \
                         deciding every command alone from now on"
                    );
                    self.context
                        .account_batching_refused
                        .store(true, Ordering::Relaxed);
                    return alone(decided, rest);
                }
                Err(eventlog::Error::Conflict { .. } | eventlog::Error::Duplicate(_)) => {
                    // Nothing was stored: something else appended to the account since (a
                    // flow through it, another writer). The batch is decided again on fresh
                    // state, holding the account in this writer so that what queued behind it
                    // meanwhile cannot make it stale again.
                    self.context.metrics.conflicts.inc();
                    self.loaded = false;
                    // When someone outside this writer appended (racing writers, ownership
                    // off, a stale owner), waiting for this account's callers would only let
                    // it in first again. A flow of this writer through the account is in the
                    // shared states already and does not pause filling.
                    let ours = self
                        .context
                        .states
                        .get(self.id())
                        .is_some_and(|known| known.position > before);
                    if !ours {
                        self.filling.pause();
                    }
                    commands = alone(decided, rest);
                    if attempt == ACCOUNT_BATCH_RETRIES_MAX {
                        // No attempt left to hold the account for.
                        return commands;
                    }
                    match self
                        .context
                        .committer
                        .reserve(std::slice::from_ref(self.id()), deadline)
                        .await
                    {
                        Ok(granted) => reserved = Some(granted),
                        // Past the earliest deadline: each goes alone, within its own.
                        Err(_) => return commands,
                    }
                }
                Err(error @ eventlog::Error::Unavailable(_)) => {
                    // Not sent (its earliest deadline passed, NATS is away): each goes alone,
                    // within its own deadline.
                    tracing::debug!(account = %self.id(), %error, "account batch not sent");
                    return alone(decided, rest);
                }
                Err(error) => {
                    if matches!(error, eventlog::Error::OutcomeUnknown(_)) {
                        // The batch may be stored: reload before the next decision.
                        self.loaded = false;
                    }
                    let error = Error::from(error);
                    for (command, _) in decided {
                        command.answer(Err(error.clone()));
                    }
                    return rest;
                }
            }
        }
        // Still losing: each goes alone, with its own retries.
        commands
    }

    fn adopt(&mut self, newer: Known) {
        if newer.position > self.known.position {
            self.known = newer;
        }
    }

    /// Loads the account's events after the last one this actor has seen (starting from its
    /// snapshot when it has seen none), and snapshots it when enough were loaded.
    async fn catch_up(&mut self) -> Result<()> {
        if let Some(shared) = self.context.states.get(self.id()) {
            self.adopt(shared);
        }
        if self.known.position == 0 {
            let start = start_from_snapshot(&self.context, self.id()).await;
            self.adopt(start);
        }
        let (known, applied) = load_counting(&self.context.log, self.known.clone()).await?;
        self.context.metrics.events_replayed.inc_by(applied);
        self.known = known;
        self.loaded = true;
        self.context.states.publish(&self.known);
        self.events_since_snapshot += applied;
        self.snapshot_when_due();
        Ok(())
    }

    /// Writes a snapshot of the account, off the command's path, once enough events were
    /// applied since the last one. `known` is always the fold of the account's events up to its
    /// position (loaded, or decided and acknowledged), which is what a snapshot must be.
    fn snapshot_when_due(&mut self) {
        let every = self.context.snapshot_every;
        if every == 0 || self.events_since_snapshot < every || self.known.position == 0 {
            return;
        }
        self.events_since_snapshot = 0;
        let snapshot = eventlog::AccountSnapshot {
            state: self.known.state.clone(),
            position: self.known.position,
            chain: self.known.chain.clone(),
        };
        let context = self.context.clone();
        tokio::spawn(async move {
            match context.log.save_snapshot(&snapshot).await {
                Ok(()) => {
                    context.metrics.snapshots_written.inc();
                }
                Err(error) => {
                    tracing::warn!(account = %snapshot.state.id(), %error, "snapshot not written")
                }
            };
        });
    }

    /// Brings the state up to date before a decision: the history on first use (or after an
    /// unknown outcome), else what another actor of this writer may have credited us.
    async fn refresh(&mut self) -> Result<()> {
        if !self.loaded {
            self.catch_up().await?;
        } else if let Some(shared) = self.context.states.get(self.id()) {
            self.adopt(shared);
        }
        Ok(())
    }

    async fn execute(&mut self, request: CommandRequest) -> Result<Outcome> {
        self.refresh().await?;
        let request_hash = request.idempotency_key.as_ref().map(|_| {
            idempotency::request_hash(self.id(), &request.intent, request.transfer_id_generated)
        });
        if matches!(
            &request.intent,
            Intent::Transaction(Transaction {
                reverses: Some(_),
                ..
            })
        ) {
            // Once reversed, the money has moved back: deciding again would refuse for the
            // wrong reason (or move it once more, were the marker not in the batch).
            if let Some(first) = self.first_answer(&request, request_hash.as_deref()).await? {
                self.context.metrics.idempotent_replays.inc();
                return first;
            }
        }
        // The other accounts the decision reads, as this writer knows them.
        let mut others: BTreeMap<AccountId, Known> = BTreeMap::new();
        let metadata = EventMetadata {
            command_id: uuid::Uuid::now_v7().to_string(),
            correlation_id: request.correlation_id.clone(),
            traceparent: Some(request.trace.to_string()),
        };
        // A refusal is final only once the state it was decided on is known to be current.
        let mut verified_current = false;
        // This writer's appends to the command's accounts held back for its next attempt, and
        // which accounts those are.
        let mut reserved: Option<eventlog::AccountsReserved> = None;
        let mut reserved_accounts: Vec<AccountId> = Vec::new();
        // Races lost so far, and the other accounts the last reload found moved (the likely
        // rivals), for a hand-over.
        let mut lost_races = 0usize;
        let mut moved: Vec<AccountId> = Vec::new();
        loop {
            self.gather_others(&request.intent, &mut others, verified_current)
                .await?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let decider = Decider {
                own: &self.known,
                others: &others,
            };
            let mut plan = match decider.decide(&request.intent, &metadata, now) {
                Ok(plan) => plan,
                Err(refusal) if refusal.is_refusal() && !verified_current => {
                    tracing::debug!(account = %self.id(), %refusal, "refusal on cached state; re-reading");
                    self.catch_up_with_leader().await?;
                    for known in others.values_mut() {
                        *known = fresh_from_leader(&self.context.log, known.clone()).await?;
                    }
                    verified_current = true;
                    continue;
                }
                Err(refusal) if refusal.is_refusal() => {
                    // Nothing of the command is appended to its accounts now.
                    drop(reserved.take());
                    return self
                        .refuse(&request, request_hash.as_deref(), refusal)
                        .await;
                }
                Err(error) => return Err(error),
            };
            if let (Some(key), Some(hash)) = (&request.idempotency_key, &request_hash) {
                let offset = (plan.entries.len() - plan.answer_index) as u64;
                plan.entries.push(Entry::Marker {
                    subject: key.marker_subject(self.id()),
                    payload: KeyRecord::success(hash, &plan.outcome, offset).encode()?,
                });
            }
            // The accounts this attempt appends to, for a reservation if it loses.
            let appends_to: Vec<AccountId> = plan
                .entries
                .iter()
                .filter_map(|entry| match entry {
                    Entry::Event { account, .. } => Some(account.clone()),
                    Entry::Marker { .. } => None,
                })
                .collect();
            if !appends_to
                .iter()
                .all(|account| reserved_accounts.contains(account))
            {
                // A plan that appends beyond what was reserved must not use the reservation:
                // its other accounts could be queued for someone waiting on this one.
                drop(reserved.take());
            }
            let committed = self.commit(plan, request.deadline, reserved.as_ref()).await;
            // Used or not, a reservation covers one decide-and-append cycle.
            drop(reserved.take());
            match committed? {
                Commit::Stored(outcome) => return Ok(outcome),
                Commit::LostRace { stream_last } => {
                    let attempt = lost_races;
                    lost_races += 1;
                    // What is reloaded below may come from any replica: a refusal decided on it
                    // is checked against the leader again.
                    verified_current = false;
                    // Read even past the deadline: a retry that raced its first attempt is
                    // answered with what was stored.
                    if let Some(first) =
                        self.first_answer(&request, request_hash.as_deref()).await?
                    {
                        self.context.metrics.idempotent_replays.inc();
                        return first;
                    }
                    if lost_races > CONFLICT_RETRIES_MAX {
                        return Err(Error::TooManyConflicts(CONFLICT_RETRIES_MAX));
                    }
                    if lost_races.is_multiple_of(64) {
                        tracing::warn!(account = %self.id(), lost_races, ?stream_last, "a command keeps losing the race for its accounts to another writer");
                    }
                    let time_left = request.deadline.map_or(Duration::MAX, |deadline| {
                        deadline.saturating_duration_since(Instant::now())
                    });
                    if request.hand_over_when_contended
                        && lost_races >= HAND_OVER_AFTER_LOST_RACES
                        && time_left >= HAND_OVER_TIME_LEFT_MIN
                    {
                        // The accounts it appends to besides this one, the ones seen moving
                        // first.
                        let mut rivals = moved.clone();
                        for account in &appends_to {
                            if account != self.id() && !rivals.contains(account) {
                                rivals.push(account.clone());
                            }
                        }
                        if !rivals.is_empty() {
                            // Nothing of the command is stored (every attempt was refused
                            // whole), and nothing more is sent for it from here.
                            return Err(Error::Contended(rivals));
                        }
                    }
                    // A short, growing, jittered pause keeps two writers from retrying in
                    // lockstep, and lets another writer's append in flight to the same account
                    // land before this one is checked against it.
                    backoff(attempt).await;
                    // Within this writer the retry takes the accounts it appends to, in queue
                    // order, for its next decide-and-append: decided while another append to
                    // one of them is in flight, it would otherwise be sent on the position that
                    // append just moved, and lose every time to an account whose actor always
                    // has a batch in flight. Granted once this writer's earlier appends to them
                    // are done, so the reload below sees them.
                    reserved = Some(
                        self.context
                            .committer
                            .reserve(&appends_to, request.deadline)
                            .await
                            .map_err(Error::from)?,
                    );
                    self.catch_up().await?;
                    let log = &self.context.log;
                    let reloaded = futures::future::try_join_all(
                        others.values().map(|known| load(log, known.clone())),
                    )
                    .await?;
                    moved.clear();
                    for known in reloaded {
                        let before = others.get(known.state.id()).map(|known| known.position);
                        if before.is_some_and(|position| known.position > position) {
                            moved.push(known.state.id().clone());
                        }
                        others.insert(known.state.id().clone(), known);
                    }
                    // The server said where the account whose check failed stands. When none
                    // of the accounts reloaded got there, the replica that answered lags, and a
                    // decision on it would lose again: read them from the leader.
                    let behind = |position: u64| stream_last.is_some_and(|last| position < last);
                    let lagging = appends_to.iter().all(|account| {
                        if account == self.id() {
                            behind(self.known.position)
                        } else {
                            others
                                .get(account)
                                .is_none_or(|known| behind(known.position))
                        }
                    });
                    if lagging && !appends_to.is_empty() {
                        tracing::debug!(account = %self.id(), ?stream_last, "the reload after a lost race lags; reading from the leader");
                        self.catch_up_with_leader().await?;
                        let fresh = futures::future::try_join_all(
                            others
                                .values()
                                .map(|known| fresh_from_leader(&self.context.log, known.clone())),
                        )
                        .await?;
                        for known in fresh {
                            others.insert(known.state.id().clone(), known);
                        }
                    }
                    reserved_accounts = appends_to;
                }
            }
        }
    }

    /// Brings `others` to the accounts `intent` names besides this one, loading (together) the
    /// ones not known yet; once a refusal is being verified, from the stream leader.
    async fn gather_others(
        &self,
        intent: &Intent,
        others: &mut BTreeMap<AccountId, Known>,
        verified_current: bool,
    ) -> Result<()> {
        let named = others_named(&self.known, intent);
        others.retain(|id, _| named.contains(id));
        let missing: Vec<&AccountId> = named
            .iter()
            .filter(|id| !others.contains_key(*id))
            .collect();
        let loaded =
            futures::future::try_join_all(missing.into_iter().map(|id| self.receiver(id))).await?;
        for mut known in loaded {
            if verified_current {
                // Found only now (a capture's receiver): a refusal must not rest on a lagging
                // replica's copy of it either.
                known = fresh_from_leader(&self.context.log, known).await?;
            }
            others.insert(known.state.id().clone(), known);
        }
        Ok(())
    }

    /// Where a decision is appended: the plan's messages as one atomic batch (gathered with
    /// other actors' by group commit), never after `deadline`. On the acknowledgement every
    /// account the plan changed takes its new state and the answer gets its position; a batch
    /// refused for a stale condition stored nothing and lost a race.
    async fn commit(
        &mut self,
        mut plan: Plan,
        deadline: Option<Instant>,
        reserved: Option<&eventlog::AccountsReserved>,
    ) -> Result<Commit> {
        ensure_before(deadline)?;
        if let Some(expiry) = &plan.expiry {
            // One schedule per account, hold and time: a retry with the same time finds it
            // in place; an earlier one left by a refused attempt fires, finds the hold not
            // due, and is retried until it is.
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                eventlog::log::header::HOLD_EXPIRES_AT,
                expiry.expires_at.to_string().as_str(),
            );
            self.context
                .log
                .schedule(
                    &expiry.schedule,
                    &expiry.due,
                    expiry.fire_at,
                    headers,
                    Vec::new(),
                )
                .await
                .map_err(Error::from)?;
        }
        let own_events = plan
            .entries
            .iter()
            .filter(|entry| matches!(entry, Entry::Event { account, .. } if account == self.id()))
            .count() as u64;
        match self
            .append(std::mem::take(&mut plan.entries), deadline, reserved)
            .await
        {
            Ok(appended) => {
                for (mut known, index) in plan.changes {
                    known.position = appended.position_of(index);
                    if known.state.id() == self.id() {
                        self.known = known;
                        self.context.states.publish(&self.known);
                    } else {
                        self.context.states.offer(&known);
                    }
                }
                self.events_since_snapshot += own_events;
                self.snapshot_when_due();
                Ok(Commit::Stored(
                    plan.outcome.at(appended.position_of(plan.answer_index)),
                ))
            }
            Err(eventlog::Error::Conflict {
                current_last_position,
            }) => {
                self.context.metrics.conflicts.inc();
                Ok(Commit::LostRace {
                    stream_last: current_last_position,
                })
            }
            Err(eventlog::Error::Duplicate(_)) => {
                self.context.metrics.conflicts.inc();
                Ok(Commit::LostRace { stream_last: None })
            }
            Err(error) => {
                if matches!(error, eventlog::Error::OutcomeUnknown(_)) {
                    // The batch may be stored: reload before the next decision.
                    self.loaded = false;
                }
                Err(Error::from(error))
            }
        }
    }

    /// The receiver's current state as this writer knows it: its last known state (of its live
    /// actor, or cached) and the events after it, or else its history. What is loaded is kept.
    async fn receiver(&self, account: &AccountId) -> Result<Known> {
        let known = match self.context.states.get(account) {
            Some(known) => known,
            None => start_from_snapshot(&self.context, account).await,
        };
        let (known, applied) = load_counting(&self.context.log, known).await?;
        self.context.metrics.events_replayed.inc_by(applied);
        self.context.states.offer(&known);
        Ok(known)
    }

    /// The first answer to this request, if an earlier attempt of it (a retry's first try,
    /// maybe through another writer) is committed: read from its key or transfer-id marker.
    async fn first_answer(
        &self,
        request: &CommandRequest,
        request_hash: Option<&str>,
    ) -> Result<Option<Result<Outcome>>> {
        if let (Some(key), Some(hash)) = (&request.idempotency_key, request_hash) {
            let marker = self
                .context
                .log
                .read_marker(&key.marker_subject(self.id()))
                .await
                .map_err(Error::from)?;
            if let Some(marker) = marker {
                return Ok(Some(KeyRecord::replay(
                    &marker.payload,
                    marker.position,
                    hash,
                )));
            }
        }
        if let Intent::Transaction(Transaction {
            reverses: Some(original),
            ..
        }) = &request.intent
        {
            let marker = self
                .context
                .log
                .read_marker(&eventlog::subject::reversal_marker(original))
                .await
                .map_err(Error::from)?;
            if let Some(marker) = marker {
                let record = ReversalRecord::decode(&marker.payload)?;
                let reversal = domain::TransferId::parse(&record.reversal_id)
                    .map_err(|error| Error::Internal(format!("reversal marker: {error}")))?;
                return Ok(Some(Err(Error::Rejected(DomainError::AlreadyReversed {
                    original: original.clone(),
                    reversal,
                }))));
            }
            // A reversal's own id is new each time: nothing else can answer for it.
            return Ok(None);
        }
        let claimed = match &request.intent {
            Intent::Transfer(transfer) => Some(&transfer.transfer_id),
            Intent::Hold(hold) => Some(&hold.hold_id),
            Intent::Transaction(transaction) => Some(&transaction.transaction_id),
            _ => None,
        };
        if let Some(id) = claimed {
            let marker = self
                .context
                .log
                .read_marker(&eventlog::subject::transfer_marker(id))
                .await
                .map_err(Error::from)?;
            if let Some(marker) = marker {
                return Ok(Some(match &request.intent {
                    Intent::Hold(hold) => TransferRecord::replay_hold(
                        &marker.payload,
                        marker.position,
                        self.id(),
                        hold,
                    ),
                    Intent::Transfer(transfer) => TransferRecord::replay(
                        &marker.payload,
                        marker.position,
                        self.id(),
                        transfer,
                    ),
                    Intent::Transaction(transaction) => {
                        TransactionRecord::replay(&marker.payload, marker.position, transaction)
                    }
                    _ => return Ok(None),
                }));
            }
        }
        Ok(None)
    }

    /// Answers a refusal decided on current state. A retry of a request that succeeded before
    /// (its state has moved on since) gets its first answer instead; a keyed refusal is recorded
    /// as a marker alone, so a retry gets the same refusal whatever happens meanwhile.
    async fn refuse(
        &self,
        request: &CommandRequest,
        request_hash: Option<&str>,
        refusal: Error,
    ) -> Result<Outcome> {
        if let Some(first) = self.first_answer(request, request_hash).await? {
            self.context.metrics.idempotent_replays.inc();
            return first;
        }
        let refusal = self.settled_or_unknown(refusal).await?;
        let (Some(key), Some(hash)) = (&request.idempotency_key, request_hash) else {
            return Err(refusal);
        };
        ensure_before(request.deadline)?;
        let marker = Entry::Marker {
            subject: key.marker_subject(self.id()),
            payload: KeyRecord::refusal(hash, &refusal.problem()).encode()?,
        };
        match self.context.log.append_atomic(&[marker]).await {
            Ok(_) => Err(refusal),
            Err(eventlog::Error::Conflict { .. }) => {
                // A racing attempt of the same key recorded its answer first: that one counts.
                match self.first_answer(request, request_hash).await? {
                    Some(first) => first,
                    None => Err(refusal),
                }
            }
            Err(error) => Err(Error::from(error)),
        }
    }

    /// A hold this account does not hold open is either settled (its id was claimed by a hold
    /// of this account: `409 hold_settled`) or not this account's (`404 hold_not_found`).
    async fn settled_or_unknown(&self, refusal: Error) -> Result<Error> {
        let Error::Rejected(DomainError::HoldNotFound(hold_id)) = &refusal else {
            return Ok(refusal);
        };
        let claim = self
            .context
            .log
            .read_marker(&eventlog::subject::transfer_marker(hold_id))
            .await
            .map_err(Error::from)?;
        Ok(match claim {
            Some(claim) if TransferRecord::is_hold_of(&claim.payload, self.id()) => {
                Error::Rejected(DomainError::HoldSettled(hold_id.clone()))
            }
            _ => refusal,
        })
    }

    /// Catches up at least to the position the stream leader has for this account. Direct gets
    /// may come from a lagging replica; refusals must not.
    async fn catch_up_with_leader(&mut self) -> Result<()> {
        if let Some(shared) = self.context.states.get(self.id()) {
            self.adopt(shared);
        }
        self.known = fresh_from_leader(&self.context.log, self.known.clone()).await?;
        self.loaded = true;
        self.context.states.publish(&self.known);
        Ok(())
    }
}

/// Pause before retry `attempt` (0-based) of a command that lost a race: a random part of a
/// ceiling that starts at 250 us and doubles up to 32 ms, jittered from the clock's nanoseconds
/// (a retry needs spreading, not randomness of any quality).
async fn backoff(attempt: usize) {
    let ceiling_micros = 250u64 << attempt.min(7);
    let jitter = u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos()),
    );
    tokio::time::sleep(Duration::from_micros(jitter % ceiling_micros)).await;
}

/// Refuses to send anything more once the caller's deadline has passed.
fn ensure_before(deadline: Option<Instant>) -> Result<()> {
    match deadline {
        Some(deadline) if Instant::now() >= deadline => Err(Error::Unavailable(
            "the command reached its deadline before it could be appended".into(),
        )),
        _ => Ok(()),
    }
}
