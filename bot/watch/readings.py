"""A member's /metrics, round after round: rates and percentiles over a window of readings, and the
database's growth over a longer one (pure; the watcher feeds it, the conditions read it).

etcd's counters and histograms count from the member's start, so what happens *now* is the difference
between two readings. A counter's rate is taken over the last round (the previous reading against this
one): failures that stopped stop counting at once. A histogram's percentile is taken over the window,
the newest reading against the oldest one still within `[clusters.watch] window`, as Prometheus'
`histogram_quantile(0.99, rate(x[5m]))` is: etcd observes some rarely (a peer round trip once every
30 s), so a shorter span mostly holds none; percentiles without observations are None (no verdict), as
Prometheus' histogram_quantile of an empty rate is NaN. A counter that went down (the member restarted)
counts from zero, as Prometheus counts a reset.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bot.domain.cluster import Buckets, MemberMetrics
from bot.etcd.member_metrics import histogram_quantile

GROWTH_POINTS = 256   # database sizes kept per member over the growth horizon
GROWTH_SPAN = 1 / 8   # a growth needs sizes spanning this share of the horizon (30 min of 4 h) to extrapolate


@dataclass(frozen=True)
class Reading:
    at: float               # time.time() of the round that read it
    metrics: MemberMetrics


def increase(first: float, last: float) -> float:
    """A counter's increase between two readings; after a reset (the member restarted), what it counted since."""
    return last - first if last >= first else last


def bucket_increase(first: Buckets, last: Buckets) -> Buckets:
    """A histogram's observations between two readings, bucket by bucket (a reset: all of `last`)."""
    before = dict(first)
    if any(count < before.get(bound, 0.0) for bound, count in last):
        return last
    return tuple((bound, count - before.get(bound, 0.0)) for bound, count in last)


@dataclass(frozen=True)
class Window:
    """One member's readings: the oldest within the window, the one before the last, and the last."""

    first: Reading
    previous: Reading
    last: Reading

    @property
    def seconds(self) -> float:
        return self.last.at - self.first.at

    @property
    def round_seconds(self) -> float:
        return self.last.at - self.previous.at

    def rate(self, get: Callable[[MemberMetrics], float | None]) -> float | None:
        """A counter's per-second rate over the last round; None without two readings of it."""
        a, b = get(self.previous.metrics), get(self.last.metrics)
        if a is None or b is None or self.round_seconds <= 0:
            return None
        return increase(a, b) / self.round_seconds

    def rates(self, get: Callable[[MemberMetrics], Mapping[str, float]]) -> dict[str, float]:
        """Per-second rates of a counter by label over the last round; a label absent from the previous reading
        counts from zero (etcd makes a labelled series at its first event)."""
        a, b = get(self.previous.metrics), get(self.last.metrics)
        if self.round_seconds <= 0:
            return {}
        return {k: increase(a.get(k, 0.0), v) / self.round_seconds for k, v in b.items()}

    def p99(self, get: Callable[[MemberMetrics], Buckets]) -> float | None:
        """The 99th percentile of what was observed between the readings; None without observations."""
        if self.seconds <= 0:
            return None
        return histogram_quantile(0.99, bucket_increase(get(self.first.metrics), get(self.last.metrics)))

    def p99s(self, get: Callable[[MemberMetrics], Mapping[str, Buckets]]) -> dict[str, float]:
        """The 99th percentile by label, of those with observations between the readings."""
        if self.seconds <= 0:
            return {}
        a = get(self.first.metrics)
        found = {k: histogram_quantile(0.99, bucket_increase(a.get(k, ()), v))
                 for k, v in get(self.last.metrics).items()}
        return {k: v for k, v in found.items() if v is not None}


def predicted(sizes: tuple[tuple[float, int], ...], horizon: float) -> float | None:
    """Where the sizes are headed `horizon` seconds after the last, by least squares (Prometheus'
    predict_linear); None until they span GROWTH_SPAN of the horizon."""
    if len(sizes) < 2 or sizes[-1][0] - sizes[0][0] < GROWTH_SPAN * horizon:
        return None
    n = len(sizes)
    mean_t = sum(t for t, _ in sizes) / n
    mean_s = sum(s for _, s in sizes) / n
    var = sum((t - mean_t) ** 2 for t, _ in sizes)
    slope = sum((t - mean_t) * (s - mean_s) for t, s in sizes) / var
    return mean_s + slope * (sizes[-1][0] + horizon - mean_t)


@dataclass
class History:
    """The readings of one cluster's members: within `window` for rates, and database sizes over `horizon`."""

    window: float
    horizon: float
    readings: dict[int, deque[Reading]] = field(default_factory=dict)
    sizes: dict[int, deque[tuple[float, int]]] = field(default_factory=dict)

    def add(self, now: float, metrics: Mapping[int, MemberMetrics], db_sizes: Mapping[int, int]) -> None:
        """This round's readings (members not read this round keep their older ones)."""
        for member, m in metrics.items():
            kept = self.readings.setdefault(member, deque())
            kept.append(Reading(now, m))
            while len(kept) > 2 and now - kept[1].at >= self.window:
                kept.popleft()   # the oldest kept is the last one at or beyond the window's start
        for member, size in db_sizes.items():
            points = self.sizes.setdefault(member, deque())
            if not points or now - points[-1][0] >= self.horizon / GROWTH_POINTS:
                points.append((now, size))
            while points and now - points[0][0] > self.horizon:
                points.popleft()
        for gone in set(self.readings) - set(metrics) - set(db_sizes):
            if now - self.readings[gone][-1].at > self.window:   # removed, or not read for a whole window
                del self.readings[gone]
                self.sizes.pop(gone, None)

    def windows(self) -> dict[int, Window]:
        """Each member's window with two readings or more."""
        return {m: Window(r[0], r[-2], r[-1]) for m, r in self.readings.items() if len(r) >= 2}

    def growth(self) -> dict[int, tuple[tuple[float, int], ...]]:
        return {m: tuple(points) for m, points in self.sizes.items()}
