"""The bot's configuration: a TOML file, validated strictly.

A typo in a config key must not silently disable a safety check, so unknown keys are errors, and every
error names the key it is about in one line. Each table below is declared once (bot.config.table): its
fields are the file's keys, and the same declaration checks a file, names the key of each error and
writes the JSON Schema editors use (`python -m bot.config.schema`, deploy/etcd-chatops.schema.json).

To add a key, add a field to its table: its type, its default and a docstring (the schema's description),
with a check from bot.config.table if the type alone does not say it (a range, a pattern, a choice; a
check of two keys together is the table's model_validator). A secret is three fields (`x_env`, `x_file`
and `x: Annotated[str | None, Secret()]`); a duration is held in seconds under its key's name
(`validation_alias`). A new table is a class derived from Table, decorated with @table, and a field of
the table that holds it. Then regenerate the schema (the test that compares it says how).
"""
from __future__ import annotations

import json
import os
import re
import string
import tomllib
from dataclasses import KW_ONLY, dataclass, field, replace
from datetime import date, time
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    Field,
    GetJsonSchemaHandler,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from bot.config import dsn
from bot.config.offsite import StoreConfig
from bot.config.table import (
    Check,
    Derived,
    Load,
    Problem,
    Secret,
    Table,
    bounds,
    duration,
    hmac_key,
    loading,
    matches,
    one_line,
    one_of,
    path,
    some,
    table,
    to_path,
)
from bot.config.table import (
    ConfigError as ConfigError,
)
from bot.config.table import parse_duration as parse_duration
from bot.domain.urls import parse_url

LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # always fullmatch: `$` lets a trailing newline in
LAUNCHER_PLACEHOLDERS = ("name", "peer_url", "client_url", "action")
MAX_TTL_MINUTES = 7 * 24 * 60

Positive = Annotated[float, bounds(gt=0)]
SlackId = Annotated[str, matches(r"[A-Z0-9]{2,}", "is not a Slack ID (like C0INCIDENT, U0LEAD0001 or S0ONCALL01)")]
# A plan is approved on facts of its proposal: a week is the longest they may wait (and 1e308 minutes would
# overflow the expiry to infinity, a plan that never expires).
TTL = Annotated[float, bounds(gt=0), bounds(le=MAX_TTL_MINUTES, says=f"at most {MAX_TTL_MINUTES} (7 days)")]
File = Annotated[Path, path(existing=True)]
Schedule = Annotated[float, duration("1m", "schedule")]


def argv_fields(arg: str) -> list[tuple[str, str | None, str]]:
    """Each replacement field of one launcher argv element as str.format_map reads it: (name, conversion,
    format spec). The config check and LauncherConfig.has_actions both read argv through this, so
    `{{action}}` (a literal, not a field) can never count as the action. ValueError when malformed."""
    return [(name, conversion, spec or "") for _, name, spec, conversion in string.Formatter().parse(arg)
            if name is not None]


def _url(value: str) -> str:
    return parse_url(value).url


def _reaction(value: str) -> str:
    name = value.strip(":")
    if not re.fullmatch(r"[a-z0-9_+'-]+", name):
        raise ValueError(f"{value!r} is not a Slack reaction name (like white_check_mark)")
    return name


Reaction = Annotated[str, Check(_reaction, {"pattern": "^:*[a-z0-9_+'-]+:*$"})]


def _age_recipient(value: str) -> str:
    try:
        from pyrage import x25519
        x25519.Recipient.from_str(value)
    except Exception:
        raise ValueError(f"{value[:12]!r}... is not an age X25519 public key (age1...)") from None
    return value


def check_age_recipient(value: str, key: str) -> str:
    """An age public key; ConfigError naming `key` otherwise (the CLI's --age-recipient)."""
    try:
        return _age_recipient(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _age_identity(text: str) -> str:
    """age-keygen's file: comment lines, then the key."""
    found = next((line.strip() for line in text.splitlines() if line.startswith("AGE-SECRET-KEY-")), None)
    if found is None:
        raise ValueError("not an age identity (AGE-SECRET-KEY-1...)")
    return found


# ---------------------------------------------------------------- the tables, as the file nests them

@dataclass(frozen=True)
class ApprovalRule:
    """How one kind of plan is approved (what ApprovalConfig.rule answers)."""

    approvals_needed: int = 1            # distinct approvers
    allow_self_approval: bool = False    # whether the proposer counts as one
    ttl_minutes: float = 30.0


# Keys of earlier releases that have one spelling now: a file that still has one is told which.
RETIRED = {"restore_approvals": "[approval.restore] approvals_needed = N"}
# Kinds of plan and how many approvers each needs unless `[approval.<kind>]` says otherwise.
APPROVALS_NEEDED = {"replace": 1, "restore": 2, "defrag": 1}


@table
class KindApproval(Table):
    """`[approval.<kind>]`: one kind of plan's approval rule; a key not given is `[approval]`'s."""

    approvals_needed: Annotated[int, bounds(ge=1, says="must be 1 or more")] | None = None
    """Distinct approvers (default: replace 1, restore 2, defrag 1)."""
    allow_self_approval: bool | None = None
    """Whether the proposer may approve their own plan of this kind."""
    ttl_minutes: TTL | None = None
    """A plan of this kind not approved by then expires."""


@table
class ApprovalConfig(Table):
    """`[approval]`: who approves plans, how, and how long a plan waits."""

    approvers: tuple[SlackId, ...] = ()
    """Slack user IDs; used for every cluster that does not set access.approvers."""
    approver_groups: tuple[SlackId, ...] = ()
    """Slack user group IDs."""
    reaction: Reaction = "white_check_mark"
    """The reaction that approves (skin tones are ignored)."""
    reject_reaction: Reaction = "x"
    """The reaction that rejects (an approver, or the proposer)."""
    ttl_minutes: TTL = 30.0
    """A plan not approved by then expires (at most 10080, a week)."""
    allow_self_approval: bool = False
    """Whether a proposer who is an approver may approve their own plan."""
    replace: KindApproval | None = None
    """The approval rule of member replacements."""
    restore: KindApproval | None = None
    """The approval rule of restores (2 approvers; the proposer never counts unless this table says so)."""
    defrag: KindApproval | None = None
    """The approval rule of defragmentations."""

    @classmethod
    def unknown(cls, key: str) -> str:
        if key in RETIRED:  # one key, one spelling: an old file is told the new one
            return f"retired; write {RETIRED[key]}"
        return super().unknown(key)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.reaction == self.reject_reaction:
            raise Problem("must differ from approval.reaction", "reject_reaction")
        return self

    def rule(self, kind: str) -> ApprovalRule:
        """The kind's table, else the top-level keys with the kind's default number of approvers."""
        needed = APPROVALS_NEEDED.get(kind, 1)
        own: KindApproval | None = getattr(self, kind) if kind in APPROVALS_NEEDED else None
        if own is None:
            # A restore's proposer never counts as an approver unless [approval.restore] says so explicitly.
            return ApprovalRule(needed, self.allow_self_approval and kind != "restore", self.ttl_minutes)
        return ApprovalRule(own.approvals_needed or needed,
                            self.allow_self_approval if own.allow_self_approval is None else own.allow_self_approval,
                            own.ttl_minutes or self.ttl_minutes)


# The launcher kinds, and how long each waits by default. `manual` waits for a person at each stage: ten minutes
# is time to run a stage's commands on a few hosts; a stage nobody confirms by then is one nobody is at, and
# the plan should fail and say so (it holds the cluster's one open plan) rather than wait on. `ssh` waits for one
# action on one host (a restore of a large snapshot included).
LAUNCH_TIMEOUTS = {"manual": 600.0, "command": 120.0, "ssh": 300.0}
RECIPES = ("static-pod", "systemd")
# A word the bot sends to etcd-chatops-node over SSH: the node splits its forced command on spaces and refuses
# quoting and every shell character (deploy/node, splitForced), so a word outside this set could never reach it.
NODE_WORD = r"[A-Za-z0-9._/:=,@+\[\]-]+"
HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}))"
                       r"(?::(?P<port>[0-9]{1,5}))?")
SSH_ONLY = ("recipe", "user", "sudo", "key_env", "key_file", "known_hosts", "hosts", "manifests_dir", "unit",
            "node_command", "etcdutl")


def _no_default(schema: dict[str, Any]) -> None:
    """For a default that depends on another key: the schema states none."""
    schema.pop("default", None)


def split_host_port(value: str, default_port: int = 22) -> tuple[str, int]:
    """"10.0.0.3:2222" -> ("10.0.0.3", 2222); "[fd00::3]" -> ("fd00::3", 22); ValueError when it is neither."""
    found = HOST_PORT.fullmatch(value)
    port = int(found.group("port")) if found and found.group("port") else default_port
    if found is None or not 0 < port < 65536:
        raise ValueError(f"{value!r} is not host or host:port (an address, [IPv6] or DNS name, port 1-65535)")
    return found.group("v6") or found.group("host"), port


def _host_port(value: str) -> str:
    split_host_port(value)
    return value


def _ssh_key(text: str) -> str:
    """A private key in OpenSSH's format (or PEM) without a passphrase: the bot runs unattended. The reason never
    shows the key."""
    from cryptography.exceptions import UnsupportedAlgorithm  # here: only an ssh launcher's key needs it
    from cryptography.hazmat.primitives import serialization
    data = (text.strip() + "\n").encode()
    openssh = b"OPENSSH PRIVATE KEY" in data
    load = serialization.load_ssh_private_key if openssh else serialization.load_pem_private_key
    try:
        load(data, password=None)
    except TypeError:
        raise ValueError("the SSH key is encrypted with a passphrase: the bot runs unattended and needs a key "
                         "without one (protect the file or the Secret instead)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not an SSH private key (like ssh-keygen -t ed25519 writes)") from None
    return data.decode()


NODE_WORD_SAYS = "has a character etcd-chatops-node does not take (it takes plain words: letters, digits and ._/:=,@+-)"
NodeWord = Annotated[str, matches(NODE_WORD, NODE_WORD_SAYS)]
# A per-host value: a node word that may hold {name}, the member's name.
NodeTemplate = Annotated[str, matches(r"(?:[A-Za-z0-9._/:=,@+\[\]-]|\{name\})+", NODE_WORD_SAYS + " ({name} aside)")]


@table
class LauncherConfig(Table):
    """How the bot starts, stops and restores members: a person (manual), your program (command), or
    etcd-chatops-node on each control-plane host over SSH (ssh)."""

    kind: Annotated[str, one_of("launcher kind", *LAUNCH_TIMEOUTS)] = "manual"
    """manual: the bot posts the new member's environment and waits; command: it runs argv; ssh: it runs
    etcd-chatops-node on the member's host."""
    argv: tuple[str, ...] = ()
    """The command, without a shell; {name}, {peer_url}, {client_url} and {action} are substituted."""
    timeout_seconds: Positive = Field(default=0.0, json_schema_extra=_no_default)   # 0.0: the kind's, LAUNCH_TIMEOUTS
    """manual: how long to wait for a person, per stage (600); command: for the command (120); ssh: for one
    action on a host (300)."""
    recipe: Annotated[str, one_of("recipe", *RECIPES)] | None = None
    """ssh: static-pod (kubeadm's stacked etcd) or systemd (external etcd as a unit)."""
    user: Annotated[str, matches(r"[a-z_][a-z0-9_.-]{0,31}", "is not a user name")] = "root"
    """ssh: the user the bot logs in as."""
    sudo: bool = False
    """ssh: run etcd-chatops-node through `sudo -n` (a user with a sudoers line for it)."""
    key_env: str | None = None
    """ssh: the environment variable holding the bot's private key (OpenSSH format, no passphrase)."""
    key_file: File | None = None
    """ssh: or the file holding it."""
    key: Annotated[str | None, Secret(_ssh_key)] = field(default=None, repr=False)
    known_hosts: File | None = None
    """ssh: the hosts' pinned public keys (ssh-keyscan's lines, checked by you); an unknown or changed key stops
    everything."""
    hosts: dict[Annotated[str, matches(CLUSTER_NAME.pattern, "is not a member name")],
                Annotated[str, Check(_host_port)]] = Field(default_factory=dict)
    """ssh: member name -> host or host:port (default: the host of the member's peer URL, port 22)."""
    manifests_dir: NodeTemplate = "/etc/kubernetes/manifests"
    """ssh, static-pod: the kubelet's static pod directory on the hosts; may contain {name}."""
    unit: NodeTemplate = "etcd.service"
    """ssh, systemd: etcd's unit on the hosts; may contain {name}."""
    node_command: Annotated[tuple[NodeWord, ...], some("word")] = ("etcd-chatops-node",)
    """ssh: the node program on the hosts, as an argv prefix (its forced command replaces it)."""
    etcdutl: NodeWord = "etcdutl"
    """ssh: etcdutl on the hosts, found on PATH or an absolute path (must equal the node's --etcdutl)."""
    connect_timeout_seconds: Positive = 10.0
    """ssh: the deadline of connecting to a host and checking its key."""

    @model_validator(mode="after")
    def _kind_and_argv(self) -> Self:
        if not self.timeout_seconds:
            object.__setattr__(self, "timeout_seconds", LAUNCH_TIMEOUTS[self.kind])
        if self.kind == "command" and not self.argv:
            raise Problem("a command launcher needs argv, the command to run", "argv")
        if self.kind != "command" and self.argv:
            raise Problem("only a command launcher takes argv", "argv")
        if self.kind == "ssh":
            self._check_ssh()
        else:
            given = next((k for k in SSH_ONLY if getattr(self, k) != _LAUNCHER_DEFAULTS[k]), None)
            if given is not None:
                raise Problem(f"only an ssh launcher takes {given}", given)
        for i, arg in enumerate(self.argv):
            try:
                fields = argv_fields(arg)
            except ValueError as e:
                raise Problem(f"{e} (write a literal brace as {{{{ or }}}})", "argv", i) from None
            for name, conversion, spec in fields:
                if name not in LAUNCHER_PLACEHOLDERS:
                    raise Problem(f"unknown placeholder {{{name}}} (use {{name}}, {{peer_url}}, {{client_url}} or "
                                  "{action})", "argv", i)
                if conversion or spec:
                    raise Problem(f"write the placeholder as plain {{{name}}}, without a conversion or format",
                                  "argv", i)
        return self

    def _check_ssh(self) -> None:
        if self.recipe is None:
            raise Problem("an ssh launcher needs recipe: static-pod (kubeadm) or systemd", "recipe")
        if self.known_hosts is None:
            raise Problem("an ssh launcher needs known_hosts: the hosts' keys are pinned, never learned",
                          "known_hosts")
        if self.key_env is None and self.key_file is None:
            raise Problem("an ssh launcher needs key_file or key_env: the bot's private key", "key_file")

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """What the model validator asks of an ssh launcher, for editors too: its recipe, key and known hosts."""
        found = handler(schema)
        table_schema = handler.resolve_ref_schema(found)
        table_schema["allOf"] = [{"if": {"properties": {"kind": {"const": "ssh"}}, "required": ["kind"]},
                                  "then": {"required": ["recipe", "known_hosts"],
                                           "anyOf": [{"required": ["key_file"]}, {"required": ["key_env"]}]}}]
        return found

    @property
    def has_actions(self) -> bool:
        """Whether the launcher can also stop members, restore their data and report whether they run (restore
        plans need it): an ssh launcher always can; a command launcher when its argv has an {action} field."""
        return self.kind == "ssh" or any(name == "action" for arg in self.argv for name, _, _ in argv_fields(arg))

    def host_of(self, member: str, peer_url: str) -> tuple[str, int]:
        """ssh: where member `member` runs: `hosts`, else its peer URL's host, port 22."""
        if member in self.hosts:
            return split_host_port(self.hosts[member])
        return parse_url(peer_url).host, 22

    def on_host(self, template: str, member: str) -> str:
        """A per-host value (manifests_dir, unit) for member `member`."""
        return template.replace("{name}", member)


_LAUNCHER_DEFAULTS: dict[str, Any] = {"recipe": None, "user": "root", "sudo": False, "key_env": None,
                                      "key_file": None, "known_hosts": None, "hosts": {},
                                      "manifests_dir": "/etc/kubernetes/manifests", "unit": "etcd.service",
                                      "node_command": ("etcd-chatops-node",), "etcdutl": "etcdutl"}


@table
class RestoreConfig(Table):
    """`[clusters.restore]`: what a restore plan needs that etcd cannot tell."""

    data_dir: str = "/var/lib/etcd"
    """Each member's data directory; may contain {name}."""
    age_identity_env: str | None = None
    """The environment variable holding the age identity that decrypts snapshots (restores and drills only)."""
    age_identity_file: File | None = None
    """Or the age-keygen file holding it."""
    age_identity: Annotated[str | None, Secret(_age_identity)] = field(default=None, repr=False)
    no_leader_seconds: Positive = 3.0
    """A member reporting no leader this long is evidence of quorum loss; an election in a healthy cluster
    ends well within it."""
    apiserver: Literal["ask", "none"] = "ask"
    """Where the bot cannot stop kube-apiserver itself (every launcher but ssh's static-pod recipe, which does):
    "ask" makes stopping every kube-apiserver a step of the restore, before any member stops, that a person does
    and confirms with /etcd continue; "none" leaves it out, for an etcd that no kube-apiserver uses."""


@table
class SnapshotPolicy(Table):
    """Encryption, retention and schedule of a cluster's snapshots (`[snapshots]`: every cluster's defaults;
    `[clusters.snapshots]`: one cluster's, key by key)."""

    age_recipients: tuple[Annotated[str, Check(_age_recipient)], ...] = ()
    """age public keys (age1...) to encrypt with; none: not encrypted."""
    keep_last: Annotated[int, bounds(ge=1)] | None = None
    """Keep the newest N."""
    keep_days: Positive | None = None
    """Keep those younger than D days (a snapshot kept by either rule stays)."""
    keep_plan_snapshots_days: Positive = 30.0
    """A plan's pre-change snapshot is kept at least this long, whatever the above say."""
    every_seconds: Schedule | None = Field(default=None, validation_alias="every")
    """Take one on a schedule (6h, 30m, 1d, 1h30m; 1m at least)."""
    drill_every_seconds: Schedule | None = Field(default=None, validation_alias="drill_every")
    """Restore-drill the newest snapshot on a schedule."""
    store: StoreConfig | None = None
    """Off-site copies, uploaded while saved; a cluster's own table replaces the top-level one whole."""

    @property
    def encrypted(self) -> bool:
        return bool(self.age_recipients)


@dataclass(frozen=True)
class RoleConfig:
    """Who holds a role: users and user groups. `None` users and groups
    (the keys absent) means anyone in a channel bound to the cluster."""

    users: tuple[str, ...] | None = None
    groups: tuple[str, ...] = ()

    @property
    def open(self) -> bool:
        return self.users is None and not self.groups


def _role(users: tuple[str, ...] | None, groups: tuple[str, ...] | None, absent: RoleConfig) -> RoleConfig:
    return absent if users is None and groups is None else RoleConfig(users or (), groups or ())


@table
class AccessConfig(Table):
    """`[clusters.access]`: who holds each role on the cluster; a role left out is open to anyone in a bound
    channel, except approvers, who default to [approval]'s."""

    reader_users: tuple[SlackId, ...] | None = Field(default=None, validation_alias="readers")
    """status, members, plans, snapshots: Slack user IDs."""
    reader_groups: tuple[SlackId, ...] | None = None
    """Readers by Slack user group ID."""
    operator_users: tuple[SlackId, ...] | None = Field(default=None, validation_alias="operators")
    """replace, snapshot (a proposer may cancel their own plan)."""
    operator_groups: tuple[SlackId, ...] | None = None
    """Operators by Slack user group ID."""
    approver_users: tuple[SlackId, ...] | None = Field(default=None, validation_alias="approvers")
    """approve, reject, resume, abandon, cancel (default: [approval])."""
    approver_groups: tuple[SlackId, ...] | None = None
    """Approvers by Slack user group ID."""

    @property
    def readers(self) -> RoleConfig:
        return _role(self.reader_users, self.reader_groups, RoleConfig())

    @property
    def operators(self) -> RoleConfig:
        return _role(self.operator_users, self.operator_groups, RoleConfig())

    @property
    def approvers(self) -> RoleConfig:
        return _role(self.approver_users, self.approver_groups, RoleConfig(()))


Share = Annotated[float, bounds(gt=0, le=1)]


@table
class WatchConfig(Table):
    """`[clusters.watch]`: the background watch that posts conditions (bot/watch). The thresholds default to
    etcd's monitoring mixin's (the alerts kube-prometheus ships), so the watch and Alertmanager agree."""

    enabled: bool = True
    """false turns the bot's own checks of this cluster off (Alertmanager's alerts for it are still posted)."""
    interval_seconds: Annotated[float, duration("1s", "interval")] = Field(
        default="15s", validation_alias="interval", validate_default=True)
    """One status fan-out per interval (1s at least)."""
    grace_seconds: Annotated[float, duration()] = Field(default="45s", validation_alias="grace", validate_default=True)
    """How long a condition lasts before it is posted (and is gone before it is resolved)."""
    cert_warning_seconds: Annotated[float, duration()] = Field(
        default="14d", validation_alias="cert_warning", validate_default=True)
    """A serving certificate that expires within this is a condition."""
    window_seconds: Annotated[float, duration("1s", "window")] = Field(
        default="5m", validation_alias="window", validate_default=True)
    """Rates and latency percentiles are taken over the /metrics readings of this window (the mixin's 5m)."""
    quota_warning: Share = 0.8
    """A member's database above this share of its quota is the quota condition, as a warning."""
    quota_critical: Share = 0.95
    """Above this share it is critical (the mixin's etcdDatabaseQuotaLowSpace)."""
    peer_send_failures_per_second: Positive = 0.01
    """A member failing to send to a peer more often than this (the mixin's part of etcdMembersDown)."""
    grpc_failed_warning: Share = 0.01
    """A share of a member's gRPC requests of one method failing (etcdHighNumberOfFailedGRPCRequests)."""
    grpc_failed_critical: Share = 0.05
    """The same share, critical."""
    grpc_p99_seconds: Positive = 0.15
    """A member's unary gRPC p99 above this is slow (etcdGRPCRequestsSlow; members run with --metrics=extensive
    export it)."""
    peer_rtt_p99_seconds: Positive = 0.15
    """A member's peer round-trip p99 above this is slow (etcdMemberCommunicationSlow)."""
    failed_proposals_per_second: Positive = 5.0
    """A member failing more proposals a second than this (etcdHighNumberOfFailedProposals)."""
    wal_fsync_p99_seconds: Positive = 0.5
    """A member's WAL fsync p99 above this is a slow disk (etcdHighFsyncDurations, warning)."""
    wal_fsync_p99_critical_seconds: Positive = 1.0
    """Above this it is critical."""
    backend_commit_p99_seconds: Positive = 0.25
    """A member's backend commit p99 above this is a slow disk (etcdHighCommitDurations)."""
    fragmented_below: Share = 0.5
    """A member whose database is in use below this share of its size is fragmented
    (etcdDatabaseHighFragmentationRatio)..."""
    fragmented_in_use_bytes: Annotated[int, bounds(ge=0)] = 100 * 1024 * 1024
    """...when it uses more than this many bytes."""
    growth_horizon_seconds: Annotated[float, duration("1m", "horizon")] = Field(
        default="4h", validation_alias="growth_horizon", validate_default=True)
    """A database that, growing as it did over this long, reaches its quota within this long
    (etcdExcessiveDatabaseGrowth: 4h)."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.quota_critical < self.quota_warning:
            raise Problem("must be at least quota_warning", "quota_critical")
        if self.grpc_failed_critical < self.grpc_failed_warning:
            raise Problem("must be at least grpc_failed_warning", "grpc_failed_critical")
        if self.wal_fsync_p99_critical_seconds < self.wal_fsync_p99_seconds:
            raise Problem("must be at least wal_fsync_p99_seconds", "wal_fsync_p99_critical_seconds")
        return self


@table
class ClusterConfig(Table):
    """`[[clusters]]`: one etcd cluster."""

    name: Annotated[str, matches(CLUSTER_NAME.pattern, "is not a cluster name (letters, digits, '-', '_', '.')")
                    ] = Field(examples=["prod"])
    """Letters, digits, '-', '_', '.'; unique."""
    endpoints: Annotated[tuple[Annotated[str, Check(_url)], ...], some("endpoint")] = Field(
        examples=[["https://10.0.0.2:2379", "https://10.0.0.3:2379"]])
    """Client URLs, http(s)://host:port; no two clusters may share one."""
    channels: tuple[SlackId, ...] = ()
    """The channel IDs that speak for this cluster."""
    cacert: File | None = None
    """TLS: the CA that signed the members' certificates."""
    cert: File | None = None
    """Mutual TLS: the client certificate (with key)."""
    key: File | None = None
    """Mutual TLS: the client certificate's key (with cert)."""
    username: str | None = None
    """etcd authentication, with password_env or password_file."""
    password_env: str | None = None
    """The environment variable holding the etcd user's password."""
    password_file: File | None = None
    """Or the file holding it."""
    password: Annotated[str | None, Secret()] = field(default=None, repr=False)
    timeout_seconds: Positive = 2.0
    """The deadline of every read, per member."""
    catch_up_seconds: Positive = 300.0
    """Bound on waiting for a new member to catch up / the cluster to settle."""
    launcher: LauncherConfig = LauncherConfig()
    """How a replacement member gets started."""
    snapshots: SnapshotPolicy = SnapshotPolicy()
    """This cluster's snapshots: each key given here overrides [snapshots]'s."""
    access: AccessConfig = AccessConfig()
    """Who holds each role on this cluster."""
    restore: RestoreConfig = RestoreConfig()
    """What a restore plan needs that etcd cannot tell."""
    defrag_disarm_below: Annotated[float, bounds(gt=0, le=1)] = 0.9
    """/etcd defrag disarms NOSPACE only below this share of every quota."""
    watch: WatchConfig = WatchConfig()
    """The background watch that posts conditions."""
    alert_labels: Annotated[dict[Annotated[str, matches(LABEL_NAME, "is not a Prometheus label name")], str] | None,
                            Field(examples=[{"cluster": "prod"}])] = field(default=None, hash=False)
    """An alert from Alertmanager belongs to this cluster when all these labels match (default: cluster = name)."""

    @property
    def alert_match(self) -> dict[str, str]:
        """The labels an Alertmanager alert of this cluster carries."""
        return dict(self.alert_labels) if self.alert_labels is not None else {"cluster": self.name}

    @model_validator(mode="after")
    def _pairs(self) -> Self:
        if (self.cert is None) != (self.key is None):
            raise Problem("cert and key go together", "cert" if self.cert is None else "key")
        if (self.username is None) != (self.password is None):
            raise Problem("username needs password_env or password_file, and back",
                          "username" if self.username is None else "password_env")
        return self


ALERTMANAGER_TOKEN_MIN = 16  # characters: a token short enough to guess is no lock


def _alertmanager_token(token: str) -> str:
    if len(token) < ALERTMANAGER_TOKEN_MIN:
        raise ValueError(f"the Alertmanager token has {len(token)} characters; it needs at least "
                         f"{ALERTMANAGER_TOKEN_MIN} (e.g. openssl rand -hex 32)")
    return token


@table
class AlertmanagerConfig(Table):
    """`[alertmanager]`: the receiver of Alertmanager's webhook, POST /alertmanager on the port serving /metrics.
    Without a token it is off (404)."""

    token_env: str | None = None
    """The environment variable holding the bearer token Alertmanager sends (http_config.authorization)."""
    token_file: File | None = None
    """Or the file holding it."""
    token: Annotated[str | None, Secret(_alertmanager_token)] = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.token is not None


REPLICA_ID = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}"


@table
class ReplicasConfig(Table):
    """Several replicas on one shared database: only the holder of the executor lease runs plans."""

    # Renewed every third of it: under 3 s a database hiccup deposes the leader; over 60 s a dead one leads on.
    lease_seconds: Annotated[int, bounds(ge=3, le=60, says="must be between 3 and 60 seconds")] = 10
    """A dead leader is replaced within lease_seconds * 4/3."""
    replica_id: Annotated[str, matches(REPLICA_ID, "must be 1-100 letters, digits, '.', '_', ':' or '-'")] = ""
    """This replica's name in the lease, the log and the takeover notes (default: <hostname>-<pid>)."""
    resume_on_takeover: bool | None = None
    """Whether a new leader resumes the plans the last one left running (default: on PostgreSQL)."""


def _database(value: object, info: ValidationInfo) -> Path | str:
    """A path (SQLite, relative to the config file) or a postgresql:// URL, checked without showing its password."""
    if isinstance(value, str) and "://" in value:
        return dsn.check_url(value)
    database = to_path(value, info)
    if loading(info) is not None and database.is_dir():
        raise ValueError(f"{value}: is a directory, not a database file")
    return database


def _snapshot_dir(value: object, info: ValidationInfo) -> Path:
    directory = to_path(value, info)
    if loading(info) is not None and directory.exists() and not directory.is_dir():
        raise ValueError(f"{value}: is not a directory")
    return directory


@table
class Config(Table):
    """The bot's configuration file."""

    database: Annotated[Path | str, PlainValidator(_database, json_schema_input_type=str)] = Field(
        default=Path("etcd-chatops.db"), validate_default=True)
    """A SQLite file, or a postgresql://user@host:5432/db URL (shared by several replicas)."""
    database_password_env: str | None = None
    """PostgreSQL's password, from this environment variable (else libpq's PG* environment)."""
    database_password_file: File | None = None
    """Or the file holding it (a postgresql:// database only)."""
    database_password: Annotated[str | None, Secret()] = field(default=None, repr=False)
    snapshot_dir: Annotated[Path, PlainValidator(_snapshot_dir, json_schema_input_type=str)] = Field(
        default=Path("snapshots"), validate_default=True)
    """Where snapshots go, one directory per cluster."""
    database_timeout_seconds: Positive = 5.0
    """How long one write waits for another writer's lock (x3 tries)."""
    audit_key_env: str | None = None
    """The environment variable holding the audit chain's HMAC key (32+ characters); none: plain sha256."""
    audit_key_file: File | None = None
    """Or the file holding it."""
    audit_key: Annotated[str | None, hmac_key("the audit key")] = field(default=None, repr=False)
    approval: ApprovalConfig = ApprovalConfig()
    """Who approves plans, how, and how long a plan waits."""
    snapshots: SnapshotPolicy = SnapshotPolicy()
    """Every cluster's snapshots, unless its own [clusters.snapshots] says otherwise key by key."""
    replicas: ReplicasConfig = ReplicasConfig()
    """Several replicas on one PostgreSQL database."""
    alertmanager: AlertmanagerConfig = AlertmanagerConfig()
    """The receiver of Alertmanager's webhook (off without a token)."""
    source: Annotated[Path | None, Derived()] = None
    _: KW_ONLY
    # Last: errors are reported in the order of the fields, so a key a cluster inherits from [snapshots] or
    # [approval] is reported where it is written before its copies.
    clusters: Annotated[tuple[ClusterConfig, ...], some("[[clusters]] table")]
    """One [[clusters]] table per etcd cluster."""

    @model_validator(mode="after")
    def _whole(self, info: ValidationInfo) -> Self:
        if self.database_password is not None and not isinstance(self.database, str):
            raise Problem("only a postgresql:// database takes a password (database is a SQLite file)",
                          "database_password_env" if self.database_password_env else "database_password_file")
        seen: set[str] = set()
        for i, c in enumerate(self.clusters):
            if c.name in seen:
                raise Problem(f"{c.name!r} is used by another cluster", "clusters", i, "name")
            seen.add(c.name)
        _check_disjoint(self.clusters)
        labels: dict[tuple[tuple[str, str], ...], str] = {}
        for i, c in enumerate(self.clusters):
            first = labels.setdefault(tuple(sorted(c.alert_match.items())), c.name)
            if first != c.name:
                raise Problem(f"the same as those of cluster {first!r}: an alert would belong to both",
                              "clusters", i, "alert_labels")
        if (load := loading(info)) is not None:
            object.__setattr__(self, "source", load.source)
            if self.audit_key is not None:  # a store without its own manifest key signs with the audit key
                object.__setattr__(self, "clusters", tuple(_manifest_key_or(c, self.audit_key) for c in self.clusters))
        return self

    @property
    def database_shown(self) -> str:
        """The database as messages name it: a path, or the URL without its password."""
        return dsn.redact(self.database) if isinstance(self.database, str) else str(self.database)

    def database_secrets(self) -> list[str]:
        """Passwords of the database (never to appear in output)."""
        in_url = dsn.secrets_of(self.database) if isinstance(self.database, str) else []
        return in_url + ([self.database_password] if self.database_password else [])

    def alertmanager_secrets(self) -> list[str]:
        """The receiver's bearer token (never to appear in output)."""
        return [self.alertmanager.token] if self.alertmanager.token else []

    def manifest_keys(self) -> list[str]:
        """The keys the snapshot stores sign their manifests with (never to appear in output)."""
        return sorted({c.snapshots.store.manifest_key for c in self.clusters
                       if c.snapshots.store is not None and c.snapshots.store.manifest_key})

    def secrets(self) -> list[str]:
        """Every secret the file gives the bot, as it could show up in a line of output: the clusters' passwords,
        age identities and ssh launcher keys, the audit key, the stores' manifest keys, the database's
        passwords, Alertmanager's token. A private key is given line by line: a log line holds it with its
        newlines escaped."""
        keys = [line for c in self.clusters if c.launcher.key for line in c.launcher.key.splitlines()
                if line.strip() and not line.startswith("-----")]
        return ([c.password for c in self.clusters if c.password]
                + [c.restore.age_identity for c in self.clusters if c.restore.age_identity] + keys
                + ([self.audit_key] if self.audit_key else []) + self.manifest_keys() + self.database_secrets()
                + self.alertmanager_secrets())

    def cluster(self, name: str) -> ClusterConfig | None:
        return next((c for c in self.clusters if c.name == name), None)

    def clusters_for_channel(self, channel: str) -> list[ClusterConfig]:
        return [c for c in self.clusters if channel in c.channels]


def _manifest_key_or(cluster: ClusterConfig, audit_key: str) -> ClusterConfig:
    store = cluster.snapshots.store
    if store is None or store.manifest_key is not None:
        return cluster
    return replace(cluster, snapshots=replace(cluster.snapshots, store=replace(store, manifest_key=audit_key)))


def _check_disjoint(clusters: tuple[ClusterConfig, ...]) -> None:
    """No etcd under two names: the one-open-plan rule, the catalog and the watch are per cluster name, so two
    names for one cluster would let two plans change it at once. Endpoints are compared by host and port
    (scheme, case and a trailing slash aside); two names for one host (a DNS name and its address) are not
    found here."""
    owner: dict[str, tuple[int, str, str]] = {}   # address -> (index, cluster, endpoint)
    for i, c in enumerate(clusters):
        for j, endpoint in enumerate(c.endpoints):
            address = parse_url(endpoint).address
            first = owner.setdefault(address, (i, c.name, endpoint))
            if first[0] != i:
                raise Problem(f"{endpoint} reaches {address}, an endpoint of cluster {first[1]!r} too ({first[2]}); "
                              f"clusters {first[1]!r} and {c.name!r} would be one etcd under two names",
                              "clusters", i, "endpoints", j)


# ---------------------------------------------------------------- loading

def _inherit(data: dict[str, Any]) -> dict[str, Any]:
    """A cluster's [clusters.snapshots] keys override [snapshots]'s one by one (its store replaces the store
    whole), and a cluster whose [clusters.access] names no approvers takes [approval]'s. Done on the file's
    tables before they are validated, where it shows which keys a table gives."""
    snapshots, approval, clusters = data.get("snapshots", {}), data.get("approval", {}), data.get("clusters")
    if not isinstance(clusters, list):
        return data

    def inherit(cluster: dict[str, Any]) -> dict[str, Any]:
        own, access = cluster.get("snapshots", {}), cluster.get("access", {})
        if isinstance(own, dict) and isinstance(snapshots, dict):
            cluster = {**cluster, "snapshots": {**snapshots, **own}}
        if isinstance(access, dict) and isinstance(approval, dict) \
                and not {"approvers", "approver_groups"} & access.keys():
            cluster = {**cluster, "access": {**access, "approvers": approval.get("approvers", []),
                                             "approver_groups": approval.get("approver_groups", [])}}
        return cluster
    return {**data, "clusters": [inherit(c) if isinstance(c, dict) else c for c in clusters]}


CONFIG = TypeAdapter(Config)


def _values(data: Any, key: str = "") -> Any:
    """TOML's values as JSON's; a date or time, which no key takes, is refused here (JSON has none)."""
    if isinstance(data, dict):
        return {k: _values(v, f"{key}.{k}" if key else k) for k, v in data.items()}
    if isinstance(data, list):
        return [_values(v, f"{key}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, date | time):
        raise ConfigError(f"{key}: no key takes a date or a time, got {data.isoformat()}")
    return data


def parse_config(data: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Build a Config from parsed TOML; relative paths are relative to `base`."""
    text = json.dumps(_values(_inherit(data)))
    try:
        return CONFIG.validate_json(text, context=Load(base, source), by_alias=True, by_name=False)
    except ValidationError as e:
        raise ConfigError(one_line(e.errors(), Config)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at `path`."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    try:
        return parse_config(data, p.resolve().parent, p)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
