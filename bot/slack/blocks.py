"""Block Kit renderings, each with a plain-text fallback (notifications,
screen readers and clients without blocks show the text)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from bot.ops.replace import MemberRef, Plan
from bot.output import text as render
from bot.store.records import PlanRecord, PlanState
from bot.etcd.health import ClusterHealth, MemberHealth
from bot.output.units import humanize_bytes, humanize_duration

MAX_SECTION = 2900  # Slack's limit is 3000 characters per text object


@dataclass(frozen=True)
class Reply:
    text: str
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def as_kwargs(self) -> dict[str, Any]:
        return {"text": self.text, "blocks": self.blocks} if self.blocks else {"text": self.text}


def _section(text: str) -> dict[str, Any]:
    if len(text) > MAX_SECTION:
        text = text[:MAX_SECTION] + "…"
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def sections(text: str, code: bool = False) -> list[dict[str, Any]]:
    """Text longer than one section as several sections, split between lines
    (a line longer than a section is cut into pieces), so nothing is lost;
    `code` wraps each piece in a code block."""
    room = MAX_SECTION - (6 if code else 0)
    pieces: list[str] = []
    for line in text.split("\n"):
        while len(line) > room:
            pieces.append(line[:room])
            line = line[room:]
        pieces.append(line)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= room:
            chunks[-1] += "\n" + piece
        else:
            chunks.append(piece)
    return [_section(f"```{c}```" if code else c) for c in chunks]


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text[:MAX_SECTION]}]}


def _header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": text[:150], "emoji": True}}


def escape(text: str) -> str:
    """Slack mrkdwn escaping of &, < and > (the only characters it requires)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_ICON = {"HEALTHY": ":large_green_circle:", "DEGRADED": ":large_orange_circle:", "NO LEADER": ":large_orange_circle:",
         "QUORUM LOST": ":red_circle:"}


def _member_line(h: MemberHealth, leader_id: int | None) -> str:
    m, s = h.member, h.status
    name = escape(m.name) if m.name else "_(unstarted)_"
    state = render.member_state(h, leader_id)
    if not h.reachable:
        first = f":red_circle: *{name}* `{m.hex_id}` — *DOWN*: {escape(h.error or 'unreachable')}"
    elif h.problem:
        first = f":large_orange_circle: *{name}* `{m.hex_id}` — *UNHEALTHY*: {escape(h.problem)}"
    else:
        first = f":large_green_circle: *{name}* `{m.hex_id}` — {state}"
    facts = []
    if s:
        facts += [f"v{s.version}", f"DB {humanize_bytes(s.db_size)} ({humanize_bytes(s.db_size_in_use)} in use)",
                  f"raft index {s.raft_index}", f"term {s.raft_term}"]
    if m.is_learner:
        facts.append("learner")
    if not m.started:
        facts.append("unstarted")
    if h.alarms:
        facts.append(f":rotating_light: alarm {', '.join(h.alarms)}")
    urls = f"peer {', '.join(m.peer_urls) or '-'} · client {', '.join(m.client_urls) or '-'}"
    return "\n".join([first, " · ".join(facts), urls] if facts else [first, urls])


def status_reply(health: ClusterHealth, requested_by: str | None = None) -> Reply:
    verdict = render.verdict(health)
    leader = health.leader_id
    blocks: list[dict[str, Any]] = [
        _header(f"etcd cluster {health.cluster}: {verdict}"),
        _section(f"{_ICON[verdict]} *{render.quorum_line(health)}*"),
    ]
    for a in health.alarms:
        blocks.append(_section(f":rotating_light: *ALARM {a.kind}* on member `{a.member_id:016x}`"))
    blocks.append({"type": "divider"})
    blocks += [_section(_member_line(h, leader)) for h in health.members]
    who = f" · asked by <@{requested_by}>" if requested_by else ""
    blocks.append(_context(f"checked in {humanize_duration(health.elapsed)}, deadline {health.deadline:g}s per member{who}"))
    down = [h.member.name or h.member.hex_id for h in health.members if not h.reachable]
    text = f"etcd cluster {health.cluster}: {verdict}: {render.quorum_line(health)}"
    if down:
        text += f"; DOWN: {', '.join(down)}"
    return Reply(text=text, blocks=blocks)


def members_reply(health: ClusterHealth) -> Reply:
    listing = render.members_text(health)
    return Reply(text=f"etcd cluster {health.cluster} members:\n{listing}",
                 blocks=[_section(f"*etcd cluster {escape(health.cluster)}* — member list"),
                         _section(f"```{escape(listing)}```")])


def error_reply(reason: str, usage: str | None = None, hint: str | None = None) -> Reply:
    """One line saying what is wrong, what to do instead, then the usage."""
    text = f":warning: {reason}"
    blocks = [_section(f":warning: {escape(reason)}")]
    if hint:
        text += f"\n{hint}"
        blocks.append(_section(escape_keep_mentions(hint)))
    if usage:
        text += f"\nUsage: {usage}"
        blocks.append(_context(f"Usage:\n{escape(usage)}"))
    return Reply(text=text, blocks=blocks)


def help_reply(usage: str, clusters: list[str]) -> Reply:
    bound = f"This channel speaks for: {', '.join(clusters)}" if clusters else "This channel is bound to no cluster."
    return Reply(text=f"/etcd commands:\n{usage}\n{bound}",
                 blocks=[_section("*/etcd* — operate the etcd clusters behind Kubernetes"),
                         _section(escape(usage)), _context(escape(bound))])


def unreachable_reply(cluster: str, error: str) -> Reply:
    text = f"etcd cluster {cluster}: UNREACHABLE: {error}"
    return Reply(text=text, blocks=[_header(f"etcd cluster {cluster}: UNREACHABLE"),
                                    _section(f":red_circle: {escape(error)}")])


# ---------------------------------------------------------------- plans

STEP_ICON = {"pending": ":white_square:", "running": ":hourglass_flowing_sand:", "done": ":white_check_mark:",
             "failed": ":x:", "skipped": ":heavy_minus_sign:"}
STATE_WORD = {PlanState.PROPOSED: "PROPOSED — waiting for approval", PlanState.APPROVED: "APPROVED",
              PlanState.RUNNING: "RUNNING", PlanState.DONE: "DONE", PlanState.FAILED: "FAILED",
              PlanState.REJECTED: "REJECTED", PlanState.CANCELLED: "CANCELLED", PlanState.EXPIRED: "EXPIRED",
              PlanState.INTERRUPTED: "INTERRUPTED", PlanState.ABANDONED: "ABANDONED"}


def slack_date(epoch: float) -> str:
    """A timestamp every reader sees in their own time zone (UTC as fallback)."""
    import datetime as dt
    fallback = dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(epoch)}^{{date_short_pretty}} {{time}}|{fallback}>"


def _urls(urls: tuple[str, ...] | list[str]) -> str:
    return escape(", ".join(urls)) or "-"


def _member_ref(m: MemberRef) -> str:
    return f"*{escape(m.name or '(unstarted)')}* `{m.id}` · peer {_urls(m.peer_urls)} · client {_urls(m.client_urls)}"


@dataclass(frozen=True)
class PlanView:
    """What the plan message shows besides the plan itself."""

    state: PlanState
    proposer: str
    approvers: str                      # already formatted mentions
    expires_at: float
    reaction: str
    reject_reaction: str
    step_states: Mapping[int, str] = field(default_factory=dict)
    decided_by: str | None = None
    error: str | None = None
    approvals: tuple[str, ...] = ()     # who approved so far
    approvals_needed: int = 1


def plan_reply(plan: Plan, view: PlanView) -> Reply:
    """The plan message: everything an approver needs to decide, and progress.
    Long values never push a step or the environment out: they spill into
    more sections."""
    state = STATE_WORD.get(view.state, view.state.upper())
    failed_name = escape(plan.failed.name or plan.failed.id)
    decided = view.decided_by and view.state in (PlanState.APPROVED, PlanState.REJECTED, PlanState.CANCELLED,
                                                  PlanState.ABANDONED)
    blocks: list[dict[str, Any]] = [
        _header(f"Plan {plan.id}: replace {plan.failed.name or plan.failed.id} in {plan.cluster}"),
        _section(f"*State:* {state}" + (f" (by {mention(view.decided_by or '')})" if decided else "")),
        *sections(f"*Cluster:* `{escape(plan.cluster)}` · quorum now {plan.quorum_now[1]} healthy of "
                  f"{plan.quorum_now[0]} voting\n*Failed member:* {_member_ref(plan.failed)}\n"
                  f"*New member:* *{escape(plan.new_name)}* · peer {escape(plan.new_peer_url)} · client "
                  f"{escape(plan.new_client_url or '(set by the launcher)')} · "
                  f"{'joins as a learner, then promoted' if plan.learner else 'joins as a voting member (--no-learner)'}"),
    ]
    lines = []
    for i, step in enumerate(plan.steps):
        st = view.step_states.get(i, "pending")
        lines.append(f"{STEP_ICON.get(st, ':white_square:')} {i}. {escape(step.title)}")
    blocks += sections("*Steps*\n" + "\n".join(lines))
    env = "\n".join(f'{k}="{v}"' for k, v in plan.environment.items())
    blocks.append(_section(f"*Environment for {escape(plan.new_name)}* (runbook step 4):"))
    blocks += sections(escape(env), code=True)
    if plan.others_failed:
        others = ", ".join(m.name or m.id for m in plan.others_failed)
        text = (f":warning: Also failed: *{escape(others)}*. Members are replaced one at a time: propose the next "
                f"replacement after this plan completes.")
        if plan.also_remove:
            gone = ", ".join(m.name or m.id for m in plan.also_remove)
            text += (f"\nThis plan removes *{escape(gone)}* too (step 2): etcd before 3.6 adds no member while a voting "
                     f"member is unreachable. Do not restart {escape(gone)} with its old data; replace it next with "
                     f"`/etcd replace {escape(plan.also_remove[0].name or plan.also_remove[0].id)} <new-name> <new-peer-url>`.")
        blocks += sections(text)
    if plan.already_removed_by:
        blocks.append(_section(f":information_source: {failed_name} was removed by plan "
                               f"`{plan.already_removed_by}`; this plan adds its replacement."))
    if view.error:
        blocks += sections(f":x: *Failed:* {escape(view.error)}")
    approved = ""
    if view.approvals_needed > 1:
        approved = (f" · approvals {len(view.approvals)} of {view.approvals_needed}"
                    + (f" ({', '.join(mention(u) for u in view.approvals)})" if view.approvals else ""))
    who = (f"Proposed by {mention(view.proposer)} · approvers: {view.approvers}{approved} · "
           f"expires {slack_date(view.expires_at)} · plan ID `{plan.id}`")
    blocks.append(_context(who))
    text = (f"Plan {plan.id}: replace {failed_name} with {escape(plan.new_name)} in {escape(plan.cluster)}: {state}. "
            f"Proposed by {mention(view.proposer)}")
    if view.state == PlanState.PROPOSED:
        many = f"{view.approvals_needed} approvers react" if view.approvals_needed > 1 else "An approver reacts"
        blocks.append(_context(f"{many} with :{view.reaction}: to approve; :{view.reject_reaction}: rejects "
                               f"(approver or proposer)."))
        text += f"; approvers {view.approvers}; react :{view.reaction}: to approve."
    else:
        text += "."
    return Reply(text=text, blocks=blocks)


def plans_reply(cluster: str, records: list[PlanRecord]) -> Reply:
    if not records:
        return Reply(text=f"No plans for cluster {cluster} yet.")
    lines = []
    for r in records:
        p = r.plan
        lines.append(f"`{r.id}` {STATE_WORD.get(r.state, r.state).split(' —')[0]} · replace "
                     f"{escape(p.failed.name or p.failed.id)} with {escape(p.new_name)} · by {mention(r.proposer)} · "
                     f"{slack_date(r.created_at)}" + (f" · {escape(r.error)}" if r.error else ""))
    text = f"Recent plans for {cluster}:\n" + "\n".join(lines)
    return Reply(text=text, blocks=[_section(f"*Recent plans for {escape(cluster)}*"), _section("\n".join(lines))])


def thread_note(text: str) -> Reply:
    """A note under a plan; its values were escaped where they were written."""
    return Reply(text=text, blocks=sections(text))


def escape_keep_mentions(text: str) -> str:
    """Escape &, < and > except inside Slack mentions and dates (<@U..>, <!date^..>, <!subteam^..>)."""
    import re as _re
    parts = _re.split(r"(<[@#!][^>]+>)", text)
    return "".join(p if _re.match(r"^<[@#!][^>]+>$", p) else escape(p) for p in parts)


# ---------------------------------------------------------------- snapshots

def mention(user: str) -> str:
    """A Slack user ID as a mention; anything else (the schedule) as plain words."""
    return f"<@{user}>" if re.fullmatch(r"[UW][A-Z0-9]{2,}", user) else escape(user)


def snapshot_reply(saved, requested_by: str, title: str = "Snapshot") -> Reply:
    """The runbook's status table plus where the file is and how to check it.
    The file itself never goes to Slack."""
    from bot.etcd.bbolt import status_table
    st = saved.status
    table = status_table(st)
    mib_s = saved.throughput / (1 << 20)
    facts = (f"*File:* `{escape(saved.path.name)}`{' (age-encrypted)' if saved.encrypted else ''} · "
             f"{humanize_bytes(saved.file_size)}\n*sha256:* `{saved.sha256}`\n"
             f"*Source:* {escape(saved.member)} ({saved.endpoint}) · took {humanize_duration(saved.duration)} "
             f"({mib_s:.1f} MiB/s) · asked by {mention(requested_by)}")
    blocks_ = [_section(f":camera_with_flash: *{title} of {escape(saved.cluster)}* — verified"),
               _section(f"```{table}```"), _section(facts)]
    if saved.failed_over_from:
        blocks_.append(_context(f":warning: {escape(saved.failed_over_from)} stopped answering mid-stream; "
                                f"the snapshot was taken again from {escape(saved.member)}"))
    if saved.pruned:
        blocks_.append(_context(f"Retention removed {len(saved.pruned)} older snapshot(s): "
                                f"{escape(', '.join(saved.pruned))}"))
    text = (f"{title} of {saved.cluster}: hash {st.hash_hex}, revision {st.revision}, {st.total_keys} keys, "
            f"{humanize_bytes(st.total_size)}; file {saved.path.name}, sha256 {saved.sha256}")
    return Reply(text=text, blocks=blocks_)


def snapshot_failed_reply(cluster: str, reason: str, scheduled: bool = False) -> Reply:
    lead = ":rotating_light: *Scheduled snapshot FAILED*" if scheduled else ":x: *Snapshot failed*"
    text = f"{'Scheduled snapshot' if scheduled else 'Snapshot'} of {cluster} FAILED: {reason}"
    return Reply(text=text, blocks=[_section(f"{lead} for `{escape(cluster)}`: {escape(reason)}\nNo file was kept.")])


def snapshots_reply(cluster: str, rows: list[dict[str, Any]]) -> Reply:
    if not rows:
        return Reply(text=f"No snapshots recorded for {cluster} yet. Take one with /etcd snapshot.")
    lines = []
    for r in rows:
        lines.append(f"`{_basename(r['path'])}` · rev {r['revision']} · hash {r['hash']} · {r['total_keys']} keys · "
                     f"{humanize_bytes(r['total_size'])} · {escape(r['member'])} · {mention(r['requested_by'])} · "
                     f"{slack_date(r['created_at'])}" + (" · :lock:" if r["encrypted"] else "")
                     + (f" · {escape(r['reason'])}" if r.get("reason") else ""))
    text = f"Snapshots of {cluster} (newest first):\n" + "\n".join(lines)
    return Reply(text=text, blocks=[_section(f"*Snapshots of {escape(cluster)}* (newest first)"), _section("\n".join(lines))])


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]
