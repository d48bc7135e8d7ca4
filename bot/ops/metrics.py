"""Prometheus metrics, in a registry per bot (tests run several in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.commands = Counter("etcd_chatops_commands_total", "Slash commands by subcommand and outcome",
                                ["command", "outcome"], registry=r)
        self.ack_latency = Histogram("etcd_chatops_ack_latency_seconds",
                                     "Time from receiving a Slack request to answering it", ["kind"],
                                     buckets=ACK_BUCKETS, registry=r)
        self.plans = Gauge("etcd_chatops_plans", "Replacement plans by state", ["state"], registry=r)
        self.snapshot_seconds = Histogram("etcd_chatops_snapshot_duration_seconds", "Snapshot save duration",
                                          ["cluster"], buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
                                          registry=r)
        self.snapshot_bytes = Gauge("etcd_chatops_snapshot_size_bytes", "Size of the newest snapshot", ["cluster"],
                                    registry=r)
        self.etcd_errors = Counter("etcd_chatops_etcd_errors_total", "etcd calls that failed, by cluster and kind",
                                   ["cluster", "kind"], registry=r)

        self.cluster_reachable = Gauge("etcd_chatops_cluster_reachable",
                                       "1 when a configured endpoint answered the last readiness check", ["cluster"],
                                       registry=r)
        # the watch (bot/watch)
        self.alerts_open = Gauge("etcd_chatops_alerts_open", "Open watch conditions, by cluster and condition",
                                 ["cluster", "condition"], registry=r)
        self.alerts_posted = Counter("etcd_chatops_alerts_posted_total", "Alerts the watch posted (opened), "
                                     "by cluster and condition", ["cluster", "condition"], registry=r)
        self.watch_errors = Counter("etcd_chatops_watch_errors_total", "Watch checks that raised (a bug, or facts "
                                    "they did not expect), by cluster and condition (or probe); each counts as "
                                    "unknown that round", ["cluster", "condition"], registry=r)
        self.leader = Gauge("etcd_chatops_leader", "1 on the replica that holds the executor lease", registry=r)
        self.lease_renewals = Counter("etcd_chatops_lease_renewals_total",
                                      "Attempts to acquire or renew the executor lease, by outcome (held, refused, "
                                      "error)", ["outcome"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
