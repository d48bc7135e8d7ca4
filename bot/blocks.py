"""Block Kit renderings, each with a plain-text fallback (notifications,
screen readers and clients without blocks show the text)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bot import render
from bot.health import ClusterHealth, MemberHealth
from bot.units import humanize_bytes, humanize_duration

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


def error_reply(reason: str, usage: str | None = None) -> Reply:
    """One line saying what is wrong, then the usage."""
    text = f":warning: {reason}"
    blocks = [_section(f":warning: {escape(reason)}")]
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
    text = f"etcd cluster {cluster}: no endpoint answered: {error}"
    return Reply(text=text, blocks=[_header(f"etcd cluster {cluster}: UNREACHABLE"),
                                    _section(f":red_circle: No configured endpoint answered.\n{escape(error)}")])
