"""Prometheus metrics, in a registry per bot (tests run several in one process).

Most are counted where things happen. The gauges whose truth is the shared
store (plans by state, the newest snapshot and off-site copy of each cluster)
are read from it at each scrape (`from_store`): every replica then reports the
same figures, and a restarted replica reports them at once, so the rules in
deploy/prometheus/ can take the newest over all replicas.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bot.domain.plan import PlanState
from bot.domain.snapshot import RemoteState, SnapshotRecord

if TYPE_CHECKING:
    from bot.config import ClusterConfig
    from bot.store.base import Store

ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)
# How far back in a cluster's catalog the newest verified off-site copy is looked for at each scrape.
CATALOG_ROWS = 100
RENEWAL_OUTCOMES = ("held", "refused", "error")  # lease_renewals_total{outcome}: bot/runtime/leader.py


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
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
        self.snapshot_last = Gauge("etcd_chatops_snapshot_last_timestamp_seconds",
                                   "When the newest snapshot in the catalog was taken (Unix time; the bot's start "
                                   "while there is none)", ["cluster"], registry=r)
        self.offsite_last = Gauge("etcd_chatops_snapshot_offsite_last_timestamp_seconds",
                                  "When the newest snapshot verified off-site was taken (Unix time; the bot's start "
                                  "while there is none), for clusters with a store", ["cluster"], registry=r)
        self.snapshot_schedule = Gauge("etcd_chatops_snapshot_schedule_seconds",
                                       "The snapshot schedule's interval (snapshots.every), for clusters with one",
                                       ["cluster"], registry=r)
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
        self.watch_rounds = Counter("etcd_chatops_watch_rounds_total", "Rounds the watch ran, by cluster (on the "
                                    "leader; one that stops counting is stuck)", ["cluster"], registry=r)
        self.upkeep_passes = Counter("etcd_chatops_upkeep_passes_total", "Looks of the upkeep at the schedules "
                                     "(every second on every replica, only the leader acts; one that stops counting "
                                     "is stuck)", registry=r)
        self.alertmanager_unmatched = Counter("etcd_chatops_alertmanager_unmatched_total",
                                              "Alerts received from Alertmanager that matched no configured cluster",
                                              registry=r)
        self.leader = Gauge("etcd_chatops_leader", "1 on the replica that holds the executor lease", registry=r)
        self.lease_renewals = Counter("etcd_chatops_lease_renewals_total",
                                      "Attempts to acquire or renew the executor lease, by outcome (held, refused, "
                                      "error)", ["outcome"], registry=r)
        for outcome in RENEWAL_OUTCOMES:  # exported at 0 from the start, so a rate over them has a first sample
            self.lease_renewals.labels(outcome=outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def from_store(self, store: Store, clusters: Sequence[ClusterConfig]) -> None:
        """Set the gauges whose truth is the shared store; raises StoreError (the others are still served)."""
        counts = await store.plan_counts()
        for state in PlanState:
            self.plans.labels(state=state.value).set(counts.get(state, 0))
        for cluster in clusters:
            if cluster.snapshots.every_seconds:
                self.snapshot_schedule.labels(cluster=cluster.name).set(cluster.snapshots.every_seconds)
            rows = await store.snapshots(cluster.name, limit=CATALOG_ROWS, include_pruned=True)  # newest first
            self.snapshot_last.labels(cluster=cluster.name).set(rows[0].created_at if rows else self.started)
            if cluster.snapshots.store is not None:
                self.offsite_last.labels(cluster=cluster.name).set(newest_offsite(rows, self.started))


def newest_offsite(rows: Sequence[SnapshotRecord], otherwise: float) -> float:
    """When the newest snapshot whose off-site copy is verified and still there was taken, or
    `otherwise` (the bot's start: the age of a copy never made counts from then, as the watch's)."""
    return next((r.created_at for r in rows if r.remote_state == RemoteState.VERIFIED and not r.remote_pruned_at),
                otherwise)
