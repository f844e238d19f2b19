//! The writer's metrics, served at `/metrics`.

use prometheus_text::{Counter, Gauge, Histogram};

pub struct Metrics {
    pub commands_succeeded: Counter,
    pub commands_refused: Counter,
    pub commands_failed: Counter,
    pub command_duration: Histogram,
    pub conflicts: Counter,
    pub idempotent_replays: Counter,
    pub actors_live: Gauge,
    pub actors_started: Counter,
    pub actors_passivated: Counter,
    pub actors_failed: Counter,
    pub commands_expired: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            commands_succeeded: Counter::new(
                "coffer_writer_commands_succeeded_total",
                "Commands that appended an event or were answered from an earlier one.",
            ),
            commands_refused: Counter::new(
                "coffer_writer_commands_refused_total",
                "Commands refused by validation or a business rule (4xx).",
            ),
            commands_failed: Counter::new(
                "coffer_writer_commands_failed_total",
                "Commands that failed for infrastructure reasons (5xx).",
            ),
            command_duration: Histogram::new(
                "coffer_writer_command_duration_seconds",
                "Time from receiving a command to answering it.",
            ),
            conflicts: Counter::new(
                "coffer_writer_append_conflicts_total",
                "Appends refused by a concurrency check (another writer appended first, or a marker existed).",
            ),
            idempotent_replays: Counter::new(
                "coffer_writer_idempotent_replays_total",
                "Retries answered with the first outcome of their Idempotency-Key or transfer id.",
            ),
            actors_live: Gauge::new(
                "coffer_writer_actors_live",
                "Account actors currently in memory.",
            ),
            actors_started: Counter::new(
                "coffer_writer_actors_started_total",
                "Account actors started.",
            ),
            actors_passivated: Counter::new(
                "coffer_writer_actors_passivated_total",
                "Account actors stopped for idleness or the live cap.",
            ),
            actors_failed: Counter::new(
                "coffer_writer_actors_failed_total",
                "Account actors that crashed and were removed by the supervisor.",
            ),
            commands_expired: Counter::new(
                "coffer_writer_commands_expired_total",
                "Commands not started because they waited in their actor's mailbox past their deadline.",
            ),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for counter in [
            &self.commands_succeeded,
            &self.commands_refused,
            &self.commands_failed,
            &self.conflicts,
            &self.idempotent_replays,
            &self.actors_started,
            &self.actors_passivated,
            &self.actors_failed,
            &self.commands_expired,
        ] {
            counter.render(&mut out);
        }
        self.actors_live.render(&mut out);
        self.command_duration.render(&mut out);
        out
    }
}
