"""A member's `/metrics`: fetched over its client URL, parsed into the figures
the bot judges (quota, disk latency, raft trouble).

etcd shows its backend quota nowhere but here (`etcd_server_quota_backend_bytes`),
and the disk histograms etcd's tuning guide judges by (WAL fsync p99 < 10 ms,
backend commit p99 < 25 ms). The parser is pure (prometheus-client's text
parser); the fetch is a plain HTTP/1.0 GET over asyncio streams, so the core
needs no HTTP library and a Go server answers without chunking.
"""
from __future__ import annotations

import asyncio
import functools
import math
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from bot.domain.cluster import Buckets, MemberMetrics, TLSFiles
from bot.domain.errors import EtcdError, EtcdTimeout, EtcdUnavailable
from bot.domain.urls import dial
from bot.etcd.race import AllFailed, first_success

if TYPE_CHECKING:  # the fan-out calls the gRPC client; the parser above it stays pure
    from bot.domain.cluster import ClusterHealth
    from bot.etcd.client import EtcdClient

MAX_BODY = 16 * 1024 * 1024    # a /metrics page is ~200 kB; more is not etcd
STOP_GRPC_ON_DEFRAG = "StopGRPCServiceOnDefrag"  # etcd 3.6's feature gate (3.5.13+: --experimental-stop-grpc-...)


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets:
    linear inside the bucket the rank falls in; the highest finite bound when it
    falls in +Inf; None without observations."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


# The families read; every other line of the page (~1500 of ~1600: go_*, process_*, debugging series,
# grpc_server_started_total...) is dropped before parsing, which is most of the parser's time.
READ = ("etcd_server_quota_backend_bytes", "etcd_disk_wal_fsync_duration_seconds_bucket",
        "etcd_disk_backend_commit_duration_seconds_bucket", "etcd_server_leader_changes_seen_total",
        "etcd_server_slow_apply_total", "etcd_server_proposals_pending", "etcd_server_proposals_failed_total",
        "etcd_network_peer_sent_failures_total", "etcd_network_peer_round_trip_time_seconds_bucket",
        "grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "etcd_server_feature_enabled")
# The codes etcd's mixin counts as failed requests (etcdHighNumberOfFailedGRPCRequests).
GRPC_FAILED = frozenset({"Unknown", "FailedPrecondition", "ResourceExhausted", "Internal", "Unavailable", "DataLoss",
                         "DeadlineExceeded"})
Sample = tuple[Mapping[str, str], float]


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_UNESCAPE = re.compile(r"\\[\\\"n]")


@functools.lru_cache(maxsize=4096)
def _label_set(text: str) -> Mapping[str, str] | None:
    """The labels of a sample's `{...}` text, or None when they do not parse. Cached: a page repeats the same
    label sets in every round and on every member (~700 grpc_server_handled_total series), and parsing them
    again was most of a round's parse time."""
    found, at = {}, 0
    for m in _LABEL.finditer(text):
        if m.start() != at:
            break
        value = m.group(2)
        found[m.group(1)] = _UNESCAPE.sub(lambda e: _ESCAPES[e.group(0)], value) if "\\" in value else value
        at = m.end()
    return MappingProxyType(found) if at == len(text) else None


def _labels(text: str, line: str) -> Mapping[str, str]:
    found = _label_set(text)
    if found is None:
        raise ValueError(f"labels do not parse: {line[:120]!r}")
    return found


def _samples(text: str) -> dict[str, list[Sample]]:
    """The samples of the families READ names, by series name, read from the text format's sample lines
    (prometheus-client's parser takes ~0.2 s for a whole etcd page: too slow for every round).
    ValueError on a line of those families that does not parse."""
    out: dict[str, list[Sample]] = {}
    for line in text.splitlines():
        if not line.startswith(READ):
            continue
        m = _SAMPLE.fullmatch(line.strip())
        if m is None:
            raise ValueError(f"not a sample: {line[:120]!r}")
        name, labels, value = m.groups()
        out.setdefault(name, []).append((_labels(labels or "", line), float(value)))
    return out


def _buckets(found: Iterable[Sample]) -> Buckets:
    by_bound: dict[float, float] = {}
    for labels, value in found:
        if "le" in labels:
            bound = float(labels["le"])
            by_bound[bound] = by_bound.get(bound, 0.0) + value
    return tuple(sorted(by_bound.items()))


def _by(found: Iterable[Sample], label: str, keep: Callable[[Mapping[str, str]], bool] = lambda _: True
        ) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for labels, value in found:
        if keep(labels):
            out.setdefault(labels.get(label, ""), []).append((labels, value))
    return out


def parse_metrics(text: str) -> MemberMetrics:
    """The figures out of a Prometheus text page (raises ValueError on a page that does not parse)."""
    samples = _samples(text)

    def one(name: str) -> int | None:
        found = samples.get(name)
        return int(sum(v for _, v in found)) if found else None

    def p99(name: str) -> float | None:
        found = samples.get(f"{name}_bucket")
        if not found:
            return None
        return histogram_quantile(0.99, _buckets(found))

    handled = samples.get("grpc_server_handled_total", [])
    latency = _by(samples.get("grpc_server_handling_seconds_bucket", []), "grpc_method",
                  lambda labels: labels.get("grpc_type") == "unary" and labels.get("grpc_method") != "Defragment")
    gate = next((v for labels, v in samples.get("etcd_server_feature_enabled", ())
                 if labels.get("name") == STOP_GRPC_ON_DEFRAG), None)
    return MemberMetrics(quota_bytes=one("etcd_server_quota_backend_bytes"),
                         wal_fsync_p99=p99("etcd_disk_wal_fsync_duration_seconds"),
                         backend_commit_p99=p99("etcd_disk_backend_commit_duration_seconds"),
                         leader_changes=one("etcd_server_leader_changes_seen_total"),
                         slow_applies=one("etcd_server_slow_apply_total"),
                         proposals_pending=one("etcd_server_proposals_pending"),
                         proposals_failed=one("etcd_server_proposals_failed_total"),
                         peer_send_failures={to: sum(v for _, v in found) for to, found in
                                             _by(samples.get("etcd_network_peer_sent_failures_total", []),
                                                 "To").items()},
                         peer_rtt={to: _buckets(found) for to, found in
                                   _by(samples.get("etcd_network_peer_round_trip_time_seconds_bucket", []),
                                       "To").items()},
                         grpc_requests={m: sum(v for _, v in found) for m, found in
                                        _by(handled, "grpc_method").items()},
                         grpc_failures={m: sum(v for _, v in found) for m, found in
                                        _by(handled, "grpc_method",
                                            lambda labels: labels.get("grpc_code") in GRPC_FAILED).items()},
                         grpc_latency={m: _buckets(found) for m, found in latency.items()},
                         wal_fsync=_buckets(samples.get("etcd_disk_wal_fsync_duration_seconds_bucket", [])),
                         backend_commit=_buckets(samples.get("etcd_disk_backend_commit_duration_seconds_bucket", [])),
                         stops_serving_on_defrag=None if gate is None else gate > 0)


# ---------------------------------------------------------------- fetch

def ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    """The same trust and client certificate as the gRPC channels."""
    context = ssl.create_default_context(cafile=str(tls.cacert) if tls.cacert else None)
    if tls.cert and tls.key:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


async def fetch_text(url: str, tls: TLSFiles, timeout: float) -> str:
    """GET <client URL>/metrics within `timeout`; errors are EtcdErrors naming the URL."""
    ep = dial(url)

    async def get() -> bytes:
        context = ssl_context(tls) if ep.tls else None
        reader, writer = await asyncio.open_connection(ep.host, ep.port, ssl=context,
                                                       server_hostname=ep.host if context else None)
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {ep.host}:{ep.port}\r\nAccept: text/plain\r\n\r\n".encode())
            await writer.drain()
            body = b""
            while chunk := await reader.read(65536):  # HTTP/1.0: the server closes after the body
                body += chunk
                if len(body) > MAX_BODY:
                    raise EtcdError(f"/metrics is larger than {MAX_BODY} bytes", ep.url)
            return body
        finally:
            writer.close()

    try:
        raw = await asyncio.wait_for(get(), timeout)
    except TimeoutError:
        raise EtcdTimeout(f"/metrics: no answer within {timeout:g}s", ep.url) from None
    except ConnectionRefusedError:
        raise EtcdUnavailable("/metrics: connection refused (member down?)", ep.url) from None
    except (OSError, ssl.SSLError) as e:
        raise EtcdUnavailable(f"/metrics: {e.strerror or e}" if isinstance(e, OSError) else f"/metrics: {e}",
                              ep.url) from None
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200 " not in f"{status} ":
        raise EtcdError(f"/metrics answered {status[:80] or 'nothing'}", ep.url)
    return body.decode(errors="replace")


async def member_metrics(url: str, tls: TLSFiles, timeout: float) -> MemberMetrics:
    text = await fetch_text(url, tls, timeout)
    try:
        return parse_metrics(text)
    except ValueError as e:
        raise EtcdError(f"/metrics does not parse: {e}", url) from None


async def cluster_metrics(client: EtcdClient, health: ClusterHealth, timeout: float | None = None, *,
                          for_quota: bool = False) -> dict[int, MemberMetrics | str]:
    """Every reachable member's figures at once, or why they could not be read, by member ID. `for_quota`: only
    the members whose Status does not say their quota (before etcd 3.6): a /metrics page is some 200 kB, and
    over a far link its transfer costs several round trips."""
    timeout = timeout or client.timeout

    async def one(urls: tuple[str, ...]) -> MemberMetrics | str:
        try:
            _, found = await first_success([member_metrics(u, client.tls, timeout) for u in urls],
                                           fatal=lambda e: not isinstance(e, EtcdError))
        except AllFailed as e:
            return "; ".join(dict.fromkeys(err.message if isinstance(err, EtcdError) else str(err)
                                           for err in e.errors)) or "no client URL"
        return found

    members = [h for h in health.members if h.status is not None and h.member.client_urls
               and not (for_quota and h.status.db_size_quota)]
    answers = await asyncio.gather(*(one(h.member.client_urls) for h in members))
    return {h.member.id: a for h, a in zip(members, answers, strict=True)}
