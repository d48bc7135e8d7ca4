"""The ssh launcher end to end: the bot, the Slack stand-in, and a control plane on the multi-host bed whose
hosts each run a real OpenSSH server with etcd-chatops-node as the bot key's forced command, and etcd under
the kubelet stand-in (static-pod) or the systemctl stand-in (systemd) (bot/testing/sshbed.py).

What a user notices: a restore after quorum loss and a replacement onto a new host done from Slack with
nothing written by hand, the manifests and drop-ins left as the recipes say, kube-apiserver back only
once the cluster is healthy; a host whose key changed or is unknown, or that does not answer, stopping a
plan before anything changed on any host, with the host (and the fingerprint it offered) named; the
forced command refusing anything but its actions; a restore cut off mid-way finished by /etcd resume.
"""
from __future__ import annotations

import asyncio
import json
import time
from base64 import b64decode
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
import yaml
from conftest import StartBot

from bot.config import parse_config
from bot.domain.restore import BUMP_REVISIONS
from bot.ops import nodes, ssh
from bot.testing.cluster import LocalCluster
from bot.testing.slack import Message, SlackStandIn
from bot.testing.sshbed import SshControlPlane, sshd_missing
from bot.testing.workspace import CHANNEL, LEAD, LEAD2, cluster_table
from helpers import (
    APPROVAL,
    OK,
    ephemeral,
    eventually,
    must,
    plan_row,
    propose,
    replies,
    reply,
    text_of,
    thread,
    wait_done,
    wait_state,
)

if TYPE_CHECKING:
    import asyncssh

RECIPES = ["static-pod", "systemd"]


@pytest.fixture
def sshbed(netbed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SshControlPlane]]:
    """Control planes on the bed, torn down even when the test fails. No sshd here fails the test (make test
    installs it), it is never skipped."""
    if reason := sshd_missing():
        pytest.fail(reason, pytrace=False)
    made: list[SshControlPlane] = []

    def make(recipe: str, size: int = 3) -> SshControlPlane:
        bed = SshControlPlane(tmp_path_factory.mktemp("sshbed"), recipe, size, timeout=60)
        made.append(bed)
        return bed.start()

    yield make
    for bed in made:
        bed.close()


def keys(bed: SshControlPlane) -> dict[str, str]:
    out = bed.etcdctl("get", "", "--prefix", "-w", "json").stdout
    return {b64decode(kv["key"]).decode(): b64decode(kv["value"]).decode()
            for kv in json.loads(out).get("kvs", [])}


def revision(bed: SshControlPlane) -> int:
    return int(json.loads(bed.etcdctl("get", "/", "-w", "json").stdout)["header"]["revision"])


async def approve(slack: SlackStandIn, plan: Message, *users: str) -> None:
    for user in users:
        await slack.react(user=user, channel=CHANNEL, ts=plan.ts, reaction=OK)


def pod_data_dir(manifest: Path) -> str:
    doc = yaml.safe_load(manifest.read_text())
    return str(next(v["hostPath"]["path"] for v in doc["spec"]["volumes"] if v["name"] == "etcd-data"))


async def proposed(slack: SlackStandIn, text: str) -> Message:
    """The plan message `/etcd text` posts; a refusal instead fails the test with the bot's words."""
    try:
        return await propose(slack, text)
    except TimeoutError:
        raise AssertionError(f"/etcd {text} posted no plan: {text_of(slack.messages[-1])}") from None


def notes(slack: SlackStandIn, plan: Message) -> list[str]:
    """The thread's step notes, in order."""
    return [m.text for m in replies(slack, plan) if m.text.startswith(":white_check_mark: Step ")]


# ---------------------------------------------------------------- restore

@pytest.mark.parametrize("recipe", RECIPES)
async def test_restore_after_quorum_loss_runs_on_the_hosts(sshbed: Callable[..., SshControlPlane],
                                                           use_etcd: Callable[[str], Path], slack: SlackStandIn,
                                                           start_bot: StartBot, tmp_path: Path, recipe: str) -> None:
    """With the static-pod recipe the SSH connection to m2 is also killed in the middle of its restore (with the
    node program and etcdutl), and /etcd resume finishes the plan."""
    use_etcd("3.6")   # etcdutl with --bump-revision and --mark-compacted
    bed = sshbed(recipe)
    cut = recipe == "static-pod"
    marker = tmp_path / "slow"
    launcher = bed.launcher(etcdutl=bed.slow_etcdutl("m2", marker)) if cut else bed.launcher()
    bot = await start_bot([bed.cluster(launcher=launcher)], approval=APPROVAL)
    store = bot.ctx.store
    for i in range(5):
        bed.etcdctl("put", f"/registry/k{i}", f"v{i}")
    assert (await reply(slack, "snapshot", timeout=60)).text.startswith("Snapshot of prod")
    snapped = (await store.snapshots("prod"))[0].revision
    before = keys(bed)
    bed.etcdctl("put", "/registry/later", "written after the snapshot")
    for name in ("m1", "m3"):   # their disks fail: etcd no longer starts on their data
        await asyncio.to_thread(bed.damage, name)
    await eventually(lambda: bed.leaderless("m2") or None, 30, "m2 to notice it has no leader")

    plan = await proposed(slack, "restore")
    row = await plan_row(store, plan)
    shown = (plan.text or "") + json.dumps(plan.blocks)
    assert "Quorum is lost" in shown and "every host (SSH with its pinned key" in shown
    details = await slack.wait_for(lambda: "snapshot restore on every member" in thread(slack, plan)
                                   and thread(slack, plan), what="the restore's commands in the plan's thread")
    assert "etcd-chatops-node runs it on each member's host over SSH" in details and "manual launcher" not in details
    if cut:
        assert "Stop kube-apiserver on every host" in shown and "Put kube-apiserver back on every host" in shown
        marker.touch()
    began = time.monotonic()
    await approve(slack, plan, LEAD, LEAD2)
    if cut:
        await eventually(lambda: Path(f"{marker}.reached").exists() or None, 90, "m2's etcdutl to be restoring")
        assert bed.drop_sessions("m2")   # the connection drops, and the node program and etcdutl with it
        error = must((await wait_state(store, row.id, ("failed",), timeout=60)).error)
        assert error.startswith("step 3 (restore) failed: the restore failed on 1 of 3 hosts: "
                                f"m2@{bed.hosts['m2'].host.client_ip}:22: the connection dropped during "
                                "restore"), error
        for name in ("m1", "m3"):   # what was done on each other host, so nobody has to log in to find out
            assert "Done on the others: " in error and \
                f"{name}@{bed.hosts[name].host.client_ip}:22 restore --fence" in error, error
        marker.unlink()
        # its ephemeral answer comes once the plan has left "failed" (a channel message could be the failure's own)
        answer = await ephemeral(slack, f"resume {row.id}", user=LEAD, timeout=30)
        assert answer.text.startswith(f"Resuming plan {row.id} at step 3"), answer.text
    await wait_done(store, row.id, timeout=150)
    took = time.monotonic() - began

    assert keys(bed) == before, "the keys are not exactly the snapshot's"
    assert revision(bed) == snapped + BUMP_REVISIONS, "the revision was not bumped past every watch cache"
    lines = notes(slack, plan)
    keys_in_order = [line.split("(", 1)[1].split(")", 1)[0] for line in lines]
    if cut:
        assert keys_in_order == ["verify", "apiserver-stop", "stop", "restore", "start", "healthy", "check",
                                 "apiserver", "followups"], keys_in_order
    ip = {n: h.host.client_ip for n, h in bed.hosts.items()}
    text = thread(slack, plan)
    for name in bed.members:   # per host: what ran, and its answer
        assert f"{name}@{ip[name]}:22 restore --fence" in text
        assert f"{name}@{ip[name]}:22 put-snapshot" in text or (cut and name == "m2"), text
        files = bed.hosts[name].files
        aside = [p.name for p in files.data_root.iterdir() if p.name.startswith("etcd.before-restore-")]
        assert len(aside) == 1, f"{name}: the old data dir was not moved aside ({aside})"
        if recipe == "static-pod":
            assert ".restored-" in pod_data_dir(files.manifests / "etcd.yaml"), f"{name}: not on the restored data"
            assert (files.manifests / "kube-apiserver.yaml").is_file(), f"{name}: kube-apiserver is not back"
            assert not list(files.holding.glob("*.yaml")), f"{name}: a manifest stayed in the holding directory"
        else:
            dropin = (files.unit_dir / "etcd.service.d" / "etcd-chatops.conf").read_text()
            assert "ETCD_DATA_DIR=" in dropin and ".restored-" in dropin, dropin
    if cut:
        assert "the snapshot is on the host already (sha256 checked), not copied again" in text, "copied twice"
        stop = next(line for line in lines if "(apiserver-stop)" in line)
        assert all(f"{n}@{ip[n]}:22 stop --fence" in stop and "moved kube-apiserver.yaml" in stop for n in ip)
        assert "moved kube-apiserver.yaml back" in next(line for line in lines if "(apiserver)" in line)
    steps = [(json.loads(r.detail)["step"], json.loads(r.detail)["seconds"]) for r in await store.audit_rows()
             if r.action == "step_done"]
    print(f"\nrestore over ssh ({recipe}, etcd 3.6): {took:.1f} s from the approval to done; steps {steps}")


# ---------------------------------------------------------------- replace

@pytest.mark.parametrize("recipe", RECIPES)
async def test_replace_a_dead_member_onto_a_new_host(sshbed: Callable[..., SshControlPlane], slack: SlackStandIn,
                                                     start_bot: StartBot, recipe: str) -> None:
    bed = sshbed(recipe)
    spare = bed.add_spare("m4")
    bot = await start_bot([bed.cluster()], approval=APPROVAL)
    bed.etcdctl("put", "/registry/before", "kept")
    await asyncio.to_thread(bed.kill_host, "m1")

    plan = await proposed(slack, f"replace m1 m4 {bed.peer_url('m4')} --client-url {bed.client_url('m4')}")
    assert "on its host with etcd-chatops-node over SSH" in json.dumps(plan.blocks)
    row = await plan_row(bot.ctx.store, plan)
    await approve(slack, plan, LEAD)
    await wait_done(bot.ctx.store, row.id, timeout=150)

    bed.members = ["m2", "m3", "m4"]
    await asyncio.to_thread(bed.wait_healthy, bed.members)
    assert keys(bed)["/registry/before"] == "kept"
    text = thread(slack, plan)
    at = f"m4@{spare.host.client_ip}:22"
    assert f"{at} start --fence" in text and "--join" in text
    if recipe == "static-pod":
        manifest = (spare.files.manifests / "etcd.yaml").read_text()
        assert "--name=m4" in manifest and "--initial-cluster-state=existing" in manifest
        assert pod_data_dir(spare.files.manifests / "etcd.yaml") == str(spare.files.data_dir)
        assert "status --show-manifest" in text, "the new manifest was not derived from a survivor's"
    else:
        dropin = (spare.files.unit_dir / "etcd.service.d" / "etcd-chatops.conf").read_text()
        assert "ETCD_NAME=m4" in dropin and "ETCD_INITIAL_CLUSTER_STATE=existing" in dropin


# ---------------------------------------------------------------- hosts that cannot be trusted

async def test_an_untrusted_or_unreachable_host_stops_a_plan_before_any_change(
        sshbed: Callable[..., SshControlPlane], slack: SlackStandIn, start_bot: StartBot) -> None:
    bed = sshbed("static-pod")
    pinned = [line for line in bed.known_hosts.read_text().splitlines()
              if not line.startswith(bed.hosts["m3"].host.client_ip + " ")]
    seen = bed.rotate_host_key("m1")            # m1: reinstalled, or someone in the middle
    bed.known_hosts.write_text("\n".join(pinned) + "\n")   # m3: never pinned
    bed.cut_from_bot("m2")                       # m2: its packets vanish
    ip = {n: h.host.client_ip for n, h in bed.hosts.items()}
    cluster = bed.cluster(launcher=bed.launcher(connect_timeout_seconds=1), watch={"interval": "1s", "grace": "0s"})
    bot = await start_bot([cluster], approval=APPROVAL)

    # the watch's first round runs the daily dry run, and says so without anyone asking
    alert = await slack.wait_for_message(lambda m: "LAUNCHER BROKEN" in text_of(m), timeout=30,
                                         what="the watch's launcher alert")
    assert "3 of 3 hosts fail the ssh launcher's dry run" in text_of(alert)

    check = text_of(await reply(slack, "launcher-check", timeout=30))
    assert "0 of 3 hosts ready" in check
    assert f"m1@{ip['m1']}:22: host key CHANGED: it offered ssh-ed25519 {seen}" in check
    assert f"m2@{ip['m2']}:22: unreachable: no SSH answer within 1s" in check
    assert (f"m3@{ip['m3']}:22: unknown host key: known_hosts pins no key for it; it offered ssh-ed25519 SHA256:"
            in check)

    assert (await reply(slack, "snapshot", timeout=60)).text.startswith("Snapshot of prod")
    manifests = {n: sorted(p.name for p in h.files.manifests.iterdir()) for n, h in bed.hosts.items()}
    plan = await proposed(slack, "restore --force")
    row = await plan_row(bot.ctx.store, plan)
    await approve(slack, plan, LEAD, LEAD2)
    error = must((await wait_state(bot.ctx.store, row.id, ("failed",), timeout=60)).error)
    assert error.startswith("before step 0 (verify): 3 of 3 hosts not ready, nothing was changed on any host")
    assert f"m1@{ip['m1']}:22: host key CHANGED" in error and seen in error
    assert {n: sorted(p.name for p in h.files.manifests.iterdir()) for n, h in bed.hosts.items()} == manifests
    assert [s.key for s in await bot.ctx.store.steps(row.id)] == ["verify"]
    assert bed.healthy("m1") and bed.healthy("m3"), "a member was touched"


async def test_launcher_check_of_a_cluster_without_hosts_says_why(cluster: LocalCluster, slack: SlackStandIn,
                                                                  start_bot: StartBot) -> None:
    """A launcher with nothing to dry-run (the command launcher) is a one-line refusal to the asker, not a post."""
    await start_bot([cluster_table("prod", cluster)])
    said = text_of(await ephemeral(slack, "launcher-check"))
    assert "cluster prod has the command launcher: only an ssh launcher has hosts to check" in said, said
    assert not slack.calls_to("chat.postMessage")


async def test_dead_hosts_cost_one_deadline_together(sshbed: Callable[..., SshControlPlane], tmp_path: Path) -> None:
    """Hosts whose packets vanish are asked at once: the dry run (as /etcd launcher-check and a plan's first
    step run it) says why of each within one connect deadline, not one deadline per host."""
    bed = sshbed("systemd", size=2)
    deadline = 2.0
    launcher = parse_config({"clusters": [bed.cluster(launcher=bed.launcher(connect_timeout_seconds=deadline))]},
                            tmp_path).clusters[0].launcher
    hosts = [ssh.host_for(launcher, name, bed.peer_url(name)) for name in ("m1", "m2")]
    assert all(c.ok for c in await nodes.check_hosts(launcher, hosts))
    for name in ("m1", "m2"):
        bed.cut_from_bot(name)
    began = time.monotonic()
    checks = await nodes.check_hosts(launcher, hosts)
    took = time.monotonic() - began
    assert [c.line for c in checks] == [f"{h.shown}: unreachable: no SSH answer within 2s" for h in hosts]
    assert deadline <= took < 2 * deadline - 0.5, f"{took:.1f} s for two dead hosts, deadline {deadline:g} s"


async def test_the_forced_command_takes_the_node_actions_only(sshbed: Callable[..., SshControlPlane],
                                                              tmp_path: Path) -> None:
    bed = sshbed("systemd", size=1)
    launcher = parse_config({"clusters": [bed.cluster()]}, tmp_path).clusters[0].launcher
    host = ssh.host_for(launcher, "m1", bed.peer_url("m1"))
    async with ssh.session(launcher, host) as node:
        answer = await node.run("status", timeout=30)
        assert answer.ok and answer.answer["state"] == "running", answer
        for words, says in (("etcd-chatops-node reboot --member m1", 'unknown action "reboot"'),
                            ("etcd-chatops-node status --member m1; reboot", "plain words only"),
                            ("/bin/sh -c id", 'unknown action "/bin/sh"'),
                            ("etcd-chatops-node --etcdutl /tmp/evil status --member m1",
                             "differs from this node's configuration")):
            done = await node.conn.run(words, check=False)
            said = json.loads(str(done.stdout).strip())
            assert done.exit_status == 2 and said["code"] == "bad_input" and says in said["error"], (words, said)
    assert bed.healthy("m1")


def test_the_bots_words_are_plain_words_with_sudo_first(tmp_path: Path) -> None:
    """What the bot sends through the forced command: `sudo -n` first with sudo = true, the host's
    configuration as the launcher knows it (per host through {name}), and nothing the node would refuse."""
    key = tmp_path / "id"
    from bot.testing.sshbed import keygen
    keygen(key, "t")
    (tmp_path / "known_hosts").write_text("")
    table = {"kind": "ssh", "recipe": "static-pod", "key_file": str(key), "known_hosts": str(tmp_path / "known_hosts"),
             "sudo": True, "user": "etcdops", "manifests_dir": "/srv/{name}/manifests",
             "hosts": {"m2": "10.0.0.9:2222"}}
    launcher = parse_config({"clusters": [{"name": "c", "endpoints": ["http://10.0.0.1:2379"], "launcher": table}]},
                            tmp_path).clusters[0].launcher
    assert ssh.host_for(launcher, "m1", "http://10.0.0.2:2380") == ssh.Host("m1", "10.0.0.2", 22)
    assert ssh.host_for(launcher, "m2", "http://10.0.0.3:2380").shown == "m2@10.0.0.9:2222"
    never_used = cast("asyncssh.SSHClientConnection", None)
    node = ssh.NodeSession(launcher, ssh.Host("m1", "10.0.0.2"), never_used)
    assert node.command("stop", ["--fence", "7"]) == [
        "sudo", "-n", "etcd-chatops-node", "--recipe", "static-pod", "--manifests-dir", "/srv/m1/manifests",
        "--etcdutl", "etcdutl", "stop", "--member", "m1", "--fence", "7"]
    with pytest.raises(ValueError, match="plain words"):
        node.command("restore", ["--token", "a b"])
