"""Which seeds run, the servers the seeds share, and the tally printed at the end.

The suite (`make test`, so CI) and `make robustness` run CI_SEEDS; `make robustness SEEDS=200` the first
200 seeds (ROBUSTNESS_SEEDS, from ROBUSTNESS_FIRST); `make robustness SEED=17` replays one (ROBUSTNESS_SEED,
a comma-separated list too); ROBUSTNESS_SCHEDULE=file.json replays a schedule written out (and perhaps edited).
ROBUSTNESS_REPORT=file appends one JSON line per seed as it ends.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bot.testing.postgres import LocalPostgres, PostgresMissing
from bot.testing.s3 import MotoS3

# In every run of the suite, so few and quick: the two operations that remove or stop members (a replacement
# with its leader paused and PostgreSQL restarted, a restore on etcd 3.6 under a partition, a kill and a revive),
# on two replicas. What they cost is in README.md.
CI_SEEDS = (6, 21)
RESULTS: list[dict[str, Any]] = []  # one per seed run: what test_seed learned


def seeds() -> list[int]:
    if one := os.environ.get("ROBUSTNESS_SEED"):
        return [int(s) for s in one.split(",") if s.strip()]
    if many := os.environ.get("ROBUSTNESS_SEEDS"):
        first = int(os.environ.get("ROBUSTNESS_FIRST", "0"))
        return list(range(first, first + int(many)))
    if os.environ.get("ROBUSTNESS_SCHEDULE"):
        return [-1]
    return list(CI_SEEDS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", seeds())


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    """One S3 server for every seed (each has its own prefix); the bots get its credentials."""
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def robust_pg() -> Iterator[LocalPostgres]:
    """A PostgreSQL of the seeds' own (a seed restarts it), one fresh database per seed."""
    server = LocalPostgres()
    try:
        try:
            server.start()
        except PostgresMissing as e:
            pytest.fail(str(e), pytrace=False)
        yield server
    finally:
        server.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    faults = sum(r["faults"] for r in RESULTS)
    violations = sum(len(r["violations"]) for r in RESULTS)
    failing = [str(r["seed"]) for r in RESULTS if r["violations"]]
    terminalreporter.write_sep("-", "robustness")
    terminalreporter.write_line(f"{len(RESULTS)} schedules, {faults} faults injected, {violations} invariant "
                                f"violations" + (f" (seeds {', '.join(failing)})" if failing else ""))


def record(result: dict[str, Any]) -> None:
    """One seed's result, kept for the tally and, with ROBUSTNESS_REPORT, appended there at once (a soak
    stopped half-way still leaves what it learned)."""
    RESULTS.append(result)
    if path := os.environ.get("ROBUSTNESS_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")
