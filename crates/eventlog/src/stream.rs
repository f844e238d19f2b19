//! The streams' configuration: `COFFER_EVENTS`, the log, `COFFER_SCHEDULES`, where hold
//! expiries wait for their time, and `COFFER_SNAPSHOTS`, account snapshots.
//!
//! Schedules live in a stream of their own because nats-server forces roll-ups on and
//! `deny_purge` off on any stream that allows message schedules (a one-shot schedule is purged
//! once it fired): on the event log that would let a publisher with `Nats-Rollup` erase an
//! account's history.

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
    /// The schedules stream's name. Default `COFFER_SCHEDULES`.
    pub schedules_name: String,
    /// The snapshots stream's name. Default `COFFER_SNAPSHOTS`.
    pub snapshots_name: String,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: "COFFER_EVENTS".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            schedules_name: "COFFER_SCHEDULES".into(),
            snapshots_name: "COFFER_SNAPSHOTS".into(),
        }
    }
}

/// Consumers the event stream holds at most. The reader role may create consumers on it (each
/// reader manages its own), so without a cap a stolen reader credential could fill the server
/// with them. A deployment needs one per reader, one more per reader during a rebuild, the
/// writers' backstop, and the ordered consumers of `coffer events tail` and NATS clients
/// following the stream: far fewer.
pub const EVENTS_MAX_CONSUMERS: i32 = 256;

/// How long a schedule or a due message is kept: longer than the longest hold (a week), so a
/// schedule always outlives its hold, and due messages do not pile up forever.
pub const SCHEDULES_MAX_AGE: Duration = Duration::from_secs(8 * 24 * 60 * 60);

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
            // No `Nats-TTL`: with it a writer credential could append an event that vanishes
            // after it was spent. Markers live as long as events. (A stream made with TTLs
            // keeps them until `coffer setup --remove-message-ttl`: see `crate::ttl_migration`.)
            allow_message_ttl: false,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            // Histories are read with batched direct gets, which any replica can answer.
            allow_direct: true,
            // The log is the source of truth: nobody may rewrite it.
            deny_delete: true,
            deny_purge: true,
            max_consumers: EVENTS_MAX_CONSUMERS,
            ..Default::default()
        }
    }

    /// The schedules stream: `Nats-Schedule` messages on `coffer.schedules.>` and what they
    /// deliver on `coffer.due.>`.
    pub fn schedules_config(&self) -> stream::Config {
        stream::Config {
            name: self.schedules_name.clone(),
            description: Some("Coffer hold expiries waiting for their time".into()),
            subjects: vec![subject::ALL_SCHEDULES.into(), subject::ALL_DUE.into()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: self.replicas,
            max_age: SCHEDULES_MAX_AGE,
            allow_direct: true,
            allow_message_schedules: true,
            ..Default::default()
        }
    }

    /// The snapshots stream: the last snapshot of each account on `coffer.snapshots.{account}`
    /// (a cache of the log: see [`crate::snapshot`]).
    pub fn snapshots_config(&self) -> stream::Config {
        stream::Config {
            name: self.snapshots_name.clone(),
            description: Some("Coffer account snapshots: the last one per account".into()),
            subjects: vec![subject::ALL_SNAPSHOTS.into()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.replicas,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The existing configuration with the settings Coffer manages applied, and nothing
    /// weakened: replicas are never lowered (a process started with defaults must not turn an
    /// R3 stream into R1), and every field Coffer does not manage (placement, say) is kept as it
    /// is. Limits that would delete messages are not removed here either: [`history_at_risk`]
    /// refuses a stream that has them, so that an operator changes them knowingly.
    pub fn merged_into(&self, current: &stream::Config) -> stream::Config {
        let wanted = self.config();
        let mut merged = current.clone();
        merged.subjects = wanted.subjects;
        merged.subject_transform = wanted.subject_transform;
        merged.republish = wanted.republish;
        merged.allow_atomic_publish = true;
        // The server cannot turn TTLs off on a stream ([`crate::ttl_migration`] moves it).
        merged.allow_message_ttl = current.allow_message_ttl;
        merged.allow_direct = true;
        merged.deny_delete = true;
        merged.deny_purge = true;
        merged.duplicate_window = wanted.duplicate_window;
        merged.num_replicas = current.num_replicas.max(wanted.num_replicas);
        // An operator's own cap is kept; a stream made without one gets ours.
        if current.max_consumers <= 0 {
            merged.max_consumers = EVENTS_MAX_CONSUMERS;
        }
        merged
    }

    /// Creates the stream, or updates it when the settings it manages differ ([`Self::merged_into`]).
    /// Idempotent, so every writer and reader may call it on start. A failed update of an
    /// existing stream is only logged: a consume-only reader may lack the permission, and the
    /// stream still works. The schedules stream is ensured the same way.
    pub async fn ensure(&self, context: &jetstream::Context) -> Result<stream::Stream> {
        let copy = crate::ttl_migration::migrating_name(self);
        if crate::ttl_migration::stream_info(context, &self.name)
            .await?
            .is_none()
        {
            // The log may live only in the copy of a TTL removal that stopped midway: an event
            // stream made here would be empty. (Asked only when there is no event stream: the
            // shipped roles may not look at the copy, and may not make streams either.)
            match crate::ttl_migration::stream_info(context, &copy).await {
                Ok(Some(_)) => {
                    return Err(Error::Configuration(format!(
                        "stream {copy} exists: a `coffer setup --remove-message-ttl` of {} is \
                         under way or was stopped; run it (again) to finish before starting \
                         services",
                        self.name
                    )))
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(%error, stream = %copy, "could not look for a TTL removal's copy")
                }
            }
        }
        let stream = self.ensure_unchecked(context).await?;
        let mut checked = stream.clone();
        let config = checked
            .info()
            .await
            .map_err(|error| Error::JetStream(format!("stream info: {error}")))?
            .config
            .clone();
        if let Some(problem) = history_at_risk(&config) {
            return Err(Error::Configuration(problem));
        }
        if config.allow_message_ttl {
            tracing::warn!(
                stream = %self.name,
                "the event stream allows per-message TTLs: a writer credential can append events \
                 that vanish later (readers refuse them). Stop the writers and run \
                 `coffer setup --remove-message-ttl`"
            );
        }
        Ok(stream)
    }

    async fn ensure_unchecked(&self, context: &jetstream::Context) -> Result<stream::Stream> {
        ensure_stream(context, self.snapshots_config(), |current| {
            let mut merged = current.clone();
            merged.num_replicas = current.num_replicas.max(self.replicas);
            merged.max_messages_per_subject = 1;
            merged
        })
        .await?;
        ensure_stream(context, self.schedules_config(), |current| {
            let mut merged = current.clone();
            merged.num_replicas = current.num_replicas.max(self.replicas);
            merged.allow_message_schedules = true;
            merged
        })
        .await?;
        ensure_stream(context, self.config(), |current| self.merged_into(current)).await
    }
}

/// Why a configuration of the event stream could lose history, if it could: the ledger's events
/// and the markers that keep transfers and reversals once (`coffer.ids.transfer.*`,
/// `coffer.ids.reversal.*`) must live forever, so the stream may have no age, size or count
/// limit and must keep every message until something deletes it (which it denies). An account
/// whose events aged out would be answered as unknown, and its id could be opened again.
pub fn history_at_risk(config: &stream::Config) -> Option<String> {
    let mut found = Vec::new();
    if !config.max_age.is_zero() {
        found.push(format!("max_age {:?}", config.max_age));
    }
    if config.max_bytes > 0 {
        found.push(format!("max_bytes {}", config.max_bytes));
    }
    if config.max_messages > 0 {
        found.push(format!("max_msgs {}", config.max_messages));
    }
    if config.max_messages_per_subject > 0 {
        found.push(format!(
            "max_msgs_per_subject {}",
            config.max_messages_per_subject
        ));
    }
    if config.retention != stream::RetentionPolicy::Limits {
        found.push(format!("retention {:?}", config.retention));
    }
    (!found.is_empty()).then(|| {
        format!(
            "stream {} has {}: the event log of a ledger keeps every event forever, and limits \
             like these would delete accounts' history and the markers that keep transfers \
             once. Remove them (e.g. `nats stream edit {} --max-age=0 --max-bytes=-1 \
             --max-msgs=-1 --max-msgs-per-subject=-1`, retention limits) and start again; plan \
             disk for the stream instead",
            config.name,
            found.join(", "),
            config.name
        )
    })
}

/// Creates `wanted` if there is no stream of its name; otherwise updates the existing one to
/// `merge(existing)` when that differs, never lowering its replicas.
async fn ensure_stream(
    context: &jetstream::Context,
    wanted: stream::Config,
    merge: impl Fn(&stream::Config) -> stream::Config,
) -> Result<stream::Stream> {
    let name = wanted.name.clone();
    match context.get_stream(&name).await {
        Ok(mut existing) => {
            let current = existing
                .info()
                .await
                .map_err(|error| Error::JetStream(format!("stream info: {error}")))?
                .config
                .clone();
            if current.num_replicas > wanted.num_replicas {
                tracing::warn!(
                    stream = %name,
                    existing = current.num_replicas,
                    configured = wanted.num_replicas,
                    "the stream has more replicas than configured; keeping them"
                );
            }
            let merged = merge(&current);
            if merged != current {
                if let Err(error) = context.update_stream(merged).await {
                    tracing::warn!(%error, stream = %name, "could not update the stream");
                }
            }
        }
        Err(_) => {
            if let Err(error) = context.create_stream(wanted).await {
                // Another process may have created it between our check and our create.
                tracing::debug!(%error, stream = %name, "create stream failed; checking whether it exists now");
            }
        }
    }
    context
        .get_stream(&name)
        .await
        .map_err(|error| Error::Unavailable(format!("get stream {name}: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nats/stream-*.json` are what the code creates (for `nats stream add --config`). To
    /// regenerate them: `COFFER_WRITE_NATS_CONFIG=1 cargo test -p eventlog nats_files`.
    #[test]
    fn nats_files_are_the_configurations_the_code_creates() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats");
        let settings = StreamSettings::default();
        for (file, config) in [
            ("stream-coffer-events.json", settings.config()),
            ("stream-coffer-schedules.json", settings.schedules_config()),
            ("stream-coffer-snapshots.json", settings.snapshots_config()),
        ] {
            let wanted = serde_json::to_value(&config).unwrap();
            let path = root.join(file);
            if std::env::var("COFFER_WRITE_NATS_CONFIG").is_ok() {
                let text = serde_json::to_string_pretty(&wanted).unwrap() + "\n";
                std::fs::write(&path, text).unwrap();
            }
            let stored: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert_eq!(stored, wanted, "{file} differs from what the code creates");
        }
    }

    #[test]
    fn limits_that_could_delete_history_are_named() {
        let ours = StreamSettings::default().config();
        assert_eq!(history_at_risk(&ours), None);
        for (config, named) in [
            (
                stream::Config {
                    max_age: Duration::from_secs(20),
                    ..ours.clone()
                },
                "max_age",
            ),
            (
                stream::Config {
                    max_bytes: 1 << 30,
                    ..ours.clone()
                },
                "max_bytes",
            ),
            (
                stream::Config {
                    max_messages: 1_000,
                    ..ours.clone()
                },
                "max_msgs 1000",
            ),
            (
                stream::Config {
                    max_messages_per_subject: 5,
                    ..ours.clone()
                },
                "max_msgs_per_subject",
            ),
            (
                stream::Config {
                    retention: stream::RetentionPolicy::Interest,
                    ..ours.clone()
                },
                "retention Interest",
            ),
        ] {
            let problem = history_at_risk(&config).expect("refused");
            assert!(problem.contains(named), "{problem}");
            assert!(problem.contains("nats stream edit"), "{problem}");
        }
        // The server's "unlimited" is -1.
        let unlimited = stream::Config {
            max_bytes: -1,
            max_messages: -1,
            max_messages_per_subject: -1,
            ..ours
        };
        assert_eq!(history_at_risk(&unlimited), None);
    }

    #[test]
    fn merging_never_lowers_replicas_or_drops_operator_settings() {
        let operator = stream::Config {
            num_replicas: 3,
            max_age: Duration::from_secs(86_400 * 365),
            max_bytes: 1 << 40,
            ..StreamSettings::default().config()
        };
        let merged = StreamSettings::default().merged_into(&operator);
        assert_eq!(merged.num_replicas, 3);
        // Kept, so that `ensure` refuses it by name rather than change it behind the operator.
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

    #[test]
    fn a_stream_without_a_consumer_cap_gets_one_and_an_operators_cap_is_kept() {
        let settings = StreamSettings::default();
        assert_eq!(settings.config().max_consumers, EVENTS_MAX_CONSUMERS);
        for unlimited in [-1, 0] {
            let old = stream::Config {
                max_consumers: unlimited,
                ..settings.config()
            };
            assert_eq!(
                settings.merged_into(&old).max_consumers,
                EVENTS_MAX_CONSUMERS
            );
        }
        for operators in [16, 1_000] {
            let set = stream::Config {
                max_consumers: operators,
                ..settings.config()
            };
            assert_eq!(settings.merged_into(&set).max_consumers, operators);
        }
    }
}
