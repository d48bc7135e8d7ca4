"""Who may do what on which cluster.

Three roles per cluster: readers (status, members, plans, snapshots),
operators (propose a replacement, take a snapshot) and approvers (approve,
reject, resume, abandon). A proposed plan is cancelled by its proposer or an
approver, and rejected by the same two. A role is held by listed users or members of
listed Slack user groups; a role with nothing listed is open to anyone in
a channel bound to the cluster. User groups are resolved with
the chat platform's Directory (bot.slack.directory caches Slack's answers).
"""
from __future__ import annotations

import logging
from enum import Enum

from bot.config import ClusterConfig, RoleConfig
from bot.domain.mrkdwn import escape
from bot.ops.notify import Directory

log = logging.getLogger(__name__)


class Role(Enum):
    READER = "reader"
    OPERATOR = "operator"
    APPROVER = "approver"


def role_config(cluster: ClusterConfig, role: Role) -> RoleConfig:
    return {Role.READER: cluster.access.readers, Role.OPERATOR: cluster.access.operators,
            Role.APPROVER: cluster.access.approvers}[role]


class Access:
    def __init__(self, directory: Directory):
        self.directory = directory

    async def allowed(self, cluster: ClusterConfig, user: str, role: Role) -> bool:
        rc = role_config(cluster, role)
        if rc.open:
            return True
        if user in (rc.users or ()):
            return True
        for group in rc.groups:
            if user in await self.directory.group_members(group):
                return True
        return False

    @staticmethod
    def holders(cluster: ClusterConfig, role: Role) -> str:
        rc = role_config(cluster, role)
        if rc.open:
            return "anyone in this channel"
        parts = [f"<@{u}>" for u in rc.users or ()] + [f"<!subteam^{g}>" for g in rc.groups]
        return ", ".join(parts) or "nobody"

    async def names(self, cluster: ClusterConfig, role: Role) -> str:
        """The holders by name, for refusals: readable, and nobody is notified."""
        rc = role_config(cluster, role)
        if rc.open:
            return "anyone in this channel"
        users = [f"`{escape(await self.directory.user_name(u))}`" for u in rc.users or ()]
        groups = [f"group `{escape(await self.directory.group_name(g))}`" for g in rc.groups]
        return ", ".join(users + groups) or "nobody"

    def refusal(self, cluster: ClusterConfig, role: Role, what: str) -> str:
        return (f"{what} on {cluster.name} needs the {role.value} role, which you do not hold "
                f"({role.value}s: {self.holders(cluster, role)})")
