"""Block Kit renderings, each with a plain-text fallback (notifications,
screen readers and clients without blocks show the text)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from bot.output import text as render
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


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text[:MAX_SECTION]}]}


def _header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": text[:150], "emoji": True}}


def escape(text: str) -> str:
    """Slack mrkdwn escaping of &, < and > (the only characters it requires)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_ICON = {"HEALTHY": ":large_green_circle:", "DEGRADED": ":large_orange_circle:", "NO LEADER": ":large_orange_circle:",
         "QUORUM LOST": ":red_circle:"}


def _member_line(h: MemberHealth, health: ClusterHealth) -> str:
    m, s = h.member, h.status
    name = escape(m.name) if m.name else "_(unstarted)_"
    state = render.member_state(h, health)
    if not h.reachable:
        first = f":red_circle: *{name}* `{m.hex_id}` — *DOWN*: {escape(h.error or 'unreachable')}"
    elif h.problem:
        first = f":large_orange_circle: *{name}* `{m.hex_id}` — *UNHEALTHY*: {escape(h.problem)}"
    elif state in render.LEADERLESS:
        first = f":large_orange_circle: *{name}* `{m.hex_id}` — *{state}*"
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
    blocks: list[dict[str, Any]] = [
        _header(f"etcd cluster {health.cluster}: {verdict}"),
        _section(f"{_ICON[verdict]} *{render.quorum_line(health)}*"),
    ]
    for a in health.alarms:
        blocks.append(_section(f":rotating_light: *ALARM {a.kind}* on member `{a.member_id:016x}`"))
    blocks.append({"type": "divider"})
    blocks += [_section(_member_line(h, health)) for h in health.members]
    learned = render.learned_line(health)
    if learned:
        blocks.append(_section(f":warning: {escape(learned)}"))
    who = f" · asked by <@{requested_by}>" if requested_by else ""
    blocks.append(_context(f"checked in {humanize_duration(health.elapsed)}, deadline {health.deadline:g}s per member{who}"))
    down = [h.member.name or h.member.hex_id for h in health.members if not h.reachable]
    text = f"etcd cluster {health.cluster}: {verdict}: {render.quorum_line(health)}"
    if down:
        text += f"; DOWN: {', '.join(down)}"
    if learned:
        text += f"; {learned}"
    return Reply(text=text, blocks=blocks)


def members_reply(health: ClusterHealth) -> Reply:
    listing = render.members_text(health)
    learned = render.learned_line(health)
    blocks = [_section(f"*etcd cluster {escape(health.cluster)}* — member list"), _section(f"```{escape(listing)}```")]
    if learned:
        blocks.append(_context(f":warning: {escape(learned)}"))
    return Reply(text=f"etcd cluster {health.cluster} members:\n{listing}" + (f"\n{learned}" if learned else ""),
                 blocks=blocks)


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
STATE_WORD = {"proposed": "PROPOSED — waiting for approval", "approved": "APPROVED", "running": "RUNNING",
              "done": "DONE", "failed": "FAILED", "rejected": "REJECTED", "cancelled": "CANCELLED",
              "expired": "EXPIRED", "interrupted": "INTERRUPTED"}


def slack_date(epoch: float) -> str:
    """A timestamp every reader sees in their own time zone (UTC as fallback)."""
    import datetime as dt
    fallback = dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(epoch)}^{{date_short_pretty}} {{time}}|{fallback}>"


def _member_ref(m) -> str:
    return (f"*{escape(m.name or '(unstarted)')}* `{m.id}` · peer {', '.join(m.peer_urls) or '-'} · "
            f"client {', '.join(m.client_urls) or '-'}")


@dataclass(frozen=True)
class PlanView:
    """What the plan message shows besides the plan itself."""

    state: str
    proposer: str
    approvers: str                      # already formatted mentions
    expires_at: float
    reaction: str
    reject_reaction: str
    step_states: dict[int, str] = field(default_factory=dict)
    decided_by: str | None = None
    error: str | None = None


def plan_reply(plan, view: PlanView) -> Reply:
    """The plan message: everything an approver needs to decide, and progress."""
    state = STATE_WORD.get(view.state, view.state.upper())
    failed_name = plan.failed.name or plan.failed.id
    blocks: list[dict[str, Any]] = [
        _header(f"Plan {plan.id}: replace {failed_name} in {plan.cluster}"),
        _section(f"*State:* {state}" + (f" (by <@{view.decided_by}>)" if view.decided_by and view.state in
                                         ("approved", "rejected", "cancelled") else "")),
        _section(f"*Cluster:* `{escape(plan.cluster)}` · quorum now {plan.quorum_now[1]} healthy of "
                 f"{plan.quorum_now[0]} voting\n*Failed member:* {_member_ref(plan.failed)}\n"
                 f"*New member:* *{escape(plan.new_name)}* · peer {plan.new_peer_url} · client "
                 f"{plan.new_client_url or '(set by the launcher)'} · "
                 f"{'joins as a learner, then promoted' if plan.learner else 'joins as a voting member (--no-learner)'}"),
    ]
    lines = []
    for i, step in enumerate(plan.steps):
        st = view.step_states.get(i, "pending")
        lines.append(f"{STEP_ICON.get(st, ':white_square:')} {i}. {escape(step.title)}")
    blocks.append(_section("*Steps*\n" + "\n".join(lines)))
    env = "\n".join(f'{k}="{v}"' for k, v in plan.environment.items())
    blocks.append(_section(f"*Environment for {escape(plan.new_name)}* (runbook step 4):\n```{escape(env)}```"))
    if plan.others_failed:
        others = ", ".join(m.name or m.id for m in plan.others_failed)
        text = (f":warning: Also failed: *{escape(others)}*. Members are replaced one at a time: propose the next "
                f"replacement after this plan completes.")
        if plan.also_remove:
            gone = ", ".join(m.name or m.id for m in plan.also_remove)
            text += (f"\nThis plan removes *{escape(gone)}* too (step 2): etcd before 3.6 adds no member while a voting "
                     f"member is unreachable. Do not restart {escape(gone)} with its old data; replace it next with "
                     f"`/etcd replace {escape(plan.also_remove[0].name or plan.also_remove[0].id)} <new-name> <new-peer-url>`.")
        blocks.append(_section(text))
    if plan.already_removed_by:
        blocks.append(_section(f":information_source: {escape(plan.failed.name or plan.failed.id)} was removed by plan "
                               f"`{plan.already_removed_by}`; this plan adds its replacement."))
    if view.error:
        blocks.append(_section(f":x: *Failed:* {escape(view.error)}"))
    who = (f"Proposed by <@{view.proposer}> · approvers: {view.approvers} · "
           f"expires {slack_date(view.expires_at)} · plan ID `{plan.id}`")
    blocks.append(_context(who))
    if view.state == "proposed":
        blocks.append(_context(f"An approver reacts with :{view.reaction}: to approve; :{view.reject_reaction}: rejects "
                               f"(approver or proposer)."))
    text = (f"Plan {plan.id}: replace {failed_name} with {plan.new_name} in {plan.cluster}: {state}. "
            f"Proposed by <@{view.proposer}>; approvers {view.approvers}; react :{view.reaction}: to approve.")
    return Reply(text=text, blocks=blocks)


def plans_reply(cluster: str, rows: list[dict[str, Any]]) -> Reply:
    if not rows:
        return Reply(text=f"No plans for cluster {cluster} yet.")
    import json as _json
    lines = []
    for r in rows:
        p = _json.loads(r["plan"])
        lines.append(f"`{r['id']}` {STATE_WORD.get(r['state'], r['state']).split(' —')[0]} · replace "
                     f"{escape(p['failed']['name'] or p['failed']['id'])} with {escape(p['new_name'])} · by <@{r['proposer']}> · "
                     f"{slack_date(r['created_at'])}" + (f" · {escape(r['error'])}" if r.get("error") else ""))
    text = f"Recent plans for {cluster}:\n" + "\n".join(lines)
    return Reply(text=text, blocks=[_section(f"*Recent plans for {escape(cluster)}*"), _section("\n".join(lines))])


def thread_note(text: str) -> Reply:
    return Reply(text=text, blocks=[_section(escape_keep_mentions(text))])


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
