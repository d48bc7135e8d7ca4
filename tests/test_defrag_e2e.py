"""`/etcd defrag`: a NOSPACE incident fixed by a rolling defragmentation under one
approval, on real clusters with a small quota; the leader last and only after leadership moved;
a member killed in the middle; the rule leaving a compact member alone."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from aetcd import rpc

from bot.domain.defrag import DefragPlan
from bot.domain.plan import Step
from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.testing.workspace import CHANNEL, LEAD, cluster_table
from helpers import (
    APPROVAL,
    OK,
    QUOTA_ARGS,
    ephemeral,
    eventually,
    fill_until_nospace,
    hold_at,
    members_of,
    plan_row,
    propose,
    replies,
    text_of,
    thread,
    wait_done,
    wait_state,
)

MiB = 1024 * 1024


async def _leader(c) -> tuple[int, dict[int, str]]:
    async with EtcdClient(c.endpoints) as client:
        health = await check_cluster(client, "check")
    assert health.leader_id is not None
    return health.leader_id, {h.member.id: h.member.name for h in health.members}


async def members_table(slack, plan) -> str:
    """The members' table in the plan's thread, once (the reply's blocks repeat its text)."""
    return await slack.wait_for(lambda: next((m.text for m in replies(slack, plan) if "PASSES RULE" in m.text), None),
                                what="the members' table in the thread")


async def test_nospace_is_fixed_by_one_approval_leader_last_after_the_move(make_cluster, slack, start_bot):
    c = make_cluster(3, extra_args=QUOTA_ARGS)
    await fill_until_nospace(c)
    leader, names = await _leader(c)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store

    plan = await propose(slack, "defrag")
    text = text_of(plan)
    row = await plan_row(store, plan)
    assert plan.text.startswith("Defragment ") and " in prod — needs 1 approver" in plan.text
    assert f"Plan {row['id']}, proposed by" in text and "NOSPACE active" in text
    assert "dbQuotaUsage &gt; 0.8 || dbSizeFree &gt; 200MiB" in text  # the default rule, escaped
    table = await members_table(slack, plan)
    for header in ("MEMBER", "DB SIZE", "IN USE", "FREE", "QUOTA USE", "PASSES RULE", "ORDER"):
        assert header in table
    assert table.count(" yes ") == 3 and "left alone" not in text  # every member near its quota passes the rule

    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    done = await wait_done(store, row["id"], timeout=180)
    steps = [(s.key, s.state, s.detail or "") for s in await store.steps(done["id"])]
    keys = [k for k, _, _ in steps]
    defrags = [k.removeprefix("defrag-") for k in keys if k.startswith("defrag-")]
    assert keys[:3] == ["recheck", "snapshot", "compact"] and keys[-2:] == ["disarm", "verify"]
    # The leader was defragmented last, right after leadership moved away from it.
    assert defrags[-1] == f"{leader:016x}" and keys.index("move-leader") == keys.index(f"defrag-{leader:016x}") - 1
    assert keys.index("move-leader") > max(keys.index(f"defrag-{d}") for d in defrags[:-1])
    new_leader, _ = await _leader(c)
    assert new_leader != leader
    move = next(d for k, _, d in steps if k == "move-leader")
    assert f"moved from {leader:016x}" in move and names[new_leader] in move
    assert all(state == "done" for _, state, _ in steps)
    assert "reclaimed" in next(d for k, _, d in steps if k == f"defrag-{leader:016x}")
    assert "NOSPACE disarmed" in next(d for k, _, d in steps if k == "disarm")

    # The alarm is gone and writes succeed again; the channel was told what was reclaimed.
    async with EtcdClient(c.endpoints) as client:
        assert not (await check_cluster(client, "check")).alarms
        await client.put(b"after", b"works")
    # The plan is done in the store before its message and thread say so: wait for the last note.
    notes = await slack.wait_for(lambda: "is done: prod defragmented:" in thread(slack, plan) and thread(slack, plan),
                                 what="the plan's done note")
    assert "reclaimed" in notes
    # The plan message itself showed the progress member by member: each version has one more size after.
    final = slack.find_message(CHANNEL, plan.ts)
    versions = [*(e["text"] + "".join(b.get("text", {}).get("text", "") for b in e["blocks"] or [])
                  for e in final.edits), text_of(final)]
    shown = sorted({v.split("*Members:*", 1)[1].split("\n", 1)[0].count(" → ") for v in versions if "*Members:*" in v})
    assert shown == [0, 1, 2, 3] and "*State:* DONE" in text_of(final)  # `m1 20 MB (119 % of quota) → 1 MB`
    for name in names.values():
        assert f"{name}: " in notes and " reclaimed in " in notes  # member by member


async def test_a_member_killed_mid_plan_stops_it_and_resume_continues(make_cluster, slack, start_bot):
    c = make_cluster(3, extra_args=QUOTA_ARGS)
    await fill_until_nospace(c)
    leader, names = await _leader(c)
    follower = next(n for i, n in names.items() if i != leader)
    # 3 s per read, not 1: with 1 s, the resume failed once in a run beside a busy CPU, all three members
    # missing its health check's deadline. The killed member is seen at once either way (its connections
    # are refused): the test took 2.2-2.7 s with both.
    bot = await start_bot([cluster_table("prod", c, timeout_seconds=3.0)], approval=APPROVAL)
    store = bot.ctx.store
    plan = await propose(slack, "defrag")
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)

    async def recheck_done() -> bool:
        return any(st.key == "recheck" and st.state == "done" for st in await store.steps(row["id"]))
    await eventually(recheck_done, 30, "the re-check to pass")
    c.kill(follower)
    failed = await wait_state(store, row["id"], ("failed",), timeout=180)
    assert follower in (failed.error or "") or "connection refused" in (failed.error or ""), failed.error
    # The plan is failed in the store before its thread says so: wait for the note.
    note = await slack.wait_for(lambda: "stopped" in thread(slack, plan) and thread(slack, plan), what="the stop note")
    assert "/etcd resume" in note
    ran = {st.key for st in await store.steps(row["id"]) if st.state == "done"}
    assert "verify" not in ran

    await asyncio.to_thread(c.restart, follower)
    answer = await ephemeral(slack, f"resume {row['id']}", user=LEAD)
    assert "Resuming plan" in text_of(answer)
    await wait_done(store, row["id"], timeout=180)
    async with EtcdClient(c.endpoints) as client:
        assert not (await check_cluster(client, "check")).alarms
        await client.put(b"after", b"works")


async def test_the_rule_leaves_a_compact_member_alone_and_a_bad_rule_is_refused(make_cluster, slack, start_bot):
    c = make_cluster(3, extra_args=QUOTA_ARGS)
    await fill_until_nospace(c)
    leader, names = await _leader(c)
    compact_id, compact_name = next((i, n) for i, n in names.items() if i != leader)
    url = c.member(compact_name).client_url
    async with EtcdClient(c.endpoints) as client:  # by hand: compact, and defragment one follower only
        await client.compact(await client.revision(url))

        async def shrunk() -> bool:  # each member applies the compaction on its own time
            await client.defragment(url)
            return (await client.status(url)).db_size < 8 * MiB
        await eventually(shrunk, 30, f"{compact_name} to shrink", interval=0.2)
    sizes = {h.member.id: h.status.db_size for h in await members_of(c) if h.status}
    assert sizes[compact_id] < 8 * MiB < min(size for i, size in sizes.items() if i != compact_id)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store

    refused = text_of(await ephemeral(slack, 'defrag --rule "dbSizeFree >"'))
    assert "rule: ends early" in refused and "Usage: /etcd defrag" in refused
    refused = text_of(await ephemeral(slack, "defrag --rule dbSpace>1"))
    assert "rule: unknown variable 'dbSpace' at column 1" in refused

    plan = await propose(slack, 'defrag --rule "dbSize > 8MiB" --no-compact')
    text = text_of(plan)
    assert "no compaction (--no-compact)" in text and text.count(" left alone") == 1
    table = await members_table(slack, plan)
    assert table.count(" yes ") == 2 and "no (left alone)" in table
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await wait_done(store, row["id"], timeout=180)
    keys = [st.key for st in await store.steps(row["id"])]
    assert f"defrag-{compact_id:016x}" not in keys and "compact" not in keys
    assert len([k for k in keys if k.startswith("defrag-")]) == 2
    await slack.wait_for(lambda: "(left alone)" in thread(slack, plan), what="the closing note")  # posted after done


async def test_a_leader_that_changed_since_the_plan_stops_it_before_anything_is_done(make_cluster, slack, start_bot):
    c = make_cluster(3, extra_args=QUOTA_ARGS)
    await fill_until_nospace(c)
    leader, names = await _leader(c)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    plan = await propose(slack, "defrag")
    row = await plan_row(store, plan)
    other = next(i for i in names if i != leader)
    async with EtcdClient(c.endpoints) as client:
        await client.move_leader(other)
    assert (await _leader(c))[0] == other
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    failed = await wait_state(store, row["id"], ("failed",), timeout=60)
    assert f"the leader changed from {leader:016x} to {other:016x} unexpectedly" in (failed.error or "")
    assert [st.key for st in await store.steps(row["id"]) if st.state == "done"] == []
    # The plan is failed in the store before its thread says so: wait for the note.
    await slack.wait_for(lambda: "a new plan is needed" in thread(slack, plan), what="the plan's stop note")


async def test_nospace_stays_armed_above_disarm_below_and_the_plan_says_why(make_cluster, slack, start_bot):
    c = make_cluster(3, extra_args=QUOTA_ARGS)
    await fill_until_nospace(c)
    bot = await start_bot([cluster_table("prod", c, defrag_disarm_below=0.01)], approval=APPROVAL)
    store = bot.ctx.store
    plan = await propose(slack, "defrag")
    assert "below 1 % of its quota" in text_of(plan)
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    failed = await wait_state(store, row["id"], ("failed",), timeout=180)
    disarm = next(st.detail for st in await store.steps(row["id"]) if st.key == "disarm")
    assert disarm.startswith("NOSPACE stays: member") and "not below 1 %" in disarm
    assert "NOSPACE is still active, so writes still fail" in (failed.error or "")
    async with EtcdClient(c.endpoints) as client:
        assert {a.kind for a in (await check_cluster(client, "check")).alarms} == {"NOSPACE"}


async def test_a_single_member_cluster_is_defragmented_in_place(make_cluster, slack, start_bot):
    """kubeadm's default is one etcd member: no leadership to move, so its leader is defragmented in place,
    and a plan made with a move step (before this was known) still runs through it when resumed."""
    c = make_cluster(1, extra_args=QUOTA_ARGS)
    await fill_until_nospace(c)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    plan = await propose(slack, "defrag")
    text = text_of(plan)
    assert "the only voter: no leadership to move" in text and "Move leadership" not in text
    row = await plan_row(store, plan)
    verify = hold_at(slack, [s.key for s in row.plan.steps].index("verify"))
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await verify.reached()
    # A member that applies the last over-quota writes late raises NOSPACE after the disarm step looked (seen on a
    # busy machine): the verify step disarms it too, since the member is below the threshold, and says so.
    async with EtcdClient(c.endpoints) as client:
        health = await check_cluster(client, "check")
        assert not health.alarms
        mid = health.members[0].member.id
        await client.failover(lambda ch, md, t: rpc.MaintenanceStub(ch).Alarm(rpc.AlarmRequest(
            action=rpc.AlarmRequest.ACTIVATE, memberID=mid, alarm=rpc.AlarmType.Value("NOSPACE")),
            timeout=t, metadata=md))
        assert {a.kind for a in (await check_cluster(client, "check")).alarms} == {"NOSPACE"}
    verify.release()
    done = await wait_done(store, row["id"], timeout=120)
    steps = {s.key: s.detail or "" for s in await store.steps(done["id"])}
    member_id = f"{mid:016x}"
    assert f"defrag-{member_id}" in steps and "move-leader" not in steps and "reclaimed" in steps[f"defrag-{member_id}"]
    assert "NOSPACE disarmed" in steps["disarm"]
    assert steps["verify"].startswith("NOSPACE raised again after the disarm step, and disarmed on 1 member; "
                                      "test write succeeded"), steps["verify"]
    async with EtcdClient(c.endpoints) as client:
        assert not (await check_cluster(client, "check")).alarms
        await client.put(b"after", b"works")

    # A plan stored with a move step, as the bot planned for one member before: the step passes, saying why.
    plan = await propose(slack, 'defrag --rule "dbSize > 0" --no-compact')
    row = await plan_row(store, plan)
    old = row.plan
    assert isinstance(old, DefragPlan)
    at = next(i for i, s in enumerate(old.steps) if s.key.startswith("defrag-"))
    old = replace(old, steps=(*old.steps[:at], Step("move-leader", "Move leadership"), *old.steps[at:]))
    await store.update_plan(row["id"], plan=json.dumps(old.to_json()))
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    done = await wait_done(store, row["id"], timeout=120)
    moved = next(s.detail for s in await store.steps(done["id"]) if s.key == "move-leader")
    assert moved == f"{member_id} is the only voter: no leadership to move; it is defragmented in place"


async def test_an_empty_or_too_deeply_nested_rule_is_refused_in_one_line(cluster, slack, start_bot):
    bot = await start_bot([cluster_table("prod", cluster)], approval=APPROVAL)
    for text, reason in (('defrag --rule ""', "rule: empty; e.g. dbQuotaUsage"), ("defrag --rule=", "rule: empty"),
                         (f'defrag --rule "{"(" * 3000}dbSize > 1{")" * 3000}"', "rule: nested deeper than")):
        refused = text_of(await ephemeral(slack, text))
        assert reason in refused and "Usage: /etcd defrag" in refused, refused[:300]
    assert await bot.ctx.store.open_plan("prod") is None
