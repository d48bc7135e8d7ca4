"""Slack credentials and endpoints from the environment (never from files or argv)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

SLACK_API_URL = "https://slack.com/api/"


class SettingsError(Exception):
    pass


@dataclass(frozen=True)
class SlackSettings:
    bot_token: str = field(repr=False)
    signing_secret: str | None = field(default=None, repr=False)
    app_token: str | None = field(default=None, repr=False)
    api_url: str = SLACK_API_URL

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SlackSettings:
        token = env.get("SLACK_BOT_TOKEN", "").strip()
        if not token:
            raise SettingsError("SLACK_BOT_TOKEN is not set (the bot token, xoxb-...)")
        api_url = env.get("SLACK_API_URL", "").strip() or SLACK_API_URL
        if not api_url.startswith(("http://", "https://")):
            raise SettingsError(f"SLACK_API_URL: {api_url!r} is not an http(s) URL")
        if not api_url.endswith("/"):
            api_url += "/"
        return cls(bot_token=token, signing_secret=env.get("SLACK_SIGNING_SECRET", "").strip() or None,
                   app_token=env.get("SLACK_APP_TOKEN", "").strip() or None, api_url=api_url)

    def secrets(self) -> list[str]:
        return [s for s in (self.bot_token, self.signing_secret, self.app_token) if s]
