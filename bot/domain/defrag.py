"""The defragmentation plan: which members, in which order, their sizes and quotas, as stored."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from bot.domain.plan import Step
from bot.domain.replace import MemberRef

DISARM_BELOW = 0.9  # NOSPACE is disarmed only when every member's DB is below this share of its quota


@dataclass(frozen=True)
class DefragMember:
    """One member as planned: its sizes, whether the rule selects it, and its place in the order."""

    ref: MemberRef
    db_size: int
    db_size_in_use: int
    quota: int
    quota_known: bool          # read from its /metrics (else etcd's default is assumed)
    selected: bool
    order: int | None          # 1-based position among the defragmentations, None when left alone
    role: str                  # leader, follower, learner
    after: int | None = None   # DB size once defragmented: the plan message's progress

    @property
    def free(self) -> int:
        return max(self.db_size - self.db_size_in_use, 0)

    @property
    def usage(self) -> float:
        return self.db_size / self.quota if self.quota else 0.0


@dataclass(frozen=True)
class DefragPlan:
    id: str
    cluster: str
    rule: str
    compact: bool
    disarm_below: float
    leader: str                # the leader's hex ID when planned
    members: tuple[DefragMember, ...]
    steps: tuple[Step, ...]
    fingerprint: str
    nospace: bool              # the alarm was active when planned

    def member(self, hex_id: str) -> DefragMember:
        return next(m for m in self.members if m.ref.id == hex_id)

    def defragmented(self, hex_id: str, size: int) -> DefragPlan:
        """The plan with one member's size after its defragmentation recorded."""
        return replace(self, members=tuple(replace(m, after=size) if m.ref.id == hex_id else m for m in self.members))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DefragPlan:
        def member(d: dict[str, Any]) -> DefragMember:
            r = d["ref"]
            ref = MemberRef(r["id"], r["name"], tuple(r["peer_urls"]), tuple(r["client_urls"]), r["is_learner"])
            return DefragMember(ref, d["db_size"], d["db_size_in_use"], d["quota"], d["quota_known"], d["selected"],
                                d["order"], d["role"], d.get("after"))
        return cls(id=data["id"], cluster=data["cluster"], rule=data["rule"], compact=data["compact"],
                   disarm_below=data["disarm_below"], leader=data["leader"],
                   members=tuple(member(m) for m in data["members"]),
                   steps=tuple(Step(s["key"], s["title"]) for s in data["steps"]), fingerprint=data["fingerprint"],
                   nospace=data["nospace"])
