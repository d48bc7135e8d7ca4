"""The /metrics reader (pure parser, histogram p99) and the quota and alarm advice status prints (issue 13)."""
from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bot.etcd.health import ClusterHealth, MemberHealth
from bot.etcd.metrics import DEFAULT_QUOTA, MemberMetrics, histogram_quantile, parse_metrics
from bot.etcd.model import Alarm, Member
from bot.output.model import status_view
from bot.output.text import status_json, status_text
from helpers import cluster_health, member_status

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
    assert "QUOTA m1: 16 MB of 16 MB (100 %), 8.0 MB in use" in text
    assert ("QUOTA m2: 16 MB of 2.1 GB (1 %), 8.0 MB in use; quota unknown (/metrics: connection refused "
            "(member down?)), etcd's default assumed") in text
    members = {m["name"]: m for m in json.loads(json.dumps(status_json(view)))["members"]}
    assert members["m1"]["quota_bytes"] == 16_000_000 and members["m1"]["quota_usage"] == 1.0
    assert members["m2"]["quota_bytes"] == DEFAULT_QUOTA and "connection refused" in members["m2"]["quota_error"]
    assert "NEXT: quota use above 80 % (m1 100 %); run /etcd defrag prod" in text


def test_an_alarm_comes_first_with_the_command_to_run_and_no_metrics_means_no_quota_line() -> None:
    view = status_view(_health(1000, alarms=(Alarm(1, "NOSPACE"), Alarm(2, "CORRUPT"))))
    lines = status_text(view).splitlines()
    assert lines[1].startswith("ALARM NOSPACE") and lines[2].startswith("ALARM CORRUPT")
    assert lines[3].startswith("NEXT: NOSPACE") and "/etcd defrag prod" in lines[3]
    assert lines[4].startswith("NEXT: CORRUPT") and "/etcd consistency prod" in lines[4]
    assert "QUOTA" not in "\n".join(lines)  # `members` and callers without metrics print as before
