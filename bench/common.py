"""Shared by the benchmarks: machine facts, percentiles and the JSON result format
that bench/run_all.py turns into docs/benchmarks.md."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (str(ROOT), str(ROOT / "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a running process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def proc_memory(pid: int) -> dict[str, int]:
    """A process's memory figures from /proc/PID/status (VmRSS, VmHWM, RssAnon...), in bytes; {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith(("Vm", "Rss")):
            out[key] = int(value.split()[0]) * 1024
    return out


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import subprocess

    from bot.etcd.binaries import find_binary
    etcd = subprocess.run([str(find_binary("etcd")), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"cpus": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "etcd": etcd.strip().replace("etcd Version: ", "etcd "),
            "kernel": platform.release()}


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(p / 100 * len(ordered) + 0.5))))
    return ordered[rank - 1]


def row(metric: str, ours: float, peer: float, unit: str, peer_name: str, better: str = "lower") -> dict[str, Any]:
    """One figure and its peer, measured in the same run; ratio = ours / peer."""
    return {"metric": metric, "ours": ours, "peer": peer, "unit": unit, "peer_name": peer_name,
            "ratio": ours / peer if peer else float("inf"), "better": better}


def write(path: str | None, name: str, rows: list[dict[str, Any]], notes: str = "") -> None:
    result = {"name": name, "rows": rows, "notes": notes, "machine": machine()}
    for r in rows:
        print(f"{r['metric']}: ours {r['ours']:.4g} {r['unit']}, {r['peer_name']} {r['peer']:.4g} {r['unit']}, "
              f"ratio {r['ratio']:.2f} ({r['better']} is better)")
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
