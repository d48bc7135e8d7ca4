"""The bot's configuration: a TOML file, validated strictly.

A typo in a config key must not silently disable a safety check, so unknown
keys are errors, and every error names the key it is about in one line.
"""
from __future__ import annotations

import math
import os
import re
import string
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from bot.config import dsn
from bot.config.offsite import StoreConfig, check_endpoint, check_store_url
from bot.domain.urls import parse_url

T = TypeVar("T")

CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # always fullmatch: `$` lets a trailing newline in
SLACK_ID = re.compile(r"[A-Z0-9]{2,}")
LAUNCHER_PLACEHOLDERS = ("name", "peer_url", "client_url", "action")


def argv_fields(arg: str) -> list[tuple[str, str | None, str]]:
    """Each replacement field of one launcher argv element as str.format_map reads it: (name, conversion,
    format spec). The config check and LauncherConfig.has_actions both read argv through this, so
    `{{action}}` (a literal, not a field) can never count as the action. ValueError when malformed."""
    return [(name, conversion, spec or "") for _, name, spec, conversion in string.Formatter().parse(arg)
            if name is not None]


class ConfigError(Exception):
    """A configuration problem, phrased as one line naming the key."""


@dataclass(frozen=True)
class ApprovalRule:
    """How one kind of plan is approved."""

    approvals_needed: int = 1            # distinct approvers
    allow_self_approval: bool = False    # whether the proposer counts as one
    ttl_minutes: float = 30.0


# Kinds of plan and how many approvers each needs unless `[approval.<kind>]` says otherwise.
APPROVALS_NEEDED = {"replace": 1, "restore": 2, "defrag": 1}


@dataclass(frozen=True)
class ApprovalConfig:
    approvers: tuple[str, ...] = ()
    approver_groups: tuple[str, ...] = ()
    reaction: str = "white_check_mark"
    reject_reaction: str = "x"
    ttl_minutes: float = 30.0
    allow_self_approval: bool = False
    overrides: tuple[tuple[str, ApprovalRule], ...] = ()   # from [approval.<kind>]

    def rule(self, kind: str) -> ApprovalRule:
        """The kind's override, else the top-level keys with the kind's default number of approvers."""
        # A restore's proposer never counts as an approver unless [approval.restore] says so explicitly.
        return dict(self.overrides).get(kind) or ApprovalRule(APPROVALS_NEEDED.get(kind, 1),
                                                              self.allow_self_approval and kind != "restore",
                                                              self.ttl_minutes)


@dataclass(frozen=True)
class LauncherConfig:
    """How a replacement member gets started (runbook step 4)."""

    kind: str = "manual"                 # "manual" | "command"
    argv: tuple[str, ...] = ()
    timeout_seconds: float = 900.0       # manual: wait for a human; command: wait for the command

    @property
    def has_actions(self) -> bool:
        """An argv with an {action} field can also stop members, restore their data and report whether
        they run (restore plans need it)."""
        return any(name == "action" for arg in self.argv for name, _, _ in argv_fields(arg))


@dataclass(frozen=True)
class RestoreConfig:
    """`[clusters.restore]`: what a restore plan needs that etcd cannot tell."""

    data_dir: str = "/var/lib/etcd"               # each member's data directory; may contain {name}
    age_identity: str | None = field(default=None, repr=False)  # decrypts snapshots, for restores and drills only
    no_leader_seconds: float = 3.0                # a member reporting no leader this long is evidence of quorum
                                                  # loss; an election in a healthy cluster ends well within it


@dataclass(frozen=True)
class SnapshotPolicy:
    """Encryption, retention and schedule of a cluster's snapshots."""

    age_recipients: tuple[str, ...] = ()     # age public keys; empty: not encrypted
    keep_last: int | None = None             # keep the newest N
    keep_days: float | None = None           # keep those younger than D days (a snapshot kept by either rule stays)
    keep_plan_snapshots_days: float = 30.0   # a plan's pre-change snapshot is kept at least this long,
                                             # whatever the above say
    every_seconds: float | None = None       # take one on a schedule
    drill_every_seconds: float | None = None  # restore-drill the newest snapshot on a schedule
    store: StoreConfig | None = None         # [snapshots.store]: uploaded off-site while saved

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


@dataclass(frozen=True)
class AccessConfig:
    readers: RoleConfig = RoleConfig()       # status, members, plans, snapshots
    operators: RoleConfig = RoleConfig()     # replace, snapshot (a proposer may cancel their own plan)
    approvers: RoleConfig = RoleConfig(())   # approve, reject, resume, abandon, cancel (default: [approval])


@dataclass(frozen=True)
class WatchConfig:
    """`[clusters.watch]`: the background watch that posts conditions (bot/watch)."""

    enabled: bool = True
    interval_seconds: float = 15.0       # one status fan-out per interval
    grace_seconds: float = 45.0          # how long a condition lasts before it is posted (and gone before resolved)
    cert_warning_seconds: float = 14 * 86400.0  # a serving certificate that expires within this is a condition


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    endpoints: tuple[str, ...]
    channels: tuple[str, ...] = ()
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_seconds: float = 2.0         # per-member deadline of every read
    catch_up_seconds: float = 300.0      # bound on waiting for a new member to catch up / the cluster to settle
    launcher: LauncherConfig = LauncherConfig()
    snapshots: SnapshotPolicy = SnapshotPolicy()
    access: AccessConfig = AccessConfig()
    restore: RestoreConfig = RestoreConfig()
    defrag_disarm_below: float = 0.9     # /etcd defrag disarms NOSPACE only below this share of every quota
    watch: WatchConfig = WatchConfig()


REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


@dataclass(frozen=True)
class ReplicasConfig:
    """Several replicas on one shared database: only the holder of the executor lease runs plans."""
    lease_seconds: int = 10                 # a dead leader is replaced within lease_seconds * 4/3
    replica_id: str = ""                    # "" = <hostname>-<pid>
    resume_on_takeover: bool | None = None  # None: resume on PostgreSQL, report interrupted on SQLite


@dataclass(frozen=True)
class Config:
    clusters: tuple[ClusterConfig, ...]
    database: Path | str = Path("etcd-chatops.db")  # a SQLite file, or a postgresql:// URL (str)
    snapshot_dir: Path = Path("snapshots")
    approval: ApprovalConfig = ApprovalConfig()
    snapshots: SnapshotPolicy = SnapshotPolicy()
    database_timeout_seconds: float = 5.0    # how long one write waits for another writer's lock (x3 tries)
    audit_key: str | None = field(default=None, repr=False)  # HMAC key of the audit chain; None: plain sha256
    source: Path | None = None
    replicas: ReplicasConfig = ReplicasConfig()
    database_password: str | None = field(default=None, repr=False)  # PostgreSQL's, else libpq's PG* environment

    @property
    def database_shown(self) -> str:
        """The database as messages name it: a path, or the URL without its password."""
        return dsn.redact(self.database) if isinstance(self.database, str) else str(self.database)

    def database_secrets(self) -> list[str]:
        """Passwords of the database (never to appear in output)."""
        in_url = dsn.secrets_of(self.database) if isinstance(self.database, str) else []
        return in_url + ([self.database_password] if self.database_password else [])

    def manifest_keys(self) -> list[str]:
        """The keys the snapshot stores sign their manifests with (never to appear in output)."""
        return sorted({c.snapshots.store.manifest_key for c in self.clusters
                       if c.snapshots.store is not None and c.snapshots.store.manifest_key})

    def cluster(self, name: str) -> ClusterConfig | None:
        return next((c for c in self.clusters if c.name == name), None)

    def clusters_for_channel(self, channel: str) -> list[ClusterConfig]:
        return [c for c in self.clusters if channel in c.channels]


class _Table:
    """A TOML table being read: tracks the key path and which keys were used."""

    def __init__(self, data: Any, path: str, base: Path):
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'config'}: expected a table, got {_kind(data)}")
        self.data, self.path, self.base = data, path, base
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, typ: type | tuple[type, ...], default: T,
            check: Callable[[Any, str], Any] | None = None) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ in (int, float) and isinstance(value, bool)):
            raise ConfigError(f"{self.key(name)}: expected {_typename(typ)}, got {_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):  # TOML allows inf and nan
            raise ConfigError(f"{self.key(name)}: must be a finite number, not {value}")
        return cast(T, check(value, self.key(name)) if check else value)

    def strings(self, name: str, default: tuple[str, ...] = (),
                check: Callable[[str, str], str] | None = None) -> tuple[str, ...]:
        values = self.get(name, list, None)
        if values is None:
            return default
        out = []
        for i, value in enumerate(values):
            key = f"{self.key(name)}[{i}]"
            if not isinstance(value, str):
                raise ConfigError(f"{key}: expected a string, got {_kind(value)}")
            out.append(check(value, key) if check else value)
        return tuple(out)

    def path_value(self, name: str, default: T, must_exist: bool = False) -> Path | T:
        value = self.get(name, str, None)
        if value is None:
            return default
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else self.base / path
        if must_exist and not path.is_file():
            raise ConfigError(f"{self.key(name)}: {value}: no such file")
        return path

    def table(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.data.get(name, {}), self.key(name), self.base)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _typename(typ: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a table"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _kind(value: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _url(value: str, key: str) -> str:
    try:
        return parse_url(value).url
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _slack_id(value: str, key: str) -> str:
    if not SLACK_ID.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not a Slack ID (like C0INCIDENT, U0LEAD0001 or S0ONCALL01)")
    return value


def _positive(value: float, key: str) -> float:
    if not value > 0:
        raise ConfigError(f"{key}: must be greater than 0")
    return value


MAX_TTL_MINUTES = 7 * 24 * 60


def _ttl(value: float, key: str) -> float:
    """A plan is approved on facts of its proposal: a week is the longest they may wait (and
    1e308 minutes would overflow the expiry to infinity, a plan that never expires)."""
    _positive(value, key)
    if value > MAX_TTL_MINUTES:
        raise ConfigError(f"{key}: at most {MAX_TTL_MINUTES} (7 days)")
    return value


def _lease_seconds(value: int, key: str) -> int:
    """Renewed every third of it: under 3 s a database hiccup deposes the leader; over 60 s a dead one leads on."""
    if not 3 <= value <= 60:
        raise ConfigError(f"{key}: must be between 3 and 60 seconds")
    return value


def _replica_id(value: str, key: str) -> str:
    if not REPLICA_ID.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} must be 1-100 letters, digits, '.', '_', ':' or '-'")
    return value


def _replicas(t: _Table) -> ReplicasConfig:
    replicas = ReplicasConfig(lease_seconds=t.get("lease_seconds", int, 10, _lease_seconds),
                              replica_id=t.get("replica_id", str, "", _replica_id),
                              resume_on_takeover=t.get("resume_on_takeover", bool, None))
    t.done()
    return replicas


def _fraction(value: float, key: str) -> float:
    if not 0 < value <= 1:
        raise ConfigError(f"{key}: must be greater than 0 and at most 1")
    return value


def _at_least_one(value: int, key: str) -> int:
    if value < 1:
        raise ConfigError(f"{key}: must be 1 or more")
    return value


def _reaction(value: str, key: str) -> str:
    name = value.strip(":")
    if not re.fullmatch(r"[a-z0-9_+'-]+", name):
        raise ConfigError(f"{key}: {value!r} is not a Slack reaction name (like white_check_mark)")
    return name


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """"6h", "30m", "1d", "1h30m", "90s" -> seconds; ValueError otherwise."""
    matches = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not matches or "".join(n + u for n, u in matches) != text.strip():
        raise ValueError(f"{text!r} is not a duration like 6h, 30m, 1d or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in matches)


def _duration(value: str, key: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    if seconds < 60:
        raise ConfigError(f"{key}: {value!r} is too often; the shortest schedule is 1m")
    return seconds


def check_age_recipient(value: str, key: str) -> str:
    try:
        from pyrage import x25519
        x25519.Recipient.from_str(value)
    except Exception:
        raise ConfigError(f"{key}: {value[:12]!r}... is not an age X25519 public key (age1...)") from None
    return value


def _snapshot_policy(t: _Table, default: SnapshotPolicy) -> SnapshotPolicy:
    recipients = t.strings("age_recipients", default.age_recipients, check=check_age_recipient)
    keep_last = t.get("keep_last", int, default.keep_last)
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"{t.key('keep_last')}: must be at least 1")
    keep_days = t.get("keep_days", float, default.keep_days, _positive)
    keep_plan_days = t.get("keep_plan_snapshots_days", float, default.keep_plan_snapshots_days, _positive)
    every = t.get("every", str, None, _duration)
    drill_every = t.get("drill_every", str, None, _duration)
    store = _store(t.table("store")) if "store" in t.data else default.store
    t.done()
    return SnapshotPolicy(age_recipients=recipients, keep_last=keep_last, keep_days=keep_days,
                          keep_plan_snapshots_days=keep_plan_days,
                          every_seconds=every if every is not None else default.every_seconds,
                          drill_every_seconds=drill_every if drill_every is not None else default.drill_every_seconds,
                          store=store)


def _checked(check: Callable[[str], str]) -> Callable[[str, str], str]:
    def run(value: str, key: str) -> str:
        try:
            return check(value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    return run


MANIFEST_KEY_KEYS = ("manifest_key_env", "manifest_key_file")


def _store(t: _Table) -> StoreConfig:
    """`[snapshots.store]` (a cluster's replaces the top-level one whole). No credential keys:
    they come from the environment or workload identity, so an unknown key is an error. The one
    secret it names is the manifest key's place (an environment variable or a file)."""
    if "manifest_key" in t.data:
        raise ConfigError(f"{t.key('manifest_key')}: never inline; give manifest_key_env or manifest_key_file")
    url = t.get("url", str, None, _checked(check_store_url))
    if url is None:
        raise ConfigError(f"{t.key('url')}: missing (like s3://etcd-backups/prod or file:///mnt/backups)")
    endpoint = t.get("endpoint", str, None, _checked(check_endpoint))
    if endpoint is not None and not url.startswith("s3://"):
        raise ConfigError(f"{t.key('endpoint')}: only an s3:// store takes an endpoint")
    region = t.get("region", str, None)
    keep_local = t.get("keep_local", int, None)
    if keep_local is not None and keep_local < 0:
        raise ConfigError(f"{t.key('keep_local')}: must be 0 or more")
    secrets = sorted(k for k in t.data if re.search(r"(?i)key|secret|token|password|credential", k)
                     and k not in MANIFEST_KEY_KEYS)
    if secrets:
        raise ConfigError(f"{t.key(secrets[0])}: credentials never go in the file; the bot reads them from the "
                          "environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_*) or workload identity")
    manifest_key = _hmac_key(t, "manifest_key", "the manifest key")
    t.done()
    return StoreConfig(url=url, endpoint=endpoint, region=region, keep_local=keep_local, manifest_key=manifest_key)


def _manifest_key_or(policy: SnapshotPolicy, audit_key: str | None) -> SnapshotPolicy:
    """A store without its own manifest key signs and checks manifests with the audit key."""
    store = policy.store
    if store is None or store.manifest_key is not None or audit_key is None:
        return policy
    return replace(policy, store=replace(store, manifest_key=audit_key))


def _launcher(t: _Table) -> LauncherConfig:
    kind = t.get("kind", str, "manual")
    if kind not in ("manual", "command"):
        raise ConfigError(f"{t.key('kind')}: {kind!r} is not a launcher kind (manual or command)")
    argv = t.strings("argv")
    default_timeout = 900.0 if kind == "manual" else 120.0
    timeout = t.get("timeout_seconds", float, default_timeout, _positive)
    if kind == "command" and not argv:
        raise ConfigError(f"{t.key('argv')}: a command launcher needs argv, the command to run")
    if kind == "manual" and argv:
        raise ConfigError(f"{t.key('argv')}: only a command launcher takes argv")
    for i, arg in enumerate(argv):
        try:
            fields = argv_fields(arg)
        except ValueError as e:
            raise ConfigError(f"{t.key('argv')}[{i}]: {e} (write a literal brace as {{{{ or }}}})") from None
        for name, conversion, spec in fields:
            if name not in LAUNCHER_PLACEHOLDERS:
                raise ConfigError(f"{t.key('argv')}[{i}]: unknown placeholder {{{name}}} "
                                  f"(use {{name}}, {{peer_url}}, {{client_url}} or {{action}})")
            if conversion or spec:
                raise ConfigError(f"{t.key('argv')}[{i}]: write the placeholder as plain {{{name}}}, without "
                                  "a conversion or format")
    t.done()
    return LauncherConfig(kind=kind, argv=argv, timeout_seconds=timeout)


def _restore(t: _Table) -> RestoreConfig:
    data_dir = t.get("data_dir", str, RestoreConfig.data_dir)
    raw = _secret(t, "age_identity")  # age-keygen's file: comment lines, then the key
    identity = next((line.strip() for line in (raw or "").splitlines() if line.startswith("AGE-SECRET-KEY-")), None)
    if raw is not None and identity is None:
        which = "age_identity_env" if "age_identity_env" in t.data else "age_identity_file"
        raise ConfigError(f"{t.key(which)}: not an age identity (AGE-SECRET-KEY-1...)")
    no_leader = t.get("no_leader_seconds", float, RestoreConfig.no_leader_seconds, _positive)
    t.done()
    return RestoreConfig(data_dir=data_dir, age_identity=identity, no_leader_seconds=no_leader)


def _role(t: _Table, users_key: str, groups_key: str, default: RoleConfig) -> RoleConfig:
    present = users_key in t.data or groups_key in t.data
    users = t.strings(users_key, check=_slack_id) if users_key in t.data else None
    groups = t.strings(groups_key, check=_slack_id)
    if not present:
        return default
    return RoleConfig(users=users or (), groups=groups)


def _access(t: _Table, approval: ApprovalConfig) -> AccessConfig:
    access = AccessConfig(
        readers=_role(t, "readers", "reader_groups", RoleConfig()),
        operators=_role(t, "operators", "operator_groups", RoleConfig()),
        approvers=_role(t, "approvers", "approver_groups", RoleConfig(approval.approvers, approval.approver_groups)),
    )
    t.done()
    return access


def _secret(t: _Table, name: str) -> str | None:
    """A secret from `<name>_env` (an environment variable) or `<name>_file`, never inline in the file."""
    env = t.get(f"{name}_env", str, None)
    file = t.path_value(f"{name}_file", None, must_exist=True)
    if env and file:
        raise ConfigError(f"{t.key(name + '_file')}: give {name}_env or {name}_file, not both")
    if env:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"{t.key(name + '_env')}: environment variable {env} is not set")
        return value
    if file:
        return file.read_text().strip()
    return None


HMAC_KEY_MIN = 32  # characters; HMAC-SHA256's own strength


def _hmac_key(t: _Table, name: str, what: str) -> str | None:
    """An HMAC key (`<name>_env` / `<name>_file`) of at least HMAC_KEY_MIN characters."""
    key = _secret(t, name)
    if key is not None and len(key) < HMAC_KEY_MIN:
        which = f"{name}_env" if f"{name}_env" in t.data else f"{name}_file"
        raise ConfigError(f"{t.key(which)}: {what} has {len(key)} characters; it needs at least {HMAC_KEY_MIN} "
                          "(e.g. openssl rand -hex 32)")
    return key


def _short_duration(value: str, key: str) -> float:
    """A duration of any length ("15s", "0.5s", "1m"): the watch runs far more often than a schedule."""
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _watch(t: _Table) -> WatchConfig:
    enabled = t.get("enabled", bool, True)
    interval = t.get("interval", str, None, _short_duration)
    if interval is not None and interval < 1:
        raise ConfigError(f"{t.key('interval')}: {t.data['interval']!r} is too often; the shortest interval is 1s")
    grace = t.get("grace", str, None, _short_duration)
    cert_warning = t.get("cert_warning", str, None, _short_duration)
    t.done()
    return WatchConfig(enabled=enabled, interval_seconds=interval if interval is not None else 15.0,
                       grace_seconds=grace if grace is not None else 45.0,
                       cert_warning_seconds=cert_warning if cert_warning is not None else 14 * 86400.0)


def _cluster(t: _Table, snapshot_defaults: SnapshotPolicy, approval: ApprovalConfig) -> ClusterConfig:
    name = t.get("name", str, None)
    if name is None:
        raise ConfigError(f"{t.key('name')}: missing")
    if not CLUSTER_NAME.fullmatch(name):
        raise ConfigError(f"{t.key('name')}: {name!r} is not a cluster name (letters, digits, '-', '_', '.')")
    endpoints = t.strings("endpoints", check=_url)
    if not endpoints:
        raise ConfigError(f"{t.key('endpoints')}: at least one endpoint is needed")
    channels = t.strings("channels", check=_slack_id)
    cacert = t.path_value("cacert", None, must_exist=True)
    cert = t.path_value("cert", None, must_exist=True)
    key = t.path_value("key", None, must_exist=True)
    if (cert is None) != (key is None):
        raise ConfigError(f"{t.key('cert' if cert is None else 'key')}: cert and key go together")
    username = t.get("username", str, None)
    password = _secret(t, "password")
    if (username is None) != (password is None):
        raise ConfigError(f"{t.key('username' if username is None else 'password_env')}: "
                          f"username needs password_env or password_file, and back")
    timeout = t.get("timeout_seconds", float, 2.0, _positive)
    catch_up = t.get("catch_up_seconds", float, 300.0, _positive)
    launcher = _launcher(t.table("launcher"))
    snapshots = _snapshot_policy(t.table("snapshots"), snapshot_defaults)
    access = _access(t.table("access"), approval)
    restore = _restore(t.table("restore"))
    disarm_below = t.get("defrag_disarm_below", float, 0.9, _fraction)
    watch = _watch(t.table("watch"))
    t.done()
    return ClusterConfig(name=name, endpoints=endpoints, channels=channels, cacert=cacert, cert=cert, key=key,
                         username=username, password=password, timeout_seconds=timeout, catch_up_seconds=catch_up,
                         launcher=launcher, snapshots=snapshots, access=access, restore=restore,
                         defrag_disarm_below=disarm_below, watch=watch)


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
                raise ConfigError(f"clusters[{i}].endpoints[{j}]: {endpoint} reaches {address}, an endpoint of "
                                  f"cluster {first[1]!r} too ({first[2]}); clusters {first[1]!r} and {c.name!r} "
                                  f"would be one etcd under two names")


def _database(top: _Table, base: Path) -> Path | str:
    """A path (SQLite, relative to the config file) or a postgresql:// URL, checked without showing its password."""
    raw = top.get("database", str, None)
    if raw is not None and "://" in raw:
        try:
            return dsn.check_url(raw)
        except ValueError as e:
            raise ConfigError(f"database: {e}") from None
    database = top.path_value("database", base / "etcd-chatops.db")
    if database.is_dir():
        raise ConfigError(f"database: {raw or database}: is a directory, not a database file")
    return database


def parse_config(data: dict, base: Path, source: Path | None = None) -> Config:
    """Build a Config from parsed TOML; relative paths are relative to `base`."""
    top = _Table(data, "", base)
    database = _database(top, base)
    database_password = _secret(top, "database_password")
    if database_password is not None and not isinstance(database, str):
        which = "database_password_env" if "database_password_env" in top.data else "database_password_file"
        raise ConfigError(f"{which}: only a postgresql:// database takes a password (database is a SQLite file)")
    snapshot_dir = top.path_value("snapshot_dir", base / "snapshots")
    if snapshot_dir.exists() and not snapshot_dir.is_dir():
        raise ConfigError(f"snapshot_dir: {top.data.get('snapshot_dir', snapshot_dir)}: is not a directory")
    db_timeout = top.get("database_timeout_seconds", float, 5.0, _positive)
    audit_key = _hmac_key(top, "audit_key", "the audit key")
    a = top.table("approval")
    approval = ApprovalConfig(
        approvers=a.strings("approvers", check=_slack_id),
        approver_groups=a.strings("approver_groups", check=_slack_id),
        reaction=a.get("reaction", str, "white_check_mark", _reaction),
        reject_reaction=a.get("reject_reaction", str, "x", _reaction),
        ttl_minutes=a.get("ttl_minutes", float, 30.0, _ttl),
        allow_self_approval=a.get("allow_self_approval", bool, False),
    )
    if approval.reaction == approval.reject_reaction:
        raise ConfigError(f"{a.key('reject_reaction')}: must differ from approval.reaction")
    overrides = []
    for kind in APPROVALS_NEEDED:
        if kind in a.data:
            k = a.table(kind)
            overrides.append((kind, ApprovalRule(
                approvals_needed=k.get("approvals_needed", int, APPROVALS_NEEDED[kind], _at_least_one),
                allow_self_approval=k.get("allow_self_approval", bool, approval.allow_self_approval),
                ttl_minutes=k.get("ttl_minutes", float, approval.ttl_minutes, _ttl))))
            k.done()
    # `[approval] restore_approvals` (the spelling) = `[approval.restore] approvals_needed` (canonical)
    restore_approvals = a.get("restore_approvals", int, None, _at_least_one)
    if restore_approvals is not None:
        rule = dict(overrides).get("restore")
        if rule is not None and "approvals_needed" in a.data["restore"]:
            raise ConfigError(f"{a.key('restore_approvals')}: give it or approval.restore.approvals_needed, not both")
        overrides = [o for o in overrides if o[0] != "restore"]
        base_rule = rule or approval.rule("restore")
        overrides.append(("restore", replace(base_rule, approvals_needed=restore_approvals)))
    approval = replace(approval, overrides=tuple(overrides))
    a.done()
    snapshots = _snapshot_policy(top.table("snapshots"), SnapshotPolicy())
    raw_clusters: list[Any] = top.get("clusters", list, [])
    if not raw_clusters:
        raise ConfigError("clusters: at least one [[clusters]] table is needed")
    clusters = tuple(_cluster(_Table(c, f"clusters[{i}]", base), snapshots, approval)
                     for i, c in enumerate(raw_clusters))
    clusters = tuple(replace(c, snapshots=_manifest_key_or(c.snapshots, audit_key)) for c in clusters)
    seen: set[str] = set()
    for i, c in enumerate(clusters):
        if c.name in seen:
            raise ConfigError(f"clusters[{i}].name: {c.name!r} is used by another cluster")
        seen.add(c.name)
    _check_disjoint(clusters)
    replicas = _replicas(top.table("replicas"))
    top.done()
    return Config(clusters=clusters, database=database, snapshot_dir=snapshot_dir, approval=approval,
                  snapshots=snapshots, database_timeout_seconds=db_timeout, audit_key=audit_key, source=source,
                  database_password=database_password, replicas=replicas)


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
