//! The `COFFER_EVENTS` stream's configuration.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::{subject, Error, Result};

/// How the event stream is set up. Defaults suit one local node.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Stream name. Default `COFFER_EVENTS`; tests use their own servers, not other names.
    pub name: String,
    /// Copies kept by the cluster: 1 on a single node, 3 in a production cluster.
    pub replicas: usize,
    /// How long the server remembers `Nats-Msg-Id`s to drop duplicates. Default 2 minutes;
    /// longer windows cost server memory per message. Idempotency beyond it is the writer's job.
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: "COFFER_EVENTS".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

impl StreamSettings {
    pub fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            // Events arrive on `coffer.append.>` and are stored as `coffer.events.>`; nothing
            // ingests `coffer.events.>` itself, so the republished copies never loop back in.
            subjects: vec![subject::ALL_APPENDS.into(), subject::ALL_MARKERS.into()],
            subject_transform: Some(stream::SubjectTransform {
                source: subject::ALL_APPENDS.into(),
                destination: subject::ALL_EVENTS.into(),
            }),
            // Core subscribers of `coffer.events.>` get each event once it is stored, with its
            // position in `Nats-Sequence`, and never a publish the stream refused.
            republish: Some(stream::Republish {
                source: subject::ALL_EVENTS.into(),
                destination: subject::ALL_EVENTS.into(),
                headers_only: false,
            }),
            // Transfers commit the debit, the credit and their markers together (ADR-50).
            allow_atomic_publish: true,
            // Idempotency-key markers expire after 24 hours (`Nats-TTL`).
            allow_message_ttl: true,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            // Histories are read with batched direct gets, which any replica can answer.
            allow_direct: true,
            // The log is the source of truth: nobody may rewrite it.
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        }
    }

    /// Creates the stream, or updates it when the settings it manages differ. Idempotent, so
    /// every writer and reader may call it on start. A failed update of an existing stream is
    /// only logged: a consume-only reader may lack the permission, and the stream still works.
    pub async fn ensure(&self, context: &jetstream::Context) -> Result<stream::Stream> {
        let wanted = self.config();
        match context.get_stream(&self.name).await {
            Ok(mut existing) => {
                let current = existing
                    .info()
                    .await
                    .map_err(|error| Error::JetStream(format!("stream info: {error}")))?
                    .config
                    .clone();
                let differs = current.subjects != wanted.subjects
                    || current.subject_transform != wanted.subject_transform
                    || current.republish != wanted.republish
                    || current.allow_atomic_publish != wanted.allow_atomic_publish
                    || current.allow_message_ttl != wanted.allow_message_ttl
                    || current.num_replicas != wanted.num_replicas
                    || current.duplicate_window != wanted.duplicate_window
                    || current.allow_direct != wanted.allow_direct
                    || current.deny_delete != wanted.deny_delete
                    || current.deny_purge != wanted.deny_purge;
                if differs {
                    if let Err(error) = context.update_stream(wanted).await {
                        tracing::warn!(%error, stream = %self.name, "could not update the stream");
                    }
                }
            }
            Err(_) => {
                if let Err(error) = context.create_stream(wanted).await {
                    // Another process may have created it between our check and our create.
                    tracing::debug!(%error, "create stream failed; checking whether it exists now");
                }
            }
        }
        context
            .get_stream(&self.name)
            .await
            .map_err(|error| Error::Unavailable(format!("get stream: {error}")))
    }
}
