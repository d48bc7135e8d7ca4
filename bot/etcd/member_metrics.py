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
import math
import ssl
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from bot.domain.cluster import MemberMetrics, TLSFiles
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


def parse_metrics(text: str) -> MemberMetrics:
    """The figures out of a Prometheus text page (raises ValueError on a page that does not parse)."""
    samples: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))

    def one(name: str) -> int | None:
        found = samples.get(name)
        return int(sum(v for _, v in found)) if found else None

    def p99(name: str) -> float | None:
        found = samples.get(f"{name}_bucket")
        if not found:
            return None
        return histogram_quantile(0.99, ((float(labels["le"]), v) for labels, v in found if "le" in labels))

    gate = next((v for labels, v in samples.get("etcd_server_feature_enabled", ())
                 if labels.get("name") == STOP_GRPC_ON_DEFRAG), None)
    return MemberMetrics(quota_bytes=one("etcd_server_quota_backend_bytes"),
                         wal_fsync_p99=p99("etcd_disk_wal_fsync_duration_seconds"),
                         backend_commit_p99=p99("etcd_disk_backend_commit_duration_seconds"),
                         leader_changes=one("etcd_server_leader_changes_seen_total"),
                         slow_applies=one("etcd_server_slow_apply_total"),
                         proposals_pending=one("etcd_server_proposals_pending"),
                         proposals_failed=one("etcd_server_proposals_failed_total"),
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
