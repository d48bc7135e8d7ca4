"""Leadership as a replica sees it (bot/ops/leadership.py, bot/runtime/leader.py), without a database: a tenure is
trusted only until the lease's ttl after the renewal was sent, and a new tenure is told
from a renewal, so a new leader takes over its predecessor's plans exactly once."""
from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest

import bot.runtime as runtime_module
from bot.config import ConfigError, parse_config
from bot.domain.plan import Fence
from bot.ops.context import BotContext
from bot.ops.leadership import Leadership
from bot.runtime import Runtime
from bot.runtime.leader import dead_local_holder


def test_a_tenure_lasts_the_ttl_from_when_the_renewal_was_sent():
    me = Leadership("a", ttl=10)
    assert not me.is_leader() and me.fence is None
    sent = time.monotonic()
    assert me.held(Fence("executor", "a", 1), sent) is True       # a new tenure
    assert me.is_leader() and me.fence == Fence("executor", "a", 1)
    assert me.held(Fence("executor", "a", 1), sent) is False      # a renewal
    me.held(Fence("executor", "a", 1), sent - 11)                # a renewal that took 11 s to be answered
    assert not me.is_leader() and me.fence is None                # over, whatever the store says


def test_a_lapsed_or_changed_tenure_is_new_and_losing_it_is_said_once():
    me = Leadership("a", ttl=10)
    me.held(Fence("executor", "a", 1), time.monotonic() - 11)   # lapsed at once
    assert me.held(Fence("executor", "a", 1), time.monotonic()) is True  # taken back after a lapse: new
    assert me.held(Fence("executor", "a", 2), time.monotonic()) is True  # another token: new
    assert me.lost() is True and me.lost() is False
    assert not me.is_leader()


def _config(tmp_path, replicas: dict):
    return parse_config({"clusters": [{"name": "p", "endpoints": ["http://127.0.0.1:2379"], "channels": ["C0X"]}],
                         "replicas": replicas}, tmp_path)


def test_replicas_config_defaults_and_checks(tmp_path):
    assert _config(tmp_path, {}).replicas.lease_seconds == 10
    config = _config(tmp_path, {"lease_seconds": 6, "replica_id": "bot-0.prod", "resume_on_takeover": True})
    assert (config.replicas.lease_seconds, config.replicas.replica_id, config.replicas.resume_on_takeover) == (
        6, "bot-0.prod", True)
    for table, message in (({"lease_seconds": 2}, "replicas.lease_seconds: must be between 3 and 60 seconds"),
                           ({"lease_seconds": 61}, "replicas.lease_seconds: must be between 3 and 60 seconds"),
                           ({"replica_id": "a b"}, "replicas.replica_id: 'a b' must be 1-100 letters"),
                           ({"leader": True}, "replicas.leader: unknown key")):
        with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
            _config(tmp_path, table)



def test_only_a_dead_process_of_this_host_counts_as_a_dead_holder():
    """A bot restarted after a crash (SQLite) releases its dead predecessor's lease at once."""
    alive = {4242}.__contains__
    assert dead_local_holder("node-a-1234", "node-a", alive)          # this host, gone
    assert not dead_local_holder("node-a-4242", "node-a", alive)      # this host, running
    assert not dead_local_holder("node-b-1234", "node-a", alive)      # another host: cannot tell
    assert not dead_local_holder("replica-a", "node-a", alive)        # a configured replica_id
    assert not dead_local_holder("node-a-", "node-a", alive)


async def test_a_background_task_that_ignores_its_cancellation_does_not_hang_the_stop(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A replica told to stop (SIGTERM, a rolling deploy) stops: a task that swallows its cancellation is left
    behind with one log line instead of holding the stop for ever."""
    monkeypatch.setattr(runtime_module, "STOP_SECONDS", 0.2)
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue   # what a bug in a loop would do

    runtime = Runtime(cast(BotContext, None), watch=False, upkeep=False)
    runtime._spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)
    started = time.monotonic()
    await asyncio.wait_for(runtime.stop(), 5)
    assert time.monotonic() - started < 1.0
    assert any(r.getMessage().startswith("background task did not stop") and getattr(r, "ctx_task", None) == "stubborn"
               for r in caplog.records)
    released.set()
