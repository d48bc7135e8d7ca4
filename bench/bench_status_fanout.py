"""Status of a 5-member cluster with one member black-holed (SIGSTOP: the kernel
accepts, nothing answers), then with one member killed (connection refused),
against `etcdctl endpoint status --cluster` with the same timeout.

Why: a dead member must cost one deadline, not one per call. Both run as a
command-line process (start-up included), best of --runs.

    .venv/bin/python bench/bench_status_fanout.py [--timeout 2] [--runs 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bot.etcd.binaries import find_binary
from bot.testing.cluster import LocalCluster
from common import row, write  # (also puts the repository on sys.path)


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return time.perf_counter() - started, proc


def best(runs: int, argv: list[str]) -> float:
    return min(timed(argv)[0] for _ in range(runs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    with LocalCluster(5) as cluster:
        endpoints = cluster.endpoints
        ours_argv = [sys.executable, "-m", "bot", "status", "--endpoints", ",".join(endpoints),
                     "--timeout", str(args.timeout), "--json"]
        peer_argv = [str(find_binary("etcdctl")), f"--endpoints={','.join(endpoints)}",
                     f"--dial-timeout={args.timeout}s", f"--command-timeout={args.timeout}s",
                     "endpoint", "status", "--cluster", "-w", "table"]
        for how, fault, undo, expect in (("black-holed", cluster.pause, cluster.resume, "no answer within"),
                                         ("killed", cluster.kill, None, "connection refused")):
            fault("member3")
            try:
                _, proc = timed(ours_argv)
                if expect not in proc.stdout:
                    raise SystemExit(f"unexpected output: {proc.stdout[:500]} {proc.stderr[:500]}")
                rows.append(row(f"status of 5 members, 1 {how}, {args.timeout:g} s timeout",
                                best(args.runs, ours_argv), best(args.runs, peer_argv), "s",
                                "etcdctl endpoint status --cluster"))
            finally:
                if undo:
                    undo("member3")
    write(args.json, "Status fan-out with a dead member", rows,
          "Both as a fresh process (start-up included). Ours asks every member at once under one deadline: a "
          "silent member costs that deadline once, a refused connection costs nothing; etcdctl waits out its "
          "timeout in both cases.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
