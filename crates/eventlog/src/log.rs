//! [`EventLog`]: append and read events on the JetStream stream.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use domain::{AccountId, Event};
use futures::StreamExt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::codec::{self, DecodeError};
use crate::{subject, Error, Result, StreamSettings};

/// Header names. The `Nats-*` ones are the server's; the `Coffer-*` ones describe the event for
/// people reading the stream with `nats stream view`, and carry idempotency across writers.
pub mod header {
    pub const MESSAGE_ID: &str = "Nats-Msg-Id";
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str =
        "Nats-Expected-Last-Subject-Sequence-Subject";
    pub const EVENT_TYPE: &str = "Coffer-Event-Type";
    pub const EVENT_VERSION: &str = "Coffer-Event-Version";
    pub const ACCOUNT_ID: &str = "Coffer-Account-Id";
    pub const COMMAND_ID: &str = "Coffer-Command-Id";
    pub const CORRELATION_ID: &str = "Coffer-Correlation-Id";
    pub const IDEMPOTENCY_KEY: &str = "Coffer-Idempotency-Key";
    pub const REQUEST_HASH: &str = "Coffer-Request-Hash";
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const MSGPACK: &str = "application/msgpack";
}

/// Most messages one batched direct get returns; the server caps batches too.
const DIRECT_BATCH_SIZE_MAX: usize = 1_000;
/// How long one batched direct get may take before the read fails as unavailable.
const DIRECT_BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for an append's acknowledgement before its outcome is unknown.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(3);

/// Who asked for an event and why, carried in headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventMetadata {
    /// Unique per command; derived from the idempotency key when there is one, so the server's
    /// duplicate window drops a retried append even when two writers race.
    pub command_id: String,
    /// Ties together everything one request caused (HTTP request id, or the transfer id).
    pub correlation_id: String,
    /// The client's `Idempotency-Key`, when given.
    pub idempotency_key: Option<String>,
    /// A hash of the request the key was first used with, to detect reuse with another request.
    pub request_hash: Option<String>,
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
}

/// The acknowledgement of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub position: u64,
    /// The server recognised the `Nats-Msg-Id` and kept the earlier copy at `position`.
    pub duplicate: bool,
}

/// The event log on one JetStream stream.
#[derive(Clone)]
pub struct EventLog {
    client: async_nats::Client,
    context: jetstream::Context,
    stream_name: String,
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|value| value.as_str().to_owned())
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
        }
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
    /// `expected_last_position` (0: the account has no events yet).
    pub async fn append(
        &self,
        account: &AccountId,
        expected_last_position: u64,
        event: &Event,
        metadata: &EventMetadata,
    ) -> Result<Appended> {
        if !self.is_connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let (event_type, version, payload) = codec::encode(event)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::MESSAGE_ID,
            format!("{account}:{}", metadata.command_id).as_str(),
        );
        headers.insert(
            header::EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected_last_position.to_string().as_str(),
        );
        headers.insert(
            header::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT,
            subject::account_filter(account).as_str(),
        );
        headers.insert(header::EVENT_TYPE, event_type);
        headers.insert(header::EVENT_VERSION, version.to_string().as_str());
        headers.insert(header::ACCOUNT_ID, account.as_str());
        headers.insert(header::COMMAND_ID, metadata.command_id.as_str());
        headers.insert(header::CORRELATION_ID, metadata.correlation_id.as_str());
        if let Some(key) = &metadata.idempotency_key {
            headers.insert(header::IDEMPOTENCY_KEY, key.as_str());
        }
        if let Some(hash) = &metadata.request_hash {
            headers.insert(header::REQUEST_HASH, hash.as_str());
        }
        headers.insert(header::CONTENT_TYPE, header::MSGPACK);
        let subject = subject::event(account, event_type);
        let acknowledgement = self
            .context
            .publish_with_headers(subject, headers, Bytes::from(payload))
            .await
            .map_err(|error| Error::Unavailable(format!("publish: {error}")))?;
        match acknowledgement.await {
            Ok(ack) => Ok(Appended {
                position: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(error) => match error.kind() {
                PublishErrorKind::WrongLastSequence => Err(Error::Conflict {
                    expected_last_position,
                }),
                PublishErrorKind::StreamNotFound => {
                    Err(Error::Unavailable(format!("stream not reachable: {error}")))
                }
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    Err(Error::OutcomeUnknown(error.to_string()))
                }
                _ => Err(Error::JetStream(error.to_string())),
            },
        }
    }

    /// Loads `account`'s events after `after_position`, in order.
    pub async fn load_account(
        &self,
        account: &AccountId,
        after_position: u64,
    ) -> Result<Vec<RecordedEvent>> {
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

    /// Reads up to `limit` events of the whole stream after `after_position`, in order.
    pub async fn read_after(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        let page = self
            .direct_batch(serde_json::json!({
                "seq": after_position.saturating_add(1),
                "batch": limit.clamp(1, DIRECT_BATCH_SIZE_MAX),
            }))
            .await?;
        page.messages.iter().map(decode_direct).collect()
    }

    /// Reads up to `limit` events stored at or after `since`, in order.
    pub async fn read_since(
        &self,
        since: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        let start = since
            .format(&Rfc3339)
            .map_err(|error| Error::JetStream(error.to_string()))?;
        let page = self
            .direct_batch(serde_json::json!({
                "start_time": start,
                "batch": limit.clamp(1, DIRECT_BATCH_SIZE_MAX),
            }))
            .await?;
        page.messages.iter().map(decode_direct).collect()
    }

    /// The position of `account`'s last event (0: none), answered by the stream leader. Direct
    /// gets may be served by a lagging replica; this read is what a writer checks before it
    /// refuses a command, so a refusal is never based on a stale copy.
    pub async fn last_account_position(&self, account: &AccountId) -> Result<u64> {
        if !self.is_connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let request = serde_json::json!({ "last_by_subj": subject::account_filter(account) });
        let body =
            serde_json::to_vec(&request).map_err(|error| Error::JetStream(error.to_string()))?;
        let reply = tokio::time::timeout(
            DIRECT_BATCH_TIMEOUT,
            self.client.request(
                format!("$JS.API.STREAM.MSG.GET.{}", self.stream_name),
                body.into(),
            ),
        )
        .await
        .map_err(|_| Error::Unavailable("last position request timed out".into()))?
        .map_err(|error| Error::Unavailable(error.to_string()))?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
            .map_err(|error| Error::JetStream(format!("stream message answer: {error}")))?;
        if let Some(sequence) = answer["message"]["seq"].as_u64() {
            return Ok(sequence);
        }
        match answer["error"]["err_code"].as_u64() {
            // 10037: no message found, the account has no events.
            Some(10037) => Ok(0),
            _ => Err(Error::JetStream(format!("stream message answer: {answer}"))),
        }
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

    /// One batched direct get: the server answers with up to `batch` messages and then an
    /// end-of-batch status (204) whose headers tell how many remain.
    async fn direct_batch(&self, request: serde_json::Value) -> Result<DirectPage> {
        if !self.is_connected() {
            return Err(Error::Unavailable("not connected to NATS".into()));
        }
        let inbox = self.client.new_inbox();
        let mut subscription = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|error| Error::Unavailable(error.to_string()))?;
        let body =
            serde_json::to_vec(&request).map_err(|error| Error::JetStream(error.to_string()))?;
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", self.stream_name),
                inbox,
                body.into(),
            )
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
}

#[derive(Default)]
struct DirectPage {
    messages: Vec<async_nats::Message>,
    pending: u64,
    last_sequence: Option<u64>,
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|value| value.as_str().parse().ok())
}

fn decode_direct(message: &async_nats::Message) -> Result<RecordedEvent> {
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
    Ok(decode_stored(
        &subject,
        position,
        time,
        headers,
        &message.payload,
    )?)
}

/// Decodes a stored message, from a direct get or a consumer, into a [`RecordedEvent`].
pub fn decode_stored(
    subject: &str,
    position: u64,
    time: OffsetDateTime,
    headers: &HeaderMap,
    payload: &[u8],
) -> Result<RecordedEvent, DecodeError> {
    let (account, subject_type) = subject::parse(subject).ok_or(DecodeError::Header("subject"))?;
    let event_type =
        header_text(headers, header::EVENT_TYPE).unwrap_or_else(|| subject_type.into());
    let version = match header_text(headers, header::EVENT_VERSION) {
        Some(text) => text
            .parse()
            .map_err(|_| DecodeError::Header(header::EVENT_VERSION))?,
        None => 1,
    };
    let account_id =
        AccountId::parse(account).map_err(|_| DecodeError::Header(header::ACCOUNT_ID))?;
    let event = codec::decode(&event_type, version, payload)?;
    Ok(RecordedEvent {
        position,
        subject: subject.to_owned(),
        account_id,
        time,
        event,
        metadata: EventMetadata {
            command_id: header_text(headers, header::COMMAND_ID).unwrap_or_default(),
            correlation_id: header_text(headers, header::CORRELATION_ID).unwrap_or_default(),
            idempotency_key: header_text(headers, header::IDEMPOTENCY_KEY),
            request_hash: header_text(headers, header::REQUEST_HASH),
        },
    })
}
