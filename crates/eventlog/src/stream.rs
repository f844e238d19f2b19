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

    /// The existing configuration with the settings Coffer manages applied, and nothing
    /// weakened: replicas are never lowered (a process started with defaults must not turn an
    /// R3 stream into R1), and every field Coffer does not manage (limits an operator set, such
    /// as `max_age`, `max_bytes`, placement) is kept as it is.
    pub fn merged_into(&self, current: &stream::Config) -> stream::Config {
        let wanted = self.config();
        let mut merged = current.clone();
        merged.subjects = wanted.subjects;
        merged.subject_transform = wanted.subject_transform;
        merged.republish = wanted.republish;
        merged.allow_atomic_publish = true;
        merged.allow_message_ttl = true;
        merged.allow_direct = true;
        merged.deny_delete = true;
        merged.deny_purge = true;
        merged.duplicate_window = wanted.duplicate_window;
        merged.num_replicas = current.num_replicas.max(wanted.num_replicas);
        merged
    }

    /// Creates the stream, or updates it when the settings it manages differ ([`Self::merged_into`]).
    /// Idempotent, so every writer and reader may call it on start. A failed update of an
    /// existing stream is only logged: a consume-only reader may lack the permission, and the
    /// stream still works.
    pub async fn ensure(&self, context: &jetstream::Context) -> Result<stream::Stream> {
        match context.get_stream(&self.name).await {
            Ok(mut existing) => {
                let current = existing
                    .info()
                    .await
                    .map_err(|error| Error::JetStream(format!("stream info: {error}")))?
                    .config
                    .clone();
                if current.num_replicas > self.replicas {
                    tracing::warn!(
                        stream = %self.name,
                        existing = current.num_replicas,
                        configured = self.replicas,
                        "the stream has more replicas than configured; keeping them"
                    );
                }
                let merged = self.merged_into(&current);
                if merged != current {
                    if let Err(error) = context.update_stream(merged).await {
                        tracing::warn!(%error, stream = %self.name, "could not update the stream");
                    }
                }
            }
            Err(_) => {
                if let Err(error) = context.create_stream(self.config()).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_never_lowers_replicas_or_drops_operator_limits() {
        let operator = stream::Config {
            num_replicas: 3,
            max_age: Duration::from_secs(86_400 * 365),
            max_bytes: 1 << 40,
            ..StreamSettings::default().config()
        };
        let merged = StreamSettings::default().merged_into(&operator);
        assert_eq!(merged.num_replicas, 3);
        assert_eq!(merged.max_age, operator.max_age);
        assert_eq!(merged.max_bytes, operator.max_bytes);
        let more = StreamSettings {
            replicas: 5,
            ..Default::default()
        };
        assert_eq!(more.merged_into(&operator).num_replicas, 5);
        // What Coffer manages is set whatever was there.
        let stripped = stream::Config {
            allow_atomic_publish: false,
            republish: None,
            ..operator
        };
        let merged = StreamSettings::default().merged_into(&stripped);
        assert!(merged.allow_atomic_publish && merged.republish.is_some());
    }
}
