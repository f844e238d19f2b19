//! The JetStream event log: the only code that knows subjects, headers and MessagePack.
//!
//! # Layout
//! - [`stream`]: the `COFFER_EVENTS` stream's configuration and its idempotent creation.
//! - [`subject`]: subject names for events and their filters.
//! - [`connection`]: connecting with credentials and TLS from the environment.
//! - [`chain`]: the per-account hash chain (`Coffer-Chain`) and its verifier.
//! - [`codec`]: the wire payloads (MessagePack, named fields), event versions and upcasting.
//! - [`group_commit`]: appends of many actors gathered into one atomic batch.
//! - [`snapshot`]: account snapshots, checked against the log before they are used.
//! - [`ttl_migration`]: moving a stream made with per-message TTLs onto one without.
//! - [`leases`]: the owners bucket: partition leases and live writers (`COFFER_OWNERS`).
//! - [`log`]: [`EventLog`]: atomic appends with optimistic concurrency, markers, loading an
//!   account's history, reading ranges of the stream in order.
//!
//! Every event appended states the last sequence the writer saw on `coffer.events.{account}.>`,
//! so the server refuses a stale writer (`Conflict`) and two writers can never both extend the
//! same history. Several events and markers go in one atomic batch: all are stored or none.

pub mod chain;
pub mod codec;
pub mod connection;
pub mod group_commit;
pub mod leases;
pub mod log;
pub mod signing;
pub mod snapshot;
pub mod stream;
pub mod subject;
pub mod ttl_migration;

pub use codec::{DecodeError, CURRENT_VERSIONS};
pub use connection::NatsSettings;
pub use group_commit::{AccountsReserved, GroupCommit, GroupCommitSettings};
pub use leases::{LeaseEntry, Leases};
pub use log::{Appended, Entry, EventLog, EventMetadata, RecordedEvent, StoredMarker, Unreadable};
pub use signing::{SignatureError, SigningKey, TrustedKeys};
pub use snapshot::AccountSnapshot;
pub use stream::StreamSettings;

/// Everything that can go wrong talking to the event log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A condition of the append failed (another writer extended an account after the position
    /// this writer saw, or a marker exists already); nothing was stored. The server tells the
    /// current last position of the subject whose check failed, not which check it was.
    #[error("a concurrency check failed (current last position {current_last_position:?})")]
    Conflict { current_last_position: Option<u64> },
    /// The batch held a message id the server has seen within its duplicate window; nothing
    /// was stored.
    #[error("duplicate message id: {0}")]
    Duplicate(String),
    /// Nothing was sent: NATS is not reachable right now.
    #[error("NATS is unavailable: {0}")]
    Unavailable(String),
    /// The append was sent but no acknowledgement came back: it may or may not be stored.
    #[error("append outcome unknown: {0}")]
    OutcomeUnknown(String),
    #[error("event could not be decoded: {0}")]
    Decode(#[from] DecodeError),
    /// A stored message of the event stream this build cannot read as an event: malformed
    /// (anyone with the writer's credential can append one) or of a newer version.
    #[error("{0}")]
    Unreadable(log::Unreadable),
    #[error("event could not be encoded: {0}")]
    Encode(String),
    #[error("JetStream request failed: {0}")]
    JetStream(String),
    /// The stream is configured in a way the ledger must not run on (it could lose history).
    #[error("{0}")]
    Configuration(String),
    /// A stored record no trusted writer signed (`crate::signing`): its content is not used.
    #[error("{0}")]
    Untrusted(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
