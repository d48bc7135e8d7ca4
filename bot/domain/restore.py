"""The restore plan: the snapshot, every member to restore, the new cluster token and what the quorum
gate saw, as stored; the IDs etcd will give the restored members, and what each launcher action gets."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from bot.domain import shell
from bot.domain.launch_env import BUMP_VARIABLE, MARK_COMPACTED_VARIABLE
from bot.domain.plan import Step
from bot.domain.quorum import QuorumVerdict
from bot.domain.snapshot import SnapshotRef

BUMP_SINCE = (3, 5, 10)   # etcdutl gained --bump-revision / --mark-compacted in 3.5.10 (and 3.6)


APISERVER_MANIFEST = "/etc/kubernetes/manifests/kube-apiserver.yaml"  # kubeadm's; kubelet runs what is in there
BUMP_REVISIONS = 1_000_000_000  # what etcd's own docs suggest: far beyond any watch cache


def booted_revision(snapshot_revision: int, bump: int = 0) -> int:
    """The revision etcd stands at once started on a snapshot: the snapshot's, plus the bump etcdutl wrote above
    it. A snapshot of a cluster that never took a write holds revision 0, and etcd starts at 1 (etcdutl's bump
    writes its revision above 0 as above any other)."""
    return snapshot_revision + bump if bump else max(snapshot_revision, 1)


def bump_environment() -> dict[str, str]:
    """The launcher's variables for `etcdutl snapshot restore --bump-revision N --mark-compacted`."""
    return {BUMP_VARIABLE: str(BUMP_REVISIONS), MARK_COMPACTED_VARIABLE: "true"}


@dataclass(frozen=True)
class RestoreMember:
    name: str
    id: str                  # 16 hex digits (the old member ID; the restored cluster gets new ones)
    peer_url: str
    client_urls: tuple[str, ...]
    data_dir: str


@dataclass(frozen=True)
class RestorePlan:
    id: str
    cluster: str
    snapshot: SnapshotRef
    members: tuple[RestoreMember, ...]
    token: str                           # the NEW --initial-cluster-token, unique to this restore
    force: bool                          # proposed with --force: without proof that quorum is lost
    quorum_now: tuple[int, int]          # (voting, answering) when planned; (n, 0) when nothing answered
    current_revision: int | None         # of the live cluster, when one answered
    membership_source: str               # "live" | "recorded"
    membership_seen_at: float            # when that membership was seen
    newer: tuple[str, ...]               # file names of verified snapshots newer than the chosen one
    etcd_version: str                    # as the members reported it, or the bot's etcdutl
    launcher: str                        # "manual" | "command" | "ssh"
    steps: tuple[Step, ...]
    fingerprint: str
    verdict: str = ""                    # the quorum gate's QuorumVerdict when planned ("": planned before verdicts)
    evidence: str = ""                   # what the verdict rests on, voter by voter
    left_out: tuple[str, ...] = ()       # hex IDs of learners that never started: not restored

    @property
    def quorum_verdict(self) -> QuorumVerdict:
        """The verdict the plan was made on (a plan stored before verdicts: forced meant quorum held)."""
        if self.verdict:
            return QuorumVerdict(self.verdict)
        return QuorumVerdict.HELD if self.force else QuorumVerdict.LOST

    @property
    def revisions_lost(self) -> int:
        return max(0, (self.current_revision or 0) - self.snapshot.revision)

    @property
    def bump_supported(self) -> bool:
        return _version(self.etcd_version) >= BUMP_SINCE

    @property
    def restore_tool(self) -> str:
        """etcdutl restores since etcd 3.5 (etcdctl 3.6 no longer can); etcd 3.4 has no etcdutl: its etcdctl does."""
        return "etcdctl" if (3, 0, 0) <= _version(self.etcd_version) < (3, 5, 0) else "etcdutl"

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def expected_members(self) -> int:
        return len(self.members)

    def restore_args(self, m: RestoreMember, snapshot_path: str) -> list[str]:
        """`etcdutl snapshot restore` for one member (etcdctl's on etcd 3.4), every parameter explicit."""
        args = [self.restore_tool, "snapshot", "restore", snapshot_path, "--name", m.name,
                "--initial-cluster", self.initial_cluster, "--initial-cluster-token", self.token,
                "--initial-advertise-peer-urls", m.peer_url, "--data-dir", m.data_dir]
        if self.bump_supported:
            args += ["--bump-revision", str(BUMP_REVISIONS), "--mark-compacted"]
        return args

    def manual_commands(self, action: str, snapshot_path: str) -> str:
        """What a person runs on each host for `action` (the manual launcher's stop, restore or start; any
        launcher's apiserver-stop), host by host; every word shell-quoted (bot.domain.shell)."""
        if action == "apiserver-stop":  # kube-apiserver's hosts are not the bot's to know: every one of them
            return "\n".join([shell.comment("on every host that runs kube-apiserver"),
                              shell.command(["mv", APISERVER_MANIFEST, self.held_apiserver],
                                            "kubeadm; or: systemctl stop kube-apiserver")])
        lines: list[str] = []
        for m in self.members:
            lines.append(shell.comment(m.name))
            if action == "restore":
                lines += [shell.command(["mv", m.data_dir, f"{m.data_dir}.before-{self.id}"]),
                          shell.command(self.restore_args(m, snapshot_path))]
            else:
                lines.append(shell.command(["systemctl", action, "etcd"], "or however etcd runs on this host"))
        return "\n".join(lines)

    @property
    def stops_apiserver(self) -> bool:
        """kube-apiserver is stopped at a step of its own, before any member (bot.ops.restore.plan)."""
        return any(s.key == "apiserver-stop" for s in self.steps)

    @property
    def bot_restarts_apiserver(self) -> bool:
        """The bot puts kube-apiserver back itself, at a step of its own (ssh's static-pod recipe)."""
        return any(s.key == "apiserver" for s in self.steps)

    @property
    def held_apiserver(self) -> str:
        """Where a person moves kube-apiserver's static-pod manifest while this plan runs (kubelet stops the pod)."""
        return f"/etc/kubernetes/kube-apiserver.yaml.before-{self.id}"

    def apiserver_back(self) -> str:
        """The command that puts kube-apiserver back after a restore whose apiserver-stop a person did."""
        return shell.command(["mv", self.held_apiserver, APISERVER_MANIFEST], "kubeadm; or: systemctl start "
                                                                               "kube-apiserver")

    @property
    def restored_ids(self) -> dict[str, int]:
        """Each member's ID once restored: etcd derives it from the member's peer URLs and the cluster token,
        so members restored with this plan's new token have these IDs, and no other data has."""
        return {m.name: member_id([m.peer_url], self.token) for m in self.members}

    @property
    def restored_cluster_id(self) -> int:
        return cluster_id(self.restored_ids.values())

    def environment(self, m: RestoreMember, action: str, snapshot_path: str | None = None) -> dict[str, str]:
        """What the launcher gets for `action` on member `m` (the issue's table)."""
        env = {"ETCD_CHATOPS_ACTION": action}
        if action == "stop":
            return env
        env |= {"ETCD_NAME": m.name, "ETCD_INITIAL_CLUSTER": self.initial_cluster,
                "ETCD_INITIAL_CLUSTER_STATE": "new", "ETCD_INITIAL_ADVERTISE_PEER_URLS": m.peer_url,
                "ETCD_LISTEN_PEER_URLS": m.peer_url, "ETCD_DATA_DIR": m.data_dir}
        if m.client_urls:
            env["ETCD_ADVERTISE_CLIENT_URLS"] = env["ETCD_LISTEN_CLIENT_URLS"] = ",".join(m.client_urls)
        if action == "restore":
            env["ETCD_INITIAL_CLUSTER_TOKEN"] = self.token
            if snapshot_path:
                env["ETCD_CHATOPS_SNAPSHOT"] = snapshot_path
            if self.bump_supported:  # what restore_args shows, and the check step then expects
                env |= bump_environment()
        return env

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RestorePlan:
        return cls(**{**data, "snapshot": SnapshotRef(**data["snapshot"]),
                      "members": tuple(RestoreMember(**{**m, "client_urls": tuple(m["client_urls"])})
                                       for m in data["members"]),
                      "quorum_now": tuple(data["quorum_now"]), "newer": tuple(data["newer"]),
                      "steps": tuple(Step(s["key"], s["title"]) for s in data["steps"]),
                      "left_out": tuple(data.get("left_out", ()))})


def member_id(peer_urls: Iterable[str], token: str) -> int:
    """The ID etcd gives a member of a new cluster (bootstrap or `snapshot restore`): the first 8 bytes,
    big-endian, of sha1(its sorted peer URLs joined, then the cluster token) (membership.computeMemberId)."""
    digest = hashlib.sha1(("".join(sorted(peer_urls)) + token).encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big")


def cluster_id(member_ids: Iterable[int]) -> int:
    """The cluster ID etcd derives from its members' IDs: sha1 over the sorted IDs, 8 bytes big-endian each."""
    digest = hashlib.sha1(b"".join(i.to_bytes(8, "big") for i in sorted(member_ids)), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class Membership:
    """The members to restore and where that list came from."""

    members: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]  # (hex id, name, peer URLs, client URLs)
    source: str              # "live" | "recorded"
    seen_at: float
    learners: frozenset[str] = frozenset()  # hex IDs of the members that are learners


def _version(text: str) -> tuple[int, int, int]:
    parts = (text.lstrip("v").split("-")[0].split(".") + ["0", "0", "0"])[:3]
    try:
        return int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return (0, 0, 0)
