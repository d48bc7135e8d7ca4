"""`etcd-chatops demo`: the whole incident, its transcript, and that nothing is left behind."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.testing.cluster import processes_naming
from helpers import must

pytestmark = pytest.mark.e2e  # the demo runs real etcd, the stand-in and the bot as processes

DEMO = [sys.executable, "-m", "bot", "demo"]
SAY = [sys.executable, "-m", "bot", "say"]


def run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLACK_")}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def assert_nothing_left(directory: Path) -> None:
    assert not directory.exists(), f"{directory} was not removed"
    assert not processes_naming([str(directory)]), "the demo left processes running"


def test_the_demo_plays_the_whole_incident_and_cleans_up(tmp_path):
    directory = tmp_path / "demo"
    proc = run(DEMO + ["--dir", str(directory)])
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    expected_in_order: list[str | re.Pattern[str]] = [
        "etcd cluster demo: HEALTHY", "3 of 3 voting members healthy",
        "member1's machine dies", "etcd cluster demo: DEGRADED",
        # refused, or cut mid-call when the bot's connection to it was open as it died
        re.compile(r"member1 — DOWN: (connection refused|the connection was closed during the call)"),
        "/etcd replace member1 member4", "Replace member1 with member4 in demo — needs 1 approver",
        "ETCD_INITIAL_CLUSTER=member2=",
        "mallory reacts", "@mallory is not an approver",
        "bob reacts", "Approved by @bob",
        "Step 1 (snapshot): saved demo-", "Step 2 (remove): Removed member", "Step 3 (add): Member",
        "Step 4 (start):", "promoted to a voting member", "--etcd-servers=", "load balancer",
        "Step 7 (verify): 3 members, all healthy", "is done: member1 was replaced by member4",
        "/etcd status", "member4", "/etcd snapshot",
        re.compile(r"\|\s+HASH\s+\|\s+REVISION\s+\|\s+TOTAL KEYS\s+\|\s+TOTAL SIZE\s+\|"),
        "Incident played in", "Everything the demo started is stopped",
    ]
    position = 0
    for fragment in expected_in_order:
        pattern = fragment if isinstance(fragment, re.Pattern) else re.compile(re.escape(fragment))
        found = pattern.search(out, position)
        assert found, (f"{pattern.pattern!r} missing (or out of order) in the transcript:\n"
                       f"{out[position:position + 2000]}")
        position = found.start()
    summary = re.search(r"Incident played in ([\d.]+) s: plan (\w{6}) done; "
                        r"snapshot hash ([0-9a-f]+) at revision (\d+)", out)
    assert summary, out[-500:]
    assert "\033[" not in out  # plain text when piped
    assert "xoxb-" not in out + proc.stderr and "xapp-" not in out + proc.stderr
    assert_nothing_left(directory)


def test_keep_say_and_stop(tmp_path):
    directory = tmp_path / "kept"
    try:
        proc = run(DEMO + ["--keep", "--dir", str(directory)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert 'etcd-chatops say "/etcd status"' in proc.stdout and "etcd-chatops demo --stop" in proc.stdout
        assert processes_naming([str(directory)]), "--keep should leave the demo running"
        said = run([sys.executable, "-m", "bot", "say", "/etcd status", "--dir", str(directory)], timeout=60)
        assert said.returncode == 0, said.stderr
        assert "alice: /etcd status" in said.stdout and "etcd cluster demo: HEALTHY" in said.stdout
        assert "member4" in said.stdout and "member1" not in said.stdout
        as_lead = run([sys.executable, "-m", "bot", "say", "--as", "bob", "plans", "--dir", str(directory)], timeout=60)
        assert "bob: /etcd plans" in as_lead.stdout and "DONE" in as_lead.stdout
        assert "Run etcd-chatops as " in proc.stdout and "make shell" in proc.stdout
        assert "say --as bob :white_check_mark:" in proc.stdout

        # A lead approves in the kept demo the way the README says: a reaction to the newest plan.
        os.kill(int(must(re.search(r"kill -9 (\d+) +# member3's machine dies", proc.stdout))[1]), signal.SIGKILL)
        replace = must(re.search(r'say "(/etcd replace member3 member5 [^"]+)"', proc.stdout))[1]
        proposed = run(SAY + [replace, "--dir", str(directory)], timeout=60)
        assert proposed.returncode == 0, proposed.stdout + proposed.stderr
        assert "Replace member3 with member5 in demo" in proposed.stdout, proposed.stdout
        refused = run(SAY + ["--as", "mallory", ":white_check_mark:", "--dir", str(directory)], timeout=60)
        assert "mallory reacts :white_check_mark:" in refused.stdout and "@mallory is not an approver" in refused.stdout
        approved = run(SAY + ["--as", "bob", ":white_check_mark:", "--dir", str(directory)], timeout=60)
        assert approved.returncode == 0 and "Approved by @bob" in approved.stdout, approved.stdout + approved.stderr
        no_plan = run(SAY + ["--as", "bob", ":x:", "--plan", "nope00", "--dir", str(directory)], timeout=60)
        assert no_plan.returncode == 2 and "no plan nope00 in the channel" in no_plan.stderr
        again = run(DEMO + ["--keep", "--dir", str(directory)], timeout=30)
        assert again.returncode == 2 and "already running" in again.stderr
    finally:
        stop = run(DEMO + ["--stop", "--dir", str(directory)], timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert_nothing_left(directory)
    missing = run([sys.executable, "-m", "bot", "say", "/etcd status", "--dir", str(directory)], timeout=30)
    assert missing.returncode == 2 and "no demo is running" in missing.stderr


@pytest.mark.parametrize(("signum", "status", "says"), [(signal.SIGINT, 130, "interrupted: cleaning up"),
                                                         (signal.SIGTERM, 143, "terminated: cleaning up")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_a_kill_removes_everything(tmp_path, signum, status, says):
    directory = tmp_path / "interrupted"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLACK_")}
    proc = subprocess.Popen(DEMO + ["--dir", str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while "proposes the runbook's replacement" not in seen:  # interrupt in the middle of the incident
            line = must(proc.stdout).readline()
            assert line and time.monotonic() < deadline, f"the demo ended early: {seen[-2000:]}"
            seen += line
        proc.send_signal(signum)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = must(proc.stderr).read()
    assert proc.returncode == status and says in err, err[-2000:]
    assert_nothing_left(directory)


def test_the_restore_scenario_plays_a_quorum_loss_and_cleans_up(tmp_path):
    directory = tmp_path / "demo"
    proc = run(DEMO + ["--scenario", "restore", "--dir", str(directory)])
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    position = 0
    for fragment in ("/etcd snapshot", "member1 and member2's machines die", "quorum", "/etcd restore",
                     "Restore demo from ", "alice reacts", "@alice is not an approver", "bob reacts", "Approval 1 of 2",
                     "carol reacts",
                     "Approved by @carol", "Step 0 (verify)", "Step 1 (stop)", "Step 2 (restore): member1: restored",
                     "Step 3 (start)", "Step 5 (check): 3 members at revision", "HashKV", "Kubernetes follow-ups",
                     "is done", "etcd cluster demo: HEALTHY", "cluster restored at revision",
                     "Everything the demo started is stopped"):
        found = out.find(fragment, position)
        assert found >= 0, f"{fragment!r} missing (or out of order) in the transcript:\n{out[position:position + 2000]}"
        position = found
    assert_nothing_left(directory)


def test_the_nospace_demo_fails_writes_then_defragments_under_approval(tmp_path):
    directory = tmp_path / "nospace"
    proc = run(DEMO + ["--scenario", "nospace", "--dir", str(directory)])
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    expected_in_order = [
        "--quota-backend-bytes 16 MiB", "writes fail: etcdserver: mvcc: database space exceeded",
        "/etcd status", "ALARM NOSPACE", "run /etcd defrag demo",
        "/etcd defrag", "Defragment member", " in demo — needs 1 approver", "PASSES RULE", "bob reacts",
        "Approved by @bob",
        "Step 2 (compact): compacted to revision", "reclaimed in", "Step 5 (move-leader): leadership moved from",
        "Step 7 (disarm): NOSPACE disarmed", "Step 8 (verify): test write succeeded", "is done: demo defragmented",
        "etcd cluster demo: HEALTHY", "writes succeed again", "NOSPACE incident played in",
        "Everything the demo started is stopped",
    ]
    position = 0
    for fragment in expected_in_order:
        found = out.find(fragment, position)
        assert found >= 0, f"{fragment!r} missing (or out of order) in the transcript:\n{out[position:position + 2000]}"
        position = found
    assert_nothing_left(directory)


def test_the_alerts_scenario_shows_the_watch_post_and_resolve(tmp_path):
    directory = tmp_path / "alerts"
    proc = run(DEMO + ["--scenario", "alerts", "--dir", str(directory)])
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    position = 0
    for fragment in ("the watch looks every second", "etcd cluster demo: HEALTHY", "member2's machine dies",
                     "MEMBER DOWN member2", "/etcd replace member2 member4", "member2's machine comes back",
                     "resolved after", "/etcd alerts", "Alerts played in", "Everything the demo started is stopped"):
        found = out.find(fragment, position)
        assert found >= 0, f"{fragment!r} missing (or out of order) in the transcript:\n{out[position:position + 2000]}"
        position = found
    assert_nothing_left(directory)


def test_the_kubeadm_scenario_restores_on_the_hosts_over_ssh_and_cleans_up(tmp_path):
    """The restore of a kubeadm control plane done by the bot on its hosts (sshd per host on the multi-host bed):
    the dry run first, kube-apiserver stopped before etcd and put back last, and nothing left behind."""
    directory = tmp_path / "kubeadm"
    proc = run(DEMO + ["--scenario", "kubeadm", "--dir", str(directory)])
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:] + out[-3000:]
    position = 0
    for fragment in ("kubeadm control plane 'demo' up", "/etcd launcher-check", "3 of 3 hosts ready",
                     "/etcd snapshot", "disks of m1 and m2 fail", "/etcd restore", "Approved by", "Step 0 (verify)",
                     "every host ready", "Step 1 (apiserver-stop)", "moved kube-apiserver.yaml", "Step 2 (stop)",
                     "Step 3 (restore)", "Step 4 (start)", "Step 7 (apiserver)", "moved kube-apiserver.yaml back",
                     "is done", "etcd cluster demo: HEALTHY", "etcd.yaml now mounts", ".restored-",
                     "done on 3 hosts over SSH", "Everything the demo started is stopped"):
        found = out.find(fragment, position)
        assert found >= 0, f"{fragment!r} missing (or out of order) in the transcript:\n{out[position:position + 2000]}"
        position = found
    assert_nothing_left(directory)
