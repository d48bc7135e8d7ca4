"""Printers: one model per answer, and nothing from etcd or a user becomes Slack markup. Pure, no servers.

The Slack fallback `text` is the CLI's plain text escaped; Block Kit lays out the same
model. Any value (member names, URLs, etcd errors, file names, reasons) may hold
`<!channel>`, `<@U…>`, links or backticks: the renderers must never post them live.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.domain.cluster import Alarm, ClusterHealth, Member, MemberHealth, MemberStatus
from bot.domain.mrkdwn import Mrkdwn, code, code_block, escape, group_mention, mention
from bot.domain.plan import PlanKind, PlanState
from bot.domain.record import PlanRecord
from bot.domain.replace import MemberRef, ReplacePlan
from bot.domain.snapshot import SavedSnapshot, SnapshotStatus
from bot.output import blocks
from bot.output import text as render
from bot.output.blocks import Reply
from bot.output.model import Verdict, catalog_view, snapshot_view, status_view
from helpers import snapshot_record

ONCALL = "U0ONCALL01"
NASTY = ["<!channel>", "<!here>", "<!everyone>", "<@U0LEAD0001>", "<#C0INCIDENT|inc>", "<!subteam^S0ONCALLLD>",
         "<http://evil.example|click>", "<mailto:x@y|x>", "&lt;!channel&gt;", "&amp;", "`", "```", "*", "_", "~", ">",
         "<", "&", "\n", "member1", "http://10.0.0.1:2380", "\u202e"]
values = st.one_of(st.text(max_size=30), st.lists(st.sampled_from(NASTY), max_size=6).map("".join))
PLAIN = settings(deadline=None, max_examples=100, database=None)


def pieces(reply: Reply) -> list[str]:
    """Every text a Slack client renders: the fallback and each block's text."""
    out = [reply.text]
    for b in reply.blocks:
        if isinstance(b.get("text"), dict):
            out.append(b["text"]["text"])
        for e in b.get("elements", []):   # context texts; buttons, their dialogs
            out.append(e["text"] if isinstance(e["text"], str) else e["text"]["text"])
            out += [part["text"] for part in (e.get("confirm") or {}).values() if isinstance(part, dict)]
    return out


def live(reply: Reply, deliberate: tuple[str, ...] = ()) -> list[str]:
    """Every <…> (and stray >) in the reply that is not one of the tokens the renderer was asked to make."""
    found = []
    for text in pieces(reply):
        for token in deliberate:
            text = text.replace(token, "")
        text = re.sub(r"<!date\^\d+\^\{date_short_pretty\} \{time\}\|[^<>]*>", "", text)  # slack_date()
        found += re.findall(r"<[^<>]*>?|>", text)
    return found


# ---------------------------------------------------------------- models

def member(i: int, name: str | None = None, urls: str | None = None, learner: bool = False) -> Member:
    return Member(id=i, name=f"member{i}" if name is None else name,
                  peer_urls=(urls or f"http://10.0.0.{i}:2380",), client_urls=(urls or f"http://10.0.0.{i}:2379",),
                  is_learner=learner)


def status(i: int, leader: int = 1, errors: tuple[str, ...] = ()) -> MemberStatus:
    return MemberStatus(endpoint=f"http://10.0.0.{i}:2379", member_id=i, version="3.5.1", db_size=20480,
                        db_size_in_use=16384, leader=leader, raft_term=2, raft_index=10, raft_applied_index=10,
                        is_learner=False, errors=errors)


def health(*members: MemberHealth, alarms: tuple[Alarm, ...] = ()) -> ClusterHealth:
    return ClusterHealth("prod", tuple(members), alarms, 0.0, 0.012, 2.0)


DEGRADED = health(MemberHealth(member(1), error="connection refused (member down?)"),
                  MemberHealth(member(2), status(2, leader=2)), MemberHealth(member(3), status(3, leader=2)))


def saved(name: str = "member2", error: str | None = None, pruned: tuple[str, ...] = ()) -> SavedSnapshot:
    st_ = SnapshotStatus(hash=0xfe01cf57, revision=10, total_keys=7, live_keys=3, total_size=2_100_000,
                         has_trailer=True)
    return SavedSnapshot(cluster="prod", member=name, endpoint="http://10.0.0.2:2379",
                         path=Path("/var/lib/snap/prod/prod-20261201T100000Z-rev10.db"), file_size=2_100_032,
                         sha256="ab" * 32, status=st_, duration=0.5, created_at=0.0, failed_over_from=error,
                         pruned=pruned)


def test_status_is_decided_once_and_every_printer_agrees():
    view = status_view(DEGRADED)
    assert view.verdict is Verdict.DEGRADED and view.down == ["member1"]
    assert [v.state for v in view.members] == ["DOWN", "leader", "follower"]
    cli = render.status_text(view).splitlines()
    reply = blocks.status_reply(DEGRADED, requested_by=ONCALL)
    # The notification text is the CLI's first line, word for word.
    assert reply.text == cli[0] == ("cluster prod: DEGRADED: 2 of 3 voting members healthy, quorum needs 2, "
                                    "tolerates 0 more failures; DOWN: member1")
    assert render.status_json(view)["verdict"] == "DEGRADED" == reply.blocks[0]["text"]["text"].rsplit(": ", 1)[1]
    assert reply.blocks[-1]["elements"][0]["text"] == f"{view.checked} · asked by <@{ONCALL}>"
    assert cli[-1] == view.checked


def test_members_fallback_is_the_cli_listing():
    view = status_view(DEGRADED)
    reply = blocks.members_reply(DEGRADED)
    assert reply.text == f"etcd cluster prod members:\n{render.members_text(view)}"
    assert reply.blocks[1]["text"]["text"] == f"```{render.members_text(view)}```"


def test_snapshot_fallback_and_cli_come_from_one_model():
    view = snapshot_view(saved())
    reply = blocks.snapshot_reply(saved(), ONCALL)
    assert reply.text == render.snapshot_line(view) == (
        f"Snapshot of prod: hash fe01cf57, revision 10, 7 keys, 2.1 MB; file {view.file_name}, sha256 {'ab' * 32}")
    assert view.table in render.saved_text(view) and f"```{view.table}```" in pieces(reply)
    assert f"took {view.took}" in pieces(reply)[3] and f"in {view.took}" in render.saved_text(view)
    assert json.loads(json.dumps(render.saved_json(view)))["hash"] == "fe01cf57"


@settings(PLAIN)
@given(names=st.lists(values, min_size=1, max_size=4), url=values, error=values, alarm=values,
       requested_by=st.sampled_from([ONCALL, "schedule", "<!channel>", "U0LEAD0001>"]))
def test_no_etcd_value_becomes_markup_in_status_or_members(names, url, error, alarm, requested_by):
    members = [MemberHealth(member(1, names[0], url), error=error)]
    members += [MemberHealth(member(i + 2, n, url), status(i + 2, errors=(error,)), alarms=(alarm,))
                for i, n in enumerate(names[1:])]
    h = health(*members, alarms=(Alarm(2, alarm),))
    made = (mention(requested_by),) if requested_by == ONCALL else ()
    for reply in (blocks.status_reply(h, requested_by), blocks.members_reply(h),
                  blocks.unreachable_reply("prod", error)):
        assert not live(reply, made), reply
    # Whatever the names, the notification text is the CLI's headline, escaped.
    view = status_view(h)
    assert blocks.status_reply(h).text == escape(render.headline(view))
    assert render.status_text(view).startswith(render.headline(view))
    assert blocks.members_reply(h).text == escape(f"etcd cluster prod members:\n{render.members_text(view)}")
    # A value cannot end the member listing's code block early.
    listing = blocks.members_reply(h).blocks[1]["text"]["text"]
    assert listing.startswith("```") and listing.endswith("```") and "`" not in listing[3:-3]


@settings(PLAIN)
@given(name=values, error=values, pruned=st.lists(values, max_size=3), reason=values, requested_by=values)
def test_no_value_becomes_markup_in_snapshot_messages(name, error, pruned, reason, requested_by):
    made = (mention(requested_by),) if requested_by.startswith("U") else ()
    row = snapshot_record(cluster="prod", path=f"/snap/{name}.db", revision=3, hash="fe01", total_keys=1,
                          total_size=100, file_size=132, sha256="0" * 64, member=name, requested_by=requested_by,
                          created_at=1.7e9, encrypted=False, reason=reason, remote_state="failed", remote_error=error,
                          live_keys=None)
    for reply in (blocks.snapshot_reply(saved(name, error, tuple(pruned)), requested_by),
                  blocks.snapshot_failed_reply("prod", reason), blocks.snapshot_failed_reply("prod", reason, True),
                  blocks.snapshots_reply(catalog_view("prod", [row], None))):
        assert not live(reply, made), reply


@settings(PLAIN)
@given(reason=values, hint=st.none() | values, usage=st.none() | values)
def test_an_error_reply_posts_what_the_user_typed_as_words(reason, hint, usage):
    reply = blocks.error_reply(reason, usage, hint)
    assert not live(reply)
    assert reply.text.startswith(f":warning: {escape(reason)}")


def test_only_deliberate_mrkdwn_keeps_its_mentions():
    said = Mrkdwn(f"needs the approver role ({mention('U0LEAD0001')}, {group_mention('S0ONCALLLD')})")
    reply = blocks.error_reply(said, hint="see <!channel>")
    assert "<@U0LEAD0001>" in reply.text and "<!subteam^S0ONCALLLD>" in reply.text
    assert "&lt;!channel&gt;" in reply.text and not live(reply, ("<@U0LEAD0001>", "<!subteam^S0ONCALLLD>"))


def test_mention_only_for_slack_ids():
    assert mention("U0ONCALL01") == "<@U0ONCALL01>" and mention("W0ABC") == "<@W0ABC>"
    for word in ("schedule", "U0X>|<!channel", "u0oncall01", "<!channel>", "U0ONCALL01\n"):
        assert "<" not in mention(word) and "<" not in group_mention(word)


def test_a_value_cannot_end_a_code_span():
    assert code("a`b") == "`a\u02cbb`" and code("<!here>") == "`&lt;!here&gt;`"
    assert code_block("x```y") == "```x\u02cb\u02cb\u02cby```"


# ---------------------------------------------------------------- /etcd plans

def plan_row(i: int, state: str, error: str | None = None, decided_by: str | None = None,
             name: str = "member1") -> PlanRecord:
    failed = MemberRef("8211f1d0f64f3269", name, ("http://10.0.0.1:2380",), ("http://10.0.0.1:2379",))
    plan = ReplacePlan(id=f"p-{i:04d}", cluster="prod", failed=failed, new_name=f"member{i + 3}",
                new_peer_url="http://10.0.0.4:2380", new_client_url=None, learner=True, survivors=(), steps=(),
                fingerprint="f", quorum_now=(3, 2))
    return PlanRecord(id=plan.id, kind=PlanKind.REPLACE, cluster="prod", state=PlanState(state), plan=plan,
                      channel="C0INCIDENT", message_ts=None, proposer=ONCALL, created_at=1.7e9 + i,
                      expires_at=1.7e9 + i + 1800, approvals=(), current_step=0, decided_by=decided_by, error=error,
                      new_member_id=None)


LAUNCHER = ("step 4 (start member4) failed: the launcher exited with status 1:\n"
            + "\n".join(f"+ etcd --name member4 ... line {i} <!channel>" for i in range(40)))


def test_plans_lists_every_plan_with_a_one_line_reason():
    rows = [plan_row(0, "failed", error=LAUNCHER), plan_row(1, "rejected", decided_by="U0LEAD0001"),
            plan_row(2, "done", decided_by="U0LEAD0001"), plan_row(3, "proposed"),
            plan_row(4, "failed", error="x" * 400)]
    reply = blocks.plans_reply("prod", rows)
    lines = reply.blocks[1]["text"]["text"].splitlines()
    assert len(lines) == len(rows) and reply.text.splitlines()[1:] == lines
    assert lines[0].endswith("· step 4 (start member4) failed: the launcher exited with status 1: …")
    assert "line 0" not in reply.text
    assert lines[1].endswith("· rejected by <@U0LEAD0001>") and lines[2].endswith("· approved by <@U0LEAD0001>")
    assert lines[3].endswith("· waiting for an approver")
    assert lines[4].endswith("x…") and len(lines[4]) < 300
    assert not live(reply, (f"<@{ONCALL}>", "<@U0LEAD0001>"))


@settings(PLAIN)
@given(error=values, name=values, decided_by=values)
def test_no_value_becomes_markup_in_plans(error, name, decided_by):
    reply = blocks.plans_reply(name, [plan_row(0, "failed", error, decided_by, name),
                                      plan_row(1, "cancelled", None, decided_by, name)])
    made = (f"<@{ONCALL}>",) + ((mention(decided_by),) if mention(decided_by).startswith("<@") else ())
    assert not live(reply, made)
    assert len(reply.blocks[1]["text"]["text"].splitlines()) == 2


def test_the_printers_load_without_grpc_or_slack():
    code_ = ("import sys, bot.output.text, bot.output.model; "
             "print(sorted(m for m in ('grpc', 'aetcd', 'slack_sdk', 'slack_bolt', 'aiohttp') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code_], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr or proc.stdout
