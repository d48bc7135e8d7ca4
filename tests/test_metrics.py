"""The /metrics reader (pure parser, histogram p99) and the quota and alarm advice status prints;
the bot's own gauges read from its catalog."""
from __future__ import annotations

import dataclasses
import json
import time

from hypothesis import given
from hypothesis import strategies as st

from bot.config import ClusterConfig, SnapshotPolicy
from bot.config.offsite import StoreConfig
from bot.domain.cluster import DEFAULT_QUOTA, Alarm, ClusterHealth, Member, MemberHealth, MemberMetrics
from bot.domain.snapshot import NewSnapshot
from bot.etcd.member_metrics import histogram_quantile, parse_metrics
from bot.ops.metrics import Metrics, newest_offsite
from bot.output.blocks import status_reply
from bot.output.model import status_view
from bot.output.text import status_json, status_text
from helpers import cluster_health, member_status, snapshot_record

PAGE = """\
# HELP etcd_server_quota_backend_bytes Current backend storage quota size in bytes.
# TYPE etcd_server_quota_backend_bytes gauge
etcd_server_quota_backend_bytes 1.6777216e+07
# TYPE etcd_disk_wal_fsync_duration_seconds histogram
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.001"} 0
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.002"} 50
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.004"} 90
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.008"} 100
etcd_disk_wal_fsync_duration_seconds_bucket{le="+Inf"} 100
etcd_disk_wal_fsync_duration_seconds_sum 0.2
etcd_disk_wal_fsync_duration_seconds_count 100
# TYPE etcd_server_leader_changes_seen_total counter
etcd_server_leader_changes_seen_total 3
# TYPE etcd_server_slow_apply_total counter
etcd_server_slow_apply_total 7
# TYPE etcd_server_proposals_pending gauge
etcd_server_proposals_pending 2
# TYPE etcd_server_proposals_failed_total counter
etcd_server_proposals_failed_total 1
"""


def test_the_figures_come_out_of_a_prometheus_page() -> None:
    m = parse_metrics(PAGE)
    assert m.quota_bytes == 16 * 1024 * 1024
    # rank 99 of 100 lies in (0.004, 0.008], 9 of its 10 observations in: 0.004 + 0.004 * 0.9
    assert m.wal_fsync_p99 is not None and abs(m.wal_fsync_p99 - 0.0076) < 1e-9
    assert m.backend_commit_p99 is None  # not on the page: unknown, not zero
    assert (m.leader_changes, m.slow_applies, m.proposals_pending, m.proposals_failed) == (3, 7, 2, 1)


def test_the_stop_grpc_service_on_defrag_gate_is_read_from_the_page() -> None:
    """etcd 3.6 lists its feature gates: the defrag plan tells what clients see from it (None: the page does not
    say, as before 3.6)."""
    gates = ('# TYPE etcd_server_feature_enabled gauge\n'
             'etcd_server_feature_enabled{name="InitialCorruptCheck",stage="ALPHA"} 0\n'
             'etcd_server_feature_enabled{name="StopGRPCServiceOnDefrag",stage="ALPHA"} %d\n')
    assert parse_metrics(PAGE + gates % 1).stops_serving_on_defrag is True
    assert parse_metrics(PAGE + gates % 0).stops_serving_on_defrag is False
    assert parse_metrics(PAGE).stops_serving_on_defrag is None


def test_p99_in_the_inf_bucket_is_the_highest_finite_bound_and_none_without_observations() -> None:
    assert histogram_quantile(0.99, [(0.01, 1), (float("inf"), 100)]) == 0.01
    assert histogram_quantile(0.99, [(0.01, 0), (float("inf"), 0)]) is None
    assert histogram_quantile(0.99, []) is None


@given(st.lists(st.tuples(st.floats(0.0001, 10), st.integers(0, 1000)), min_size=1, max_size=12),
       st.floats(0.01, 1.0))
def test_a_quantile_lies_within_the_buckets_bounds(pairs: list[tuple[float, int]], q: float) -> None:
    bounds = sorted({b for b, _ in pairs})
    counts, total = [], 0
    for _, c in sorted(pairs)[:len(bounds)]:
        total += c
        counts.append(total)
    buckets = list(zip(bounds, counts, strict=True)) + [(float("inf"), total)]
    value = histogram_quantile(q, buckets)
    if total == 0:
        assert value is None
    else:
        assert value is not None and 0 <= value <= bounds[-1]


def _health(db_size: int, alarms: tuple[Alarm, ...] = ()) -> ClusterHealth:
    members = [MemberHealth(Member(i, f"m{i}", (f"http://10.0.0.{i}:2380",), (f"http://10.0.0.{i}:2379",)),
                            member_status(member_id=i, db_size=db_size, db_size_in_use=db_size // 2))
               for i in (1, 2)]
    return cluster_health(*members, alarms=alarms)


def test_status_prints_each_members_quota_and_assumes_the_default_when_metrics_are_unreadable() -> None:
    quota = MemberMetrics(16_000_000, None, None, 0, 0, 0, 0)
    view = status_view(_health(16_000_000), {1: quota, 2: "/metrics: connection refused (member down?)"})
    text = status_text(view)
    row = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("|")}
    assert "16 MB (8.0 MB) | 100 % of 16 MB |" in row["m1"] and "16 MB (8.0 MB) |  1 % of 2.1 GB |" in row["m2"]
    assert ("QUOTA m2: unknown (/metrics: connection refused (member down?)), etcd's default assumed") in text
    assert text.count("16 MB (8.0 MB)") == 2 and "in use" not in text   # each figure once
    members = {m["name"]: m for m in json.loads(json.dumps(status_json(view)))["members"]}
    assert members["m1"]["quota_bytes"] == 16_000_000 and members["m1"]["quota_usage"] == 1.0
    assert members["m2"]["quota_bytes"] == DEFAULT_QUOTA and "connection refused" in members["m2"]["quota_error"]
    assert "NEXT: quota use above 80 % (m1 100 %); run /etcd defrag prod" in text


def test_a_status_member_line_says_each_figure_once_and_names_the_member() -> None:
    """The member's database size, what of it is in use and its quota use, each said once (the in-use figure
    was said twice, in the DB fact and again in the quota's), and the member by name, not its ID."""
    quota = MemberMetrics(16_000_000, None, None, 0, 0, 0, 0)
    reply = status_reply(_health(16_000_000), metrics={1: quota, 2: quota})
    (line,) = [b["text"]["text"] for b in reply.blocks if "*m1*" in b.get("text", {}).get("text", "")]
    assert "DB 16 MB (8.0 MB in use, 100 % of 16 MB quota)" in line and line.count("8.0 MB") == 1
    assert f"{1:016x}" not in line


def test_an_alarm_comes_first_with_the_command_to_run_and_no_metrics_means_no_quota_line() -> None:
    view = status_view(_health(1000, alarms=(Alarm(1, "NOSPACE"), Alarm(2, "CORRUPT"))))
    lines = status_text(view).splitlines()
    assert lines[1].startswith("ALARM NOSPACE") and lines[2].startswith("ALARM CORRUPT")
    assert lines[3].startswith("NEXT: NOSPACE") and "/etcd defrag prod" in lines[3]
    assert lines[4].startswith("NEXT: CORRUPT") and "/etcd consistency prod" in lines[4]
    assert not [line for line in lines if line.startswith("QUOTA")]  # without metrics: no quota said
    assert [line.split("|")[6].strip() for line in lines if line.startswith("|   m")] == ["-", "-"]


# ---------------------------------------------------------------- the bot's gauges read from its catalog

def _gauge(metrics: Metrics, name: str, cluster: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"cluster": cluster})


async def test_the_snapshot_gauges_come_from_the_catalog_so_every_replica_and_a_restart_report_the_same(
        tmp_path) -> None:
    """The newest snapshot (pruned or not) and the newest copy verified off-site and still there, per
    cluster; the schedule only where there is one, the off-site time only where there is a store; and a
    cluster with nothing yet counts from the bot's start (a schedule that never ran still ages)."""
    from bot.store.sqlite import SqliteStore
    now = time.time()
    store = await SqliteStore(tmp_path / "etcd-chatops.db").open()
    row = NewSnapshot(cluster="prod", path="", member="member1", revision=1, hash="0", total_keys=1, live_keys=None,
                      total_size=1, file_size=1, sha256="0", encrypted=False, requested_by="the schedule",
                      reason="scheduled", duration=0.1, created_at=0.0)
    ids = {}
    for name, age in (("gone", 4000), ("verified", 3000), ("pruned-remote", 2000), ("failed", 1000), ("newest", 100)):
        ids[name] = await store.record_snapshot(dataclasses.replace(row, path=f"/s/{name}.db", created_at=now - age))
    await store.update_snapshot(ids["gone"], remote_state="verified")
    await store.update_snapshot(ids["verified"], remote_state="verified")
    await store.update_snapshot(ids["pruned-remote"], remote_state="verified", remote_pruned_at=now)
    await store.update_snapshot(ids["failed"], remote_state="failed", remote_error="AccessDenied")
    await store.mark_pruned(ids["newest"])  # its local file went (keep_local): still the newest snapshot
    prod = ClusterConfig(name="prod", endpoints=("http://10.0.0.1:2379",),
                         snapshots=SnapshotPolicy(every_seconds=3600.0, store=StoreConfig(url="file:///backups")))
    lab = ClusterConfig(name="lab", endpoints=("http://10.0.0.2:2379",))
    try:
        replicas = [Metrics(), Metrics()]
        for metrics in replicas:
            await metrics.from_store(store, [prod, lab])
    finally:
        await store.close()
    for metrics in replicas:
        assert _gauge(metrics, "etcd_chatops_snapshot_last_timestamp_seconds", "prod") == now - 100
        assert _gauge(metrics, "etcd_chatops_snapshot_offsite_last_timestamp_seconds", "prod") == now - 3000
        assert _gauge(metrics, "etcd_chatops_snapshot_schedule_seconds", "prod") == 3600.0
        assert _gauge(metrics, "etcd_chatops_snapshot_last_timestamp_seconds", "lab") == metrics.started
        assert _gauge(metrics, "etcd_chatops_snapshot_offsite_last_timestamp_seconds", "lab") is None
        assert _gauge(metrics, "etcd_chatops_snapshot_schedule_seconds", "lab") is None
        assert metrics.registry.get_sample_value("etcd_chatops_plans", {"state": "proposed"}) == 0


def test_an_offsite_copy_counts_only_verified_and_still_there() -> None:
    rows = [snapshot_record(created_at=5.0, remote_state="uploading"),
            snapshot_record(created_at=4.0, remote_state="failed"),
            snapshot_record(created_at=3.0, remote_state="verified", remote_pruned_at=9.0),
            snapshot_record(created_at=2.0, remote_state="verified"),
            snapshot_record(created_at=1.0, remote_state="verified")]
    assert newest_offsite(rows, otherwise=100.0) == 2.0
    assert newest_offsite(rows[:3], otherwise=100.0) == 100.0
    assert newest_offsite([], otherwise=100.0) == 100.0


def test_lease_renewal_outcomes_are_exported_from_the_start() -> None:
    """A rate over the error outcome needs a first sample before the first error (the rules divide by it)."""
    page = Metrics().exposition().decode()
    for outcome in ("held", "refused", "error"):
        assert f'etcd_chatops_lease_renewals_total{{outcome="{outcome}"}} 0.0' in page
    assert "etcd_chatops_alertmanager_unmatched_total 0.0" in page
