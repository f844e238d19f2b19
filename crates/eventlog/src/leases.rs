//! The owners bucket: leases on partitions of accounts and the writers that are alive, in the
//! JetStream key-value bucket `COFFER_OWNERS` (`nats kv ls COFFER_OWNERS` shows them).
//!
//! Keys: `writers.{writer_id}` (a live writer, its value the subject it takes commands on) and
//! `partitions.{n}` (its owner's writer id). Every value lives [`LEASE_TTL`] unless its holder
//! writes it again (the bucket's `max_age`), so the keys of a writer that died disappear on their
//! own. A lease is taken with "create" (only when the key holds nothing), renewed and released
//! only at the revision its holder last wrote: the revision is the fencing token, so a holder
//! that paused longer than the TTL cannot renew what another writer has taken since.
//!
//! Nothing here decides money: the event stream's concurrency check does. A lease only says which
//! writer's actors should decide for which accounts, so that their caches stay authoritative.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::log::{direct_batch, header_number, header_text};
use crate::{Error, Result};

/// The bucket's name.
pub const BUCKET: &str = "COFFER_OWNERS";
/// How long a value lives without being written again.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// Prefix of the keys of live writers.
pub const WRITERS_PREFIX: &str = "writers.";
/// Prefix of the keys of partition leases.
pub const PARTITIONS_PREFIX: &str = "partitions.";

/// One key of the bucket as last written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEntry {
    pub key: String,
    pub value: Bytes,
    /// The key's revision: what a renewal or a release must state.
    pub revision: u64,
    /// When it was written, by the server's clock (Unix milliseconds).
    pub written_unix_ms: u64,
}

/// Handle to the owners bucket. Cheap to clone.
#[derive(Clone)]
pub struct Leases {
    client: async_nats::Client,
    store: kv::Store,
}

/// The bucket's configuration: values expire after [`LEASE_TTL`], one value per key, in memory
/// (leases are worth nothing after a restart of NATS: writers take them again within a second).
pub fn bucket_config(replicas: usize) -> kv::Config {
    kv::Config {
        bucket: BUCKET.into(),
        description: "Coffer: which writer owns which partition of accounts (leases)".into(),
        history: 1,
        max_age: LEASE_TTL,
        storage: jetstream::stream::StorageType::Memory,
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// Creates the bucket unless it exists (`coffer setup`, or a writer allowed to).
pub async fn ensure_bucket(context: &jetstream::Context, replicas: usize) -> Result<()> {
    if context.get_key_value(BUCKET).await.is_ok() {
        return Ok(());
    }
    if let Err(error) = context.create_key_value(bucket_config(replicas)).await {
        // Another process may have created it between our check and our create.
        tracing::debug!(%error, "create the owners bucket failed; checking whether it exists now");
    }
    context
        .get_key_value(BUCKET)
        .await
        .map(|_| ())
        .map_err(|error| Error::Unavailable(format!("owners bucket {BUCKET}: {error}")))
}

impl Leases {
    /// The bucket, which must exist ([`ensure_bucket`]).
    pub async fn open(client: async_nats::Client, context: &jetstream::Context) -> Result<Self> {
        let store = context
            .get_key_value(BUCKET)
            .await
            .map_err(|error| Error::Unavailable(format!("owners bucket {BUCKET}: {error}")))?;
        Ok(Self { client, store })
    }

    /// Every key that holds a value now (deleted keys and expired values are left out), read
    /// in one batched direct get of the last value of each key.
    pub async fn read_all(&self) -> Result<Vec<LeaseEntry>> {
        let prefix = format!("$KV.{BUCKET}.");
        let page = direct_batch(
            &self.client,
            &self.store.stream_name,
            serde_json::json!({ "multi_last": [format!("{prefix}>")], "batch": 10_000 }),
        )
        .await?;
        if page.pending > 0 {
            tracing::warn!(
                pending = page.pending,
                "the owners bucket holds more keys than one read returns"
            );
        }
        let mut entries = Vec::with_capacity(page.messages.len());
        for message in page.messages {
            let Some(headers) = message.headers.as_ref() else {
                continue;
            };
            let deleted = header_text(headers, "KV-Operation").is_some_and(|op| op != "PUT");
            let subject = header_text(headers, "Nats-Subject").unwrap_or_default();
            let (Some(key), Some(revision)) = (
                subject.strip_prefix(&prefix),
                header_number(headers, "Nats-Sequence"),
            ) else {
                continue;
            };
            let written_unix_ms = header_text(headers, "Nats-Time-Stamp")
                .and_then(|text| OffsetDateTime::parse(&text, &Rfc3339).ok())
                .map(|time| (time.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
                .unwrap_or(0);
            if !deleted {
                entries.push(LeaseEntry {
                    key: key.to_owned(),
                    value: message.payload.clone(),
                    revision,
                    written_unix_ms,
                });
            }
        }
        Ok(entries)
    }

    /// Writes `key` whatever it holds (a writer's own liveness key).
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64> {
        self.store
            .put(key, value)
            .await
            .map_err(|error| Error::Unavailable(format!("put {key}: {error}")))
    }

    /// Takes `key` if it holds nothing: its revision, or `None` when someone holds it.
    pub async fn create(&self, key: &str, value: Bytes) -> Result<Option<u64>> {
        match self.store.create(key, value).await {
            Ok(revision) => Ok(Some(revision)),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(error) => Err(Error::Unavailable(format!("create {key}: {error}"))),
        }
    }

    /// Renews `key` at `revision`: its new revision, or `None` when the key was written by
    /// someone else since (the lease is lost).
    pub async fn renew(&self, key: &str, value: Bytes, revision: u64) -> Result<Option<u64>> {
        match self.store.update(key, value, revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(error) => Err(Error::Unavailable(format!("renew {key}: {error}"))),
        }
    }

    /// Deletes `key` whatever it holds (a writer's own liveness key, at shutdown).
    pub async fn remove(&self, key: &str) -> Result<()> {
        self.store
            .delete(key)
            .await
            .map_err(|error| Error::Unavailable(format!("delete {key}: {error}")))
    }

    /// Gives `key` up if it is still at `revision`; a key written by someone else since is
    /// left alone.
    pub async fn release(&self, key: &str, revision: u64) -> Result<()> {
        match self.store.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(()),
            Err(error) => Err(Error::Unavailable(format!("release {key}: {error}"))),
        }
    }
}
