//! The registry of account actors: spawns one on first use, caps how many live at once (the
//! least recently used idle one is stopped first), stops idle ones, and, through a supervisor
//! actor, forgets actors that crashed so the next command starts a fresh one that reloads from
//! the stream.
//!
//! Every command gets a deadline ([`RegistrySettings::call_timeout`] from now). The actor never
//! starts it after that, and the caller waits a little longer ([`ANSWER_GRACE`]) for an append
//! sent just before it, then answers `outcome_unknown`. A command counts against its account's
//! bound from being queued until its actor is done with it, however its caller fares, and only
//! actors with nothing queued are stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use domain::AccountId;
use ractor::{
    rpc::CallResult, Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent,
};

use crate::actor::{AccountActor, AccountMessage, ActorArguments, ActorContext, Queued};
use crate::outcome::Outcome;
use crate::request::CommandRequest;
use crate::{Error, Result};

/// Limits of the actor population.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Most account actors alive at once. Default 10 000: about 13 KiB each with a short
    /// history (measured, docs/benchmarks.md), so about 130 MiB at the cap, which keeps a
    /// writer touching any number of accounts under 300 MiB.
    pub actors_live_max: usize,
    /// An actor unused this long is stopped. Default 5 minutes.
    pub idle_timeout: Duration,
    /// Commands queued for one account beyond this are refused with 503, so one hot account
    /// cannot take all memory. Default 1 000.
    pub mailbox_capacity: usize,
    /// A command's deadline, from when it is queued: the actor does not start it, or send
    /// anything for it, later. Default 10 s: room for a queue, a history load and an append.
    pub call_timeout: Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            actors_live_max: 10_000,
            idle_timeout: Duration::from_secs(300),
            mailbox_capacity: 1_000,
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// Eviction at the live cap makes room for this fraction of the cap at once.
const EVICTION_HEADROOM_FRACTION: usize = 20;

/// How long past a command's deadline its caller still waits for the answer: an append sent
/// just before the deadline is answered within the acknowledgement timeout.
pub const ANSWER_GRACE: Duration =
    Duration::from_millis(eventlog::log::ACK_TIMEOUT.as_millis() as u64 + 500);
/// Time kept after a command's deadline and grace for its answer to reach the client: more than
/// the one liveness question a hand-over may still ask after its deadline
/// (`dispatch::LIVENESS_TIMEOUT`).
pub const ANSWER_MARGIN: Duration = Duration::from_secs(2);

struct Entry {
    actor: ActorRef<AccountMessage>,
    last_used: Instant,
    /// Commands queued and not yet finished by the actor: the mailbox depth.
    queued: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Population {
    by_account: HashMap<AccountId, Entry>,
    by_actor: HashMap<ActorId, AccountId>,
}

impl Population {
    fn forget_actor(&mut self, actor: ActorId) -> bool {
        let Some(account) = self.by_actor.remove(&actor) else {
            return false;
        };
        let same = self
            .by_account
            .get(&account)
            .is_some_and(|entry| entry.actor.get_id() == actor);
        if same {
            self.by_account.remove(&account);
        }
        true
    }
}

/// Handle to the account actors. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    population: Arc<Mutex<Population>>,
    context: Arc<ActorContext>,
    supervisor: ActorRef<()>,
    settings: RegistrySettings,
}

impl Registry {
    /// The event log the actors append to (and its signing and trusted keys).
    pub fn log(&self) -> &eventlog::EventLog {
        &self.context.log
    }

    pub async fn start(context: Arc<ActorContext>, settings: RegistrySettings) -> Result<Self> {
        let population = Arc::new(Mutex::new(Population::default()));
        let (supervisor, _) = Actor::spawn(
            None,
            Supervisor,
            SupervisorState {
                population: population.clone(),
                context: context.clone(),
            },
        )
        .await
        .map_err(|error| Error::Internal(format!("spawn supervisor: {error}")))?;
        let registry = Self {
            population,
            context,
            supervisor,
            settings,
        };
        registry.spawn_idle_sweeper();
        Ok(registry)
    }

    fn lock(&self) -> MutexGuard<'_, Population> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way that
        // matters (worst case an entry for a dead actor, which the call path replaces).
        self.population
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A command's deadline when it arrives now.
    pub fn call_timeout(&self) -> Duration {
        self.settings.call_timeout
    }

    /// When a command taken at `taken_at` has been answered at the latest: its outcome, or
    /// `outcome_unknown` once its deadline and grace have passed.
    pub fn answered_by(&self, taken_at: tokio::time::Instant) -> tokio::time::Instant {
        taken_at + self.settings.call_timeout + ANSWER_GRACE + ANSWER_MARGIN
    }

    /// Runs a command on its account's actor, with the deadline of a command arriving now.
    pub async fn execute(&self, request: CommandRequest) -> Result<Outcome> {
        let deadline = tokio::time::Instant::now() + self.settings.call_timeout;
        self.execute_until(request, deadline).await
    }

    /// Runs a command on its account's actor; nothing is started or sent for it after
    /// `deadline` (a command handed over by another writer brings its caller's).
    pub async fn execute_until(
        &self,
        mut request: CommandRequest,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome> {
        let started = Instant::now();
        let account = request.account_id.clone();
        request.deadline = Some(deadline);
        let (actor, queued) = self.acquire(&account).await?;
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now()) + ANSWER_GRACE;
        let result = actor
            .call(
                |reply| AccountMessage::Execute {
                    request: Box::new(request),
                    reply,
                    queued,
                    sent: tokio::time::Instant::now(),
                },
                Some(wait),
            )
            .await;
        let answer = match result {
            Ok(CallResult::Success(answer)) => answer,
            Ok(CallResult::Timeout) => Err(Error::OutcomeUnknown(format!(
                "account {account} did not answer within {wait:?}"
            ))),
            // The actor died while holding the command: it may have appended before dying.
            Ok(CallResult::SenderError) | Err(_) => Err(Error::OutcomeUnknown(format!(
                "account {account} actor stopped while handling the command"
            ))),
        };
        let metrics = &self.context.metrics;
        metrics
            .command_duration
            .observe(started.elapsed().as_secs_f64());
        match &answer {
            Ok(_) => {
                metrics.commands_succeeded.inc();
            }
            // Not an answer: the dispatcher hands the command over, and its owner counts it.
            Err(Error::Contended(_)) => {}
            Err(error) if error.problem().status < 500 => {
                metrics.commands_refused.inc();
            }
            Err(_) => {
                metrics.commands_failed.inc();
            }
        }
        answer
    }

    /// The actor for `account`, spawning it if needed, with its mailbox slot taken.
    async fn acquire(&self, account: &AccountId) -> Result<(ActorRef<AccountMessage>, Queued)> {
        if let Some(taken) = self.take_existing(account)? {
            return Ok(taken);
        }
        let (actor, _) = Actor::spawn_linked(
            None,
            AccountActor,
            ActorArguments {
                context: self.context.clone(),
                account_id: account.clone(),
            },
            self.supervisor.get_cell(),
        )
        .await
        .map_err(|error| Error::Internal(format!("spawn account actor: {error}")))?;
        let mut population = self.lock();
        // Another caller may have spawned one meanwhile: keep theirs, stop ours.
        if let Some(entry) = population.by_account.get_mut(account) {
            actor.stop(None);
            return self.take_slot(account, entry);
        }
        let queued = Arc::new(AtomicUsize::new(1));
        population.by_actor.insert(actor.get_id(), account.clone());
        population.by_account.insert(
            account.clone(),
            Entry {
                actor: actor.clone(),
                last_used: Instant::now(),
                queued: queued.clone(),
            },
        );
        self.context.metrics.actors_started.inc();
        self.context
            .metrics
            .actors_live
            .set(population.by_account.len() as i64);
        self.evict_over_cap(&mut population);
        Ok((actor, Queued(queued)))
    }

    fn take_existing(
        &self,
        account: &AccountId,
    ) -> Result<Option<(ActorRef<AccountMessage>, Queued)>> {
        let mut population = self.lock();
        match population.by_account.get_mut(account) {
            Some(entry) => self.take_slot(account, entry).map(Some),
            None => Ok(None),
        }
    }

    /// Takes a mailbox slot on a live actor, or refuses when its mailbox is full. Called under
    /// the population lock, which passivation also takes: an actor with a slot taken is never
    /// stopped.
    fn take_slot(
        &self,
        account: &AccountId,
        entry: &mut Entry,
    ) -> Result<(ActorRef<AccountMessage>, Queued)> {
        if entry.queued.load(Ordering::Acquire) >= self.settings.mailbox_capacity {
            return Err(Error::Unavailable(format!(
                "account {account} has {} commands queued; retry later",
                self.settings.mailbox_capacity
            )));
        }
        entry.last_used = Instant::now();
        entry.queued.fetch_add(1, Ordering::AcqRel);
        Ok((entry.actor.clone(), Queued(entry.queued.clone())))
    }

    /// Stops least recently used idle actors until the population is within the cap, and a
    /// twentieth of the cap more: finding them walks every actor under the population lock, so
    /// it is done once per that many new actors, not once per new actor (measured: per-spawn
    /// eviction at a cap of 10 000 held the lock for most of each command).
    fn evict_over_cap(&self, population: &mut Population) {
        let excess = population
            .by_account
            .len()
            .saturating_sub(self.settings.actors_live_max);
        if excess == 0 {
            return;
        }
        let target = excess + self.settings.actors_live_max / EVICTION_HEADROOM_FRACTION;
        let mut idle: Vec<(Instant, AccountId)> = population
            .by_account
            .iter()
            .filter(|(_, entry)| entry.queued.load(Ordering::Acquire) == 0)
            .map(|(account, entry)| (entry.last_used, account.clone()))
            .collect();
        if idle.len() > target {
            idle.select_nth_unstable_by_key(target, |(last_used, _)| *last_used);
            idle.truncate(target);
        }
        for (_, account) in idle {
            self.passivate(population, &account);
        }
    }

    /// Stops an actor with nothing queued. It is removed from the population first, so no new
    /// command reaches it; `drain` lets it finish anything already in its mailbox regardless.
    fn passivate(&self, population: &mut Population, account: &AccountId) {
        if let Some(entry) = population.by_account.remove(account) {
            population.by_actor.remove(&entry.actor.get_id());
            if let Err(error) = entry.actor.drain() {
                tracing::debug!(%account, %error, "passivating an actor that is already stopping");
            }
            self.context.metrics.actors_passivated.inc();
            self.context
                .metrics
                .actors_live
                .set(population.by_account.len() as i64);
        }
    }

    fn spawn_idle_sweeper(&self) {
        let registry = self.clone();
        let period = (self.settings.idle_timeout / 2).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            loop {
                ticker.tick().await;
                if registry.supervisor.get_status() != ractor::ActorStatus::Running {
                    return;
                }
                registry.sweep_idle();
            }
        });
    }

    fn sweep_idle(&self) {
        let mut population = self.lock();
        let now = Instant::now();
        let idle: Vec<AccountId> = population
            .by_account
            .iter()
            .filter(|(_, entry)| {
                entry.queued.load(Ordering::Acquire) == 0
                    && now.duration_since(entry.last_used) >= self.settings.idle_timeout
            })
            .map(|(account, _)| account.clone())
            .collect();
        for account in idle {
            self.passivate(&mut population, &account);
        }
    }

    /// Number of live account actors.
    pub fn live_actors(&self) -> usize {
        self.lock().by_account.len()
    }

    /// Kills an account's actor as a crash would, without cleanup. Operators use it to force a
    /// reload from the stream; tests use it to check that a crash loses nothing acknowledged.
    pub fn kill_actor(&self, account: &AccountId) -> bool {
        let population = self.lock();
        match population.by_account.get(account) {
            Some(entry) => {
                entry.actor.kill();
                true
            }
            None => false,
        }
    }

    /// Stops every actor (at shutdown, after in-flight commands have been answered).
    pub fn stop(&self) {
        self.supervisor.stop_children(None);
        self.supervisor.stop(None);
    }
}

/// Parent of all account actors: removes the ones that end, so the next command for that
/// account spawns a fresh actor which rebuilds from the stream.
struct Supervisor;

struct SupervisorState {
    population: Arc<Mutex<Population>>,
    context: Arc<ActorContext>,
}

impl Actor for Supervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = SupervisorState;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        state: SupervisorState,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failed): (ActorCell, bool) = match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, false),
            SupervisionEvent::ActorFailed(cell, error) => {
                tracing::error!(actor = %cell.get_id(), %error, "account actor crashed");
                (cell, true)
            }
            _ => return Ok(()),
        };
        let mut population = state
            .population
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let removed = population.forget_actor(cell.get_id());
        if failed || removed {
            if failed {
                state.context.metrics.actors_failed.inc();
            }
            state
                .context
                .metrics
                .actors_live
                .set(population.by_account.len() as i64);
        }
        Ok(())
    }
}
