"""Leadership: exactly one replica executes plans, schedules and watches.

Every replica serves Slack (proposals, approvals and commands are guarded
writes in the shared store), but only the holder of the store's `executor`
lease runs steps. The lease lives in the bot's own database, never in the
etcd cluster being operated (it fails exactly when it is needed). Each
replica tries to acquire or renew it every ttl/3: the holder renews, the
others take it once it has expired, so a new leader follows a dead one
within ttl + ttl/3 (13.3 s at the default 10 s).

A replica counts itself leader only until `ttl` after it *sent* its last
successful renewal (monotonic clock, so the store's clock never matters):
when a renewal fails or is refused it stops starting steps at once, and a
step it had in flight cannot persist its outcome, because every step write
carries the lease's fencing token and the store refuses a stale one
(LeaseLost). With one SQLite replica the same loop runs; the lease is simply
always won.

A plan approved (or resumed) through a follower is left `approved` in the
store; the leader polls for such plans every second (`pick_up`) rather than
LISTEN/NOTIFY: one query a second costs nothing, works the same on SQLite and
PostgreSQL (one code path), needs no listening connection to re-establish
after a database restart (a lost notification would strand a plan), and a
second is nothing next to a step. When the approval reaches the leader itself
the plan starts at once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.domain.plan import Fence

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)
LEASE = "executor"


@dataclass
class Leadership:
    """This replica's standing: the fence of its current tenure, and until when it may trust it."""

    replica_id: str
    ttl: float
    _fence: Fence | None = None
    _until: float = 0.0                  # monotonic: the tenure is trusted until then

    def is_leader(self) -> bool:
        return self._fence is not None and time.monotonic() < self._until

    @property
    def fence(self) -> Fence | None:
        """The fencing token to write steps with, or None when this replica is not the leader."""
        return self._fence if self.is_leader() else None

    def held(self, fence: Fence, sent_at: float) -> bool:
        """Record a won acquisition or renewal; True when it starts a new tenure."""
        new = self._fence is None or self._fence.token != fence.token or time.monotonic() >= self._until
        self._fence, self._until = fence, sent_at + self.ttl
        return new

    def lost(self) -> bool:
        """Drop the tenure; True when there was one."""
        had = self._fence is not None
        self._fence, self._until = None, 0.0
        return had
