"""Restore drills on real snapshots: a good one boots and matches the catalog; a damaged one fails clearly."""
from __future__ import annotations

import os
import tempfile

from bot.runtime.schedule import Scheduler
from bot.testing.clock import ManualClock
from bot.testing.workspace import CHANNEL, cluster_table
from helpers import APPROVAL, advance_until, ephemeral, eventually, reply, text_of


def scratch_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("etcd-chatops-drill-")}


async def test_a_drill_passes_on_a_good_snapshot_and_fails_clearly_on_a_damaged_one(cluster, slack, start_bot,
                                                                                   tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # this bot's scratch directories only
    bot = await start_bot([cluster_table("prod", cluster)], approval=APPROVAL)
    store = bot.ctx.store
    cluster.etcdctl("put", "/drill/a", "1")
    await reply(slack, "snapshot", timeout=60)
    good = (await store.snapshots("prod"))[0]
    scratch_before = scratch_dirs()

    passed = await reply(slack, "drill", timeout=120)
    assert "passed" in passed.text and f"revision {good.revision}" in passed.text
    assert f"{good.live_keys} live keys (the snapshot's {good.total_keys} keys count every stored revision" in \
        passed.text, "a key count that differs from the snapshot's is explained"
    listing = text_of(await reply(slack, "snapshots"))
    assert "drill passed" in listing

    cluster.etcdctl("put", "/drill/b", "2")
    await reply(slack, "snapshot", timeout=60)
    damaged = (await store.snapshots("prod"))[0]
    with open(damaged.path, "r+b") as f:
        f.truncate(os.path.getsize(damaged.path) - 4096)
    failed = await reply(slack, "drill", timeout=120)
    assert "FAILED" in failed.text and "has changed since it was recorded" in failed.text
    drills = await store.last_drills("prod")
    assert drills[good.id].ok and not drills[damaged.id].ok
    assert scratch_dirs() == scratch_before  # everything removed

    missing = await ephemeral(slack, "drill nope.db")
    assert "no recorded snapshot named or at revision 'nope.db'" in missing.text


async def test_a_drill_says_clearly_when_the_binaries_are_missing(cluster, slack, start_bot, monkeypatch,
                                                                  tmp_path):
    bot = await start_bot([cluster_table("prod", cluster)], approval=APPROVAL)
    await reply(slack, "snapshot", timeout=60)
    monkeypatch.setenv("ETCD_BIN_DIR", str(tmp_path))   # empty: nothing there
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("bot.etcd.binaries.bin_dirs", lambda: [tmp_path])
    failed = await reply(slack, "drill", timeout=60)
    assert "FAILED" in failed.text and "etcd binary not found on the bot's host" in failed.text
    (row,) = await bot.ctx.store.snapshots("prod")
    assert not (await bot.ctx.store.last_drills("prod"))[row.id].ok


async def test_drill_every_drills_the_newest_snapshot_on_schedule(cluster, slack, start_bot):
    clock = ManualClock()   # the upkeep's start-up pass, then only the passes this test drives
    server = await start_bot([cluster_table("prod", cluster, snapshots={"every": "1h", "drill_every": "24h"})],
                             clock=clock)
    await eventually(server.ctx.is_leader, 10, "the bot to lead")   # (in real time: the lease's clock)
    posted, _ = await advance_until(clock, lambda: next((m for m in slack.messages if "Restore drill of" in m.text),
                                                        None), 10, "scheduled drill at start-up")
    assert "passed" in posted.text and posted.channel == CHANNEL
    assert await Scheduler(server.ctx).run_due(now=clock.now()) == []  # drilled just now: not due
    later = clock.now() + 25 * 3600
    assert "prod drill" in await Scheduler(server.ctx).run_due(now=later)
