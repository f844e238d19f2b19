//! The view the query API serves, and the position it states.
//!
//! A reader serves one view at a time: a redb file with its projection engine. A rebuild (see
//! [`crate::rebuild`]) swaps another in while requests run, so handlers take the current view
//! once per request ([`Served::current`]) and read only from it.
//!
//! The position stamped on responses and awaited by `min_position` is the *served* position: the
//! largest position the serving view had applied. It never goes back, across a swap too: a view
//! is swapped in only once it has applied at least that position, and only the serving view's
//! engine may raise it, both under one lock. So `X-Coffer-Position` never claims more than the
//! view a handler then reads holds.

use std::sync::{Arc, Mutex, MutexGuard};

use projection::ViewHealth;
use redb::Database;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use eventlog::EventLog;

use crate::views::{Integrity, LedgerViews};

/// One view: its redb file, its engine's health and applied position, and how to stop it.
pub struct View {
    pub database: Arc<Database>,
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
    /// Stops the engine and waits for its task (a commit in progress finishes first: the
    /// engine applies nothing twice, however it is stopped).
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

    /// Swaps `view` in if it has applied at least the served position; returns the view and
    /// engine it replaced. Otherwise hands `view` and `engine` back.
    ///
    /// One exception: a serving view that stopped on an error (ahead of a re-created stream,
    /// say) is replaced by a view that has caught up with the stream (`caught_up`), even at a
    /// lower position; the served position then follows the new view down. That is the repair
    /// the operator asked for, and the old positions meant another stream.
    pub fn swap_if_caught_up(
        self: &Arc<Self>,
        view: Arc<View>,
        engine: Option<Running>,
        caught_up: bool,
    ) -> Result<Serving, Serving> {
        let follower = view.applied.clone();
        let (generation, replaced) = {
            let mut slot = self.lock();
            let applied = view.applied_position();
            let repair = caught_up && slot.view.health.failure().is_some();
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

/// Opens the views in `database` and starts their engine on `consumer_name` once `ready`
/// completes (the stream exists).
pub fn start_view(
    database: Arc<Database>,
    consumer_name: &str,
    log: &EventLog,
    crash_after_commits: Option<u64>,
    ready: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::Result<(View, Running)> {
    let views = LedgerViews::default();
    let integrity = views.integrity.clone();
    let engine = projection::Engine::open(database.clone(), views, consumer_name)?
        .crash_after_commits(crash_after_commits);
    let view = View {
        database,
        health: engine.health(),
        integrity,
        applied: engine.applied(),
        consumer_name: consumer_name.to_owned(),
    };
    let (stop, stop_receiver) = watch::channel(false);
    let log = log.clone();
    let task = tokio::spawn(async move {
        ready.await;
        engine.run(log, stop_receiver).await;
    });
    Ok((view, Running { stop, task }))
}
