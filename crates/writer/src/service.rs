//! Wiring of the writer process: NATS, the stream, actors, both APIs, and a graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use eventlog::{EventLog, NatsSettings, StreamSettings};
use tokio::sync::watch;

use crate::actor::{AccountStates, ActorContext};
use crate::dispatch::{self, Dispatcher};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::ownership::{Ownership, WriterId};
use crate::registry::{Registry, RegistrySettings};
use crate::{expiry, nats_api, Error, Result};

/// Everything the writer is configured with.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub nats: NatsSettings,
    /// Where the HTTP API listens (`COFFER_HTTP_ADDR`, default `127.0.0.1:8080`).
    pub http_address: SocketAddr,
    pub stream: StreamSettings,
    pub registry: RegistrySettings,
    /// How appends are gathered into atomic batches.
    pub group_commit: eventlog::GroupCommitSettings,
    /// Snapshot an account every this many of its events (`COFFER_SNAPSHOT_EVERY`, default
    /// 1000; 0: never).
    pub snapshot_every: u64,
    /// Most queued deposits and withdrawals of one account decided together and appended in one
    /// batch (`COFFER_ACCOUNT_BATCH_MAX`, default 100; 1: each alone).
    pub account_batch_max: usize,
    /// Failpoint for tests: every command waits this long in its actor before it is looked at.
    pub failpoint_actor_delay: Option<Duration>,
    /// The bearer token the command API requires (`COFFER_HTTP_TOKEN`); none: no auth.
    pub http_token: Option<problem::BearerToken>,
    /// Connection limit and read/request timeouts of the HTTP API.
    pub http_limits: problem::HttpLimits,
    /// One owner per account across writers (`COFFER_OWNERSHIP`, default on); off, every
    /// writer decides for any account it is asked about and the stream arbitrates.
    pub ownership: bool,
    /// The first part of this writer's id in the owners bucket (`COFFER_WRITER_NAME`, default
    /// the host name); a random suffix makes it unique per process.
    pub writer_name: Option<String>,
    /// The hold-expiry backstop ([`expiry::Backstop`]).
    pub hold_backstop: expiry::Backstop,
    /// The NATS servers' `/varz` addresses (`COFFER_NATS_MONITOR_URLS`), read for their store
    /// use ([`crate::nats_store`]); empty: not read.
    pub nats_monitor_urls: Vec<String>,
    /// What this writer signs its events and snapshots with (`COFFER_SIGNING_KEY_FILE`).
    pub signing_key: Option<Arc<eventlog::SigningKey>>,
    /// Whose signatures the events it decides on must carry (`COFFER_TRUSTED_KEYS_FILE`); none:
    /// not checked.
    pub trusted_keys: Option<Arc<eventlog::TrustedKeys>>,
}

impl WriterConfig {
    /// Refuses settings that contradict each other. A command is answered (its outcome, or
    /// `outcome_unknown`) by its deadline, the grace for an append in flight and a margin; a
    /// request timeout shorter than that would cut off commands it cannot take back (so it no
    /// longer applies to them, see `problem::server::work_taken`), and leave bulks no time to
    /// start anything.
    pub fn check(&self) -> Result<()> {
        eventlog::signing::check_pair(self.signing_key.as_deref(), self.trusted_keys.as_deref())
            .map_err(|error| Error::Config(error.to_string()))?;
        let answered_within = self.registry.call_timeout
            + crate::registry::ANSWER_GRACE
            + crate::registry::ANSWER_MARGIN;
        if self.http_limits.request_timeout <= answered_within {
            return Err(Error::Config(format!(
                "COFFER_HTTP_REQUEST_TIMEOUT_MS ({} ms) must be longer than \
                 COFFER_COMMAND_DEADLINE_MS ({} ms) + {} ms, the time a command's answer may take \
                 after its deadline: raise the request timeout or lower the deadline",
                self.http_limits.request_timeout.as_millis(),
                self.registry.call_timeout.as_millis(),
                (answered_within - self.registry.call_timeout).as_millis(),
            )));
        }
        Ok(())
    }
}

/// Longest wait at shutdown to hand the partition leases back.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait at shutdown for the hand-overs taken before it to be answered.
const HANDOVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(7);

/// Pause between attempts to set up the stream while NATS is not reachable.
const SETUP_RETRY_DELAY: Duration = Duration::from_secs(1);
/// In-flight requests get this long to finish after a shutdown signal: the contract gives 10 s
/// to exit, and flushing NATS needs a moment after.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

/// Runs the writer until `shutdown` completes, then drains and returns.
pub async fn run(
    config: WriterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.check()?;
    let client = config
        .nats
        .connect()
        .await
        .map_err(|error| Error::Unavailable(error.to_string()))?;
    let mut log = EventLog::new(client.clone(), &config.stream);
    if let Some(key) = &config.signing_key {
        log = log.with_signer(key.clone());
    }
    if let Some(keys) = &config.trusted_keys {
        log = log.with_trusted_keys(keys.clone());
    }
    let metrics = Arc::new(Metrics::default());
    let writer_id = WriterId::generate(config.writer_name.as_deref())?;
    let ownership_cell: Arc<OnceLock<Arc<Ownership>>> = Arc::new(OnceLock::new());
    let commands_cell: Arc<OnceLock<Dispatcher>> = Arc::new(OnceLock::new());
    let (stop_sender, stop_receiver) = watch::channel(false);
    tokio::spawn(crate::nats_store::run(
        config.nats_monitor_urls.clone(),
        metrics.nats_store.clone(),
        stop_receiver.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(config.http_address)
        .await
        .map_err(|error| Error::Internal(format!("bind {}: {error}", config.http_address)))?;
    tracing::info!(address = %config.http_address, "writer HTTP API listening");

    // Set once the hand-overs taken before the stop are answered.
    let (handovers_drained, mut handovers_drained_receiver) = watch::channel(false);
    // Why the writer refuses to run, if the setup finds a reason (a stream that could lose
    // history): the writer then stops as if signalled and exits with it.
    let (refuse, refused) = tokio::sync::oneshot::channel::<String>();
    let nats_commands_served = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let setup = tokio::spawn(set_up(
        config.clone(),
        log.clone(),
        metrics.clone(),
        writer_id,
        Cells {
            ownership: ownership_cell.clone(),
            commands: commands_cell.clone(),
            nats_commands_served: nats_commands_served.clone(),
            handovers_drained,
            refuse,
        },
        stop_receiver.clone(),
    ));

    let state = AppState {
        nats_commands_served: nats_commands_served.clone(),
        commands: commands_cell.clone(),
        log: Arc::new(log.clone()),
        metrics: metrics.clone(),
        http_token: config.http_token.clone(),
        bulk_start_window: crate::bulk::start_window(
            config.http_limits.request_timeout,
            config.registry.call_timeout,
            crate::registry::ANSWER_GRACE,
        ),
    };
    let http_limits = config.http_limits;
    let (http_stop_sender, http_stop_receiver) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        problem::serve(listener, http::router(state), http_limits, async move {
            let _ = http_stop_receiver.await;
        })
        .await
    });

    let refusal = tokio::select! {
        () = shutdown => None,
        Ok(reason) = refused => Some(reason),
    };
    if let Some(reason) = &refusal {
        tracing::error!(%reason, "refusing to run");
    }
    tracing::info!("shutting down: no new work, draining in-flight requests");
    let _ = stop_sender.send(true);
    let _ = http_stop_sender.send(());
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "HTTP server task failed"),
        Err(_) => tracing::warn!("in-flight requests did not finish in time"),
    }
    setup.abort();
    if let Some(ownership) = ownership_cell.get() {
        if tokio::time::timeout(RELEASE_TIMEOUT, ownership.release_all())
            .await
            .is_err()
        {
            tracing::warn!(
                "handing the partition leases back timed out; they run out on their own"
            );
        }
        // Commands other writers handed over before the stop finish on the actors and are
        // answered before the actors stop.
        if tokio::time::timeout(
            HANDOVER_DRAIN_TIMEOUT,
            handovers_drained_receiver.wait_for(|drained| *drained),
        )
        .await
        .is_err()
        {
            tracing::warn!("hand-overs did not finish in time");
        }
    }
    if let Some(commands) = commands_cell.get() {
        commands.registry().stop();
    }
    if let Err(error) = client.flush().await {
        tracing::warn!(%error, "flushing NATS at shutdown");
    }
    tracing::info!("writer stopped");
    match refusal {
        Some(reason) => Err(Error::Internal(format!("refusing to run: {reason}"))),
        None => Ok(()),
    }
}

/// What the setup task hands back to the writer's shutdown: the ownership (to give its leases
/// back), the dispatcher (its registry stops the actors), and word that hand-overs are drained.
struct Cells {
    ownership: Arc<OnceLock<Arc<Ownership>>>,
    commands: Arc<OnceLock<Dispatcher>>,
    /// Set while the NATS command service is subscribed: part of readiness.
    nats_commands_served: Arc<std::sync::atomic::AtomicBool>,
    handovers_drained: watch::Sender<bool>,
    /// Where the setup sends why the writer must not run.
    refuse: tokio::sync::oneshot::Sender<String>,
}

/// Sets up the stream and actors (retrying while NATS is away), takes part in ownership, then
/// starts the NATS API.
async fn set_up(
    config: WriterConfig,
    log: EventLog,
    metrics: Arc<Metrics>,
    writer_id: WriterId,
    cells: Cells,
    stop: watch::Receiver<bool>,
) {
    let Cells {
        ownership: ownership_cell,
        commands: commands_cell,
        nats_commands_served,
        handovers_drained,
        refuse,
    } = cells;
    let registry = loop {
        match try_set_up(&config, &log, &metrics).await {
            Ok(registry) => break registry,
            Err(SetUpFailure::Refused(reason)) => {
                let _ = refuse.send(reason);
                return;
            }
            Err(SetUpFailure::Retry(error)) => {
                tracing::warn!(%error, "writer setup failed; retrying");
                tokio::time::sleep(SETUP_RETRY_DELAY).await;
            }
        }
    };
    let ownership = if config.ownership {
        let leases = loop {
            match eventlog::Leases::open(log.client().clone(), log.context()).await {
                Ok(leases) => break leases,
                Err(error) => {
                    tracing::warn!(%error, "owners bucket not ready; retrying");
                    tokio::time::sleep(SETUP_RETRY_DELAY).await;
                }
            }
        };
        tracing::info!(writer = %writer_id, "one owner per account: this writer's id");
        let ownership = Ownership::new(writer_id, leases, metrics.clone());
        let _ = ownership_cell.set(ownership.clone());
        Some(ownership)
    } else {
        None
    };
    if let Some(ownership) = &ownership {
        tokio::spawn(serve_handovers(
            log.client().clone(),
            registry.clone(),
            ownership.me().clone(),
            metrics.clone(),
            stop.clone(),
            handovers_drained,
        ));
        // A first view before the first command: until a beat succeeds every command is
        // decided here, which is safe (the stream arbitrates) but not what ownership is for.
        if let Err(error) = ownership.beat().await {
            tracing::warn!(%error, "first ownership beat failed; deciding here until one succeeds");
        }
        tokio::spawn(ownership.clone().run(stop.clone()));
    }
    let commands = Dispatcher::new(registry, ownership, log.client().clone(), metrics.clone());
    let _ = commands_cell.set(commands.clone());
    tracing::info!("writer ready");
    tokio::spawn(expiry::run(
        log.clone(),
        commands,
        metrics.clone(),
        config.hold_backstop,
        stop.clone(),
    ));
    loop {
        match nats_api::serve(
            log.client().clone(),
            commands_cell.clone(),
            &nats_commands_served,
            stop.clone(),
        )
        .await
        {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, "NATS command API failed; restarting it");
                tokio::time::sleep(SETUP_RETRY_DELAY).await;
            }
        }
    }
}

/// Why the setup did not finish.
enum SetUpFailure {
    /// Try again (NATS away, a stream not there yet).
    Retry(Error),
    /// Never: the writer must not run on what it found.
    Refused(String),
}

impl From<Error> for SetUpFailure {
    fn from(error: Error) -> Self {
        SetUpFailure::Retry(error)
    }
}

async fn try_set_up(
    config: &WriterConfig,
    log: &EventLog,
    metrics: &Arc<Metrics>,
) -> std::result::Result<Registry, SetUpFailure> {
    config
        .stream
        .ensure(log.context())
        .await
        .map_err(|error| match error {
            eventlog::Error::Configuration(reason) => SetUpFailure::Refused(reason),
            other => SetUpFailure::Retry(Error::Unavailable(other.to_string())),
        })?;
    if config.ownership {
        eventlog::leases::ensure_bucket(log.context(), config.stream.replicas)
            .await
            .map_err(|error| Error::Unavailable(error.to_string()))?;
    }
    let committer = eventlog::GroupCommit::start(log.clone(), config.group_commit);
    let _ = metrics.group_commit.set(committer.counters());
    let batch_messages = metrics.group_commit_batch_messages.clone();
    let _ = committer.counters().on_batch.set(Box::new(move |messages| {
        batch_messages.observe(messages as f64)
    }));
    let context = Arc::new(ActorContext {
        log: log.clone(),
        committer,
        snapshot_every: config.snapshot_every,
        metrics: metrics.clone(),
        states: AccountStates::default(),
        failpoint_delay: config.failpoint_actor_delay,
        account_batch_max: config.account_batch_max.max(1),
        account_batching_refused: Default::default(),
        account_fill: (
            config.group_commit.fill_wait,
            config.group_commit.fill_quiet,
        ),
    });
    Ok(Registry::start(context, config.registry.clone()).await?)
}

/// Takes hand-overs until `stop`, re-subscribing if the subscription fails.
async fn serve_handovers(
    client: async_nats::Client,
    registry: Registry,
    me: WriterId,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    drained: watch::Sender<bool>,
) {
    loop {
        match dispatch::serve_handovers(
            client.clone(),
            registry.clone(),
            me.clone(),
            metrics.clone(),
            stop.clone(),
        )
        .await
        {
            Ok(()) => {
                let _ = drained.send(true);
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "taking hand-overs failed; restarting");
                tokio::time::sleep(SETUP_RETRY_DELAY).await;
            }
        }
    }
}
