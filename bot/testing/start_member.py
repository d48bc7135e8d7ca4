"""A `command` launcher for local clusters: start a real etcd member from the
runbook's ETCD_* environment, detached, and return once it serves.

    python -m bot.testing.start_member --base-dir DIR

DIR is a LocalCluster's base directory: the member's data, log and record
go there, so the cluster's teardown kills it too. Used by the demo and the
tests as `launcher = { kind = "command", argv = [...] }`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bot.testing.cluster import ClusterError, LocalCluster, TLSPaths, free_port, spawn, tls_member_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="start_member", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-dir", required=True, help="the LocalCluster's base directory")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    base = Path(args.base_dir)
    name = os.environ.get("ETCD_NAME")
    if not name or "ETCD_INITIAL_CLUSTER" not in os.environ:
        print("start_member: ETCD_NAME and ETCD_INITIAL_CLUSTER must be set", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k.startswith("ETCD_")}
    peer_url = env.get("ETCD_INITIAL_ADVERTISE_PEER_URLS", "")
    scheme = peer_url.split("://", 1)[0] if "://" in peer_url else "http"
    if "ETCD_LISTEN_CLIENT_URLS" not in env:
        client = f"{scheme}://127.0.0.1:{free_port()}"
        env["ETCD_LISTEN_CLIENT_URLS"] = env["ETCD_ADVERTISE_CLIENT_URLS"] = client
    tls_dir = base / "tls"
    # the binary the cluster's members run (the launcher strips ETCD_*, so ETCD_BIN_DIR is not seen here)
    argv_etcd = [LocalCluster.attach(base).etcd, "--logger", "zap", "--log-level", "warn"]
    tls = None
    if (tls_dir / "ca.crt").is_file() and scheme == "https":
        tls = TLSPaths(ca=str(tls_dir / "ca.crt"), server_cert=str(tls_dir / "server.crt"),
                       server_key=str(tls_dir / "server.key"), client_cert=str(tls_dir / "client.crt"),
                       client_key=str(tls_dir / "client.key"))
        argv_etcd += tls_member_args(tls)
    member = spawn(base, name, argv_etcd, env, env["ETCD_ADVERTISE_CLIENT_URLS"].split(",")[0], peer_url)
    cluster = LocalCluster.attach(base, tls)
    try:
        cluster.wait_serving(name, args.timeout)
    except ClusterError as e:
        print(f"start_member: {e}", file=sys.stderr)
        return 1
    print(f"started {name} (pid {member.pid}), client URL {member.client_url}, peer URL {peer_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
