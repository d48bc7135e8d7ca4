"""Shell text the bot prints for a person to paste into a terminal.

Every value in it comes from somewhere the bot does not control: member
names and URLs as etcd reports them (etcd accepts any name, `x $(id>pwned)`
or one with a newline in it), names a person typed, configured paths. So
each word is quoted for a POSIX shell (`shlex`) and reads back as exactly
one word, and a comment is kept on its one line: nothing pasted runs more
than the command shown.
"""
from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping

# C0 controls and DEL, shown as \xNN: a newline would end a comment and start a command.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def one_line(text: str) -> str:
    """`text` with every control character shown as \\xNN: one line, whatever it held."""
    return text.translate(_CONTROLS)


def comment(text: str) -> str:
    return f"# {one_line(text)}"


def command(words: Iterable[str], note: str = "") -> str:
    """One command line, each word quoted; `note` follows as a comment."""
    line = shlex.join(words)
    return f"{line}   {comment(note)}" if note else line


def assignments(environment: Mapping[str, str], export: bool = False) -> list[str]:
    """`NAME=value` lines (with `export` when asked), each value quoted. The names are the bot's own."""
    prefix = "export " if export else ""
    return [f"{prefix}{name}={shlex.quote(value)}" for name, value in environment.items()]
