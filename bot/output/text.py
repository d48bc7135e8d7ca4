"""Plain-text, table and JSON printers of the answer models (model.py).

The CLI prints these; the Slack side takes its top-level `text` fallback
from the same functions (escaped, in bot/output/blocks.py) and lays out its
Block Kit from the same model, so the two never disagree.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from bot.domain.cluster import Consistency, KVHash, member_labels
from bot.domain.mrkdwn import one_line
from bot.domain.restore import RestorePlan
from bot.domain.urls import shown_urls
from bot.output.model import (
    AlertView,
    CatalogView,
    Figure,
    PerfView,
    SnapshotView,
    StatusView,
    learned_line,
    member_state,
    quorum_line,
    short_duration,
    verdict,
)
from bot.output.tables import table
from bot.output.units import humanize_bytes

__all__ = ["catalog_json", "catalog_text", "headline", "learned_line", "member_state", "members_text", "one_line",
           "quorum_line", "saved_json", "saved_text", "snapshot_line", "status_json", "status_text", "unreachable_text",
           "verdict"]


def headline(view: StatusView) -> str:
    """The first line of the CLI's status and the Slack notification text."""
    down = f"; DOWN: {', '.join(view.down)}" if view.down else ""
    return f"cluster {view.cluster}: {view.verdict}: {view.quorum_line}{down}"


def unreachable_text(cluster: str, error: str) -> str:
    return f"cluster {cluster}: UNREACHABLE: {error}"


STATUS_HEADERS = ("NAME", "STATE", "CLIENT URL", "VERSION", "DB SIZE (IN USE)", "QUOTA USE", "RAFT INDEX", "ALARMS")


def status_rows(view: StatusView) -> list[list[str]]:
    """One row per member, each figure once, to fit a 120-column terminal: the name (the ID where two share
    it or it never started; `members` lists every ID), its state (leader, follower, learner, DOWN...), one
    client URL (`members` lists them all)."""
    label = member_labels((v.member.hex_id, v.member.name) for v in view.members)
    rows = []
    for v in view.members:
        m, s = v.member, v.status
        rows.append([
            label[m.hex_id], v.state, shown_urls(m.client_urls[:1]) + (" …" if len(m.client_urls) > 1 else ""),
            s.version if s else "-",
            f"{humanize_bytes(s.db_size)} ({humanize_bytes(s.db_size_in_use)})" if s else "-",
            v.quota_share or "-", str(s.raft_index) if s else "-",
            ", ".join(v.alarms) or ("-" if s is None else "none"),
        ])
    return rows


def status_text(view: StatusView) -> str:
    """The CLI's status output: headline, alarms, the member table, why a member is down, a quota that
    could not be read, and the note on a learned URL."""
    label = member_labels((v.member.hex_id, v.member.name) for v in view.members)
    alarms = "".join(f"\nALARM {a.kind} on {label.get(f'{a.member_id:016x}', f'{a.member_id:016x}')}"
                     for a in view.alarms)
    advice = "".join(f"\nNEXT: {line}" for line in view.advice)
    down = "".join(f"\n{v.state} {v.label}: {v.problem or v.error}" for v in view.members
                   if v.state in ("DOWN", "REFUSED", "DEFRAGMENTING", "UNHEALTHY"))
    quotas = "".join(f"\nQUOTA {v.label}: unknown ({v.quota_error}), etcd's default assumed" for v in view.members
                     if v.quota_error and v.quota_share)
    note = f"\nNOTE: {view.learned}" if view.learned else ""
    return (f"{headline(view)}{alarms}{advice}\n{table(STATUS_HEADERS, status_rows(view))}{down}{quotas}"
            f"\n{view.checked}{note}")


def members_text(view: StatusView) -> str:
    """As `etcdctl member list`: ID, status, name, peer URLs, client URLs, learner."""
    return "\n".join(
        f"{v.member.hex_id}, {'started' if v.member.started else 'unstarted'}, {v.member.name}, "
        f"{','.join(v.member.peer_urls)}, {','.join(v.member.client_urls)}, {str(v.member.is_learner).lower()}"
        for v in view.members)


def status_json(view: StatusView) -> dict[str, Any]:
    leader, q = view.leader_id, view.quorum
    members = []
    for v in view.members:
        m, s = v.member, v.status
        members.append({
            "id": m.hex_id, "name": m.name, "peer_urls": list(m.peer_urls), "client_urls": list(m.client_urls),
            "started": m.started, "is_learner": m.is_learner, "reachable": v.reachable, "healthy": v.healthy,
            "is_leader": v.is_leader, "version": s.version if s else None, "state": v.state,
            "storage_version": (s.storage_version or None) if s else None,
            "downgrade_target": s.downgrade_target if s else None,
            "db_size": s.db_size if s else None, "db_size_in_use": s.db_size_in_use if s else None,
            "raft_term": s.raft_term if s else None, "raft_index": s.raft_index if s else None,
            "raft_applied_index": s.raft_applied_index if s else None,
            "errors": list(s.errors) if s else ([v.error] if v.error else []),
            "alarms": list(v.alarms),
            "quota_bytes": v.quota_bytes, "quota_usage": round(v.quota_usage, 4) if v.quota_usage is not None else None,
            "quota_error": v.quota_error,
        })
    return {
        "cluster": view.cluster, "verdict": str(view.verdict), "members": members,
        "quorum": {"voting": q.voting, "healthy": q.healthy, "needed": q.needed, "tolerates": q.tolerates, "ok": q.ok},
        "leader": f"{leader:016x}" if leader else None,
        "alarms": [{"member_id": f"{a.member_id:016x}", "alarm": a.kind} for a in view.alarms],
        "elapsed_seconds": round(view.elapsed, 4), "deadline_seconds": view.deadline,
        "learned_url": view.learned_url, "advice": list(view.advice),
    }


def snapshot_line(view: SnapshotView, title: str = "Snapshot") -> str:
    """One line for a saved snapshot: the Slack notification text."""
    offsite = f"; {view.offsite}" if view.offsite else ""
    return f"{title} of {view.cluster}: {view.summary}; file {view.file_name}, sha256 {view.sha256}{offsite}"


def saved_json(view: SnapshotView) -> dict[str, Any]:
    """A saved snapshot as JSON (CLI): etcdutl's fields plus where and how."""
    return {**view.status.as_json(), "file": str(view.path), "file_size": view.file_size, "sha256": view.sha256,
            "member": view.member, "endpoint": view.endpoint, "encrypted": view.encrypted,
            "duration_seconds": round(view.duration, 3), "throughput_bytes_per_second": round(view.throughput),
            **({"remote_url": view.remote_url, "remote_verified": view.remote_verified,
                "upload_error": view.upload_error} if view.remote_url or view.upload_error else {})}


def saved_text(view: SnapshotView) -> str:
    return "\n".join([
        f"Snapshot saved at {view.path}" + (" (age-encrypted)" if view.encrypted else ""),
        view.table,
        f"sha256 {view.sha256}  size {view.size}",
        f"from {view.member} ({view.endpoint}) in {view.took}",
    ])


CATALOG_HEADERS = ("NAME", "CREATED (UTC)", "REVISION", "HASH", "TOTAL KEYS", "SIZE", "WHERE", "REMOTE")


def _utc(epoch: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def catalog_text(view: CatalogView) -> str:
    """`snapshot list`: one table row per snapshot, where its copies are, then the store's one line."""
    rows = [[e.name + (" (age)" if e.encrypted else ""), _utc(e.created_at),
             *((str(e.revision), e.hash, str(e.total_keys)) if e.described else ("?", "?", "?")),
             humanize_bytes(e.file_size or e.total_size), e.place, e.remote_word]
            for e in view.entries]
    head = f"snapshots of {view.cluster}" + (f", store {view.store_url}" if view.store_url else ", no store")
    lines = [head, table(CATALOG_HEADERS, rows) if rows else "(none)"]
    lines += [f"upload of {e.name} failed: {one_line(e.remote_error, 200)}" for e in view.entries
              if e.remote_error and e.remote_word == "upload FAILED"]
    lines += [f"FOREIGN {e.name}: not taken by this bot: {e.foreign} (never the default; restore only by name "
              "with --force)" for e in view.entries if e.foreign]
    if view.store_error:
        lines.append(f"STORE: {view.store_error}")
    return "\n".join(lines)


def catalog_json(view: CatalogView) -> dict[str, Any]:
    return {"cluster": view.cluster, "store": view.store_url, "store_error": view.store_error, "snapshots": [
        {"name": e.name, "created_at": e.created_at, "revision": e.revision, "hash": e.hash,
         "total_keys": e.total_keys, "total_size": e.total_size, "file_size": e.file_size, "sha256": e.sha256,
         "encrypted": e.encrypted, "member": e.member, "place": e.place, "local_path": e.local_path,
         "remote_url": e.remote_url, "remote_state": str(e.remote_state) or None,
         "remote_error": e.remote_error or None, "foreign": e.foreign or None}
        for e in view.entries]}


# ---------------------------------------------------------------- perf, alarms, consistency

def _cell(f: Figure) -> str:
    return f"{f.value} {'ok' if f.ok else 'BAD' if f.ok is False else '?'}"


def perf_text(view: PerfView) -> str:
    """The verdict and the slowest member, then one row per figure, one column per member."""
    named = next((m.figures for m in view.members if m.figures), ())
    rows = [[f.name, *(_cell(m.figures[i]) if m.figures else "-" for m in view.members)]
            for i, f in enumerate(named)]
    rows += [["not read", *(m.error or "" for m in view.members)]] if any(m.error for m in view.members) else []
    bad = [f"{m.label}: {', '.join(f'{f.name} {f.value}' for f in m.bad)}" for m in view.members if m.bad]
    unread = [f"{m.label}: {m.error}" for m in view.members if m.error]
    verdict = "all figures within etcd's guidance" if view.all_ok else "; ".join(bad + unread)
    slowest = view.slowest
    slow = (f"\nslowest: {slowest.label} (disk p99 at {slowest.slowness * 100:.0f} % of etcd's limit)"
            if slowest else "")
    listing = table(("FIGURE (GUIDANCE)", *(m.label for m in view.members)), rows)
    return f"cluster {view.cluster} perf: {'OK' if view.all_ok else 'BAD'}: {verdict}{slow}\n{listing}"


def alarms_text(view: StatusView) -> str:
    """The active alarms, by member name, each with the command to run."""
    label = member_labels((v.member.hex_id, v.member.name) for v in view.members)
    if not view.alarms:
        return f"cluster {view.cluster}: no alarms"
    lines = [f"ALARM {a.kind} on {label.get(f'{a.member_id:016x}', f'{a.member_id:016x}')}" for a in view.alarms]
    return "\n".join([f"cluster {view.cluster}: {len(view.alarms)} alarm{'s' if len(view.alarms) != 1 else ''}",
                      *lines, *(f"NEXT: {line}" for line in view.advice)])


def _compacted(h: KVHash) -> str:
    return str(h.compact_revision) if h.compact_revision > 0 else "never"


def consistency_text(c: Consistency) -> str:
    """Agreement at one revision, or the member that differs and what to do about it."""
    rows = [[m.name, f"{m.hash.hash:08x}" if m.hash else "-", _compacted(m.hash) if m.hash else "-",
             "DIFFERS" if m in c.differing else ("NOT COMPARED: " + (m.error or "other compaction point"))
             if m in c.unchecked else "same"] for m in c.members]
    if c.agree:
        head = (f"cluster {c.cluster}: CONSISTENT: {len(c.members)} members agree at revision {c.revision} "
                f"(hash {c.majority_hash:08x})")
    elif c.differing:
        names = ", ".join(m.name for m in c.differing)
        # a member that answers is not replaced (the planner refuses a healthy member): stop it first
        one = len(c.differing) == 1
        head = (f"cluster {c.cluster}: INCONSISTENT at revision {c.revision}: {names} "
                f"differ{'s' if one else ''} from the majority; stop etcd on {'it' if one else 'them'} "
                f"(one at a time), then replace {'it' if one else 'each'}: "
                + "; ".join(f"/etcd replace {m.name} <new-name> <new-peer-url>" for m in c.differing))
    else:
        head = (f"cluster {c.cluster}: NOT CHECKED at revision {c.revision}: "
                + "; ".join(f"{m.name}: {m.error or 'other compaction point'}" for m in c.unchecked))
    return f"{head}\n{table(('MEMBER', 'HASH', 'COMPACT REVISION', 'RESULT'), rows)}"


def alert_state(view: AlertView) -> str:
    if view.held:
        return f"held back: {view.held}; seen for {short_duration(view.lasted)}"
    if view.resolved:
        return resolved_text(view)
    flapping = f", flapping ({view.flaps} times in the last minute)" if view.flapping else ""
    return f"open for {short_duration(view.lasted)}{flapping}"


def seen_by(sources: Sequence[str]) -> str:
    """"the watch and Alertmanager (etcdMembersDown)": who sees a condition."""
    names = [s.partition(":")[2] for s in sources if s.startswith("alertmanager:")]
    parts = (["the watch"] if "watch" in sources else []) + ([f"Alertmanager ({', '.join(names)})"] if names else [])
    return " and ".join(parts)


def alert_text(view: AlertView) -> str:
    """One condition: the headline, the figures, the next commands, who sees it."""
    severity = f"{view.severity.upper()}: " if view.severity else ""
    head = (f"cluster {view.cluster}: {severity}{view.title.upper()} {view.subject}: {view.summary} "
            f"({alert_state(view)})")
    figures = [f"{name}: {value}" for name, value in view.figures]
    links = [f"{text}: {url}" for text, url in view.links]
    seen = [f"seen by {seen_by(view.sources)}"] if view.sources else []
    return "\n".join([head, *figures, *(f"NEXT: {s}" for s in view.suggestions if not view.resolved), *links, *seen])


def resolved_text(view: AlertView) -> str:
    flapped = f", after flapping ({view.flaps} times within a minute)" if view.flapping else ""
    return f"resolved after {short_duration(view.lasted)}{flapped}"


def alerts_text(cluster: str, views: list[AlertView], muted: str | None = None,
                held: Sequence[AlertView] | None = ()) -> str:
    """`/etcd alerts`: the open conditions, then those held back, one line each. `held` None: this
    replica does not watch (another one leads), so what is held back is not known here."""
    head = f"cluster {cluster}: " + (f"{len(views)} open condition{'s' if len(views) != 1 else ''}" if views
                                     else "no open conditions")
    head += f", {len(held)} held back" if held else ""
    lines = [f"{v.title} {v.subject}: {v.summary} ({alert_state(v)}"
             f"{'; seen by ' + seen_by(v.sources) if v.sources else ''})" for v in [*views, *(held or ())]]
    unknown = ["held back: not known here (this replica does not watch; the leader does)"] if held is None else []
    return "\n".join([head, *lines, *unknown, *([f"muted: {muted}"] if muted else [])])



K8S_NOT_STOPPED = ("This plan does not stop kube-apiserver ([clusters.restore] apiserver = \"none\"): if one uses this "
                   "etcd, stop it before the restore (it would write to the old data and cache it).")


K8S_AFTER = ("After the restore: restart every kube-apiserver, then kube-controller-manager and kube-scheduler, then "
             "the kubelets, so that no component keeps state newer than the snapshot.")


def bump_note(plan: RestorePlan) -> str:
    if plan.bump_supported:
        return (f"etcdutl {plan.etcd_version} supports --bump-revision/--mark-compacted: they are added, so clients' "
                "watch caches are invalidated.")
    return (f"etcd {plan.etcd_version or '(version unknown)'}: its {plan.restore_tool} has no --bump-revision/"
            "--mark-compacted (3.5.10 and later, 3.6): clients' watch caches are NOT invalidated by the restore; "
            "restart every watcher (kube-apiserver and controllers) as the follow-ups say.")


_SLACK_TOKEN = re.compile(r"<(?:!date\^[^|>]*\|([^>]*)|!subteam\^([^|>]*)(?:\|[^>]*)?|@([^|>]*)(?:\|[^>]*)?"
                          r"|([^|>]*)\|([^>]*))>")


def _plain_line(text: str) -> str:
    """mrkdwn as a terminal shows it: a date's fallback, @user, a link's words and address; escapes undone; a
    code block's fences dropped, so its lines (commands, an environment) can be copied as they stand."""
    def token(m: re.Match[str]) -> str:
        date, group, user, url, words = m.groups()
        return date or (f"@{group}" if group else f"@{user}" if user else f"{words} ({url})")
    text = _SLACK_TOKEN.sub(token, text.replace("```", ""))
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def plain(text: str, blocks: Sequence[Mapping[str, Any]] = ()) -> str:
    """A message (its Block Kit, else its text) as plain text for a terminal: what the channel would read."""
    parts: list[str] = []
    for block in blocks:
        kind = block.get("type")
        if kind in ("header", "section") and isinstance(block.get("text"), dict):
            parts.append(block["text"]["text"])
        if kind == "section":
            parts += [f["text"] for f in block.get("fields", []) if isinstance(f, dict)]
        elif kind == "context":
            parts.append("  ".join(e.get("text", "") for e in block.get("elements", []) if isinstance(e, dict)))
        elif kind == "divider":
            parts.append("")
    return _plain_line("\n".join(parts) if parts else text)
