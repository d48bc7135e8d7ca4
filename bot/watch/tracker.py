"""From findings round after round to alert decisions (pure): grace, flapping.

A finding must last `grace` before its alert opens, and be gone for `grace`
before the alert resolves, so one slow answer neither posts nor clears
anything. A condition that comes back within FLAP_WINDOW of clearing reopens
the same alert (its message says it is flapping) instead of posting a new one;
one that comes and goes FLAP_MIN times within the window opens at once, grace
or not, and resolves only after a quiet FLAP_WINDOW. So a member down and up
ten times a minute is one message, and one "resolved" when it has settled.

A finding Alertmanager sees (`Finding.alerted`) opens at once: its rule's `for:` already waited. When only
Alertmanager saw it last, its absence resolves at once (Alertmanager said "resolved"), and the watch
not being able to tell (an unknown round) does not hold it.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from bot.watch.conditions import Finding

FLAP_WINDOW = 60.0   # seconds
FLAP_MIN = 3         # appearances within FLAP_WINDOW that make a condition flapping

Key = tuple[str, str]


class Act(StrEnum):
    OPEN = "open"          # post a new message
    UPDATE = "update"      # the condition lasts: refresh its message
    RESOLVE = "resolve"    # gone for grace: say so in the thread
    REOPEN = "reopen"      # back within FLAP_WINDOW of resolving: the same message, flapping


@dataclass
class Track:
    """One (kind, subject) the watch has seen lately."""

    finding: Finding
    present_since: float | None = None
    absent_since: float | None = None
    appearances: list[float] = field(default_factory=list)   # when it appeared, within FLAP_WINDOW
    opened_at: float | None = None       # its alert was posted (None: not yet); the time the condition began
    resolved_at: float | None = None     # its alert resolved: the time the condition was first seen gone
    flaps: int = 0                       # the most appearances seen within the window while its alert lived

    @property
    def open(self) -> bool:
        return self.opened_at is not None and self.resolved_at is None

    @property
    def flapping(self) -> bool:
        return self.flaps >= FLAP_MIN


@dataclass(frozen=True)
class Decision:
    act: Act
    track: Track


@dataclass
class Tracker:
    """The alerts of one cluster. `step` takes a round's findings and says what to post."""

    grace: float
    # Rounds start a few milliseconds early or late: a condition seen for `grace` less this much has
    # lasted its grace. Without it, a grace of exactly N intervals waited an (N+1)th round (75 s, not 60 s).
    jitter: float = 0.0
    tracks: dict[Key, Track] = field(default_factory=dict)

    def restore(self, finding: Finding, opened_at: float, flaps: int = 0) -> Track:
        """An alert open before a restart: it keeps its message and its age."""
        track = self.tracks[finding.key] = Track(finding, present_since=opened_at, opened_at=opened_at, flaps=flaps)
        return track

    def step(self, findings: Iterable[Finding], unknown: Collection[str], now: float,
             postable: Callable[[Finding], bool] = lambda f: True, unsure: Collection[Key] = ()) -> list[Decision]:
        """`unknown`: kinds whose conditions could not tell this round, `unsure`: single (kind, subject)
        keys whose check failed (their tracks stand still); `postable`: False holds an alert back (muted,
        or the bot's own plan causes it) without forgetting how long its condition has lasted."""
        seen = {f.key: f for f in findings}
        decisions: list[Decision] = []
        for key in list(dict.fromkeys([*self.tracks, *seen])):
            track = self.tracks.get(key)
            finding = seen.get(key)
            last = finding or (track.finding if track else None)
            if (key[0] in unknown or key in unsure) and last is not None and last.watched \
                    and not (finding is not None and finding.alerted):
                continue
            if track is None:
                assert finding is not None
                track = self.tracks[key] = Track(finding)
            decision = self._one(track, finding, now, postable)
            if decision is not None:
                decisions.append(decision)
            if track.opened_at is None and finding is None and not track.appearances:
                del self.tracks[key]   # came and went unposted, and not lately
            elif track.resolved_at is not None and finding is None and now - track.resolved_at >= FLAP_WINDOW:
                del self.tracks[key]   # resolved and quiet for a flap window: the next one is a new alert
        return decisions

    def _one(self, track: Track, finding: Finding | None, now: float,
             postable: Callable[[Finding], bool]) -> Decision | None:
        if finding is not None:
            track.finding = finding
            if track.present_since is None:
                track.present_since, track.absent_since = now, None
                track.appearances.append(now)
        elif track.absent_since is None:
            track.present_since, track.absent_since = None, now
        track.appearances = [t for t in track.appearances if now - t < FLAP_WINDOW]
        if track.opened_at is not None:
            track.flaps = max(track.flaps, len(track.appearances))
        if track.open:
            if finding is not None:
                return Decision(Act.UPDATE, track)
            settle = (0.0 if not track.finding.watched
                      else max(self.grace, FLAP_WINDOW) if track.flapping else self.grace)
            if track.absent_since is not None and now - track.absent_since + self.jitter >= settle:
                track.resolved_at = track.absent_since   # it lasted until it was last seen gone
                return Decision(Act.RESOLVE, track)
            return None
        if finding is None or not postable(finding):
            return None
        if track.opened_at is not None:   # resolved lately, and back: flapping
            track.resolved_at = None
            track.flaps = max(track.flaps, len(track.appearances), FLAP_MIN)
            return Decision(Act.REOPEN, track)
        assert track.present_since is not None
        if now - track.present_since + self.jitter >= self.grace or len(track.appearances) >= FLAP_MIN \
                or finding.alerted:
            track.opened_at = track.present_since    # the condition's start, not the post's
            track.flaps = len(track.appearances)
            return Decision(Act.OPEN, track)
        return None

    def open_tracks(self) -> list[Track]:
        return [t for t in self.tracks.values() if t.open]
