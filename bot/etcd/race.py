"""Racing awaitables: the first success wins (pure asyncio, no gRPC)."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class AllFailed(Exception):
    def __init__(self, errors: list[BaseException]):
        super().__init__(f"{len(errors)} attempts failed")
        self.errors = errors


class CancelledAttempt(Exception):
    def __init__(self) -> None:
        super().__init__("the call was cancelled")


async def first_success(attempts: list[Awaitable[T]], fatal: Callable[[BaseException], bool]) -> tuple[int, T]:
    """Run every attempt at once; the first to succeed wins (its index and result)
    and the others are cancelled. An error `fatal` accepts is raised at once;
    when all fail, AllFailed carries their errors."""
    tasks = [asyncio.ensure_future(a) for a in attempts]
    errors: list[BaseException] = []
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                # An attempt cancelled under us (gRPC's aio raises CancelledError for a call cancelled beneath it)
                # failed; raised on, it would end the caller's task as if *it* were cancelled, silently.
                exc = CancelledAttempt() if task.cancelled() else task.exception()
                if exc is None:
                    return tasks.index(task), task.result()
                if fatal(exc):
                    raise exc
                errors.append(exc)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    raise AllFailed(errors)


