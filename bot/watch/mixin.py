"""The conditions of etcd's monitoring mixin (the alerts kube-prometheus ships) that the watch can tell from
what it reads each round, each member's Status and /metrics, with the mixin's thresholds as
`[clusters.watch]`'s defaults. Each is one message per cluster (its subject is fixed), naming the members
it is about, so Alertmanager's alert of the same name (bot/watch/alertmanager.py) lands on the same message
whichever instance label it carries.

Rates and percentiles are over the readings of `[clusters.watch] window` (bot/watch/readings.py): until a
member has two readings, or while a histogram observed nothing in the window, the member is not judged.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from bot.domain.cluster import Buckets, MemberMetrics
from bot.output.units import humanize_bytes
from bot.watch.conditions import Condition, Facts, Finding, member_label, register
from bot.watch.readings import predicted

# The fixed subject of each condition: the watch's findings and Alertmanager's alerts meet on (kind, subject).
SUBJECTS = {"no_leader": "raft", "peer_failures": "peer network", "peer_rtt": "peer network", "grpc_failed": "gRPC",
            "grpc_slow": "gRPC", "proposals_failed": "raft", "wal_fsync": "disk", "backend_commit": "disk",
            "fragmentation": "database", "db_growth": "database size"}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.0f} s"


def _finding(f: Facts, kind: str, found: list[tuple[str, str]], summary: str, suggestions: tuple[str, ...],
             severity: str = "warning") -> list[Finding]:
    """One finding over the members `found` ((member, what is measured)); none when none is."""
    if not found:
        return []
    return [Finding(kind, SUBJECTS[kind], summary, figures=tuple(found), suggestions=suggestions,
                    members=tuple(m for m, _ in found), severity=severity)]


def _names(found: list[tuple[str, str]]) -> str:
    return ", ".join(m for m, _ in found)


def no_leader(f: Facts) -> list[Finding] | None:
    """A member that answers and has no leader: cut off from its peers when the others have one
    (etcdNoLeader). When nobody has one, an election that does not end: also no leader."""
    if f.health is None:
        return None
    if not f.health.quorum.ok:
        return []   # too few voters: quorum lost says so, with what to do
    lost = [(h, h.status) for h in f.health.members if h.status is not None and not h.status.leader]
    if not lost:
        return []
    leader = f.health.leader_id
    found = [(member_label(h), f"no leader (raft term {s.raft_term})") for h, s in lost]
    if leader is not None:
        summary = (f"{_names(found)} {'has' if len(found) == 1 else 'have'} no leader while the others follow "
                   f"{f.label(leader)}: cut off from {'its' if len(found) == 1 else 'their'} peers (the peer URL's "
                   "network or firewall); it refuses writes")
    else:
        summary = ("no member that answers has a leader: an election that does not end, or too few peers reach "
                   "each other")
    return _finding(f, "no_leader", found, summary, (f"/etcd status {f.cluster.name}",), severity="critical")


def _per_member(f: Facts, one: Callable[[Facts, int], tuple[str, str, str] | None]) -> list[tuple[str, str, str]]:
    """(member, figure, severity) for each member `one` judges."""
    out = []
    for member_id in f.windows:
        found = one(f, member_id)
        if found is not None:
            out.append(found)
    return out


def _severity(found: list[tuple[str, str, str]]) -> str:
    return "critical" if any(s == "critical" for _, _, s in found) else "warning"


def _pairs(found: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    return [(m, figure) for m, figure, _ in found]


def peer_failures(f: Facts) -> list[Finding] | None:
    """A member failing to send to peers that answer the bot (the mixin counts it in etcdMembersDown): the peer
    network between them is cut. Sends to a member the bot sees down are member down's, not this."""
    if f.health is None:
        return None
    limit = f.cluster.watch.peer_send_failures_per_second
    down = {f"{h.member.id:x}" for h in f.health.members if not h.reachable}

    def one(facts: Facts, member_id: int) -> tuple[str, str, str] | None:
        rates = {to: r for to, r in facts.windows[member_id].rates(lambda m: m.peer_send_failures).items()
                 if r > limit and to.lstrip("0") not in down}
        if not rates:
            return None
        shown = ", ".join(f"{facts.label(to)} {r:.2f}/s" for to, r in sorted(rates.items()))
        return facts.label(member_id), f"sends failing to {shown}", "warning"
    found = _per_member(f, one)
    return _finding(f, "peer_failures", _pairs(found),
                    f"{', '.join(m for m, _, _ in found)} cannot send to some peers: a member down, or the peer "
                    "network cut between them", (f"/etcd status {f.cluster.name}",))


def grpc_failed(f: Facts) -> list[Finding] | None:
    """A share of one method's gRPC requests failing with the codes the mixin counts
    (etcdHighNumberOfFailedGRPCRequests)."""
    if f.health is None:
        return None
    watch = f.cluster.watch

    def one(facts: Facts, member_id: int) -> tuple[str, str, str] | None:
        window = facts.windows[member_id]
        requests, failures = window.rates(lambda m: m.grpc_requests), window.rates(lambda m: m.grpc_failures)
        shares = {method: failures.get(method, 0.0) / r for method, r in requests.items() if r > 0}
        method, share = max(shares.items(), key=lambda kv: kv[1], default=("", 0.0))
        if share <= watch.grpc_failed_warning:
            return None
        return (facts.label(member_id), f"{share * 100:.1f} % of {method} requests failing",
                "critical" if share > watch.grpc_failed_critical else "warning")
    found = _per_member(f, one)
    return _finding(f, "grpc_failed", _pairs(found),
                    f"{', '.join(m for m, _, _ in found)} fails many gRPC requests (unavailable, deadline exceeded...)",
                    (f"/etcd status {f.cluster.name}", f"/etcd perf {f.cluster.name}"), _severity(found))


def _p99_condition(kind: str, get: Callable[[MemberMetrics], Buckets], warning: float,
                   critical: float | None, what: str, summary: str) -> Callable[[Facts], list[Finding] | None]:
    """A histogram's p99 per member over the window, above `warning` (and `critical`, when there is one)."""
    def check(f: Facts) -> list[Finding] | None:
        if f.health is None:
            return None

        def one(facts: Facts, member_id: int) -> tuple[str, str, str] | None:
            p99 = facts.windows[member_id].p99(get)
            if p99 is None or p99 <= warning:
                return None
            return (facts.label(member_id), f"{what} p99 {_ms(p99)} (over {_ms(warning)})",
                    "critical" if critical is not None and p99 > critical else "warning")
        found = _per_member(f, one)
        return _finding(f, kind, _pairs(found), summary.format(members=", ".join(m for m, _, _ in found)),
                        (f"/etcd perf {f.cluster.name}",), _severity(found))
    return check


def wal_fsync(f: Facts) -> list[Finding] | None:
    """WAL fsync p99 (etcdHighFsyncDurations): the member's disk is too slow for raft's log."""
    watch = f.cluster.watch
    return _p99_condition("wal_fsync", lambda m: m.wal_fsync, watch.wal_fsync_p99_seconds,
                          watch.wal_fsync_p99_critical_seconds, "WAL fsync",
                          "the disk of {members} is slow: raft waits for it on every write, and a slow log loses "
                          "leaders")(f)


def backend_commit(f: Facts) -> list[Finding] | None:
    """Backend commit p99 (etcdHighCommitDurations): the member's disk is too slow for its database."""
    watch = f.cluster.watch
    return _p99_condition("backend_commit", lambda m: m.backend_commit, watch.backend_commit_p99_seconds, None,
                          "backend commit", "the disk of {members} commits the database slowly")(f)


def _worst_p99(kind: str, get: Callable[[MemberMetrics], Mapping[str, Buckets]], limit: Callable[[Facts], float],
               what: str, name: Callable[[Facts, str], str], summary: str,
               next_command: str) -> Callable[[Facts], list[Finding] | None]:
    """A labelled histogram's worst p99 per member (by gRPC method, by peer) over the window, above `limit`."""
    def check(f: Facts) -> list[Finding] | None:
        if f.health is None:
            return None
        threshold = limit(f)

        def one(facts: Facts, member_id: int) -> tuple[str, str, str] | None:
            p99s = facts.windows[member_id].p99s(get)
            label, p99 = max(p99s.items(), key=lambda kv: kv[1], default=("", 0.0))
            if p99 <= threshold:
                return None
            return facts.label(member_id), f"{what} {name(facts, label)}: p99 {_ms(p99)} (over {_ms(threshold)})", ""
        found = _per_member(f, one)
        return _finding(f, kind, _pairs(found), summary.format(members=", ".join(m for m, _, _ in found)),
                        (next_command.format(f.cluster.name),))
    return check


grpc_slow = _worst_p99("grpc_slow", lambda m: m.grpc_latency, lambda f: f.cluster.watch.grpc_p99_seconds,
                       "requests", lambda f, method: method,
                       "{members} answers gRPC requests slowly (etcdGRPCRequestsSlow)", "/etcd perf {}")
grpc_slow.__doc__ = "Unary gRPC p99 by method (etcdGRPCRequestsSlow; members with --metrics=extensive export it)."
peer_rtt = _worst_p99("peer_rtt", lambda m: m.peer_rtt, lambda f: f.cluster.watch.peer_rtt_p99_seconds,
                      "round trips to", lambda f, to: f.label(to),
                      "round trips between {members} and peers are slow: the peer network "
                      "(etcdMemberCommunicationSlow)",
                      "/etcd perf {}")
peer_rtt.__doc__ = "Peer round-trip p99 by peer (etcdMemberCommunicationSlow)."


def proposals_failed(f: Facts) -> list[Finding] | None:
    """Failed raft proposals a second (etcdHighNumberOfFailedProposals): leader elections, or a lost quorum."""
    if f.health is None:
        return None
    limit = f.cluster.watch.failed_proposals_per_second

    def one(facts: Facts, member_id: int) -> tuple[str, str, str] | None:
        rate = facts.windows[member_id].rate(lambda m: m.proposals_failed)
        if rate is None or rate <= limit:
            return None
        return facts.label(member_id), f"{rate:.1f} failed proposals a second", "warning"
    found = _per_member(f, one)
    return _finding(f, "proposals_failed", _pairs(found),
                    f"{', '.join(m for m, _, _ in found)} fails many raft proposals: elections, or peers out of reach",
                    (f"/etcd perf {f.cluster.name}", f"/etcd status {f.cluster.name}"))


def fragmentation(f: Facts) -> list[Finding] | None:
    """Most of a big database is free pages (etcdDatabaseHighFragmentationRatio): defragmenting gives them back."""
    if f.health is None:
        return None
    watch = f.cluster.watch
    found = []
    for h in f.health.members:
        s = h.status
        if s is None or not s.db_size or s.db_size_in_use <= watch.fragmented_in_use_bytes:
            continue
        if s.db_size_in_use / s.db_size < watch.fragmented_below:
            found.append((member_label(h), f"{humanize_bytes(s.db_size_in_use)} in use of "
                                           f"{humanize_bytes(s.db_size)} ({s.db_size_in_use / s.db_size * 100:.0f} %)"))
    return _finding(f, "fragmentation", found,
                    f"the database of {_names(found)} is mostly free space: defragmenting gives it back",
                    (f"/etcd defrag {f.cluster.name}",))


def db_growth(f: Facts) -> list[Finding] | None:
    """A database that, growing as over the last horizon, reaches its quota within the horizon
    (etcdExcessiveDatabaseGrowth)."""
    if f.health is None:
        return None
    horizon = f.cluster.watch.growth_horizon_seconds
    found = []
    for member_id, sizes in f.sizes.items():
        limit = f.quotas.get(member_id)
        ahead = predicted(sizes, horizon)
        if not limit or ahead is None or ahead <= limit:
            continue
        found.append((f.label(member_id), f"{humanize_bytes(sizes[-1][1])} now, {humanize_bytes(int(ahead))} in "
                                          f"{horizon / 3600:g} h at this growth (quota {humanize_bytes(limit)})"))
    return _finding(f, "db_growth", found,
                    f"the database of {_names(found)} grows fast enough to reach its quota within "
                    f"{horizon / 3600:g} h: find what writes so much",
                    (f"/etcd status {f.cluster.name}",))


register(Condition("no_leader", "no leader", no_leader))
register(Condition("peer_failures", "peer send failures", peer_failures))
register(Condition("peer_rtt", "peer round trip", peer_rtt))
register(Condition("grpc_failed", "failed gRPC requests", grpc_failed))
register(Condition("grpc_slow", "slow gRPC requests", grpc_slow))
register(Condition("proposals_failed", "failed proposals", proposals_failed))
register(Condition("wal_fsync", "slow WAL fsync", wal_fsync))
register(Condition("backend_commit", "slow backend commit", backend_commit))
register(Condition("fragmentation", "fragmentation", fragmentation))
register(Condition("db_growth", "database growth", db_growth))
