"""Block Kit printers of the answer models (bot/output/model.py), each with
its top-level `text` fallback (notifications, screen readers and clients
without blocks show it). The fallback is the CLI's plain-text printer
(bot/output/text.py) escaped, so Slack and the terminal say the same.

Escaping: every value from etcd, a user or a file goes through escape()
(or code()/code_block() inside code spans) where it is interpolated; a
mention exists only where mention()/group_mention() made it.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bot.domain import shell
from bot.domain.cluster import ClusterHealth, Consistency, MemberMetrics, member_labels
from bot.domain.defrag import DefragPlan
from bot.domain.mrkdwn import _item, _md, code, code_block, escape, link, mention, one_line
from bot.domain.plan import PlanState, Step
from bot.domain.quorum import QuorumVerdict
from bot.domain.record import PlanRecord
from bot.domain.replace import MemberRef, ReplacePlan
from bot.domain.restore import RestorePlan
from bot.domain.snapshot import CatalogEntry, DrillRecord, RemoteState
from bot.domain.urls import shown_urls
from bot.output import text as render
from bot.output.interactive import PlanChoice, alert_buttons, plan_buttons
from bot.output.model import (
    LEADERLESS,
    AlertView,
    CatalogView,
    MemberView,
    PerfView,
    Verdict,
    snapshot_view,
    status_view,
)
from bot.output.tables import table as render_table
from bot.output.text import K8S_AFTER, K8S_NOT_STOPPED, bump_note
from bot.output.units import humanize_bytes

if TYPE_CHECKING:  # the snapshot stream is gRPC; only its result type is needed here
    from bot.domain.snapshot import DrillResult, SavedSnapshot

MAX_SECTION = 2900  # Slack's limit is 3000 characters per text object


@dataclass(frozen=True)
class Reply:
    text: str
    blocks: list[dict[str, Any]] = field(default_factory=list)
    refusal: bool = False
    """Says what is wrong (error_reply): a shell that prints it exits non-zero."""

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


# ---------------------------------------------------------------- escaping


# ---------------------------------------------------------------- status

_ICON = {Verdict.HEALTHY: ":large_green_circle:", Verdict.DEGRADED: ":large_orange_circle:",
         Verdict.NO_LEADER: ":large_orange_circle:", Verdict.QUORUM_LOST: ":red_circle:",
         Verdict.UNKNOWN: ":large_orange_circle:"}


def _member_line(v: MemberView, label: str) -> str:
    """One member, each figure once: its name (the ID only where two share it, or it never started), state,
    version, database against its quota, raft position, and URLs."""
    m = v.member
    name = f"*{escape(label)}*" if m.name else f"*_(unstarted)_* {code(m.hex_id)}"
    if v.state == "REFUSED":
        first = (f":large_orange_circle: {name} — *REFUSED*: it answers, refusing the bot's credentials: "
                 f"{escape(v.problem or '')}")
    elif v.state == "DEFRAGMENTING":
        first = f":large_orange_circle: {name} — *DEFRAGMENTING*: {escape(v.problem or '')}"
    elif not v.reachable:
        first = f":red_circle: {name} — *DOWN*: {escape(v.problem or 'unreachable')}"
    elif v.problem:
        first = f":large_orange_circle: {name} — *UNHEALTHY*: {escape(v.problem)}"
    elif v.state in LEADERLESS:
        first = f":large_orange_circle: {name} — *{v.state}*"
    else:
        first = f":large_green_circle: {name} — {v.state}"
    facts = [escape(f) for f in v.facts]
    if v.alarms:
        facts.append(f":rotating_light: alarm {escape(', '.join(v.alarms))}")
    urls = f"peer {_urls(m.peer_urls)} · client {_urls(m.client_urls)}"
    return "\n".join([first, " · ".join(facts), urls] if facts else [first, urls])


def status_reply(health: ClusterHealth, requested_by: str | None = None,
                 metrics: Mapping[int, MemberMetrics | str] | None = None) -> Reply:
    view = status_view(health, metrics)
    blocks: list[dict[str, Any]] = [
        _header(f"etcd cluster {escape(view.cluster)}: {view.verdict}"),
        _section(f"{_ICON[view.verdict]} *{view.quorum_line}*"),
    ]
    label = member_labels((v.member.hex_id, v.member.name) for v in view.members)
    for a in view.alarms:
        on = label.get(f"{a.member_id:016x}", f"{a.member_id:016x}")
        blocks.append(_section(f":rotating_light: *ALARM {escape(a.kind)}* on member *{escape(on)}*"))
    blocks += [_section(f":point_right: {escape(line)}") for line in view.advice]
    blocks.append({"type": "divider"})
    blocks += [_section(_member_line(v, label[v.member.hex_id])) for v in view.members]
    if view.learned:
        blocks.append(_section(f":warning: {escape(view.learned)}"))
    who = f" · asked by {mention(requested_by)}" if requested_by else ""
    blocks.append(_context(f"{view.checked}{who}"))
    return Reply(text=escape(render.headline(view) + "".join(f"; {line}" for line in view.advice)
                             + (f"; {view.learned}" if view.learned else "")), blocks=blocks)


def members_reply(health: ClusterHealth) -> Reply:
    view = status_view(health)
    listing = render.members_text(view)
    blocks = [_section(f"*etcd cluster {escape(view.cluster)}* — member list"), _section(code_block(listing))]
    if view.learned:
        blocks.append(_context(f":warning: {escape(view.learned)}"))
    return Reply(text=escape(f"etcd cluster {view.cluster} members:\n{listing}"
                             + (f"\n{view.learned}" if view.learned else "")), blocks=blocks)


def unreachable_reply(cluster: str, error: str) -> Reply:
    return Reply(text=escape(render.unreachable_text(cluster, error)),
                 blocks=[_header(f"etcd cluster {escape(cluster)}: UNREACHABLE"),
                         _section(f":red_circle: {escape(error)}")])


# ---------------------------------------------------------------- answers to the person

def error_reply(reason: str, usage: str | None = None, hint: str | None = None) -> Reply:
    """One line saying what is wrong, what to do instead, then the usage.
    A plain str reason or hint is escaped whole (it may carry what the user
    typed or what etcd said); pass Mrkdwn to keep deliberate mentions."""
    lines = [f":warning: {_md(reason)}"] + ([_md(hint)] if hint else [])
    blocks = [_section(line) for line in lines]
    if usage:
        lines.append(f"Usage: {escape(usage)}")
        blocks.append(_context(f"Usage:\n{escape(usage)}"))
    return Reply(text="\n".join(lines), blocks=blocks, refusal=True)


def help_reply(usage: str, clusters: list[str]) -> Reply:
    bound = f"This channel speaks for: {', '.join(clusters)}" if clusters else "This channel is bound to no cluster."
    return Reply(text=escape(f"/etcd commands:\n{usage}\n{bound}"),
                 blocks=[_section("*/etcd* — operate the etcd clusters behind Kubernetes"),
                         _section(escape(usage)), _context(escape(bound))])


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
    fallback = dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(epoch)}^{{date_short_pretty}} {{time}}|{fallback}>"


def _urls(urls: tuple[str, ...] | list[str]) -> str:
    return escape(shown_urls(urls))


def _member_ref(m: MemberRef, label: str) -> str:
    return f"*{escape(label)}* · peer {_urls(m.peer_urls)} · client {_urls(m.client_urls)}"


@dataclass(frozen=True)
class PlanMessage(Reply):
    """A plan's message, and its long part (commands, environment, paths), which goes into the message's
    thread when the plan is posted: the message itself stays short enough to read at a glance."""

    details: Reply | None = None


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
    decided_at: float | None = None     # when it was approved, rejected, cancelled or abandoned


def _at(view: PlanView, state: str) -> int | None:
    """The index of the (first) step in `state`."""
    return next((i for i, s in sorted(view.step_states.items()) if s == state), None)


def _needs(view: PlanView, steps: int) -> str:
    """What the plan needs from the people reading it now, in a few words (the headline's second half)."""
    s = view.state
    if s == PlanState.PROPOSED:
        n = view.approvals_needed
        return f"needs {n} approvers ({len(view.approvals)} so far)" if n > 1 else "needs 1 approver"
    if s == PlanState.RUNNING:
        at = _at(view, "running")
        return f"running step {at} of {steps - 1}; the thread says if it needs you" if at is not None else "running"
    stopped = _at(view, "failed")
    where = f" at step {stopped}" if stopped is not None else ""
    return {PlanState.APPROVED: "approved, starting", PlanState.DONE: "done",
            PlanState.FAILED: f"FAILED{where}: an approver resumes or abandons it",
            PlanState.INTERRUPTED: "interrupted: an approver resumes or abandons it",
            PlanState.REJECTED: "rejected: nothing changed", PlanState.CANCELLED: "cancelled: nothing changed",
            PlanState.EXPIRED: "expired unapproved: nothing changed",
            PlanState.ABANDONED: "abandoned: nothing undone"}.get(s, str(s))


def _decision(view: PlanView) -> str | None:
    """Who decided, and when: what the buttons give way to once the plan is no longer proposed."""
    when = f" · {slack_date(view.decided_at)}" if view.decided_at else ""
    if view.state == PlanState.EXPIRED:
        return f":hourglass: Expired unapproved · {slack_date(view.expires_at)}"
    if not view.decided_by:
        return None
    verb = {PlanState.REJECTED: ":no_entry_sign: Rejected", PlanState.CANCELLED: ":wastebasket: Cancelled",
            PlanState.ABANDONED: ":wastebasket: Abandoned"}.get(view.state)
    if verb:
        return f"{verb} by {mention(view.decided_by)}{when}"
    approvers = view.approvals or (view.decided_by,)
    return f":white_check_mark: Approved by {', '.join(mention(u) for u in approvers)}{when}"


def replace_plan_reply(plan: ReplacePlan, view: PlanView) -> PlanMessage:
    """The replacement plan's message: what it does and what it needs first, the members, the steps and
    their progress; the new member's environment goes into the thread."""
    refs = (plan.failed, *plan.survivors, *plan.others_failed, *plan.also_remove)
    label = member_labels((m.id, m.name) for m in refs)
    failed = label[plan.failed.id]
    joins = "joins as a learner, then promoted" if plan.learner else "joins as a voting member (--no-learner)"
    voting, healthy = plan.quorum_now
    what = f"Replace {failed} with {plan.new_name} in {plan.cluster}"
    headline = f"{what} — {_needs(view, len(plan.steps))}"
    blocks: list[dict[str, Any]] = [
        _header(headline),
        *sections(f"*Failed:* {_member_ref(plan.failed, failed)} · quorum now {healthy} healthy of {voting} voting\n"
                  f"*New:* *{escape(plan.new_name)}* · peer {escape(plan.new_peer_url)} · client "
                  f"{escape(plan.new_client_url or '(set by the launcher)')} · {joins}"),
    ]
    blocks += _steps(plan.steps, view)
    if plan.others_failed:
        others = ", ".join(label[m.id] for m in plan.others_failed)
        text = (f":warning: Also failed: *{escape(others)}*. Members are replaced one at a time: propose the next "
                f"replacement after this plan completes.")
        if plan.also_remove:
            gone = ", ".join(label[m.id] for m in plan.also_remove)
            text += (f"\nThis plan removes *{escape(gone)}* too (step 2): etcd before 3.6 adds no member while a "
                     f"voting member is unreachable. Do not restart {escape(gone)} with its old data; replace it "
                     f"next with `/etcd replace {escape(plan.also_remove[0].name or plan.also_remove[0].id)} "
                     f"<new-name> <new-peer-url>`.")
        blocks += sections(text)
    if plan.already_removed_by:
        blocks.append(_section(f":information_source: {escape(failed)} was removed by plan "
                               f"`{plan.already_removed_by}`; this plan adds its replacement."))
    env = "\n".join(shell.assignments(plan.environment))
    details = Reply(text=f"Environment for {escape(plan.new_name)} (runbook step 4):\n{escape(env)}",
                    blocks=[_section(f"*Environment for {escape(plan.new_name)}* (runbook step 4):"),
                            *sections(escape(env), code=True)])
    also = f" and {', '.join(label[m.id] for m in plan.also_remove)}" if plan.also_remove else ""
    change = (f"Removes {failed}{also} from {plan.cluster} and adds {plan.new_name} ({plan.new_peer_url}); "
              f"{plan.cluster} has one member less until {plan.new_name} has joined.")
    choice = PlanChoice(plan.id, plan.fingerprint, plan.cluster, change, danger=True,
                        approvals_needed=view.approvals_needed)
    return _footer(plan.id, view, blocks, headline, choice, details=details)


def _steps(steps: tuple[Step, ...], view: PlanView) -> list[dict[str, Any]]:
    """One line per step, numbered, its state as an icon (no heading: a plan message stays under 15 lines)."""
    lines = []
    for i, step in enumerate(steps):
        st = view.step_states.get(i, "pending")
        lines.append(f"{STEP_ICON.get(st, ':white_square:')} {i}. {escape(step.title)}")
    return sections("\n".join(lines))


def _footer(plan_id: str, view: PlanView, blocks: list[dict[str, Any]], headline: str, choice: PlanChoice,
            proposer_note: str = "", details: Reply | None = None, details_note: str = "commands") -> PlanMessage:
    """Every plan message ends alike: the failure, its state, who proposed and may approve, then the
    Approve and Reject buttons while it is proposed, or who decided and when once someone has."""
    if view.error:
        blocks += sections(f":x: *Failed:* {escape(view.error)}")
    word = STATE_WORD.get(view.state, view.state.upper())
    approved = ""
    if view.approvals_needed > 1 and view.state == PlanState.PROPOSED:
        approved = (f" · approvals {len(view.approvals)} of {view.approvals_needed}"
                    + (f" ({', '.join(mention(u) for u in view.approvals)})" if view.approvals else ""))
    thread = f" · {details_note} in the thread" if details is not None else ""
    proposed = view.state == PlanState.PROPOSED
    react = f" · or react :{view.reaction}: to approve, :{view.reject_reaction}: to reject" if proposed else ""
    blocks.append(_context(f"*State:* {word} · proposed by {mention(view.proposer)}{proposer_note} · approvers: "
                           f"{view.approvers}{approved} · expires {slack_date(view.expires_at)} · plan "
                           f"`{plan_id}`{thread}{react}"))
    text = f"{escape(headline)}. Plan {plan_id}, proposed by {mention(view.proposer)}"
    if proposed:
        blocks.append(plan_buttons(choice))
        many = f"{view.approvals_needed} approvers" if view.approvals_needed > 1 else "an approver"
        text += f"; {many} of {view.approvers} approve (button, or react :{view.reaction}:)."
    else:
        decision = _decision(view)
        if decision:
            blocks.append(_context(decision))
        text += "."
    return PlanMessage(text=text, blocks=blocks, details=details)


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def restore_plan_reply(plan: RestorePlan, view: PlanView, now: float | None = None) -> PlanMessage:
    """A restore plan: why it may run, the snapshot, the members, the steps; each member's exact etcdutl
    command, the file's sha256 and place and the Kubernetes notes go into the thread."""
    now = time.time() if now is None else now
    snap = plan.snapshot
    voting, healthy = plan.quorum_now
    verdict = plan.quorum_verdict
    evidence = f"\n*Evidence:* {escape(plan.evidence)}" if plan.evidence else ""
    # the first line: a restore forced without evidence says the cluster may be healthy before anything else
    unproven = f", although {plan.cluster} may be healthy," if verdict is QuorumVerdict.UNPROVEN else ""
    if verdict is QuorumVerdict.UNPROVEN:
        gate = (f":warning: *{escape(plan.cluster)} may be healthy:* the bot has no evidence that it lost quorum "
                f"(--force). If it is healthy, *every write since the snapshot is lost.*{evidence}")
    elif verdict is QuorumVerdict.HELD:
        gate = (f":warning: *--force: the cluster has quorum* ({healthy} of {voting} healthy). This is a rollback: "
                f"*{plan.revisions_lost} revisions will be lost* (current revision {plan.current_revision}, "
                f"snapshot {snap.revision}).")
    else:
        gate = (f"*Quorum is lost:* {healthy} of {voting} voting members healthy, {voting // 2 + 1} needed "
                f"(checked by the bot; checked again before the members are stopped).{evidence}")
    source = ("the live member list" if plan.membership_source == "live"
              else "the last membership the bot recorded (no member answers)")
    foreign = ([] if not snap.foreign else sections(
        f":warning: *FOREIGN snapshot: this bot did not take {code(snap.file_name)}* ({escape(snap.foreign)}). "
        f"It was named with --force; its contents are checked only against its own unsigned manifest, and the "
        f"restore replaces {escape(plan.cluster)}'s data with whatever it holds."))
    what = (f"Restore {plan.cluster} from {'FOREIGN snapshot (not taken by this bot) ' if snap.foreign else ''}"
            f"{snap.file_name} "
            f"(revision {snap.revision}){unproven.rstrip(',')}")
    headline = f"{what} — {_needs(view, len(plan.steps))}"
    blocks: list[dict[str, Any]] = [_header(headline), *foreign, *sections(gate)]
    blocks += sections(f"*Snapshot:* {code(snap.file_name)}{' (age-encrypted)' if snap.encrypted else ''} · revision "
                       f"{snap.revision} · {snap.total_keys} keys · {humanize_bytes(snap.total_size)} · taken "
                       f"{ago(now - snap.created_at)} ago from {escape(snap.member)}"
                       + (" · from the snapshot store" if snap.from_store else "")
                       + f"\n*Members* ({len(plan.members)}, from {source}, seen "
                         f"{ago(now - plan.membership_seen_at)} ago): "
                       + ", ".join(f"*{escape(m.name)}*" for m in plan.members))
    if plan.newer:
        blocks += sections(f":warning: {len(plan.newer)} newer verified snapshot(s) exist: "
                           f"{escape(', '.join(plan.newer))}. Restoring an older one is deliberate only if the newer "
                           "ones may hold the bad data.")
    if plan.left_out:
        blocks += sections(f":information_source: *Left out:* {escape(', '.join(plan.left_out))}: "
                           f"learner{'s' if len(plan.left_out) > 1 else ''} that never started (no name or peer URL), "
                           "so no data to restore; the cluster is rebuilt from the others. Add "
                           f"{'them' if len(plan.left_out) > 1 else 'it'} again afterwards if still needed.")
    blocks += _steps(plan.steps, view)
    change = (f"Stops every member of {plan.cluster} and restores all {len(plan.members)} from {snap.file_name} "
              f"(revision {snap.revision}): every write after that revision is lost.")
    choice = PlanChoice(plan.id, plan.fingerprint, plan.cluster, change, danger=True,
                        approvals_needed=view.approvals_needed)
    return _footer(plan.id, view, blocks, headline, choice, proposer_note=" (cannot approve it)",
                   details=_restore_details(plan))


def _restore_details(plan: RestorePlan) -> Reply:
    """The long part of a restore plan, for its thread: where the file is, each member's data directory and
    exact etcdutl command, and the Kubernetes notes."""
    snap = plan.snapshot
    where = (f"*From the snapshot store:* {code(snap.remote_url)} (no local copy: fetched, checked against the "
             "catalog's size and sha256, and decrypted into a 0600 temporary file that is removed after each step)"
             if snap.from_store else f"*Stored at:* {code(snap.path)} (on the bot's host)")
    how = {"command": "the launcher runs `stop`, `restore` and `start` for each member",
           "ssh": "etcd-chatops-node runs it on each member's host over SSH, after copying the snapshot there, into "
                  "a new data directory beside the old one (moved aside, never deleted); the thread says per host "
                  "what ran and its result"}.get(
        plan.launcher, f"manual launcher: run these on each host when the thread asks, then confirm each stage with "
                       f"`/etcd continue {plan.id} <stage>`")
    local = snap.file_name if snap.from_store else snap.path   # a fetched copy's path is made at the step
    commands = "\n".join(f"{shell.comment(m.name)}\n{shell.command(plan.restore_args(m, local.removesuffix('.age')))}"
                         for m in plan.members)
    head = (f"*sha256:* {code(snap.sha256)} · hash {code(snap.hash)} · file {humanize_bytes(snap.file_size)}\n{where}\n"
            + "\n".join(f"• *{escape(m.name)}* · peer {escape(m.peer_url)} · client {_urls(m.client_urls)} · data dir "
                        f"{code(m.data_dir)}" for m in plan.members)
            + f"\n*{plan.restore_tool} snapshot restore on every member* (new cluster token, unique to this restore; "
              f"{escape(how)}):")
    tail = (f"*Kubernetes:* {'' if plan.stops_apiserver else escape(K8S_NOT_STOPPED) + ' '}{escape(K8S_AFTER)}\n"
            f":information_source: {escape(bump_note(plan))}")
    blocks = [*sections(head), *sections(escape(commands), code=True), *sections(tail)]
    return Reply(text=f"{head}\n{escape(commands)}\n{tail}", blocks=blocks)


def _defrag_table(plan: DefragPlan) -> str:
    """The defragmentation plan's members: sizes, quota use, the rule's verdict, the order, and once a
    member is done, its size after and the space reclaimed."""
    label = member_labels((m.ref.id, m.ref.name) for m in plan.members)
    rows = [[label[m.ref.id], m.role, humanize_bytes(m.db_size), humanize_bytes(m.db_size_in_use),
             humanize_bytes(m.free), f"{m.usage * 100:.0f} % of {humanize_bytes(m.quota)}"
             + ("" if m.quota_known else " (default assumed)"), "yes" if m.selected else "no (left alone)",
             str(m.order) if m.order else "-", "-" if m.after is None else humanize_bytes(m.after),
             "-" if m.after is None else humanize_bytes(max(m.db_size - m.after, 0))] for m in plan.members]
    return render_table(("MEMBER", "ROLE", "DB SIZE", "IN USE", "FREE", "QUOTA USE", "PASSES RULE", "ORDER", "AFTER",
                         "RECLAIMED"), rows)


def defrag_plan_reply(plan: DefragPlan, view: PlanView) -> PlanMessage:
    """A defragmentation plan: each member's size and quota use on one line (and its size after, once done),
    which the rule selects and in what order, the steps; the full table goes into the thread."""
    alarm = " · :rotating_light: NOSPACE active: writes fail until it is disarmed" if plan.nospace else ""
    label = member_labels((m.ref.id, m.ref.name) for m in plan.members)
    ordered = sorted(plan.members, key=lambda m: (not m.selected, m.order or 0))
    selected = ", ".join(label[m.ref.id] for m in ordered if m.selected)
    what = f"Defragment {selected} in {plan.cluster}"
    headline = f"{what} — {_needs(view, len(plan.steps))}"
    members = " · ".join(
        f"*{escape(label[m.ref.id])}* {humanize_bytes(m.db_size)} ({m.usage * 100:.0f} % of quota"
        + (", assumed" if not m.quota_known else "") + ")"
        + (f" → {humanize_bytes(m.after)}" if m.after is not None else "")
        + ("" if m.selected else " left alone") for m in ordered)
    blocks: list[dict[str, Any]] = [
        _header(headline),
        *sections(f"*Rule:* {code(plan.rule)} · "
                  + ("compacts to the current revision first" if plan.compact else "no compaction (--no-compact)")
                  + alarm + f"\n*Members:* {members}"),
    ]
    blocks += _steps(plan.steps, view)
    table = _defrag_table(plan)
    details = Reply(text=escape(table),
                    blocks=[_section("*Members, as planned:*"), *sections(escape(table), code=True)])
    change = (f"Defragments {selected} of {plan.cluster} one at a time; each member blocks its own reads and writes "
              "while it runs (the leader last, after leadership moves).")
    choice = PlanChoice(plan.id, plan.fingerprint, plan.cluster, change, danger=False,
                        approvals_needed=view.approvals_needed)
    return _footer(plan.id, view, blocks, headline, choice, details=details, details_note="the members' table")


@dataclass(frozen=True)
class PlanLine:
    """What `/etcd plans` shows of one plan: the few fields it reads."""

    id: str
    state: PlanState
    what: str                   # what the plan does, escaped: "replace m1 with m4", "restore from …", "defragment …"
    proposer: str
    created_at: float
    decided_by: str | None
    error: str | None

    @classmethod
    def of(cls, record: PlanRecord) -> PlanLine:
        p = record.plan
        if isinstance(p, RestorePlan):
            what = f"restore from {_item(p.snapshot.file_name)}"
        elif isinstance(p, DefragPlan):
            what = f"defragment {_item(', '.join(m.ref.name or m.ref.id for m in p.members if m.selected))}"
        else:
            what = f"replace {_item(p.failed.name or p.failed.id)} with {_item(p.new_name)}"
        return cls(id=record.id, state=record.state, what=what, proposer=record.proposer,
                   created_at=record.created_at, decided_by=record.decided_by, error=record.error)

    def reason(self) -> str | None:
        """The failure, or else the decision, in one escaped line; the full
        failure (launcher output) is in the plan's thread."""
        if self.error:
            return _item(self.error)
        if self.decided_by:
            decision = self.state if self.state in (PlanState.REJECTED, PlanState.CANCELLED) else "approved"
            return f"{decision} by {mention(self.decided_by)}"
        return _UNDECIDED.get(self.state)


_UNDECIDED = {PlanState.PROPOSED: "waiting for an approver", PlanState.EXPIRED: "nobody approved it in time"}


def plans_reply(cluster: str, records: list[PlanRecord]) -> Reply:
    if not records:
        return Reply(text=f"No plans for cluster {escape(cluster)} yet.")
    lines = []
    for p in map(PlanLine.of, records):  # the state, what and who, and why it is in that state
        reason = p.reason()
        lines.append(f"{code(p.id)} {STATE_WORD.get(p.state, p.state).split(' —')[0]} · {p.what} · "
                     f"by {mention(p.proposer)} · {slack_date(p.created_at)}"
                     + (f" · {reason}" if reason else ""))
    title = f"Recent plans for {escape(cluster)}"
    return Reply(text=f"{title}:\n" + "\n".join(lines), blocks=[_section(f"*{title}*"), _section("\n".join(lines))])


def thread_note(text: str) -> Reply:
    """A note under a plan; its values were escaped where they were written."""
    return Reply(text=text, blocks=sections(text))


# ---------------------------------------------------------------- snapshots

def snapshot_reply(saved: SavedSnapshot, requested_by: str, title: str = "Snapshot") -> Reply:
    """The runbook's status table plus where the file is and how to check it.
    The file itself never goes to Slack."""
    view = snapshot_view(saved)
    facts = (f"*File:* {code(view.file_name)}{' (age-encrypted)' if view.encrypted else ''} · {view.size}\n"
             f"*sha256:* {code(view.sha256)}\n"
             f"*Source:* {escape(view.member)} ({escape(view.endpoint)}) · took {view.took} · "
             f"asked by {mention(requested_by)}")
    blocks = [_section(f":camera_with_flash: *{escape(title)} of {escape(view.cluster)}* — verified"),
              _section(code_block(view.table)), _section(facts)]
    if view.offsite:
        blocks.append(_section((":white_check_mark: " if view.remote_verified else ":warning: ")
                               + f"*Off-site:* {escape(view.offsite)}"))
    if view.failed_over_from:
        blocks.append(_context(f":warning: {escape(view.failed_over_from)} stopped answering mid-stream; "
                               f"the snapshot was taken again from {escape(view.member)}"))
    if view.pruned:
        blocks.append(_context(f"Retention removed {len(view.pruned)} older snapshot(s): "
                               f"{escape(', '.join(view.pruned))}"))
    return Reply(text=escape(render.snapshot_line(view, title)), blocks=blocks)


def snapshot_failed_reply(cluster: str, reason: str, scheduled: bool = False) -> Reply:
    lead = ":rotating_light: *Scheduled snapshot FAILED*" if scheduled else ":x: *Snapshot failed*"
    text = f"{'Scheduled snapshot' if scheduled else 'Snapshot'} of {cluster} FAILED: {reason}"
    return Reply(text=escape(text),
                 blocks=[_section(f"{lead} for {code(cluster)}: {escape(reason)}\nNo file was kept.")])


def snapshot_joined_reply(cluster: str, started_by: str, started_at: float) -> Reply:
    """A request while a snapshot of the cluster runs: it waits for that one, not a second stream."""
    import datetime as dt
    utc = dt.datetime.fromtimestamp(started_at, dt.UTC).strftime("%H:%M:%S UTC")
    text = (f"a snapshot of {escape(cluster)} is already running, started by {mention(started_by)} at {utc}; "
            "you will get its result")
    return Reply(text=text, blocks=[_section(
        f":hourglass_flowing_sand: a snapshot of `{escape(cluster)}` is already running, started by "
        f"{mention(started_by)} at {slack_date(started_at)}; you will get its result")])


def snapshot_waiting_reply(cluster: str, replica: str) -> Reply:
    """A request while another replica snapshots the cluster: this one starts when that one ends."""
    text = f"a snapshot of {escape(cluster)} is running on replica {escape(replica)}; yours starts when it ends"
    return Reply(text=text, blocks=[_section(
        f":hourglass_flowing_sand: a snapshot of `{escape(cluster)}` is running on replica `{escape(replica)}`; "
        "yours starts when it ends")])


_PLACE = {"local": ":floppy_disk: local", "remote": ":cloud: remote only",
          "both": ":floppy_disk: local + :cloud: remote", "none": ":x: no copy left"}


def _where(e: CatalogEntry) -> str:
    """Where the copies are, and what went wrong with the off-site one."""
    if e.foreign:
        return (f":cloud: remote only · :warning: *FOREIGN*, not taken by this bot: {_item(e.foreign)} "
                "(never the default; restore only by name with --force)")
    if e.remote_state == RemoteState.FAILED:
        return f":floppy_disk: local · :warning: upload failed: {_item(e.remote_error or 'no reason recorded')}"
    if e.remote_state == RemoteState.MISSING:
        return f"{_PLACE[e.place]} · :warning: the store no longer has it"
    mark = {RemoteState.VERIFIED: " (verified)", RemoteState.LISTED: " (from its manifest)",
            RemoteState.UPLOADING: " · uploading"}.get(e.remote_state, "")
    return _PLACE[e.place] + mark


def snapshots_reply(view: CatalogView, drills: Mapping[int, DrillRecord] | None = None) -> Reply:
    """The catalog of both places, newest first, each with where its copies are and its last restore drill."""
    drills = drills or {}
    store = ([f":warning: the snapshot store could not be listed: {_item(view.store_error)}; local copies only"]
             if view.store_error else [])
    if not view.entries:
        text = "\n".join([f"No snapshots recorded for {escape(view.cluster)} yet. Take one with /etcd snapshot.",
                          *store])
        return Reply(text=text)
    lines = []
    for e in view.entries:
        if not e.described:  # no manifest: its name, size and upload time are all anyone knows
            lines.append(" · ".join([code(one_line(e.name)), humanize_bytes(e.file_size),
                                     slack_date(e.created_at), _where(e)]))
            continue
        lines.append(" · ".join([
            code(one_line(e.name)), f"rev {e.revision}", f"hash {_item(e.hash)}", f"{e.total_keys} keys",
            humanize_bytes(e.total_size), _item(e.member),
            *([mention(e.requested_by)] if e.requested_by else []), slack_date(e.created_at),
            *([":lock:"] if e.encrypted else []), *([_item(e.reason)] if e.reason else []), _where(e),
            *([_drill_mark(drills[e.snapshot_id])] if e.snapshot_id is not None and e.snapshot_id in drills else [])]))
    title = f"Snapshots of {escape(view.cluster)}"
    where = f" · store {code(view.store_url)}" if view.store_url else ""
    return Reply(text=f"{title} (newest first):\n" + "\n".join(lines + store),
                 blocks=[_section(f"*{title}* (newest first){where}"), *sections("\n".join(lines)),
                         *[_context(line) for line in store]])


def _drill_mark(d: DrillRecord) -> str:
    return f"drill {'passed' if d.ok else 'FAILED'} {slack_date(d.at)}"


def drill_reply(result: DrillResult, requested_by: str) -> Reply:
    """A drill's outcome: the snapshot boots (and matches the catalog), or why not."""
    head = (f":white_check_mark: Restore drill of {escape(result.snapshot)} ({escape(result.cluster)}) passed"
            if result.ok else f":x: Restore drill of {escape(result.snapshot)} ({escape(result.cluster)}) FAILED")
    text = f"{head} in {result.seconds:.1f}s: {escape(result.detail)}"
    if result.foreign:
        text += (f"\n:warning: {escape(result.snapshot)} is *FOREIGN*, not taken by this bot "
                 f"({escape(result.foreign)}): drilled on request, not added to the catalog")
    fetched = f"fetched from the snapshot store: {code(result.remote_url)} · " if result.remote_url else ""
    return Reply(text=text, blocks=[*sections(text), _context(f"{fetched}asked by {mention(requested_by)}")])


# ---------------------------------------------------------------- alarms, perf, consistency

def _report(ok: bool, text: str) -> Reply:
    """A check's answer: its first line as the headline, the rest (a table) as code."""
    head, _, rest = text.partition("\n")
    icon = ":large_green_circle:" if ok else ":red_circle:"
    blocks = [_section(f"{icon} *{escape(head)}*")] + ([_section(code_block(rest))] if rest else [])
    return Reply(text=escape(head), blocks=blocks)


def launcher_check_reply(cluster: str, hosts: Sequence[tuple[bool, str]]) -> Reply:
    """The ssh launcher's dry run: ready or not, one line per host (what the node said, or why the host cannot
    be used)."""
    ready = sum(ok for ok, _ in hosts)
    head = (f"Launcher check of {cluster}: {ready} of {len(hosts)} hosts ready"
            + ("" if ready == len(hosts) else ": a plan would stop before its first change"))
    lines = "\n".join(f"{':white_check_mark:' if ok else ':x:'} {escape(line)}" for ok, line in hosts)
    icon = ":large_green_circle:" if ready == len(hosts) else ":red_circle:"
    return Reply(text=escape(head), blocks=[_section(f"{icon} *{escape(head)}*"), *sections(lines)])


def alarms_reply(health: ClusterHealth) -> Reply:
    return _report(not health.alarms, render.alarms_text(status_view(health)))


def perf_reply(view: PerfView) -> Reply:
    return _report(view.all_ok, render.perf_text(view))


def consistency_reply(c: Consistency) -> Reply:
    return _report(c.agree, render.consistency_text(c))


# ---------------------------------------------------------------- watch alerts

def alert_reply(view: AlertView) -> Reply:
    """One watched condition: what, since when, the figures, the next commands as code, and the next step as
    buttons (a replacement or restore to propose, a mute, its runbook). Resolved, the same message says so and
    drops the suggestions and the buttons. The watch and the Alertmanager receiver both post it."""
    icon = ":white_check_mark:" if view.resolved else (":repeat:" if view.flapping else ":rotating_light:")
    severity = f"{escape(view.severity.upper())} · " if view.severity and not view.resolved else ""
    head = (f"{icon} {severity}*{escape(view.title.upper())}* {code(view.subject)} in cluster "
            f"*{escape(view.cluster)}*: {escape(view.summary)}")
    seen = f" · seen by {escape(render.seen_by(view.sources))}" if view.sources else ""
    blocks = [_section(head),
              _context(f"{escape(render.alert_state(view))} · since {slack_date(view.opened_at)}{seen}")]
    if view.figures:
        blocks.append(_section("\n".join(f"{escape(name)}: *{escape(value)}*" for name, value in view.figures)))
    if view.suggestions and not view.resolved:
        blocks.append(_section(":point_right: " + "\n".join(code(s) for s in view.suggestions)))
    if view.links:
        blocks.append(_context(" · ".join(link(url, f"runbook: {text}") for text, url in view.links)))
    if not view.resolved and not view.held:
        blocks.append(alert_buttons(view.cluster, view.subject, view.offers, view.runbook_url))
    return Reply(text=escape(render.alert_text(view)), blocks=blocks)


def alert_note(view: AlertView) -> Reply:
    """The thread reply when a condition clears, or comes back (flapping)."""
    if view.resolved:
        text = f":white_check_mark: {escape(render.resolved_text(view))}"
    else:
        text = f":repeat: back again: flapping ({view.flaps} times in the last minute)"
    return Reply(text=text, blocks=[_section(text)])


def alerts_reply(cluster: str, views: list[AlertView], muted: str | None = None,
                 held: Sequence[AlertView] | None = ()) -> Reply:
    """`/etcd alerts`: each open condition with its state and first suggestion, then those held back
    (muted, caused by the bot's own plan, within grace) and why."""
    text = render.alerts_text(cluster, views, muted, held)
    head, _, _ = text.partition("\n")
    icon = ":rotating_light:" if views else (":mute:" if held else ":large_green_circle:")
    blocks = [_section(f"{icon} *{escape(head)}*")]
    for v in [*views, *(held or ())]:
        nxt = f"\n:point_right: {code(v.suggestions[0])}" if v.suggestions else ""
        seen = f"; seen by {escape(render.seen_by(v.sources))}" if v.sources else ""
        blocks.append(_section(f"*{escape(v.title)}* {code(v.subject)}: {escape(v.summary)} "
                               f"({escape(render.alert_state(v))}{seen}){nxt}"))
    if held is None:
        blocks.append(_context("held back: not known here (this replica does not watch; the leader does)"))
    if muted:
        blocks.append(_context(f":mute: muted: {escape(muted)}"))
    return Reply(text=escape(text), blocks=blocks)


def mute_reply(cluster: str, until: float, reason: str, by: str) -> Reply:
    text = f":mute: New alerts of cluster *{escape(cluster)}* are held back until {slack_date(until)}: {escape(reason)}"
    return Reply(text=text, blocks=[_section(text), _context(f"muted by {mention(by)} · `/etcd unmute` ends it now")])


def unmute_reply(cluster: str, by: str) -> Reply:
    text = f":loud_sound: Alerts of cluster *{escape(cluster)}* are posted again"
    return Reply(text=text, blocks=[_section(text), _context(f"unmuted by {mention(by)}")])
