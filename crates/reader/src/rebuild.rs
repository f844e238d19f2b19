//! Blue/green rebuild of a reader's views, while it serves.
//!
//! A rebuild replays the stream from position 0 into a second file (`views.rebuild.redb`) on a
//! second durable consumer (`{reader}-rebuild`), beside the serving view. Once the new view has
//! applied at least the served position it is swapped in under the serving lock (see
//! [`crate::served`]): requests that started on the old view finish on it, later ones read the
//! new one, and the stated position never goes back. Then the new file takes the usual name
//! (`views.redb`, an atomic rename) and its engine moves to the reader's own consumer name, so
//! a restart, `coffer projection status` and the operator's dashboards find it where they did.
//!
//! Crash safety: until the rename, `views.redb` is the old, complete view, and a restart deletes
//! the half-built file. After it, `views.redb` is the new view, and the engine re-creates the
//! reader's consumer to continue after its stored position, as on any start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use eventlog::EventLog;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::served::{start_view, Served, View};

/// The serving view's file name in the data directory.
pub const VIEWS_FILE: &str = "views.redb";
/// Where a rebuild builds the next view.
pub const REBUILD_FILE: &str = "views.rebuild.redb";
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// The rebuild consumer of a reader.
pub fn rebuild_consumer(reader_name: &str) -> String {
    format!("{reader_name}-rebuild")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildState {
    /// No rebuild since the reader started.
    Idle,
    /// Replaying into the new file.
    Building,
    /// The new view serves; its engine moves to the reader's consumer name.
    Swapping,
    Completed,
    Failed,
}

/// What `GET /v1/projection/rebuild` answers.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildStatus {
    pub state: RebuildState,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Position the new view has applied.
    pub applied_position: u64,
    /// The serving view's position: the new view swaps in once it has applied this.
    pub target_position: u64,
    /// Events the new view's consumer still had to deliver at its last delivery.
    pub pending_events: u64,
    pub events_applied: u64,
    pub error: Option<String>,
}

impl RebuildStatus {
    fn idle() -> Self {
        Self {
            state: RebuildState::Idle,
            started_at: None,
            finished_at: None,
            applied_position: 0,
            target_position: 0,
            pending_events: 0,
            events_applied: 0,
            error: None,
        }
    }

    pub fn running(&self) -> bool {
        matches!(self.state, RebuildState::Building | RebuildState::Swapping)
    }
}

pub struct Rebuilder {
    served: Arc<Served>,
    log: EventLog,
    data_directory: PathBuf,
    reader_name: String,
    shutdown: watch::Receiver<bool>,
    status: Mutex<RebuildStatus>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn now() -> Option<String> {
    OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

impl Rebuilder {
    pub fn new(
        served: Arc<Served>,
        log: EventLog,
        data_directory: &Path,
        reader_name: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            served,
            log,
            data_directory: data_directory.to_owned(),
            reader_name: reader_name.to_owned(),
            shutdown,
            status: Mutex::new(RebuildStatus::idle()),
            task: Mutex::new(None),
        })
    }

    fn lock_status(&self) -> MutexGuard<'_, RebuildStatus> {
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn status(&self) -> RebuildStatus {
        self.lock_status().clone()
    }

    /// Starts a rebuild; a running one is returned as the error (one at a time).
    pub fn start(self: &Arc<Self>) -> Result<RebuildStatus, RebuildStatus> {
        let status = {
            let mut status = self.lock_status();
            if status.running() {
                return Err(status.clone());
            }
            *status = RebuildStatus {
                state: RebuildState::Building,
                started_at: now(),
                ..RebuildStatus::idle()
            };
            status.clone()
        };
        let rebuilder = self.clone();
        let task = tokio::spawn(async move {
            let result = rebuilder.build().await;
            let mut status = rebuilder.lock_status();
            status.finished_at = now();
            match result {
                Ok(()) => {
                    status.state = RebuildState::Completed;
                    tracing::info!(
                        position = status.applied_position,
                        events = status.events_applied,
                        "rebuilt view swapped in"
                    );
                }
                Err(error) => {
                    tracing::error!(%error, "view rebuild failed; the serving view is unchanged");
                    status.state = RebuildState::Failed;
                    status.error = Some(error);
                }
            }
        });
        *self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(task);
        Ok(status)
    }

    /// Waits for a running rebuild to notice the shutdown and stop.
    pub async fn stopped(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    fn next_path(&self) -> PathBuf {
        self.data_directory.join(REBUILD_FILE)
    }

    async fn build(&self) -> Result<(), String> {
        let path = self.next_path();
        remove_file_if_any(&path)?;
        let database = Arc::new(
            redb::Database::create(&path)
                .map_err(|error| format!("create {}: {error}", path.display()))?,
        );
        let consumer = rebuild_consumer(&self.reader_name);
        tracing::info!(path = %path.display(), %consumer, "rebuilding the views from position 0");
        let (view, engine) = start_view(
            database.clone(),
            &consumer,
            &self.log,
            None,
            std::future::ready(()),
        )
        .map_err(|error| error.to_string())?;
        let mut view = Arc::new(view);
        let mut engine = Some(engine);
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        loop {
            tick.tick().await;
            if *self.shutdown.borrow() || view.health.failure().is_some() {
                let reason = view
                    .health
                    .failure()
                    .unwrap_or_else(|| "the reader is shutting down".into());
                if let Some(engine) = engine.take() {
                    engine.stop().await;
                }
                drop(view);
                drop(database);
                self.forget(&consumer, &path).await;
                return Err(reason);
            }
            self.progress(&view);
            if !view
                .health
                .start_known
                .load(std::sync::atomic::Ordering::Acquire)
            {
                continue;
            }
            let caught_up = view.health.caught_up(0);
            match self.served.swap_if_caught_up(view, engine, caught_up) {
                Ok((old_view, old_engine)) => {
                    if let Some(old_engine) = old_engine {
                        old_engine.stop().await;
                    }
                    self.delete_consumer(&old_view.consumer_name).await;
                    break;
                }
                Err((back_view, back_engine)) => {
                    view = back_view;
                    engine = back_engine;
                }
            }
        }
        self.lock_status().state = RebuildState::Swapping;
        let serving = self.data_directory.join(VIEWS_FILE);
        std::fs::rename(&path, &serving).map_err(|error| {
            format!(
                "the rebuilt view serves, but renaming {} to {} failed ({error}); a restart serves the old view",
                path.display(),
                serving.display()
            )
        })?;
        // Move the engine to the reader's own consumer: stop it, start it again on the same file.
        if let Some(engine) = self.served.take_engine() {
            engine.stop().await;
        }
        let (view, engine) = start_view(
            database,
            &self.reader_name,
            &self.log,
            None,
            std::future::ready(()),
        )
        .map_err(|error| error.to_string())?;
        self.progress(&view);
        if let Err((_, engine)) = self
            .served
            .swap_if_caught_up(Arc::new(view), Some(engine), false)
        {
            // Cannot happen (same file, same position), but never leave the view without an engine.
            if let Some(engine) = engine {
                self.served.set_engine(engine);
            }
            return Err("the restarted view was behind the served position".into());
        }
        self.delete_consumer(&consumer).await;
        Ok(())
    }

    fn progress(&self, view: &View) {
        let mut status = self.lock_status();
        status.applied_position = view.applied_position();
        status.target_position = self.served.position_now();
        status.pending_events = view.health.lag.get().max(0) as u64;
        status.events_applied = status.events_applied.max(view.health.events_applied.get());
    }

    /// Removes an abandoned rebuild: its consumer and its file.
    async fn forget(&self, consumer: &str, path: &Path) {
        self.delete_consumer(consumer).await;
        if let Err(error) = remove_file_if_any(path) {
            tracing::warn!(%error, "could not remove the abandoned rebuild file");
        }
    }

    async fn delete_consumer(&self, name: &str) {
        delete_consumer(&self.log, name).await;
    }
}

/// Deletes a durable consumer if it exists (best effort: a leftover costs the server little).
pub async fn delete_consumer(log: &EventLog, name: &str) {
    let result = match log.context().get_stream(log.stream_name()).await {
        Ok(stream) => stream
            .delete_consumer(name)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match result {
        Ok(()) => tracing::info!(consumer = name, "deleted consumer"),
        Err(error) => tracing::debug!(consumer = name, %error, "consumer not deleted"),
    }
}

pub fn remove_file_if_any(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(format!("remove {}: {error}", path.display())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// One rebuild at a time: a second start while one runs is refused with the running one,
    /// and a start after it finished begins a new one.
    #[tokio::test(flavor = "current_thread")]
    async fn a_second_rebuild_is_refused_while_one_runs() {
        let nats = testkit::NatsServer::start();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let settings = eventlog::StreamSettings::default();
        let log = EventLog::open(client, &settings).await.unwrap();
        let data = tempfile::tempdir().unwrap();
        let database = Arc::new(redb::Database::create(data.path().join(VIEWS_FILE)).unwrap());
        let (view, engine) =
            start_view(database, "unit", &log, None, std::future::ready(())).unwrap();
        let served = Served::new(view, engine);
        let (_stop, shutdown) = watch::channel(false);
        let rebuilder = Rebuilder::new(served, log, data.path(), "unit", shutdown);

        let first = rebuilder.start().unwrap();
        assert_eq!(first.state, RebuildState::Building);
        // The current-thread runtime has not run the rebuild task yet: it is still running.
        let refused = rebuilder.start().unwrap_err();
        assert_eq!(refused.started_at, first.started_at);
        rebuilder.stopped().await;
        assert_eq!(rebuilder.status().state, RebuildState::Completed);
        assert!(rebuilder.start().is_ok());
        rebuilder.stopped().await;
        assert_eq!(rebuilder.status().state, RebuildState::Completed);
    }
}
