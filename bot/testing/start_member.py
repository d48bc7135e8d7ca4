"""A `command` launcher for local clusters, with the four actions of the
launcher contract: start a real etcd member from the runbook's ETCD_*
environment (detached, returning once it serves), stop one, restore one's
data directory from a snapshot with etcdutl (the old directory moved aside),
or report whether one runs (`status`: one JSON line; exit 0 running, 3
stopped, 4 unknown).

    python -m bot.testing.start_member --base-dir DIR [--name NAME] [--action start|stop|restore|status]

DIR is a LocalCluster's base directory: the member's data, log and record
go there, so the cluster's teardown kills it too. On the multi-host bed
(NetnsCluster) the member runs on the host whose address its peer URL names. Used by the demo and the
tests as `launcher = { kind = "command", argv = [...] }`. The action comes
from --action, else ETCD_CHATOPS_ACTION, else start.

Fenced as the contract asks: an action that changes something and carries
ETCD_CHATOPS_FENCE is refused when the token is older than the newest this
member has seen (kept in `members/<name>.fence` beside its record, and
locked until this process exits, so two actions on one member never
interleave): a deposed bot leader cannot act after its successor did.
Without a token (a person running it by hand) nothing is fenced.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from bot.domain.launch_env import BUMP_VARIABLE, FENCE_VARIABLE, MARK_COMPACTED_VARIABLE
from bot.testing.cluster import ClusterError, LocalCluster, TLSPaths, free_port, spawn, tls_member_args
from bot.testing.netbed import CLIENT_PORT, host_for_url

# A member stopped gets this long to exit before it is killed. A follower exits within a second; a leader whose
# peers stop at the same moment (a restore stops every member at once) tries to hand its leadership to one of
# them and gives up only after etcd's request timeout (5 s + two election timeouts: 7 s here).
STOP_GRACE = 2.0

_fences: list[IO[str]] = []  # the member's fence file, locked until this process exits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="start_member", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-dir", required=True, help="the LocalCluster's base directory")
    p.add_argument("--name", default=None, help="the member (default: $ETCD_NAME)")
    p.add_argument("--action", choices=("start", "stop", "restore", "status"), default=None)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    base = Path(args.base_dir)
    action = args.action or os.environ.get("ETCD_CHATOPS_ACTION") or "start"
    name = args.name or os.environ.get("ETCD_NAME")
    if action in ("stop", "status"):
        if not name:
            print(f"start_member: {action} needs --name or ETCD_NAME", file=sys.stderr)
            return 2
        if action == "status":
            return status(base, name)
    elif not name or "ETCD_INITIAL_CLUSTER" not in os.environ:
        print("start_member: ETCD_NAME and ETCD_INITIAL_CLUSTER must be set", file=sys.stderr)
        return 2
    if refusal := fence(base, name, os.environ.get(FENCE_VARIABLE)):
        print(f"start_member: refused: {refusal}; nothing was done", file=sys.stderr)
        return 1
    if action == "stop":
        return stop(base, name)
    env = {k: v for k, v in os.environ.items() if k.startswith("ETCD_") and not k.startswith("ETCD_CHATOPS_")}
    data_dir = env.pop("ETCD_DATA_DIR", None)
    if action == "restore":
        return restore(base, name, env, data_dir or str(base / "data" / name))
    if LocalCluster.attach(base).running(name):
        print(f"{name} is running already")
        return 0
    peer_url = env.get("ETCD_INITIAL_ADVERTISE_PEER_URLS", "")
    scheme = peer_url.split("://", 1)[0] if "://" in peer_url else "http"
    host = host_for_url(base, peer_url)  # on the multi-host bed: the host that owns the peer URL's address
    if "ETCD_LISTEN_CLIENT_URLS" not in env:
        client = f"{scheme}://{host.client_ip}:{CLIENT_PORT}" if host else f"{scheme}://127.0.0.1:{free_port()}"
        env["ETCD_LISTEN_CLIENT_URLS"] = env["ETCD_ADVERTISE_CLIENT_URLS"] = client
    tls_dir = base / "tls"
    # the binary the cluster's members run (the launcher strips ETCD_*, so ETCD_BIN_DIR is not seen here)
    argv_etcd = [LocalCluster.attach(base).etcd, "--logger", "zap", "--log-level", "warn"]
    argv_etcd += ["--data-dir", data_dir] if data_dir else []
    tls = None
    if (tls_dir / "ca.crt").is_file() and scheme == "https":
        tls = TLSPaths(ca=str(tls_dir / "ca.crt"), server_cert=str(tls_dir / "server.crt"),
                       server_key=str(tls_dir / "server.key"), client_cert=str(tls_dir / "client.crt"),
                       client_key=str(tls_dir / "client.key"))
        argv_etcd += tls_member_args(tls)
    member = spawn(base, name, argv_etcd, env, env["ETCD_ADVERTISE_CLIENT_URLS"].split(",")[0], peer_url,
                   host.netns if host else None)
    cluster = LocalCluster.attach(base, tls)
    try:
        cluster.wait_serving(name, args.timeout)
    except ClusterError as e:
        print(f"start_member: {e}", file=sys.stderr)
        return 1
    print(f"started {name} (pid {member.pid}), client URL {member.client_url}, peer URL {peer_url}")
    return 0


def fence(base: Path, name: str, token: str | None) -> str | None:
    """Why the action is refused, or None: then `token` is the newest the member has seen, and its fence
    stays locked until this process exits."""
    if token is None:
        return None
    try:
        mine = int(token)
    except ValueError:
        return f"{FENCE_VARIABLE}={token!r} is not a fencing token"
    path = base / "members" / f"{name}.fence"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    _fences.append(f)
    fcntl.flock(f, fcntl.LOCK_EX)
    newest = int(f.read().strip() or 0)
    if mine < newest:
        return (f"fencing token {mine} is older than {newest}, the newest {name} has seen (another bot leader "
                "acted since)")
    f.seek(0)
    f.truncate()
    f.write(str(mine))
    f.flush()
    os.fsync(f.fileno())
    return None


def status(base: Path, name: str) -> int:
    """The contract's status: one JSON line; exit 0 running, 3 stopped, 4 unknown (no cluster here)."""
    if not base.is_dir():
        print(json.dumps({"member": name, "state": "unknown", "why": f"no cluster at {base}"}))
        return 4
    cluster = LocalCluster.attach(base)
    running = cluster.running(name)
    pid = cluster.members[name].pid if running else None
    print(json.dumps({"member": name, "state": "running" if running else "stopped", "pid": pid}))
    return 0 if running else 3


def stop(base: Path, name: str) -> int:
    """SIGTERM, and SIGKILL after STOP_GRACE seconds, as a node's stop with a grace period does."""
    cluster = LocalCluster.attach(base)
    if not cluster.running(name):
        print(f"{name} was not running")
        return 0
    cluster.stop(name, timeout=STOP_GRACE)
    print(f"stopped {name}")
    return 0


def restore(base: Path, name: str, env: dict[str, str], data_dir: str) -> int:
    """etcdutl snapshot restore into a fresh directory, then swap it in; the old one is kept aside. With
    ETCD_CHATOPS_BUMP_REVISION (and ETCD_CHATOPS_MARK_COMPACTED=true, which etcdutl requires with it) the
    restored revision moves forward by that much, and watches from before are told it was compacted."""
    snapshot, token = os.environ.get("ETCD_CHATOPS_SNAPSHOT"), env.get("ETCD_INITIAL_CLUSTER_TOKEN")
    if not snapshot or not token:
        print("start_member: restore needs ETCD_CHATOPS_SNAPSHOT and ETCD_INITIAL_CLUSTER_TOKEN", file=sys.stderr)
        return 2
    bump = os.environ.get(BUMP_VARIABLE, "")
    compacted = os.environ.get(MARK_COMPACTED_VARIABLE, "")
    if (bump and not bump.isdigit()) or compacted not in ("", "true", "false") or (compacted == "true") != bool(bump):
        print(f"start_member: {BUMP_VARIABLE}={bump!r} and {MARK_COMPACTED_VARIABLE}={compacted!r}: a revision bump "
              "(digits) goes with mark-compacted=true, and neither without the other", file=sys.stderr)
        return 2
    cluster = LocalCluster.attach(base)
    if cluster.running(name):
        print(f"start_member: {name} is running: stop it before restoring its data", file=sys.stderr)
        return 1
    etcdutl = Path(cluster.etcd).with_name("etcdutl")
    if not etcdutl.is_file():  # etcd 3.4 has no etcdutl: its etcdctl restores
        etcdutl = etcdutl.with_name("etcdctl")
    target = Path(data_dir)
    fresh = target.with_name(f"{target.name}.restoring-{token[-8:]}")
    subprocess.run(["rm", "-rf", "--", str(fresh)], check=False)  # a half-done earlier attempt of this restore
    proc = subprocess.run([str(etcdutl), "snapshot", "restore", snapshot, "--name", name,
                           "--initial-cluster", env["ETCD_INITIAL_CLUSTER"], "--initial-cluster-token", token,
                           "--initial-advertise-peer-urls", env["ETCD_INITIAL_ADVERTISE_PEER_URLS"],
                           "--data-dir", str(fresh), *(["--bump-revision", bump, "--mark-compacted"] if bump else [])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"start_member: etcdutl failed ({proc.returncode}): {proc.stderr[-1500:]}", file=sys.stderr)
        return 1
    if target.exists():
        aside = target.with_name(f"{target.name}.before-restore-{int(time.time() * 1000)}")
        target.rename(aside)
        print(f"moved the old data directory aside to {aside}")
    fresh.rename(target)
    print(f"restored {name} into {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
