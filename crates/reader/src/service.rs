//! Wiring of the reader process: the redb file, the projection engine on its durable consumer,
//! and the query API, with a graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use eventlog::{EventLog, NatsSettings, StreamSettings};
use tokio::sync::watch;

use crate::http::{self, QueryState};
use crate::rebuild::Rebuilder;
use crate::served::Served;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub nats: NatsSettings,
    /// Where the query API listens (`COFFER_HTTP_ADDR`, default `127.0.0.1:8081`).
    pub http_address: SocketAddr,
    pub stream: StreamSettings,
    /// Holds `views.redb` (`COFFER_DATA_DIR`, default `./data/reader`).
    pub data_directory: PathBuf,
    /// Durable consumer name, unique per replica (`COFFER_READER_NAME`).
    pub reader_name: String,
    /// Longest `min_position` wait (default 5 s).
    pub min_position_wait: Duration,
    /// Crash-test failpoint: abort after this many commits, before acking.
    pub crash_after_commits: Option<u64>,
    /// `/readyz` is 200 only once the view is within this many positions of the stream's last
    /// event as seen at start (`COFFER_READY_MAX_LAG`, default 1 000).
    pub ready_max_lag: u64,
    /// The bearer token the query API requires (`COFFER_HTTP_TOKEN`); none: no auth.
    pub http_token: Option<problem::BearerToken>,
    /// Connection limit and read/request timeouts of the HTTP API.
    pub http_limits: problem::HttpLimits,
    /// Most requests waiting for `min_position` at once; more are answered `503` at once
    /// (`COFFER_MAX_POSITION_WAITERS`, default 1 024).
    pub max_position_waiters: usize,
    /// Storage failpoint for tests: while this file exists, writes to the view file fail.
    pub failpoint_storage_file: Option<PathBuf>,
    /// Whose signature every event must carry (`COFFER_TRUSTED_KEYS_FILE`); none: not checked.
    pub trusted_keys: Option<Arc<eventlog::TrustedKeys>>,
}

const SETUP_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Whether the view has caught up with the stream as it was when this reader started.
#[derive(Debug, Default)]
pub struct CatchUp {
    /// Set the first time the view was within the lag bound; readiness for reads then stays,
    /// NATS or not (the views are local).
    pub reached: AtomicBool,
}
const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

pub async fn run(
    config: ReaderConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    std::fs::create_dir_all(&config.data_directory).map_err(|error| {
        Error::Startup(format!(
            "create {}: {error}",
            config.data_directory.display()
        ))
    })?;
    // A rebuild that did not finish before the last stop: the serving file is the old view.
    crate::rebuild::remove_file_if_any(&config.data_directory.join(crate::rebuild::REBUILD_FILE))
        .map_err(Error::Storage)?;
    let path = config.data_directory.join(crate::rebuild::VIEWS_FILE);
    let mut database = crate::storage::open(&path, config.failpoint_storage_file.as_deref())
        .map_err(Error::Storage)?;
    // Views of another layout (an older build's, without the indexes this one reads) are
    // rebuilt from the stream: the file is replaced by an empty one, and the reader is ready
    // again once it has caught up.
    let stored = crate::views::stored_schema_version(&database)
        .map_err(|error| Error::Storage(error.to_string()))?;
    let behind = crate::views::indexes_behind(&database)
        .map_err(|error| Error::Storage(error.to_string()))?;
    let other_version = stored.filter(|version| *version != crate::views::SCHEMA_VERSION);
    if let Some(version) = other_version {
        tracing::warn!(
            path = %path.display(),
            stored = version,
            current = crate::views::SCHEMA_VERSION,
            "the views were written with another schema version; rebuilding them from the stream"
        );
    } else if let Some((indexed, applied)) = behind {
        tracing::warn!(
            path = %path.display(),
            indexed,
            applied,
            "the views moved past their indexes (a build without them ran on this file); \
             rebuilding them from the stream"
        );
    }
    if other_version.is_some() || behind.is_some() {
        drop(database);
        std::fs::remove_file(&path)
            .map_err(|error| Error::Storage(format!("remove {}: {error}", path.display())))?;
        database = crate::storage::open(&path, config.failpoint_storage_file.as_deref())
            .map_err(Error::Storage)?;
    }
    let database = Arc::new(database);

    // Listen before consuming, so the port is up as soon as the view starts to move.
    let listener = tokio::net::TcpListener::bind(config.http_address)
        .await
        .map_err(|error| Error::Startup(format!("bind {}: {error}", config.http_address)))?;
    let client = config
        .nats
        .connect()
        .await
        .map_err(|error| Error::Startup(error.to_string()))?;
    let log = match &config.trusted_keys {
        Some(keys) => EventLog::new(client.clone(), &config.stream).with_trusted_keys(keys.clone()),
        None => EventLog::new(client.clone(), &config.stream),
    };
    let (stop_sender, stop_receiver) = watch::channel(false);

    // The stream may not exist yet if no writer ever ran: the engine waits until it does,
    // creating it like a writer would.
    let ready_log = log.clone();
    let stream_settings = config.stream.clone();
    let mut ready_stop = stop_receiver.clone();
    let reader_name = config.reader_name.clone();
    // Why the reader refuses to run, if the stream is one that could lose history: it then
    // stops as if signalled and exits with the reason.
    let (refuse, refused) = tokio::sync::oneshot::channel::<String>();
    let stream_ready = async move {
        loop {
            match stream_settings.ensure(ready_log.context()).await {
                Ok(_) => break,
                Err(eventlog::Error::Configuration(reason)) => {
                    let _ = refuse.send(reason);
                    // Never consume: the engine waits for this until the reader stops.
                    let _ = ready_stop.wait_for(|stop| *stop).await;
                    return;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(SETUP_RETRY_DELAY) => {}
                _ = ready_stop.wait_for(|stop| *stop) => return,
            }
        }
        crate::rebuild::delete_consumer(
            &ready_log,
            &crate::rebuild::rebuild_consumer(&reader_name),
        )
        .await;
    };
    let (view, engine) = crate::served::start_view(
        &log,
        crate::served::StartView {
            database,
            path: path.clone(),
            consumer_name: &config.reader_name,
            crash_after_commits: config.crash_after_commits,
            ready: stream_ready,
            continues: None,
        },
    )?;
    tracing::info!(path = %path.display(), position = view.applied_position(), "views loaded");
    let served = Served::new(view, engine);
    let rebuilder = Rebuilder::new(
        served.clone(),
        log.clone(),
        &config.data_directory,
        &config.reader_name,
        stop_receiver.clone(),
    );

    let recovery = tokio::spawn(crate::storage::recover(
        served.clone(),
        log.clone(),
        config.failpoint_storage_file.clone(),
        stop_receiver.clone(),
    ));
    tracing::info!(address = %config.http_address, reader = %config.reader_name, "reader HTTP API listening");
    let state = QueryState {
        served: served.clone(),
        rebuilder: rebuilder.clone(),
        min_position_wait: config.min_position_wait,
        nats: client.clone(),
        catch_up: Arc::new(CatchUp::default()),
        ready_max_lag: config.ready_max_lag,
        http_token: config.http_token.clone(),
        waiters: Arc::new(tokio::sync::Semaphore::new(config.max_position_waiters)),
        stream_end: Arc::new(crate::stream_end::StreamEnd::new(log.clone())),
    };
    let refusal = Arc::new(std::sync::OnceLock::new());
    let stop_serving = {
        let refusal = refusal.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                Ok(reason) = refused => {
                    tracing::error!(%reason, "refusing to run");
                    let _ = refusal.set(reason);
                }
            }
        }
    };
    problem::serve(
        listener,
        http::router(state),
        config.http_limits,
        stop_serving,
    )
    .await;
    tracing::info!("shutting down the reader");
    let _ = stop_sender.send(true);
    let stopped = async {
        let _ = recovery.await;
        rebuilder.stopped().await;
        if let Some(engine) = served.take_engine() {
            engine.stop().await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, stopped).await.is_err() {
        tracing::warn!("projection did not stop in time");
    }
    let _ = client.flush().await;
    tracing::info!("reader stopped");
    match refusal.get() {
        Some(reason) => Err(Error::Startup(format!("refusing to run: {reason}"))),
        None => Ok(()),
    }
}
