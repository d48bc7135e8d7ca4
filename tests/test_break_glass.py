"""Break glass: when Slack is down, plans are proposed, approved and run from a shell (`etcd-chatops plan`) over
the same engine and store, every action audited as break glass, and posted in the channel once Slack answers."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

from bot.cli import EXIT_OK
from bot.cli.plan import FOLLOW_SECONDS, ShellNotifier, _run
from bot.config import load_config
from bot.domain.plan import PlanState
from bot.ops.context import BotContext
from bot.ops.notify import PlainDirectory
from bot.runtime import upkeep
from bot.testing.workspace import CHANNEL, cluster_table, write_config
from helpers import APPROVAL, eventually, members_of, open_store, reply, text_of, urls


def plan_cli(cli, config: Path):
    """`etcd-chatops plan ACTION ...` against the bot's config (in a thread: the CLI is a process of its own)."""
    async def run(action: str, *args: str, person: str | None = "bob", reason: str = "Slack is down",
                  words: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        acting = ("--as", person, "--reason", reason) if person is not None else ()
        argv = ("plan", action, *args, *acting, "--config", str(config), *words)
        return await asyncio.to_thread(lambda: cli(*argv))
    return run


def plan_id(out: str) -> str:
    found = re.search(r"^proposed plan (\w+);", out, re.M)
    assert found, out
    return found.group(1)


class SlowToSayDone(ShellNotifier):
    """The shell's notifier, slower than a run's poll to show a plan done: the engine writes its audit row
    and closing note after the plan's state, and a run that saw the state in between said its last line first."""

    async def plan_changed(self, record, step_states):
        if record.state == PlanState.DONE:
            await asyncio.sleep(FOLLOW_SECONDS * 2)
        await super().plan_changed(record, step_states)


async def test_a_run_from_a_shell_says_how_it_ended_after_the_closing_note(make_cluster, cli, tmp_path, capsys):
    """How a run ended is its last line (beside a busy CPU the closing note once came after it)."""
    c = make_cluster(3)
    path = write_config(tmp_path, [cluster_table("prod", c)], approval=APPROVAL)
    plan = plan_cli(cli, path)
    c.kill("member1")
    peer, client = urls()
    pid = plan_id((await plan("propose", person="alice",
                              words=("replace", "member1", "member4", peer, "--client-url", client))).stdout)
    assert (await plan("approve", pid, reason="bridge call agreed")).returncode == 0
    capsys.readouterr()
    config = load_config(path)
    notifier = SlowToSayDone(config)
    ctx = await BotContext.open(config, notifier, PlainDirectory())
    notifier.store = ctx.store
    try:
        record = await ctx.store.plan(pid)
        assert record is not None and await _run(ctx, record) == EXIT_OK
    finally:
        await ctx.close()
    last = capsys.readouterr().out.rstrip().splitlines()[-2:]
    assert last[0].startswith(f":tada: Plan {pid} is done") and last[1] == f"plan {pid} is done", last


async def test_a_whole_replacement_from_a_shell_is_posted_once_slack_answers(make_cluster, slack, start_bot, cli,
                                                                             tmp_path, monkeypatch):
    c = make_cluster(3)
    clusters = [cluster_table("prod", c)]
    plan = plan_cli(cli, write_config(tmp_path, clusters, approval=APPROVAL))
    c.kill("member1")
    peer, client = urls()

    proposed = await plan("propose", person="alice",
                          words=("replace", "member1", "member4", peer, "--client-url", client))
    assert proposed.returncode == 0, proposed.stderr
    pid = plan_id(proposed.stdout)
    assert proposed.stdout.startswith("Replace member1 with member4 in prod — needs 1 approver\n")
    assert "\nETCD_NAME=member4\n" in proposed.stdout  # the new member's environment, to copy as it stands
    own = await plan("approve", pid, person="alice")
    assert own.returncode == 1 and "alice (break glass, from a shell) proposed plan" in own.stdout
    approved = await plan("approve", pid, reason="bridge call agreed")
    assert approved.returncode == 0 and f"plan {pid} is approved" in approved.stdout
    ran = await plan("run", pid)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "Step 2 (remove)" in ran.stdout and ran.stdout.rstrip().endswith(f"plan {pid} is done")
    assert ran.stdout.count(f"plan {pid} is done") == 1, ran.stdout   # said once
    assert sorted(h.member.name for h in await members_of(c)) == ["member2", "member3", "member4"]
    again = await plan("run", pid)
    assert again.returncode == 1 and f"plan {pid} is done, not approved: it has ended" in again.stdout

    async with open_store(tmp_path) as store:
        rows = await store.audit_rows()
        flagged = [(r.user, json.loads(r.detail)) for r in rows if r.action == "break_glass"]
        approvals = [r.user for r in rows if r.action == "plan_approved"]
    assert [(user, d["command"], d["reason"]) for user, d in flagged] == [
        ("shell:alice", "plan propose", "Slack is down"), ("shell:alice", "plan approve", "Slack is down"),
        ("shell:bob", "plan approve", "bridge call agreed"), ("shell:bob", "plan run", "Slack is down"),
        ("shell:bob", "plan run", "Slack is down")]
    assert all(d["plan"] == pid and d["os_user"] and d["host"] for _, d in flagged) and approvals == ["shell:bob"]

    # Slack answers again, but not at once: the relay keeps what it could not post for its next round.
    monkeypatch.setattr(upkeep, "RELAY_SECONDS", 0.2)
    slack.fail_next("chat.postMessage", status=503, count=2)
    bot = await start_bot(clusters, approval=APPROVAL)
    message = await slack.wait_for_message(lambda m: m.thread_ts is None and f"Plan {pid}," in m.text,
                                           timeout=20, what="the plan, posted once Slack answers")
    def relayed() -> str | None:
        t = "\n".join(text_of(m) for m in slack.messages if m.thread_ts == message.ts)
        return t if f"Plan {pid} is done" in t else None
    said = await eventually(relayed, 20, "the thread, relayed")
    assert said.count("break glass: done from a shell at ") >= 8
    assert "alice (break glass, from a shell) ran `plan propose` from a shell: Slack is down" in said
    assert "Approved by bob (break glass, from a shell)" in said and "Step 6 (followups)" in said
    assert "ETCD_NAME=member4" in said  # the plan's long part, under its message as for a plan from Slack
    assert said.index("ran `plan propose`") < said.index("Approved by bob") < said.index(f"Plan {pid} is done")
    assert "done" in text_of(slack.find_message(CHANNEL, message.ts)).lower()  # the message shows the plan's end
    # The outbox drained (the thread showed the end before the relay's last post, the refused second run's note,
    # reached Slack), then two more passes of the upkeep, each relaying: nothing is posted twice.
    async def drained() -> bool:
        return not await bot.ctx.store.queued_posts()
    await eventually(drained, 20, "the outbox drained")
    posted, registry = len(slack.messages), bot.ctx.metrics.registry
    passes = registry.get_sample_value("etcd_chatops_upkeep_passes_total") or 0.0
    await eventually(lambda: (registry.get_sample_value("etcd_chatops_upkeep_passes_total") or 0.0) >= passes + 2,
                     10, "two more passes of the upkeep")
    assert len(slack.messages) == posted


async def test_a_restore_from_a_shell_needs_two_different_names(make_cluster, slack, start_bot, cli, tmp_path):
    """The approval rules hold from a shell: a restore needs two approvers, each name counts once, the proposer
    never counts. Bad input is one line with the usage, exit status 2."""
    c = make_cluster(3)
    clusters = [cluster_table("prod", c)]
    bot = await start_bot(clusters, approval=APPROVAL)
    assert (await reply(slack, "snapshot", timeout=60)).text.startswith("Snapshot of prod")
    await bot.stop()  # Slack is gone, and the bot with it
    plan = plan_cli(cli, tmp_path / "config.toml")

    proposed = await plan("propose", person="alice", words=("restore", "--force"))
    assert proposed.returncode == 0, proposed.stdout + proposed.stderr
    pid = plan_id(proposed.stdout)
    assert "it needs 2 approvers" in proposed.stdout
    assert (await plan("approve", pid, person="alice")).returncode == 1
    first = await plan("approve", pid)
    assert first.returncode == 0
    assert f"Approval 1 of 2 for plan {pid}, by bob (break glass, from a shell)" in first.stdout
    twice = await plan("approve", pid)
    assert twice.returncode == 1 and "approved plan" in twice.stdout and "each approver counts once" in twice.stdout
    shown = await plan("show", pid, person=None)
    assert shown.returncode == 0 and "approvals (1 of 2): bob (break glass, from a shell)" in shown.stdout
    second = await plan("approve", pid, person="carol")
    assert second.returncode == 0 and f"plan {pid} is approved" in second.stdout
    listed = await plan("show", person=None)
    assert re.search(rf"^{pid}\s+restore\s+prod\s+approved\s+by alice \(break glass, from a shell\)", listed.stdout,
                     re.M)

    for args, person, why in [((pid,), "bob smith", "--as: 'bob smith' is not a name"),
                              (("nope00",), "bob", "no plan 'nope00'")]:
        bad = await plan("approve", *args, person=person)
        assert bad.returncode == 2 and bad.stdout == ""
        lines = bad.stderr.splitlines()
        assert lines[0].startswith("usage: etcd-chatops plan approve")
        assert lines[-1].startswith("etcd-chatops plan approve: error: ") and why in lines[-1]
        assert [line for line in lines if "error:" in line] == [lines[-1]]
    no_reason = await plan("cancel", pid, reason="  ")
    assert no_reason.returncode == 2 and no_reason.stderr.splitlines()[-1].endswith("--reason: say why this is done "
                                                                                    "from a shell")


async def test_a_restore_run_from_a_shell_waits_for_kube_apiserver_and_a_shell_confirms_it(make_cluster, slack,
                                                                                            start_bot, cli, tmp_path):
    """With Slack down: a shell cancels a proposal, and resumes a failed restore, which then runs here. The
    stage a person must confirm (kube-apiserver stopped, by default) is confirmed from another shell with
    `plan continue`; a stage it does not wait on counts for nothing, a stage that does not exist is bad input
    (exit 2), and the run goes on to the end once confirmed."""
    c = make_cluster(3)
    table = cluster_table("prod", c)
    del table["restore"]["apiserver"]   # the default: a person stops every kube-apiserver
    bot = await start_bot([table], approval=APPROVAL)
    # No write: a snapshot of a cluster that never took one holds revision 0, and etcd restored from it stands at
    # 1; the restore's check took that for "not restored from this snapshot" (this test wrote a key first)
    assert (await reply(slack, "snapshot", timeout=60)).text.startswith("Snapshot of prod")
    await bot.stop()
    plan = plan_cli(cli, tmp_path / "config.toml")
    first = plan_id((await plan("propose", person="alice", words=("restore", "--force"))).stdout)
    cancelled = await plan("cancel", first)
    assert cancelled.returncode == 0 and f"Plan {first} cancelled." in cancelled.stdout, cancelled.stdout

    pid = plan_id((await plan("propose", person="alice", words=("restore", "--force"))).stdout)
    for person in ("bob", "carol"):
        assert (await plan("approve", pid, person=person)).returncode == 0
    async with open_store(tmp_path) as store:
        snapshot = Path((await store.snapshots("prod"))[0].path)
    aside = snapshot.rename(snapshot.with_name("moved-" + snapshot.name))   # step 0 finds no snapshot: it fails
    failed = await plan("run", pid)
    assert failed.returncode == 1 and "stopped before step 0 (verify)" in failed.stdout, failed.stdout
    assert failed.stdout.count(f"plan {pid} is failed") == 1, failed.stdout
    aside.rename(snapshot)
    run = asyncio.ensure_future(plan("resume", pid))   # the resumed plan runs here, in this shell
    try:
        async with open_store(tmp_path) as store:
            async def waiting() -> bool:
                stage = await store.stage(pid, "apiserver-stop")
                return stage is not None and stage.waiting
            await eventually(waiting, 60, "the run waiting for kube-apiserver's stop")
            early = await plan("continue", pid, "stop", person="dave")
            assert early.returncode == 1 and f"plan {pid} waits on stage *apiserver-stop*, not stop" in early.stdout
            bad = await plan("continue", pid, "apiserver", person="dave")
            assert bad.returncode == 2 and bad.stderr.splitlines()[0].startswith("usage: etcd-chatops plan continue")
            assert "'apiserver' is not a stage a restore waits on for a person" in bad.stderr.splitlines()[-1]
            assert all(c.running(m) for m in c.members)   # nothing stopped meanwhile
            confirmed = await plan("continue", pid, person="dave")
            assert confirmed.returncode == 0 and f"Confirmed stage apiserver-stop of plan {pid}." in confirmed.stdout
        ran = await asyncio.wait_for(run, 120)
    finally:
        if not run.done():
            run.cancel()
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"Resuming plan {pid} at step 0" in ran.stdout, ran.stdout
    assert "Step 1 (apiserver-stop): apiserver-stop on every kube-apiserver, confirmed" in ran.stdout, ran.stdout
    assert "mv /etc/kubernetes/kube-apiserver.yaml.before-" in ran.stdout   # how to put it back
