"""Shared fixtures: real etcd clusters, and a guard that nothing is left running."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from bot.emulator.cluster import LocalCluster

MARKER = "etcd-chatops-cluster-"


def _our_processes() -> list[tuple[int, str]]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if MARKER in cmd and state != "Z" and int(d.name) != os.getpid():
            found.append((int(d.name), cmd[:200]))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Every etcd (or helper) a test starts must be gone when the suite ends."""
    before = {pid for pid, _ in _our_processes()}
    yield
    left = [(pid, cmd) for pid, cmd in _our_processes() if pid not in before]
    for pid, _ in left:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not left, f"processes left running by the tests: {left}"


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A healthy 3-member cluster shared by read-only tests: do not kill its members."""
    with LocalCluster(3) as c:
        yield c


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """Fresh clusters for destructive tests, torn down even when the test fails."""
    made: list[LocalCluster] = []

    def make(size: int = 3, **kwargs) -> LocalCluster:
        c = LocalCluster(size, **kwargs)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.close()
