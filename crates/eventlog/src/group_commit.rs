//! Group commit: appends from many account actors gathered into one JetStream atomic batch, so
//! one acknowledgement (and the stream's write of the batch) serves many commands.
//!
//! Each member of a batch keeps its own conditions, and JetStream checks every condition of an
//! atomic batch against the stream as it was *before* the batch. Two members that condition the
//! same account (two transfers crediting one receiver, decided on the same copy of it) would both
//! pass inside one batch where, sent one after the other, the second would fail: both credits
//! would be stored and the receiver's chain would fork. So a batch never holds two members that
//! touch the same account or marker subject; a later one waits for the next batch, where its
//! stale condition fails as it would have alone.
//!
//! No latency is added at low load: an append is sent at once while fewer than
//! [`GroupCommitSettings::batches_in_flight_max`] batches await their acknowledgement; once that
//! many do, appends queue, and the next batch takes what has queued (up to
//! [`GroupCommitSettings::messages_max`] messages) as soon as one is acknowledged. Appends that
//! touch an account or marker of a batch in flight wait for it, so that their condition is
//! checked after it, as it would be had they been sent one after the other.
//!
//! A batch JetStream refuses stored nothing, and the refusal does not say which member failed:
//! the members are then appended one by one at once, so only the member whose condition failed
//! sees the conflict. An acknowledgement that never came leaves every member's outcome unknown
//! (the batch is atomic: all of them or none are stored).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::log::BATCH_SIZE_MAX;
use crate::{subject, Appended, Entry, Error, EventLog, Result};

/// How group commit gathers appends.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitSettings {
    /// Most messages in one batch, at most the server's 1000. 1 turns gathering off: every
    /// append is sent on its own.
    pub messages_max: usize,
    /// Most batches awaiting their acknowledgement at once. Default 1: the next batch goes when
    /// the previous one is acknowledged, which measured best (docs/benchmarks.md); more sends
    /// smaller batches sooner. The server takes 50 atomic batches in flight per stream.
    pub batches_in_flight_max: usize,
    /// Most appends waiting for a batch; a full queue makes callers wait to enqueue.
    pub queue_max: usize,
}

impl Default for GroupCommitSettings {
    fn default() -> Self {
        Self {
            messages_max: BATCH_SIZE_MAX,
            batches_in_flight_max: 1,
            queue_max: 10_000,
        }
    }
}

/// What group commit has done, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct GroupCommitCounters {
    /// Batches sent (a member sent alone counts as one).
    pub batches: AtomicU64,
    /// Appends sent in them.
    pub members: AtomicU64,
    /// Batches refused whole and sent again member by member.
    pub split: AtomicU64,
    /// Appends dropped unsent because their deadline had passed while they waited.
    pub expired: AtomicU64,
}

struct Member {
    entries: Vec<Entry>,
    /// After this instant the member is not sent: its caller has answered by then.
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Appended>>,
}

impl Member {
    /// The accounts and marker subjects the member's conditions are about.
    fn keys(&self) -> impl Iterator<Item = String> + '_ {
        self.entries.iter().map(|entry| match entry {
            Entry::Event { account, .. } => subject::account_filter(account),
            Entry::Marker { subject, .. } => subject.clone(),
        })
    }
}

/// The writer's group committer: a task that owns the sending of appends.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Member>,
    counters: Arc<GroupCommitCounters>,
}

impl GroupCommit {
    /// Starts the committer on `log`; it stops when the last handle is dropped.
    pub fn start(log: EventLog, settings: GroupCommitSettings) -> Self {
        let (queue, receiver) = mpsc::channel(settings.queue_max.max(1));
        let counters = Arc::new(GroupCommitCounters::default());
        tokio::spawn(run(log, receiver, settings, counters.clone()));
        Self { queue, counters }
    }

    pub fn counters(&self) -> Arc<GroupCommitCounters> {
        self.counters.clone()
    }

    /// Appends `entries` all together or not at all, as [`EventLog::append_atomic`] does, in a
    /// batch with other appends. Nothing is sent after `deadline`: a member still waiting then
    /// is answered `Unavailable`.
    pub async fn append(&self, entries: Vec<Entry>, deadline: Option<Instant>) -> Result<Appended> {
        if entries.is_empty() || entries.len() > BATCH_SIZE_MAX {
            return Err(Error::Encode(format!(
                "an append holds 1 to {BATCH_SIZE_MAX} messages, not {}",
                entries.len()
            )));
        }
        let (reply, answer) = oneshot::channel();
        let member = Member {
            entries,
            deadline,
            reply,
        };
        self.queue
            .send(member)
            .await
            .map_err(|_| Error::Unavailable("the group committer has stopped".into()))?;
        answer.await.map_err(|_| {
            Error::OutcomeUnknown("the group committer stopped during the append".into())
        })?
    }
}

/// Most batches in flight whatever the settings say: the server's limit is 50 per stream.
const BATCHES_IN_FLIGHT_LIMIT: usize = 32;
/// Members of a refused batch sent again at once.
const SPLIT_CONCURRENCY_MAX: usize = 16;

async fn run(
    log: EventLog,
    mut receiver: mpsc::Receiver<Member>,
    settings: GroupCommitSettings,
    counters: Arc<GroupCommitCounters>,
) {
    let messages_max = settings.messages_max.clamp(1, BATCH_SIZE_MAX);
    let in_flight_max = settings
        .batches_in_flight_max
        .clamp(1, BATCHES_IN_FLIGHT_LIMIT);
    // Members not sent yet, oldest first.
    let mut waiting: VecDeque<Member> = VecDeque::new();
    // Batches awaiting their acknowledgement; each gives back the keys it held.
    let mut in_flight = FuturesUnordered::new();
    // Accounts and marker subjects of the batches in flight.
    let mut busy: HashSet<String> = HashSet::new();
    let mut closed = false;
    loop {
        while in_flight.len() < in_flight_max && !waiting.is_empty() {
            let batch = next_batch(&mut waiting, messages_max, &busy, &counters);
            if batch.is_empty() {
                break;
            }
            let keys: Vec<String> = batch.iter().flat_map(Member::keys).collect();
            busy.extend(keys.iter().cloned());
            let (log, counters) = (log.clone(), counters.clone());
            in_flight.push(async move {
                send(&log, batch, &counters).await;
                keys
            });
        }
        if closed && waiting.is_empty() && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            member = receiver.recv(), if !closed => match member {
                Some(member) => {
                    waiting.push_back(member);
                    // What has queued already joins it: waiting for more would add latency.
                    while waiting.len() < BATCH_SIZE_MAX {
                        match receiver.try_recv() {
                            Ok(member) => waiting.push_back(member),
                            Err(_) => break,
                        }
                    }
                }
                None => closed = true,
            },
            Some(keys) = in_flight.next(), if !in_flight.is_empty() => {
                for key in keys {
                    busy.remove(&key);
                }
            }
        }
    }
}

/// Takes the oldest members that fit in one batch and touch nothing another one in it, or a
/// batch in flight (`busy`), does.
fn next_batch(
    waiting: &mut VecDeque<Member>,
    messages_max: usize,
    busy: &HashSet<String>,
    counters: &GroupCommitCounters,
) -> Vec<Member> {
    let now = Instant::now();
    let mut batch = Vec::new();
    let mut keys: HashSet<String> = HashSet::new();
    let mut messages = 0;
    let mut kept = VecDeque::with_capacity(waiting.len());
    while let Some(member) = waiting.pop_front() {
        if member.deadline.is_some_and(|deadline| now >= deadline) {
            counters.expired.fetch_add(1, Ordering::Relaxed);
            let _ = member.reply.send(Err(Error::Unavailable(
                "the append reached its deadline before it could be sent".into(),
            )));
            continue;
        }
        let fits = batch.is_empty() || messages + member.entries.len() <= messages_max;
        let member_keys: Vec<String> = member.keys().collect();
        let free = member_keys
            .iter()
            .all(|key| !keys.contains(key) && !busy.contains(key));
        if fits && free {
            messages += member.entries.len();
            keys.extend(member_keys);
            batch.push(member);
        } else {
            kept.push_back(member);
        }
    }
    *waiting = kept;
    batch
}

async fn send(log: &EventLog, batch: Vec<Member>, counters: &GroupCommitCounters) {
    counters.batches.fetch_add(1, Ordering::Relaxed);
    counters
        .members
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    if batch.len() == 1 {
        for member in batch {
            let result = log
                .append_atomic_before(&member.entries, member.deadline)
                .await;
            let _ = member.reply.send(result);
        }
        return;
    }
    let entries: Vec<Entry> = batch
        .iter()
        .flat_map(|member| member.entries.iter().cloned())
        .collect();
    // Committed only while every member's deadline is ahead.
    let deadline = batch.iter().filter_map(|member| member.deadline).min();
    match log.append_atomic_before(&entries, deadline).await {
        Ok(appended) => {
            let mut first = appended.first_position;
            for member in batch {
                let count = member.entries.len() as u64;
                let _ = member.reply.send(Ok(Appended {
                    first_position: first,
                    last_position: first + count - 1,
                }));
                first += count;
            }
        }
        // The batch may be stored whole: so may every member.
        Err(Error::OutcomeUnknown(detail)) => {
            for member in batch {
                let _ = member
                    .reply
                    .send(Err(Error::OutcomeUnknown(detail.clone())));
            }
        }
        // Nothing was sent or stored, and the cause is not any member's.
        Err(Error::Unavailable(detail)) => {
            for member in batch {
                let _ = member.reply.send(Err(Error::Unavailable(detail.clone())));
            }
        }
        // Refused whole (a condition failed, or something else about one member): nothing was
        // stored. Each member alone finds out whether it was the one.
        Err(_) => {
            counters.split.fetch_add(1, Ordering::Relaxed);
            // A bounded number at a time: each may be an atomic batch, and the server takes 50
            // in flight per stream, shared with the other writers.
            futures::stream::iter(batch)
                .for_each_concurrent(SPLIT_CONCURRENCY_MAX, |member| async move {
                    let result = if member
                        .deadline
                        .is_some_and(|deadline| Instant::now() >= deadline)
                    {
                        counters.expired.fetch_add(1, Ordering::Relaxed);
                        Err(Error::Unavailable(
                            "the append reached its deadline before it could be sent again".into(),
                        ))
                    } else {
                        log.append_atomic_before(&member.entries, member.deadline)
                            .await
                    };
                    let _ = member.reply.send(result);
                })
                .await;
        }
    }
}
