"""The replacement plan: the failed member, the new one, the survivors and the steps, as stored; and the
request it was made from."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bot.domain.cluster import Member
from bot.domain.plan import Step


@dataclass(frozen=True)
class ReplaceRequest:
    failed: str                      # name or hex ID
    new_name: str
    new_peer_url: str
    new_client_url: str | None = None
    learner: bool = True


@dataclass(frozen=True)
class MemberRef:
    """A member as the plan recorded it (plain data, stored as JSON)."""

    id: str                          # 16 hex digits
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool = False

    @classmethod
    def of(cls, m: Member) -> MemberRef:
        return cls(m.hex_id, m.name, tuple(m.peer_urls), tuple(m.client_urls), m.is_learner)

    @property
    def label(self) -> str:
        return f"{self.name or '(unstarted)'} ({self.id})"


@dataclass(frozen=True)
class ReplacePlan:
    id: str
    cluster: str
    failed: MemberRef
    new_name: str
    new_peer_url: str
    new_client_url: str | None
    learner: bool
    survivors: tuple[MemberRef, ...]
    steps: tuple[Step, ...]
    fingerprint: str
    quorum_now: tuple[int, int]              # (voting, healthy)
    others_failed: tuple[MemberRef, ...] = ()
    snapshot_source: str | None = None       # name of the healthy member to snapshot
    also_remove: tuple[MemberRef, ...] = ()  # unreachable voters etcd's old add rule wants gone first
    already_removed_by: str | None = None    # the plan that removed the failed member, when it did

    @property
    def initial_cluster(self) -> str:
        """ETCD_INITIAL_CLUSTER: the surviving members plus the new one."""
        pairs = [f"{m.name}={u}" for m in self.survivors for u in m.peer_urls]
        return ",".join(pairs + [f"{self.new_name}={self.new_peer_url}"])

    @property
    def environment(self) -> dict[str, str]:
        """Every ETCD_* variable the new member needs: the runbook's three, and its URLs."""
        env = {"ETCD_NAME": self.new_name, "ETCD_INITIAL_CLUSTER": self.initial_cluster,
               "ETCD_INITIAL_CLUSTER_STATE": "existing", "ETCD_INITIAL_ADVERTISE_PEER_URLS": self.new_peer_url,
               "ETCD_LISTEN_PEER_URLS": self.new_peer_url}
        if self.new_client_url:
            env["ETCD_ADVERTISE_CLIENT_URLS"] = self.new_client_url
            env["ETCD_LISTEN_CLIENT_URLS"] = self.new_client_url
        return env

    @property
    def expected_members(self) -> int:
        return len(self.survivors) + 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplacePlan:
        def ref(d: dict[str, Any]) -> MemberRef:
            return MemberRef(d["id"], d["name"], tuple(d["peer_urls"]), tuple(d["client_urls"]), d["is_learner"])
        return cls(id=data["id"], cluster=data["cluster"], failed=ref(data["failed"]), new_name=data["new_name"],
                   new_peer_url=data["new_peer_url"], new_client_url=data["new_client_url"], learner=data["learner"],
                   survivors=tuple(ref(m) for m in data["survivors"]),
                   steps=tuple(Step(s["key"], s["title"]) for s in data["steps"]), fingerprint=data["fingerprint"],
                   quorum_now=tuple(data["quorum_now"]), others_failed=tuple(ref(m) for m in data["others_failed"]),
                   snapshot_source=data.get("snapshot_source"),
                   also_remove=tuple(ref(m) for m in data.get("also_remove", ())),
                   already_removed_by=data.get("already_removed_by"))
