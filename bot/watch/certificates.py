"""The certificate condition: a member's serving certificate expires within `cert_warning` (default 14 days).

The probe reads every https client and peer URL's certificate in the TLS
handshake (bot/etcd/certs.py) once an hour per cluster (PROBE_EVERY):
certificates change rarely, and a handshake per URL per round would cost more
than the status fan-out itself. A URL that did not answer keeps its last
reading, so a member that is down for a moment does not hide its expiry;
while no handshake succeeds at all, the probe is tried again every round.
One alert per cluster lists every certificate that expires soon (they are
often issued together), each with its URL, date and days left; renewing a
certificate is no `/etcd` command, so none is suggested.
"""
from __future__ import annotations

from bot.config import ClusterConfig
from bot.domain.cluster import ClusterHealth, TLSFiles
from bot.etcd.certs import CertReading, expiring, read_certs, remaining, tls_urls
from bot.ops.context import BotContext
from bot.watch.conditions import Condition, Facts, Finding, register

PROBE = "certificates"
PROBE_EVERY = 3600.0   # seconds: once an hour per cluster
# The last reading of each URL, by cluster: a URL that fails a round keeps it (see the module docstring).
_LAST: dict[str, dict[str, CertReading]] = {}


async def fetch(ctx: BotContext, cluster: ClusterConfig, health: ClusterHealth | None) -> list[CertReading] | None:
    """Every https client and peer URL of the members the health check saw, at once, under the cluster's
    deadline. None (asked again next round) when the cluster did not answer or no handshake succeeded."""
    if health is None:
        return None
    targets = tls_urls(h.member for h in health.members)
    if not targets:
        return []
    readings = await read_certs(targets, TLSFiles(cluster.cacert, cluster.cert, cluster.key),
                                cluster.timeout_seconds, ctx.clock.now())
    last = _LAST.get(cluster.name, {})
    kept = [r if r.cert is not None or r.url not in last else last[r.url] for r in readings]
    _LAST[cluster.name] = {r.url: r for r in kept}
    return kept if any(r.cert for r in kept) else None


def certificate(f: Facts) -> list[Finding] | None:
    """One alert for all of a cluster's certificates that expire soon (they are often issued together):
    the soonest first, a line each with the URL, the date, the margin, the subject and the names."""
    readings: list[CertReading] | None = f.extra.get(PROBE)
    if readings is None:
        return None  # not probed yet
    soon = [(r, r.cert) for r in expiring(readings, f.now, f.cluster.watch.cert_warning_seconds) if r.cert]
    if not soon:
        return []
    first, cert = soon[0]
    who = "peers" if first.kind == "peer" else "clients"
    more = f"; {len(soon) - 1} more within {_days(f.cluster.watch.cert_warning_seconds)}" if soon[1:] else ""
    if cert.seconds_left(f.now) < 0:
        what = f"expired {cert.expires} ({remaining(cert, f.now)}): its {who} refuse it"
    else:
        what = f"expires {cert.expires} ({remaining(cert, f.now)}): renew it before its {who} refuse it"
    summary = f"{first.member}'s {first.kind} certificate {what}{more}"
    figures = tuple((f"{r.member} {r.kind} {r.url}",
                     f"{c.expires} ({remaining(c, f.now)}) · {c.subject} · {', '.join(c.sans) or 'no SAN'}")
                    for r, c in soon)
    return [Finding("certificate", "serving certificates", summary, figures=figures,
                    members=tuple(dict.fromkeys(r.member for r, _ in soon)))]


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds / 3600:g} h"


register(Condition("certificate", "certificate", certificate))
