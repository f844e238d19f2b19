//! [`EventLog`]: append and read events on the JetStream stream.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::{HeaderMap, RequestErrorKind, StatusCode};
use base64::Engine as _;
use bytes::Bytes;
use domain::{AccountId, Event};
use futures::StreamExt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::codec::{self, DecodeError};
use crate::{subject, Error, Result, StreamSettings};

/// Header names. The `Nats-*` ones are the server's; the `Coffer-*` ones describe the event for
/// people reading the stream with `nats stream view` or `nats sub`.
pub mod header {
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str =
        "Nats-Expected-Last-Subject-Sequence-Subject";
    pub const TTL: &str = "Nats-TTL";
    pub const ROLLUP: &str = "Nats-Rollup";
    pub const SCHEDULE: &str = "Nats-Schedule";
    pub const SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
    pub const BATCH_ID: &str = "Nats-Batch-Id";
    pub const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
    pub const BATCH_COMMIT: &str = "Nats-Batch-Commit";
    pub const EVENT_TYPE: &str = "Coffer-Event-Type";
    pub const EVENT_VERSION: &str = "Coffer-Event-Version";
    pub const ACCOUNT_ID: &str = "Coffer-Account-Id";
    pub const COMMAND_ID: &str = "Coffer-Command-Id";
    pub const CORRELATION_ID: &str = "Coffer-Correlation-Id";
    pub const CHAIN: &str = "Coffer-Chain";
    /// A writer's signature of the event's chain value, or of a snapshot (`crate::signing`).
    pub const SIGNATURE: &str = crate::signing::HEADER;
    /// On a hold's scheduled expiry: the hold's `expires_at` (Unix seconds). The schedule fires
    /// ahead of it, and the writer that receives it expires the hold at this time.
    pub const HOLD_EXPIRES_AT: &str = "Coffer-Hold-Expires-At";
    /// W3C trace context of the request that caused the event.
    pub const TRACEPARENT: &str = trace_context::HEADER;
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const MSGPACK: &str = "application/msgpack";
}

/// Most messages one batched direct get returns; the server caps batches too.
const DIRECT_BATCH_SIZE_MAX: usize = 1_000;
/// How long one batched direct get may take before the read fails as unavailable.
const DIRECT_BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for an append's acknowledgement before its outcome is unknown.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Most messages in one atomic batch: the server's limit (ADR-50).
pub const BATCH_SIZE_MAX: usize = 1_000;
/// JetStream error codes the log tells apart.
mod error_code {
    /// A `Nats-Expected-Last-*` check failed; the description carries the current sequence.
    pub const WRONG_LAST_SEQUENCE: u64 = 10071;
    /// A subject's check could not be made: a message on it is still being stored (a clustered
    /// stream's proposal in flight, or an earlier message of the same batch).
    pub const LAST_SEQUENCE_IN_PROCESS: u64 = 10164;
    /// A batch held a `Nats-Msg-Id` the server has already seen.
    pub const BATCH_DUPLICATE_MESSAGE_ID: u64 = 10201;
    /// Too many batches in flight on the stream or the server.
    pub const BATCH_TOO_MANY_INFLIGHT: u64 = 10210;
    /// The batch was abandoned (a gap, or the server's batch timeout).
    pub const BATCH_INCOMPLETE: u64 = 10176;
}

/// Who asked for an event and why, carried in headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventMetadata {
    /// Unique per command; every event one command appends carries the same id.
    pub command_id: String,
    /// Ties together everything one request caused (the HTTP request id, or the NATS one).
    pub correlation_id: String,
    /// The W3C `traceparent` of the writer's hop of the request, if it had one.
    pub traceparent: Option<String>,
}

impl EventMetadata {
    /// The stored `traceparent`, parsed (`None` when absent or invalid).
    pub fn trace(&self) -> Option<trace_context::TraceParent> {
        self.traceparent
            .as_deref()
            .and_then(trace_context::TraceParent::parse)
    }

    /// The trace id of `traceparent`, for log lines (`trace_id`).
    pub fn trace_id(&self) -> Option<String> {
        self.trace().map(|trace| trace.trace_id())
    }
}

/// An event as stored: its position in the stream and its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub position: u64,
    pub subject: String,
    pub account_id: AccountId,
    pub time: OffsetDateTime,
    pub event: Event,
    pub metadata: EventMetadata,
    /// The stored `Coffer-Chain` value, if the event carries one.
    pub chain: Option<String>,
    /// The stored `Coffer-Signature`, if the event carries one (`crate::signing`).
    pub signature: Option<String>,
    /// The position of the account's event before this one, as the append's concurrency check
    /// stated it and the stream enforced it (`Nats-Expected-Last-Subject-Sequence` on this
    /// account's own subjects); `None` when the message makes no such claim. A reader that has
    /// not applied that position for the account has missed one of its events.
    pub previous_position: Option<u64>,
    /// The stored payload version and bytes, from which the chain is recomputed.
    pub version: u32,
    pub payload: Bytes,
}

impl RecordedEvent {
    /// The chain value this event should carry after an event whose value is `previous`.
    pub fn expected_chain(&self, previous: &str) -> String {
        crate::chain::link(
            previous,
            self.account_id.as_str(),
            self.event.event_type(),
            self.version,
            &self.payload,
        )
    }
}

/// The acknowledgement of an append: where its messages were stored. The messages of one append
/// are stored at consecutive positions, the first at `first_position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub first_position: u64,
    pub last_position: u64,
}

impl Appended {
    /// The position of the `index`-th message of the append.
    pub fn position_of(&self, index: usize) -> u64 {
        self.first_position + index as u64
    }
}

/// One message of an append.
// Entries live for one append, mostly events; boxing the event would add an allocation per
// command on the hot path (issue 21 counts them) to save bytes on the rarer markers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// An event of `account`, stored only if the account's last event is at
    /// `expected_last_position` (0: the account has no events yet).
    Event {
        account: AccountId,
        expected_last_position: u64,
        event: Event,
        metadata: EventMetadata,
        /// Its `Coffer-Chain` value ([`crate::chain::next`] of the account's previous one).
        chain: String,
    },
    /// A marker outside the events, stored only if `subject` holds nothing: the first claim of
    /// an id or key wins. Markers live as long as the events: the event stream allows no
    /// per-message TTL (a writer credential could otherwise append what vanishes later).
    Marker { subject: String, payload: Vec<u8> },
}

/// A marker as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMarker {
    pub position: u64,
    pub payload: Vec<u8>,
}

/// The event log on one JetStream stream (and the schedules stream beside it).
#[derive(Clone)]
pub struct EventLog {
    client: async_nats::Client,
    context: jetstream::Context,
    stream_name: String,
    schedules_name: String,
    snapshots_name: String,
    /// Failpoint for tests: a pause between staging an append and committing it.
    failpoint_commit_delay: Option<std::time::Duration>,
    /// Signs every event and snapshot this log stores, when the writer has a key.
    signer: Option<std::sync::Arc<crate::SigningKey>>,
    /// Whose signatures events and snapshots read back must carry, when configured.
    trusted: Option<std::sync::Arc<crate::TrustedKeys>>,
}

/// The header names of every appended message, made once: a name given as `&str` is copied
/// into a new buffer on every insert (a dozen per event: issue 21).
mod names {
    use async_nats::header::HeaderName;

    use super::header;

    pub const CHAIN: HeaderName = HeaderName::from_static(header::CHAIN);
    pub const SIGNATURE: HeaderName = HeaderName::from_static(header::SIGNATURE);
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: HeaderName =
        HeaderName::from_static(header::EXPECTED_LAST_SUBJECT_SEQUENCE);
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: HeaderName =
        HeaderName::from_static(header::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT);
    pub const EVENT_TYPE: HeaderName = HeaderName::from_static(header::EVENT_TYPE);
    pub const EVENT_VERSION: HeaderName = HeaderName::from_static(header::EVENT_VERSION);
    pub const ACCOUNT_ID: HeaderName = HeaderName::from_static(header::ACCOUNT_ID);
    pub const COMMAND_ID: HeaderName = HeaderName::from_static(header::COMMAND_ID);
    pub const CORRELATION_ID: HeaderName = HeaderName::from_static(header::CORRELATION_ID);
    pub const TRACEPARENT: HeaderName = HeaderName::from_static(header::TRACEPARENT);
    pub const CONTENT_TYPE: HeaderName = HeaderName::from_static(header::CONTENT_TYPE);
    pub const BATCH_ID: HeaderName = HeaderName::from_static(header::BATCH_ID);
    pub const BATCH_SEQUENCE: HeaderName = HeaderName::from_static(header::BATCH_SEQUENCE);
    pub const BATCH_COMMIT: HeaderName = HeaderName::from_static(header::BATCH_COMMIT);
}

pub(crate) fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|value| value.as_str().to_owned())
}

/// The subject, headers and payload an entry is published with.
fn message(
    entry: &Entry,
    signer: Option<&crate::SigningKey>,
) -> Result<(String, HeaderMap, Bytes)> {
    let mut headers = HeaderMap::new();
    match entry {
        Entry::Event {
            account,
            expected_last_position,
            event,
            metadata,
            chain,
        } => {
            let (event_type, version, payload) = codec::encode(event)?;
            headers.insert(names::CHAIN, chain.as_str());
            if let Some(signer) = signer {
                headers.insert(names::SIGNATURE, signer.sign_event(chain));
            }
            headers.insert(
                names::EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected_last_position.to_string(),
            );
            headers.insert(
                names::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT,
                subject::account_filter(account),
            );
            headers.insert(names::EVENT_TYPE, event_type);
            headers.insert(names::EVENT_VERSION, version.to_string());
            headers.insert(names::ACCOUNT_ID, account.as_str());
            headers.insert(names::COMMAND_ID, metadata.command_id.as_str());
            headers.insert(names::CORRELATION_ID, metadata.correlation_id.as_str());
            if let Some(traceparent) = &metadata.traceparent {
                headers.insert(names::TRACEPARENT, traceparent.as_str());
            }
            headers.insert(names::CONTENT_TYPE, header::MSGPACK);
            Ok((
                subject::append(account, event_type),
                headers,
                Bytes::from(payload),
            ))
        }
        Entry::Marker { subject, payload } => {
            headers.insert(names::EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            if let Some(signer) = signer {
                headers.insert(
                    names::SIGNATURE,
                    signer.sign_marker(subject, payload).as_str(),
                );
            }
            headers.insert(names::CONTENT_TYPE, header::MSGPACK);
            Ok((subject.clone(), headers, Bytes::from(payload.clone())))
        }
    }
}

/// What the server answers to a publish that reaches the stream.
#[derive(Debug, serde::Deserialize)]
struct PublishAnswer {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Debug, serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// Turns the stream's answer to a (commit) publish into the positions or the error.
fn acknowledgement(payload: &[u8], messages: usize) -> Result<Appended> {
    let answer: PublishAnswer = serde_json::from_slice(payload).map_err(|error| {
        Error::OutcomeUnknown(format!("unreadable publish acknowledgement: {error}"))
    })?;
    if let Some(error) = answer.error {
        return Err(match error.err_code {
            error_code::WRONG_LAST_SEQUENCE => Error::Conflict {
                current_last_position: error
                    .description
                    .rsplit(':')
                    .next()
                    .and_then(|text| text.trim().parse().ok()),
            },
            error_code::LAST_SEQUENCE_IN_PROCESS => Error::Conflict {
                current_last_position: None,
            },
            error_code::BATCH_DUPLICATE_MESSAGE_ID => Error::Duplicate(error.description),
            // Nothing was stored: too many batches in flight, or the batch fell apart.
            error_code::BATCH_TOO_MANY_INFLIGHT | error_code::BATCH_INCOMPLETE => {
                Error::Unavailable(error.description)
            }
            code => Error::JetStream(format!("{code}: {}", error.description)),
        });
    }
    let count = answer.count.unwrap_or(1);
    if answer.seq == 0 || count != messages as u64 {
        return Err(Error::OutcomeUnknown(format!(
            "acknowledgement of {messages} messages says seq {} count {count}",
            answer.seq
        )));
    }
    Ok(Appended {
        first_position: answer.seq + 1 - count,
        last_position: answer.seq,
    })
}

impl EventLog {
    /// Ensures the stream exists with `settings` and returns a log on it.
    pub async fn open(client: async_nats::Client, settings: &StreamSettings) -> Result<Self> {
        let log = Self::new(client, settings);
        settings.ensure(&log.context).await?;
        Ok(log)
    }

    /// A log on the stream, without checking that it exists (see [`StreamSettings::ensure`]).
    pub fn new(client: async_nats::Client, settings: &StreamSettings) -> Self {
        let mut context = jetstream::new(client.clone());
        context.set_timeout(ACK_TIMEOUT);
        Self {
            client,
            context,
            stream_name: settings.name.clone(),
            schedules_name: settings.schedules_name.clone(),
            snapshots_name: settings.snapshots_name.clone(),
            failpoint_commit_delay: None,
            signer: None,
            trusted: None,
        }
    }

    /// Signs every event and snapshot this log appends with `key`.
    pub fn with_signer(mut self, key: std::sync::Arc<crate::SigningKey>) -> Self {
        self.signer = Some(key);
        self
    }

    /// Requires `keys`' signatures on the snapshots this log loads (an unsigned or badly signed
    /// one is ignored), and gives them to whoever checks events ([`EventLog::trusted_keys`]).
    pub fn with_trusted_keys(mut self, keys: std::sync::Arc<crate::TrustedKeys>) -> Self {
        self.trusted = Some(keys);
        self
    }

    /// The keys events must be signed with, when signatures are checked.
    pub fn trusted_keys(&self) -> Option<&std::sync::Arc<crate::TrustedKeys>> {
        self.trusted.as_ref()
    }

    /// Failpoint for tests: every append pauses `delay` between staging its messages and the
    /// last check of its deadline before the commit (a slow connection, forced).
    pub fn with_failpoint_commit_delay(mut self, delay: std::time::Duration) -> Self {
        self.failpoint_commit_delay = Some(delay);
        self
    }

    pub fn schedules_name(&self) -> &str {
        &self.schedules_name
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Appends one event to `account`, on the condition that the account's last event is at
    /// `expected_last_position` (0: the account has no events yet), chained after that event
    /// (its `Coffer-Chain` is read from the stream leader first). A convenience for fixtures and
    /// tools; the writer knows its accounts' chains and uses [`EventLog::append_atomic`].
    pub async fn append(
        &self,
        account: &AccountId,
        expected_last_position: u64,
        event: &Event,
        metadata: &EventMetadata,
    ) -> Result<Appended> {
        let previous = self
            .leader_get(serde_json::json!({ "last_by_subj": subject::account_filter(account) }))
            .await?;
        let previous_chain = previous
            .as_ref()
            .and_then(|message| message["hdrs"].as_str())
            .and_then(|encoded| {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok()
            })
            .and_then(|raw| stored_header(&raw, header::CHAIN))
            .unwrap_or_else(|| crate::chain::GENESIS.to_owned());
        let chain = crate::chain::next(&previous_chain, account, event)?;
        self.append_atomic(&[Entry::Event {
            account: account.clone(),
            expected_last_position,
            event: event.clone(),
            metadata: metadata.clone(),
            chain,
        }])
        .await
    }

    /// Appends `entries` all together or not at all: one JetStream atomic batch (ADR-50) whose
    /// every message keeps its own condition, each checked against the stream as it was before
    /// the batch. They are stored at consecutive positions in the given order. A single entry is
    /// a plain publish.
    ///
    /// Errors: `Conflict` when any condition failed (nothing stored), `Unavailable` when nothing
    /// was stored for another reason, `OutcomeUnknown` when the commit was sent and not answered.
    pub async fn append_atomic(&self, entries: &[Entry]) -> Result<Appended> {
        self.append_atomic_before(entries, None).await
    }

    /// [`EventLog::append_atomic`], sending nothing that commits after `deadline`: staging
    /// messages can wait in the client's buffer (a reconnect), so the deadline and the
    /// connection are checked again right before the message that commits. Giving up there
    /// stores nothing (the server drops a batch that never commits) and is `Unavailable`.
    pub async fn append_atomic_before(
        &self,
        entries: &[Entry],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Appended> {
        let entries: Vec<&Entry> = entries.iter().collect();
        self.append_atomic_refs_before(&entries, deadline).await
    }

    /// [`EventLog::append_atomic_before`] of entries held elsewhere (group commit's members),
    /// without copying them.
    pub async fn append_atomic_refs_before(
        &self,
        entries: &[&Entry],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Appended> {
        if entries.is_empty() || entries.len() > BATCH_SIZE_MAX {
            return Err(Error::Encode(format!(
                "an append holds 1 to {BATCH_SIZE_MAX} messages, not {}",
                entries.len()
            )));
        }
        if !self.is_connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let messages = entries
            .iter()
            .map(|entry| message(entry, self.signer.as_deref()))
            .collect::<Result<Vec<_>>>()?;
        let count = messages.len();
        let batch_id = (count > 1).then(|| uuid::Uuid::now_v7().simple().to_string());
        let mut commit = None;
        for (index, (subject, mut headers, payload)) in messages.into_iter().enumerate() {
            if let Some(batch_id) = &batch_id {
                headers.insert(names::BATCH_ID, batch_id.as_str());
                headers.insert(names::BATCH_SEQUENCE, (index + 1).to_string());
            }
            if index + 1 == count {
                if batch_id.is_some() {
                    headers.insert(names::BATCH_COMMIT, "1");
                }
                commit = Some((subject, headers, payload));
            } else {
                // Staged messages need no answer: the commit's answer covers the batch, and
                // one connection keeps them in order before it.
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|error| Error::Unavailable(format!("publish: {error}")))?;
            }
        }
        let Some((subject, headers, payload)) = commit else {
            return Err(Error::Encode("an append needs a message".into()));
        };
        if let Some(delay) = self.failpoint_commit_delay {
            tokio::time::sleep(delay).await;
        }
        if deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline) {
            return Err(Error::Unavailable(
                "the append reached its deadline before it could be committed".into(),
            ));
        }
        if !self.is_connected() {
            return Err(Error::Unavailable(
                "NATS connection lost before the commit".into(),
            ));
        }
        self.publish_acknowledged(subject, headers, payload, count)
            .await
    }

    /// Publishes the last (or only) message of an append as a request and reads the stream's
    /// acknowledgement of the `count` messages it completes.
    async fn publish_acknowledged(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        count: usize,
    ) -> Result<Appended> {
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(ACK_TIMEOUT));
        match self.client.send_request(subject, request).await {
            Ok(reply) => acknowledgement(&reply.payload, count),
            Err(error) => Err(match error.kind() {
                RequestErrorKind::NoResponders => {
                    Error::Unavailable(format!("stream not reachable: {error}"))
                }
                _ => Error::OutcomeUnknown(error.to_string()),
            }),
        }
    }

    /// Schedules `payload` with `headers` to be stored on `target` at `at` (`Nats-Schedule:
    /// @at`; a time already past fires at once), kept on `subject` until then, in the schedules
    /// stream. The server copies `headers` onto the message it stores. The first schedule on a
    /// subject stays: a second one (a retry) is a no-op, and `Ok(false)` says so.
    pub async fn schedule(
        &self,
        subject: &str,
        target: &str,
        at: OffsetDateTime,
        mut headers: HeaderMap,
        payload: Vec<u8>,
    ) -> Result<bool> {
        if !self.is_connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let at = at
            .to_offset(time::UtcOffset::UTC)
            .replace_nanosecond(0)
            .map_err(|error| Error::Encode(error.to_string()))?
            .format(&Rfc3339)
            .map_err(|error| Error::Encode(error.to_string()))?;
        headers.insert(header::SCHEDULE, format!("@at {at}").as_str());
        headers.insert(header::SCHEDULE_TARGET, target);
        headers.insert(header::EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let appended = self
            .publish_acknowledged(subject.to_owned(), headers, payload.into(), 1)
            .await;
        match appended {
            Ok(_) => Ok(true),
            Err(Error::Conflict { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Stores `snapshot` as its account's snapshot, replacing the previous one.
    pub async fn save_snapshot(&self, snapshot: &crate::AccountSnapshot) -> Result<()> {
        if !self.is_connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCOUNT_ID, snapshot.state.id().as_str());
        headers.insert(header::CONTENT_TYPE, header::MSGPACK);
        let payload = snapshot.encode()?;
        if let Some(signer) = &self.signer {
            headers.insert(header::SIGNATURE, signer.sign_snapshot(&payload).as_str());
        }
        self.publish_acknowledged(
            subject::snapshot(snapshot.state.id()),
            headers,
            payload.into(),
            1,
        )
        .await
        .map(|_| ())
    }

    /// `account`'s snapshot, when there is one this build reads and it belongs to the log as it
    /// is: the account's event at the snapshot's position carries the snapshot's chain value.
    /// Anything else is `None` (and logged): the caller replays the whole history.
    pub async fn load_snapshot(
        &self,
        account: &AccountId,
    ) -> Result<Option<crate::AccountSnapshot>> {
        let answer = self
            .leader_get_from(
                &self.snapshots_name,
                serde_json::json!({ "last_by_subj": subject::snapshot(account) }),
            )
            .await?;
        let signature = stored_signature(answer.as_ref());
        let Some(stored) = stored_message(answer)? else {
            return Ok(None);
        };
        if let Some(trusted) = &self.trusted {
            if let Err(error) = trusted.verify_snapshot(&stored.payload, signature.as_deref()) {
                // A stolen NATS credential may write snapshots: without a trusted signature one
                // could hand a writer any balance. Replaying the history only costs time.
                tracing::warn!(%account, %error, "a snapshot without a trusted signature; replaying the history");
                return Ok(None);
            }
        }
        let snapshot = match crate::AccountSnapshot::decode(&stored.payload) {
            Ok(Some(snapshot)) if snapshot.state.id() == account => snapshot,
            Ok(Some(_)) => {
                tracing::warn!(%account, "a snapshot of another account; replaying the history");
                return Ok(None);
            }
            Ok(None) => {
                tracing::info!(%account, "a snapshot in a format this build does not read; replaying the history");
                return Ok(None);
            }
            Err(error) => {
                tracing::warn!(%account, %error, "an unreadable snapshot; replaying the history");
                return Ok(None);
            }
        };
        let event = self
            .first_account_message_from(account, snapshot.position)
            .await?
            .and_then(|message| decode_direct(&message).ok());
        match event {
            Some(event)
                if event.position == snapshot.position
                    && event.chain.as_deref() == Some(snapshot.chain.as_str()) =>
            {
                Ok(Some(snapshot))
            }
            _ => {
                tracing::warn!(%account, position = snapshot.position, "a snapshot that does not match the log; replaying the history");
                Ok(None)
            }
        }
    }

    /// The message last stored on `subject` of the schedules stream (a due expiry), if any.
    pub async fn read_scheduled(&self, subject: &str) -> Result<Option<StoredMarker>> {
        let answer = self
            .leader_get_from(
                &self.schedules_name,
                serde_json::json!({ "last_by_subj": subject }),
            )
            .await?;
        stored_message(answer)
    }

    /// The marker stored on `subject`, if any, answered by the stream leader (a retry must not
    /// miss a marker a lagging replica has not stored yet).
    pub async fn read_marker(&self, subject: &str) -> Result<Option<StoredMarker>> {
        let answer = self
            .leader_get(serde_json::json!({ "last_by_subj": subject }))
            .await?;
        let signature = stored_signature(answer.as_ref());
        let marker = stored_message(answer)?;
        if let (Some(trusted), Some(marker)) = (&self.trusted, &marker) {
            // A marker says an id or key was used and what for (a transfer's postings, a
            // command's answer): one a NATS credential wrote alone would let a replay or a
            // reversal act on what it says. Its command is refused instead.
            if let Err(error) = trusted.verify_marker(
                marker.position,
                subject,
                &marker.payload,
                signature.as_deref(),
            ) {
                tracing::error!(%subject, position = marker.position, %error, "a marker no trusted writer signed");
                return Err(Error::Untrusted(format!(
                    "the record at position {} on {subject} cannot be trusted: {error}",
                    marker.position
                )));
            }
        }
        Ok(marker)
    }

    /// The signer, if this log signs what it appends.
    pub fn signer(&self) -> Option<&std::sync::Arc<crate::SigningKey>> {
        self.signer.as_ref()
    }

    /// Loads `account`'s events after `after_position`, in order.
    pub async fn load_account(
        &self,
        account: &AccountId,
        after_position: u64,
    ) -> Result<Vec<RecordedEvent>> {
        let known_chain = (after_position == 0).then_some(crate::chain::GENESIS);
        self.load_account_from(account, after_position, known_chain)
            .await
    }

    /// Loads `account`'s events after `after_position`, whose chain value (when known) is
    /// `after_chain`, in order.
    pub async fn load_account_after(
        &self,
        account: &AccountId,
        after_position: u64,
        after_chain: &str,
    ) -> Result<Vec<RecordedEvent>> {
        self.load_account_from(account, after_position, Some(after_chain))
            .await
    }

    async fn load_account_from(
        &self,
        account: &AccountId,
        after_position: u64,
        after_chain: Option<&str>,
    ) -> Result<Vec<RecordedEvent>> {
        // The account's last event comes from the server's per-subject index (about a
        // millisecond); the walk below goes through the stream from `after_position`, which on a
        // stream of a million messages costs the server 8-14 ms even when it finds little
        // (measured, docs/benchmarks.md). The last event is the only one after `after_position`
        // when the server stored it on the condition that the account's last event was at
        // `after_position` (its expected-last-subject-sequence headers, kept with the message)
        // and no earlier member of its atomic batch is the account's (the server checks a
        // batch's conditions against the stream before the batch, so they could all state that
        // position). Then a new account's first event, or the one event after a snapshot or a
        // cached state, needs no walk. Its chain value must build on `after_chain` as well:
        // anything unexpected only costs the walk. From nothing (a new account), the server's
        // count of the account's events says it at once.
        let Some(last) = self.last_account_event(account).await? else {
            return Ok(Vec::new());
        };
        if last.event.position <= after_position {
            return Ok(Vec::new());
        }
        if let Some(after_chain) = after_chain {
            let only_one = if after_position == 0 {
                // The server's per-subject index counts the account's events without reading
                // any message; a scan over a big stream reads whole message blocks.
                self.account_event_count(account).await? == 1
            } else {
                let follows_known = last.checked_after == Some(after_position)
                    && last.event.chain.as_deref()
                        == Some(last.event.expected_chain(after_chain).as_str());
                follows_known && self.alone_in_its_batch(account, &last).await?
            };
            if only_one {
                return Ok(vec![last.event]);
            }
        }
        let filter = subject::account_filter(account);
        let mut events = Vec::new();
        let mut next = after_position.saturating_add(1);
        loop {
            let page = self
                .direct_batch(serde_json::json!({
                    "seq": next,
                    "next_by_subj": filter,
                    "batch": DIRECT_BATCH_SIZE_MAX,
                }))
                .await?;
            for message in &page.messages {
                events.push(decode_direct(message)?);
            }
            match page.last_sequence {
                Some(last) if page.pending > 0 => next = last + 1,
                _ => return Ok(events),
            }
        }
    }

    /// `account`'s last event as a direct get (any replica) sees it.
    async fn last_account_event(&self, account: &AccountId) -> Result<Option<LastEvent>> {
        let filter = subject::account_filter(account);
        let message = self
            .api_request(
                format!("$JS.API.DIRECT.GET.{}", self.stream_name),
                serde_json::json!({ "last_by_subj": filter }),
            )
            .await?;
        match message.status {
            None | Some(StatusCode::OK) => {
                let headers = message.headers.clone().unwrap_or_default();
                let on_account =
                    header_text(&headers, header::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT)
                        .is_some_and(|checked| checked == filter);
                Ok(Some(LastEvent {
                    event: decode_direct(&message)?,
                    checked_after: on_account
                        .then(|| header_number(&headers, header::EXPECTED_LAST_SUBJECT_SEQUENCE))
                        .flatten(),
                    batch_sequence: header_number(&headers, header::BATCH_SEQUENCE),
                }))
            }
            Some(StatusCode::NOT_FOUND) => Ok(None),
            Some(status) => Err(Error::JetStream(format!(
                "direct get answered {status}: {}",
                message.description.unwrap_or_default()
            ))),
        }
    }

    /// How many events `account` has, from the server's per-subject counts (a stream info
    /// request filtered on the account's subjects).
    async fn account_event_count(&self, account: &AccountId) -> Result<u64> {
        let reply = self
            .api_request(
                format!("$JS.API.STREAM.INFO.{}", self.stream_name),
                serde_json::json!({ "subjects_filter": subject::account_filter(account) }),
            )
            .await?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|error| Error::JetStream(format!("stream info answer: {error}")))?;
        if answer.get("error").is_some() {
            return Err(Error::JetStream(format!(
                "stream info answer: {}",
                answer["error"]
            )));
        }
        Ok(answer["state"]["subjects"]
            .as_object()
            .map_or(0, |subjects| {
                subjects.values().filter_map(|count| count.as_u64()).sum()
            }))
    }

    /// Whether no earlier member of `last`'s atomic batch is an event of `account` (the members
    /// of a batch are stored at consecutive positions, `Nats-Batch-Sequence` counting from 1).
    async fn alone_in_its_batch(&self, account: &AccountId, last: &LastEvent) -> Result<bool> {
        let Some(members_before) = last
            .batch_sequence
            .map(|sequence| sequence.saturating_sub(1))
            .filter(|before| *before > 0)
        else {
            return Ok(true);
        };
        let first_found = self
            .first_account_message_from(
                account,
                last.event.position.saturating_sub(members_before).max(1),
            )
            .await?
            .and_then(|message| message.headers)
            .and_then(|headers| header_number(&headers, "Nats-Sequence"));
        Ok(first_found == Some(last.event.position))
    }

    /// `account`'s first stored message at or after `position` (a direct get).
    async fn first_account_message_from(
        &self,
        account: &AccountId,
        position: u64,
    ) -> Result<Option<async_nats::Message>> {
        let page = self
            .direct_batch(serde_json::json!({
                "seq": position,
                "next_by_subj": subject::account_filter(account),
                "batch": 1,
            }))
            .await?;
        Ok(page.messages.into_iter().next())
    }

    /// Reads up to `limit` events of the whole stream after `after_position`, in order.
    pub async fn read_after(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        strict(self.read_after_each(after_position, limit).await?)
    }

    /// Like [`Self::read_after`], with each message that cannot be read as an event given as
    /// [`Unreadable`] in its place instead of failing the page: for whoever must go on past it.
    pub async fn read_after_each(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<std::result::Result<RecordedEvent, Unreadable>>> {
        let page = self
            .direct_batch(serde_json::json!({
                "seq": after_position.saturating_add(1),
                "next_by_subj": subject::ALL_EVENTS,
                "batch": limit.clamp(1, DIRECT_BATCH_SIZE_MAX),
            }))
            .await?;
        page.messages.iter().map(decode_direct_each).collect()
    }

    /// Like [`Self::read_since`], with each message that cannot be read as an event given as
    /// [`Unreadable`] in its place.
    pub async fn read_since_each(
        &self,
        since: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<std::result::Result<RecordedEvent, Unreadable>>> {
        let start = since
            .format(&Rfc3339)
            .map_err(|error| Error::JetStream(error.to_string()))?;
        let page = self
            .direct_batch(serde_json::json!({
                "start_time": start,
                "next_by_subj": subject::ALL_EVENTS,
                "batch": limit.clamp(1, DIRECT_BATCH_SIZE_MAX),
            }))
            .await?;
        page.messages.iter().map(decode_direct_each).collect()
    }

    /// Reads up to `limit` events stored at or after `since`, in order.
    pub async fn read_since(
        &self,
        since: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        strict(self.read_since_each(since, limit).await?)
    }

    /// The position of `account`'s last event (0: none), answered by the stream leader. Direct
    /// gets may be served by a lagging replica; this read is what a writer checks before it
    /// refuses a command, so a refusal is never based on a stale copy.
    pub async fn last_account_position(&self, account: &AccountId) -> Result<u64> {
        let answer = self
            .leader_get(serde_json::json!({ "last_by_subj": subject::account_filter(account) }))
            .await?;
        Ok(answer
            .and_then(|message| message["seq"].as_u64())
            .unwrap_or(0))
    }

    /// One `$JS.API.STREAM.MSG.GET` (served by the stream leader): the message, or `None`
    /// when there is none.
    async fn leader_get(&self, request: serde_json::Value) -> Result<Option<serde_json::Value>> {
        self.leader_get_from(&self.stream_name, request).await
    }

    async fn leader_get_from(
        &self,
        stream: &str,
        request: serde_json::Value,
    ) -> Result<Option<serde_json::Value>> {
        let reply = self
            .api_request(format!("$JS.API.STREAM.MSG.GET.{stream}"), request)
            .await?;
        let mut answer: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|error| Error::JetStream(format!("stream message answer: {error}")))?;
        if answer["message"].is_object() {
            return Ok(Some(answer["message"].take()));
        }
        match answer["error"]["err_code"].as_u64() {
            // 10037: no message found.
            Some(10037) => Ok(None),
            _ => Err(Error::JetStream(format!("stream message answer: {answer}"))),
        }
    }

    /// One JetStream API request with a JSON body, answered within [`DIRECT_BATCH_TIMEOUT`].
    async fn api_request(
        &self,
        subject: String,
        request: serde_json::Value,
    ) -> Result<async_nats::Message> {
        if !self.is_connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let body =
            serde_json::to_vec(&request).map_err(|error| Error::JetStream(error.to_string()))?;
        tokio::time::timeout(
            DIRECT_BATCH_TIMEOUT,
            self.client.request(subject.clone(), body.into()),
        )
        .await
        .map_err(|_| Error::Unavailable(format!("{subject} timed out")))?
        .map_err(|error| Error::Unavailable(error.to_string()))
    }

    /// The stream's last sequence: the newest position anyone can wait for.
    pub async fn last_position(&self) -> Result<u64> {
        let stream = self
            .context
            .get_stream_no_info(&self.stream_name)
            .await
            .map_err(|error| Error::Unavailable(error.to_string()))?;
        let info = stream
            .get_info()
            .await
            .map_err(|error| Error::Unavailable(error.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// One batched direct get on the event stream.
    async fn direct_batch(&self, request: serde_json::Value) -> Result<DirectPage> {
        if !self.is_connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        direct_batch(&self.client, &self.stream_name, request).await
    }
}

/// One batched direct get on `stream`: the server answers with up to `batch` messages and then
/// an end-of-batch status (204) whose headers tell how many remain.
pub(crate) async fn direct_batch(
    client: &async_nats::Client,
    stream: &str,
    request: serde_json::Value,
) -> Result<DirectPage> {
    let inbox = client.new_inbox();
    let mut subscription = client
        .subscribe(inbox.clone())
        .await
        .map_err(|error| Error::Unavailable(error.to_string()))?;
    let body = serde_json::to_vec(&request).map_err(|error| Error::JetStream(error.to_string()))?;
    client
        .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, body.into())
        .await
        .map_err(|error| Error::Unavailable(error.to_string()))?;
    let mut page = DirectPage::default();
    let deadline = tokio::time::Instant::now() + DIRECT_BATCH_TIMEOUT;
    loop {
        let message = tokio::time::timeout_at(deadline, subscription.next())
            .await
            .map_err(|_| Error::Unavailable("direct get timed out".into()))?
            .ok_or_else(|| Error::Unavailable("subscription closed".into()))?;
        match message.status {
            None | Some(StatusCode::OK) => page.messages.push(message),
            Some(StatusCode::NOT_FOUND) => return Ok(page),
            Some(StatusCode::NO_RESPONDERS) => {
                return Err(Error::Unavailable("stream has no responders".into()))
            }
            Some(status) if status.as_u16() == 204 => {
                let headers = message.headers.unwrap_or_default();
                page.pending = header_number(&headers, "Nats-Num-Pending").unwrap_or(0);
                page.last_sequence = header_number(&headers, "Nats-Last-Sequence");
                return Ok(page);
            }
            Some(status) => {
                return Err(Error::JetStream(format!(
                    "direct get answered {status}: {}",
                    message.description.unwrap_or_default()
                )))
            }
        }
    }
}

/// An account's last event with what the server checked before storing it.
struct LastEvent {
    event: RecordedEvent,
    /// The account position it was stored on the condition of (its expected last subject
    /// sequence on the account's filter), when it was.
    checked_after: Option<u64>,
    /// Its place in its atomic batch, from 1, when it was stored in one.
    batch_sequence: Option<u64>,
}

#[derive(Default)]
pub(crate) struct DirectPage {
    pub(crate) messages: Vec<async_nats::Message>,
    pub(crate) pending: u64,
    last_sequence: Option<u64>,
}

/// A header's value in the raw `NATS/1.0` header block the stream message API returns.
fn stored_header(raw: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(raw)
        .lines()
        .skip(1)
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
}

/// The `Coffer-Signature` of a message from the stream message API (`hdrs`: its headers).
fn stored_signature(message: Option<&serde_json::Value>) -> Option<String> {
    message
        .and_then(|message| message["hdrs"].as_str())
        .and_then(|raw| base64::engine::general_purpose::STANDARD.decode(raw).ok())
        .and_then(|raw| stored_header(&raw, header::SIGNATURE))
}

/// A message from the stream message API as a [`StoredMarker`].
fn stored_message(answer: Option<serde_json::Value>) -> Result<Option<StoredMarker>> {
    let Some(message) = answer else {
        return Ok(None);
    };
    let payload = match message["data"].as_str() {
        Some(data) => base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|error| Error::JetStream(format!("marker payload: {error}")))?,
        None => Vec::new(),
    };
    let position = message["seq"]
        .as_u64()
        .ok_or_else(|| Error::JetStream("marker without a sequence".into()))?;
    Ok(Some(StoredMarker { position, payload }))
}

pub(crate) fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|value| value.as_str().parse().ok())
}

/// A stored message of the event stream that cannot be read as an event, and where it is. It
/// costs its account, not the log: readers mark that account's views unreadable, writers refuse
/// its commands, `coffer verify` reports it, and everything else goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub position: u64,
    pub subject: String,
    /// When the stream stored it.
    pub time: OffsetDateTime,
    /// The account its subject names, if it names a valid one.
    pub account: Option<AccountId>,
    pub reason: String,
}

impl Unreadable {
    pub fn new(subject: &str, position: u64, time: OffsetDateTime, error: &DecodeError) -> Self {
        Self {
            position,
            subject: subject.to_owned(),
            time,
            account: subject::parse(subject)
                .and_then(|(account, _)| AccountId::parse(account).ok()),
            reason: error.to_string(),
        }
    }
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "the event at position {} ({}) cannot be read: {}",
            self.position, self.subject, self.reason
        )
    }
}

/// A direct get's answer as an event, or as [`Unreadable`] (with its position) when it is not
/// one. `Err` only for an answer without the server's own headers.
fn decode_direct_each(
    message: &async_nats::Message,
) -> Result<std::result::Result<RecordedEvent, Unreadable>> {
    let headers = message
        .headers
        .as_ref()
        .ok_or(DecodeError::Header("headers"))?;
    let subject =
        header_text(headers, "Nats-Subject").ok_or(DecodeError::Header("Nats-Subject"))?;
    let position =
        header_number(headers, "Nats-Sequence").ok_or(DecodeError::Header("Nats-Sequence"))?;
    let time = header_text(headers, "Nats-Time-Stamp")
        .and_then(|text| OffsetDateTime::parse(&text, &Rfc3339).ok())
        .ok_or(DecodeError::Header("Nats-Time-Stamp"))?;
    Ok(
        decode_stored(&subject, position, time, headers, message.payload.clone())
            .map_err(|error| Unreadable::new(&subject, position, time, &error)),
    )
}

/// A page as events, failing at its first message that is not one.
fn strict(page: Vec<std::result::Result<RecordedEvent, Unreadable>>) -> Result<Vec<RecordedEvent>> {
    page.into_iter()
        .map(|message| message.map_err(Error::Unreadable))
        .collect()
}

fn decode_direct(message: &async_nats::Message) -> Result<RecordedEvent> {
    decode_direct_each(message)?.map_err(Error::Unreadable)
}

/// Decodes a stored message, from a direct get or a consumer, into a [`RecordedEvent`].
pub fn decode_stored(
    subject: &str,
    position: u64,
    time: OffsetDateTime,
    headers: &HeaderMap,
    payload: Bytes,
) -> Result<RecordedEvent, DecodeError> {
    let (account, subject_type) = subject::parse(subject).ok_or(DecodeError::Header("subject"))?;
    let found = EventHeaders::find(headers);
    if let Some(name) = found.erasable {
        return Err(DecodeError::Erasable(name));
    }
    let event_type = found.event_type.unwrap_or(subject_type);
    let version = match found.version {
        Some(text) => text
            .parse()
            .map_err(|_| DecodeError::Header(header::EVENT_VERSION))?,
        None => 1,
    };
    let account_id =
        AccountId::parse(account).map_err(|_| DecodeError::Header(header::ACCOUNT_ID))?;
    let event = codec::decode(event_type, version, &payload)?;
    let previous_position = found.previous_position(&account_id);
    let owned = |text: Option<&str>| text.map(str::to_owned);
    Ok(RecordedEvent {
        position,
        subject: subject.to_owned(),
        account_id,
        time,
        event,
        metadata: EventMetadata {
            command_id: owned(found.command_id).unwrap_or_default(),
            correlation_id: owned(found.correlation_id).unwrap_or_default(),
            traceparent: owned(found.traceparent),
        },
        chain: owned(found.chain),
        signature: owned(found.signature),
        previous_position,
        version,
        payload,
    })
}

/// The headers an event is read from, found in one pass over the map: a lookup by name parses
/// and hashes the name each time, ten times per event of a catch-up. Names match exactly, as
/// [`HeaderMap::get`] matches them.
#[derive(Default)]
struct EventHeaders<'a> {
    event_type: Option<&'a str>,
    version: Option<&'a str>,
    command_id: Option<&'a str>,
    correlation_id: Option<&'a str>,
    traceparent: Option<&'a str>,
    chain: Option<&'a str>,
    signature: Option<&'a str>,
    checked_subject: Option<&'a str>,
    checked_sequence: Option<&'a str>,
    /// A header that lets the server drop the message (`Nats-TTL`) or messages before it
    /// (`Nats-Rollup`): no writer sets either on an event.
    erasable: Option<&'static str>,
}

impl<'a> EventHeaders<'a> {
    fn find(headers: &'a HeaderMap) -> Self {
        let mut found = Self::default();
        for (name, values) in headers.iter() {
            let slot = match AsRef::<str>::as_ref(name) {
                header::EVENT_TYPE => &mut found.event_type,
                header::EVENT_VERSION => &mut found.version,
                header::COMMAND_ID => &mut found.command_id,
                header::CORRELATION_ID => &mut found.correlation_id,
                header::TRACEPARENT => &mut found.traceparent,
                header::CHAIN => &mut found.chain,
                header::SIGNATURE => &mut found.signature,
                header::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT => &mut found.checked_subject,
                header::EXPECTED_LAST_SUBJECT_SEQUENCE => &mut found.checked_sequence,
                header::TTL => {
                    found.erasable = Some(header::TTL);
                    continue;
                }
                header::ROLLUP => {
                    found.erasable = Some(header::ROLLUP);
                    continue;
                }
                _ => continue,
            };
            *slot = values.first().map(|value| value.as_str());
        }
        found
    }

    /// The previous position the event's append was checked against, if the check was on this
    /// account's own subjects (a check named on another subject says nothing about this
    /// account).
    fn previous_position(&self, account: &AccountId) -> Option<u64> {
        let named = self
            .checked_subject?
            .strip_prefix(subject::EVENTS_PREFIX)?
            .strip_prefix('.')?
            .strip_suffix(".>")?;
        if named != account.as_str() {
            return None;
        }
        self.checked_sequence?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_headers_are_found_in_one_pass_as_get_finds_them() {
        let mut headers = HeaderMap::new();
        headers.insert(header::EVENT_TYPE, "deposited");
        headers.insert(header::EVENT_VERSION, "2");
        headers.insert(header::COMMAND_ID, "c-1");
        headers.insert(header::CORRELATION_ID, "r-1");
        headers.insert(header::CHAIN, "abc");
        headers.insert(header::SIGNATURE, "k:00");
        headers.insert(header::CONTENT_TYPE, header::MSGPACK);
        headers.insert(
            header::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT,
            "coffer.events.acc-1.>",
        );
        headers.insert(header::EXPECTED_LAST_SUBJECT_SEQUENCE, "41");
        // Another spelling is another header, for `get` and here alike.
        headers.insert("coffer-chain", "other");
        let found = EventHeaders::find(&headers);
        for (name, value) in [
            (header::EVENT_TYPE, found.event_type),
            (header::EVENT_VERSION, found.version),
            (header::COMMAND_ID, found.command_id),
            (header::CORRELATION_ID, found.correlation_id),
            (header::TRACEPARENT, found.traceparent),
            (header::CHAIN, found.chain),
            (header::SIGNATURE, found.signature),
        ] {
            assert_eq!(
                value,
                headers.get(name).map(|value| value.as_str()),
                "{name}"
            );
        }
        assert_eq!(found.chain, Some("abc"));
        let account = AccountId::parse("acc-1").unwrap();
        assert_eq!(found.previous_position(&account), Some(41));
        // A check on another account's subjects says nothing about this one.
        let other = AccountId::parse("acc-10").unwrap();
        assert_eq!(found.previous_position(&other), None);
        assert_eq!(
            EventHeaders::find(&HeaderMap::new()).previous_position(&account),
            None
        );
    }

    #[test]
    fn an_event_the_stream_may_erase_is_not_read_and_the_header_is_named() {
        let event = domain::Event::Deposited {
            amount: domain::Amount::new(5).unwrap(),
            reference: None,
            metadata: Default::default(),
        };
        let (event_type, version, payload) = codec::encode(&event).unwrap();
        let headers = |extra: Option<(&str, &str)>| {
            let mut headers = HeaderMap::new();
            headers.insert(header::EVENT_TYPE, event_type);
            headers.insert(header::EVENT_VERSION, version.to_string());
            headers.insert(header::CHAIN, "abc");
            if let Some((name, value)) = extra {
                headers.insert(name, value);
            }
            headers
        };
        let decode = |headers: &HeaderMap| {
            decode_stored(
                "coffer.events.acc-1.deposited",
                7,
                OffsetDateTime::UNIX_EPOCH,
                headers,
                Bytes::from(payload.clone()),
            )
        };
        assert_eq!(decode(&headers(None)).unwrap().event, event);
        for name in [header::TTL, header::ROLLUP] {
            let refused = decode(&headers(Some((name, "1s")))).unwrap_err();
            assert!(matches!(refused, DecodeError::Erasable(named) if named == name));
            assert!(refused.to_string().contains(name), "{refused}");
        }
        // Another spelling is another header, which the server does not act on either.
        assert!(decode(&headers(Some(("nats-ttl", "1s")))).is_ok());
    }

    #[test]
    fn stored_headers_are_found_by_name() {
        let raw = b"NATS/1.0\r\nCoffer-Chain: abc\r\nContent-Type: application/msgpack\r\n\r\n";
        assert_eq!(stored_header(raw, "Coffer-Chain").as_deref(), Some("abc"));
        assert_eq!(stored_header(raw, "Missing"), None);
    }

    #[test]
    fn acknowledgements_give_positions_or_the_failed_check() {
        let appended = acknowledgement(br#"{"stream":"S","seq":12,"batch":"b","count":3}"#, 3);
        assert_eq!(
            appended.unwrap(),
            Appended {
                first_position: 10,
                last_position: 12
            }
        );
        assert_eq!(
            acknowledgement(br#"{"stream":"S","seq":7}"#, 1).unwrap(),
            Appended {
                first_position: 7,
                last_position: 7
            }
        );
        let conflict = acknowledgement(
            br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 41"},"stream":"S","seq":0}"#,
            2,
        );
        assert!(matches!(
            conflict,
            Err(Error::Conflict {
                current_last_position: Some(41)
            })
        ));
        assert!(matches!(
            acknowledgement(br#"{"stream":"S","seq":12,"count":2}"#, 3),
            Err(Error::OutcomeUnknown(_))
        ));
    }
}
