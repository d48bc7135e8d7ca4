"""The restore planner: a snapshot, the membership and the quorum -> RestorePlan, or a Refusal.

Pure: no Slack, no gRPC, no clock (the caller passes `now`). Restoring after a
quorum loss is etcd's recovery guide: the *same* snapshot restored on every
member with `etcdutl snapshot restore`, a NEW cluster token (reusing the old
one is the classic "cluster ID mismatch"), then every member started on its
restored data directory. The plan states all of it, for every member.
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bot.ops.replace import Refusal, Step
from bot.output import shell
from bot.output.model import CatalogEntry

BUMP_SINCE = (3, 5, 10)   # etcdutl gained --bump-revision / --mark-compacted in 3.5.10 (and 3.6)
BUMP_REVISIONS = 1_000_000_000  # what etcd's own docs suggest: far beyond any watch cache


@dataclass(frozen=True)
class SnapshotRef:
    """A catalog row, as the plan recorded it."""

    id: int
    path: str                # absolute path on the bot's host
    revision: int
    hash: str                # etcdutl's %x
    total_keys: int
    total_size: int
    file_size: int
    sha256: str              # of the file as stored (the ciphertext when encrypted)
    encrypted: bool
    created_at: float
    member: str
    live_keys: int | None = None   # distinct live user keys (what a booted etcd counts)
    remote_url: str = ""           # set: no local copy; fetched from this object in the store (and verified)
    foreign: str = ""              # why the bot cannot call this store object its own; "" for its own

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def from_store(self) -> bool:
        return bool(self.remote_url)

    @classmethod
    def of_entry(cls, e: CatalogEntry, snapshot_dir: str) -> SnapshotRef:
        """A catalog entry: its local copy when retention kept it, else its verified copy in the store."""
        return cls(id=e.snapshot_id or 0, path=e.local_path or f"{snapshot_dir}/{e.cluster}/{e.name}",
                   revision=e.revision, hash=e.hash, total_keys=e.total_keys, total_size=e.total_size,
                   file_size=e.file_size, sha256=e.sha256, encrypted=e.encrypted, created_at=e.created_at,
                   member=e.member, live_keys=e.live_keys, remote_url="" if e.local_path else (e.remote_url or ""),
                   foreign=e.foreign)

    @classmethod
    def of(cls, row: dict[str, Any]) -> SnapshotRef:
        return cls(id=row["id"], path=row["path"], revision=row["revision"], hash=str(row["hash"]),
                   total_keys=row["total_keys"], total_size=row["total_size"], file_size=row["file_size"],
                   sha256=row["sha256"], encrypted=bool(row["encrypted"]), created_at=row["created_at"],
                   member=row["member"], live_keys=row.get("live_keys"))


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
    force: bool                          # the cluster had quorum: a rollback
    quorum_now: tuple[int, int]          # (voting, healthy) when planned; (n, 0) when nothing answered
    current_revision: int | None         # of the live cluster, when one answered
    membership_source: str               # "live" | "recorded"
    membership_seen_at: float            # when that membership was seen
    newer: tuple[str, ...]               # file names of verified snapshots newer than the chosen one
    etcd_version: str                    # as the members reported it, or the bot's etcdutl
    launcher: str                        # "manual" | "command"
    steps: tuple[Step, ...]
    fingerprint: str

    @property
    def revisions_lost(self) -> int:
        return max(0, (self.current_revision or 0) - self.snapshot.revision)

    @property
    def bump_supported(self) -> bool:
        return _version(self.etcd_version) >= BUMP_SINCE

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def expected_members(self) -> int:
        return len(self.members)

    def restore_args(self, m: RestoreMember, snapshot_path: str) -> list[str]:
        """`etcdutl snapshot restore` for one member, every parameter explicit."""
        args = ["etcdutl", "snapshot", "restore", snapshot_path, "--name", m.name,
                "--initial-cluster", self.initial_cluster, "--initial-cluster-token", self.token,
                "--initial-advertise-peer-urls", m.peer_url, "--data-dir", m.data_dir]
        if self.bump_supported:
            args += ["--bump-revision", str(BUMP_REVISIONS), "--mark-compacted"]
        return args

    def manual_commands(self, action: str, snapshot_path: str) -> str:
        """What a person runs on each host for `action` (the manual launcher's stop, restore or start),
        host by host; every word shell-quoted (bot.output.shell)."""
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
        return env

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RestorePlan:
        return cls(**{**data, "snapshot": SnapshotRef(**data["snapshot"]),
                      "members": tuple(RestoreMember(**{**m, "client_urls": tuple(m["client_urls"])})
                                       for m in data["members"]),
                      "quorum_now": tuple(data["quorum_now"]), "newer": tuple(data["newer"]),
                      "steps": tuple(Step(s["key"], s["title"]) for s in data["steps"])})


def member_id(peer_urls: Iterable[str], token: str) -> int:
    """The ID etcd gives a member of a new cluster (bootstrap or `snapshot restore`): the first 8 bytes,
    big-endian, of sha1(its sorted peer URLs joined, then the cluster token) (membership.computeMemberId)."""
    digest = hashlib.sha1(("".join(sorted(peer_urls)) + token).encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big")


def cluster_id(member_ids: Iterable[int]) -> int:
    """The cluster ID etcd derives from its members' IDs: sha1 over the sorted IDs, 8 bytes big-endian each."""
    digest = hashlib.sha1(b"".join(i.to_bytes(8, "big") for i in sorted(member_ids)), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big")


K8S_BEFORE = "Stop every kube-apiserver before the restore (it would write to the old data and cache it)."
K8S_AFTER = ("After the restore: restart every kube-apiserver, then kube-controller-manager and kube-scheduler, then "
             "the kubelets, so that no component keeps state newer than the snapshot.")


def bump_note(plan: RestorePlan) -> str:
    if plan.bump_supported:
        return (f"etcdutl {plan.etcd_version} supports --bump-revision/--mark-compacted: they are added, so clients' "
                "watch caches are invalidated.")
    return (f"etcd {plan.etcd_version or '(version unknown)'}: its etcdutl has no --bump-revision/--mark-compacted "
            "(3.5.10 and later, 3.6): clients' watch caches are NOT invalidated by the restore; restart every "
            "watcher (kube-apiserver and controllers) as the follow-ups say.")


@dataclass(frozen=True)
class Membership:
    """The members to restore and where that list came from."""

    members: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]  # (hex id, name, peer URLs, client URLs)
    source: str              # "live" | "recorded"
    seen_at: float


def _version(text: str) -> tuple[int, int, int]:
    parts = (text.lstrip("v").split("-")[0].split(".") + ["0", "0", "0"])[:3]
    try:
        return int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return (0, 0, 0)


def choose_snapshot(rows: Sequence[dict[str, Any] | SnapshotRef], wanted: str | None, *,
                    foreign_ok: bool = False, encrypted_only: bool = False) -> tuple[SnapshotRef, tuple[str, ...]]:
    """The snapshot asked for (file name or revision), else the newest the catalog knows; and the names of
    the bot's own newer ones. `rows`: the cluster's verified snapshots (catalog rows, or refs from the
    catalog of both places), newest first. The store alone never picks the default: an object only the
    store holds is chosen only by name, and a foreign one (not signed by the bot) only by its exact file
    name and with `foreign_ok` (a restore's --force). `encrypted_only` (the cluster has age_recipients):
    a plaintext object the catalog did not record is refused, whatever its manifest says."""
    refs = [r if isinstance(r, SnapshotRef) else SnapshotRef.of(r) for r in rows]
    own = [r for r in refs if not r.foreign]
    if wanted is None:
        catalogued = [r for r in own if r.id]
        if not catalogued and own:
            raise Refusal(f"the bot's catalog records no snapshot of this cluster; the store holds {len(own)} it "
                          f"wrote, the newest {own[0].file_name}", "name the one you want (see /etcd snapshots)")
        if not catalogued:
            raise Refusal("no verified snapshot of this cluster is recorded", "take one with /etcd snapshot while "
                          "a member answers, or restore by hand from your own backup")
        chosen = catalogued[0]
    else:
        w = wanted.strip()
        chosen = next((r for r in own if r.file_name == w or (w.isdigit() and r.revision == int(w))), None) or \
            _foreign(refs, w, foreign_ok)
    if encrypted_only and not chosen.encrypted and not chosen.id:
        raise Refusal(f"{chosen.file_name} is plaintext, this cluster encrypts its snapshots (age_recipients), "
                      "and the bot's catalog never recorded it", "choose an encrypted snapshot, or one the catalog "
                      "records (see /etcd snapshots)")
    return chosen, tuple(r.file_name for r in refs[:refs.index(chosen)] if not r.foreign)


def _foreign(refs: list[SnapshotRef], name: str, allowed: bool) -> SnapshotRef:
    """The foreign object named exactly `name`, when it may be used; Refusal otherwise."""
    found = next((r for r in refs if r.foreign and r.file_name == name), None)
    if found is None:
        raise Refusal(f"no recorded snapshot named or at revision {name!r}", "see /etcd snapshots")
    if not found.sha256:
        raise Refusal(f"{name} is foreign ({found.foreign}): nothing says what it holds",
                      "fetch it with the store's own tools and restore by hand if you must")
    if not allowed:
        raise Refusal(f"{name} is foreign, not a snapshot this bot took: {found.foreign}",
                      "restore it only on purpose, by name with --force")
    return found


RESTORE_STEPS = (
    ("verify", "Verify the snapshot: sha256 trailer, bbolt structure, status matches the catalog"),
    ("stop", "Stop every member"),
    ("restore", "Restore every member's data from the snapshot (old data directories moved aside)"),
    ("start", "Start every member on its restored data"),
    ("healthy", "Wait for a leader and every member healthy"),
    ("check", "Verify: every member at the snapshot's revision, HashKV equal across members"),
    ("followups", "Post the Kubernetes follow-ups and a summary"),
)


def plan_restore(cluster: str, snapshot: SnapshotRef, newer: tuple[str, ...], membership: Membership, *,
                 quorum: tuple[int, int], force: bool, current_revision: int | None, data_dir: str,
                 etcd_version: str, launcher: str, launcher_has_actions: bool,
                 plan_id: str | None = None) -> RestorePlan:
    """Build the restore plan, or raise Refusal. `quorum`: (voting, healthy) now; `data_dir` a template with {name}."""
    voting, healthy = quorum
    has_quorum = voting > 0 and healthy >= voting // 2 + 1
    if has_quorum and not force:
        raise Refusal(f"cluster {cluster} still has quorum ({healthy} of {voting} voting members healthy): a restore "
                      "would throw away every write since the snapshot",
                      "use /etcd replace for failed members; to roll back on purpose add --force")
    if launcher == "command" and not launcher_has_actions:
        raise Refusal("the cluster's command launcher has no {action} in its argv, so it can only start members",
                      "add {action} to the launcher argv (start, stop, restore), or use the manual launcher")
    if not membership.members:
        raise Refusal(f"no member of {cluster} answers and the bot never recorded its membership",
                      "restore by hand (etcdutl snapshot restore on every member)")
    members = []
    for hex_id, name, peers, clients in membership.members:
        if not name or not peers:
            raise Refusal(f"member {hex_id} has no name or peer URL (never started)",
                          "remove it, or restore by hand")
        members.append(RestoreMember(name, hex_id, peers[0], clients, data_dir.replace("{name}", name)))
    pid = plan_id or secrets.token_hex(3)
    token = f"{cluster}-restore-{pid}-{secrets.token_hex(4)}"
    return RestorePlan(id=pid, cluster=cluster, snapshot=snapshot, members=tuple(members), token=token, force=force,
                       quorum_now=quorum, current_revision=current_revision, membership_source=membership.source,
                       membership_seen_at=membership.seen_at, newer=newer, etcd_version=etcd_version,
                       launcher=launcher, steps=tuple(Step(k, t) for k, t in RESTORE_STEPS),
                       fingerprint=f"{snapshot.sha256}:{','.join(m.id for m in members)}")
