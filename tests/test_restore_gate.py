"""The restore's safety gates, end to end on real etcd: a restore runs only on evidence that quorum is
lost (never because the bot cannot reach the cluster), re-checks that evidence whenever its stop step
runs (a resume too), leaves out a learner that never started, and no launcher process of a deposed
leader starts; the shipped launcher refuses a fencing token older than one it has seen."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_restore_e2e import approve_twice, keys, restore_approved, snapshot_of

from bot.domain.quorum import MemberState
from bot.domain.restore import RestorePlan
from bot.ops.launcher import LaunchResult, read_status
from bot.ops.launcher import run_argv as launcher_run_argv
from bot.ops.leadership import LEASE
from bot.ops.restore import run as recovery
from bot.testing.cluster import free_port
from bot.testing.workspace import LEAD, cluster_table, launcher_argv
from helpers import (
    APPROVAL,
    audit_actions,
    command,
    depose,
    ephemeral,
    eventually,
    is_plan_message,
    members_of,
    must,
    plan_of,
    plan_row,
    propose,
    reply,
    wait_done,
    wait_state,
)

NAMES = ["member1", "member2", "member3"]


def launch(base: Path, action: str, name: str, fence: str | None = None,
           **env: str) -> subprocess.CompletedProcess[str]:
    """The shipped launcher, run as the bot runs it (one action on one member)."""
    extra = {"ETCD_CHATOPS_FENCE": fence} if fence is not None else {}
    return subprocess.run([sys.executable, "-m", "bot.testing.start_member", "--base-dir", str(base), "--name", name,
                           "--action", action], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env, **extra})


async def test_a_healthy_cluster_the_bot_cannot_reach_is_not_restored_without_force(make_cluster, slack, start_bot,
                                                                                   tmp_path):
    """The cluster's CA was rotated and the bot still trusts the old one: every member is healthy, none
    answers the bot. No restore is proposed without --force, and the forced plan says first that the
    cluster may be healthy."""
    c = make_cluster(3, tls=True)
    old = tmp_path / "old-ca"
    shutil.copytree(c.base_dir / "tls", old)
    table = cluster_table("prod", c, cacert=str(old / "ca.crt"), cert=str(old / "client.crt"),
                          key=str(old / "client.key"))
    bot = await start_bot([table], approval=APPROVAL)
    store = bot.ctx.store
    await snapshot_of(slack, store, c, n=2)
    await reply(slack, "status")  # the bot records the membership it sees
    await asyncio.to_thread(c.rotate_tls)
    c.etcdctl("put", "/registry/after", "written after the snapshot")  # healthy, and taking writes

    refused = await ephemeral(slack, "restore")
    assert ("cannot restore prod: I cannot reach any member of prod from here: this is not proof that it lost "
            "quorum") in refused.text
    assert "--force" in refused.text
    assert await store.open_plan("prod") is None

    plan = await propose(slack, "restore --force")
    first = plan.text.splitlines()[0]
    assert first.startswith("Restore prod from ") and ", although prod may be healthy — needs 2 approvers" in first
    assert must(plan.blocks)[0]["text"]["text"] == first.split(". Plan ")[0]
    blocks = json.dumps(plan.blocks)
    assert "Quorum is lost" not in blocks
    assert "member1, member2, member3: running (the launcher's status), not answering the bot" in blocks
    assert all(c.running(m) for m in NAMES) and keys(c)["/registry/after"] == "written after the snapshot"


def flaky_launcher(base: Path, unreachable: Path) -> list[str]:
    """The shipped launcher behind an ssh-like hop: while `unreachable` exists, stopping member1 fails as an
    ssh to a host without a route does (exit 255), and nothing happens there."""
    script = ('if [ "$1" = stop ] && [ "$2" = member1 ] && [ -e "$3" ]; then '
              'echo "ssh: connect to host member1 port 22: No route to host" >&2; exit 255; fi; '
              f'exec "{sys.executable}" -m bot.testing.start_member --base-dir "{base}" --action "$1" --name "$2"')
    return ["sh", "-c", script, "launcher", "{action}", "{name}", str(unreachable)]


async def test_a_resumed_stop_finds_quorum_back_and_stops_nothing(make_cluster, slack, start_bot, tmp_path):
    """The stop failed on member1 (no route to its host); the members came back, healthy, and took new
    writes. The resume runs the quorum gate again: the plan stops, and nothing is stopped or restored."""
    c = make_cluster(3)
    unreachable = tmp_path / "member1-unreachable"
    unreachable.touch()
    table = cluster_table("prod", c, launcher={"kind": "command", "argv": flaky_launcher(c.base_dir, unreachable),
                                               "timeout_seconds": 60})
    bot = await start_bot([table], approval=APPROVAL)
    store = bot.ctx.store
    await snapshot_of(slack, store, c, n=2)
    plan, row = await restore_approved(slack, store, c)
    failed = await wait_state(store, row.id, ("failed",), timeout=60)
    error = failed.error or ""
    assert "step 1 (stop) failed" in error and "No route to host" in error, error
    assert not c.running("member3")  # the launcher stopped the one that ran

    unreachable.unlink()
    await asyncio.gather(*(asyncio.to_thread(c.restart, m) for m in NAMES))
    await asyncio.to_thread(c.wait_healthy)
    c.etcdctl("put", "/registry/after-the-stop", "must survive")
    await ephemeral(slack, f"resume {row.id}", user=LEAD)
    again = await eventually(lambda: _failed_again(store, row.id), 60, "the resumed plan to stop")
    assert "before step 1 (stop)" in again.error and "quorum is back (3 of 3" in again.error, again.error
    assert "nothing was stopped" in again.error
    assert all(c.running(m) for m in NAMES) and keys(c)["/registry/after-the-stop"] == "must survive"
    assert (await audit_actions(store, row.id)).count(("step_done", "stop")) == 0


async def test_a_member_started_again_while_the_stop_step_waits_fails_the_step_at_once(make_cluster, slack,
                                                                                     start_bot, tmp_path):
    """The stop step waits (60 s) for the launcher to show every member stopped. member3's stop changes nothing
    (a supervisor that brings the unit back), so the step waits; meanwhile someone starts member1, which the
    launcher had shown stopped. The step fails at once and names it, instead of after its 60 s (the nemesis's
    seed 21 waited them out, its longest test): nothing more was stopped, nothing restored."""
    c = make_cluster(3)
    calls = tmp_path / "launcher-calls"
    argv = ["sh", "-c", 'n=$1 a=$2; shift 2; if [ "$a $n" = "stop member3" ]; then rc=0; else "$@"; rc=$?; fi; '
                        'echo "$a $n $rc" >> "$0"; exit $rc',  # each call's answer, logged once it is given
            str(calls), "{name}", "{action}", *launcher_argv(c.base_dir)]
    bot = await start_bot([cluster_table("prod", c, launcher={"kind": "command", "argv": argv, "timeout_seconds": 60})],
                          approval=APPROVAL)
    store = bot.ctx.store
    await snapshot_of(slack, store, c, n=2)
    plan, row = await restore_approved(slack, store, c)

    def waiting() -> bool:  # after every stop action, the launcher answered the step: member1 is stopped
        lines = calls.read_text().splitlines() if calls.exists() else []
        stops = [i for i, line in enumerate(lines) if line.startswith("stop ")]
        return len(stops) == 3 and "status member1 3" in lines[stops[-1]:]
    await eventually(waiting, 60, "the stop step to see member1 stopped")
    await asyncio.to_thread(c.restart, "member1")
    failed = await wait_state(store, row.id, ("failed",), timeout=30)
    error = failed.error or ""
    assert "step 1 (stop) failed: started again after it was seen stopped: member1 " in error, error
    assert "member3" not in error.split("started again")[1]  # it never stopped: not news
    assert c.running("member1") and c.running("member3") and not c.running("member2")
    assert (await audit_actions(store, row.id)).count(("step_done", "stop")) == 0
    assert "restore " not in calls.read_text() and "start " not in calls.read_text()


async def _failed_again(store, plan_id):
    row = await store.plan(plan_id)
    return row if row.state == "failed" and "before step 1" in (row.error or "") else None


async def test_a_learner_that_never_started_is_left_out_and_every_action_carried_the_fence(make_cluster, slack,
                                                                                         start_bot):
    """A replacement was cut off between `member add --learner` and its start. The restore rebuilds the
    cluster from the three voters, the plan says the learner is left out, and each member's launcher saw
    the run's fencing token."""
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    before, _ = await snapshot_of(slack, store, c, n=3)
    add = ("member", "add", "member4", f"--peer-urls=http://127.0.0.1:{free_port()}", "--learner")
    await eventually(lambda: c.etcdctl(*add, check=False).returncode == 0, 15,
                     "the young cluster to accept a member")  # etcd wants 5 s of healthy voters first
    (learner,) = [h.member.hex_id for h in await members_of(c) if not h.member.name]
    c.etcdctl("put", "/registry/later", "gone after the restore")
    c.kill("member1")
    c.kill("member2")

    plan = await propose(slack, "restore")
    blocks = json.dumps(plan.blocks)
    assert f"Left out:* {learner}: learner that never started" in blocks
    assert "member1, member2: stopped (the launcher's status)" in blocks
    row = await plan_row(store, plan)
    restore = plan_of(RestorePlan, row)
    assert [m.name for m in restore.members] == NAMES and restore.left_out == (learner,)
    await approve_twice(slack, plan)
    await wait_done(store, row.id, timeout=180)
    assert keys(c) == before
    assert sorted(h.member.name for h in await members_of(c) if h.healthy) == NAMES  # and no learner
    token = (await store.lease(LEASE)).token
    assert [(c.base_dir / "members" / f"{m}.fence").read_text() for m in NAMES] == [str(token)] * 3


async def test_a_leader_deposed_right_before_its_launchers_start_starts_none(make_cluster, slack, start_bot,
                                                                              monkeypatch):
    """The lease moves to another replica after the stop step's precondition and the engine's check before
    the action, right before the launcher would start (as when the leader froze there): no launcher
    process runs, member3 keeps running, and the plan stays running for the new leader."""
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store, me = bot.ctx.store, bot.ctx.leadership
    await snapshot_of(slack, store, c, n=2)
    c.kill("member1")
    c.kill("member2")
    held: list[str] = []
    deposed = asyncio.Event()

    async def deposed_first(launcher, argv, environment, secrets, **kw):  # the hold point: the launcher start
        held.append(argv[argv.index("--name") + 1])
        if len(held) == 1:
            await eventually(lambda: depose(store, me.replica_id), 5, "another replica to take the lease")
            deposed.set()
        await deposed.wait()
        return await launcher_run_argv(launcher, argv, environment, secrets, **kw)
    monkeypatch.setattr(recovery, "run_argv", deposed_first)

    plan = await propose(slack, "restore")
    row = await plan_row(store, plan)
    await approve_twice(slack, plan)
    await eventually(lambda: len(held) == 3 and not bot.ctx.running, 60, "the deposed leader's run to stop")
    record = await store.plan(row.id)
    assert record.state == "running" and record.current_step == 1 and not record.error
    assert c.running("member3")  # its stop never started
    assert not list((c.base_dir / "members").glob("*.fence"))  # no fenced launcher process ran at all
    actions = await audit_actions(store, row.id)
    assert ("step_done", "stop") not in actions and not any(a == "step_failed" for a, _ in actions)


def test_the_launcher_refuses_an_older_fencing_token_and_changes_nothing(make_cluster):
    c = make_cluster(1)
    base = c.base_dir
    m = c.member("member1")
    start_env = {"ETCD_NAME": "member1", "ETCD_INITIAL_CLUSTER": f"member1={m.peer_url}",
                 "ETCD_INITIAL_ADVERTISE_PEER_URLS": m.peer_url, "ETCD_LISTEN_PEER_URLS": m.peer_url,
                 "ETCD_LISTEN_CLIENT_URLS": m.client_url, "ETCD_ADVERTISE_CLIENT_URLS": m.client_url,
                 "ETCD_INITIAL_CLUSTER_STATE": "new"}
    running = launch(base, "status", "member1")
    assert running.returncode == 0 and json.loads(running.stdout)["state"] == "running"

    assert launch(base, "stop", "member1", fence="7").returncode == 0  # leader 7 stopped it
    old = launch(base, "start", "member1", fence="6", **start_env)   # a deposed leader, late
    assert old.returncode != 0 and "refused: fencing token 6 is older than 7" in old.stderr, old.stderr
    stopped = launch(base, "status", "member1")
    assert stopped.returncode == 3 and json.loads(stopped.stdout)["state"] == "stopped"
    assert (base / "members" / "member1.fence").read_text() == "7"
    assert launch(base, "start", "member1", fence="not-a-token", **start_env).returncode != 0
    assert launch(base, "status", "member1").returncode == 3  # still nothing changed

    again = launch(base, "start", "member1", fence="7", **start_env)  # the same tenure retries: allowed
    assert again.returncode == 0, again.stderr
    assert launch(base, "status", "member1").returncode == 0
    assert launch(base.parent / "no-such-cluster", "status", "member1").returncode == 4


def test_a_status_answer_by_exit_status_or_by_its_json_state():
    """Exit 0 running, 3 stopped; a JSON answer's `state` decides (etcd-chatops-node answers exit 0 with it)."""
    def state(exit_status: int | None, output: str = "") -> MemberState:
        return read_status(LaunchResult(exit_status == 0, exit_status, output, f"x exited with {exit_status}")).state
    assert (state(0), state(3)) == (MemberState.RUNNING, MemberState.STOPPED)
    assert state(0, '{"ok":true,"action":"status","state":"stopped"}') is MemberState.STOPPED
    assert state(3, '{"member": "member1", "state": "stopped", "pid": null}') is MemberState.STOPPED
    for unknown in (state(1), state(2, "usage: ..."), state(None), state(4, '{"state": "stopped"}'),
                    state(0, '{"state":"stopping"}'), state(3, '{"state": "running"}')):
        assert unknown is MemberState.UNKNOWN


async def test_quorum_loss_is_proven_though_the_launchers_status_is_slow(make_cluster, slack, start_bot):
    """A launcher whose status takes longer than the settle time (SSH to each host of a loaded control plane)
    and cannot say stopped (members crash-looping) still leaves the settle time to see the survivor without a
    leader: the window counts from the first look's end, not from before it."""
    c = make_cluster(3)
    slow = ["sh", "-c", 'if [ "$1" = status ]; then sleep 1.5; echo crash-looping; exit 4; fi; shift; exec "$@"',
            "slow-status", "{action}", *launcher_argv(c.base_dir)]
    bot = await start_bot([cluster_table("prod", c, launcher={"kind": "command", "argv": slow, "timeout_seconds": 60},
                                         restore={"data_dir": str(c.base_dir / "data" / "{name}"),
                                                  "no_leader_seconds": 0.5, "apiserver": "none"})], approval=APPROVAL)
    await snapshot_of(slack, bot.ctx.store, c, n=2)
    c.kill("member1")
    c.kill("member2")

    def leaderless() -> bool:
        out = c.etcdctl("endpoint", "status", "-w", "json", endpoints=[c.member("member3").client_url], check=False)
        return out.returncode == 0 and not json.loads(out.stdout)[0]["Status"].get("leader")
    await eventually(leaderless, 30, "member3 to notice it has no leader")
    start = len(slack.messages)
    await command(slack, "restore")
    answer = await slack.wait_for_message(lambda m: is_plan_message(m) or m.ephemeral_to is not None,
                                          after=start, timeout=30, what="the answer to /etcd restore")
    assert is_plan_message(answer) and "Quorum is lost" in json.dumps(answer.blocks), answer.text
