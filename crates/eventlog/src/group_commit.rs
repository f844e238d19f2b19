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
//! [`GroupCommitSettings::messages_max`] messages) when one is acknowledged. It may first wait,
//! up to [`GroupCommitSettings::fill_wait`], for the callers that acknowledgement answered to
//! come back with their next commands, so that they share one batch instead of following in a
//! second ([`filling`]: only while callers do come back, with nothing in flight, and never past
//! an append's deadline; a lone caller never waits). Appends that
//! touch an account or marker of a batch in flight wait for it, so that their condition is
//! checked after it, as it would be had they been sent one after the other.
//!
//! An append that lost a race to another actor's append on the same account would lose again
//! and again when that actor always has a batch in flight: decided while that batch is in
//! flight, it waits for it and is then sent on a position the batch just moved. So the loser may
//! take a *reservation* of the accounts it appends to ([`GroupCommit::reserve`]): granted in
//! queue order once no batch in flight and no earlier queued member touches them, it holds back
//! every later member touching them, so the holder decides on what the stream holds then and its
//! append goes next. The holder releases it by appending (with the reservation) or by dropping
//! it; its deadline bounds it too.
//!
//! A batch JetStream refuses stored nothing, and the refusal does not say which member failed:
//! the members are then appended one by one at once, so only the member whose condition failed
//! sees the conflict. An acknowledgement that never came leaves every member's outcome unknown
//! (the batch is atomic: all of them or none are stored).
//!
//! Nothing is sent after its member's deadline. A member whose deadline passes while its batch
//! is being staged makes the batch uncommittable (a staged message cannot be taken back); the
//! commit is then not sent, so the server drops what was staged, and the other members go again
//! in a new batch without it: one nearly expired command costs only itself.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::log::BATCH_SIZE_MAX;
use filling::{Ended, Filling, Queued};

pub mod filling;
use crate::{Appended, Entry, Error, EventLog, Result};

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
    /// Longest a batch waits to fill after an acknowledgement, for the callers just answered
    /// to come back with their next commands ([`filling`]). Zero sends what has queued at once.
    pub fill_wait: std::time::Duration,
    /// A batch waiting to fill goes once nothing has arrived for this long.
    pub fill_quiet: std::time::Duration,
}

impl Default for GroupCommitSettings {
    fn default() -> Self {
        Self {
            messages_max: BATCH_SIZE_MAX,
            batches_in_flight_max: 1,
            queue_max: 10_000,
            fill_wait: FILL_WAIT_DEFAULT,
            fill_quiet: FILL_QUIET_DEFAULT,
        }
    }
}

/// How long a batch waits to fill by default (see [`GroupCommitSettings::fill_wait`]): longer
/// than a loaded writer takes to answer a batch's callers and decide their next commands
/// (measured: 2-4 ms for 64 over HTTP on two cores), about one batch's fixed cost.
pub const FILL_WAIT_DEFAULT: std::time::Duration = std::time::Duration::from_millis(4);
/// The quiet spell that ends a wait by default (see [`GroupCommitSettings::fill_quiet`]).
pub const FILL_QUIET_DEFAULT: std::time::Duration = std::time::Duration::from_millis(2);

/// Called with the number of messages of each batch sent.
pub type BatchObserver = Box<dyn Fn(usize) + Send + Sync>;

/// What group commit has done, for metrics and benchmarks.
#[derive(Default)]
pub struct GroupCommitCounters {
    /// Batches sent (a member sent alone counts as one).
    pub batches: AtomicU64,
    /// Appends sent in them.
    pub members: AtomicU64,
    /// Batches refused whole and sent again member by member.
    pub split: AtomicU64,
    /// Appends dropped unsent because their deadline had passed while they waited.
    pub expired: AtomicU64,
    /// Reservations granted.
    pub reservations: AtomicU64,
    /// Batches that waited after an acknowledgement and filled.
    pub fills: AtomicU64,
    /// Batches that waited and went short (filling then pauses).
    pub fills_short: AtomicU64,
    /// Sees each batch's size in messages (a metrics histogram), once set.
    pub on_batch: std::sync::OnceLock<BatchObserver>,
}

struct Member {
    entries: Vec<Entry>,
    /// The [`Key`]s of the accounts and marker subjects its conditions are about, computed once by
    /// the caller: the committer's single task only compares numbers.
    keys: Vec<Key>,
    /// After this instant the member is not sent: its caller has answered by then.
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Appended>>,
    /// The reservation it appends under, which lets it past its own reserved keys.
    reservation: Option<u64>,
}

/// A request for the exclusive use of some accounts for one decide-and-append cycle.
struct Reservation {
    id: u64,
    keys: Vec<Key>,
    deadline: Option<Instant>,
    granted: oneshot::Sender<()>,
}

/// What the committer's queue holds, oldest first.
enum Waiting {
    Member(Member),
    Reservation(Reservation),
}

/// Reservations come and go on their own channel: unbounded, so a release from `Drop` never
/// waits or fails for a full queue (there is at most one per command in flight).
enum Control {
    Reserve(Reservation),
    Release(u64),
}

/// Granted reservations: which holds each key, and each one's keys and deadline.
#[derive(Default)]
struct Reserved {
    holder_of: HashMap<Key, u64>,
    grants: HashMap<u64, (Vec<Key>, Option<Instant>)>,
}

impl Reserved {
    fn grant(&mut self, reservation: Reservation) {
        for key in &reservation.keys {
            self.holder_of.insert(*key, reservation.id);
        }
        self.grants
            .insert(reservation.id, (reservation.keys, reservation.deadline));
        let _ = reservation.granted.send(());
    }

    fn release(&mut self, id: u64) {
        if let Some((keys, _)) = self.grants.remove(&id) {
            for key in keys {
                if self.holder_of.get(&key) == Some(&id) {
                    self.holder_of.remove(&key);
                }
            }
        }
    }

    /// Releases what its holder can no longer use: its deadline has passed.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .grants
            .iter()
            .filter(|(_, (_, deadline))| deadline.is_some_and(|deadline| now >= deadline))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.release(id);
        }
    }

    /// The earliest deadline of a granted reservation.
    fn next_deadline(&self) -> Option<Instant> {
        self.grants
            .values()
            .filter_map(|(_, deadline)| *deadline)
            .min()
    }

    /// Whether `reservation` holds `key`.
    fn holds(&self, key: Key, reservation: Option<u64>) -> bool {
        reservation.is_some() && self.holder_of.get(&key).copied() == reservation
    }

    /// Whether `key` may go into a batch for a member appending under `reservation`.
    fn allows(&self, key: Key, reservation: Option<u64>) -> bool {
        self.holder_of
            .get(&key)
            .is_none_or(|holder| Some(*holder) == reservation)
    }
}

/// The exclusive use of some accounts in this writer's appends, until dropped or used by
/// [`GroupCommit::append_reserved`].
pub struct AccountsReserved {
    id: u64,
    control: mpsc::UnboundedSender<Control>,
}

impl Drop for AccountsReserved {
    fn drop(&mut self) {
        // The committer gone means nothing is reserved any more.
        let _ = self.control.send(Control::Release(self.id));
    }
}

/// An account or marker subject as the committer compares them: a 64-bit hash. Two subjects
/// with one hash only make their members wait for each other (never share a batch), which costs
/// a batch cycle and is as safe as a real overlap; with 64 bits it does not happen in practice.
type Key = u64;

fn account_key(account: &domain::AccountId) -> Key {
    let mut hasher = std::hash::DefaultHasher::new();
    (0u8, account.as_str()).hash(&mut hasher);
    hasher.finish()
}

fn marker_key(subject: &str) -> Key {
    let mut hasher = std::hash::DefaultHasher::new();
    (1u8, subject).hash(&mut hasher);
    hasher.finish()
}

/// The keys of the accounts and marker subjects `entries`' conditions are about.
fn keys_of(entries: &[Entry]) -> Vec<Key> {
    entries
        .iter()
        .map(|entry| match entry {
            Entry::Event { account, .. } => account_key(account),
            Entry::Marker { subject, .. } => marker_key(subject),
        })
        .collect()
}

/// The writer's group committer: a task that owns the sending of appends.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Member>,
    control: mpsc::UnboundedSender<Control>,
    next_reservation: Arc<AtomicU64>,
    counters: Arc<GroupCommitCounters>,
}

impl GroupCommit {
    /// Starts the committer on `log`; it stops when the last handle is dropped.
    pub fn start(log: EventLog, settings: GroupCommitSettings) -> Self {
        let (queue, receiver) = mpsc::channel(settings.queue_max.max(1));
        let (control, controls) = mpsc::unbounded_channel();
        let counters = Arc::new(GroupCommitCounters::default());
        tokio::spawn(run(log, receiver, controls, settings, counters.clone()));
        Self {
            queue,
            control,
            next_reservation: Arc::new(AtomicU64::new(1)),
            counters,
        }
    }

    /// Reserves `accounts` for one decide-and-append cycle: resolves once every batch in flight
    /// and every member queued before that touches them is done, and from then on holds back
    /// every other append touching them until the reservation is used by
    /// [`GroupCommit::append_reserved`], dropped, or past `deadline`. `Unavailable` when the
    /// deadline passes first.
    pub async fn reserve(
        &self,
        accounts: &[domain::AccountId],
        deadline: Option<Instant>,
    ) -> Result<AccountsReserved> {
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        let (granted, grant) = oneshot::channel();
        let keys = accounts.iter().map(account_key).collect();
        let reservation = Reservation {
            id,
            keys,
            deadline,
            granted,
        };
        self.control
            .send(Control::Reserve(reservation))
            .map_err(|_| Error::Unavailable("the group committer has stopped".into()))?;
        // From here on, a drop releases whatever was granted.
        let reserved = AccountsReserved {
            id,
            control: self.control.clone(),
        };
        let waited = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, grant)
                .await
                .map_err(|_| {
                    Error::Unavailable("the accounts were not free before the deadline".into())
                })?,
            None => grant.await,
        };
        waited.map_err(|_| Error::Unavailable("the reservation was not granted".into()))?;
        Ok(reserved)
    }

    pub fn counters(&self) -> Arc<GroupCommitCounters> {
        self.counters.clone()
    }

    /// Appends `entries` all together or not at all, as [`EventLog::append_atomic`] does, in a
    /// batch with other appends. Nothing is sent after `deadline`: a member still waiting then
    /// is answered `Unavailable`.
    pub async fn append(&self, entries: Vec<Entry>, deadline: Option<Instant>) -> Result<Appended> {
        self.append_member(entries, deadline, None).await
    }

    /// [`GroupCommit::append`] under `reserved`, whose accounts it may use; the reservation ends
    /// once the append is taken into a batch.
    pub async fn append_reserved(
        &self,
        entries: Vec<Entry>,
        deadline: Option<Instant>,
        reserved: &AccountsReserved,
    ) -> Result<Appended> {
        self.append_member(entries, deadline, Some(reserved.id))
            .await
    }

    async fn append_member(
        &self,
        entries: Vec<Entry>,
        deadline: Option<Instant>,
        reservation: Option<u64>,
    ) -> Result<Appended> {
        if entries.is_empty() || entries.len() > BATCH_SIZE_MAX {
            return Err(Error::Encode(format!(
                "an append holds 1 to {BATCH_SIZE_MAX} messages, not {}",
                entries.len()
            )));
        }
        let (reply, answer) = oneshot::channel();
        let member = Member {
            keys: keys_of(&entries),
            entries,
            deadline,
            reply,
            reservation,
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
    mut controls: mpsc::UnboundedReceiver<Control>,
    settings: GroupCommitSettings,
    counters: Arc<GroupCommitCounters>,
) {
    let messages_max = settings.messages_max.clamp(1, BATCH_SIZE_MAX);
    let in_flight_max = settings
        .batches_in_flight_max
        .clamp(1, BATCHES_IN_FLIGHT_LIMIT);
    let mut waiting = Queue::default();
    let mut reserved = Reserved::default();
    // Batches awaiting their acknowledgement; each gives back the keys it held.
    let mut in_flight = FuturesUnordered::new();
    // Accounts and marker subjects of the batches in flight.
    let mut busy: HashSet<Key> = HashSet::new();
    let mut closed = false;
    let mut filling = Filling::new(settings.fill_wait, settings.fill_quiet);
    loop {
        loop {
            // With every in-flight slot taken, reservations whose accounts are free are still
            // granted (their holders reload meanwhile); no member is taken. Without a queued
            // reservation there is nothing to grant and the queue is not scanned.
            // A wait to fill holds back only a committer with nothing in flight: with a batch
            // in flight (several allowed), sending now keeps the server busy.
            let now = Instant::now();
            let take = in_flight.len() < in_flight_max
                && (!filling.is_waiting()
                    || wait_over(&mut filling, &waiting, in_flight.is_empty(), now, &counters));
            if !take && !waiting.reservation_queued() {
                break;
            }
            let batch = next_batch(
                &mut waiting,
                if take { messages_max } else { 0 },
                &busy,
                &mut reserved,
                &counters,
            );
            if batch.is_empty() {
                break;
            }
            let keys: Vec<Key> = batch
                .iter()
                .flat_map(|member| member.keys.iter().copied())
                .collect();
            busy.extend(keys.iter().copied());
            let members = batch.len();
            let (log, counters) = (log.clone(), counters.clone());
            in_flight.push(async move {
                let sent = Instant::now();
                send(&log, batch, &counters).await;
                (keys, members, sent.elapsed())
            });
        }
        if closed && waiting.items.is_empty() && in_flight.is_empty() {
            return;
        }
        // A granted reservation past its deadline is released then, and an append held back
        // behind one is answered at its own deadline, even if nothing else happens. (Without
        // reservations every waiting append is behind a batch in flight, answered by its
        // acknowledgement or its timeout, or behind a wait to fill, which ends before its
        // deadline.) A wait to fill ends when it runs out.
        let fill_until = filling
            .wakes_at()
            .filter(|_| in_flight.is_empty() && !waiting.items.is_empty());
        let next_expiry = if reserved.grants.is_empty() && !waiting.reservation_queued() {
            fill_until
        } else {
            let waiting_deadlines = waiting.items.iter().filter_map(|next| match next {
                Waiting::Member(member) => member.deadline,
                Waiting::Reservation(reservation) => reservation.deadline,
            });
            reserved
                .next_deadline()
                .into_iter()
                .chain(waiting_deadlines)
                .chain(fill_until)
                .min()
        };
        tokio::select! {
            () = sleep_until_some(next_expiry) => {
                // Whatever is past its deadline goes now, whether or not a batch can be taken:
                // left waiting, its deadline would wake this loop again at once.
                expire(&mut waiting, &mut reserved, &counters);
            }
            member = receiver.recv(), if !closed => match member {
                Some(member) => {
                    waiting.push_back(Waiting::Member(member));
                    // What has queued already joins it: waiting for more would add latency.
                    while waiting.items.len() < BATCH_SIZE_MAX {
                        match receiver.try_recv() {
                            Ok(member) => waiting.push_back(Waiting::Member(member)),
                            Err(_) => break,
                        }
                    }
                    if filling.is_waiting() {
                        filling.arrived(queued_appends(&waiting).0, Instant::now());
                    }
                }
                None => closed = true,
            },
            Some(control) = controls.recv() => match control {
                Control::Reserve(reservation) => {
                    waiting.push_back(Waiting::Reservation(reservation));
                }
                Control::Release(id) => reserved.release(id),
            },
            Some((keys, members, flight)) = in_flight.next(), if !in_flight.is_empty() => {
                for key in keys {
                    busy.remove(&key);
                }
                // Those just answered are expected back with their next commands.
                let (queued, _) = queued_appends(&waiting);
                filling.acknowledged(members, flight, queued, messages_max, Instant::now());
            }
        }
    }
}

/// Whether the wait to fill is over (and then ends it, counting how): a batch is in flight, the
/// queue is ready, or an append's deadline comes before the wait would end.
fn wait_over(
    filling: &mut Filling,
    waiting: &Queue,
    nothing_in_flight: bool,
    now: Instant,
    counters: &GroupCommitCounters,
) -> bool {
    let (queued, earliest) = queued_appends(waiting);
    if nothing_in_flight && !filling.over(queued, earliest, now) {
        return false;
    }
    // The wait is over, whether or not anything can go now.
    let counter = match filling.end(queued, now) {
        Some(Ended::Filled) => &counters.fills,
        Some(Ended::Short) => &counters.fills_short,
        None => return true,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    true
}

/// The appends waiting (not the reservations) and their messages, and the earliest deadline
/// among them.
fn queued_appends(waiting: &Queue) -> (Queued, Option<Instant>) {
    let mut queued = Queued::default();
    let mut earliest: Option<Instant> = None;
    for next in &waiting.items {
        if let Waiting::Member(member) = next {
            queued.appends += 1;
            queued.messages += member.entries.len();
            if let Some(deadline) = member.deadline {
                earliest = Some(earliest.map_or(deadline, |earliest| earliest.min(deadline)));
            }
        }
    }
    (queued, earliest)
}

/// Answers the members waiting past their deadline (`Unavailable`: never sent) and forgets the
/// reservations past theirs, queued or granted.
fn expire(waiting: &mut Queue, reserved: &mut Reserved, counters: &GroupCommitCounters) {
    let now = Instant::now();
    reserved.expire(now);
    let mut kept = Queue::with_capacity(waiting.items.len());
    for next in waiting.items.drain(..) {
        match next {
            Waiting::Member(member) if member.deadline.is_some_and(|deadline| now >= deadline) => {
                refuse_expired(member, counters, "sent");
            }
            Waiting::Reservation(reservation)
                if reservation.granted.is_closed()
                    || reservation.deadline.is_some_and(|deadline| now >= deadline) => {}
            next => kept.push_back(next),
        }
    }
    *waiting = kept;
}

/// Answers a member whose deadline passed before it could be `what` (sent, committed):
/// `Unavailable`, nothing of it is stored.
fn refuse_expired(member: Member, counters: &GroupCommitCounters, what: &str) {
    counters.expired.fetch_add(1, Ordering::Relaxed);
    let _ = member.reply.send(Err(Error::Unavailable(format!(
        "the append reached its deadline before it could be {what}"
    ))));
}

/// Members not sent yet and reservations not granted yet, oldest first, with how many of them
/// are reservations: the committer asks that on every wake, and scanning for it made a bulk's
/// thousands of queued members a fifth of the writer's CPU (docs/benchmarks.md).
#[derive(Default)]
struct Queue {
    items: VecDeque<Waiting>,
    reservations: usize,
}

impl Queue {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            items: VecDeque::with_capacity(capacity),
            reservations: 0,
        }
    }

    fn push_back(&mut self, next: Waiting) {
        if matches!(next, Waiting::Reservation(_)) {
            self.reservations += 1;
        }
        self.items.push_back(next);
    }

    /// Whether a reservation waits to be granted.
    fn reservation_queued(&self) -> bool {
        self.reservations > 0
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Takes the oldest members that fit in one batch of `messages_max` (0: none) and touch nothing
/// another one in it, a batch in flight (`busy`), a reservation held by someone else, or a
/// reservation queued before them does; grants, in queue order, the reservations whose
/// accounts nothing in flight, nothing queued before them and no other holder touches.
fn next_batch(
    waiting: &mut Queue,
    messages_max: usize,
    busy: &HashSet<Key>,
    reserved: &mut Reserved,
    counters: &GroupCommitCounters,
) -> Vec<Member> {
    let now = Instant::now();
    reserved.expire(now);
    let mut batch = Vec::new();
    let mut keys: HashSet<Key> = HashSet::new();
    // Keys of reservations still queued: nothing behind them may take these.
    let mut queued_for: HashSet<Key> = HashSet::new();
    // Keys of members left waiting: a reservation behind them waits for them.
    let mut waiting_keys: HashSet<Key> = HashSet::new();
    let mut messages = 0;
    let mut reservations_left = waiting.reservations;
    let mut kept = Queue::with_capacity(waiting.items.len());
    while let Some(next) = waiting.items.pop_front() {
        // A full batch and no reservation behind: the rest stays as it is, unscanned (a long
        // queue would otherwise be walked once per batch).
        if reservations_left == 0 && (messages_max == 0 || messages >= messages_max) {
            kept.push_back(next);
            kept.items.append(&mut waiting.items);
            break;
        }
        let member = match next {
            Waiting::Reservation(reservation) => {
                reservations_left -= 1;
                if reservation.granted.is_closed()
                    || reservation.deadline.is_some_and(|deadline| now >= deadline)
                {
                    continue; // Its holder gave up.
                }
                let free = reservation.keys.iter().all(|key| {
                    !keys.contains(key)
                        && !busy.contains(key)
                        && !queued_for.contains(key)
                        && !waiting_keys.contains(key)
                        && reserved.allows(*key, None)
                });
                if free {
                    counters.reservations.fetch_add(1, Ordering::Relaxed);
                    reserved.grant(reservation);
                } else {
                    queued_for.extend(reservation.keys.iter().copied());
                    kept.push_back(Waiting::Reservation(reservation));
                }
                continue;
            }
            Waiting::Member(member) => member,
        };
        if member.deadline.is_some_and(|deadline| now >= deadline) {
            refuse_expired(member, counters, "sent");
            continue;
        }
        let fits = messages_max > 0
            && (batch.is_empty() || messages + member.entries.len() <= messages_max);
        let free = member.keys.iter().all(|key| {
            // The holder of a reservation goes before everything queued for its accounts:
            // waiting for a later reservation of them would wait for itself.
            let held = reserved.holds(*key, member.reservation);
            !keys.contains(key)
                && !busy.contains(key)
                && (held || (!queued_for.contains(key) && reserved.allows(*key, None)))
        });
        if fits && free {
            messages += member.entries.len();
            keys.extend(member.keys.iter().copied());
            if let Some(id) = member.reservation {
                // Its keys are this batch's now: the reservation has done its work.
                reserved.release(id);
            }
            batch.push(member);
        } else {
            waiting_keys.extend(member.keys.iter().copied());
            kept.push_back(Waiting::Member(member));
        }
    }
    *waiting = kept;
    batch
}

async fn send(log: &EventLog, mut batch: Vec<Member>, counters: &GroupCommitCounters) {
    counters.batches.fetch_add(1, Ordering::Relaxed);
    counters
        .members
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    if let Some(observe) = counters.on_batch.get() {
        observe(batch.iter().map(|member| member.entries.len()).sum());
    }
    let mut rebatched = false;
    let appended = loop {
        if batch.len() == 1 {
            for member in batch {
                let result = log
                    .append_atomic_before(&member.entries, member.deadline)
                    .await;
                let _ = member.reply.send(result);
            }
            return;
        }
        let entries: Vec<&Entry> = batch
            .iter()
            .flat_map(|member| member.entries.iter())
            .collect();
        // Committed only while every member's deadline is ahead.
        let deadline = batch.iter().filter_map(|member| member.deadline).min();
        let appended = log.append_atomic_refs_before(&entries, deadline).await;
        drop(entries);
        // A member whose deadline passed while the batch was staged must not be committed,
        // but it costs only itself: the batch was not committed (the server drops its staged
        // messages after its batch timeout), so the others are sent again without it. Once as a
        // batch; if staging is that slow again, each alone: every abandoned batch holds one of
        // the server's in-flight batch slots (50 per stream) until it times out.
        let now = Instant::now();
        if matches!(appended, Err(Error::Unavailable(_)))
            && deadline.is_some_and(|deadline| now >= deadline)
        {
            let (expired, rest): (Vec<Member>, Vec<Member>) = batch
                .into_iter()
                .partition(|member| member.deadline.is_some_and(|deadline| now >= deadline));
            for member in expired {
                refuse_expired(member, counters, "committed");
            }
            if rest.is_empty() {
                return;
            }
            if rebatched {
                send_alone(log, rest, counters).await;
                return;
            }
            rebatched = true;
            batch = rest;
            continue;
        }
        break appended;
    };
    match appended {
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
            send_alone(log, batch, counters).await;
        }
    }
}

/// Sends each member as its own append (none of them is stored yet), a bounded number at a time:
/// each may be an atomic batch, and the server takes 50 in flight per stream, shared with the
/// other writers.
async fn send_alone(log: &EventLog, members: Vec<Member>, counters: &GroupCommitCounters) {
    futures::stream::iter(members)
        .for_each_concurrent(SPLIT_CONCURRENCY_MAX, |member| async move {
            if member
                .deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                refuse_expired(member, counters, "sent again");
                return;
            }
            let result = log
                .append_atomic_before(&member.entries, member.deadline)
                .await;
            let _ = member.reply.send(result);
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(key: Key, deadline: Option<Instant>) -> Waiting {
        Waiting::Member(Member {
            entries: vec![Entry::Marker {
                subject: format!("m.{key}"),
                payload: Vec::new(),
            }],
            keys: vec![key],
            deadline,
            reply: oneshot::channel().0,
            reservation: None,
        })
    }

    fn reservation(
        id: u64,
        key: Key,
        deadline: Option<Instant>,
    ) -> (Waiting, oneshot::Receiver<()>) {
        let (granted, receiver) = oneshot::channel();
        let reservation = Reservation {
            id,
            keys: vec![key],
            deadline,
            granted,
        };
        (Waiting::Reservation(reservation), receiver)
    }

    fn counted(queue: &Queue) -> usize {
        queue
            .items
            .iter()
            .filter(|next| matches!(next, Waiting::Reservation(_)))
            .count()
    }

    #[test]
    fn the_queue_counts_its_reservations_through_batches_and_expiry() {
        let counters = GroupCommitCounters::default();
        let (mut queue, mut reserved) = (Queue::default(), Reserved::default());
        let mut busy = HashSet::new();
        let past = Instant::now() - std::time::Duration::from_secs(1);
        // Key 1 is in flight: the reservation for it stays queued, the one for 2 is granted.
        busy.insert(1);
        queue.push_back(member(3, None));
        let (first, _first) = reservation(10, 1, None);
        queue.push_back(first);
        let (second, _second) = reservation(11, 2, None);
        queue.push_back(second);
        let (late, _late) = reservation(12, 4, Some(past));
        queue.push_back(late);
        queue.push_back(member(5, Some(past)));
        for key in 6..10 {
            queue.push_back(member(key, None));
        }
        // Behind a batch's worth of members: still granted in the same pass.
        let (behind, _behind) = reservation(14, 30, None);
        queue.push_back(behind);
        assert_eq!(queue.reservations, 4);
        // A batch of two messages: the expired reservation and member go, 11 and 14 are
        // granted, 10 waits for key 1.
        let batch = next_batch(&mut queue, 2, &busy, &mut reserved, &counters);
        assert_eq!(batch.len(), 2);
        assert!(reserved.grants.contains_key(&11) && reserved.grants.contains_key(&14));
        assert!(!reserved.grants.contains_key(&10));
        assert_eq!(queue.reservations, counted(&queue));
        assert_eq!(queue.reservations, 1);
        assert!(queue.reservation_queued());
        // With nothing taken (messages_max 0) the queue is still walked for reservations.
        busy.clear();
        let batch = next_batch(&mut queue, 0, &busy, &mut reserved, &counters);
        assert!(batch.is_empty());
        assert_eq!(queue.reservations, counted(&queue));
        assert!(!queue.reservation_queued());
        assert!(
            reserved.grants.contains_key(&10),
            "granted once key 1 is free"
        );
        let (expiring, _expiring) = reservation(13, 20, Some(past));
        queue.push_back(expiring);
        let (live, _live) = reservation(15, 6, None);
        queue.push_back(live);
        assert_eq!(queue.reservations, 2);
        expire(&mut queue, &mut reserved, &counters);
        assert_eq!(queue.reservations, counted(&queue));
        assert_eq!(queue.reservations, 1, "the live one stays");
    }
}
