"""`make bench`: run every benchmark and write docs/benchmarks.md.

Each figure is printed next to its peer measured in the same run (etcdctl,
etcdutl, a bare slack-bolt app, the runbook by hand) and as a ratio, with
the machine it ran on. Takes a few minutes: it builds >= 300 MB and >= 500 MB
databases with real etcd.
"""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHES = ["bench_ack_latency.py", "bench_status_fanout.py", "bench_snapshot_status.py", "bench_snapshot_save.py",
           "bench_replacement.py", "bench_defrag.py", "bench_restore.py",
           "bench_watch.py", "bench_offsite.py", "bench_replicas.py"]


def fmt(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


MARK = "<!-- make bench writes everything below; the summary above is written by hand -->"


def summary(page: Path) -> list[str]:
    """The hand-written part of the page (the summary and where we trail), kept across runs."""
    text = page.read_text() if page.exists() else ""
    if MARK not in text:
        return ["# Benchmarks", "", MARK, ""]
    return text.split(MARK, 1)[0].rstrip("\n").splitlines() + ["", MARK, ""]


def render(results: list[dict[str, Any]], kept: list[str]) -> str:
    m = results[0]["machine"]
    lines = [
        *kept,
        "## The last run",
        "",
        f"Measured by `make bench` on {dt.date.today():%Y-%m-%d}: {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"{m['etcd']}, Linux {m['kernel']}. Every figure stands next to its peer measured in the same run; "
        "the ratio is ours / peer.",
        "",
    ]
    for r in results:
        lines += [f"### {r['name']}", "", "| measure | ours | peer | ratio |", "|---|---|---|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['metric']} | {fmt(x['ours'], x['unit'])} | {fmt(x['peer'], x['unit'])} "
                         f"({x['peer_name']}) | **{x['ratio']:.2f}** ({x['better']} is better) |")
        if r.get("notes"):
            lines += ["", r["notes"]]
        lines.append("")
    lines += ["Run a single benchmark with `.venv/bin/python bench/<name>.py --help`.", ""]
    return "\n".join(lines)


def main() -> int:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in BENCHES:
            out = Path(tmp) / (name + ".json")
            print(f"== {name}", flush=True)
            proc = subprocess.run([sys.executable, str(HERE / name), "--json", str(out)], cwd=ROOT)
            if proc.returncode != 0 or not out.exists():
                print(f"{name} failed ({proc.returncode})", file=sys.stderr)
                return 1
            results.append(json.loads(out.read_text()))
    target = ROOT / "docs" / "benchmarks.md"
    target.parent.mkdir(exist_ok=True)
    target.write_text(render(results, summary(target)))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
