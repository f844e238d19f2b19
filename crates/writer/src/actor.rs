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
//! and decides again, at most [`CONFLICT_RETRIES_MAX`] times and never past the command's
//! deadline. Its state is only a cache of the
//! stream and is bounded: it holds no per-transfer or per-key memory.
//!
//! Honesty: a command whose deadline has passed is never started, and no append is sent for it
//! after its deadline; its caller has already answered `outcome_unknown`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::{
    decide, decide_capture, decide_hold, decide_release, decide_transaction, decide_transfer,
    evolve, AccountId, AccountState, DomainError, Event, Release, Transaction, Transfer,
    TransferEvents,
};
use eventlog::{Entry, EventLog, EventMetadata};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::time::Instant;

use crate::idempotency::{
    self, KeyRecord, ReversalRecord, TransactionRecord, TransferRecord, KEY_RETENTION,
};
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::request::{CommandRequest, Intent};
use crate::{Error, Result};

/// How many times a command is re-decided after losing a race to another writer (or to another
/// actor of this one). The command's deadline bounds the retries too: nothing is appended after
/// it. A transaction over several accounts races with each of their own traffic, so a lost race
/// is normal under contention and must be retried, not answered as an error: 64 attempts with
/// the growing pause of [`backoff`] span about four seconds, within the default 10 s deadline.
pub const CONFLICT_RETRIES_MAX: usize = 64;
/// How many times a writer re-reads an account while a replica lags behind the stream leader.
const FRESH_READ_ATTEMPTS_MAX: usize = 50;
/// Pause between those re-reads.
const FRESH_READ_PAUSE: Duration = Duration::from_millis(10);

/// An account's state as of the position of its last event (0: no event), with that event's
/// chain value, which the account's next event builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub state: AccountState,
    pub position: u64,
    pub chain: String,
}

impl Known {
    fn new(account: AccountId) -> Self {
        Self {
            state: AccountState::new(account),
            position: 0,
            chain: eventlog::chain::GENESIS.to_owned(),
        }
    }

    fn apply(&mut self, event: &Event, position: u64, chain: String) {
        evolve(&mut self.state, event);
        self.position = position;
        self.chain = chain;
    }
}

/// Most account states kept for accounts without a live actor here (receivers of transfers
/// and captures, passivated accounts): at a few hundred bytes each, a few MiB at most.
pub const CACHED_STATES_MAX: usize = 10_000;

/// The newest state this writer knows of accounts: of each account whose actor is live here,
/// and, bounded by [`CACHED_STATES_MAX`] (oldest first out), of others it has seen. A transfer
/// reads its receiver from here and loads only the events after it (not the whole history),
/// without waiting on the receiver's actor (two actors waiting on each other would deadlock).
/// Entries are only ever replaced by newer ones: every `Known` is the fold of a prefix of the
/// account's committed events, so the one with the higher position is the more current. It is a
/// cache: the stream's concurrency check catches anything stale.
#[derive(Default)]
pub struct AccountStates {
    inner: Mutex<States>,
}

#[derive(Default)]
struct States {
    /// Accounts whose actor is live in this writer.
    live: HashMap<AccountId, Known>,
    /// Others, with their insertion order for eviction.
    cached: HashMap<AccountId, Known>,
    order: std::collections::VecDeque<AccountId>,
}

impl States {
    fn cache(&mut self, known: &Known) {
        let id = known.state.id();
        match self.cached.get_mut(id) {
            Some(entry) => {
                if entry.position < known.position {
                    *entry = known.clone();
                }
            }
            None => {
                self.cached.insert(id.clone(), known.clone());
                self.order.push_back(id.clone());
                while self.cached.len() > CACHED_STATES_MAX {
                    match self.order.pop_front() {
                        Some(oldest) => {
                            self.cached.remove(&oldest);
                        }
                        None => break,
                    }
                }
            }
        }
    }
}

impl AccountStates {
    fn lock(&self) -> std::sync::MutexGuard<'_, States> {
        // Entries are replaced whole, so a panic elsewhere cannot leave one half-written.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, account: &AccountId) -> Option<Known> {
        let states = self.lock();
        states
            .live
            .get(account)
            .or_else(|| states.cached.get(account))
            .cloned()
    }

    /// Records `known` for its account's live actor.
    fn publish(&self, known: &Known) {
        let mut states = self.lock();
        let id = known.state.id().clone();
        if let Some(cached) = states.cached.remove(&id) {
            states.order.retain(|account| *account != id);
            if cached.position > known.position {
                states.live.insert(id.clone(), cached);
            }
        }
        match states.live.get_mut(&id) {
            Some(entry) if entry.position >= known.position => {}
            Some(entry) => *entry = known.clone(),
            None => {
                states.live.insert(id, known.clone());
            }
        }
    }

    /// Offers a newer state of an account this actor changed or read (a receiver).
    fn offer(&self, known: &Known) {
        let mut states = self.lock();
        match states.live.get_mut(known.state.id()) {
            Some(entry) => {
                if entry.position < known.position {
                    *entry = known.clone();
                }
            }
            None => states.cache(known),
        }
    }

    /// The account's actor stopped: its state stays, as a cached one.
    fn retire(&self, account: &AccountId) {
        let mut states = self.lock();
        if let Some(known) = states.live.remove(account) {
            states.cache(&known);
        }
    }

    /// Accounts with a live actor here.
    pub fn live(&self) -> usize {
        self.lock().live.len()
    }

    /// Accounts known without a live actor here.
    pub fn cached(&self) -> usize {
        self.lock().cached.len()
    }
}

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
}

impl Waiting {
    fn answer(self, answer: Result<Outcome>) {
        drop(self.queued);
        // The caller may have timed out and gone; then nothing was started after its deadline.
        let _ = self.reply.send(answer);
    }
}

/// Whether a command may be decided together with others of its account: a plain deposit or
/// withdrawal without an idempotency key (a keyed one needs its marker's answer at a known
/// offset and goes alone).
fn goes_together(request: &CommandRequest) -> bool {
    request.idempotency_key.is_none()
        && matches!(
            request.intent,
            Intent::Account(domain::Command::Deposit { .. } | domain::Command::Withdraw { .. })
        )
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
    /// The generation of `waiting`: bumped whenever a first command is set aside.
    flush_generation: u64,
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
        Ok(AccountActorState {
            context: arguments.context,
            known: Known::new(arguments.account_id),
            loaded: false,
            events_since_snapshot: 0,
            waiting: Vec::new(),
            flush_generation: 0,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.context.states.retire(state.known.state.id());
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (request, reply, queued) = match message {
            AccountMessage::Execute {
                request,
                reply,
                queued,
            } => (request, reply, queued),
            AccountMessage::Flush(generation) => {
                if generation == state.flush_generation {
                    state.flush().await;
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
                    state.flush().await;
                    return Ok(());
                }
            }
            state.waiting.push(waiting);
            if state.waiting.len() >= state.context.account_batch_max {
                state.flush().await;
            }
            return Ok(());
        }
        // Anything set aside arrived first: it goes first.
        state.flush().await;
        let answer = state.execute_unless_expired(waiting.request.clone()).await;
        waiting.answer(answer);
        Ok(())
    }
}

/// The messages to append for a decision and the answer they give once committed.
struct Plan {
    entries: Vec<Entry>,
    /// The answer, with the index of the entry whose position it reports.
    outcome: Outcome,
    answer_index: usize,
    /// The new states of the accounts, with the index of each one's event.
    changes: Vec<(Known, usize)>,
    /// A hold's expiry, scheduled before the batch is appended.
    expiry: Option<Expiry>,
}

/// A message the schedules stream delivers when a hold is due.
struct Expiry {
    schedule: String,
    due: String,
    at: time::OffsetDateTime,
}

impl AccountActorState {
    fn id(&self) -> &AccountId {
        self.known.state.id()
    }

    /// Appends through the group committer, timed and counted.
    async fn append(
        &self,
        entries: Vec<Entry>,
        deadline: Option<Instant>,
    ) -> std::result::Result<eventlog::Appended, eventlog::Error> {
        let appending = std::time::Instant::now();
        let messages = entries.len();
        let appended = self.context.committer.append(entries, deadline).await;
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

    /// Decides the deposits and withdrawals set aside, in arrival order, on the account's state
    /// as each leaves it, and appends the accepted ones in one atomic batch. Every event states
    /// the account's position before the batch: JetStream checks a batch's conditions against the
    /// stream as it was before the batch, and one actor decided them all in order, so the check
    /// still means "nobody appended since". From the first refusal on, and for all of them after
    /// a conflict, commands run one by one as any other does (a refusal is re-checked against
    /// the stream leader there; a conflict is retried there).
    async fn flush(&mut self) {
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
    async fn execute_together(&mut self, commands: Vec<Waiting>) -> Vec<Waiting> {
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
        for command in commands {
            let Intent::Account(domain_command) = &command.request.intent else {
                rest.push(command);
                continue;
            };
            if !rest.is_empty() {
                rest.push(command);
                continue;
            }
            let event = match decide(&after.state, domain_command)
                .map(|events| events.into_iter().next())
            {
                Ok(Some(event)) => event,
                // A refusal (or nothing to append) is answered alone, re-checked there.
                _ => {
                    rest.push(command);
                    continue;
                }
            };
            let chain = match eventlog::chain::next(&after.chain, self.id(), &event) {
                Ok(chain) => chain,
                Err(_) => {
                    rest.push(command);
                    continue;
                }
            };
            after.apply(&event, before, chain.clone());
            let outcome = Outcome::BalanceChanged {
                account_id: self.id().clone(),
                balance: after.state.balance(),
                position: 0,
            };
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
        // Nothing is sent after the earliest deadline among them: its caller answers by then.
        let deadline = decided
            .iter()
            .filter_map(|(command, _)| command.request.deadline)
            .min();
        let messages = entries.len();
        let appended = self.append(entries, deadline).await;
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
                for (index, (command, outcome)) in decided.into_iter().enumerate() {
                    command.answer(Ok(outcome.at(appended.position_of(index))));
                }
                rest
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
                alone(decided, rest)
            }
            Err(
                error @ (eventlog::Error::Conflict { .. }
                | eventlog::Error::Duplicate(_)
                | eventlog::Error::Unavailable(_)),
            ) => {
                // Nothing was stored: another writer appended since (each decides again
                // alone, on fresh state), or the batch was not sent (its earliest deadline
                // passed, NATS is away): each goes alone, within its own deadline.
                if !matches!(error, eventlog::Error::Unavailable(_)) {
                    self.context.metrics.conflicts.inc();
                    self.loaded = false;
                }
                alone(decided, rest)
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
                rest
            }
        }
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
        for attempt in 0..=CONFLICT_RETRIES_MAX {
            self.gather_others(&request.intent, &mut others, verified_current)
                .await?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let mut plan = match self.decide_plan(&request.intent, &others, &metadata, now) {
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
                    ttl: Some(KEY_RETENTION),
                });
            }
            ensure_before(request.deadline)?;
            if let Some(expiry) = &plan.expiry {
                // One schedule per account, hold and time: a retry with the same time finds it
                // in place; an earlier one left by a refused attempt fires, finds the hold not
                // due, and is retried until it is.
                self.context
                    .log
                    .schedule(&expiry.schedule, &expiry.due, expiry.at, Vec::new())
                    .await
                    .map_err(Error::from)?;
            }
            let own_events = plan
                .entries
                .iter()
                .filter(
                    |entry| matches!(entry, Entry::Event { account, .. } if account == self.id()),
                )
                .count() as u64;
            let appended = self
                .append(std::mem::take(&mut plan.entries), request.deadline)
                .await;
            match appended {
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
                    return Ok(plan.outcome.at(appended.position_of(plan.answer_index)));
                }
                Err(eventlog::Error::Conflict { .. } | eventlog::Error::Duplicate(_)) => {
                    self.context.metrics.conflicts.inc();
                    if let Some(first) =
                        self.first_answer(&request, request_hash.as_deref()).await?
                    {
                        self.context.metrics.idempotent_replays.inc();
                        return first;
                    }
                    self.catch_up().await?;
                    for known in others.values_mut() {
                        *known = load(&self.context.log, known.clone()).await?;
                    }
                    if !others.is_empty() {
                        // Flows over several accounts race with each of their accounts' own
                        // traffic: a short, growing, jittered pause keeps two of them from
                        // retrying in lockstep.
                        backoff(attempt).await;
                    }
                }
                Err(error) => {
                    if matches!(error, eventlog::Error::OutcomeUnknown(_)) {
                        // The batch may be stored: reload before the next decision.
                        self.loaded = false;
                    }
                    return Err(Error::from(error));
                }
            }
        }
        Err(Error::TooManyConflicts(CONFLICT_RETRIES_MAX))
    }

    /// The accounts, other than this one, that `intent` is decided on too.
    fn others_named(&self, intent: &Intent) -> Vec<AccountId> {
        let mut named: Vec<AccountId> = match intent {
            Intent::Transfer(transfer) => vec![transfer.to.clone()],
            Intent::Hold(hold) => vec![hold.to.clone()],
            Intent::Capture(capture) => self.hold_receiver(&capture.hold_id).into_iter().collect(),
            Intent::Transaction(transaction) => transaction
                .postings
                .iter()
                .flat_map(|posting| [posting.from.clone(), posting.to.clone()])
                .collect(),
            Intent::Account(_) | Intent::Release(..) => Vec::new(),
        };
        named.retain(|id| id != self.id());
        named.sort();
        named.dedup();
        named
    }

    /// The receiver of this account's open hold `hold_id`, if it has that hold.
    fn hold_receiver(&self, hold_id: &domain::TransferId) -> Option<AccountId> {
        self.known
            .state
            .account()
            .and_then(|account| account.holds.get(hold_id))
            .map(|hold| hold.to.clone())
    }

    /// Brings `others` to the accounts `intent` names besides this one, loading (together) the
    /// ones not known yet; once a refusal is being verified, from the stream leader.
    async fn gather_others(
        &self,
        intent: &Intent,
        others: &mut BTreeMap<AccountId, Known>,
        verified_current: bool,
    ) -> Result<()> {
        let named = self.others_named(intent);
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

    /// Where a command's decision is made: the domain decides on this account's state and the
    /// others' (`others`), and the result becomes a [`Plan`]: the messages to append and the
    /// answer they give, as data.
    fn decide_plan(
        &self,
        intent: &Intent,
        others: &BTreeMap<AccountId, Known>,
        metadata: &EventMetadata,
        now: i64,
    ) -> Result<Plan> {
        let other = |id: &AccountId| {
            others
                .get(id)
                .cloned()
                .unwrap_or_else(|| Known::new(id.clone()))
        };
        match intent {
            Intent::Account(command) => decide(&self.known.state, command)
                .map_err(Error::from)
                .and_then(|events| self.plan_account(events, metadata)),
            Intent::Transfer(transfer) => {
                let to = other(&transfer.to);
                decide_transfer(&self.known.state, &to.state, transfer)
                    .map_err(Error::from)
                    .and_then(|events| self.plan_transfer(transfer, &to, events, metadata))
            }
            Intent::Hold(hold) => {
                let to = other(&hold.to);
                decide_hold(&self.known.state, &to.state, hold, now)
                    .map_err(Error::from)
                    .and_then(|event| self.plan_hold(hold, event, metadata))
            }
            Intent::Capture(capture) => {
                let to = self
                    .hold_receiver(&capture.hold_id)
                    .map_or_else(|| Known::new(self.id().clone()), |id| other(&id));
                decide_capture(&self.known.state, &to.state, capture, now)
                    .map_err(Error::from)
                    .and_then(|events| self.plan_capture(&capture.hold_id, &to, events, metadata))
            }
            Intent::Release(hold_id, release) => {
                decide_release(&self.known.state, hold_id, *release, now)
                    .map_err(Error::from)
                    .and_then(|event| self.plan_release(hold_id, *release, event, metadata))
            }
            Intent::Transaction(transaction) => {
                let state_of = |id: &AccountId| {
                    if id == self.id() {
                        Some(&self.known.state)
                    } else {
                        others.get(id).map(|known| &known.state)
                    }
                };
                decide_transaction(state_of, transaction)
                    .map_err(Error::PostingRejected)
                    .and_then(|events| self.plan_transaction(transaction, events, others, metadata))
            }
        }
    }

    /// A transaction or reversal: one `transaction_posted` per touched account, each guarded by
    /// its account's last position, then the claim of its id (which also records what it moved,
    /// for a reversal to read) and, for a reversal, the claim that the original is reversed.
    /// The answer is the last part's position: a reader that shows it shows every part.
    fn plan_transaction(
        &self,
        transaction: &Transaction,
        events: Vec<(AccountId, Event)>,
        others: &BTreeMap<AccountId, Known>,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let mut entries = Vec::with_capacity(events.len() + 2);
        let mut changes = Vec::with_capacity(events.len());
        for (index, (account, event)) in events.into_iter().enumerate() {
            let known = if &account == self.id() {
                &self.known
            } else {
                others.get(&account).ok_or_else(|| {
                    Error::Internal(format!("{account} was decided on but not loaded"))
                })?
            };
            let chain =
                eventlog::chain::next(&known.chain, &account, &event).map_err(Error::from)?;
            let mut after = known.clone();
            after.apply(&event, 0, chain.clone());
            entries.push(Entry::Event {
                account,
                expected_last_position: known.position,
                event,
                metadata: metadata.clone(),
                chain,
            });
            changes.push((after, index));
        }
        let answer_index = entries
            .len()
            .checked_sub(1)
            .ok_or_else(|| Error::Internal("a transaction decided no event".into()))?;
        entries.push(Entry::Marker {
            subject: eventlog::subject::transfer_marker(&transaction.transaction_id),
            payload: TransactionRecord::new(transaction, 1).encode()?,
            ttl: None,
        });
        if let Some(original) = &transaction.reverses {
            entries.push(Entry::Marker {
                subject: eventlog::subject::reversal_marker(original),
                payload: ReversalRecord {
                    reversal_id: transaction.transaction_id.to_string(),
                }
                .encode()?,
                ttl: None,
            });
        }
        Ok(Plan {
            entries,
            outcome: Outcome::TransactionCompleted {
                transaction_id: transaction.transaction_id.clone(),
                reverses: transaction.reverses.clone(),
                position: 0,
            },
            answer_index,
            changes,
            expiry: None,
        })
    }

    /// The events and the answer of a single event on this account, with `markers` after it.
    fn plan_single(
        &self,
        event: Event,
        outcome: Outcome,
        markers: Vec<Entry>,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let chain =
            eventlog::chain::next(&self.known.chain, self.id(), &event).map_err(Error::from)?;
        let mut after = self.known.clone();
        after.apply(&event, 0, chain.clone());
        let mut entries = vec![Entry::Event {
            account: self.id().clone(),
            expected_last_position: self.known.position,
            event,
            metadata: metadata.clone(),
            chain,
        }];
        entries.extend(markers);
        Ok(Plan {
            entries,
            outcome,
            answer_index: 0,
            changes: vec![(after, 0)],
            expiry: None,
        })
    }

    /// A hold: `hold_placed` and the claim of its id (a marker in the transfer-id namespace) in
    /// one batch, and its expiry, scheduled in the schedules stream *before* the batch is
    /// appended: a placed hold always has an expiry (a schedule for a hold that was then refused
    /// finds nothing to expire).
    fn plan_hold(
        &self,
        hold: &domain::PlaceHold,
        event: Event,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let Event::HoldPlaced { expires_at, .. } = &event else {
            return Err(Error::Internal("decide_hold yielded another event".into()));
        };
        let expires_at = *expires_at;
        let at = time::OffsetDateTime::from_unix_timestamp(expires_at)
            .map_err(|error| Error::Internal(error.to_string()))?;
        let markers = vec![Entry::Marker {
            subject: eventlog::subject::transfer_marker(&hold.hold_id),
            payload: TransferRecord::for_hold(self.id(), hold, expires_at, 1).encode()?,
            ttl: None,
        }];
        let outcome = Outcome::HoldPlaced {
            hold_id: hold.hold_id.clone(),
            expires_at,
            position: 0,
        };
        let mut plan = self.plan_single(event, outcome, markers, metadata)?;
        plan.expiry = Some(Expiry {
            schedule: eventlog::subject::hold_expiry_schedule(self.id(), &hold.hold_id, expires_at),
            due: eventlog::subject::hold_expiry_due(self.id(), &hold.hold_id),
            at,
        });
        Ok(plan)
    }

    /// A capture: `hold_captured` here, `transfer_credited` on the receiver, and the hold's
    /// settlement marker, together: a hold settles once.
    fn plan_capture(
        &self,
        hold_id: &domain::TransferId,
        to: &Known,
        events: TransferEvents,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let Event::HoldCaptured { amount, .. } = &events.debit else {
            return Err(Error::Internal(
                "decide_capture yielded another event".into(),
            ));
        };
        let outcome = Outcome::HoldCaptured {
            hold_id: hold_id.clone(),
            amount: amount.minor_units(),
            position: 0,
        };
        let settled = Entry::Marker {
            subject: idempotency::settlement_marker(hold_id),
            payload: Vec::new(),
            ttl: None,
        };
        self.plan_pair(to, events, settled, outcome, metadata)
    }

    /// A void or an expiry: one event on this account. No marker is needed: every settlement of
    /// a hold is an event of this same account, so its concurrency check lets only one of them
    /// commit; a single event is also a plain publish, much cheaper than a batch, which matters
    /// when many holds come due at once.
    fn plan_release(
        &self,
        hold_id: &domain::TransferId,
        release: Release,
        event: Event,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let outcome = Outcome::HoldReleased {
            hold_id: hold_id.clone(),
            status: match release {
                Release::Void => "voided",
                Release::Expire => "expired",
            },
            position: 0,
        };
        self.plan_single(event, outcome, Vec::new(), metadata)
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

    fn plan_account(&self, events: Vec<Event>, metadata: &EventMetadata) -> Result<Plan> {
        let Some(event) = events.into_iter().next() else {
            return Err(Error::Internal("decide yielded no event".into()));
        };
        let account_id = self.id().clone();
        let outcome = match &event {
            Event::AccountOpened(_) => Outcome::Opened {
                account_id,
                position: 0,
            },
            Event::AccountClosed => Outcome::Closed {
                account_id,
                position: 0,
            },
            _ => {
                let mut after = self.known.state.clone();
                evolve(&mut after, &event);
                Outcome::BalanceChanged {
                    account_id,
                    balance: after.balance(),
                    position: 0,
                }
            }
        };
        self.plan_single(event, outcome, Vec::new(), metadata)
    }

    fn plan_transfer(
        &self,
        transfer: &Transfer,
        to: &Known,
        events: TransferEvents,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        // The marker follows the credit directly: the answer is one position before it.
        let claim = Entry::Marker {
            subject: eventlog::subject::transfer_marker(&transfer.transfer_id),
            payload: TransferRecord::new(self.id(), transfer, 1).encode()?,
            ttl: None,
        };
        let outcome = Outcome::TransferCompleted {
            transfer_id: transfer.transfer_id.clone(),
            position: 0,
        };
        self.plan_pair(to, events, claim, outcome, metadata)
    }

    /// Money leaving this account and arriving on `to`, then `marker`: the answer is the
    /// credit's position, so a reader that shows it shows both sides.
    fn plan_pair(
        &self,
        to: &Known,
        events: TransferEvents,
        marker: Entry,
        outcome: Outcome,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let debit_chain = eventlog::chain::next(&self.known.chain, self.id(), &events.debit)
            .map_err(Error::from)?;
        let credit_chain =
            eventlog::chain::next(&to.chain, to.state.id(), &events.credit).map_err(Error::from)?;
        let mut sender_after = self.known.clone();
        sender_after.apply(&events.debit, 0, debit_chain.clone());
        let mut receiver_after = to.clone();
        receiver_after.apply(&events.credit, 0, credit_chain.clone());
        let entries = vec![
            Entry::Event {
                account: self.id().clone(),
                expected_last_position: self.known.position,
                event: events.debit,
                metadata: metadata.clone(),
                chain: debit_chain,
            },
            Entry::Event {
                account: to.state.id().clone(),
                expected_last_position: to.position,
                event: events.credit,
                metadata: metadata.clone(),
                chain: credit_chain,
            },
            marker,
        ];
        Ok(Plan {
            entries,
            outcome,
            answer_index: 1,
            changes: vec![(sender_after, 0), (receiver_after, 1)],
            expiry: None,
        })
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
            ttl: Some(KEY_RETENTION),
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

/// `known` brought up to the account's last event as a direct get (any replica) sees it.
async fn load(log: &EventLog, known: Known) -> Result<Known> {
    load_counting(log, known).await.map(|(known, _)| known)
}

/// `known` brought up to the account's last event, with how many events that applied.
async fn load_counting(log: &EventLog, mut known: Known) -> Result<(Known, u64)> {
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
async fn start_from_snapshot(context: &ActorContext, account: &AccountId) -> Known {
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
async fn fresh_from_leader(log: &EventLog, known: Known) -> Result<Known> {
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

/// Pause before retry `attempt` (0-based) of a flow that lost a race: a random part of up to
/// 250 us more per attempt, capped at 16 ms, jittered from the clock's nanoseconds (a retry
/// needs spreading, not randomness of any quality).
async fn backoff(attempt: usize) {
    let ceiling_micros = (250 * (attempt as u64 + 1)).min(16_000);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn known(id: &str, position: u64) -> Known {
        Known {
            position,
            ..Known::new(AccountId::parse(id).unwrap())
        }
    }

    #[test]
    fn shared_states_keep_the_newest_and_stay_bounded() {
        let states = AccountStates::default();
        states.publish(&known("a", 5));
        states.offer(&known("a", 3));
        assert_eq!(
            states
                .get(&AccountId::parse("a").unwrap())
                .unwrap()
                .position,
            5
        );
        states.offer(&known("a", 9));
        assert_eq!(
            states
                .get(&AccountId::parse("a").unwrap())
                .unwrap()
                .position,
            9
        );
        // A retired actor's state stays, as a cached one, and a newer cached one wins later.
        states.retire(&AccountId::parse("a").unwrap());
        assert_eq!((states.live(), states.cached()), (0, 1));
        states.offer(&known("a", 12));
        states.publish(&known("a", 10));
        assert_eq!(
            states
                .get(&AccountId::parse("a").unwrap())
                .unwrap()
                .position,
            12
        );
        assert_eq!((states.live(), states.cached()), (1, 0));
        // Receivers without an actor are cached, oldest out first.
        for index in 0..CACHED_STATES_MAX + 10 {
            states.offer(&known(&format!("r{index}"), 1));
        }
        assert_eq!(states.cached(), CACHED_STATES_MAX);
        assert!(states.get(&AccountId::parse("r0").unwrap()).is_none());
        assert!(states
            .get(&AccountId::parse(&format!("r{}", CACHED_STATES_MAX + 9)).unwrap())
            .is_some());
    }
}
