"""Slack mrkdwn escaping: the only way a value or a mention reaches a message. A leaf anyone may import."""
from __future__ import annotations

import re


def one_line(text: str, limit: int = 120) -> str:
    """The first line of a long text (launcher output, an etcd error), cut
    with an ellipsis when anything is left out: lists stay one line per item."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > limit:
        return first[:limit - 1].rstrip() + "…"
    return first + " …" if len(lines) > 1 else first


def escape(text: str) -> str:
    """Slack mrkdwn escaping of &, < and > (the only characters it requires):
    no value can become a mention, a channel link or a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_BACKTICK = "ˋ"  # MODIFIER LETTER GRAVE ACCENT: looks like ` but cannot end a code span


def code(value: str) -> str:
    """A value as inline code that no character of it can end early."""
    return f"`{escape(value).replace('`', _BACKTICK)}`"


def code_block(text: str) -> str:
    """Text as a preformatted block that no character of it can end early."""
    return f"```{escape(text).replace('`', _BACKTICK)}```"


_URL = re.compile(r"https?://[^\s<>|&]+")


def link(url: str, text: str) -> str:
    """A link to an http(s) URL that cannot become anything else (no space, `<`, `>`, `|` or `&` in it);
    any other URL is shown as text, escaped."""
    return f"<{url}|{escape(text)}>" if _URL.fullmatch(url) else f"{escape(text)}: {escape(url)}"


class Mrkdwn(str):
    """Text that is already mrkdwn: its values went through escape(), its
    mentions through mention(). Replies post it as it is; any other str is
    escaped whole."""


def _md(text: str) -> str:
    return text if isinstance(text, Mrkdwn) else escape(text)


_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")


_GROUP_ID = re.compile(r"S[A-Z0-9]{2,}")


SHELL = "shell:"  # a person acting from a shell when Slack is down (`etcd-chatops plan ... --as NAME`)


def shell_user(name: str) -> str:
    """Who acted from a shell, as the store records a person: never a Slack user ID, so a name given with
    --as can neither pass for a Slack user nor count twice as the same approver."""
    return SHELL + name


def mention(user: str) -> str:
    """The only way to mention a user: a Slack user ID as a mention; a person who acted from a shell by
    name, marked so; anything else (the schedule, a malformed ID) as plain words."""
    if user.startswith(SHELL):
        return f"{_item(user[len(SHELL):])} (break glass, from a shell)"
    return f"<@{user}>" if _USER_ID.fullmatch(user) else _item(user)


def group_mention(group: str) -> str:
    """The only way to mention a user group (a Slack subteam ID)."""
    return f"<!subteam^{group}>" if _GROUP_ID.fullmatch(group) else _item(group)


def _item(value: str) -> str:
    """A value in a list of one line per item: escaped, and on one line."""
    return escape(one_line(value))
