"""Parsing `/etcd <subcommand> ...` text into a Command, or a one-line reason.

Pure: no Slack, no gRPC. Slack may deliver links escaped as `<http://x>`
or `<http://x|x>`, HTML entities and typographic quotes; all are undone
here so `/etcd replace m1 m4 http://10.0.0.4:2380` means the same whether
typed or pasted.
"""
from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from bot.config import parse_duration
from bot.domain.urls import parse_url


@dataclass(frozen=True)
class Spec:
    name: str
    positionals: tuple[str, ...] = ()        # names; "[x]" marks an optional one
    options: tuple[str, ...] = ()            # options taking a value, e.g. "--cluster"
    flags: tuple[str, ...] = ()              # options without a value
    summary: str = ""
    urls: tuple[str, ...] = ()               # which positionals/options must be http(s)://host:port
    rest: bool = False                       # the last positional takes the rest of the line (free text)
    durations: tuple[str, ...] = ()          # which positionals must be durations (30m, 2h, 1h30m)

    @property
    def usage(self) -> str:
        parts = [f"/etcd {self.name}"]
        parts += [p if p.startswith("[") else f"<{p}>" for p in self.positionals]
        if self.rest:
            parts[-1] = parts[-1][:-1] + ("...]" if parts[-1].startswith("[") else "...>")
        parts += [f"[{o} {o.lstrip('-').upper().replace('-', '_')}]" for o in self.options
                  if o != "--cluster" or "[cluster]" not in self.positionals]
        parts += [f"[{f}]" for f in self.flags]
        return " ".join(parts)


@dataclass(frozen=True)
class Command:
    spec: Spec
    cluster: str | None = None
    args: dict[str, str] = field(default_factory=dict)
    flags: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.spec.name


class UsageError(Exception):
    """Bad input: `reason` is one line; `usage` is the relevant usage."""

    def __init__(self, reason: str, usage: str):
        super().__init__(reason)
        self.reason = reason
        self.usage = usage


def general_usage(specs: Mapping[str, Spec]) -> str:
    return "\n".join(f"`{s.usage}` — {s.summary}" for s in specs.values())


def unknown(word: str, specs: Mapping[str, Spec]) -> UsageError:
    """An unknown subcommand: the nearest one and its short usage (a typo costs one line, not the whole
    help), or the names alone when nothing is near."""
    near = difflib.get_close_matches(word.lower(), list(specs), n=1, cutoff=0.6)
    if near:
        return UsageError(f"unknown subcommand {word!r}: did you mean `{near[0]}`?", specs[near[0]].usage)
    return UsageError(f"unknown subcommand {word!r}; `/etcd help` says what each one does",
                      "/etcd " + " | ".join(sorted(specs)))


_SLACK_LINK = re.compile(r"<((?:https?|mailto):[^|>]*)(?:\|[^>]*)?>")
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u00a0": " "})


def unescape_slack(text: str) -> str:
    """Undo Slack's escaping of links and the characters &, < and >."""
    text = _SLACK_LINK.sub(lambda m: m.group(1), text)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return text.translate(_QUOTES)


MIN_DURATION = 1.0   # seconds: what a duration argument (a mute) must last at least


def _duration_like(word: str) -> bool:
    """Meant as a duration, valid or not: `30m`, `0s`, `-5m`, `0.5s`, `90` (a cluster name is none of these)."""
    bare = word.lstrip("+-")
    if re.fullmatch(r"\d+(?:\.\d+)?", bare):
        return True
    try:
        parse_duration(bare)
    except ValueError:
        return False
    return True


def _duration_error(word: str) -> str | None:
    """Why `word` is no duration argument, or None."""
    try:
        seconds = parse_duration(word)
    except ValueError:
        seconds = 0.0
    if seconds >= MIN_DURATION:
        return None
    shown = word if word.isprintable() else repr(word)  # `3x` as typed; a control character never reaches the reply
    return f"{shown} is not a duration: <duration> takes 30m, 2h or 1h30m (at least {MIN_DURATION:g}s)"


def _duration_first(positionals: list[str]) -> bool:
    """Whether `/etcd mute WORD ...` names no cluster: WORD is meant as the duration (valid or not, `30m`,
    `3x`) unless the word after it is a valid duration (then WORD is a cluster's name)."""
    first = positionals[0]
    if len(positionals) > 1 and _duration_error(positionals[1]) is None:
        return False
    return _duration_like(first) or first[:1].isdigit()


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def free_text(text: str) -> str:
    """Free text (a reason) as it may be stored and posted: control characters (and the invisible marks that
    turn text around) removed, line breaks and tabs made spaces, one line."""
    return " ".join(_CONTROL.sub("", re.sub(r"[\t\n\v\f\r\x85\u2028\u2029]", " ", text)).split())


def parse(text: str, specs: Mapping[str, Spec]) -> Command:
    """Parse the text after `/etcd` by `specs` (the command registry's, bot.commands); raise UsageError with
    reason and usage."""
    text = unescape_slack(text or "").strip()
    if not text:   # `/etcd` alone: the menu of common actions (the help where there is no menu)
        return Command(specs["menu"] if "menu" in specs else specs["help"])
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise UsageError(f"cannot read the command: {e}", general_usage(specs)) from None
    name, rest = words[0].lower(), words[1:]
    if name in ("-h", "--help"):
        name = "help"
    spec = specs.get(name)
    if spec is None:
        raise unknown(words[0], specs)
    if "--help" in rest or "-h" in rest:
        return Command(specs["help"], args={"topic": name})

    positionals: list[str] = []
    options: dict[str, str] = {}
    flags: set[str] = set()
    i = 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("--"):
            key, eq, value = word.partition("=")
            if key in spec.flags:
                if eq:
                    raise UsageError(f"{key} takes no value", spec.usage)
                flags.add(key)
            elif key in spec.options:
                if not eq:
                    i += 1
                    if i >= len(rest) or rest[i].startswith("--"):
                        raise UsageError(f"{key} needs a value", spec.usage)
                    value = rest[i]
                if key in options:
                    raise UsageError(f"{key} given twice", spec.usage)
                options[key] = value
            else:
                raise UsageError(f"unknown option {key!r} for {name}", spec.usage)
        else:
            positionals.append(word)
        i += 1

    if spec.durations and spec.positionals[0] == "[cluster]" and positionals and _duration_first(positionals):
        positionals.insert(0, "")  # `/etcd mute 30m why`: the first word is the duration, no cluster named
    names = [p.strip("[]").replace("-", "_") for p in spec.positionals]
    for key in spec.durations:   # a bad duration is said before what else is missing
        at = names.index(key)
        if at < len(positionals) and (why := _duration_error(positionals[at])):
            raise UsageError(why, spec.usage)
    if spec.rest and len(positionals) > len(spec.positionals):
        keep = len(spec.positionals) - 1
        positionals = positionals[:keep] + [" ".join(positionals[keep:])]
    if spec.rest and len(positionals) == len(spec.positionals):
        positionals[-1] = free_text(positionals[-1])
        if not positionals[-1]:
            positionals.pop()   # nothing left to say: missing, below
    if spec.durations and spec.positionals[0] == "[cluster]" and len(positionals) < len(spec.positionals):
        raise UsageError(f"missing <{spec.positionals[max(1, len(positionals))]}>", spec.usage)
    required = [p for p in spec.positionals if not p.startswith("[")]
    if len(positionals) < len(required):
        raise UsageError(f"missing <{required[len(positionals)]}>", spec.usage)
    if len(positionals) > len(spec.positionals):
        raise UsageError(f"unexpected argument {positionals[len(spec.positionals)]!r}", spec.usage)
    args = dict(zip(names, positionals, strict=False))
    args.update({k.lstrip("-").replace("-", "_"): v for k, v in options.items()})

    cluster = args.pop("cluster", None) or None
    if "--cluster" in options and any(p == "[cluster]" and v for p, v in zip(spec.positionals, positionals,
                                                                             strict=False)):
        raise UsageError("cluster given twice (positional and --cluster)", spec.usage)
    for key in spec.urls:
        if key in args:
            try:
                args[key] = parse_url(args[key]).url
            except ValueError as e:
                raise UsageError(f"<{key}>: {e}", spec.usage) from None
    return Command(spec=spec, cluster=cluster, args=args,
                   flags=frozenset(f.lstrip("-").replace("-", "_") for f in flags))
