"""Slack's answers to "who is in this user group" and "what is this person
called", cached: a burst of reactions costs one call, and a change of on-call
rotation is seen within a minute. Implements bot.ops.notify.Directory.
"""
from __future__ import annotations

import asyncio
import logging
import time

from slack_sdk.web.async_client import AsyncWebClient

log = logging.getLogger(__name__)
CACHE_SECONDS = 60.0


class SlackDirectory:
    def __init__(self, web: AsyncWebClient, seconds: float = CACHE_SECONDS):
        self._web = web
        self._seconds = seconds
        self._groups: dict[str, tuple[float, frozenset[str]]] = {}
        self._names: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def _fresh(self, group: str) -> frozenset[str] | None:
        cached = self._groups.get(group)
        return cached[1] if cached and time.monotonic() - cached[0] < self._seconds else None

    async def group_members(self, group: str) -> frozenset[str]:
        if (members := self._fresh(group)) is not None:
            return members
        async with self._lock:
            if (members := self._fresh(group)) is not None:
                return members
            try:
                resp = await self._web.usergroups_users_list(usergroup=group)
                members = frozenset(resp.get("users", []))
            except Exception as e:  # a Slack outage must not grant a role; keep the last answer if any
                log.warning("usergroups.users.list failed", extra={"ctx_group": group, "ctx_error": type(e).__name__})
                cached = self._groups.get(group)
                return cached[1] if cached else frozenset()
            self._groups[group] = (time.monotonic(), members)
            return members

    async def user_name(self, user: str) -> str:
        """The person's display name (for text that must not notify them); the ID when Slack cannot say."""
        if user not in self._names:
            try:
                resp = await self._web.users_info(user=user)
                profile = resp["user"].get("profile", {})
                self._names[user] = profile.get("display_name") or resp["user"].get("real_name") or resp["user"]["name"]
            except Exception as e:
                log.warning("users.info failed", extra={"ctx_user": user, "ctx_error": type(e).__name__})
                return user
        return self._names[user]

    async def group_name(self, group: str) -> str:
        return group  # usergroups.list needs an extra scope: the ID, shown as code, names it without a ping
