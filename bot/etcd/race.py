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
                exc = task.exception()
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


