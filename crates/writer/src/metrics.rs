//! The writer's metrics (prometheus-client), served at `/metrics` in the OpenMetrics text
//! format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Metrics::render`] (and of the reader's `/metrics`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Metrics {
    pub commands_succeeded: Counter,
    pub commands_refused: Counter,
    pub commands_failed: Counter,
    /// Commands answered `outcome_unknown` (sent, not confirmed): counted by the dispatcher.
    pub commands_outcome_unknown: Counter,
    /// From receiving a command to answering it, in seconds.
    pub command_duration: Histogram,
    /// One append (single publish or atomic batch) until JetStream acknowledged it, in seconds.
    pub append_duration: Histogram,
    /// Messages per append: events and markers of one command.
    pub append_batch_messages: Histogram,
    /// Messages per atomic batch the group committer sent.
    pub group_commit_batch_messages: Histogram,
    pub conflicts: Counter,
    pub idempotent_replays: Counter,
    pub actors_live: Gauge,
    pub actors_started: Counter,
    pub actors_passivated: Counter,
    pub actors_failed: Counter,
    pub commands_expired: Counter,
    /// Events read back from the stream to rebuild account states (after any snapshot).
    pub events_replayed: Counter,
    pub snapshots_loaded: Counter,
    pub snapshots_written: Counter,
    /// Commands handed to the writer that owns their account, and answered by it.
    pub commands_forwarded: Counter,
    /// Commands run here because their owner had gone (nobody took the hand-over).
    pub forward_fallbacks: Counter,
    /// Flows that kept losing races here for an account another writer owns, and were handed
    /// to that writer to decide.
    pub handovers_contended: Counter,
    /// Commands other writers handed to this one as their account's owner.
    pub commands_taken_over: Counter,
    /// Hand-overs whose owner went away before answering them.
    pub handovers_orphaned: Counter,
    /// Committed appends that carried several queued commands of one account.
    pub account_batches: Counter,
    /// The commands in them.
    pub account_batch_commands: Counter,
    /// Partition leases this writer holds.
    pub partitions_owned: Gauge,
    /// Leases this writer found taken by another when it went to renew them.
    pub leases_lost: Counter,
    /// Holds expired by the backstop: their due message never came (or came too late).
    pub holds_expired_by_backstop: Counter,
    /// 1 while this writer works the hold backstop's consumer.
    pub hold_backstop_running: Gauge,
    /// What the group committer has done, once it runs.
    pub group_commit:
        std::sync::OnceLock<std::sync::Arc<eventlog::group_commit::GroupCommitCounters>>,
    /// The NATS servers' JetStream stores, when their monitoring endpoints are configured.
    pub nats_store: std::sync::Arc<crate::nats_store::StoreGauges>,
}

/// 0.25 ms to about 8 s.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_25, 2.0, 16)
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            commands_succeeded: Counter::default(),
            commands_refused: Counter::default(),
            commands_failed: Counter::default(),
            commands_outcome_unknown: Counter::default(),
            command_duration: Histogram::new(duration_buckets()),
            append_duration: Histogram::new(duration_buckets()),
            append_batch_messages: Histogram::new([
                1.0, 2.0, 3.0, 4.0, 6.0, 10.0, 50.0, 200.0, 1_000.0,
            ]),
            group_commit_batch_messages: Histogram::new([
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1_000.0,
            ]),
            conflicts: Counter::default(),
            idempotent_replays: Counter::default(),
            actors_live: Gauge::default(),
            actors_started: Counter::default(),
            actors_passivated: Counter::default(),
            actors_failed: Counter::default(),
            commands_expired: Counter::default(),
            events_replayed: Counter::default(),
            snapshots_loaded: Counter::default(),
            snapshots_written: Counter::default(),
            commands_forwarded: Counter::default(),
            account_batches: Counter::default(),
            account_batch_commands: Counter::default(),
            forward_fallbacks: Counter::default(),
            handovers_contended: Counter::default(),
            handovers_orphaned: Counter::default(),
            commands_taken_over: Counter::default(),
            partitions_owned: Gauge::default(),
            leases_lost: Counter::default(),
            holds_expired_by_backstop: Counter::default(),
            hold_backstop_running: Gauge::default(),
            group_commit: std::sync::OnceLock::new(),
            nats_store: std::sync::Arc::default(),
        }
    }
}

impl Metrics {
    fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "coffer_writer_commands_succeeded",
                "Commands that appended an event or were answered from an earlier one.",
                &self.commands_succeeded,
            ),
            (
                "coffer_writer_commands_refused",
                "Commands refused by validation or a business rule (4xx).",
                &self.commands_refused,
            ),
            (
                "coffer_writer_commands_failed",
                "Commands that failed for infrastructure reasons (5xx).",
                &self.commands_failed,
            ),
            (
                "coffer_writer_commands_outcome_unknown",
                "Commands answered outcome_unknown: sent to NATS (or to their owner) and not confirmed; they may or may not be stored.",
                &self.commands_outcome_unknown,
            ),
            (
                "coffer_writer_nats_monitor_read_errors",
                "Reads of a NATS server's monitoring endpoint (COFFER_NATS_MONITOR_URLS) that failed.",
                &self.nats_store.read_errors,
            ),
            (
                "coffer_writer_append_conflicts",
                "Appends refused by a concurrency check (another writer appended first, or a marker existed).",
                &self.conflicts,
            ),
            (
                "coffer_writer_idempotent_replays",
                "Retries answered with the first outcome of their Idempotency-Key or transfer id.",
                &self.idempotent_replays,
            ),
            (
                "coffer_writer_actors_started",
                "Account actors started.",
                &self.actors_started,
            ),
            (
                "coffer_writer_actors_passivated",
                "Account actors stopped for idleness or the live cap.",
                &self.actors_passivated,
            ),
            (
                "coffer_writer_actors_failed",
                "Account actors that crashed and were removed by the supervisor.",
                &self.actors_failed,
            ),
            (
                "coffer_writer_commands_expired",
                "Commands not started because they waited in their actor's mailbox past their deadline.",
                &self.commands_expired,
            ),
            (
                "coffer_writer_events_replayed",
                "Events read back from the stream to rebuild account states (after any snapshot).",
                &self.events_replayed,
            ),
            (
                "coffer_writer_snapshots_loaded",
                "Account states started from a snapshot that matched the log.",
                &self.snapshots_loaded,
            ),
            (
                "coffer_writer_snapshots_written",
                "Account snapshots written.",
                &self.snapshots_written,
            ),
            (
                "coffer_writer_account_batches",
                "Committed appends that carried several queued deposits or withdrawals of one account.",
                &self.account_batches,
            ),
            (
                "coffer_writer_account_batch_commands",
                "The commands in those appends: commands per account batch is this over the batches.",
                &self.account_batch_commands,
            ),
            (
                "coffer_writer_commands_forwarded",
                "Commands handed to the writer that owns their account's partition.",
                &self.commands_forwarded,
            ),
            (
                "coffer_writer_handovers_contended",
                "Flows that kept losing races here for an account another writer owns (it keeps that account busy), handed to that writer to decide.",
                &self.handovers_contended,
            ),
            (
                "coffer_writer_forward_fallbacks",
                "Commands run here because nobody took them at their owner's subject (the owner had gone).",
                &self.forward_fallbacks,
            ),
            (
                "coffer_writer_handovers_orphaned",
                "Hand-overs whose owner went away while it had them (run here when a marker claims them, otherwise answered outcome_unknown).",
                &self.handovers_orphaned,
            ),
            (
                "coffer_writer_commands_taken_over",
                "Commands other writers handed to this writer as the owner of their account.",
                &self.commands_taken_over,
            ),
            (
                "coffer_writer_leases_lost",
                "Partition leases found taken by another writer at renewal (this writer had paused past the lease).",
                &self.leases_lost,
            ),
            (
                "coffer_writer_holds_expired_by_backstop",
                "Holds expired by the backstop that reads placed holds from the event stream: their scheduled expiry never came. Should stay 0.",
                &self.holds_expired_by_backstop,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "coffer_writer_requests_unanswered",
            "HTTP requests answered 503 outcome_unknown because the command they handed over had not answered by its deadline.",
            ConstCounter::new(problem::server::unanswered_by_deadline()),
        );
        registry.register_with_unit(
            "coffer_writer_nats_store_used",
            "Bytes in a NATS server's JetStream file store (its /varz), by server.",
            Unit::Bytes,
            self.nats_store.used.clone(),
        );
        registry.register_with_unit(
            "coffer_writer_nats_store_limit",
            "The most a NATS server's JetStream file store may hold (max_file_store), by server.",
            Unit::Bytes,
            self.nats_store.limit.clone(),
        );
        registry.register(
            "coffer_writer_actors_live",
            "Account actors currently in memory.",
            self.actors_live.clone(),
        );
        registry.register(
            "coffer_writer_hold_backstop_running",
            "1 while this writer works the hold-expiry backstop's consumer; 0 means holds whose scheduled expiry is lost are not caught (is the coffer-hold-backstop consumer there? run coffer setup).",
            self.hold_backstop_running.clone(),
        );
        registry.register(
            "coffer_writer_partitions_owned",
            "Partition leases this writer holds: it decides for their accounts.",
            self.partitions_owned.clone(),
        );
        registry.register_with_unit(
            "coffer_writer_command_duration",
            "Time from receiving a command to answering it.",
            Unit::Seconds,
            self.command_duration.clone(),
        );
        registry.register_with_unit(
            "coffer_writer_append_duration",
            "Time from sending an append (a publish or an atomic batch) to its acknowledgement.",
            Unit::Seconds,
            self.append_duration.clone(),
        );
        registry.register(
            "coffer_writer_append_batch_messages",
            "Messages per append: a command's events and markers.",
            self.append_batch_messages.clone(),
        );
        registry.register(
            "coffer_writer_group_commit_batch_messages",
            "Messages per atomic batch the group committer sent.",
            self.group_commit_batch_messages.clone(),
        );
        if let Some(group) = self.group_commit.get() {
            use std::sync::atomic::Ordering::Relaxed;
            let counters = [
                (
                    "coffer_writer_group_commit_batches",
                    "Atomic batches the group committer sent (an append sent alone counts as one).",
                    &group.batches,
                ),
                (
                    "coffer_writer_group_commit_appends",
                    "Appends sent in those batches: appends per batch is this over the batches.",
                    &group.members,
                ),
                (
                    "coffer_writer_group_commit_splits",
                    "Batches refused whole and sent again append by append.",
                    &group.split,
                ),
                (
                    "coffer_writer_group_commit_expired",
                    "Appends not sent because their deadline passed while they waited.",
                    &group.expired,
                ),
                (
                    "coffer_writer_group_commit_reservations",
                    "Reservations granted: commands that lost a race retrying with their accounts held.",
                    &group.reservations,
                ),
                (
                    "coffer_writer_group_commit_fills",
                    "Batches held back after an acknowledgement for the callers just answered that filled.",
                    &group.fills,
                ),
                (
                    "coffer_writer_group_commit_fills_short",
                    "Batches held back that went short: callers that do not come back on an answer (filling then pauses).",
                    &group.fills_short,
                ),
            ];
            for (name, help, value) in counters {
                registry.register(name, help, ConstCounter::new(value.load(Relaxed)));
            }
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        if let Err(error) = encode(&mut out, &registry) {
            tracing::warn!(%error, "encoding the metrics");
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_conventional_names_and_units() {
        let metrics = Metrics::default();
        metrics.conflicts.inc();
        metrics.command_duration.observe(0.002);
        metrics.append_batch_messages.observe(3.0);
        metrics.actors_live.set(7);
        let text = metrics.render();
        assert!(
            text.contains("coffer_writer_append_conflicts_total 1"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT coffer_writer_command_duration_seconds seconds"),
            "{text}"
        );
        assert!(
            text.contains("coffer_writer_command_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("coffer_writer_append_batch_messages_bucket{le=\"3.0\"} 1"),
            "{text}"
        );
        assert!(text.contains("coffer_writer_actors_live 7"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
