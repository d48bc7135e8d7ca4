"""Who may do what on which cluster.

Three roles per cluster: readers (status, members, plans, snapshots),
operators (propose a replacement, take a snapshot) and approvers (approve,
reject, resume). Cancelling a plan needs no role: its proposer or an
approver may cancel it (checked against the plan, not here). A role is held by listed users or members of
listed Slack user groups; a role with nothing listed is open to anyone in
a channel bound to the cluster. User groups are resolved with
usergroups.users.list and cached briefly: a burst of reactions costs one
call, and a change of on-call rotation is seen within a minute.
"""
from __future__ import annotations

import asyncio
import logging
import time
from enum import Enum

from slack_sdk.web.async_client import AsyncWebClient

from bot.config import ClusterConfig, RoleConfig

log = logging.getLogger(__name__)
GROUP_CACHE_SECONDS = 60.0


class Role(Enum):
    READER = "reader"
    OPERATOR = "operator"
    APPROVER = "approver"


# The role each subcommand needs. `cancel` is checked against the plan: its
# proposer or an approver.
COMMAND_ROLES: dict[str, Role | None] = {
    "status": Role.READER, "members": Role.READER, "plans": Role.READER, "snapshots": Role.READER,
    "replace": Role.OPERATOR, "snapshot": Role.OPERATOR, "cancel": None, "resume": Role.APPROVER,
}


def role_config(cluster: ClusterConfig, role: Role) -> RoleConfig:
    return {Role.READER: cluster.access.readers, Role.OPERATOR: cluster.access.operators,
            Role.APPROVER: cluster.access.approvers}[role]


class GroupCache:
    def __init__(self, web: AsyncWebClient | None, seconds: float = GROUP_CACHE_SECONDS):
        self._web = web
        self._seconds = seconds
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = asyncio.Lock()

    async def members(self, group: str) -> frozenset[str]:
        cached = self._cache.get(group)
        if cached and time.monotonic() - cached[0] < self._seconds:
            return cached[1]
        async with self._lock:
            cached = self._cache.get(group)
            if cached and time.monotonic() - cached[0] < self._seconds:
                return cached[1]
            try:
                resp = await self._web.usergroups_users_list(usergroup=group)
                members = frozenset(resp.get("users", []))
            except Exception as e:  # a Slack outage must not grant a role; keep the last answer if any
                log.warning("usergroups.users.list failed", extra={"ctx_group": group, "ctx_error": type(e).__name__})
                return cached[1] if cached else frozenset()
            self._cache[group] = (time.monotonic(), members)
            return members


class Access:
    def __init__(self, web: AsyncWebClient | None):
        self.groups = GroupCache(web)

    async def allowed(self, cluster: ClusterConfig, user: str, role: Role) -> bool:
        rc = role_config(cluster, role)
        if rc.open:
            return True
        if user in (rc.users or ()):
            return True
        for group in rc.groups:
            if user in await self.groups.members(group):
                return True
        return False

    @staticmethod
    def holders(cluster: ClusterConfig, role: Role) -> str:
        rc = role_config(cluster, role)
        if rc.open:
            return "anyone in this channel"
        parts = [f"<@{u}>" for u in rc.users or ()] + [f"<!subteam^{g}>" for g in rc.groups]
        return ", ".join(parts) or "nobody"

    def refusal(self, cluster: ClusterConfig, role: Role, what: str) -> str:
        return (f"{what} on {cluster.name} needs the {role.value} role, which you do not hold "
                f"({role.value}s: {self.holders(cluster, role)})")
