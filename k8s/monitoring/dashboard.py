#!/usr/bin/env python3
"""Coffer's Grafana dashboard, as code (grafanalib, pinned in scripts/requirements-test.txt).

    python3 k8s/monitoring/dashboard.py > k8s/monitoring/coffer-dashboard.json

The JSON beside this file is what it prints; `just monitoring-check` fails when they differ and
when a query names a metric a real writer or reader does not export. The ConfigMap
`coffer-dashboard` (kustomization.yaml) carries the JSON to Grafana's dashboard sidecar.

One row per question an operator asks: are commands answered, and how fast; is the event log
keeping up (group commit, NATS store); are the views fresh and whole; is the money whole.
"""

import json
import sys

from grafanalib.core import (
    Dashboard,
    GridPos,
    RowPanel,
    Stat,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)
from grafanalib._gen import DashboardEncoder

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every query is scoped to the chosen namespace (the PodMonitor's targets carry it).
NS = 'namespace="$namespace"'
WIDTH = 24


class Layout:
    """Places panels left to right, a new line when the row is full."""

    def __init__(self):
        self.panels = []
        self.x = 0
        self.y = 0
        self.height = 0

    def row(self, title):
        self.newline()
        self.panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=WIDTH, x=0, y=self.y)))
        self.y += 1

    def newline(self):
        if self.x:
            self.y += self.height
            self.x = 0
            self.height = 0

    def add(self, panel, w=8, h=8):
        if self.x + w > WIDTH:
            self.newline()
        panel.gridPos = GridPos(h=h, w=w, x=self.x, y=self.y)
        self.panels.append(panel)
        self.x += w
        self.height = max(self.height, h)


def targets(*queries):
    """(expr, legend) pairs as Prometheus targets, refIds A, B, ..."""
    return [
        Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + index), datasource=DATASOURCE)
        for index, (expr, legend) in enumerate(queries)
    ]


def series(title, description, *queries, unit="short", stack=False):
    return TimeSeries(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=targets(*queries),
        unit=unit,
        stacking={"mode": "normal", "group": "A"} if stack else {},
        tooltipMode="multi",
    )


def stat(title, description, expr, thresholds, unit="short"):
    return Stat(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=targets((expr, "")),
        format=unit,
        reduceCalc="lastNotNull",
        thresholdType="absolute",
        thresholds=[
            {"color": color, "value": value} for value, color in thresholds
        ],
    )


def quantile(q, metric):
    return (
        f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{NS}}}[$__rate_interval])))"
    )


def panels():
    layout = Layout()

    layout.row("Commands (writers)")
    layout.add(series(
        "Commands answered per second",
        "By class: succeeded (2xx), refused (4xx: the ledger's rules, bad input), failed (5xx), "
        "and of those outcome_unknown (sent, not confirmed: retry with the same key).",
        (f"sum(rate(coffer_writer_commands_succeeded_total{{{NS}}}[$__rate_interval]))", "succeeded"),
        (f"sum(rate(coffer_writer_commands_refused_total{{{NS}}}[$__rate_interval]))", "refused"),
        (f"sum(rate(coffer_writer_commands_failed_total{{{NS}}}[$__rate_interval]))", "failed"),
        (f"sum(rate(coffer_writer_commands_outcome_unknown_total{{{NS}}}[$__rate_interval]))"
         f" + sum(rate(coffer_writer_requests_unanswered_total{{{NS}}}[$__rate_interval]))",
         "outcome_unknown"),
        unit="reqps",
    ))
    layout.add(series(
        "Command time",
        "From receiving a command to answering it, all writers.",
        (quantile(0.5, "coffer_writer_command_duration_seconds"), "p50"),
        (quantile(0.99, "coffer_writer_command_duration_seconds"), "p99"),
        (quantile(0.99, "coffer_writer_append_duration_seconds"), "append p99 (NATS share)"),
        unit="s",
    ))
    layout.add(series(
        "Commands expired and idempotent replays",
        "Expired: waited in an account's queue past their deadline (overload). Replays: retries "
        "answered with their first outcome.",
        (f"sum by (pod) (rate(coffer_writer_commands_expired_total{{{NS}}}[$__rate_interval]))",
         "expired {{pod}}"),
        (f"sum(rate(coffer_writer_idempotent_replays_total{{{NS}}}[$__rate_interval]))", "replays"),
        unit="reqps",
    ))

    layout.row("Event log (writers and NATS)")
    layout.add(series(
        "Group commit: commands per atomic batch",
        "An R1 batch costs the server ~3.5 ms however small plus ~20 us per message "
        "(docs/benchmarks.md): larger batches under load are cheaper per command.",
        (f"sum(rate(coffer_writer_group_commit_appends_total{{{NS}}}[$__rate_interval]))"
         f" / sum(rate(coffer_writer_group_commit_batches_total{{{NS}}}[$__rate_interval]))",
         "appends per batch"),
        (quantile(0.99, "coffer_writer_group_commit_batch_messages"), "messages per batch p99"),
    ))
    layout.add(series(
        "Conflicts, splits, reservations",
        "Appends refused by a concurrency check (another writer was first), batches split "
        "after one member's check failed, and commands that retried holding their accounts.",
        (f"sum(rate(coffer_writer_append_conflicts_total{{{NS}}}[$__rate_interval]))", "conflicts"),
        (f"sum(rate(coffer_writer_group_commit_splits_total{{{NS}}}[$__rate_interval]))", "splits"),
        (f"sum(rate(coffer_writer_group_commit_reservations_total{{{NS}}}[$__rate_interval]))",
         "reservations"),
        unit="ops",
    ))
    layout.add(series(
        "NATS JetStream store used",
        "Each server's file store against its max_file_store: at the limit appends are refused.",
        (f"max by (server) (coffer_writer_nats_store_used_bytes{{{NS}}}"
         f" / coffer_writer_nats_store_limit_bytes{{{NS}}})", "{{server}}"),
        unit="percentunit",
    ))

    layout.row("Writers")
    layout.add(series(
        "Account actors in memory",
        "Live account actors per writer (capped by COFFER_ACTORS_MAX).",
        (f"coffer_writer_actors_live{{{NS}}}", "{{pod}}"),
    ))
    layout.add(series(
        "Partitions owned",
        "Partition leases per writer; across writers they sum to 64.",
        (f"coffer_writer_partitions_owned{{{NS}}}", "{{pod}}"),
        (f"sum(coffer_writer_partitions_owned{{{NS}}})", "all writers"),
    ))
    layout.add(stat(
        "Leases lost, actors failed (1 h)",
        "Leases another writer took while this one was paused; account actors that crashed.",
        f"sum(increase(coffer_writer_leases_lost_total{{{NS}}}[1h]))"
        f" + sum(increase(coffer_writer_actors_failed_total{{{NS}}}[1h]))",
        [(None, "green"), (1, "orange")],
    ), w=4)
    layout.add(stat(
        "Hold backstop",
        "Writers running the hold-expiry backstop: one is enough, 0 means lost hold schedules are not caught.",
        f"sum(coffer_writer_hold_backstop_running{{{NS}}})",
        [(None, "red"), (1, "green")],
    ), w=4)

    layout.row("Views (readers)")
    layout.add(series(
        "View lag",
        "Events a reader still has to apply, and the age of its newest applied event while "
        "events are pending.",
        (f"coffer_projection_lag_events{{{NS}}}", "{{pod}} events"),
        (f"coffer_projection_lag_seconds{{{NS}}}", "{{pod}} seconds"),
    ))
    layout.add(series(
        "Events applied per second",
        "Per reader; events per redb transaction is applied over batches.",
        (f"rate(coffer_projection_events_applied_total{{{NS}}}[$__rate_interval])", "{{pod}}"),
        (f"rate(coffer_projection_events_applied_total{{{NS}}}[$__rate_interval])"
         f" / rate(coffer_projection_batches_committed_total{{{NS}}}[$__rate_interval])",
         "{{pod}} per batch"),
    ))
    layout.add(stat(
        "Views stopped",
        "Readers whose view stopped (view_failed) or whose file is being reopened after a "
        "failed write.",
        f"sum(coffer_projection_failed{{{NS}}}) + sum(coffer_projection_storage_failed{{{NS}}})",
        [(None, "green"), (1, "red")],
    ), w=4)
    layout.add(stat(
        "Applied position",
        "The lowest position every reader has applied.",
        f"min(coffer_projection_applied_position{{{NS}}})",
        [(None, "blue")],
    ), w=4)

    layout.row("Integrity (readers)")
    layout.add(series(
        "Integrity events",
        "Any of these is a page: a broken hash chain, an event no trusted writer signed, "
        "unbalanced books, an event naming another account's transfer, hold or transaction row, an unreadable or erased "
        "event (its account answers 500 account_unreadable), a consumer changed behind a reader.",
        (f"sum(increase(coffer_reader_chain_breaks_total{{{NS}}}[$__rate_interval]))", "chain breaks"),
        (f"sum(increase(coffer_reader_signature_failures_total{{{NS}}}[$__rate_interval]))",
         "untrusted signatures"),
        (f"sum(increase(coffer_reader_audit_unbalanced_total{{{NS}}}[$__rate_interval]))",
         "audit unbalanced"),
        (f"sum(increase(coffer_reader_rows_refused_total{{{NS}}}[$__rate_interval]))",
         "rows refused"),
        (f"sum(increase(coffer_projection_decode_failures_total{{{NS}}}[$__rate_interval]))",
         "unreadable events"),
        (f"sum(increase(coffer_projection_history_gaps_total{{{NS}}}[$__rate_interval]))",
         "history gaps"),
        (f"sum(increase(coffer_projection_consumer_changes_total{{{NS}}}[$__rate_interval]))",
         "consumer changes"),
        unit="short",
    ), w=16)
    layout.add(series(
        "Redeliveries and consumer re-creations",
        "Deliveries at or below the stored position (after a lost ack or a restart), and "
        "consumers re-created from the stored position.",
        (f"sum(increase(coffer_projection_redeliveries_skipped_total{{{NS}}}[$__rate_interval]))",
         "redeliveries skipped"),
        (f"sum(increase(coffer_projection_consumer_recreations_total{{{NS}}}[$__rate_interval]))",
         "consumer re-created"),
    ))
    return layout.panels


def dashboard():
    return Dashboard(
        title="Coffer",
        uid="coffer",
        description="Coffer's writers, readers and event log (k8s/monitoring/dashboard.py).",
        tags=["coffer"],
        timezone="utc",
        time=Time("now-3h", "now"),
        refresh="30s",
        templating=Templating(list=[
            Template(name="datasource", label="Data source", type="datasource",
                     query="prometheus"),
            Template(name="namespace", label="Namespace",
                     dataSource=DATASOURCE,
                     query="label_values(coffer_writer_actors_live, namespace)",
                     refresh=2),
        ]),
        panels=panels(),
    ).auto_panel_ids()


def main():
    json.dump(dashboard().to_json_data(), sys.stdout, cls=DashboardEncoder, indent=2,
              sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
