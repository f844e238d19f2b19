//! One owner per account across writers, as cluster sharding gives actors: accounts hash to
//! [`PARTITIONS`] partitions, and each partition has one owning writer, held by a lease in the
//! owners bucket (`eventlog::leases`). Every writer keeps a view of who owns what; a command
//! for an account another writer owns is handed to that writer (`dispatch`), so one actor
//! decides for the account and its cache stays authoritative.
//!
//! Assignment is rendezvous hashing over the live writers (each partition goes to the writer
//! with the highest hash of its id and the partition), so every writer computes the same owners
//! from the same membership, and a writer joining or leaving moves only its share. A writer
//! gives up a lease when another live writer should have it, takes free leases it should have,
//! and renews the rest at the revision it last wrote: a writer that paused longer than the lease
//! finds it taken and drops it.
//!
//! Correctness never rests on the lease: the stream's concurrency check arbitrates between two
//! writers that both think they own an account (a stale view, a paused owner), which only costs
//! a conflict and a reload.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use domain::AccountId;
use eventlog::leases::{LeaseEntry, Leases, LEASE_TTL, PARTITIONS_PREFIX, WRITERS_PREFIX};
use futures::future::join_all;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::{Error, Result};

/// Fixed for the life of a deployment: every writer must hash accounts the same way.
pub const PARTITIONS: u32 = 64;

/// How often a writer writes its liveness, renews its leases and reads everyone's: five times
/// per lease, so a lease survives four missed beats.
pub const HEARTBEAT: Duration = Duration::from_secs(LEASE_TTL.as_secs() / 5);
/// A writer whose liveness key is older than this (by the server's clock, against this writer's
/// own latest) is taken as gone before its lease runs out: commands for its partitions are
/// decided here instead of being handed to a process that is paused or cut off.
pub const STALE_AFTER: Duration = Duration::from_millis(2_500);

/// The writer's identity in the owners bucket and in the subject it takes commands on: 1-64
/// characters of `A-Z a-z 0-9 _ -` (a NATS subject token and a KV key token).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WriterId(String);

impl WriterId {
    pub fn parse(text: &str) -> Result<Self> {
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(Error::InvalidRequest(format!(
                "writer id {text:?}: expected 1-64 characters of A-Z a-z 0-9 _ -"
            )))
        }
    }

    /// `{name}-{8 hex}`, `name` defaulting to the host name: unique per process even when two
    /// processes are given the same name (a replaced pod still draining), so one writer never
    /// takes another's hand-overs or renews its leases, and a restarted writer never mistakes
    /// the leases of its previous life for its own.
    pub fn generate(name: Option<&str>) -> Result<Self> {
        let host;
        let name = match name {
            Some(name) => name,
            None => {
                host = std::env::var("HOSTNAME")
                    .ok()
                    .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                    .unwrap_or_default()
                    .trim()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '_' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .take(40)
                    .collect::<String>();
                if host.is_empty() {
                    "writer"
                } else {
                    &host
                }
            }
        };
        if name.len() > 55 {
            return Err(Error::InvalidRequest(format!(
                "writer name {name:?}: at most 55 characters"
            )));
        }
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        Self::parse(&format!("{name}-{suffix}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WriterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms (std's hasher makes no such promise).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The partition an account belongs to.
pub fn partition_of(account: &AccountId) -> u32 {
    (mix(fnv1a(&[account.as_str().as_bytes()])) % u64::from(PARTITIONS)) as u32
}

/// MurmurHash3's 64-bit finalizer: FNV-1a alone keeps the order of inputs that differ early
/// and share a suffix (every partition went to the same writer), which rendezvous cannot have.
fn mix(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The writer that should own `partition` among `writers`: the highest hash of writer and
/// partition (ties, which need a 64-bit collision, go to the greater id).
pub fn rendezvous(writers: &[WriterId], partition: u32) -> Option<&WriterId> {
    let partition = partition.to_be_bytes();
    writers.iter().max_by_key(|writer| {
        (
            mix(fnv1a(&[writer.0.as_bytes(), b"/", &partition])),
            &writer.0,
        )
    })
}

/// Where a command for an account goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This writer owns the account, or nobody does right now: decide here.
    Here,
    /// Another writer owns it.
    Owner(WriterId),
}

#[derive(Default)]
struct View {
    /// Partition → its owner, as last read (and as this writer's own leases say).
    owners: HashMap<u32, WriterId>,
    /// Partitions this writer holds, at the revision it last wrote.
    held: HashMap<u32, u64>,
    /// The live writers, sorted: a partition without a lease goes to the one that should take
    /// it, so that while a lease moves every writer still sends its accounts to one place.
    writers: Vec<WriterId>,
}

/// This writer's part in the ownership protocol, and its view of everyone's.
pub struct Ownership {
    me: WriterId,
    leases: Leases,
    view: RwLock<View>,
    metrics: Arc<Metrics>,
    /// Set at shutdown: no more beats, the leases are being given up.
    stopped: AtomicBool,
}

fn partition_key(partition: u32) -> String {
    format!("{PARTITIONS_PREFIX}{partition}")
}

fn writer_key(writer: &WriterId) -> String {
    format!("{WRITERS_PREFIX}{writer}")
}

impl Ownership {
    pub fn new(me: WriterId, leases: Leases, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            me,
            leases,
            view: RwLock::new(View::default()),
            metrics,
            stopped: AtomicBool::new(false),
        })
    }

    pub fn me(&self) -> &WriterId {
        &self.me
    }

    /// Where a command for `account` goes, by this writer's view: its partition's lease holder,
    /// or, while nobody holds it, the live writer that should.
    pub fn route(&self, account: &AccountId) -> Route {
        let partition = partition_of(account);
        let view = self
            .view
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let owner = view
            .owners
            .get(&partition)
            .or_else(|| rendezvous(&view.writers, partition));
        match owner {
            Some(owner) if *owner != self.me => Route::Owner(owner.clone()),
            _ => Route::Here,
        }
    }

    /// Partitions this writer holds now.
    pub fn held(&self) -> Vec<u32> {
        let view = self
            .view
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut held: Vec<u32> = view.held.keys().copied().collect();
        held.sort_unstable();
        held
    }

    /// One beat: say this writer is alive, read everyone's keys, renew or give up the leases
    /// held, take the free ones this writer should have, and replace the view.
    pub async fn beat(&self) -> Result<()> {
        if self.stopped.load(Ordering::Acquire) {
            return Ok(());
        }
        self.leases
            .put(&writer_key(&self.me), self.me.0.clone().into())
            .await?;
        let entries = self.leases.read_all().await?;
        let (mut writers, mut owners) = parse_entries(&entries, &self.me);
        if !writers.contains(&self.me) {
            // Our own write may not have reached the replica that answered the read.
            writers.push(self.me.clone());
        }
        writers.sort_by(|a, b| a.0.cmp(&b.0));
        let held = {
            let view = self
                .view
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            view.held.clone()
        };

        // Renew what should stay ours, give up what another live writer should have.
        let renewals = held.iter().map(|(&partition, &revision)| {
            let should_own = rendezvous(&writers, partition) == Some(&self.me);
            async move {
                let key = partition_key(partition);
                if should_own {
                    let renewed = self
                        .leases
                        .renew(&key, self.me.0.clone().into(), revision)
                        .await;
                    (partition, renewed.map(|revision| revision.ok_or(true)))
                } else {
                    let released = self.leases.release(&key, revision).await;
                    (partition, released.map(|()| Err(false)))
                }
            }
        });
        let mut now_held: HashMap<u32, u64> = HashMap::new();
        for (partition, result) in join_all(renewals).await {
            match result {
                Ok(Ok(revision)) => {
                    now_held.insert(partition, revision);
                    owners.insert(partition, self.me.clone());
                }
                Ok(Err(lost)) => {
                    if lost {
                        self.metrics.leases_lost.inc();
                        tracing::warn!(partition, writer = %self.me, "partition lease lost: another writer holds it");
                    } else {
                        tracing::info!(partition, writer = %self.me, "partition handed over");
                    }
                    if owners.get(&partition) == Some(&self.me) {
                        owners.remove(&partition);
                    }
                }
                Err(error) => {
                    // Unknown: keep the lease as ours until a renewal says otherwise.
                    tracing::debug!(partition, %error, "lease renewal failed; retrying next beat");
                    if let Some(revision) = held.get(&partition) {
                        now_held.insert(partition, *revision);
                    }
                }
            }
        }

        // Take the free partitions this writer should have.
        let free: Vec<u32> = (0..PARTITIONS)
            .filter(|partition| {
                !owners.contains_key(partition)
                    && !now_held.contains_key(partition)
                    && rendezvous(&writers, *partition) == Some(&self.me)
            })
            .collect();
        let claims = free.iter().map(|&partition| async move {
            let created = self
                .leases
                .create(&partition_key(partition), self.me.0.clone().into())
                .await;
            (partition, created)
        });
        for (partition, created) in join_all(claims).await {
            match created {
                Ok(Some(revision)) => {
                    tracing::info!(partition, writer = %self.me, "partition taken");
                    now_held.insert(partition, revision);
                    owners.insert(partition, self.me.clone());
                }
                Ok(None) => {}
                Err(error) => tracing::debug!(partition, %error, "taking a partition failed"),
            }
        }
        // A partition left in our name by a read of an older replica is not ours.
        owners.retain(|partition, owner| *owner != self.me || now_held.contains_key(partition));
        let mut view = self
            .view
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.stopped.load(Ordering::Acquire) {
            return Ok(()); // What this beat renewed runs out on its own.
        }
        self.metrics.partitions_owned.set(now_held.len() as i64);
        view.owners = owners;
        view.writers = writers;
        view.held = now_held;
        Ok(())
    }

    /// Beats until `stop` ([`Ownership::release_all`] gives the leases up).
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(HEARTBEAT);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = ticker.tick() => false,
                _ = stop.wait_for(|stop| *stop) => true,
            };
            if stopping {
                return;
            }
            if let Err(error) = self.beat().await {
                tracing::warn!(%error, writer = %self.me, "ownership beat failed");
            }
        }
    }

    /// Gives up every lease and the liveness key (at shutdown), so the other writers take the
    /// partitions at their next beat instead of after the lease.
    pub async fn release_all(&self) {
        self.stopped.store(true, Ordering::Release);
        let held = {
            let mut view = self
                .view
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            view.owners.clear();
            view.writers.clear();
            std::mem::take(&mut view.held)
        };
        let releases = held.iter().map(|(&partition, &revision)| async move {
            self.leases
                .release(&partition_key(partition), revision)
                .await
        });
        for result in join_all(releases).await {
            if let Err(error) = result {
                tracing::debug!(%error, "releasing a lease at shutdown");
            }
        }
        if let Err(error) = self.leases.remove(&writer_key(&self.me)).await {
            tracing::debug!(%error, "removing the liveness key at shutdown");
        }
        self.metrics.partitions_owned.set(0);
        tracing::info!(writer = %self.me, partitions = held.len(), "partition leases released");
    }
}

/// The live writers and the partition owners the bucket's keys name. A writer is live when its
/// liveness key is at most [`STALE_AFTER`] older than `me`'s (the newest key when `me`'s is not
/// in the read); partitions of writers that are not live have no owner in the view.
fn parse_entries(entries: &[LeaseEntry], me: &WriterId) -> (Vec<WriterId>, HashMap<u32, WriterId>) {
    let my_key = writer_key(me);
    let server_now = entries
        .iter()
        .find(|entry| entry.key == my_key)
        .or_else(|| {
            entries
                .iter()
                .filter(|entry| entry.key.starts_with(WRITERS_PREFIX))
                .max_by_key(|entry| entry.written_unix_ms)
        })
        .map_or(0, |entry| entry.written_unix_ms);
    let oldest_live = server_now.saturating_sub(STALE_AFTER.as_millis() as u64);
    let mut writers = Vec::new();
    let mut claimed = Vec::new();
    for entry in entries {
        if let Some(writer) = entry.key.strip_prefix(WRITERS_PREFIX) {
            match WriterId::parse(writer) {
                Ok(writer) if entry.written_unix_ms >= oldest_live => writers.push(writer),
                Ok(writer) => tracing::debug!(%writer, "writer not heard from lately"),
                Err(_) => tracing::warn!(key = %entry.key, "unreadable writer key"),
            }
        } else if let Some(partition) = entry.key.strip_prefix(PARTITIONS_PREFIX) {
            let owner = std::str::from_utf8(&entry.value)
                .ok()
                .and_then(|text| WriterId::parse(text).ok());
            match (partition.parse::<u32>(), owner) {
                (Ok(partition), Some(owner)) if partition < PARTITIONS => {
                    claimed.push((partition, owner));
                }
                _ => tracing::warn!(key = %entry.key, "unreadable lease in the owners bucket"),
            }
        }
    }
    let owners = claimed
        .into_iter()
        .filter(|(_, owner)| writers.contains(owner))
        .collect();
    (writers, owners)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Pinned: a change would move accounts to other owners at an upgrade.
    const PARTITION_OF_ALICE: u32 = 52;

    fn writers(names: &[&str]) -> Vec<WriterId> {
        names
            .iter()
            .map(|name| WriterId::parse(name).unwrap())
            .collect()
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed values: a change of hash would move every account to another owner at upgrade.
        assert_eq!(fnv1a(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&[b"foobar"]), 0x8594_4171_f739_67e8);
        assert_eq!(
            partition_of(&AccountId::parse("alice").unwrap()),
            PARTITION_OF_ALICE
        );
        let mut counts = vec![0usize; PARTITIONS as usize];
        for n in 0..64_000 {
            let account = AccountId::parse(&format!("acc-{n}")).unwrap();
            counts[partition_of(&account) as usize] += 1;
        }
        let (least, most) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*least > 800 && *most < 1_200, "{least}..{most}");
    }

    #[test]
    fn rendezvous_moves_only_the_share_of_the_writer_that_joins_or_leaves() {
        let two = writers(&["w-a", "w-b"]);
        let three = writers(&["w-a", "w-b", "w-c"]);
        let mut moved = 0;
        let mut shares = HashMap::new();
        for partition in 0..PARTITIONS {
            let before = rendezvous(&two, partition).unwrap();
            let after = rendezvous(&three, partition).unwrap();
            *shares.entry(after.clone()).or_insert(0) += 1;
            if before != after {
                // Only partitions moving to the newcomer move at all.
                assert_eq!(after.as_str(), "w-c");
                moved += 1;
            }
        }
        assert!((10..=34).contains(&moved), "{moved} of 64 moved");
        assert_eq!(shares.len(), 3, "every writer owns some: {shares:?}");
        assert_eq!(rendezvous(&[], 3), None);
        // The same membership in any order gives the same owner.
        let reversed: Vec<WriterId> = three.iter().rev().cloned().collect();
        for partition in 0..PARTITIONS {
            assert_eq!(
                rendezvous(&three, partition),
                rendezvous(&reversed, partition)
            );
        }
    }

    #[test]
    fn writer_ids_are_subject_tokens() {
        assert!(WriterId::parse("writer-0_a").is_ok());
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
            assert!(WriterId::parse(bad).is_err(), "{bad:?}");
        }
        let generated = WriterId::generate(None).unwrap();
        assert!(WriterId::parse(generated.as_str()).is_ok(), "{generated}");
        assert_ne!(generated, WriterId::generate(None).unwrap());
        let named = WriterId::generate(Some("writer-0")).unwrap();
        assert!(named.as_str().starts_with("writer-0-"), "{named}");
        assert_ne!(named, WriterId::generate(Some("writer-0")).unwrap());
        assert!(WriterId::generate(Some("a.b")).is_err());
    }

    #[test]
    fn entries_name_live_writers_and_their_partitions() {
        let entry = |key: &str, value: &str, written_unix_ms: u64| LeaseEntry {
            key: key.into(),
            value: value.to_owned().into(),
            revision: 1,
            written_unix_ms,
        };
        let me = WriterId::parse("w-a").unwrap();
        let (live, owners) = parse_entries(
            &[
                entry("writers.w-a", "w-a", 10_000),
                entry("writers.w-b", "w-b", 9_000),
                // Paused: not heard from for 3 s.
                entry("writers.w-c", "w-c", 7_000),
                entry("partitions.3", "w-a", 9_500),
                entry("partitions.5", "w-b", 9_500),
                entry("partitions.6", "w-c", 9_500),
                entry("partitions.99", "w-a", 9_500),
                entry("partitions.4", "not a.writer", 9_500),
            ],
            &me,
        );
        assert_eq!(live, writers(&["w-a", "w-b"]));
        assert_eq!(owners.len(), 2, "{owners:?}");
        assert_eq!(owners[&3].as_str(), "w-a");
        assert_eq!(owners[&5].as_str(), "w-b");
        // Without this writer's own key the newest one stands for the server's clock.
        let (live, _) = parse_entries(&[entry("writers.w-b", "w-b", 9_000)], &me);
        assert_eq!(live, writers(&["w-b"]));
    }
}
