"""The nemesis: per seed, a real cluster on the multi-host bed, the bot (one or two replicas), the
Slack stand-in and a client writing all along; a random operation through Slack with its approvals;
a random schedule of faults while it runs; everything healed; then the invariants (README.md)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from bot.testing.postgres import LocalPostgres
from bot.testing.s3 import MotoS3
from bot.testing.versions import EtcdVersionMissing, etcd_bin_dir
from robustness.conftest import record
from robustness.run import run_seed
from robustness.schedule import Schedule, draw

pytestmark = pytest.mark.robustness


async def test_seed(seed: int, netbed: None, moto: MotoS3, robust_pg: LocalPostgres) -> None:
    path = os.environ.get("ROBUSTNESS_SCHEDULE")
    schedule = Schedule.from_json(Path(path).read_text()) if seed == -1 and path else draw(seed)
    try:
        bin_dir = etcd_bin_dir(schedule.release)
    except EtcdVersionMissing as e:
        pytest.fail(str(e), pytrace=False)
    outcome = await run_seed(schedule, moto, robust_pg, bin_dir)
    record({"seed": schedule.seed, "operation": schedule.operation.value, "faults": outcome.faults_injected,
                    "seconds": round(outcome.seconds, 1), "violations": outcome.violations, "plans": outcome.plans,
                    "notes": outcome.notes, "schedule": dataclasses.asdict(schedule)})
    print(outcome.report())
    assert not outcome.violations, "\n" + outcome.report() + "\nschedule:\n" + schedule.to_json()
