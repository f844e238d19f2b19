//! The projection engine: a durable JetStream pull consumer feeds bounded batches of events to a
//! [`Projector`], whose changes are written to redb in ONE transaction together with the last
//! applied stream position. Messages are acknowledged only after the commit. While one batch
//! commits, the next is gathered and decoded; it begins once the one before it committed and
//! was acknowledged.
//!
//! # Exactly once
//! Every delivery at or below the stored position is skipped, so a redelivery after a lost ack
//! applies nothing twice. On (re)start the durable consumer is reused only if it continues
//! exactly after the stored position; if it is gone, ahead of the view (the redb file was
//! restored from a backup, say), or still holds deliveries to a process that died between commit
//! and ack, it is re-created to deliver from the stored position + 1.
//!
//! # Only events, and no gaps
//! The consumer filters `coffer.events.>`: the stream also holds markers (idempotency keys,
//! transfer ids) that some of them expire, so the positions a view applies are not contiguous.
//! What is contiguous is the consumer's own delivery sequence: a delivery that skips one means a
//! message was lost in flight, and the batch stops before it (acking past it would acknowledge it
//! unapplied); the consumer is then re-created from the stored position.
//!
//! # A view ahead of its stream
//! If the stream ends before the stored position (it was re-created, or restored from an older
//! backup), the view stops with a clear error instead of consuming: new events would reuse
//! positions the view already applied. Rebuild the view (`coffer projection rebuild`) after such a restore.
//! A stream that was re-created and has since grown past the view's position is caught by its
//! creation time, stored with the checkpoint: the view stops the same way.
//!
//! # Unreadable messages
//! A message of the event stream that cannot be read as an event (malformed, which anyone with
//! the writer's credential can append, or of a newer version than this build) costs its
//! account, not the view: it is handed to [`Projector::unreadable`] in its place, in the same
//! transaction and in stream order, the checkpoint moves past it, and
//! `coffer_projection_decode_failures_total` counts it. The views then refuse to serve that
//! account (skipping would make its balance wrong); every other account is served as before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use eventlog::log::decode_stored;
use eventlog::{EventLog, RecordedEvent};
use futures::{FutureExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use redb::{Database, TableDefinition, WriteTransaction};
use time::OffsetDateTime;
use tokio::sync::watch;

/// Where the engine records the last applied stream position, in the same file as the views.
const CHECKPOINT: TableDefinition<&str, u64> = TableDefinition::new("checkpoint");
const CHECKPOINT_KEY: &str = "applied_position";
/// The creation time (Unix nanoseconds) of the stream the view was built from: a stream deleted
/// and created again is another log, whatever its positions say.
const STREAM_CREATED_KEY: &str = "stream_created_unix_ns";

/// Largest batch the server sends per pull, in events.
pub const BATCH_SIZE_MAX: usize = 1_000;
/// Largest batch applied in one transaction, in events: bounds memory and commit latency.
/// While the consumer says more events are pending (a catch-up), deliveries are gathered up to
/// this many: redb is copy-on-write, so a commit rewrites every page it touched, and a
/// transaction of many pulls touches each statement page once instead of once per pull
/// (measured: catch-up 0.25x -> 0.63x a raw consume, docs/benchmarks.md). Two of them fit under
/// the consumer's [`MAX_ACK_PENDING`]: the next batch is gathered while one commits.
pub const TRANSACTION_EVENTS_MAX: usize = 19_000;
/// Bytes of deliveries (subjects, headers, payloads) one transaction takes at most: with the
/// one committing and the pulls buffered, it bounds a reader's memory whatever the messages'
/// size (a writer credential can append messages of the server's largest size, and 19 000 of
/// those would not fit). Ordinary events are a few hundred bytes: catch-ups still gather
/// [`TRANSACTION_EVENTS_MAX`] events.
pub const TRANSACTION_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Deliveries the server lets the consumer have unacknowledged: a committing transaction, the
/// one being gathered behind it, and a pull in flight. A consumer made with less is re-created.
pub const MAX_ACK_PENDING: i64 = 2 * TRANSACTION_EVENTS_MAX as i64 + 2 * BATCH_SIZE_MAX as i64;
/// How long a catch-up waits for the next delivery before committing what it gathered.
const GATHER_WAIT: Duration = Duration::from_millis(20);
/// Pulls received ahead of the batch being gathered (the consumer's `max_ack_pending` bounds
/// them anyway).
const CHUNKS_BUFFERED: usize = MAX_ACK_PENDING as usize / BATCH_SIZE_MAX + 4;
/// Largest batch the server sends per pull, in bytes.
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// How long the server waits for a batch's acknowledgement before delivering it again.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// How long a pull waits at the server for messages (the pull stream's `expires`).
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// How often a running view checks that its consumer still delivers every event (the reader
/// role may update its consumers; a changed filter would skip events silently).
const CONSUMER_CHECK_PERIOD: Duration = Duration::from_secs(2);
/// Pause before re-creating the consumer after NATS trouble.
const RETRY_DELAY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("view storage: {0}")]
    Storage(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("event at position {position} cannot be decoded: {message}")]
    Poison { position: u64, message: String },
    /// The view has applied positions the stream does not hold (the stream was re-created or
    /// restored from an older backup). Consuming on would assign new events to old positions.
    #[error("the view has applied position {applied} but the stream ends at {stream_last}; rebuild the view")]
    AheadOfStream { applied: u64, stream_last: u64 },
    /// The stream was created after the view's stream (deleted and created again, or another
    /// stream of the same name): its positions mean other events.
    #[error("the view was built from a stream created at {stored} (Unix ns), this one was created at {current}; rebuild the view")]
    StreamReplaced { stored: u64, current: u64 },
    /// The view did not get every event: its consumer was changed while it ran (another
    /// filter, say), or an account's event was never delivered. Views built on that are wrong.
    #[error("{0}; rebuild the view")]
    Incomplete(String),
    /// [`ApplyError::Missed`], before the engine asked the stream about it.
    #[error("{0}")]
    Missed(ApplyError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An account event that a later event of the account was checked against but that the views
/// never applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub account: String,
    pub missing: u64,
    /// The stream no longer holds it (a per-message TTL); otherwise it holds a message there the
    /// views could not place as an event of the account.
    pub erased: bool,
}

/// Why a [`Projector`] could not apply a batch.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The views' storage failed: the file is reopened and the batch applied again.
    #[error("{0}")]
    Storage(#[from] redb::Error),
    /// An event's append was checked against an event of its account at `previous` that the
    /// views never applied (they have the account up to `applied`). Either the view's feed
    /// skipped it (the view must stop) or the stream no longer holds it (erased: the account's
    /// history has a gap); the engine asks the stream which.
    #[error("the event at position {position} of account {account} follows its event at position {previous}, which the view never received (it has applied up to {applied} for that account)")]
    Missed {
        account: String,
        position: u64,
        previous: u64,
        applied: u64,
    },
}

impl From<redb::TableError> for ApplyError {
    fn from(error: redb::TableError) -> Self {
        Self::Storage(error.into())
    }
}

impl From<redb::StorageError> for ApplyError {
    fn from(error: redb::StorageError) -> Self {
        Self::Storage(error.into())
    }
}

fn storage(error: impl std::fmt::Display) -> Error {
    Error::Storage(error.to_string())
}

/// A set of views kept in redb. `apply` is called inside the batch's write transaction; the
/// views' own logic should be pure functions of the old rows and the event.
pub trait Projector: Send + Sync + 'static {
    /// Creates the tables, so readers never meet a missing one.
    fn initialize(&self, transaction: &WriteTransaction) -> Result<(), redb::Error>;
    /// Applies a batch of events in stream order.
    fn apply(
        &self,
        transaction: &WriteTransaction,
        events: &[RecordedEvent],
    ) -> Result<(), ApplyError>;
    /// Records a message that cannot be read as an event, where it stands in stream order
    /// (after the events applied before it in this transaction).
    fn unreadable(
        &self,
        transaction: &WriteTransaction,
        message: &eventlog::Unreadable,
    ) -> Result<(), ApplyError>;
    /// Records that the account's event at `gap.missing` was never applied here though a later
    /// event was checked against it: the account's history, as the views have it, has a gap. Called before the batch's
    /// events, in the same transaction; the views then refuse that account as for an
    /// unreadable message, and must not report it as [`ApplyError::Missed`] again.
    fn history_gap(&self, transaction: &WriteTransaction, gap: &Gap) -> Result<(), ApplyError>;
}

/// Health and metrics of a running view.
pub struct ViewHealth {
    /// Why the view stopped, if it did.
    pub failure: Mutex<Option<String>>,
    /// The consumer is set up and pulling.
    pub consuming: AtomicBool,
    /// Events the consumer had to deliver when this process first set it up: what "caught up
    /// with the stream as seen at start" means. Counted in events (the filter leaves markers
    /// out), so the lag readiness allows is a number of events.
    pub pending_at_start: AtomicU64,
    /// Whether `pending_at_start` is known (the consumer was set up once).
    pub start_known: AtomicBool,
    pub events_applied: Counter,
    pub batches_committed: Counter,
    pub decode_failures: Counter,
    /// Times the view found its consumer changed by someone else while it ran.
    pub consumer_changes: Counter,
    /// Accounts whose history was found to have an event erased from the stream.
    pub history_gaps: Counter,
    pub redeliveries_skipped: Counter,
    pub consumer_recreations: Counter,
    /// Events in the stream not yet applied, as the server reported with the last delivery.
    pub lag: Gauge,
    /// Whether `lag` was reported with a batch settled (committed and acknowledged).
    pub lag_known: AtomicBool,
    /// While events are pending: the age of the newest applied event, in seconds (how far
    /// behind the view may be, at most); 0 when caught up.
    pub lag_seconds: Gauge<f64, AtomicU64>,
    pub applied_position: AtomicU64,
    /// The view stopped on a storage error: its file must be reopened.
    pub storage_failed: AtomicBool,
}

impl Default for ViewHealth {
    fn default() -> Self {
        Self {
            failure: Mutex::new(None),
            consuming: AtomicBool::new(false),
            pending_at_start: AtomicU64::new(0),
            start_known: AtomicBool::new(false),
            events_applied: Counter::default(),
            batches_committed: Counter::default(),
            decode_failures: Counter::default(),
            consumer_changes: Counter::default(),
            history_gaps: Counter::default(),
            redeliveries_skipped: Counter::default(),
            consumer_recreations: Counter::default(),
            lag: Gauge::default(),
            lag_known: AtomicBool::new(false),
            lag_seconds: Gauge::default(),
            applied_position: AtomicU64::new(0),
            storage_failed: AtomicBool::new(false),
        }
    }
}

impl ViewHealth {
    /// Whether the view has applied all but `lag_max` of the events the stream held beyond it
    /// when this process started consuming, or the server said, with a batch the view then
    /// committed, that at most `lag_max` events were left.
    ///
    /// Counted from what was applied, not from what was delivered: a redelivery (after an ack
    /// wait ran out) is the same event again. The server's word covers what counting cannot:
    /// events erased from the stream (a per-message TTL) before they were delivered were
    /// pending at start and never arrive.
    pub fn caught_up(&self, lag_max: u64) -> bool {
        let applied = self
            .events_applied
            .get()
            .saturating_add(self.decode_failures.get());
        let counted =
            applied.saturating_add(lag_max) >= self.pending_at_start.load(Ordering::Relaxed);
        let told = self.lag_known.load(Ordering::Acquire)
            && u64::try_from(self.lag.get()).is_ok_and(|lag| lag <= lag_max);
        self.start_known.load(Ordering::Acquire) && (counted || told)
    }

    /// Clears a failure once the view runs again (its file reopened).
    pub fn recovered(&self) {
        self.storage_failed.store(false, Ordering::Release);
        *self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }

    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Adds the view's metrics to `registry` (rendered by the service's `/metrics`).
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "coffer_projection_events_applied",
                "Events applied to the views.",
                &self.events_applied,
            ),
            (
                "coffer_projection_batches_committed",
                "redb transactions committed by the projection.",
                &self.batches_committed,
            ),
            (
                "coffer_projection_consumer_changes",
                "Times the view found its consumer changed by someone else while it ran; the view stops.",
                &self.consumer_changes,
            ),
            (
                "coffer_projection_history_gaps",
                "Events the stream no longer holds that a later event of their account was checked against; each makes its account's views unreadable.",
                &self.history_gaps,
            ),
            (
                "coffer_projection_decode_failures",
                "Stored messages that could not be read as events; each makes its account's views unreadable, and the view goes on.",
                &self.decode_failures,
            ),
            (
                "coffer_projection_redeliveries_skipped",
                "Redelivered events at or below the stored position, skipped.",
                &self.redeliveries_skipped,
            ),
            (
                "coffer_projection_consumer_recreations",
                "Times the durable consumer was (re)created from the stored position.",
                &self.consumer_recreations,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "coffer_projection_lag_events",
            "Stream events not yet applied to the views.",
            self.lag.clone(),
        );
        registry.register_with_unit(
            "coffer_projection_lag",
            "While events are pending, the age of the newest applied event; 0 when caught up.",
            Unit::Seconds,
            self.lag_seconds.clone(),
        );
        let applied: Gauge = Gauge::default();
        applied.set(self.applied_position.load(Ordering::Relaxed) as i64);
        registry.register(
            "coffer_projection_applied_position",
            "Last stream position applied to the views.",
            applied,
        );
        let failed: Gauge = Gauge::default();
        failed.set(i64::from(self.failure().is_some()));
        registry.register(
            "coffer_projection_failed",
            "1 when the view stopped on an error.",
            failed,
        );
        let storage_failed: Gauge = Gauge::default();
        storage_failed.set(i64::from(self.storage_failed.load(Ordering::Acquire)));
        registry.register(
            "coffer_projection_storage_failed",
            "1 while the view's file failed a write and is being reopened (a full or failing disk); reads answer 503 meanwhile.",
            storage_failed,
        );
    }
}

/// Runs one set of views on one durable consumer.
pub struct Engine<P: Projector> {
    database: Arc<Database>,
    projector: Arc<P>,
    consumer_name: String,
    applied: watch::Sender<u64>,
    health: Arc<ViewHealth>,
    /// Failpoint for crash tests: abort the process right after this many commits, before the
    /// ack, which is the window exactly-once has to survive.
    crash_after_commits: Option<u64>,
    /// The consumer delivery sequence expected next; set when the consumer is (re)made.
    next_delivery: AtomicU64,
    /// Creation time of the stream the view follows (0: not known yet); stored with each commit.
    stream_created: AtomicU64,
    /// Largest transaction, in events ([`TRANSACTION_EVENTS_MAX`] unless a test lowers it).
    transaction_events_max: usize,
    /// A transaction takes no more deliveries once it holds this many bytes
    /// ([`TRANSACTION_BYTES_MAX`] unless a test lowers it).
    transaction_bytes_max: usize,
}

impl<P: Projector> Engine<P> {
    /// Arms the crash failpoint (see `crash_after_commits`). Only tests set it.
    pub fn crash_after_commits(mut self, commits: Option<u64>) -> Self {
        self.crash_after_commits = commits;
        self
    }

    /// Lowers the largest transaction (at most [`TRANSACTION_EVENTS_MAX`], which the consumer's
    /// room is sized for), so that tests can run a catch-up of many transactions on few events.
    pub fn transaction_events_max(mut self, events: usize) -> Self {
        self.transaction_events_max = events.clamp(1, TRANSACTION_EVENTS_MAX);
        self
    }

    /// Lowers the bytes a transaction takes (at most [`TRANSACTION_BYTES_MAX`]), so that tests
    /// can show the bound with small events.
    pub fn transaction_bytes_max(mut self, bytes: usize) -> Self {
        self.transaction_bytes_max = bytes.clamp(1, TRANSACTION_BYTES_MAX);
        self
    }

    /// Creates the tables if needed and loads the stored position.
    pub fn open(database: Arc<Database>, projector: P, consumer_name: &str) -> Result<Self> {
        let transaction = database.begin_write().map_err(storage)?;
        transaction.open_table(CHECKPOINT).map_err(storage)?;
        projector.initialize(&transaction).map_err(storage)?;
        transaction.commit().map_err(storage)?;
        let position = stored_position(&database)?;
        let stream_created = stored_value(&database, STREAM_CREATED_KEY)?;
        let health = Arc::new(ViewHealth::default());
        health.applied_position.store(position, Ordering::Relaxed);
        let (applied, _) = watch::channel(position);
        Ok(Self {
            database,
            projector: Arc::new(projector),
            consumer_name: consumer_name.to_owned(),
            applied,
            health,
            crash_after_commits: None,
            next_delivery: AtomicU64::new(1),
            stream_created: AtomicU64::new(stream_created),
            transaction_events_max: TRANSACTION_EVENTS_MAX,
            transaction_bytes_max: TRANSACTION_BYTES_MAX,
        })
    }

    /// Reports into `health` instead of a fresh one: an engine restarted on the same view keeps
    /// its counters and its catch-up state.
    pub fn with_health(mut self, health: Arc<ViewHealth>) -> Self {
        health
            .applied_position
            .store(self.position(), Ordering::Relaxed);
        self.health = health;
        self
    }

    /// The applied position, updated after each commit; waiters use it for read-your-writes.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn health(&self) -> Arc<ViewHealth> {
        self.health.clone()
    }

    /// Consumes until `shutdown` turns true or the view fails on a poison event.
    ///
    /// A stop never interrupts a batch: the batch being applied is committed (or fails) before
    /// `run` returns, so whoever opens the file next reads a checkpoint no later commit moves.
    pub async fn run(self, log: EventLog, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            // A panic on the way (decoding, logging, settling) must not leave a view that
            // looks healthy while nothing moves it: it stops the view like a poison event.
            let result = std::panic::AssertUnwindSafe(self.consume(&log, &mut shutdown))
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|message| (*message).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(Error::Poison {
                        position: self.position(),
                        message: format!("the projection panicked: {message}"),
                    })
                });
            self.health.consuming.store(false, Ordering::Relaxed);
            let stopping = *shutdown.borrow();
            // A failure of the view is recorded even when it came with a stop: whoever reopens
            // or swaps the file must see that the last batch did not commit.
            match result {
                Err(Error::Poison { position, message }) => {
                    let failure = format!("view stopped at position {position}: {message}");
                    tracing::error!(consumer = %self.consumer_name, position, %message, "view stopped on an undecodable event");
                    self.fail(failure);
                    return;
                }
                Err(
                    error @ (Error::AheadOfStream { .. }
                    | Error::StreamReplaced { .. }
                    | Error::Incomplete(_)
                    | Error::Missed(_)),
                ) => {
                    tracing::error!(consumer = %self.consumer_name, %error, "view stopped");
                    self.fail(format!("view stopped: {error}"));
                    return;
                }
                Err(Error::Storage(message)) => {
                    // redb refuses every operation after an I/O error until the file is
                    // reopened, which only the owner of the file can do (the reader service).
                    tracing::error!(consumer = %self.consumer_name, %message, "view storage failed; stopping until it is reopened");
                    self.health.storage_failed.store(true, Ordering::Release);
                    self.fail(format!("view storage failed: {message}"));
                    return;
                }
                Err(error) if !stopping => {
                    tracing::warn!(consumer = %self.consumer_name, %error, "projection interrupted; resuming");
                }
                Err(_) | Ok(()) => {}
            }
            if stopping {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_DELAY) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    fn fail(&self, failure: String) {
        *self
            .health
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(failure);
    }

    fn position(&self) -> u64 {
        *self.applied.borrow()
    }

    /// One line per applied event with its trace id, so a write can be followed from the
    /// request to each view: at `info` when the caller asked for the trace to be recorded
    /// (sampled flag), at `debug` otherwise (a catch-up would flood `info`).
    fn log_applied(&self, events: &[RecordedEvent]) {
        let debug = tracing::enabled!(tracing::Level::DEBUG);
        for recorded in events {
            // Parsed once per event.
            let trace = recorded.metadata.trace();
            let sampled = trace.is_some_and(|trace| trace.sampled());
            if sampled || debug {
                let trace_id = trace.map(|trace| trace.trace_id()).unwrap_or_default();
                let (consumer, position) = (&self.consumer_name, recorded.position);
                let (account, event_type) =
                    (recorded.account_id.as_str(), recorded.event.event_type());
                let correlation_id = &recorded.metadata.correlation_id;
                if sampled {
                    // A span of its own, child of the writer's hop, for exported traces.
                    let span = tracing::info_span!("apply", %consumer, position, account, event_type, %trace_id);
                    if let Some(parent) = &trace {
                        trace_context::otel::set_parent(&span, parent);
                    }
                    span.in_scope(|| {
                        tracing::info!(%consumer, position, account, event_type, %trace_id, %correlation_id, "event applied");
                    });
                } else {
                    tracing::debug!(%consumer, position, account, event_type, %trace_id, %correlation_id, "event applied");
                }
            }
        }
    }

    /// Sets up the consumer at the stored position, then applies batches until an error or a
    /// stop (seen only between batches).
    ///
    /// Batches are pipelined: while one commits (on a blocking thread), the next is gathered
    /// and decoded, and it begins only once the one before it committed and was acknowledged.
    /// Whatever ends the loop, the batch in flight is settled (committed or failed) before this
    /// returns, so the stored position and the acknowledgements never lag a commit.
    async fn consume(&self, log: &EventLog, shutdown: &mut watch::Receiver<bool>) -> Result<()> {
        if !log.is_connected() {
            return Err(Error::Nats("not connected".into()));
        }
        // Setting up is only NATS requests: safe to abandon on a stop.
        let (consumer, messages) = tokio::select! {
            set_up = self.set_up(log) => set_up?,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let mut in_flight = None;
        let result = self
            .pipeline(log, consumer, messages, shutdown, &mut in_flight)
            .await;
        let settled = self.settle(log, in_flight).await;
        // Both may have failed (NATS went away while the batch's storage failed): the view's
        // own failure decides what happens next, so it wins over a NATS error.
        match (result, settled) {
            (Err(Error::Nats(_)), Err(failure)) => Err(failure),
            (result, settled) => result.and(settled),
        }
    }

    /// The loop of [`Self::consume`]; leaves the batch it began last in `in_flight`.
    async fn pipeline(
        &self,
        log: &EventLog,
        mut consumer: consumer::PullConsumer,
        messages: consumer::pull::Stream,
        shutdown: &mut watch::Receiver<bool>,
        in_flight: &mut Option<InFlight>,
    ) -> Result<()> {
        // The pull stream only asks the server for more while it is polled: a task of its own
        // keeps it polled while a batch is prepared or settled, up to what the consumer lets
        // be unacknowledged.
        let (chunks, mut batches) = tokio::sync::mpsc::channel(CHUNKS_BUFFERED);
        let receiving = tokio::spawn(async move {
            let mut received = messages.ready_chunks(BATCH_SIZE_MAX);
            while let Some(chunk) = received.next().await {
                if chunks.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        let _receiving = AbortOnDrop(receiving);
        let mut checks = tokio::time::interval(CONSUMER_CHECK_PERIOD);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_delivery = self.next_delivery.load(Ordering::Relaxed);
        // The newest position of the batches prepared so far (committed or in flight): a
        // redelivery at or below it is never applied again.
        let mut prepared_through = self.position();
        // Deliveries received past the last batch's byte budget: they begin the next one.
        let mut leftover: Vec<jetstream::Message> = Vec::new();
        loop {
            let mut batch = Vec::new();
            let mut bytes = 0;
            let mut failed = None;
            if leftover.is_empty() {
                let next = tokio::select! {
                chunk = batches.recv() => Next::Chunk(chunk),
                // A batch whose transaction ended is acknowledged and published at once, not
                // when the next one is ready: the server delivers more once it has the ack,
                // and readers wait for the position.
                    _ = InFlight::transaction_ended(in_flight) => Next::Ended,
                    _ = checks.tick() => Next::Check,
                    _ = shutdown.wait_for(|stop| *stop) => Next::Stop,
                };
                let chunk = match next {
                    Next::Chunk(chunk) => chunk,
                    Next::Ended => {
                        self.settle(log, in_flight.take()).await?;
                        continue;
                    }
                    Next::Check => {
                        self.settle(log, in_flight.take()).await?;
                        self.check_consumer(&mut consumer).await?;
                        continue;
                    }
                    Next::Stop => return Ok(()),
                };
                let Some(chunk) = chunk else {
                    return Err(Error::Nats("message stream ended".into()));
                };
                let mut received = Vec::with_capacity(chunk.len());
                for message in chunk {
                    received.push(message.map_err(|error| Error::Nats(error.to_string()))?);
                }
                leftover = self.within_budget(&mut batch, &mut bytes, received);
            } else {
                let received = std::mem::take(&mut leftover);
                leftover = self.within_budget(&mut batch, &mut bytes, received);
            }
            // Catching up: more deliveries into the same transaction while more are pending,
            // up to a number of events and of bytes.
            while leftover.is_empty()
                && batch.len() < self.transaction_events_max
                && more_pending(&batch)
            {
                let received = tokio::select! {
                    received = tokio::time::timeout(GATHER_WAIT, batches.recv()) => received,
                    _ = InFlight::transaction_ended(in_flight) => {
                        self.settle(log, in_flight.take()).await?;
                        continue;
                    }
                };
                match received {
                    Ok(Some(chunk)) => {
                        let mut messages = Vec::with_capacity(chunk.len());
                        for message in chunk {
                            match message {
                                Ok(message) => messages.push(message),
                                Err(error) => {
                                    failed = Some(Error::Nats(error.to_string()));
                                    break;
                                }
                            }
                        }
                        // What came before a failure is contiguous: it may still be applied.
                        leftover = self.within_budget(&mut batch, &mut bytes, messages);
                        if failed.is_some() {
                            break;
                        }
                    }
                    Ok(None) => {
                        failed = Some(Error::Nats("message stream ended".into()));
                        break;
                    }
                    Err(_) => break,
                }
            }
            // A delivery without its payload would be read as an unreadable message and cost
            // its account for good: if the consumer now delivers headers only (the reader
            // role may update it), nothing of the batch is applied and the consumer is made
            // again. (An appended message may carry the header itself; then it is read as
            // what it is.)
            if batch.iter().any(headers_only_delivery) {
                self.refuse_headers_only(&mut consumer).await?;
            }
            let (prepared, gap) = self.prepare(batch, prepared_through, next_delivery)?;
            next_delivery = prepared.next_delivery;
            prepared_through = prepared
                .newest
                .unwrap_or(prepared_through)
                .max(prepared_through);
            // The batch before this one commits and is acknowledged first; only then this one
            // begins, so transactions and acknowledgements stay in stream order.
            self.settle(log, in_flight.take()).await?;
            let caught_up = prepared.lag.is_none_or(|lag| lag == 0);
            *in_flight = Some(self.begin(prepared));
            // What was received before a failure is applied first (deliveries are contiguous
            // up to it): `consume` settles it.
            if let Some(error) = gap.or(failed) {
                return Err(error);
            }
            // Nothing more to gather behind it: readers wait for this position now.
            if caught_up {
                self.settle(log, in_flight.take()).await?;
            }
        }
    }

    /// Moves `received` into `batch` while the batch is under its byte budget (a delivery
    /// always goes into an empty batch, so every batch makes progress); gives back the rest, in
    /// order, to begin the next batch.
    fn within_budget(
        &self,
        batch: &mut Vec<jetstream::Message>,
        bytes: &mut usize,
        received: Vec<jetstream::Message>,
    ) -> Vec<jetstream::Message> {
        let mut received = received.into_iter();
        for message in received.by_ref() {
            if !batch.is_empty() && *bytes >= self.transaction_bytes_max {
                let mut rest = vec![message];
                rest.extend(received);
                return rest;
            }
            *bytes += delivery_size(&message);
            batch.push(message);
        }
        Vec::new()
    }

    /// Fails when the consumer is no longer the one this engine made: someone with the right to
    /// update it (the reader role may manage its consumers) changed what it delivers.
    async fn check_consumer(&self, consumer: &mut consumer::PullConsumer) -> Result<()> {
        let info = consumer
            .info()
            .await
            .map_err(|error| Error::Nats(error.to_string()))?;
        if as_made(&info.config) {
            return Ok(());
        }
        self.health.consumer_changes.inc();
        let config = &info.config;
        if delivers_every_event(config) {
            // It still delivers every event, only without payloads (never applied), slower or
            // not at all: made again (by the retry, from the stored position), the view goes on.
            tracing::warn!(
                consumer = %self.consumer_name,
                max_ack_pending = config.max_ack_pending,
                ack_wait = ?config.ack_wait,
                rate_limit = config.rate_limit,
                paused = config.pause_until.is_some(),
                headers_only = config.headers_only,
                max_batch = config.max_batch,
                "the view's consumer was changed while it ran; re-creating it"
            );
            return Err(Error::Nats(format!(
                "its consumer {} was changed while the view ran",
                self.consumer_name
            )));
        }
        Err(Error::Incomplete(format!(
            "its consumer {} was changed while the view ran (filter {:?}, filters {:?}, headers \
             only {}, ack policy {:?}): events may have been skipped",
            self.consumer_name,
            config.filter_subject,
            config.filter_subjects,
            config.headers_only,
            config.ack_policy
        )))
    }

    /// Fails (for the consumer to be made again) when the consumer delivers headers only.
    async fn refuse_headers_only(&self, consumer: &mut consumer::PullConsumer) -> Result<()> {
        let info = consumer
            .info()
            .await
            .map_err(|error| Error::Nats(error.to_string()))?;
        if !info.config.headers_only {
            return Ok(());
        }
        self.health.consumer_changes.inc();
        tracing::warn!(consumer = %self.consumer_name, "the view's consumer delivers headers only; re-creating it");
        Err(Error::Nats(format!(
            "its consumer {} delivers headers only",
            self.consumer_name
        )))
    }

    /// The consumer and its message stream, from the stored position.
    async fn set_up(
        &self,
        log: &EventLog,
    ) -> Result<(consumer::PullConsumer, consumer::pull::Stream)> {
        let mut consumer = self.consumer(log).await?;
        if !self.health.start_known.load(Ordering::Acquire) {
            let pending = consumer
                .info()
                .await
                .map_err(|error| Error::Nats(error.to_string()))?
                .num_pending;
            self.health
                .pending_at_start
                .store(pending, Ordering::Relaxed);
            self.health.start_known.store(true, Ordering::Release);
            tracing::info!(consumer = %self.consumer_name, pending, "events to catch up with at start");
        }
        let messages = consumer
            .stream()
            .max_messages_per_batch(BATCH_SIZE_MAX)
            .max_bytes_per_batch(BATCH_BYTES_MAX)
            .heartbeat(Duration::from_secs(5))
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .map_err(|error| Error::Nats(error.to_string()))?;
        self.health.consuming.store(true, Ordering::Relaxed);
        // Everything already delivered goes into one batch (`ready_chunks` in `consume`), so a
        // catch-up commits in large transactions while a single new event is applied at once.
        Ok((consumer, messages))
    }

    /// The durable consumer, created or re-created to deliver after the stored position.
    async fn consumer(&self, log: &EventLog) -> Result<consumer::PullConsumer> {
        let stream = log
            .context()
            .get_stream(log.stream_name())
            .await
            .map_err(|error| Error::Nats(error.to_string()))?;
        let stored = self.position();
        let created =
            u64::try_from(stream.cached_info().created.unix_timestamp_nanos()).unwrap_or(0);
        let recorded = self.stream_created.load(Ordering::Relaxed);
        if recorded != 0 && created != 0 && recorded != created {
            return Err(Error::StreamReplaced {
                stored: recorded,
                current: created,
            });
        }
        // A view made before this check (or a new one) adopts the stream it first reads.
        self.stream_created.store(created, Ordering::Relaxed);
        let stream_last = stream.cached_info().state.last_sequence;
        if stream_last < stored {
            return Err(Error::AheadOfStream {
                applied: stored,
                stream_last,
            });
        }
        match stream
            .get_consumer::<consumer::pull::Config>(&self.consumer_name)
            .await
        {
            Ok(mut existing) => {
                let info = existing
                    .info()
                    .await
                    .map_err(|error| Error::Nats(error.to_string()))?;
                // Reuse it only if it will deliver exactly what follows the stored position:
                // nothing acknowledged beyond it (the server would never send that again), and
                // nothing delivered beyond it to an earlier process that died before committing
                // (the server would hold that back until its ack wait expires).
                let acknowledged = info.ack_floor.stream_sequence;
                let delivered = info.delivered.stream_sequence;
                // And only if it is the consumer this engine makes (an operator may have made
                // one by hand with another filter or ack policy).
                let configured = delivers_every_event(&info.config) && paced_as_made(&info.config);
                if configured
                    && acknowledged <= stored
                    && delivered <= stored
                    && info.num_ack_pending == 0
                {
                    self.next_delivery
                        .store(info.delivered.consumer_sequence + 1, Ordering::Relaxed);
                    if info.config.max_ack_pending >= MAX_ACK_PENDING {
                        return Ok(existing);
                    }
                    if let Some(raised) = self.roomier(&stream, info.config.clone()).await {
                        return Ok(raised);
                    }
                }
                tracing::info!(
                    consumer = %self.consumer_name,
                    configured,
                    acknowledged,
                    delivered,
                    pending = info.num_ack_pending,
                    stored,
                    "consumer does not continue from the stored view; re-creating it"
                );
                stream
                    .delete_consumer(&self.consumer_name)
                    .await
                    .map_err(|error| Error::Nats(error.to_string()))?;
            }
            Err(error) => {
                tracing::info!(consumer = %self.consumer_name, %error, stored, "creating the durable consumer");
            }
        }
        self.health.consumer_recreations.inc();
        self.next_delivery.store(1, Ordering::Relaxed);
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(self.consumer_name.clone()),
                description: Some("Coffer reader views".into()),
                filter_subject: eventlog::subject::ALL_EVENTS.into(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: stored + 1,
                },
                ack_policy: consumer::AckPolicy::All,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                max_deliver: -1,
                ..Default::default()
            })
            .await
            .map_err(|error| Error::Nats(error.to_string()))
    }

    /// The consumer with room for the pipeline ([`MAX_ACK_PENDING`]): one made by an older
    /// build, or by hand, would stall the gathering of the next batch behind the one
    /// committing. Only that setting changes; if the update fails, `None`: the consumer is
    /// re-created.
    async fn roomier(
        &self,
        stream: &jetstream::stream::Stream,
        mut config: consumer::Config,
    ) -> Option<consumer::PullConsumer> {
        use async_nats::jetstream::consumer::FromConsumer;
        let before = config.max_ack_pending;
        config.max_ack_pending = MAX_ACK_PENDING;
        let updated = match consumer::pull::Config::try_from_consumer_config(config) {
            Ok(config) => stream
                .update_consumer(config)
                .await
                .map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match updated {
            Ok(updated) => {
                tracing::info!(consumer = %self.consumer_name, before, after = MAX_ACK_PENDING, "consumer's max_ack_pending raised");
                Some(updated)
            }
            Err(error) => {
                tracing::warn!(consumer = %self.consumer_name, before, %error, "could not raise the consumer's max_ack_pending; re-creating it");
                None
            }
        }
    }

    /// Checks a batch's deliveries in order and decodes its events. Deliveries are numbered
    /// without gaps; a skipped number is a message lost in flight, and acking past it would
    /// acknowledge it unapplied (AckPolicy::All), so the batch ends before it and the error is
    /// given back beside it.
    fn prepare(
        &self,
        messages: Vec<jetstream::Message>,
        prepared_through: u64,
        mut next_delivery: u64,
    ) -> Result<(Prepared, Option<Error>)> {
        let mut events = Vec::with_capacity(messages.len());
        let mut lag = None;
        let mut settled = None;
        let mut settled_position = 0;
        let mut unreadable: Vec<(usize, eventlog::Unreadable)> = Vec::new();
        let mut gap = None;
        let no_headers = async_nats::HeaderMap::new();
        for (index, message) in messages.iter().enumerate() {
            let info = message
                .info()
                .map_err(|error| Error::Nats(error.to_string()))?;
            lag = Some(info.pending);
            // This holds for redeliveries of applied events too: one of them after a lost
            // delivery must not carry the ack past it. Stop here; the consumer is re-created
            // from the stored position.
            if info.consumer_sequence != next_delivery {
                gap = Some(Error::Nats(format!(
                    "delivery gap: expected delivery {next_delivery}, got {} (position {})",
                    info.consumer_sequence, info.stream_sequence
                )));
                break;
            }
            next_delivery += 1;
            // The ack goes to the delivery of the newest position: the server ignores an ack
            // of everything up to a redelivery of what it already counts as acknowledged, which
            // would leave the batch's new deliveries to be delivered again.
            if info.stream_sequence > settled_position {
                settled_position = info.stream_sequence;
                settled = Some(index);
            }
            if info.stream_sequence <= prepared_through {
                self.health.redeliveries_skipped.inc();
                continue;
            }
            // Borrowed, not cloned: a header map per event was a tenth of a catch-up's time.
            let headers = message.headers.as_ref().unwrap_or(&no_headers);
            match decode_stored(
                &message.subject,
                info.stream_sequence,
                info.published,
                headers,
                message.payload.clone(),
            ) {
                Ok(recorded) => events.push(recorded),
                Err(error) => {
                    let stored = eventlog::Unreadable::new(
                        &message.subject,
                        info.stream_sequence,
                        info.published,
                        &error,
                    );
                    tracing::error!(
                        consumer = %self.consumer_name,
                        position = stored.position,
                        subject = %stored.subject,
                        account = ?stored.account.as_ref().map(|account| account.as_str()),
                        reason = %stored.reason,
                        "a stored message cannot be read as an event; its account's views are marked unreadable"
                    );
                    unreadable.push((events.len(), stored));
                }
            }
        }
        let newest = events
            .last()
            .map(|event| event.position)
            .max(unreadable.last().map(|(_, message)| message.position));
        let prepared = Prepared {
            messages,
            events,
            unreadable,
            settled,
            lag,
            newest,
            next_delivery,
        };
        Ok((prepared, gap))
    }

    /// Begins a prepared batch's transaction on a blocking thread.
    fn begin(&self, prepared: Prepared) -> InFlight {
        let commit = prepared.newest.map(|_| {
            Commit::Running(
                self.spawn_commit(Part::new(prepared.events, prepared.unreadable), Vec::new()),
            )
        });
        InFlight {
            messages: prepared.messages,
            settled: prepared.settled,
            lag: prepared.lag,
            newest: prepared.newest,
            next_delivery: prepared.next_delivery,
            commit,
        }
    }

    /// Commits `part`, with the accounts of `gaps` marked first, on a blocking thread.
    fn spawn_commit(&self, part: Part, gaps: Vec<Gap>) -> tokio::task::JoinHandle<Committed> {
        let (database, projector) = (self.database.clone(), self.projector.clone());
        let created = self.stream_created.load(Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let result = match part.newest {
                Some(newest) => commit(
                    &database,
                    projector.as_ref(),
                    &part.events,
                    &part.unreadable,
                    &gaps,
                    newest,
                    created,
                ),
                None => Ok(()),
            };
            Committed { result, part, gaps }
        })
    }

    /// Waits for a batch's transaction, then publishes the new position and acknowledges the
    /// batch.
    ///
    /// An event whose account's history, as this view has it, has a hole ([`ApplyError::Missed`])
    /// costs its account, never the view: anyone with the writer's credential can append
    /// messages the views cannot place (a skipping feed is caught by the consumer check
    /// instead). The batch is split there: what precedes the event commits together with the
    /// account's gap, and the rest commits next. So every event is applied once whatever the
    /// number of such holes and however the batches fall (a fresh view meets in one batch the
    /// holes a live one met one at a time), at the cost of one more commit per hole.
    async fn settle(&self, log: &EventLog, in_flight: Option<InFlight>) -> Result<()> {
        let Some(in_flight) = in_flight else {
            return Ok(());
        };
        if let (Some(mut commit), Some(newest)) = (in_flight.commit, in_flight.newest) {
            // The uncommitted tail of the batch, once a hole split it.
            let mut rest: Option<Part> = None;
            // Accounts marked for a hole in this batch: the views must not report one again.
            let mut holes: Vec<String> = Vec::new();
            // The time of the newest event committed.
            let mut events_committed: Option<OffsetDateTime> = None;
            loop {
                let committed = commit
                    .finish()
                    .await
                    // A panic in the views' code is not a storage fault: stop, do not reopen.
                    .map_err(|error| Error::Poison {
                        position: newest,
                        message: format!("applying the batch panicked: {error}"),
                    })?;
                match committed.result {
                    Ok(()) => {
                        let part = &committed.part;
                        self.committed(
                            &part.events,
                            part.unreadable.len(),
                            part.newest.unwrap_or(newest),
                        );
                        if let Some(last) = part.events.last() {
                            events_committed = Some(last.time);
                        }
                        match rest.take() {
                            Some(part) => {
                                commit = Commit::Running(self.spawn_commit(part, Vec::new()));
                            }
                            None => break,
                        }
                    }
                    Err(Error::Missed(ApplyError::Missed {
                        account,
                        position,
                        previous,
                        applied,
                    })) => {
                        if holes.contains(&account) {
                            return Err(Error::Incomplete(format!(
                                "account {account} was reported twice for a hole in its history \
                                 (at position {position}) after it was marked"
                            )));
                        }
                        let Some((before, after)) = committed.part.split_at(position) else {
                            return Err(Error::Incomplete(format!(
                                "a hole in account {account}'s history was reported at position \
                                 {position}, which the batch does not hold"
                            )));
                        };
                        let erased = erased(log, previous).await?;
                        tracing::error!(
                            consumer = %self.consumer_name,
                            account,
                            position,
                            missing = previous,
                            applied,
                            erased,
                            "an account's event follows one this view never applied; its views are marked unreadable"
                        );
                        self.health.history_gaps.inc();
                        let mut gaps = committed.gaps;
                        gaps.push(Gap {
                            account: account.clone(),
                            missing: previous,
                            erased,
                        });
                        holes.push(account);
                        // What precedes the event commits with the marks (or the marks alone,
                        // at the position already stored).
                        let before = before.or_at(*self.applied.borrow());
                        rest = Some(match rest.take() {
                            Some(later) => after.then(later),
                            None => after,
                        });
                        commit = Commit::Running(self.spawn_commit(before, gaps));
                    }
                    Err(error) => return Err(error),
                }
            }
            if self
                .crash_after_commits
                .is_some_and(|commits| self.health.batches_committed.get() >= commits)
            {
                tracing::error!(
                    position = newest,
                    "failpoint: aborting between commit and ack"
                );
                std::process::abort();
            }
            if let Some(lag) = in_flight.lag {
                let behind = match events_committed {
                    Some(time) if lag > 0 => {
                        (OffsetDateTime::now_utc() - time).as_seconds_f64().max(0.0)
                    }
                    Some(_) => 0.0,
                    None => self.health.lag_seconds.get(),
                };
                self.health.lag_seconds.set(behind);
            }
        }
        if let Some(lag) = in_flight.lag {
            self.health.lag.set(lag as i64);
            self.health.lag_known.store(true, Ordering::Release);
        }
        self.next_delivery
            .store(in_flight.next_delivery, Ordering::Relaxed);
        // With AckPolicy::All, acknowledging a message acknowledges everything before it.
        // A lost ack only causes a redelivery, which the position check skips.
        if let Some(message) = in_flight
            .settled
            .and_then(|index| in_flight.messages.get(index))
        {
            if let Err(error) = message.ack().await {
                tracing::debug!(%error, "batch ack failed; the batch will be redelivered and skipped");
            }
        }
        Ok(())
    }

    /// After a transaction committed: its events are in the file, so the position is published.
    fn committed(&self, events: &[RecordedEvent], unreadable: usize, newest: u64) {
        self.log_applied(events);
        self.health.events_applied.inc_by(events.len() as u64);
        self.health.decode_failures.inc_by(unreadable as u64);
        self.health.batches_committed.inc();
        self.health
            .applied_position
            .store(newest, Ordering::Relaxed);
        self.applied.send_replace(newest);
    }
}

/// What the pipeline does next.
enum Next<T> {
    /// Deliveries arrived (`None`: the message stream ended).
    Chunk(Option<T>),
    /// The batch in flight committed or failed: settle it.
    Ended,
    /// Time to check the consumer (and settle a batch left waiting).
    Check,
    Stop,
}

/// Aborts the task when dropped: the receiving task ends with the loop that reads from it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A batch checked and decoded in delivery order, not yet begun.
struct Prepared {
    messages: Vec<jetstream::Message>,
    events: Vec<RecordedEvent>,
    /// Messages that are not events, each with how many events precede it in `events`.
    unreadable: Vec<(usize, eventlog::Unreadable)>,
    /// The last message whose effect is settled once the batch commits (applied now or
    /// before), to ack up to it.
    settled: Option<usize>,
    /// Events the consumer still had after the batch's last delivery.
    lag: Option<u64>,
    /// The position the batch moves the view to; `None` when it only holds redeliveries.
    newest: Option<u64>,
    next_delivery: u64,
}

/// What one transaction applies: events and unreadable messages in stream order, and the
/// position it stores.
struct Part {
    events: Vec<RecordedEvent>,
    /// Messages that are not events, each with how many events precede it in `events`.
    unreadable: Vec<(usize, eventlog::Unreadable)>,
    newest: Option<u64>,
}

impl Part {
    /// The messages before `position` and those from it on; `None` if no event is there.
    fn split_at(self, position: u64) -> Option<(Part, Part)> {
        let index = self
            .events
            .iter()
            .position(|event| event.position == position)?;
        let mut events = self.events;
        let after_events = events.split_off(index);
        let (before_unreadable, after_unreadable): (Vec<_>, Vec<_>) = self
            .unreadable
            .into_iter()
            .partition(|(_, message)| message.position < position);
        let after_unreadable: Vec<_> = after_unreadable
            .into_iter()
            .map(|(preceding, message)| (preceding.saturating_sub(index), message))
            .collect();
        let before = Part::new(events, before_unreadable);
        let after = Part::new(after_events, after_unreadable);
        Some((before, after))
    }

    fn new(events: Vec<RecordedEvent>, unreadable: Vec<(usize, eventlog::Unreadable)>) -> Self {
        let newest = events
            .last()
            .map(|event| event.position)
            .max(unreadable.last().map(|(_, message)| message.position));
        Self {
            events,
            unreadable,
            newest,
        }
    }

    /// This part followed by `later`.
    fn then(mut self, later: Part) -> Part {
        let offset = self.events.len();
        self.events.extend(later.events);
        self.unreadable.extend(
            later
                .unreadable
                .into_iter()
                .map(|(preceding, message)| (preceding + offset, message)),
        );
        self.newest = later.newest.or(self.newest);
        self
    }

    /// This part, storing `position` when it holds nothing.
    fn or_at(mut self, position: u64) -> Self {
        self.newest = self.newest.or(Some(position));
        self
    }
}

/// A batch whose transaction was begun.
struct InFlight {
    messages: Vec<jetstream::Message>,
    settled: Option<usize>,
    lag: Option<u64>,
    newest: Option<u64>,
    next_delivery: u64,
    commit: Option<Commit>,
}

impl InFlight {
    /// Completes when its transaction has ended (committed or failed); pending forever when it
    /// has none. Cancel-safe: a finished transaction's result is kept for [`Engine::settle`].
    async fn transaction_ended(in_flight: &mut Option<InFlight>) {
        match in_flight.as_mut().and_then(|batch| batch.commit.as_mut()) {
            Some(commit) => commit.wait().await,
            None => std::future::pending().await,
        }
    }
}

/// A transaction on a blocking thread, or what it gave back.
enum Commit {
    Running(tokio::task::JoinHandle<Committed>),
    Done(std::result::Result<Committed, tokio::task::JoinError>),
}

impl Commit {
    /// Waits for the transaction to end, keeping its result.
    async fn wait(&mut self) {
        if let Commit::Running(handle) = self {
            let result = handle.await;
            *self = Commit::Done(result);
        }
    }

    async fn finish(self) -> std::result::Result<Committed, tokio::task::JoinError> {
        match self {
            Commit::Running(handle) => handle.await,
            Commit::Done(result) => result,
        }
    }
}

/// What a transaction gives back: its result, and what it applied, for a split at a hole.
struct Committed {
    result: Result<()>,
    part: Part,
    gaps: Vec<Gap>,
}

/// Whether the stream no longer holds the event at `position` (erased by a per-message TTL or
/// removed some other way), rather than holding it where a view's feed skipped it.
async fn erased(log: &EventLog, position: u64) -> Result<bool> {
    let page = log
        .read_after_each(position.saturating_sub(1), 1)
        .await
        .map_err(|error| Error::Nats(error.to_string()))?;
    let next = page.first().map(|message| match message {
        Ok(recorded) => recorded.position,
        Err(unreadable) => unreadable.position,
    });
    Ok(next != Some(position))
}

/// Whether a consumer's configuration is the one this engine makes: it delivers everything
/// ([`delivers_every_event`]) at the pace the pipeline needs ([`paced_as_made`]).
fn as_made(config: &consumer::Config) -> bool {
    delivers_every_event(config)
        && paced_as_made(config)
        && config.max_ack_pending >= MAX_ACK_PENDING
}

/// Every event, acknowledged in order. Anything else delivers less than the views need: a view
/// that ran on it may have skipped events.
fn delivers_every_event(config: &consumer::Config) -> bool {
    config.filter_subject == eventlog::subject::ALL_EVENTS
        && config.filter_subjects.is_empty()
        && config.ack_policy == consumer::AckPolicy::All
}

/// Payloads, at the pace the pipeline is sized for (room for [`MAX_ACK_PENDING`] deliveries is checked apart:
/// a consumer with less is raised in place). The reader role may update its consumers, so a stolen
/// reader password could otherwise stall a view silently while its health stays green (one
/// unacknowledged delivery allowed, a rate limit, a pause, pulls the server refuses, a short
/// ack wait that redelivers every batch). Such a consumer is re-created from the stored
/// position; nothing was skipped.
fn paced_as_made(config: &consumer::Config) -> bool {
    let at_least = |limit: i64, ours: usize| limit <= 0 || limit >= ours as i64;
    // Headers only: a batch of such deliveries is never applied (see `Engine::pipeline`).
    !config.headers_only
        && config.max_ack_pending >= BATCH_SIZE_MAX as i64
        && config.ack_wait >= ACK_WAIT
        && config.max_deliver <= 0
        && config.backoff.is_empty()
        && config.rate_limit == 0
        && config.pause_until.is_none()
        && at_least(config.max_batch, BATCH_SIZE_MAX)
        && at_least(config.max_bytes, BATCH_BYTES_MAX)
        && (config.max_expires.is_zero() || config.max_expires >= PULL_EXPIRES)
}

/// Whether the server sent `message` without its payload (a headers-only consumer): it says so
/// with the payload's size in a header of its own. Events always have a payload, so the header
/// (a lookup that parses and hashes its name) is looked for only on an empty one.
fn headers_only_delivery(message: &jetstream::Message) -> bool {
    message.payload.is_empty()
        && message
            .headers
            .as_ref()
            .is_some_and(|headers| headers.get(HEADERS_ONLY_SIZE).is_some())
}

/// The bytes a delivery holds, near enough: subject, headers and payload.
fn delivery_size(message: &jetstream::Message) -> usize {
    let headers = message.headers.as_ref().map_or(0, |headers| {
        headers
            .iter()
            .map(|(name, values)| {
                AsRef::<str>::as_ref(name).len()
                    + values
                        .iter()
                        .map(|value| value.as_str().len())
                        .sum::<usize>()
            })
            .sum()
    });
    message.subject.len() + message.payload.len() + headers
}

/// The header nats-server adds to a delivery of a headers-only consumer (`JSMsgSize`).
const HEADERS_ONLY_SIZE: &str = "Nats-Msg-Size";

/// Whether the consumer had more events for us than the last delivery of `batch`.
fn more_pending(batch: &[jetstream::Message]) -> bool {
    batch
        .last()
        .and_then(|message| message.info().ok())
        .is_some_and(|info| info.pending > 0)
}

fn commit<P: Projector>(
    database: &Database,
    projector: &P,
    events: &[RecordedEvent],
    unreadable: &[(usize, eventlog::Unreadable)],
    gaps: &[Gap],
    newest: u64,
    stream_created: u64,
) -> Result<()> {
    let transaction = database.begin_write().map_err(storage)?;
    let applying = |result: std::result::Result<(), ApplyError>| {
        result.map_err(|error| match error {
            ApplyError::Storage(error) => storage(error),
            missed @ ApplyError::Missed { .. } => Error::Missed(missed),
        })
    };
    for gap in gaps {
        applying(projector.history_gap(&transaction, gap))?;
    }
    // In stream order: the events before each unreadable message, then that message.
    let mut applied = 0;
    for (before, message) in unreadable {
        if *before > applied {
            applying(projector.apply(&transaction, &events[applied..*before]))?;
            applied = *before;
        }
        applying(projector.unreadable(&transaction, message))?;
    }
    if applied < events.len() {
        applying(projector.apply(&transaction, &events[applied..]))?;
    }
    {
        let mut checkpoint = transaction.open_table(CHECKPOINT).map_err(storage)?;
        checkpoint.insert(CHECKPOINT_KEY, newest).map_err(storage)?;
        checkpoint
            .insert(STREAM_CREATED_KEY, stream_created)
            .map_err(storage)?;
    }
    transaction.commit().map_err(storage)
}

/// The position stored with the views (0 for a new file).
pub fn stored_position(database: &Database) -> Result<u64> {
    stored_value(database, CHECKPOINT_KEY)
}

fn stored_value(database: &Database, key: &str) -> Result<u64> {
    use redb::ReadableDatabase;
    let transaction = database.begin_read().map_err(storage)?;
    let table = match transaction.open_table(CHECKPOINT) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(error) => return Err(storage(error)),
    };
    let position = table
        .get(key)
        .map_err(storage)?
        .map(|value| value.value())
        .unwrap_or(0);
    Ok(position)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_counts_applied_events_not_redeliveries_and_takes_the_servers_word_for_the_rest() {
        let health = ViewHealth::default();
        health.pending_at_start.store(100, Ordering::Relaxed);
        health.events_applied.inc_by(50);
        assert!(!health.caught_up(60), "not consuming yet");
        health.start_known.store(true, Ordering::Release);
        assert!(health.caught_up(50));
        // Redeliveries of what was applied are the same events again.
        health.redeliveries_skipped.inc_by(60);
        assert!(!health.caught_up(10));
        // The server's count of what is left counts only once a batch settled with it.
        health.lag.set(5);
        assert!(!health.caught_up(10));
        health.lag_known.store(true, Ordering::Release);
        assert!(health.caught_up(10));
        assert!(!health.caught_up(4));
    }
}
