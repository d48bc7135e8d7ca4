"""etcd's mixin's conditions in the watch, without servers: what each opens given a round's Status and the
/metrics readings of its window, at the mixin's thresholds and at configured ones; and the readings' math
(rates over the last round, percentiles over the window, resets, database growth)."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from test_watch_conditions import PROD, facts, member

from bot.config import ClusterConfig, WatchConfig
from bot.domain.cluster import Buckets, MemberMetrics
from bot.etcd.member_metrics import parse_metrics
from bot.watch import mixin  # noqa: F401  (the conditions registered, as in the bot)
from bot.watch.conditions import Facts, Finding, evaluate
from bot.watch.readings import History, Reading, Window, bucket_increase, predicted

MiB = 1024 * 1024
BOUNDS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192,
          float("inf"))


def metrics(**fields: Any) -> MemberMetrics:
    base = MemberMetrics(quota_bytes=None, wal_fsync_p99=None, backend_commit_p99=None, leader_changes=0,
                         slow_applies=0, proposals_pending=0, proposals_failed=0)
    return dataclasses.replace(base, **fields)


def hist(*observed: float) -> Buckets:
    """Cumulative buckets holding `observed` (etcd's WAL fsync bounds)."""
    return tuple((b, float(sum(1 for o in observed if o <= b))) for b in BOUNDS)


def window(before: MemberMetrics, after: MemberMetrics, seconds: float = 15.0) -> Window:
    first = Reading(1000.0 - seconds, before)
    return Window(first, first, Reading(1000.0, after))


def found(f: Facts, kind: str) -> list[Finding]:
    return [x for x in evaluate(f).findings if x.kind == kind]


def three(**kw: Any) -> Facts:
    return facts(member(1), member(2), member(3), **kw)


def with_watch(f: Facts, **watch: Any) -> Facts:
    return dataclasses.replace(f, cluster=dataclasses.replace(PROD, watch=WatchConfig(**watch)))


# ---------------------------------------------------------------- readings

def test_a_rate_is_over_the_last_round_and_a_reset_counts_from_zero() -> None:
    r = [Reading(t, metrics(proposals_failed=n)) for t, n in ((0.0, 0), (15.0, 300), (30.0, 330))]
    assert Window(r[0], r[1], r[2]).rate(lambda m: m.proposals_failed) == 2.0   # 30 in the last 15 s, not 330 in 30
    restarted = Window(r[0], r[2], Reading(45.0, metrics(proposals_failed=15)))
    assert restarted.rate(lambda m: m.proposals_failed) == 1.0
    late = Window(r[0], Reading(15.0, metrics()), Reading(30.0, metrics(peer_send_failures={"a": 3.0})))
    assert late.rates(lambda m: m.peer_send_failures) == {"a": 0.2}   # a series etcd made meanwhile: from zero


def test_a_percentile_is_over_the_window_and_none_without_observations() -> None:
    slow = window(metrics(wal_fsync=hist(0.001, 0.002)), metrics(wal_fsync=hist(0.001, 0.002, 0.7, 0.8)))
    p99 = slow.p99(lambda m: m.wal_fsync)
    assert p99 is not None and 0.512 < p99 <= 1.024   # only what happened in the window: the two slow fsyncs
    idle = window(metrics(wal_fsync=hist(0.7)), metrics(wal_fsync=hist(0.7)))
    assert idle.p99(lambda m: m.wal_fsync) is None
    assert bucket_increase(hist(0.7, 0.8), hist(0.001)) == hist(0.001)   # restarted: all of the new counts


def test_history_keeps_one_reading_beyond_the_window_and_drops_members_gone() -> None:
    h = History(window=60.0, horizon=3600.0)
    for t in range(0, 181, 15):
        h.add(float(t), {1: metrics(proposals_failed=t), 2: metrics()} if t < 60 else {1: metrics(proposals_failed=t)},
              {1: 100 + t})
    (w,) = h.windows().values()
    assert (w.first.at, w.previous.at, w.last.at) == (120.0, 165.0, 180.0)
    assert set(h.windows()) == {1}   # member 2 was not read for a whole window
    assert h.growth()[1][-1] == (180.0, 280)


def test_growth_is_least_squares_and_needs_an_eighth_of_the_horizon() -> None:
    sizes = tuple((t * 60.0, 1000 + t * 10) for t in range(31))   # 10 bytes a minute for 30 minutes
    assert predicted(sizes, 4 * 3600.0) == pytest.approx(1300 + 2400)
    assert predicted(sizes[:5], 4 * 3600.0) is None   # 4 minutes tell nothing of 4 hours


def test_the_metrics_page_gives_the_series_the_conditions_need() -> None:
    page = "\n".join([
        "# TYPE grpc_server_handled_total counter",
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",'
        'grpc_type="unary"} 90',
        'grpc_server_handled_total{grpc_code="Unavailable",grpc_method="Range",grpc_service="etcdserverpb.KV",'
        'grpc_type="unary"} 10',
        'grpc_server_handled_total{grpc_code="NotFound",grpc_method="Range",grpc_service="etcdserverpb.KV",'
        'grpc_type="unary"} 5',
        'grpc_server_handling_seconds_bucket{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary",'
        'le="0.1"} 3',
        'grpc_server_handling_seconds_bucket{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary",'
        'le="+Inf"} 4',
        'grpc_server_handling_seconds_bucket{grpc_method="Defragment",grpc_service="etcdserverpb.Maintenance",'
        'grpc_type="unary",le="+Inf"} 1',
        'grpc_server_handling_seconds_bucket{grpc_method="Watch",grpc_service="etcdserverpb.Watch",'
        'grpc_type="bidi_stream",le="+Inf"} 1',
        'etcd_network_peer_sent_failures_total{To="a93538748562a861"} 7',
        'etcd_network_peer_round_trip_time_seconds_bucket{To="a93538748562a861",le="0.2048"} 1',
        'etcd_network_peer_round_trip_time_seconds_bucket{To="a93538748562a861",le="+Inf"} 1',
        "go_goroutines 120",
        'etcd_debugging_weird{label="not parsed \\" at all"} 1',
    ])
    m = parse_metrics(page)
    assert m.grpc_requests == {"Range": 105.0} and m.grpc_failures == {"Range": 10.0}   # NotFound is no failure
    assert list(m.grpc_latency) == ["Range"]   # unary, Defragment left out (as the mixin does)
    assert m.peer_send_failures == {"a93538748562a861": 7.0}
    assert m.peer_rtt == {"a93538748562a861": ((0.2048, 1.0), (float("inf"), 1.0))}
    with pytest.raises(ValueError, match="labels do not parse"):
        parse_metrics('grpc_server_handled_total{grpc_code="OK" junk} 1')


# ---------------------------------------------------------------- the conditions

def test_a_member_without_a_leader_while_the_others_have_one_is_cut_off_from_its_peers() -> None:
    f = facts(member(1, leader=1), member(2, leader=1), member(3, leader=0))
    (lost,) = found(f, "no_leader")
    assert lost.subject == "raft" and lost.severity == "critical" and lost.members == ("member3",)
    assert "member3 has no leader while the others follow member1: cut off from its peers" in lost.summary
    assert lost.suggestions == ("/etcd status prod",)
    nobody = found(facts(member(1, leader=0), member(2, leader=0), member(3, leader=0)), "no_leader")
    assert "no member that answers has a leader" in nobody[0].summary
    # Quorum lost says it (with what to do), not this.
    assert found(facts(member(1, up=False), member(2, up=False), member(3, leader=0)), "no_leader") == []
    assert found(three(), "no_leader") == []


def test_peer_send_failures_to_a_member_that_answers_open_and_to_a_dead_one_are_member_down() -> None:
    cut = metrics(peer_send_failures={"3": 30.0})
    before = metrics(peer_send_failures={"3": 0.0})
    f = facts(member(1), member(2), member(3), windows={1: window(before, cut)})
    (failing,) = found(f, "peer_failures")
    assert failing.subject == "peer network" and ("member1", "sends failing to member3 2.00/s") in failing.figures
    dead = facts(member(1), member(2), member(3, up=False), windows={1: window(before, cut)})
    assert found(dead, "peer_failures") == [] and found(dead, "member_down")
    assert found(facts(member(1), member(2), member(3), windows={1: window(before, before)}), "peer_failures") == []


def test_a_failing_share_of_grpc_requests_is_a_warning_then_critical() -> None:
    def share(failed: float) -> Facts:
        return three(windows={2: window(metrics(grpc_requests={"Range": 0.0, "Put": 0.0}),
                                        metrics(grpc_requests={"Range": 1000.0, "Put": 10.0},
                                                grpc_failures={"Range": failed}))})
    assert found(share(5.0), "grpc_failed") == []   # 0.5 %
    (warning,) = found(share(20.0), "grpc_failed")
    assert warning.severity == "warning" and ("member2", "2.0 % of Range requests failing") in warning.figures
    assert warning.suggestions == ("/etcd status prod", "/etcd perf prod")
    assert found(share(60.0), "grpc_failed")[0].severity == "critical"
    assert found(with_watch(share(60.0), grpc_failed_warning=0.1, grpc_failed_critical=0.2), "grpc_failed") == []


def test_slow_disks_name_the_member_and_go_critical_past_one_second() -> None:
    fast = metrics(wal_fsync=hist(0.001), backend_commit=hist(0.004))
    slow = metrics(wal_fsync=hist(*[0.001] * 90, *[0.7] * 10), backend_commit=hist(0.004, *[0.4] * 10))
    worse = metrics(wal_fsync=hist(0.001, *[1.5] * 10))
    f = three(windows={1: window(fast, fast), 2: window(fast, slow)})
    (fsync,) = found(f, "wal_fsync")
    (commit,) = found(f, "backend_commit")
    assert fsync.subject == commit.subject == "disk" and fsync.members == commit.members == ("member2",)
    assert "the disk of member2 is slow" in fsync.summary and fsync.severity == "warning"
    assert fsync.suggestions == ("/etcd perf prod",)
    assert found(three(windows={2: window(fast, worse)}), "wal_fsync")[0].severity == "critical"
    assert found(with_watch(f, wal_fsync_p99_seconds=1.0), "wal_fsync") == []


def test_slow_grpc_and_slow_peer_round_trips_name_the_method_and_the_peer() -> None:
    before = metrics()
    slow = metrics(grpc_latency={"Range": hist(*[0.01] * 50), "Txn": hist(*[0.3] * 50)},
                   peer_rtt={"1": hist(0.001), "2": hist(0.2)})
    f = three(windows={3: window(before, slow)})
    (grpc,) = found(f, "grpc_slow")
    assert grpc.subject == "gRPC" and grpc.figures[0][0] == "member3" and "requests Txn: p99" in grpc.figures[0][1]
    (rtt,) = found(f, "peer_rtt")
    assert rtt.subject == "peer network" and "round trips to member2: p99" in rtt.figures[0][1]
    assert rtt.suggestions == ("/etcd perf prod",)
    assert found(with_watch(f, peer_rtt_p99_seconds=0.3), "peer_rtt") == []


def test_failed_proposals_over_five_a_second() -> None:
    def rate(n: int) -> Facts:
        return three(windows={1: window(metrics(proposals_failed=0), metrics(proposals_failed=n), seconds=10.0)})
    assert found(rate(50), "proposals_failed") == []
    (failing,) = found(rate(60), "proposals_failed")
    assert ("member1", "6.0 failed proposals a second") in failing.figures


def test_fragmentation_needs_half_free_and_over_100_mib_in_use() -> None:
    (frag,) = found(facts(member(1, db_size=500 * MiB, db_size_in_use=200 * MiB), member(2)), "fragmentation")
    assert frag.suggestions == ("/etcd defrag prod",) and frag.members == ("member1",)
    assert found(facts(member(1, db_size=500 * MiB, db_size_in_use=90 * MiB), member(2)), "fragmentation") == []
    assert found(facts(member(1, db_size=300 * MiB, db_size_in_use=200 * MiB), member(2)), "fragmentation") == []


def test_a_database_growing_into_its_quota_within_four_hours() -> None:
    minutes = range(0, 61)
    growing = {1: tuple((1000.0 + 60 * t, 1000 * MiB + t * 5 * MiB) for t in minutes)}   # 5 MiB a minute
    (growth,) = found(three(sizes=growing, quotas={1: 2048 * MiB}), "db_growth")
    assert growth.subject == "database size" and "within 4 h" in growth.summary
    assert found(three(sizes=growing, quotas={1: 8192 * MiB}), "db_growth") == []
    assert found(with_watch(three(sizes=growing, quotas={1: 2048 * MiB}), growth_horizon="1h"), "db_growth") == []


def test_quota_is_a_warning_above_80_and_critical_above_95_percent() -> None:
    quotas = {1: 1000_000, 2: 1000_000}
    (warning,) = found(facts(member(1, db_size=850_000), member(2), quotas=quotas), "quota")
    assert warning.severity == "warning" and "above 80 %" in warning.summary
    (critical,) = found(facts(member(1, db_size=960_000), member(2, db_size=850_000), quotas=quotas), "quota")
    assert critical.severity == "critical" and "above 95 % of the quota on member1:" in critical.summary
    assert critical.figures == (("member1", "960 kB of 1.0 MB (96 %)"), ("member2", "850 kB of 1.0 MB (85 %)"))
    assert found(with_watch(facts(member(1, db_size=850_000), quotas=quotas), quota_warning=0.9), "quota") == []


def test_thresholds_are_checked_in_order() -> None:
    from pathlib import Path

    from bot.config import ConfigError, parse_config
    for watch, says in (({"quota_warning": 0.9, "quota_critical": 0.8}, "quota_critical: must be at least"),
                        ({"wal_fsync_p99_seconds": 2.0}, "wal_fsync_p99_critical_seconds: must be at least"),
                        ({"window": "0s"}, "too often"), ({"quota_critical": 1.5}, "at most 1")):
        with pytest.raises(ConfigError, match=says):
            parse_config({"clusters": [{"name": "prod", "endpoints": ["http://10.0.0.1:2379"], "watch": watch}]},
                         Path("."))
    assert ClusterConfig(name="x", endpoints=("http://a:1",)).watch.quota_critical == 0.95
