"""Racing attempts (bot/etcd/race.py): the first success wins, and nothing an attempt raises ends the caller."""
from __future__ import annotations

import asyncio

import pytest

from bot.etcd.race import AllFailed, first_success


async def test_an_attempt_cancelled_beneath_a_race_fails_it_and_does_not_cancel_the_caller():
    """Found by the replicas' load bench: gRPC's aio raises CancelledError for a call cancelled under it
    (a loaded machine, a status call at its deadline); raised on by first_success it ended the command's
    task as if cancelled, and the command was never answered (no error, no log line)."""
    async def cancelled_beneath() -> int:
        raise asyncio.CancelledError()

    async def slow_success() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert await first_success([cancelled_beneath(), slow_success()], fatal=lambda e: False) == (1, 7)
    with pytest.raises(AllFailed) as failed:
        await first_success([cancelled_beneath()], fatal=lambda e: False)
    assert [str(e) for e in failed.value.errors] == ["the call was cancelled"]
