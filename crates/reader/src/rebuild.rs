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

use crate::served::{start_view, Running, Served, StartView, View};

/// The serving view's file name in the data directory.
pub const VIEWS_FILE: &str = "views.redb";
/// Where a rebuild builds the next view.
pub const REBUILD_FILE: &str = "views.rebuild.redb";
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// How long the serving view's engine may stay stopped while the new view reaches its last
/// position (normally one batch).
const SWAP_WAIT_MAX: Duration = Duration::from_secs(30);
const DELETE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a rebuild was not started.
#[derive(Debug)]
pub enum Refusal {
    Running(RebuildStatus),
    /// The serving view's engine has not set up its consumer yet.
    NotReady,
    /// An earlier rebuild's view serves but could not be finished.
    Unfinished(String),
}

/// How a rebuild ended, when not completed.
enum Failure {
    /// Before the swap: the old view serves on, the new file and consumer are removed.
    Abandoned(String),
    /// After the swap: the new view serves, but not under the usual file or consumer name.
    Unfinished(String),
}

/// The rebuild consumer of a reader.
pub fn rebuild_consumer(reader_name: &str) -> String {
    format!("{reader_name}-rebuild")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RebuildState {
    /// No rebuild since the reader started.
    Idle,
    /// Replaying into the new file.
    Building,
    /// The new view serves; its engine moves to the reader's consumer name.
    Swapping,
    Completed,
    /// Abandoned before the swap; the old view serves on.
    Failed,
    /// Swapped in, but the file rename or the engine move failed; restart the reader.
    Unfinished,
}

/// What `GET /v1/projection/rebuild` answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RebuildStatus {
    pub state: RebuildState,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
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

    /// Starts a rebuild, unless one runs, the serving view has not set up its consumer yet, or
    /// an earlier rebuild swapped its view in but could not finish (restart the reader first).
    pub fn start(self: &Arc<Self>) -> Result<RebuildStatus, Refusal> {
        let serving = self.served.current();
        let set_up = serving.database.is_some()
            && (serving
                .health
                .start_known
                .load(std::sync::atomic::Ordering::Acquire)
                || serving.health.failure().is_some());
        let status = {
            let mut status = self.lock_status();
            if status.running() {
                return Err(Refusal::Running(status.clone()));
            }
            if status.state == RebuildState::Unfinished {
                return Err(Refusal::Unfinished(
                    status.error.clone().unwrap_or_default(),
                ));
            }
            if !set_up {
                return Err(Refusal::NotReady);
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
                Err(Failure::Abandoned(error)) => {
                    tracing::error!(%error, "view rebuild abandoned; the serving view is unchanged");
                    status.state = RebuildState::Failed;
                    status.error = Some(error);
                }
                Err(Failure::Unfinished(error)) => {
                    tracing::error!(%error, "the rebuilt view serves, but the rebuild could not finish");
                    status.state = RebuildState::Unfinished;
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

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn build(&self) -> Result<(), Failure> {
        let path = self.next_path();
        remove_file_if_any(&path).map_err(Failure::Abandoned)?;
        let database =
            Arc::new(redb::Database::create(&path).map_err(|error| {
                Failure::Abandoned(format!("create {}: {error}", path.display()))
            })?);
        let consumer = rebuild_consumer(&self.reader_name);
        tracing::info!(path = %path.display(), %consumer, "rebuilding the views from position 0");
        let started = start_view(
            &self.log,
            StartView {
                database: database.clone(),
                path: path.clone(),
                consumer_name: &consumer,
                crash_after_commits: None,
                ready: std::future::ready(()),
                continues: None,
            },
        );
        let (view, engine) = started.map_err(|error| Failure::Abandoned(error.to_string()))?;
        let view = Arc::new(view);
        let mut engine = Some(engine);
        let swapped = match self.catch_up(&view).await {
            Ok(()) => {
                let maintenance = self.served.maintenance.lock().await;
                self.swap_in(view.clone(), engine.take())
                    .await
                    .map(|()| maintenance)
            }
            Err(error) => Err(error),
        };
        let maintenance = match swapped {
            Ok(maintenance) => maintenance,
            Err(error) => {
                // Abandoned before the swap: the old view serves on; remove what was built.
                if let Some(engine) = engine.take() {
                    engine.stop().await;
                }
                drop(view);
                drop(database);
                self.forget(&consumer, &path).await;
                return Err(Failure::Abandoned(error));
            }
        };
        let finished = self
            .finish(database, &view, &path, &consumer)
            .await
            .map_err(Failure::Unfinished);
        drop(maintenance);
        finished
    }

    /// Waits until the new view has applied what the serving view has (or, if the serving view
    /// stopped on an error, until it has caught up with the stream).
    async fn catch_up(&self, view: &View) -> Result<(), String> {
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        loop {
            tick.tick().await;
            if let Some(failure) = view.health.failure() {
                return Err(failure);
            }
            if self.shutting_down() {
                return Err("the reader is shutting down".into());
            }
            self.progress(view);
            if !view
                .health
                .start_known
                .load(std::sync::atomic::Ordering::Acquire)
            {
                continue;
            }
            let serving = self.served.current();
            let repair = serving.health.failure().is_some() && view.health.caught_up(0);
            if repair || view.applied_position() >= serving.applied_position() {
                return Ok(());
            }
        }
    }

    /// Stops the serving engine (its last batch committed), waits until the new view holds
    /// everything the old one does, and swaps. If that wait fails, the old engine is started
    /// again and the old view keeps serving.
    async fn swap_in(&self, view: Arc<View>, engine: Option<Running>) -> Result<(), String> {
        let serving = self.served.current();
        let repair = serving.health.failure().is_some();
        if let Some(old_engine) = self.served.take_engine() {
            old_engine.stop().await;
        }
        let held = serving.applied_position();
        let mut applied = view.applied.clone();
        let reached = matches!(
            tokio::time::timeout(
                SWAP_WAIT_MAX,
                applied.wait_for(|position| repair || *position >= held),
            )
            .await,
            Ok(Ok(_))
        );
        if !reached || view.health.failure().is_some() {
            self.restart(&serving).await;
            if let Some(engine) = engine {
                engine.stop().await;
            }
            return Err(format!(
                "the new view did not reach position {held} within {SWAP_WAIT_MAX:?}"
            ));
        }
        match self.served.swap(view, engine, repair) {
            Ok((old_view, _)) => {
                delete_consumer(&self.log, &old_view.consumer_name).await;
                Ok(())
            }
            Err((_, engine)) => {
                self.restart(&serving).await;
                if let Some(engine) = engine {
                    engine.stop().await;
                }
                Err("the new view fell behind the served position".into())
            }
        }
    }

    /// Starts the serving view's engine again, on its own consumer.
    async fn restart(&self, serving: &View) {
        let Some(database) = serving.database.clone() else {
            tracing::error!("the serving view's file is closed; its engine was not restarted");
            return;
        };
        let started = start_view(
            &self.log,
            StartView {
                database,
                path: serving.path.clone(),
                consumer_name: &serving.consumer_name,
                crash_after_commits: None,
                ready: std::future::ready(()),
                continues: Some(serving),
            },
        );
        match started {
            Ok((_, engine)) => {
                self.served.set_engine(engine);
            }
            Err(error) => {
                tracing::error!(%error, "could not restart the serving view's engine; restart the reader")
            }
        }
    }

    /// After the swap: the new file takes the serving name and its engine the reader's own
    /// consumer name.
    async fn finish(
        &self,
        database: Arc<redb::Database>,
        view: &View,
        path: &Path,
        consumer: &str,
    ) -> Result<(), String> {
        self.lock_status().state = RebuildState::Swapping;
        let serving = self.data_directory.join(VIEWS_FILE);
        std::fs::rename(path, &serving).map_err(|error| {
            format!(
                "the rebuilt view serves, but renaming {} to {} failed ({error}); restart the reader (it then serves the old view)",
                path.display(),
                serving.display()
            )
        })?;
        if self.shutting_down() {
            // The next start serves views.redb (this view) and re-creates the reader's consumer.
            return Ok(());
        }
        if let Some(engine) = self.served.take_engine() {
            engine.stop().await;
        }
        let started = start_view(
            &self.log,
            StartView {
                database,
                path: serving.clone(),
                consumer_name: &self.reader_name,
                crash_after_commits: None,
                ready: std::future::ready(()),
                continues: Some(view),
            },
        );
        let (moved, engine) = started.map_err(|error| {
            format!("the rebuilt view serves, but its engine did not restart ({error}); restart the reader")
        })?;
        self.progress(&moved);
        if let Err((_, engine)) = self.served.swap(Arc::new(moved), Some(engine), false) {
            // Cannot happen (same file, same position), but never leave the view without an engine.
            if let Some(engine) = engine {
                self.served.set_engine(engine);
            }
            return Err("the restarted view was behind the served position".into());
        }
        delete_consumer(&self.log, consumer).await;
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
        delete_consumer(&self.log, consumer).await;
        if let Err(error) = remove_file_if_any(path) {
            tracing::warn!(%error, "could not remove the abandoned rebuild file");
        }
    }
}

/// Deletes a durable consumer if it exists (best effort: a leftover costs the server little).
pub async fn delete_consumer(log: &EventLog, name: &str) {
    let delete = async {
        let stream = log
            .context()
            .get_stream(log.stream_name())
            .await
            .map_err(|error| error.to_string())?;
        stream
            .delete_consumer(name)
            .await
            .map(|_| ())
            .map_err(|error| error.to_string())
    };
    // Bounded, so a slow NATS cannot hold a rebuild or a shutdown.
    match tokio::time::timeout(DELETE_TIMEOUT, delete).await {
        Ok(Ok(())) => tracing::info!(consumer = name, "deleted consumer"),
        Ok(Err(error)) => tracing::debug!(consumer = name, %error, "consumer not deleted"),
        Err(_) => tracing::warn!(
            consumer = name,
            "consumer not deleted in time; delete it by hand"
        ),
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

    /// A rebuild starts once the serving view is set up, one at a time: a second start while
    /// one runs is refused with the running one, and a start after it finished begins anew.
    #[tokio::test(flavor = "current_thread")]
    async fn a_second_rebuild_is_refused_while_one_runs() {
        let nats = testkit::NatsServer::start();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let settings = eventlog::StreamSettings::default();
        let log = EventLog::open(client, &settings).await.unwrap();
        let data = tempfile::tempdir().unwrap();
        let database = Arc::new(redb::Database::create(data.path().join(VIEWS_FILE)).unwrap());
        let start = StartView {
            database,
            path: data.path().join(VIEWS_FILE),
            consumer_name: "unit",
            crash_after_commits: None,
            ready: std::future::ready(()),
            continues: None,
        };
        let (view, engine) = start_view(&log, start).unwrap();
        let health = view.health.clone();
        let served = Served::new(view, engine);
        let (_stop, shutdown) = watch::channel(false);
        let rebuilder = Rebuilder::new(served, log, data.path(), "unit", shutdown);

        // The serving engine has not set up its consumer yet (its task has not run).
        assert!(matches!(rebuilder.start(), Err(Refusal::NotReady)));
        while !health
            .start_known
            .load(std::sync::atomic::Ordering::Acquire)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let first = rebuilder.start().unwrap();
        assert_eq!(first.state, RebuildState::Building);
        // The current-thread runtime has not run the rebuild task yet: it is still running.
        match rebuilder.start() {
            Err(Refusal::Running(running)) => assert_eq!(running.started_at, first.started_at),
            other => panic!("expected a refusal, got {other:?}"),
        }
        rebuilder.stopped().await;
        assert_eq!(rebuilder.status().state, RebuildState::Completed);
        assert!(rebuilder.start().is_ok());
        rebuilder.stopped().await;
        assert_eq!(rebuilder.status().state, RebuildState::Completed);
    }
}
