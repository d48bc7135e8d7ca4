"""Slack messages as a terminal transcript: what the channel would show.

Colours and bold only on a terminal; plain text when piped. Mentions,
user groups and dates are shown as a person would read them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

EMOJI = {
    "large_green_circle": "●", "red_circle": "●", "large_orange_circle": "●", "white_check_mark": "✔", "x": "✘",
    "warning": "⚠", "hourglass_flowing_sand": "⏳", "white_square": "☐", "heavy_minus_sign": "–",
    "rotating_light": "🚨", "tada": "🎉", "no_entry": "⛔", "no_entry_sign": "🚫", "clipboard": "📋",
    "point_right": "👉", "camera_with_flash": "📸", "lock": "🔒", "arrow_forward": "▶", "wastebasket": "🗑",
    "hourglass": "⌛",
}
COLOUR = {"large_green_circle": "32", "red_circle": "31", "large_orange_circle": "33", "white_check_mark": "32",
          "x": "31", "rotating_light": "31", "no_entry": "31", "warning": "33"}


@dataclass
class Style:
    colour: bool

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def bold(self, text: str) -> str:
        return self.paint(text, "1")

    def dim(self, text: str) -> str:
        return self.paint(text, "2")


def mrkdwn(text: str, style: Style, names: dict[str, str]) -> str:
    """Slack mrkdwn -> terminal text."""
    def mention(m: re.Match[str]) -> str:
        return "@" + names.get(m[1], m[1])

    text = re.sub(r"<@([A-Z0-9]+)>", mention, text)
    text = re.sub(r"<!subteam\^([A-Z0-9]+)(?:\|[^>]*)?>", lambda m: "@" + names.get(m.group(1), m.group(1)), text)
    text = re.sub(r"<!date\^\d+\^[^|>]*\|([^>]*)>", r"\1", text)
    text = re.sub(r"<(https?://[^|>]+)(?:\|([^>]*))?>", lambda m: m.group(2) or m.group(1), text)

    def emoji(m: re.Match[str]) -> str:
        name: str = m[1]
        symbol = EMOJI.get(name)
        if symbol is None:
            return m[0]
        return style.paint(symbol, COLOUR[name]) if name in COLOUR else symbol

    out_lines = []
    in_code = False
    for line in text.split("\n"):
        parts = line.split("```")
        rendered = []
        for i, part in enumerate(parts):
            if i > 0:
                in_code = not in_code
            if in_code:
                rendered.append(part)
            else:
                part = re.sub(r":([a-z0-9_+-]+):", emoji, part)
                part = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", lambda m: style.bold(m.group(1)), part)
                part = re.sub(r"`([^`\n]+)`", r"\1", part)
                rendered.append(part)
        out_lines.append("".join(rendered))
    text = "\n".join(out_lines)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def blocks_text(blocks: list[dict[str, Any]]) -> list[str]:
    """The visible text of each block, in order."""
    out = []
    for b in blocks:
        if b.get("type") == "divider":
            out.append("—" * 40)
        elif b.get("type") == "header":
            out.append("\x00H" + b["text"]["text"])
        elif isinstance(b.get("text"), dict):
            out.append(b["text"]["text"])
        elif b.get("type") == "context":
            out.append("\x00C" + " ".join(e.get("text", "") for e in b.get("elements", [])))
    return out


def render_message(msg: dict[str, Any], style: Style, names: dict[str, str], channel_names: dict[str, str]) -> str:
    """One message as the channel shows it, indented under who posted it."""
    author = names.get(msg.get("user", ""), msg.get("user", ""))
    where = "#" + channel_names.get(msg["channel"], msg["channel"])
    if msg.get("ephemeral_to"):
        head = style.dim(f"{where}  (only visible to @{names.get(msg['ephemeral_to'], msg['ephemeral_to'])})") + \
            f"  {style.bold(author)}:"
    elif msg.get("thread_ts"):
        head = f"{where}  ↳ thread  {style.bold(author)}:"
    else:
        head = f"{where}  {style.bold(author)}:"
    parts = blocks_text(msg["blocks"]) if msg.get("blocks") else [msg.get("text", "")]
    lines = []
    for part in parts:
        if part.startswith("\x00H"):
            lines.append(style.bold(part[2:]))
        elif part.startswith("\x00C"):
            lines.append(style.dim(mrkdwn(part[2:], style, names)))
        else:
            lines.append(mrkdwn(part, style, names))
    body = "\n".join("    " + line for block in lines for line in block.split("\n"))
    return f"{head}\n{body}"
