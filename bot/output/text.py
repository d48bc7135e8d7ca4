"""Plain-text and JSON renderings of the bot's answers.

One data model per answer, several printers (as etcdctl's printer.go): the
CLI, the Slack text fallback and the JSON output all come from here, so
they never disagree.
"""
from __future__ import annotations

from typing import Any

from bot.etcd.health import ClusterHealth, MemberHealth
from bot.output.tables import table
from bot.output.units import humanize_bytes, humanize_duration

def verdict(health: ClusterHealth) -> str:
    """HEALTHY, DEGRADED, NO LEADER or QUORUM LOST: the words an SRE reads first."""
    q = health.quorum
    if not q.ok:
        return "QUORUM LOST"
    if health.leader_id is None:
        return "NO LEADER"
    if health.unhealthy or health.alarms:
        return "DEGRADED"
    return "HEALTHY"


def quorum_line(health: ClusterHealth) -> str:
    q = health.quorum
    tail = (f"tolerates {q.tolerates} more failure{'s' if q.tolerates != 1 else ''}" if q.ok
            else "the cluster cannot accept writes")
    return f"{q.healthy} of {q.voting} voting members healthy, quorum needs {q.needed}, {tail}"


LEADERLESS = ("no leader", "learner, no leader")


def member_state(h: MemberHealth, health: ClusterHealth) -> str:
    """DOWN, UNHEALTHY, leader, follower, learner; without quorum or a leader
    there is no follower: a survivor then says "no leader" (one of LEADERLESS)."""
    if not h.reachable:
        return "DOWN"
    if h.problem:
        return "UNHEALTHY"
    leader = health.leader_id if health.quorum.ok else None
    if leader is None:
        return LEADERLESS[h.member.is_learner]
    return "leader" if h.member.id == leader else ("learner" if h.member.is_learner else "follower")


def learned_line(health: ClusterHealth) -> str | None:
    """Said when no configured endpoint answered and a learned client URL did."""
    if health.learned_url is None:
        return None
    return (f"reached only through {health.learned_url}, a client URL learned from the member list: no configured "
            f"endpoint answered; update this cluster's endpoints in the bot's configuration")


STATUS_HEADERS = ("ID", "STATUS", "NAME", "PEER ADDRS", "CLIENT ADDRS", "IS LEARNER", "REACHABLE", "LEADER",
                  "VERSION", "DB SIZE", "RAFT INDEX", "ALARMS")


def status_rows(health: ClusterHealth) -> list[list[str]]:
    leader = health.leader_id
    rows = []
    for h in health.members:
        m, s = h.member, h.status
        rows.append([
            m.hex_id, "started" if m.started else "unstarted", m.name or "", ", ".join(m.peer_urls),
            ", ".join(m.client_urls), str(m.is_learner).lower(),
            "yes" if h.reachable else f"NO: {h.error}",
            "*" if m.id == leader else "",
            s.version if s else "-", humanize_bytes(s.db_size) if s else "-", str(s.raft_index) if s else "-",
            ", ".join(h.alarms) or ("-" if s is None else "none"),
        ])
    return rows


def status_text(health: ClusterHealth) -> str:
    """The CLI's status output: verdict, quorum line and the member table."""
    head = f"cluster {health.cluster}: {verdict(health)}: {quorum_line(health)}"
    alarms = "".join(f"\nALARM {a.kind} on member {a.member_id:016x}" for a in health.alarms)
    foot = f"checked in {humanize_duration(health.elapsed)}, deadline {health.deadline:g}s per member"
    learned = learned_line(health)
    foot += f"\nNOTE: {learned}" if learned else ""
    return f"{head}{alarms}\n{table(STATUS_HEADERS, status_rows(health))}\n{foot}"


def members_text(health: ClusterHealth) -> str:
    """As `etcdctl member list`: ID, status, name, peer URLs, client URLs, learner."""
    return "\n".join(
        f"{h.member.hex_id}, {'started' if h.member.started else 'unstarted'}, {h.member.name}, "
        f"{','.join(h.member.peer_urls)}, {','.join(h.member.client_urls)}, {str(h.member.is_learner).lower()}"
        for h in health.members)


def status_json(health: ClusterHealth) -> dict[str, Any]:
    leader = health.leader_id
    q = health.quorum
    members = []
    for h in health.members:
        m, s = h.member, h.status
        members.append({
            "id": m.hex_id, "name": m.name, "peer_urls": list(m.peer_urls), "client_urls": list(m.client_urls),
            "started": m.started, "is_learner": m.is_learner, "reachable": h.reachable, "healthy": h.healthy,
            "is_leader": m.id == leader, "version": s.version if s else None,
            "db_size": s.db_size if s else None, "db_size_in_use": s.db_size_in_use if s else None,
            "raft_term": s.raft_term if s else None, "raft_index": s.raft_index if s else None,
            "raft_applied_index": s.raft_applied_index if s else None,
            "errors": list(s.errors) if s else ([h.error] if h.error else []),
            "alarms": list(h.alarms),
        })
    return {
        "cluster": health.cluster, "verdict": verdict(health), "members": members,
        "quorum": {"voting": q.voting, "healthy": q.healthy, "needed": q.needed, "tolerates": q.tolerates, "ok": q.ok},
        "leader": f"{leader:016x}" if leader else None,
        "alarms": [{"member_id": f"{a.member_id:016x}", "alarm": a.kind} for a in health.alarms],
        "elapsed_seconds": round(health.elapsed, 4), "deadline_seconds": health.deadline,
        "learned_url": health.learned_url,
    }


def saved_json(saved) -> dict[str, Any]:
    """A saved snapshot as JSON (CLI): etcdutl's fields plus where and how."""
    return {**saved.status.as_json(), "file": str(saved.path), "file_size": saved.file_size, "sha256": saved.sha256,
            "member": saved.member, "endpoint": saved.endpoint, "encrypted": saved.encrypted,
            "duration_seconds": round(saved.duration, 3), "throughput_bytes_per_second": round(saved.throughput)}


def saved_text(saved) -> str:
    from bot.etcd.bbolt import status_table
    return "\n".join([
        f"Snapshot saved at {saved.path}" + (" (age-encrypted)" if saved.encrypted else ""),
        status_table(saved.status),
        f"sha256 {saved.sha256}  size {humanize_bytes(saved.file_size)}",
        f"from {saved.member} ({saved.endpoint}) in {humanize_duration(saved.duration)} "
        f"({saved.throughput / (1 << 20):.1f} MiB/s)",
    ])
