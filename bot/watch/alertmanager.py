"""Alertmanager's alerts as the watch's findings: the webhook's payload (version 4) read and checked,
each alert filed under the cluster whose `alert_labels` it carries, kept in the store, and turned into
the finding of the bot's own condition of the same meaning, with the bot's next command.

Any replica may receive a delivery (`receive`): it only records each alert's newest state in the shared
store, one guarded write per alert, so a redelivery (the same fingerprint and state) changes nothing.
The leader's watch reads the firing ones every round (`findings`, pure) and merges them with its own:
one message per condition, whichever source saw it first, with who saw it. A known alert name maps to a
condition (`KNOWN`); any other name is posted plainly, with its summary and runbook link.

The suggestion is never a command the bot would refuse: etcdMembersDown names the members the bot sees
down (with the `/etcd replace` template), and etcdInsufficientMembers suggests a restore only when the
bot itself sees the quorum lost; when it reaches no member, the message says that instead.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from bot.config import ClusterConfig, Config
from bot.domain.record import ReceivedAlert
from bot.ops.context import BotContext
from bot.watch.conditions import (
    ALERTMANAGER,
    Condition,
    Facts,
    Finding,
    member_down,
    quorum_lost,
    register,
    worst,
)
from bot.watch.mixin import SUBJECTS

log = logging.getLogger(__name__)
MAX_BODY = 1024 * 1024   # bytes: a delivery is a few kB; Alertmanager's max_alerts bounds its size
UNKNOWN = "alertmanager"  # the condition of an alert whose name the bot does not know
LOGGED_KEEP = 1000        # unmatched alerts remembered as logged (each is logged once)

# Alert names of etcd's mixin and the bot's condition each means.
KNOWN = {"etcdMembersDown": "member_down", "etcdInsufficientMembers": "quorum_lost", "etcdNoLeader": "no_leader",
         "etcdHighNumberOfLeaderChanges": "leader_churn", "etcdHighNumberOfFailedGRPCRequests": "grpc_failed",
         "etcdGRPCRequestsSlow": "grpc_slow", "etcdMemberCommunicationSlow": "peer_rtt",
         "etcdHighNumberOfFailedProposals": "proposals_failed", "etcdHighFsyncDurations": "wal_fsync",
         "etcdHighCommitDurations": "backend_commit", "etcdDatabaseQuotaLowSpace": "quota",
         "etcdExcessiveDatabaseGrowth": "db_growth", "etcdDatabaseHighFragmentationRatio": "fragmentation"}
SUBJECT = {**SUBJECTS, "quorum_lost": "cluster", "leader_churn": "leader", "quota": "database size"}
NEXT = {"no_leader": ("status",), "leader_churn": ("perf",), "grpc_failed": ("status", "perf"), "grpc_slow": ("perf",),
        "peer_rtt": ("perf",), "proposals_failed": ("perf", "status"), "wal_fsync": ("perf",),
        "backend_commit": ("perf",), "quota": ("defrag",), "db_growth": ("status",), "fragmentation": ("defrag",)}

Key = tuple[str, str]


class BadPayload(ValueError):
    """The body is not Alertmanager's webhook payload (version 4); one line saying why."""


# ---------------------------------------------------------------- the payload

_FRACTION = re.compile(r"(\.\d{6})\d+")


def _time(value: object, key: str) -> float | None:
    """An RFC 3339 time as Unix time; None for Go's zero time (an alert still firing has no end)."""
    if not isinstance(value, str):
        raise BadPayload(f"{key} is not a time")
    try:
        when = dt.datetime.fromisoformat(_FRACTION.sub(r"\1", value.replace("Z", "+00:00")))
    except ValueError:
        raise BadPayload(f"{key} is not an RFC 3339 time") from None
    if when.tzinfo is None:
        raise BadPayload(f"{key} has no time zone")
    return None if when.year <= 1 else when.timestamp()


def _strings(value: object, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadPayload(f"{key} is not an object of strings")
    return dict(value)


def parse(body: bytes) -> list[ReceivedAlert]:
    """The alerts of a webhook delivery (under no cluster yet); BadPayload when it is not Alertmanager's version 4."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadPayload("the body is not JSON") from None
    if not isinstance(doc, dict):
        raise BadPayload("the body is not a JSON object")
    if doc.get("version") != "4":
        raise BadPayload(f"version {str(doc.get('version'))[:20]!r} is not Alertmanager's webhook version 4")
    alerts = doc.get("alerts")
    if not isinstance(alerts, list):
        raise BadPayload("alerts is not a list")
    out = []
    for i, a in enumerate(alerts):
        where = f"alerts[{i}]"
        if not isinstance(a, dict):
            raise BadPayload(f"{where} is not an object")
        status = a.get("status")
        if status not in ("firing", "resolved"):
            raise BadPayload(f"{where}.status is not firing or resolved")
        labels = _strings(a.get("labels"), f"{where}.labels")
        annotations = _strings(a.get("annotations", {}), f"{where}.annotations")
        starts_at = _time(a.get("startsAt"), f"{where}.startsAt")
        if starts_at is None:
            raise BadPayload(f"{where}.startsAt is the zero time")
        fingerprint = a.get("fingerprint") or hashlib.sha256(
            json.dumps(sorted(labels.items())).encode()).hexdigest()[:16]
        if not isinstance(fingerprint, str) or len(fingerprint) > 64:
            raise BadPayload(f"{where}.fingerprint is not a fingerprint")
        ends_at = _time(a.get("endsAt", "0001-01-01T00:00:00Z"), f"{where}.endsAt") if status == "resolved" else None
        out.append(ReceivedAlert("", fingerprint, labels.get("alertname", ""), status, starts_at, ends_at, labels,
                                 annotations))
    return out


def owners(config: Config, labels: Mapping[str, str]) -> list[ClusterConfig]:
    """The clusters whose alert_labels the alert's labels all carry."""
    return [c for c in config.clusters if all(labels.get(k) == v for k, v in c.alert_match.items())]


# ---------------------------------------------------------------- receiving

@dataclass
class Receipt:
    """What one delivery changed: alerts filed (changed: a new state), redelivered, matching no cluster."""

    changed: int = 0
    repeated: int = 0
    unmatched: int = 0
    clusters: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, int]:
        return {"changed": self.changed, "repeated": self.repeated, "unmatched": self.unmatched}


_logged: dict[str, None] = {}   # unmatched fingerprints already logged (insertion ordered, the oldest dropped)


def _unmatched(ctx: BotContext, alert: ReceivedAlert, matched: list[ClusterConfig]) -> None:
    ctx.metrics.alertmanager_unmatched.inc()
    if alert.fingerprint in _logged:
        return
    _logged[alert.fingerprint] = None
    while len(_logged) > LOGGED_KEEP:
        del _logged[next(iter(_logged))]
    why = (f"it carries the alert_labels of clusters {', '.join(c.name for c in matched)}" if matched
           else "no cluster's alert_labels are all among its labels")
    log.warning("alertmanager: alert matches no cluster, not posted; set [[clusters]] alert_labels",
                extra={"ctx_alert": alert.alertname, "ctx_labels": dict(alert.labels), "ctx_why": why})


async def receive(ctx: BotContext, alerts: Sequence[ReceivedAlert]) -> Receipt:
    """File each alert under its cluster in the store (StoreError when it cannot; Alertmanager retries), and
    wake this replica's watch of a cluster whose alerts changed (another replica's leader sees them within
    a second)."""
    receipt = Receipt()
    for alert in alerts:
        matched = owners(ctx.config, alert.labels)
        if len(matched) != 1:
            receipt.unmatched += 1
            _unmatched(ctx, alert, matched)
            continue
        cluster = matched[0].name
        if await ctx.store.receive_alert(replace(alert, cluster=cluster)):
            receipt.changed += 1
            receipt.clusters.add(cluster)
        else:
            receipt.repeated += 1
    log.info("alertmanager: delivery received", extra={"ctx_changed": receipt.changed,
                                                       "ctx_repeated": receipt.repeated,
                                                       "ctx_unmatched": receipt.unmatched})
    if ctx.watch is not None:
        for cluster in receipt.clusters:
            ctx.watch.received(cluster)
    return receipt


# ---------------------------------------------------------------- as findings (pure)

_LINK = re.compile(r"https?://[^\s<>|]+")


def _links(alerts: Sequence[ReceivedAlert]) -> tuple[tuple[str, str], ...]:
    found = {}
    for a in alerts:
        url = a.annotations.get("runbook_url", "")
        if _LINK.fullmatch(url):
            found[url] = a.alertname or "runbook"
    return tuple((text, url) for url, text in found.items())


def _instance(f: Facts, alert: ReceivedAlert) -> str:
    """The member an alert's `instance` label is (its client URL's host:port), or the label as it is."""
    instance = alert.labels.get("instance", "")
    for h in f.health.members if f.health else ():
        if any(url.split("://", 1)[-1].rstrip("/") == instance for url in h.member.client_urls):
            return h.member.name or h.member.hex_id
    return instance


def _said(f: Facts, alerts: Sequence[ReceivedAlert]) -> tuple[tuple[str, str], ...]:
    """Each alert as a figure: its name, severity, member and since when; its description."""
    figures = []
    for a in alerts:
        where = _instance(f, a)
        head = " · ".join(p for p in (a.alertname, a.labels.get("severity", ""), where) if p)
        since = dt.datetime.fromtimestamp(a.starts_at, dt.UTC).strftime("%H:%M UTC")
        said = a.annotations.get("description") or a.annotations.get("summary") or "firing"
        figures.append((f"Alertmanager: {head}", f"{said} (since {since})"))
    return tuple(figures)


def _plain(f: Facts, kind: str, subject: str, alerts: Sequence[ReceivedAlert], summary: str,
           suggestions: tuple[str, ...]) -> Finding:
    return Finding(kind, subject, summary, figures=_said(f, alerts), suggestions=suggestions,
                   members=tuple(dict.fromkeys(m for m in (_instance(f, a) for a in alerts) if m)),
                   severity=worst(*(a.labels.get("severity", "") for a in alerts)),
                   sources=tuple(dict.fromkeys(ALERTMANAGER + a.alertname for a in alerts)), links=_links(alerts))


def _summary(alerts: Sequence[ReceivedAlert]) -> str:
    a = alerts[0]
    return a.annotations.get("summary") or a.annotations.get("description") or f"{a.alertname or 'an alert'} is firing"


def _tagged(finding: Finding, alerts: Sequence[ReceivedAlert]) -> Finding:
    """The watch's own finding, as Alertmanager's alerts see it too."""
    return replace(finding, severity=worst(finding.severity, *(a.labels.get("severity", "") for a in alerts)),
                   sources=tuple(dict.fromkeys(ALERTMANAGER + a.alertname for a in alerts)), links=_links(alerts))


def _members_down(f: Facts, alerts: Sequence[ReceivedAlert], attached: dict[str, set[Key]]) -> list[Finding]:
    """etcdMembersDown (it names no member) on each member the bot sees down, with its `/etcd replace`; and on
    the members it was on while it fires, so the bot seeing a member back first does not split the message."""
    name = f.cluster.name
    down = {d.subject: d for d in member_down(f) or []}
    keys: set[Key] = {("member_down", subject) for subject in down}
    for a in alerts:
        keys |= attached.get(a.fingerprint, set())
    if not keys:
        keys = {("member_down", "cluster")}
    for a in alerts:
        attached[a.fingerprint] = set(keys)
    out = []
    for _, subject in sorted(keys):
        if subject in down:
            out.append(_tagged(down[subject], alerts))
        elif f.health is None:
            out.append(_plain(f, "member_down", subject, alerts,
                              f"{_summary(alerts)} The bot reaches no member of {name}, so it cannot tell which.",
                              (f"/etcd status {name}",)))
        else:
            answering = "every member answers the bot" if subject == "cluster" else f"{subject} answers the bot now"
            out.append(_plain(f, "member_down", subject, alerts, f"{_summary(alerts)} ({answering}: a member "
                              "cut from its peers, or one Prometheus cannot scrape)", (f"/etcd status {name}",)))
    return out


def _quorum(f: Facts, alerts: Sequence[ReceivedAlert]) -> Finding:
    """etcdInsufficientMembers: the bot's own restore suggestion only when it sees the quorum lost itself."""
    name = f.cluster.name
    own = quorum_lost(f)
    if own:
        return _tagged(own[0], alerts)
    if f.health is None:
        why = (f"the bot reaches no member of {name}, so it cannot confirm it (a restore needs that evidence): "
               "check the members from their hosts, and the bot's network and client certificate")
    else:
        q = f.health.quorum
        why = (f"but {q.healthy} of {q.voting} voters answer the bot healthy ({q.needed} needed): check what "
               "Prometheus sees")
    return _plain(f, "quorum_lost", "cluster", alerts, f"{_summary(alerts)} ({why})", (f"/etcd status {name}",))


def findings(f: Facts, firing: Sequence[ReceivedAlert], attached: dict[str, set[Key]]) -> list[Finding]:
    """The findings of the alerts firing for the cluster, one per condition (several alerts of one condition,
    each member's or each severity's, are one finding). `attached` (fingerprint: keys) is the watch's memory of
    where etcdMembersDown was filed; it is updated here."""
    by_kind: dict[str, list[ReceivedAlert]] = {}
    for a in firing:
        by_kind.setdefault(KNOWN.get(a.alertname, UNKNOWN), []).append(a)
    out: list[Finding] = []
    for kind, alerts in by_kind.items():
        if kind == "member_down":
            out += _members_down(f, alerts, attached)
        elif kind == "quorum_lost":
            out.append(_quorum(f, alerts))
        elif kind == UNKNOWN:
            for name in sorted({a.alertname for a in alerts}):
                named = [a for a in alerts if a.alertname == name]
                out.append(_plain(f, UNKNOWN, name or "unnamed", named, _summary(named), ()))
        else:
            out.append(_plain(f, kind, SUBJECT[kind], alerts, _summary(alerts),
                              tuple(f"/etcd {command} {f.cluster.name}" for command in NEXT[kind])))
    return out


register(Condition(UNKNOWN, "alert", lambda f: []))   # named here; its findings come from Alertmanager only
