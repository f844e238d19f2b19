//! Moving an event stream made with per-message TTLs onto one without, keeping every message's
//! position, time, subject, headers and payload (`coffer setup --remove-message-ttl`).
//!
//! Streams made before this build allowed `Nats-TTL` (for idempotency-key markers), so a
//! writer credential could append an event that vanishes after it was spent. The server
//! refuses to turn that off on an existing stream, and positions are the contract's consistency
//! tokens, so the stream is copied with JetStream mirrors, which store each message at its
//! origin's sequence and time (gaps included), and a mirror is then promoted to the stream:
//!
//! 1. `NotStarted`: a marker is appended ([`REMOVAL_MARKER`], so the copy ends at the stream's
//!    last position), the stream is sealed (no appends from here on; writers get errors) and
//!    `{name}_MIGRATING` is made as its mirror, without TTLs.
//! 2. `Copying`: once the mirror holds everything the sealed stream holds, the old stream is
//!    deleted.
//! 3. `Moved`: the copy is sealed and stops mirroring (a mirror of it under the old name would be
//!    a cycle), and the stream is made again under its name, as a mirror of the copy.
//! 4. `Returning`: once it holds exactly what the copy holds, the copy is deleted (a mirror
//!    answers direct gets addressed to its origin, so a stale copy must not outlive the move).
//! 5. `Filled`: the stream is promoted: its mirror is removed and the event stream's
//!    configuration applied, TTLs still off.
//!
//! Each step is decided from what the server holds, so a run that stopped anywhere is resumed by
//! running it again, and a stream is deleted only once the other holds all it holds (after
//! `settle`, for servers that do not sync every write). A working stream beside the copy is
//! never a state this leaves, so meeting one stops it with the copy kept. While the copy alone
//! holds the log, services that may look at it refuse to start ([`StreamSettings::ensure`]).
//!
//! Mirrors keep each message's position, time, subject, payload and headers, except the
//! `Nats-Expected-*` and `Nats-Batch-*` headers, which the server drops from what it mirrors: a
//! migrated event no longer states its predecessor's position, so readers check it by its chain
//! alone and loading an account walks its migrated history.
//!
//! Mirrored `Nats-TTL` headers are kept and are inert in a stream without TTLs; readers still
//! refuse an event that carries one. Turning TTLs on again (an older build's `coffer setup`
//! would) makes the server erase every message whose TTL has passed: don't.

use std::time::Duration;

use async_nats::jetstream::{self, context::GetStreamErrorKind, stream, ErrorCode};

use crate::{Error, Result, StreamSettings};

/// What is appended to the stream's name for the copy in between.
pub const MIGRATING_SUFFIX: &str = "_MIGRATING";

/// The copy's description, naming the stream it holds the log of.
fn copy_description(events: &str) -> String {
    format!("Coffer: a copy of {events} while its per-message TTLs are removed")
}

/// Where the migration notes in the log that it started (a marker, outside the events).
pub const REMOVAL_MARKER: &str = "coffer.ids.stream.ttl-removal";

/// How often the copies are looked at while the server fills them.
const POLL: Duration = Duration::from_millis(250);

/// Where a migration of the event stream stands, from what the server holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// No event stream yet: nothing to move (setup makes it without TTLs).
    Absent,
    /// The stream allows no per-message TTL: nothing to do.
    Done,
    /// The stream allows TTLs and nothing was started.
    NotStarted,
    /// The stream is sealed (or being sealed) and copied into `{name}_MIGRATING`.
    Copying,
    /// Only `{name}_MIGRATING` holds the log.
    Moved,
    /// The stream is being filled again from `{name}_MIGRATING`.
    Returning,
    /// The stream holds everything again and `{name}_MIGRATING` is gone: it is left to promote.
    Filled,
}

/// What the migration reports as it goes: a step's name, messages copied, messages to copy.
pub type Progress<'a> = &'a (dyn Fn(&str, u64, u64) + Send + Sync);

/// The copy's name for `settings`.
pub fn migrating_name(settings: &StreamSettings) -> String {
    format!("{}{MIGRATING_SUFFIX}", settings.name)
}

/// The stream's info, or `None` when there is no stream of that name.
pub async fn stream_info(context: &jetstream::Context, name: &str) -> Result<Option<stream::Info>> {
    Ok(existing(context, name)
        .await?
        .map(|stream| stream.cached_info().clone()))
}

/// The stream (its info as the lookup answered it), or `None` when there is none of that name.
async fn existing(context: &jetstream::Context, name: &str) -> Result<Option<stream::Stream>> {
    match context.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(error) => match error.kind() {
            GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(Error::Unavailable(format!("get stream {name}: {error}"))),
        },
    }
}

/// Where the migration stands.
pub async fn stage(context: &jetstream::Context, settings: &StreamSettings) -> Result<Stage> {
    let events = stream_info(context, &settings.name).await?;
    let migrating = stream_info(context, &migrating_name(settings)).await?;
    decide(settings, events.as_ref(), migrating.as_ref())
}

fn mirror_of(info: &stream::Info) -> Option<&str> {
    info.config
        .mirror
        .as_ref()
        .map(|source| source.name.as_str())
}

fn decide(
    settings: &StreamSettings,
    events: Option<&stream::Info>,
    migrating: Option<&stream::Info>,
) -> Result<Stage> {
    let name = settings.name.as_str();
    let copy = migrating_name(settings);
    Ok(match (events, migrating) {
        (None, None) => Stage::Absent,
        (Some(events), None) if mirror_of(events).is_none() => {
            if events.config.allow_message_ttl {
                Stage::NotStarted
            } else {
                Stage::Done
            }
        }
        (Some(events), Some(migrating)) if mirror_of(events).is_none() => {
            if events.config.allow_message_ttl && mirror_of(migrating) == Some(name) {
                Stage::Copying
            } else {
                // This migration never leaves a working stream beside its copy (the copy is
                // deleted before the stream is promoted): something else made one of them.
                return Err(Error::Configuration(format!(
                    "streams {name} and {copy} both exist, and not as a removal of TTLs leaves \
                     them (was {name} made again while only {copy} held the log?): {copy} may \
                     hold the only full copy of the log; inspect both (`nats stream info`) and \
                     remove the wrong one by hand"
                )));
            }
        }
        (None, Some(_)) => Stage::Moved,
        (Some(events), Some(_)) if mirror_of(events) == Some(copy.as_str()) => Stage::Returning,
        (Some(events), None) if mirror_of(events) == Some(copy.as_str()) => Stage::Filled,
        (Some(_), _) => {
            return Err(Error::Configuration(format!(
                "stream {name} is a mirror of another stream: not an event log Coffer made"
            )))
        }
    })
}

/// A mirror of `origin` named `name`: file storage, the origin's replicas and placement, no
/// TTLs, nothing deleted or purged.
fn mirror_config(name: &str, origin: &stream::Info) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        description: Some(copy_description(&origin.config.name)),
        mirror: Some(stream::Source {
            name: origin.config.name.clone(),
            ..Default::default()
        }),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        num_replicas: origin.config.num_replicas,
        placement: origin.config.placement.clone(),
        allow_direct: true,
        deny_delete: true,
        deny_purge: true,
        allow_message_ttl: false,
        ..Default::default()
    }
}

/// The position of the last message `stream` still stores (0: none). The stream's last
/// sequence is not enough: a key marker that expired at the end leaves the sequence behind it.
async fn last_stored(stream: &stream::Stream) -> Result<u64> {
    let name = &stream.cached_info().config.name;
    match stream.get_last_raw_message_by_subject(">").await {
        Ok(message) => Ok(message.sequence),
        Err(error)
            if matches!(
                error.kind(),
                stream::LastRawMessageErrorKind::NoMessageFound
            ) =>
        {
            Ok(0)
        }
        Err(error) => Err(Error::JetStream(format!("last message of {name}: {error}"))),
    }
}

/// Waits until the mirror `copy` holds every message `origin` holds. With `exact`, both hold
/// the same messages (no TTL on either side); otherwise the origin may have lost key markers to
/// their TTL after they were copied, and the copy may hold more.
async fn wait_for_copy(
    context: &jetstream::Context,
    origin: &str,
    copy: &str,
    exact: bool,
    progress: Progress<'_>,
) -> Result<()> {
    loop {
        let vanished =
            |name: &str| Error::Configuration(format!("stream {name} vanished mid-copy"));
        let origin_stream = existing(context, origin)
            .await?
            .ok_or_else(|| vanished(origin))?;
        let source = origin_stream.cached_info();
        let mirror = stream_info(context, copy)
            .await?
            .ok_or_else(|| vanished(copy))?;
        let wanted_last = last_stored(&origin_stream).await?;
        let lag = mirror.mirror.as_ref().map_or(u64::MAX, |info| info.lag);
        progress(
            &format!("copying {origin} to {copy}"),
            mirror.state.messages.min(source.state.messages),
            source.state.messages,
        );
        let holds_all = lag == 0
            && mirror.state.last_sequence >= wanted_last
            && mirror.state.messages >= source.state.messages
            && (source.state.messages == 0
                || mirror.state.first_sequence <= source.state.first_sequence);
        let same = mirror.state.messages == source.state.messages
            && mirror.state.first_sequence == source.state.first_sequence
            && mirror.state.last_sequence == source.state.last_sequence;
        if holds_all && (!exact || same) {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn delete(context: &jetstream::Context, name: &str) -> Result<()> {
    context
        .delete_stream(name)
        .await
        .map(|_| ())
        .map_err(|error| Error::JetStream(format!("delete stream {name}: {error}")))
}

async fn create(context: &jetstream::Context, config: stream::Config) -> Result<()> {
    let name = config.name.clone();
    context
        .create_stream(config)
        .await
        .map(|_| ())
        .map_err(|error| Error::JetStream(format!("create stream {name}: {error}")))
}

async fn update(context: &jetstream::Context, config: stream::Config) -> Result<()> {
    let name = config.name.clone();
    context
        .update_stream(config)
        .await
        .map(|_| ())
        .map_err(|error| Error::JetStream(format!("update stream {name}: {error}")))
}

/// Runs the migration from wherever it stands to [`Stage::Done`] (or [`Stage::Absent`]), and
/// returns the stage it found. Writers must be stopped: the first step seals the stream, so
/// their appends fail until it is back.
///
/// `settle` is waited between a copy found complete and the deletion of its origin, so that a
/// server that does not sync every write (`sync_interval` other than `always`) has written the
/// copy to disk: longer than its `sync_interval` (2 minutes by default); zero when every server
/// syncs always, as the shipped configurations do.
pub async fn remove_message_ttl(
    context: &jetstream::Context,
    settings: &StreamSettings,
    settle: Duration,
    progress: Progress<'_>,
) -> Result<Stage> {
    let name = settings.name.as_str();
    let copy = migrating_name(settings);
    let mut found = None;
    loop {
        let events = stream_info(context, name).await?;
        let migrating = stream_info(context, &copy).await?;
        let now = decide(settings, events.as_ref(), migrating.as_ref())?;
        let found = found.get_or_insert_with(|| now.clone()).clone();
        match now {
            Stage::Absent | Stage::Done => return Ok(found),
            Stage::NotStarted => {
                let events = events.ok_or_else(|| Error::Configuration(name.into()))?;
                if !events.config.sealed {
                    // Stored last, so the copy ends where the stream's positions end even when
                    // the last message before it was a key marker that expired (a mirror copies
                    // messages, not the positions of vanished ones), and no position is issued
                    // twice. It also records in the log when the TTLs went.
                    let marker = serde_json::json!({
                        "ttl_removal_started": time::OffsetDateTime::now_utc().unix_timestamp(),
                    });
                    context
                        .publish(REMOVAL_MARKER, marker.to_string().into())
                        .await
                        .map_err(|error| Error::Unavailable(format!("publish: {error}")))?
                        .await
                        .map_err(|error| Error::JetStream(format!("{REMOVAL_MARKER}: {error}")))?;
                    progress(&format!("sealing {name}"), 0, 0);
                    seal(context, &events).await?;
                    tracing::info!(stream = %name, "sealed; copying it without TTLs");
                }
                create(context, mirror_config(&copy, &events)).await?;
            }
            Stage::Copying => {
                let events = events.ok_or_else(|| Error::Configuration(name.into()))?;
                if !events.config.sealed {
                    // Made before the seal took (a run stopped in between): seal it now, so
                    // nothing is appended that the copy could miss.
                    seal(context, &events).await?;
                }
                wait_for_copy(context, name, &copy, false, progress).await?;
                settle_before_deleting(name, settle, progress).await;
                progress(&format!("deleting {name}"), 0, 0);
                delete(context, name).await?;
                tracing::info!(stream = %name, copy = %copy, "copied and deleted");
            }
            Stage::Moved => {
                let mut migrating = migrating.ok_or_else(|| Error::Configuration(copy.clone()))?;
                if migrating.config.mirror.is_some() {
                    // Its origin is gone; a stream mirroring it back under that name would be a
                    // cycle, which the server refuses. Sealed, it stays exactly as copied.
                    let mut kept = migrating.config.clone();
                    kept.mirror = None;
                    kept.sealed = true;
                    kept.description = Some(copy_description(name));
                    update(context, kept).await?;
                    migrating = stream_info(context, &copy)
                        .await?
                        .ok_or_else(|| Error::Configuration(copy.clone()))?;
                }
                let mut config = mirror_config(name, &migrating);
                config.description = settings.config().description;
                create(context, config).await?;
            }
            Stage::Returning => {
                wait_for_copy(context, &copy, name, true, progress).await?;
                // The copy goes before the stream is promoted: it answers direct gets addressed
                // to the stream (a mirror's `mirror_direct`), so a stale copy must never stand
                // beside a stream that takes appends again.
                settle_before_deleting(&copy, settle, progress).await;
                progress(&format!("deleting {copy}"), 0, 0);
                delete(context, &copy).await?;
            }
            Stage::Filled => {
                let events = events.ok_or_else(|| Error::Configuration(name.into()))?;
                let mut promoted = settings.merged_into(&events.config);
                promoted.mirror = None;
                promoted.allow_message_ttl = false;
                progress(&format!("promoting {name}"), 0, 0);
                update(context, promoted).await?;
                tracing::info!(stream = %name, "promoted: the event stream is back, without TTLs");
            }
        }
    }
}

/// Seals the stream of `info`: nothing is appended or removed from then on.
async fn seal(context: &jetstream::Context, info: &stream::Info) -> Result<()> {
    let mut sealed = info.config.clone();
    sealed.sealed = true;
    update(context, sealed).await
}

async fn settle_before_deleting(origin: &str, settle: Duration, progress: Progress<'_>) {
    if !settle.is_zero() {
        progress(
            &format!(
                "waiting {}s for the copy to reach disk before deleting {origin}",
                settle.as_secs()
            ),
            0,
            0,
        );
        tokio::time::sleep(settle).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(config: stream::Config) -> stream::Info {
        serde_json::from_value(serde_json::json!({
            "config": serde_json::to_value(&config).unwrap(),
            "created": "2026-12-05T00:00:00Z",
            "state": {"messages": 0, "bytes": 0, "first_seq": 0, "first_ts": "0001-01-01T00:00:00Z",
                      "last_seq": 0, "last_ts": "0001-01-01T00:00:00Z", "consumer_count": 0},
        }))
        .unwrap()
    }

    #[test]
    fn each_combination_of_streams_names_its_stage_and_a_stranger_is_refused() {
        let settings = StreamSettings::default();
        let with_ttl = info(stream::Config {
            allow_message_ttl: true,
            ..settings.config()
        });
        let without = info(settings.config());
        let copy_of_events = info(mirror_config(&migrating_name(&settings), &with_ttl));
        let returning = info(mirror_config(&settings.name, &copy_of_events));
        let stranger = info(stream::Config {
            name: migrating_name(&settings),
            subjects: vec!["other.>".into()],
            ..Default::default()
        });
        let stage = |events: Option<&stream::Info>, copy: Option<&stream::Info>| {
            decide(&settings, events, copy)
        };
        assert_eq!(stage(None, None).unwrap(), Stage::Absent);
        assert_eq!(stage(Some(&without), None).unwrap(), Stage::Done);
        assert_eq!(stage(Some(&with_ttl), None).unwrap(), Stage::NotStarted);
        assert_eq!(
            stage(Some(&with_ttl), Some(&copy_of_events)).unwrap(),
            Stage::Copying
        );
        assert_eq!(stage(None, Some(&copy_of_events)).unwrap(), Stage::Moved);
        assert_eq!(
            stage(Some(&returning), Some(&copy_of_events)).unwrap(),
            Stage::Returning
        );
        assert!(stage(Some(&without), Some(&copy_of_events)).is_err());
        assert_eq!(stage(Some(&returning), None).unwrap(), Stage::Filled);
        let mut kept = copy_of_events.clone();
        kept.config.mirror = None;
        kept.config.sealed = true;
        assert!(stage(Some(&without), Some(&kept)).is_err());
        assert!(stage(Some(&with_ttl), Some(&kept)).is_err());
        assert!(stage(Some(&with_ttl), Some(&stranger)).is_err());
        assert!(stage(Some(&without), Some(&stranger)).is_err());
        let other = info(stream::Config {
            name: "OTHER".into(),
            ..Default::default()
        });
        assert!(stage(Some(&info(mirror_config(&settings.name, &other))), None).is_err());
    }

    #[test]
    fn a_mirror_keeps_the_origins_placement_and_replicas_and_allows_no_ttl() {
        let origin = info(stream::Config {
            num_replicas: 3,
            allow_message_ttl: true,
            placement: Some(stream::Placement {
                cluster: Some("east".into()),
                tags: vec!["ssd".into()],
            }),
            ..StreamSettings::default().config()
        });
        let mirror = mirror_config("COPY", &origin);
        assert_eq!(mirror.num_replicas, 3);
        assert_eq!(mirror.placement, origin.config.placement);
        assert!(!mirror.allow_message_ttl && mirror.deny_delete && mirror.deny_purge);
        assert!(mirror.subjects.is_empty() && !mirror.allow_atomic_publish);
        assert_eq!(mirror.mirror.unwrap().name, origin.config.name);
    }
}
