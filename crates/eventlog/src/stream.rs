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
            subjects: vec![subject::ALL_EVENTS.into()],
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

    /// Creates the stream, or updates it to this configuration. Idempotent, so every writer and
    /// reader may call it on start.
    pub async fn ensure(&self, context: &jetstream::Context) -> Result<stream::Stream> {
        let config = self.config();
        match context.get_stream(&self.name).await {
            Ok(_) => {
                context
                    .update_stream(config)
                    .await
                    .map_err(|error| Error::JetStream(format!("update stream: {error}")))?;
            }
            Err(_) => {
                if let Err(error) = context.create_stream(config).await {
                    // Another process may have created it between our check and our create.
                    tracing::debug!(%error, "create stream failed; checking whether it exists now");
                }
            }
        }
        context
            .get_stream(&self.name)
            .await
            .map_err(|error| Error::JetStream(format!("get stream: {error}")))
    }
}
