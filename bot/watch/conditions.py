"""Which conditions are open, given one round's facts (pure).

A condition is a small function from `Facts` to the findings it sees this
round: an empty list when all is well, `None` when the facts cannot tell (the
cluster did not answer, so whether a member is down is unknown: an alert
already open then stays open, and nothing opens). Each finding names its
condition kind and subject (the key an alert is tracked by), one line on what
is wrong, the figures measured, and the next commands ready to paste.

To add a condition: write `def my_check(f: Facts) -> list[Finding] | None`,
then `register(Condition("my_kind", "my title", my_check))` in a module of
bot/watch that bot/watch/watcher.py imports (the watcher asks every registered
condition each round; the message's headline is the title in capitals, then
the subject). Keep it pure: no I/O, `f.now` for the time. A condition that
needs a figure the status fan-out does not give (a certificate's expiry, the
last upload) gets it from a probe: `register_probe(Probe("my_probe", fetch,
every_seconds))` runs `await fetch(ctx, cluster, health)` at most once per
`every_seconds` and hands its last result over as `f.extra["my_probe"]`
(absent until the probe first succeeds: return None then). Tests: build a
Facts by hand (tests/test_watch_conditions.py shows how).

A check that raises costs its own verdict only: it is unknown that round (its
alert stands still) and the watcher logs it once and counts it. A check over
the members goes through `per_member`, so one member's failure costs that
member's finding, not the others'. Read member URLs with bot.domain.urls.read_url
(total): etcd stores URLs the bot cannot use.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bot.config import ClusterConfig
from bot.domain import shell
from bot.domain.cluster import ClusterHealth, MemberHealth, MemberMetrics, member_labels
from bot.domain.plan import PlanKind, PlanState
from bot.domain.record import PlanRecord
from bot.domain.snapshot import SnapshotRecord
from bot.domain.urls import Endpoint, read_url, shown_urls
from bot.output.units import humanize_bytes
from bot.watch.readings import Window

LEADER_CHURN_MAX = 3              # more leader changes than this within LEADER_WINDOW is churn
LEADER_WINDOW = 300.0             # seconds


@dataclass(frozen=True)
class Facts:
    """What one round of the watch knows about one cluster."""

    cluster: ClusterConfig
    now: float                                            # time.time() of the round
    health: ClusterHealth | None                          # None: no member gave a member list
    error: str | None = None                              # why health is None
    quotas: Mapping[int, int] = field(default_factory=dict)   # backend quota bytes by member ID (from /metrics)
    newest_snapshot: SnapshotRecord | None = None         # the newest verified, unpruned catalog row
    leader_changes: int = 0                               # leader changes seen within LEADER_WINDOW
    extra: Mapping[str, Any] = field(default_factory=dict)  # the probes' last results, by probe name
    metrics: Mapping[int, MemberMetrics] = field(default_factory=dict)  # this round's /metrics by member ID
    windows: Mapping[int, Window] = field(default_factory=dict)          # readings over [clusters.watch] window
    sizes: Mapping[int, tuple[tuple[float, int], ...]] = field(default_factory=dict)  # (time, db size) over horizon

    def label(self, member_id: int | str) -> str:
        """A member's name (its hex ID before it has one, or one the round did not list), by ID or hex ID."""
        wanted = int(member_id, 16) if isinstance(member_id, str) else member_id
        found = next((h for h in (self.health.members if self.health else ()) if h.member.id == wanted), None)
        return member_label(found) if found else f"{wanted:016x}"


WATCH = "watch"                 # a finding's source: the bot's own checks
ALERTMANAGER = "alertmanager:"  # ... or Alertmanager, with the alert's name after the colon
SEVERITIES = ("", "warning", "critical")   # in order; "" for a condition without levels


@dataclass(frozen=True)
class Finding:
    """One open condition as seen this round, by the watch or by Alertmanager (or both, merged)."""

    kind: str                                   # the condition's kind
    subject: str                                # a member, an alarm, "cluster": (kind, subject) is the alert's key
    summary: str                                # one line on what is wrong
    figures: tuple[tuple[str, str], ...] = ()   # (name, value), current
    suggestions: tuple[str, ...] = ()           # commands, plain (the renderer escapes and code-formats them)
    members: tuple[str, ...] = ()               # names and hex IDs of the members it is about (for hold-back)
    severity: str = ""                          # one of SEVERITIES
    sources: tuple[str, ...] = (WATCH,)         # who sees it: WATCH, ALERTMANAGER + alert name
    links: tuple[tuple[str, str], ...] = ()     # (text, http(s) URL): an alert's runbook
    offers: tuple[str, ...] = ()                # the way out its message offers as a button: "replace", "restore"

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.subject

    @property
    def watched(self) -> bool:
        """The bot's own checks see it (else only Alertmanager does)."""
        return WATCH in self.sources

    @property
    def alerted(self) -> bool:
        """Alertmanager sees it: its rule's `for:` already waited, so the watch's grace does not apply."""
        return any(s.startswith(ALERTMANAGER) for s in self.sources)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "summary": self.summary,
                "figures": [list(f) for f in self.figures], "suggestions": list(self.suggestions),
                "members": list(self.members), "severity": self.severity, "sources": list(self.sources),
                "links": [list(link) for link in self.links], "offers": list(self.offers)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Finding:
        return cls(kind=data["kind"], subject=data["subject"], summary=data.get("summary", ""),
                   figures=tuple((str(a), str(b)) for a, b in data.get("figures", ())),
                   suggestions=tuple(data.get("suggestions", ())), members=tuple(data.get("members", ())),
                   severity=str(data.get("severity", "")), sources=tuple(data.get("sources", (WATCH,))),
                   links=tuple((str(a), str(b)) for a, b in data.get("links", ())),
                   offers=tuple(data.get("offers", ())))


def worst(*severities: str) -> str:
    return max(severities, key=lambda s: SEVERITIES.index(s) if s in SEVERITIES else 0, default="")


def merge(findings: Iterable[Finding]) -> list[Finding]:
    """One finding per key: the watch's figures and suggestions (its own evidence, this round) with every
    source that sees it, the worst severity, and Alertmanager's links. The way out it offers (a button) is
    the watch's: only its evidence of quorum says whether a replacement would be refused."""
    out: dict[tuple[str, str], Finding] = {}
    for f in findings:
        had = out.get(f.key)
        if had is None:
            out[f.key] = f
            continue
        first, second = (had, f) if had.watched or not f.watched else (f, had)
        out[f.key] = replace(first, severity=worst(had.severity, f.severity),
                             sources=tuple(dict.fromkeys([*first.sources, *second.sources])),
                             links=tuple(dict.fromkeys([*first.links, *second.links])),
                             members=tuple(dict.fromkeys([*first.members, *second.members])))
    return list(out.values())


Check = Callable[[Facts], "list[Finding] | None"]


@dataclass(frozen=True)
class Condition:
    kind: str
    title: str          # how messages name it ("member down")
    check: Check
    runbook: str | None = None   # etcd's guide to it: its message links there


CONDITIONS: dict[str, Condition] = {}


def register(condition: Condition) -> Condition:
    CONDITIONS[condition.kind] = condition
    return condition


def title(kind: str) -> str:
    found = CONDITIONS.get(kind)
    return found.title if found else kind.replace("_", " ")


def runbook(kind: str) -> str | None:
    found = CONDITIONS.get(kind)
    return found.runbook if found else None


@dataclass(frozen=True)
class Failure:
    """A condition (or one subject of it) whose check raised: a bug, or facts it did not expect."""

    kind: str
    subject: str | None     # None: the whole condition
    error: Exception

    @property
    def key(self) -> tuple[str, str | None]:
        return self.kind, self.subject


class Partly(Exception):
    """Raised by a condition that failed for some subjects only: the findings of the others, and the failures."""

    def __init__(self, found: list[Finding], failed: dict[str, Exception]):
        super().__init__(f"failed for {', '.join(failed)}")
        self.found, self.failed = found, failed


@dataclass
class Evaluation:
    """One round's verdicts. A failed check is unknown, not clear: its alerts stand still."""

    findings: list[Finding] = field(default_factory=list)
    unknown: set[str] = field(default_factory=set)                   # kinds that could not tell this round
    unsure: set[tuple[str, str]] = field(default_factory=set)        # (kind, subject) whose check failed
    failures: list[Failure] = field(default_factory=list)


def evaluate(facts: Facts) -> Evaluation:
    """Every registered condition's findings, each condition on its own: one that raises is unknown this round
    and the others go on."""
    out = Evaluation()
    for condition in CONDITIONS.values():
        try:
            found = condition.check(facts)
        except Partly as p:
            out.findings += p.found
            out.unsure |= {(condition.kind, subject) for subject in p.failed}
            out.failures += [Failure(condition.kind, subject, e) for subject, e in p.failed.items()]
            continue
        except Exception as e:   # a condition's bug costs its own verdict, not the round
            out.unknown.add(condition.kind)
            out.failures.append(Failure(condition.kind, None, e))
            continue
        if found is None:
            out.unknown.add(condition.kind)
        else:
            out.findings += found
    return out


def per_member(health: ClusterHealth, one: Callable[[MemberHealth], Finding | None]) -> list[Finding]:
    """`one` for every member, each on its own: a member whose check raises costs its own finding (Partly)."""
    found: list[Finding] = []
    failed: dict[str, Exception] = {}
    for h in health.members:
        try:
            finding = one(h)
        except Exception as e:   # reported through Partly
            failed[member_label(h)] = e
            continue
        if finding is not None:
            found.append(finding)
    if failed:
        raise Partly(found, failed)
    return found


# ---------------------------------------------------------------- the conditions

def member_label(h: MemberHealth) -> str:
    return h.member.name or h.member.hex_id


def next_name(name: str, taken: set[str]) -> str:
    """A free name for a replacement: member1 -> member4 when member2 and member3 exist; else etcd-a -> etcd-a-new."""
    m = re.fullmatch(r"(.*?)(\d+)", name)
    if not m:
        candidate = f"{name or 'member'}-new"
        return candidate if candidate not in taken else f"{candidate}-2"
    prefix = m.group(1)
    numbers = [int(t[len(prefix):]) for t in taken | {name} if t.startswith(prefix) and t[len(prefix):].isdigit()]
    return f"{prefix}{max(numbers) + 1}"


def new_peer_url(peer_urls: tuple[str, ...]) -> str:
    """The failed member's peer URL with the host left for a person to fill in (etcd's defaults where its
    own URL is unusable)."""
    found = read_url(peer_urls[0]) if peer_urls else None
    scheme, port = (found.scheme, found.port) if isinstance(found, Endpoint) else ("https", 2380)
    return f"{scheme}://NEW-HOST:{port}"


def member_down(f: Facts) -> list[Finding] | None:
    """A member that does not answer. While quorum holds it suggests its replacement, each down member with a
    new name of its own; once quorum is lost a replacement would be refused (etcd changes no membership
    without quorum), so it suggests none: the quorum-lost alert offers the restore."""
    health = f.health
    if health is None:
        return None
    name = f.cluster.name
    taken = {h.member.name for h in health.members if h.member.name}
    labels = member_labels((h.member.hex_id, h.member.name) for h in health.members)
    replaceable = health.quorum.ok

    def down(h: MemberHealth) -> Finding | None:
        if h.reachable or h.refused or h.defragmenting:  # it answers (refusing the bot, or busy): it is not down
            return None
        label = member_label(h)
        suggestions: tuple[str, ...] = (f"/etcd status {name}",)
        if replaceable:
            new = next_name(h.member.name, taken)
            taken.add(new)   # the next member down gets a name of its own
            suggestions = (shell.command(["/etcd", "replace", label, new, new_peer_url(h.member.peer_urls),
                                          "--cluster", name]), *suggestions)
        return Finding("member_down", label, f"{h.problem or 'unreachable'}",
                       figures=(("member", labels[h.member.hex_id]),
                                ("peer URLs", shown_urls(h.member.peer_urls)),
                                ("quorum", _quorum(health))),
                       suggestions=suggestions, members=(h.member.name, h.member.hex_id),
                       offers=("replace",) if replaceable else ())
    return per_member(health, down)


def _quorum(health: ClusterHealth) -> str:
    q = health.quorum
    return f"{q.healthy} of {q.voting} voters healthy, {q.needed} needed"


def unreachable(f: Facts) -> list[Finding] | None:
    """No member answers the bot. Not proof of a quorum loss (a rotated CA, a cut network and a dead cluster look
    the same from here), so it suggests looking, never a restore (which the quorum gate would refuse)."""
    if f.health is not None:
        return []
    name = f.cluster.name
    return [Finding("unreachable", "cluster",
                    f"no member answered the bot: {f.error or 'unreachable'}; this is not proof that {name} lost "
                    "quorum: check it from its hosts, and the bot's network and client certificate",
                    suggestions=(f"/etcd status {name}",))]


def quorum_lost(f: Facts) -> list[Finding] | None:
    name = f.cluster.name
    if f.health is None:
        return None   # nothing answers: `unreachable` says so; whether quorum is lost cannot be told from here
    if f.health.quorum.ok or not f.health.quorum.known:
        return []
    snap = f.newest_snapshot
    restore = shell.command(["/etcd", "restore", snap.path.rsplit("/", 1)[-1], "--cluster", name] if snap
                            else ["/etcd", "snapshots", name])
    figures = [("newest verified snapshot", f"{snap.path.rsplit('/', 1)[-1]} (revision {snap.revision})"
                if snap else "none recorded")]
    figures.insert(0, ("quorum", _quorum(f.health)))
    return [Finding("quorum_lost", "cluster", "too few healthy voters: etcd refuses every write",
                    figures=tuple(figures),
                    suggestions=(restore, f"/etcd status {name}"), offers=("restore",))]


ALARM_NEXT = {"NOSPACE": "/etcd defrag {}", "CORRUPT": "/etcd consistency {}"}
ALARM_WHY = {"NOSPACE": "the database reached its quota: etcd refuses writes",
             "CORRUPT": "a member's data differs from the others'"}


def alarm(f: Facts) -> list[Finding] | None:
    if f.health is None:
        return None
    names = {h.member.id: member_label(h) for h in f.health.members}
    kinds: dict[str, list[str]] = {}
    for a in f.health.alarms:
        kinds.setdefault(a.kind, []).append(names.get(a.member_id, f"{a.member_id:016x}"))
    return [Finding("alarm", kind, ALARM_WHY.get(kind, f"etcd raised the {kind} alarm"),
                    figures=(("raised on", ", ".join(sorted(members))),),
                    suggestions=(ALARM_NEXT.get(kind, "/etcd alarms {}").format(f.cluster.name),
                                 f"/etcd alarms {f.cluster.name}"))
            for kind, members in sorted(kinds.items())]


def quota(f: Facts) -> list[Finding] | None:
    if f.health is None:
        return None
    watch = f.cluster.watch
    full = []
    for h in f.health.members:
        limit = f.quotas.get(h.member.id)
        if h.status is None or not limit:
            continue
        share = h.status.db_size / limit
        if share > watch.quota_warning:
            full.append((member_label(h), share, f"{humanize_bytes(h.status.db_size)} of {humanize_bytes(limit)} "
                                                 f"({share * 100:.0f} %)"))
    if not full:
        return []
    critical = [m for m, share, _ in full if share > watch.quota_critical]
    over = watch.quota_critical if critical else watch.quota_warning
    return [Finding("quota", "database size",
                    f"above {over * 100:.0f} % of the quota on {', '.join(critical or [m for m, _, _ in full])}: "
                    "defragment before etcd raises NOSPACE",
                    figures=tuple((m, shown) for m, _, shown in full), suggestions=(f"/etcd defrag {f.cluster.name}",),
                    members=tuple(m for m, _, _ in full), severity="critical" if critical else "warning")]


def leader_churn(f: Facts) -> list[Finding] | None:
    if f.health is None:
        return None
    if f.leader_changes <= LEADER_CHURN_MAX:
        return []
    return [Finding("leader_churn", "leader",
                    f"{f.leader_changes} leader changes in {LEADER_WINDOW / 60:g} minutes: slow disks or network?",
                    figures=((f"leader changes in the last {LEADER_WINDOW / 60:g} min", str(f.leader_changes)),),
                    suggestions=(f"/etcd perf {f.cluster.name}",))]


ETCD_DOCS = "https://etcd.io/docs/v3.5"
register(Condition("member_down", "member down", member_down,
                   f"{ETCD_DOCS}/op-guide/runtime-configuration/#replace-a-failed-machine"))
register(Condition("quorum_lost", "quorum lost", quorum_lost, f"{ETCD_DOCS}/op-guide/recovery/"))
register(Condition("unreachable", "unreachable", unreachable))
register(Condition("alarm", "alarm", alarm, f"{ETCD_DOCS}/op-guide/maintenance/#space-quota"))
register(Condition("quota", "quota", quota, f"{ETCD_DOCS}/op-guide/maintenance/#space-quota"))
register(Condition("leader_churn", "leader churn", leader_churn, f"{ETCD_DOCS}/tuning/"))


# ---------------------------------------------------------------- quiet while busy

def expected(plan: PlanRecord | None, finding: Finding) -> bool:
    """Whether the bot's own plan causes `finding` on purpose, so it is held back:
    a replacement, the member it replaces and the one it adds (from proposal on:
    people are on it); a restore, everything once approved; a defragmentation,
    all but a quorum loss while it runs."""
    if plan is None:
        return False
    if plan.kind == PlanKind.REPLACE and plan.state in (PlanState.PROPOSED, PlanState.APPROVED, PlanState.RUNNING):
        p = plan.plan
        ours = {getattr(p, "new_name", ""), plan.new_member_id or ""}
        failed = getattr(p, "failed", None)
        if failed is not None:
            ours |= {failed.name, failed.id}
        ours.discard("")
        unstarted = not finding.members or not finding.members[0]  # the member it adds has no name until it starts
        return finding.kind == "member_down" and (bool(ours & set(finding.members)) or unstarted)
    if plan.kind == PlanKind.RESTORE and plan.state in (PlanState.APPROVED, PlanState.RUNNING):
        return True
    if plan.kind == PlanKind.DEFRAG and plan.state == PlanState.RUNNING:
        return finding.kind not in ("quorum_lost", "unreachable")
    return False
