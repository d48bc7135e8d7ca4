"""Buttons, modals, the menu and the App Home tab, end to end: real etcd, the real bot (bolt over aiohttp),
the Slack stand-in speaking block_actions, view_submission and views.*; every block and view the bot sends
passes slack_sdk's models in the stand-in. Refusals included: no role, a stale plan, a double click, an
expired trigger, an unsigned payload."""
from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable
from typing import Any

from conftest import StartBot

from bot.domain.plan import PlanState
from bot.testing.cluster import LocalCluster
from bot.testing.slack import Message, SlackStandIn
from bot.testing.workspace import CHANNEL, LEAD, LEAD2, ONCALL, STRANGER, cluster_table
from helpers import (
    APPROVAL,
    OK,
    audit_actions,
    command,
    eventually,
    must,
    plan_row,
    propose,
    reply,
    text_of,
    thread,
    urls,
    wait_done,
)

MakeCluster = Callable[..., LocalCluster]
FAST_WATCH = {"interval": "1s", "grace": "0s"}
OPERATORS = {"operators": [ONCALL, LEAD, LEAD2]}   # STRANGER holds no operator role


def ephemeral_to(slack: SlackStandIn, user: str, after: int) -> list[str]:
    return [m.text for m in slack.messages[after:] if m.ephemeral_to == user]


def buttons(msg: Message) -> dict[str, dict[str, Any]]:
    return {b["action_id"]: b for b in SlackStandIn.buttons(msg)}


async def alert(slack: SlackStandIn, word: str, timeout: float = 20) -> Message:
    return await slack.wait_for(lambda: next((m for m in slack.channel_messages(CHANNEL, include_threads=False)
                                              if m.source == "chat.postMessage" and word in m.text), None),
                                timeout, f"a {word} alert")


# ---------------------------------------------------------------- plan messages

async def test_approve_buttons_count_once_per_approver_beside_the_reactions(
        make_cluster: MakeCluster, slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval={**APPROVAL, "replace": {"approvals_needed": 2}})
    store = bot.ctx.store
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]}")
    row = await plan_row(store, plan)
    approve, reject = buttons(plan)["plan_approve"], buttons(plan)["plan_reject"]
    assert approve["style"] == "danger" and approve["confirm"]["style"] == "danger"
    dialog = approve["confirm"]["text"]["text"]
    assert "prod" in approve["confirm"]["title"]["text"] and "Removes member1 from prod and adds member4" in dialog
    assert "confirm" in reject and "style" not in reject["confirm"]
    stale = copy.deepcopy(plan)   # the message as a slow client still shows it

    # No role: a one-line refusal to the clicker alone; nothing changes, nothing in the thread.
    start = len(slack.messages)
    await slack.click(STRANGER, plan, "plan_approve")
    await slack.wait_for(lambda: ephemeral_to(slack, STRANGER, start), what="the refusal")
    (refusal,) = ephemeral_to(slack, STRANGER, start)
    assert f"<@{STRANGER}> is not an approver" in refusal and slack.dialogs[-1] == approve["confirm"]
    assert must(await store.plan(row.id)).approvals == () and "not an approver" not in thread(slack, plan)

    # A click and a reaction of one approver count once; a double click is refused in one line.
    start = len(slack.messages)
    await asyncio.gather(slack.click(LEAD, plan, "plan_approve"), slack.click(LEAD, stale, "plan_approve"))
    await slack.wait_for(lambda: "Approval 1 of 2" in thread(slack, plan), what="the first approval")
    await slack.wait_for(lambda: ephemeral_to(slack, LEAD, start), what="the double click's refusal")
    (twice,) = ephemeral_to(slack, LEAD, start)
    assert "approved plan" in twice and "already; each approver counts once (1 of 2)" in twice and "\n" not in twice
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)   # the same store path: once
    await slack.wait_for(lambda: len(ephemeral_to(slack, LEAD, start)) == 2, what="the reaction counted for nothing")
    assert "each approver counts once (1 of 2)" in ephemeral_to(slack, LEAD, start)[1]
    assert must(await store.plan(row.id)).approvals == (LEAD,)
    assert "approvals 1 of 2" in text_of(must(slack.find_message(CHANNEL, plan.ts)))

    await slack.click(LEAD2, plan, "plan_approve")
    done = await wait_done(store, row.id)
    assert done.approvals == (LEAD, LEAD2)
    final = must(slack.find_message(CHANNEL, plan.ts))
    assert not buttons(final), "once approved, the buttons give way"
    assert f"Approved by <@{LEAD}>, <@{LEAD2}> · <!date^" in text_of(final)
    actions = [a for a, _ in await audit_actions(store, row.id)]
    assert actions.count("plan_approval") == 1 and actions.count("plan_approved") == 1

    # Too late: the stale message's button is refused in one line, naming who approved and when.
    start = len(slack.messages)
    await slack.click(LEAD2, stale, "plan_approve")
    await slack.wait_for(lambda: ephemeral_to(slack, LEAD2, start), what="the stale click's refusal")
    (late,) = ephemeral_to(slack, LEAD2, start)
    assert f"is done by <@{LEAD2}> at <!date^" in late and "changes nothing" in late and "\n" not in late


async def test_reject_button_then_stale_and_forged_clicks_change_nothing(
        make_cluster: MakeCluster, slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]}")
    row = await plan_row(store, plan)
    stale = copy.deepcopy(plan)
    forged = copy.deepcopy(plan)
    for b in SlackStandIn.buttons(forged):   # a button of an older plan of the same ID, or a forged value
        b_value = json.loads(b["value"])
        for block in forged.blocks or []:
            for e in block.get("elements", []):
                if e.get("action_id") == b["action_id"]:
                    e["value"] = json.dumps({**b_value, "fp": "0000000000000000"})
    start = len(slack.messages)
    await slack.click(LEAD, forged, "plan_approve")
    await slack.wait_for(lambda: ephemeral_to(slack, LEAD, start), what="the forged click's refusal")
    assert "belongs to another version of plan" in ephemeral_to(slack, LEAD, start)[0]
    assert must(await store.plan(row.id)).state is PlanState.PROPOSED

    await slack.click(ONCALL, plan, "plan_reject")   # the proposer may reject
    await slack.wait_for(lambda: f"Rejected by <@{ONCALL}>" in thread(slack, plan), what="the rejection")
    final = must(slack.find_message(CHANNEL, plan.ts))
    assert not buttons(final) and f"Rejected by <@{ONCALL}> · <!date^" in text_of(final)
    assert final.text.startswith("Replace member1 with member4 in prod — rejected: nothing changed")

    start = len(slack.messages)
    await slack.click(LEAD, stale, "plan_approve")
    await slack.wait_for(lambda: ephemeral_to(slack, LEAD, start), what="the stale click's refusal")
    (late,) = ephemeral_to(slack, LEAD, start)
    assert f"is rejected by <@{ONCALL}> at <!date^" in late and "changes nothing" in late
    assert must(await store.plan(row.id)).state is PlanState.REJECTED


async def test_an_unsigned_click_is_refused_and_a_redelivered_one_acts_once(
        make_cluster: MakeCluster, slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval={**APPROVAL, "replace": {"approvals_needed": 2}})
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]}")
    row = await plan_row(bot.ctx.store, plan)
    first = await slack.click(LEAD, plan, "plan_approve")
    again = await slack.deliver_interaction(slack.interactions[-1])   # Slack delivers it twice (another replica)
    assert (first.status, again.status) == (200, 200) and max(first.elapsed, again.elapsed) < 3
    forged = {**slack.interactions[-1], "user": {"id": LEAD2, "username": "carol", "name": "carol"}}
    assert (await slack.deliver_interaction(forged, sign=False)).status == 401
    await slack.wait_for(lambda: "Approval 1 of 2" in thread(slack, plan), what="the approval")
    await eventually(lambda: not bot.ctx.tasks, 10, "the listeners to finish")
    assert must(await bot.ctx.store.plan(row.id)).approvals == (LEAD,)
    assert not [m for m in slack.messages if m.ephemeral_to == LEAD], "a redelivery is not a double click"


# ---------------------------------------------------------------- alerts, forms, mute

async def test_member_down_alert_opens_a_replacement_form_checked_before_it_closes(
        make_cluster: MakeCluster, slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c, watch=FAST_WATCH, timeout_seconds=0.5, access=OPERATORS)],
                          approval=APPROVAL)
    c.kill("member1")
    msg = await alert(slack, "MEMBER DOWN")
    found = buttons(msg)
    assert {"propose_replace", "alert_mute", "alert_runbook"} <= set(found) and "propose_restore" not in found
    assert found["alert_runbook"]["url"].startswith("https://etcd.io/docs/")

    # No operator role: the form opens at once (the trigger expires in 3 s), then says why it cannot be used.
    await slack.click(STRANGER, msg, "propose_replace")
    (refused,) = await slack.wait_for(lambda: [v for v in slack.open_views(STRANGER) if v.history], what="refusal")
    assert "needs the operator role" in json.dumps(refused.view) and "submit" not in refused.view

    await slack.click(ONCALL, msg, "propose_replace")
    (form,) = await slack.wait_for(lambda: slack.open_views(ONCALL), what="the replacement form")
    failed = next(b for b in form.view["blocks"] if b.get("block_id") == "failed")
    assert failed["element"]["initial_value"] == "member1" and "prod" in json.dumps(form.view["blocks"][0])
    posted = len(slack.messages)
    bad = await slack.submit(form, {"failed": "member1", "new_name": "member2", "new_peer_url": "not-a-url"})
    assert bad.status == 200 and not form.closed
    assert set(form.errors) == {"new_name", "new_peer_url"}, form.errors
    assert "already used by member" in form.errors["new_name"] and "<new-peer-url>" in form.errors["new_peer_url"]
    assert len(slack.messages) == posted, "inline errors, not a new message"

    peer, client = urls()
    await slack.submit(form, {"failed": "member1", "new_name": "member4", "new_peer_url": peer, "client_url": client})
    assert form.closed
    plan = await slack.wait_for(lambda: next((m for m in slack.messages[posted:] if m.thread_ts is None
                                              and buttons(m).get("plan_approve")), None), what="the plan message")
    assert plan.text.startswith("Replace member1 with member4 in prod — needs 1 approver")
    row = await plan_row(bot.ctx.store, plan)
    assert row.proposer == ONCALL and row.plan.new_client_url == client


async def test_the_mute_button_mutes_for_an_hour_and_needs_the_operator_role(
        make_cluster: MakeCluster, slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c, watch=FAST_WATCH, timeout_seconds=0.5, access=OPERATORS)])
    c.kill("member2")
    msg = await alert(slack, "MEMBER DOWN")
    assert "Mute prod for 1 hour?" in buttons(msg)["alert_mute"]["confirm"]["title"]["text"]
    start = len(slack.messages)
    await slack.click(STRANGER, msg, "alert_mute")
    await slack.wait_for(lambda: ephemeral_to(slack, STRANGER, start), what="the refusal")
    assert "needs the operator role" in ephemeral_to(slack, STRANGER, start)[0] and not await bot.ctx.store.mutes()
    await slack.click(LEAD, msg, "alert_mute")
    muted = await slack.wait_for_message(lambda m: "held back until" in m.text and m.ephemeral_to is None,
                                         after=start, what="the mute")
    (mute,) = await bot.ctx.store.mutes()
    assert mute.by == LEAD and 3590 < mute.until - time.time() <= 3600 and "alert's button" in mute.reason
    assert f"muted by <@{LEAD}>" in text_of(muted)


async def test_quorum_lost_alert_offers_the_verified_snapshots_to_restore_from(
        make_cluster: MakeCluster, slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c, watch=FAST_WATCH, timeout_seconds=0.5)],
                          approval=APPROVAL)
    await reply(slack, "snapshot", timeout=60)
    (snap,) = await bot.ctx.store.snapshots("prod")
    for name in ("member1", "member2"):
        c.kill(name)
    msg = await alert(slack, "QUORUM LOST")
    assert "propose_restore" in buttons(msg)
    for down in [m for m in slack.messages if "MEMBER DOWN" in m.text]:
        assert "propose_replace" not in buttons(down) and "/etcd replace" not in text_of(down)

    await slack.click(ONCALL, msg, "propose_restore")
    (form,) = await slack.wait_for(lambda: [v for v in slack.open_views(ONCALL) if v.view.get("callback_id")],
                                   what="the snapshots in the form")
    assert form.history and "Listing the verified snapshots" in json.dumps(form.history[0])  # opened at once
    calls = [c.method for c in slack.calls]
    assert calls.index("views.open") < calls.index("views.update")
    select = next(b for b in form.view["blocks"] if b.get("block_id") == "snapshot")["element"]
    name = snap.path.rsplit("/", 1)[-1]
    assert [o["value"] for o in select["options"]] == [name] and select["initial_option"]["value"] == name
    posted = len(slack.messages)
    await slack.submit(form, {"snapshot": name})
    plan = await slack.wait_for(lambda: next((m for m in slack.messages[posted:] if m.thread_ts is None
                                              and buttons(m).get("plan_approve")), None), 30, "the restore plan")
    assert plan.text.startswith(f"Restore prod from {name} (revision {snap.revision}) — needs 2 approvers")
    assert buttons(plan)["plan_approve"]["style"] == "danger"
    assert "etcdutl snapshot restore" not in text_of(plan)   # the commands are in the thread
    await slack.wait_for(lambda: "etcdutl snapshot restore" in thread(slack, plan), what="the commands")


async def test_an_expired_trigger_opens_no_form_and_the_person_is_told(
        make_cluster: MakeCluster, slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_cluster(3)
    await start_bot([cluster_table("prod", c, watch=FAST_WATCH, timeout_seconds=0.5)])
    c.kill("member3")
    msg = await alert(slack, "MEMBER DOWN")
    slack.trigger_ttl = 0.0   # as if the click had reached the bot after Slack's 3 s
    start = len(slack.messages)
    await slack.click(ONCALL, msg, "propose_replace")
    await slack.wait_for(lambda: ephemeral_to(slack, ONCALL, start), what="the explanation")
    assert "came too late (expired_trigger_id); click again" in ephemeral_to(slack, ONCALL, start)[0]
    assert not slack.open_views() and slack.calls_to("views.open")[-1].response["error"] == "expired_trigger_id"


# ---------------------------------------------------------------- the menu and the App Home tab

async def test_etcd_alone_is_a_menu_whose_buttons_run_their_commands(
        make_cluster: MakeCluster, slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_cluster(3)
    await start_bot([cluster_table("prod", c)])
    start = len(slack.messages)
    await command(slack, "")
    menu = await slack.wait_for_message(lambda m: m.ephemeral_to == ONCALL, after=start, what="the menu")
    labels = [b["text"]["text"] for b in SlackStandIn.buttons(menu)]
    assert labels[:5] == ["Status", "Alerts", "Plans", "Snapshots", "Take a snapshot"] and "Help" in labels
    assert "Propose replacement…" not in labels and "Propose restore…" not in labels  # nothing needs one
    assert "HEALTHY" in text_of(menu)
    start = len(slack.messages)
    await slack.click(ONCALL, menu, "menu_run", value=SlackStandIn.buttons(menu)[0]["value"])
    status = await slack.wait_for_message(lambda m: m.ephemeral_to is None and "etcd cluster prod" in text_of(m),
                                          after=start, what="the status")
    assert status.source == "chat.postMessage"

    c.kill("member2")
    start = len(slack.messages)
    await command(slack, "menu")
    menu = await slack.wait_for_message(lambda m: m.ephemeral_to == ONCALL, after=start, what="the menu")
    assert "Propose replacement…" in [b["text"]["text"] for b in SlackStandIn.buttons(menu)]

    start = len(slack.messages)
    await command(slack, "", channel="C0ELSEWHERE")   # no cluster here: the help
    helped = await slack.wait_for_message(lambda m: m.ephemeral_to == ONCALL, after=start, what="the help")
    assert "/etcd commands" in helped.text and not SlackStandIn.buttons(helped)


async def test_the_home_tab_shows_each_readable_cluster_at_a_glance(
        make_cluster: MakeCluster, slack: SlackStandIn, start_bot: StartBot) -> None:
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c, access={"readers": [ONCALL, LEAD]})], approval=APPROVAL)
    await reply(slack, "snapshot", timeout=60)
    c.kill("member1")
    plan = await propose(slack, f"replace member1 member4 {urls()[0]}")
    row = await plan_row(bot.ctx.store, plan)
    delivery = await slack.open_home(ONCALL)
    assert delivery.status == 200
    home = await slack.wait_for(lambda: slack.homes.get(ONCALL), what="the home tab")
    shown = json.dumps(home)
    for expected in ("*prod*", "DEGRADED", "2 of 3 voting members healthy", f"`{row.id}` proposed",
                     "replace member1 with member4", "newest snapshot prod-", "no restore drill yet"):
        assert expected in shown, expected
    await slack.open_home(STRANGER)
    stranger = await slack.wait_for(lambda: slack.homes.get(STRANGER), what="the stranger's home tab")
    assert "You may read no cluster" in json.dumps(stranger) and "prod" not in json.dumps(stranger)
