//! The view file and its recovery from storage faults.
//!
//! After an I/O error (a full disk, say) redb refuses every operation until the file is closed
//! and opened again. The engine stops on such an error and says why (`/readyz`: `view_failed`);
//! [`recover`] then closes the serving view (reads answer `503 unavailable` meanwhile), waits
//! for reads in flight to let go of the file, reopens it with backoff until the disk takes
//! writes again, and starts the engine where the file's checkpoint says: nothing is lost or
//! applied twice, since the position is committed with the rows.

use std::fs::OpenOptions;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use eventlog::EventLog;
use redb::backends::FileBackend;
use redb::{BackendError, Database, StorageBackend};
use tokio::sync::watch;

use crate::served::{start_view, Served, StartView, View};

const CHECK_INTERVAL: Duration = Duration::from_millis(250);
const REOPEN_BACKOFF_FIRST: Duration = Duration::from_millis(500);
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long to wait for reads in flight to let go of the failed file before trying to reopen
/// (a reopen while they hold it fails and is retried).
const RELEASE_WAIT_MAX: Duration = Duration::from_secs(10);
/// A view that ran this long after a reopen starts the next recovery at the first backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Opens (or creates) the view file; with `failpoint`, writes fail while that file exists (a
/// test's stand-in for a full disk, exercising redb's real failure path).
pub fn open(path: &Path, failpoint: Option<&Path>) -> Result<Database, String> {
    let describe = |error: &dyn std::fmt::Display| format!("open {}: {error}", path.display());
    match failpoint {
        None => Database::create(path).map_err(|error| describe(&error)),
        Some(trigger) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|error| describe(&error))?;
            let inner = FileBackend::new(file).map_err(|error| describe(&error))?;
            Database::builder()
                .create_with_backend(FailpointBackend {
                    inner,
                    trigger: trigger.to_owned(),
                })
                .map_err(|error| describe(&error))
        }
    }
}

/// Watches the serving view and reopens its file after a storage failure, until `shutdown`.
pub async fn recover(
    served: Arc<Served>,
    log: EventLog,
    failpoint: Option<PathBuf>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Kept across failures: a disk that fails again soon after a reopen is retried ever more
    // slowly instead of every check interval.
    let mut backoff = REOPEN_BACKOFF_FIRST;
    let mut last_reopened: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        if !storage_failed(&served.current()) {
            continue;
        }
        let _maintenance = served.maintenance.lock().await;
        // A rebuild may have replaced the failed view while we waited for the lock.
        let serving = served.current();
        if !storage_failed(&serving) || serving.database.is_none() {
            continue;
        }
        if last_reopened.is_none_or(|at| at.elapsed() > STABLE_AFTER) {
            backoff = REOPEN_BACKOFF_FIRST;
        }
        let path = serving.path.clone();
        tracing::warn!(path = %path.display(), "reopening the view file after a storage failure");
        if let Some(engine) = served.take_engine() {
            engine.stop().await;
        }
        let closed = Arc::new(View {
            database: None,
            path: path.clone(),
            health: serving.health.clone(),
            integrity: serving.integrity.clone(),
            applied: serving.applied.clone(),
            consumer_name: serving.consumer_name.clone(),
        });
        let released = match served.swap(closed.clone(), None, false) {
            Ok((old, _)) => old.database.clone(),
            Err(_) => None,
        };
        drop(serving);
        if let Some(database) = released {
            // Reads in flight hold the file; redb refuses a second open while they do.
            let deadline = tokio::time::Instant::now() + RELEASE_WAIT_MAX;
            while Arc::strong_count(&database) > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(database);
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
            match reopen(&closed, &log, failpoint.clone()).await {
                Ok((view, engine)) => {
                    closed.health.recovered();
                    // The file is the truth: if it holds less than was served (it cannot,
                    // the checkpoint is committed with the rows), serve it anyway.
                    let view = Arc::new(view);
                    if let Err((view, engine)) = served.swap(view, Some(engine), false) {
                        tracing::error!("the reopened view is behind the served position");
                        let _ = served.swap(view, engine, true);
                    }
                    last_reopened = Some(tokio::time::Instant::now());
                    tracing::info!(path = %path.display(), "view file reopened; the view resumes");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "the view file cannot be reopened yet");
                }
            }
        }
    }
}

fn storage_failed(view: &View) -> bool {
    view.health
        .storage_failed
        .load(std::sync::atomic::Ordering::Acquire)
}

/// Opens the file again (off the async threads: opening may repair it) and starts its engine,
/// continuing the closed view's health. Fails, to be retried, while the disk refuses writes:
/// opening the engine writes.
async fn reopen(
    closed: &View,
    log: &EventLog,
    failpoint: Option<PathBuf>,
) -> Result<(View, crate::served::Running), String> {
    let path = closed.path.clone();
    let database = tokio::task::spawn_blocking(move || open(&path, failpoint.as_deref()))
        .await
        .map_err(|error| error.to_string())??;
    start_view(
        log,
        StartView {
            database: Arc::new(database),
            path: closed.path.clone(),
            consumer_name: &closed.consumer_name,
            crash_after_commits: None,
            ready: std::future::ready(()),
            continues: Some(closed),
        },
    )
    .map_err(|error| error.to_string())
}

/// A file backend whose writes fail while a trigger file exists.
#[derive(Debug)]
struct FailpointBackend {
    inner: FileBackend,
    trigger: PathBuf,
}

impl FailpointBackend {
    fn check(&self) -> Result<(), std::io::Error> {
        if self.trigger.exists() {
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "failpoint: no space left on device",
            ))
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for FailpointBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
