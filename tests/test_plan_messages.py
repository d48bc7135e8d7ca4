"""Plan messages that read at a glance (pure: the renderers of bot/output): the first line says what will
happen and what it needs from you, the message stays short (the long part goes to its thread), members are
named (their ID only where two share a name), and the Approve and Reject buttons say what they do."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_plans import cluster, down, up
from test_restore_plan import plan as restore_plan

from bot.domain.cluster import Member, MemberHealth, MemberMetrics
from bot.domain.defrag import DefragPlan
from bot.domain.plan import PlanState
from bot.domain.replace import ReplacePlan, ReplaceRequest
from bot.domain.restore import RestorePlan
from bot.ops.defrag.plan import plan_defrag
from bot.ops.defrag.rule import parse_rule
from bot.ops.replace.plan import plan_replacement
from bot.output.blocks import PlanMessage, PlanView, defrag_plan_reply, replace_plan_reply, restore_plan_reply
from bot.output.interactive import read_value
from bot.output.text import plain
from helpers import cluster_health, member_status

MiB = 1 << 20


def view(state: PlanState = PlanState.PROPOSED, **kw: Any) -> PlanView:
    return PlanView(state=state, proposer="U0ONCALL01", approvers="<@U0LEAD0001>", expires_at=2e9,
                    reaction="white_check_mark", reject_reaction="x", **kw)


def replacement() -> ReplacePlan:
    return plan_replacement(cluster(down(1), up(2), up(3)), ReplaceRequest("member1", "member4", "http://10.0.0.4:2380"))


def defragmentation() -> DefragPlan:
    def member(i: int) -> MemberHealth:
        return MemberHealth(Member(i, f"m{i}", (f"http://10.0.0.{i}:2380",), (f"http://10.0.0.{i}:2379",)),
                            member_status(member_id=i, db_size=95 * MiB, db_size_in_use=9 * MiB, leader=2))
    quotas: dict[int, MemberMetrics | str] = {i: MemberMetrics(100 * MiB, None, None, 0, 0, 0, 0) for i in (1, 2, 3)}
    return plan_defrag(cluster_health(member(1), member(2), member(3)), quotas, parse_rule("dbQuotaUsage > 0.8"))


restoration: Callable[..., RestorePlan] = restore_plan   # a typed view of the restore tests' fixture
RENDER: dict[str, tuple[Callable[[], Any], Callable[[Any, PlanView], PlanMessage]]] = {
    "replace": (replacement, replace_plan_reply), "restore": (restoration, restore_plan_reply),
    "defrag": (defragmentation, defrag_plan_reply)}
WHAT = {"replace": "Replace member1 with member4 in prod", "restore": "Restore prod from prod-rev30.db (revision 30)",
        "defrag": "Defragment m1, m3, m2 in prod"}


def lines(message: PlanMessage) -> int:
    """How many lines a person reads in the message (each block's text; a button row is one line)."""
    count = 0
    for b in message.blocks:
        if isinstance(b.get("text"), dict):
            count += b["text"]["text"].count("\n") + 1
        elif b["type"] in ("context", "actions"):
            count += 1
    return count


@pytest.mark.parametrize("kind", RENDER)
@pytest.mark.parametrize("state, steps, needs", [
    (PlanState.PROPOSED, {}, "needs 1 approver"),
    (PlanState.RUNNING, {0: "done", 1: "done", 2: "running"}, "running step 2 of"),
    (PlanState.FAILED, {0: "done", 1: "failed"}, "FAILED at step 1: an approver resumes or abandons it"),
    (PlanState.DONE, {0: "done"}, "done"),
    (PlanState.REJECTED, {}, "rejected: nothing changed"),
    (PlanState.EXPIRED, {}, "expired unapproved: nothing changed"),
])
def test_the_first_line_says_what_will_happen_and_what_it_needs(kind: str, state: PlanState, steps: dict[int, str],
                                                                 needs: str) -> None:
    make, render = RENDER[kind]
    message = render(make(), view(state, step_states=steps, decided_by="U0LEAD0001" if state is PlanState.REJECTED
                                  else None))
    header = message.blocks[0]["text"]["text"]
    assert header == f"{WHAT[kind]} — {needs}" or header.startswith(f"{WHAT[kind]} — {needs}"), header
    assert message.text.startswith(header + ". Plan "), "the notification says the same first"


@pytest.mark.parametrize("kind", RENDER)
def test_a_plan_message_stays_short_its_long_part_goes_to_the_thread(kind: str) -> None:
    make, render = RENDER[kind]
    message = render(make(), view())
    assert lines(message) <= 15, [b.get("text") for b in message.blocks]
    if kind == "restore":
        assert message.details is not None and "etcdutl snapshot restore" in message.details.text
        assert "etcdutl" not in str(message.blocks) and "*sha256:*" not in str(message.blocks)
    if kind == "replace":
        assert message.details is not None and "ETCD_INITIAL_CLUSTER=" in message.details.text
        assert "ETCD_INITIAL_CLUSTER" not in str(message.blocks)


@pytest.mark.parametrize("kind, danger, change", [
    ("replace", True, "Removes member1 from prod and adds member4 (http://10.0.0.4:2380)"),
    ("restore", True, "Stops every member of prod and restores all 3 from prod-rev30.db (revision 30)"),
    ("defrag", False, "Defragments m1, m3, m2 of prod one at a time"),
])
def test_approve_and_reject_buttons_say_what_they_do(kind: str, danger: bool, change: str) -> None:
    make, render = RENDER[kind]
    plan = make()
    message = render(plan, view(approvals_needed=2))
    (row,) = [b for b in message.blocks if b["type"] == "actions"]
    approve, reject = row["elements"]
    assert (approve["action_id"], reject["action_id"]) == ("plan_approve", "plan_reject")
    assert approve["style"] == ("danger" if danger else "primary")
    assert (approve["confirm"].get("style") == "danger") is danger
    assert approve["confirm"]["title"]["text"] == f"Approve plan {plan.id} on prod?"
    assert approve["confirm"]["text"]["text"].startswith(change)
    assert "it runs when 2 approvers agree; each counts once" in approve["confirm"]["text"]["text"]
    assert "Nothing changes on prod" in reject["confirm"]["text"]["text"]
    assert read_value(approve["value"])["plan"] == plan.id == read_value(reject["value"])["plan"]


def test_once_decided_the_buttons_give_way_to_who_and_when() -> None:
    approved = replace_plan_reply(replacement(), view(PlanState.RUNNING, approvals=("U0LEAD0001", "U0LEAD0002"),
                                                      decided_by="U0LEAD0002", decided_at=1.8e9,
                                                      step_states={0: "running"}))
    assert not [b for b in approved.blocks if b["type"] == "actions"]
    assert approved.blocks[-1]["elements"][0]["text"].startswith(
        ":white_check_mark: Approved by <@U0LEAD0001>, <@U0LEAD0002> · <!date^1800000000^")


def test_members_are_named_and_an_id_shows_only_where_two_share_a_name() -> None:
    plain = replace_plan_reply(replacement(), view())
    assert "8211f1d0f64f3269" not in str(plain.blocks)
    twin = MemberHealth(Member(0x91BC3C398FB3C146, "member1", ("http://10.0.0.2:2380",), ("http://10.0.0.2:2379",)),
                        up(2).status)
    plan = plan_replacement(cluster(down(1), twin, up(3)), ReplaceRequest("8211f1d0f64f3269", "member4",
                                                                         "http://10.0.0.4:2380"))
    shown = str(replace_plan_reply(plan, view()).blocks)
    assert "member1 (8211f1d0f64f3269)" in shown and plan.steps[2].title == "Remove member1 (8211f1d0f64f3269)"


def test_a_long_step_list_from_another_kind_renders_each_step() -> None:
    """Steps are rendered generically: a restore with the ssh launcher's steps around kube-apiserver shows
    them like any other, in order."""
    plan = restoration(launcher="ssh", recipe="static-pod")
    shown = str(restore_plan_reply(plan, view()).blocks)
    assert "1. Stop kube-apiserver on every host" in shown and "2. Stop every member" in shown
    assert "7. Put kube-apiserver back on every host" in shown and "8. Post the Kubernetes follow-ups" in shown


def test_a_shell_reads_a_plan_as_the_channel_does_with_its_commands_ready_to_copy() -> None:
    """`etcd-chatops plan` prints the message and its long part as plain text: the headline first, no button
    labels, and the new member's environment without mrkdwn's code fences around its first and last line."""
    message = replace_plan_reply(replacement(), view())
    assert message.details is not None
    shown = plain(message.text, message.blocks).splitlines()
    assert shown[0] == "Replace member1 with member4 in prod — needs 1 approver"
    assert not any("Approve" in line or "Reject" in line for line in shown)
    env = plain(message.details.text, message.details.blocks).splitlines()
    assert "ETCD_NAME=member4" in env and "ETCD_INITIAL_CLUSTER_STATE=existing" in env
    assert not any("```" in line for line in env)
