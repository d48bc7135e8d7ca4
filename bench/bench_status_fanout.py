"""Status of a 5-member cluster, each member on a host of its own (the netns bed), with one member cut off
(its host black-holed: no answer at all), killed (its host refuses), or 300 ms away (every frame its host
sends the bot is held 300 ms), against `etcdctl endpoint status --cluster` with the same timeout.

Why: a dead member must cost one deadline, not one per call, and a far one its own distance once, not once
per member. Both run as a command-line process (start-up included), best of --runs.

    .venv/bin/python bench/bench_status_fanout.py [--release 3.6] [--timeout 2] [--runs 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

from bot.testing.netbed import Link, NetnsCluster
from bot.testing.versions import binary_version, etcd_bin_dir
from common import row, write  # (also puts the repository on sys.path)

DELAY = 0.3


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return time.perf_counter() - started, proc


def best(runs: int, argv: list[str]) -> float:
    return min(timed(argv)[0] for _ in range(runs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--release", default="3.6")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    directory = etcd_bin_dir(args.release)
    os.environ["ETCD_BIN_DIR"] = str(directory)
    rows = []
    with NetnsCluster(5) as cluster:
        endpoints = cluster.all_endpoints
        ours_argv = [sys.executable, "-m", "bot", "status", "--endpoints", ",".join(endpoints),
                     "--timeout", str(args.timeout), "--json"]
        peer_argv = [str(directory / "etcdctl"), f"--endpoints={','.join(endpoints)}",
                     f"--dial-timeout={args.timeout}s", f"--command-timeout={args.timeout}s",
                     "endpoint", "status", "--cluster", "-w", "table"]

        def far(name: str) -> None:
            cluster.impair(name, Link.CLIENT, delay=DELAY)

        faults: list[tuple[str, Callable[[str], None], str]] = [
            ("cut off (its host black-holed)", cluster.isolate, "no answer within"),
            (f"{DELAY * 1000:.0f} ms away", far, '"healthy": true'),
            ("killed", cluster.kill, "connection refused"),
        ]
        for how, fault, expect in faults:
            fault("member3")
            _, proc = timed(ours_argv)
            if expect not in proc.stdout:
                raise SystemExit(f"unexpected output ({how}): {proc.stdout[:800]} {proc.stderr[:500]}")
            rows.append(row(f"status of 5 members, 1 {how}, {args.timeout:g} s timeout", best(args.runs, ours_argv),
                            best(args.runs, peer_argv), "s", "etcdctl endpoint status --cluster"))
            cluster.heal()
    write(args.json, "Status fan-out with a dead or far member", rows,
          f"etcd {binary_version(directory / 'etcd')}, each member on a host of its own (bot/testing/netbed.py); the "
          "fault is on member3's client link. Both as a fresh process (start-up included). Ours asks every member at "
          "once under one deadline: a silent member costs that deadline once, a refused connection nothing, a far "
          "member its distance once; etcdctl asks one member after the other and waits out its timeout for a "
          "silent or a dead one.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
