"""The multi-host bed (bot/testing/netbed.py): each member on a host of its own, faults on real links.

Each test makes a small real cluster on the bed, breaks one link the way a network breaks, and
checks what an operator would see: a member cut from its peers loses its leader while the others
keep serving writes; a member cut off entirely costs the bot's health fan-out one deadline, no
more; a slow peer link slows the writes through that member; healing brings everything back; and
closing the bed (or its owner dying) leaves no namespace, link or process behind.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.domain.errors import EtcdError
from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.testing.cluster import log_tail
from bot.testing.netbed import Link, NetnsCluster, host_for_url, leftovers
from helpers import eventually, majority_leads, must

ROOT = Path(__file__).resolve().parent.parent


async def _leader(client: EtcdClient, url: str) -> int:
    """The leader `url`'s member knows of (0: none), from its own Status."""
    return (await client.status(url, 1.0)).leader


async def _leaderless(client: EtcdClient, url: str) -> bool:
    return await _leader(client, url) == 0


async def _timed_put(url: str, key: bytes, timeout: float = 5.0) -> float:
    async with EtcdClient([url], timeout=timeout) as client:
        started = time.monotonic()
        await client.put(key, b"v")
        return time.monotonic() - started


@pytest.mark.parametrize("leading", ["member1", "member3"])
async def test_a_member_cut_from_its_peers_loses_its_leader_while_the_others_serve_writes(make_bed, leading):
    c = make_bed(3)
    cut, others = c.member("member3"), [c.member("member1"), c.member("member2")]
    async with EtcdClient(c.endpoints, timeout=1.0) as client:
        ids = {name: (await client.status(c.member(name).client_url)).member_id for name in c.members}
        await client.move_leader(ids[leading])
        c.cut_from_peers("member3")
        # The bot still reaches it (its client link is up), and it says it has no leader.
        await eventually(lambda: _leaderless(client, cut.client_url), 10, "member3 to lose its leader",
                         retry_on=(EtcdError,))

        # The other two keep one leader, one of them: a quorum. When member3 led, it steps down once it misses
        # its followers, and they may name it until their own election timeout: a write through them waits for
        # their election then (with member3 leading, the put below took 5 s and more without this wait).
        await majority_leads(client, [m.client_url for m in others])
        health = await check_cluster(client, "bed")  # and the bot's health says it is cut off, not healthy
        assert not must(health.find("member3")).healthy and health.quorum.healthy == 2 and not health.all_healthy
        assert "cut off from its peers" in (must(health.find("member3")).problem or "")
        assert await _timed_put(others[0].client_url, b"during-the-cut") < 1.0
        with pytest.raises(EtcdError):  # and it refuses writes, which the others accept
            async with EtcdClient([cut.client_url], timeout=1.0) as alone:
                await alone.put(b"through-the-cut-member", b"v")

        c.heal("member3")
        await eventually(lambda: _follows_the_leader(client, cut.client_url), 10, "member3 back with the leader")


async def _follows_the_leader(client: EtcdClient, url: str) -> bool:
    """The cluster is healthy and the member at `url` knows its leader."""
    health = await check_cluster(client, "bed")
    return health.all_healthy and await _leader(client, url) == health.leader_id


async def test_a_member_cut_off_entirely_costs_the_health_fan_out_one_deadline(make_bed):
    c = make_bed(3)
    deadline = 1.0
    async with EtcdClient(c.endpoints, timeout=deadline) as client:
        c.isolate("member2")
        started = time.monotonic()
        health = await check_cluster(client, "bed")
        elapsed = time.monotonic() - started
        # Silent, as a black-holed host is: a deadline, not a refused connection, and only one.
        assert deadline * 0.9 <= elapsed < deadline + 0.5, elapsed
        down = health.find("member2")
        assert down is not None and not down.reachable and f"no answer within {deadline:g}s" in (down.problem or "")
        assert health.quorum.healthy == 2 and health.quorum.ok
        assert {h.member.name for h in health.members if h.healthy} == {"member1", "member3"}

        c.heal()
        healed = await eventually(lambda: _all_healthy(client), 10, "the cluster healthy after the heal")
        assert healed.elapsed < deadline


async def _all_healthy(client: EtcdClient):
    health = await check_cluster(client, "bed")
    return health if health.all_healthy else None


async def test_a_member_cut_from_the_bot_only_still_serves_its_peers_and_other_clients(make_bed):
    c = make_bed(3)
    async with EtcdClient(c.endpoints, timeout=1.0) as client:
        c.cut_from_bot("member1")
        health = await check_cluster(client, "bed")
        assert not must(health.find("member1")).reachable and health.quorum.healthy == 2
        # Another host on the client link still reaches it, and it still has its leader.
        probe = c.net.popen("member2", [c.etcdctl_bin, f"--endpoints={c.member('member1').client_url}",
                                        "--dial-timeout=2s", "endpoint", "status", "-w", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = probe.communicate(timeout=30)
        assert probe.returncode == 0, err
        assert json.loads(out)[0]["Status"]["leader"] != 0
        c.heal("member1")
        await eventually(lambda: _all_healthy(client), 10, "member1 reachable again")


async def test_latency_on_one_members_peer_link_slows_the_writes_through_it(make_bed):
    c = make_bed(3)
    async with EtcdClient(c.endpoints, timeout=2.0) as client:
        leader = await _leader(client, c.endpoints[0])
        members = await client.member_list()
        slow = next(m for m in members if m.id != leader)  # a follower: its proposals cross its peer link
        url = c.member(slow.name).client_url
    before = statistics.median([await _timed_put(url, b"before-%d" % i) for i in range(3)])
    c.impair(slow.name, Link.PEER, delay=0.3)
    during = [await _timed_put(url, b"during-%d" % i) for i in range(3)]
    assert min(during) >= 0.3, during  # each write through it waits for its proposal to reach the leader
    c.heal(slow.name)
    after = statistics.median([await _timed_put(url, b"after-%d" % i) for i in range(3)])
    assert before < 0.3 and after < 0.3, (before, after)


def test_closing_the_bed_leaves_nothing_behind_even_when_the_test_fails(netbed):
    with pytest.raises(RuntimeError, match="the test failed"), NetnsCluster(2) as c:
        c.impair("member1", Link.CLIENT, delay=0.05)
        c.cut_from_peers("member2")
        prefix, pids = c.net.prefix, [m.pid for m in c.members.values()]
        raise RuntimeError("the test failed")
    assert leftovers([prefix]) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not c.base_dir.exists()


async def test_a_bed_whose_owner_is_killed_is_removed_by_its_reaper(netbed, tmp_path):
    """The bed's owner is SIGKILLed (no finally runs): the reaper removes the namespaces, links,
    etcd processes and the directory."""
    script = ("import sys; from bot.testing.netbed import NetnsCluster\n"
              f"c = NetnsCluster(1, base_dir={str(tmp_path / 'bed')!r}).start()\n"
              "print(c.net.prefix, c.member('member1').pid, flush=True)\n"
              "sys.stdin.read()\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = must(owner.stdout).readline()
        assert line, must(owner.stderr).read()
        prefix, pid = line.split()
        assert leftovers([prefix]) and Path(f"/proc/{pid}").exists()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        await eventually(lambda: not leftovers([prefix]) and not Path(f"/proc/{pid}").exists()
                         and not (tmp_path / "bed").exists(), 15, "the reaper to remove the bed")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for stream in (owner.stdin, owner.stdout, owner.stderr):
            must(stream).close()


async def test_the_command_launchers_helper_starts_a_new_member_on_its_own_host(make_bed):
    """A replacement's new member goes on a spare host: bot.testing.start_member finds the host by
    the peer URL and runs etcd in its namespace, reachable on the host's client address."""
    c = make_bed(3)
    spare = c.add_host("member4")
    peer_url = spare.url(Link.PEER, c.scheme)
    assert host_for_url(c.base_dir, peer_url) == spare
    async with EtcdClient(c.endpoints, timeout=2.0) as client:
        await eventually(lambda: client.member_add([peer_url], learner=True), 15, "a learner added",
                         retry_on=(EtcdError,))
    initial = ",".join(f"{m.name}={m.peer_url}" for m in c.members.values()) + f",member4={peer_url}"
    env = {"PATH": os.environ["PATH"], "ETCD_NAME": "member4", "ETCD_INITIAL_CLUSTER": initial,
           "ETCD_INITIAL_CLUSTER_STATE": "existing", "ETCD_INITIAL_ADVERTISE_PEER_URLS": peer_url,
           "ETCD_LISTEN_PEER_URLS": peer_url, "ETCD_INITIAL_CLUSTER_TOKEN": c.token}
    proc = subprocess.run([sys.executable, "-m", "bot.testing.start_member", "--base-dir", str(c.base_dir)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    new = c.member("member4")
    assert new.netns == spare.netns and new.client_url == spare.url(Link.CLIENT, c.scheme)
    assert c.running("member4"), log_tail(new.log_file)
    # It answers on its own host's address, and the bed's faults apply to it like to the others.
    c.cut_from_bot("member4")
    async with EtcdClient([new.client_url], timeout=0.5) as client:
        with pytest.raises(EtcdError, match="no answer within"):
            await client.status(new.client_url)
    c.heal("member4")
    async with EtcdClient([new.client_url], timeout=2.0) as client:
        assert (await client.status(new.client_url)).is_learner
