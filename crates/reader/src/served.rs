//! The view the query API serves, and the position it states.
//!
//! A reader serves one view at a time: a redb file with its projection engine. A rebuild (see
//! [`crate::rebuild`]) swaps another in while requests run, so handlers take the current view
//! once per request ([`Served::current`]) and read only from it.
//!
//! The *served* position, stamped on responses and awaited by `min_position`, follows the
//! serving view's applied position (a follower task raises it after each commit, so it may lag
//! the file by a commit, never lead it). A normal swap happens only once the new view has
//! applied everything the old one holds (its engine stopped first, see the rebuild), and only
//! raises the served position: reads never go back, in position or in content. A repair swap
//! (the serving view had stopped on an error) may lower it; the query API then stamps the lower
//! of the positions before and after its read, so no response claims more than it read.

use std::sync::{Arc, Mutex, MutexGuard};

use projection::ViewHealth;
use redb::Database;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use eventlog::EventLog;

use crate::views::{Integrity, LedgerViews};

/// One view: its redb file, its engine's health and applied position, and how to stop it.
pub struct View {
    /// `None` while the file is closed to be reopened after a storage failure.
    pub database: Option<Arc<Database>>,
    /// The file's path (`views.redb`, or the rebuild's file until it is renamed).
    pub path: std::path::PathBuf,
    pub health: Arc<ViewHealth>,
    pub integrity: Arc<Integrity>,
    /// The engine's applied position (a `watch` the engine updates after each commit).
    pub applied: watch::Receiver<u64>,
    /// Its durable consumer.
    pub consumer_name: String,
}

impl View {
    pub fn applied_position(&self) -> u64 {
        *self.applied.borrow()
    }
}

/// A running engine: the signal that stops it and its task.
pub struct Running {
    pub stop: watch::Sender<bool>,
    pub task: JoinHandle<()>,
}

impl Running {
    /// Stops the engine and waits for its task. The engine stops between batches only, so
    /// once this returns the file's checkpoint is final and the applied position exact.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A view with the engine running it (none once stopped or taken).
pub type Serving = (Arc<View>, Option<Running>);

struct Slot {
    /// Bumped on every swap, so a follower of an older view stops raising the position.
    generation: u64,
    view: Arc<View>,
    engine: Option<Running>,
}

pub struct Served {
    slot: Mutex<Slot>,
    position: watch::Sender<u64>,
    /// Held by whoever replaces the view and its engine (a rebuild, a storage recovery), so
    /// two replacements never interleave.
    pub maintenance: tokio::sync::Mutex<()>,
}

impl Served {
    pub fn new(view: View, engine: Running) -> Arc<Self> {
        let (position, _) = watch::channel(view.applied_position());
        let served = Arc::new(Self {
            slot: Mutex::new(Slot {
                generation: 0,
                view: Arc::new(view),
                engine: Some(engine),
            }),
            position,
            maintenance: tokio::sync::Mutex::new(()),
        });
        let follower = served.current().applied.clone();
        served.follow(0, follower);
        served
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The view to read from for this request.
    pub fn current(&self) -> Arc<View> {
        self.lock().view.clone()
    }

    /// The served position (see the module documentation).
    pub fn position(&self) -> watch::Receiver<u64> {
        self.position.subscribe()
    }

    pub fn position_now(&self) -> u64 {
        *self.position.borrow()
    }

    /// Swaps `view` in if it has applied at least the served position (or, for a `repair`,
    /// whatever it has applied: the served position then follows it down); returns the view and
    /// engine it replaced. Otherwise hands `view` and `engine` back. A caller that needs the new
    /// view to hold everything the old one shows stops the old engine and waits first.
    pub fn swap(
        self: &Arc<Self>,
        view: Arc<View>,
        engine: Option<Running>,
        repair: bool,
    ) -> Result<Serving, Serving> {
        let follower = view.applied.clone();
        let (generation, replaced) = {
            let mut slot = self.lock();
            let applied = view.applied_position();
            if applied < *self.position.borrow() && !repair {
                return Err((view, engine));
            }
            slot.generation += 1;
            let old_view = std::mem::replace(&mut slot.view, view);
            let old_engine = std::mem::replace(&mut slot.engine, engine);
            if repair {
                self.position.send_replace(applied);
            } else {
                self.raise(applied);
            }
            (slot.generation, (old_view, old_engine))
        };
        self.follow(generation, follower);
        Ok(replaced)
    }

    /// Takes the serving view's engine (to stop it at shutdown or before replacing it).
    pub fn take_engine(&self) -> Option<Running> {
        self.lock().engine.take()
    }

    /// Records the engine now running the serving view (after a restart on the same file).
    pub fn set_engine(&self, engine: Running) -> Option<Running> {
        self.lock().engine.replace(engine)
    }

    fn raise(&self, applied: u64) {
        self.position.send_if_modified(|position| {
            if applied > *position {
                *position = applied;
                true
            } else {
                false
            }
        });
    }

    /// Raises the served position as the view of `generation` applies events, until that
    /// view is swapped out or its engine stops.
    fn follow(self: &Arc<Self>, generation: u64, mut applied: watch::Receiver<u64>) {
        let served = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let position = *applied.borrow_and_update();
                let Some(served) = served.upgrade() else {
                    return;
                };
                {
                    let slot = served.lock();
                    if slot.generation != generation {
                        return;
                    }
                    served.raise(position);
                }
                drop(served);
                if applied.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// How to start a view's engine.
pub struct StartView<'a, R> {
    pub database: Arc<Database>,
    pub path: std::path::PathBuf,
    pub consumer_name: &'a str,
    pub crash_after_commits: Option<u64>,
    /// Completes once the stream exists; the engine starts then (or never, if stopped first).
    pub ready: R,
    /// The view this engine continues on the same file (moved to another consumer): its
    /// health and integrity counters carry on.
    pub continues: Option<&'a View>,
}

/// Opens the views in the file and starts their engine.
pub fn start_view<R>(log: &EventLog, start: StartView<'_, R>) -> crate::Result<(View, Running)>
where
    R: std::future::Future<Output = ()> + Send + 'static,
{
    let views = LedgerViews {
        integrity: start
            .continues
            .map(|view| view.integrity.clone())
            .unwrap_or_default(),
        trusted: log.trusted_keys().cloned(),
    };
    let integrity = views.integrity.clone();
    let mut engine = projection::Engine::open(start.database.clone(), views, start.consumer_name)?
        .crash_after_commits(start.crash_after_commits);
    if let Some(view) = start.continues {
        engine = engine.with_health(view.health.clone());
    }
    let view = View {
        database: Some(start.database),
        path: start.path,
        health: engine.health(),
        integrity,
        applied: engine.applied(),
        consumer_name: start.consumer_name.to_owned(),
    };
    let (stop, stop_receiver) = watch::channel(false);
    let log = log.clone();
    let ready = start.ready;
    let mut stopped = stop_receiver.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = ready => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        engine.run(log, stop_receiver).await;
    });
    Ok((view, Running { stop, task }))
}
