"""`etcd-chatops`: run the bot, or operate a cluster without Slack (break glass).

Exit status: 0 success (and, for `status`, every member healthy); 1 the
cluster is degraded or unreachable, or the operation failed; 2 bad usage,
bad configuration or bad environment, with one line saying which.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # the CLI imports gRPC only for the commands that talk to etcd
    from collections.abc import Awaitable, Callable

    from bot.config import Config
    from bot.domain.snapshot import SnapshotRecord
    from bot.etcd.client import EtcdClient
    from bot.store.base import Store

T = TypeVar("T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _arun(coro):
    """asyncio.run, imported only by the commands that need it (snapshot status stays light)."""
    import asyncio
    return asyncio.run(coro)


OBSTORE_SETTLE = 0.1  # seconds


async def _settled(coro):
    """Run a command that used the object store, then give obstore's runtime threads a moment: one that
    drops its Python references while the interpreter exits aborts the process (SIGABRT, obstore 0.12:
    about one run in three after a call on a local store, 0 in 50 with this pause)."""
    import asyncio
    try:
        return await coro
    finally:
        await asyncio.sleep(OBSTORE_SETTLE)


class UsageFailure(Exception):
    """Bad input on the command line: reported in one line with the command's usage, exit status 2."""


class ConfigFailure(UsageFailure):
    """A mistake in the configuration file, not on the command line: one line naming the key, exit status 2,
    without the usage (it would not help)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits 2; keep that, in our words
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> tuple[_Parser, dict[str, _Parser]]:
    """The parser and its subcommand parsers (to print the right usage)."""
    p = _Parser(prog="etcd-chatops",
                description="Operate the etcd clusters behind Kubernetes from Slack, or from here.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="serve Slack (Socket Mode, or HTTP with --http)")
    run.add_argument("--http", action="store_true", help="serve POST /slack/events over HTTP instead of Socket Mode")
    run.add_argument("--host", default="0.0.0.0", help="HTTP listen address (default 0.0.0.0)")
    run.add_argument("--port", type=int, default=3000,
                     help="HTTP port (default 3000): Slack events with --http; /healthz, /readyz, /metrics always")
    run.add_argument("--config", help="TOML config file (default: $ETCD_CHATOPS_CONFIG)")
    run.add_argument("--log-level", default=os.environ.get("ETCD_CHATOPS_LOG_LEVEL", "info"),
                     choices=["debug", "info", "warning", "error"])

    st = sub.add_parser("status", help="every member's health and the quorum margin, without Slack")
    _add_cluster_args(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of the table")

    mem = sub.add_parser("members", help="the member list, as etcdctl member list")
    _add_cluster_args(mem)

    snap = sub.add_parser("snapshot", help="save a verified snapshot, print a snapshot file's status, list the "
                                           "snapshots of both places, fetch one from the object store")
    snap_sub = snap.add_subparsers(dest="snap_cmd", metavar="ACTION", parser_class=_Parser)
    snap_sub.required = True
    save = snap_sub.add_parser("save", help="stream a snapshot from a healthy member (a follower if possible) to --dir")
    _add_cluster_args(save)
    save.add_argument("--dir", required=True, help="directory; the file goes to DIR/<name>/<name>-<UTC time>-rev<N>.db")
    save.add_argument("--name", default=None,
                      help="cluster name used in the file name (default: the --cluster, or 'etcd')")
    save.add_argument("--age-recipient", action="append", default=[], metavar="AGE1...",
                      help="encrypt with age to this public key (repeatable)")
    save.add_argument("--json", action="store_true", help="print JSON instead of the table")
    stat = snap_sub.add_parser("status", help="hash, revision, total keys and size, as etcdutl snapshot status")
    stat.add_argument("file", help="a snapshot (etcdctl snapshot save, or this tool's) or a member/snap/db copy")
    stat.add_argument("--json", action="store_true", help="print JSON instead of the table")
    stat.add_argument("--no-verify", action="store_true",
                      help="skip the sha256 trailer check (etcdutl's behaviour; faster, detects less)")
    lst = snap_sub.add_parser("list", help="the snapshots of both places: the bot's catalog and the object store")
    lst.add_argument("--cluster", help="only this cluster (default: every configured cluster)")
    lst.add_argument("--config", help="TOML config file (default: $ETCD_CHATOPS_CONFIG)")
    lst.add_argument("--json", action="store_true", help="print JSON instead of the table")
    fetch = snap_sub.add_parser("fetch", help="download a snapshot from the object store and verify it")
    fetch.add_argument("name", help="the snapshot's file name, as snapshot list shows it")
    fetch.add_argument("--dir", required=True, help="directory the file goes to (created if missing)")
    fetch.add_argument("--cluster", help="the cluster (default: the only configured one)")
    fetch.add_argument("--config", help="TOML config file (default: $ETCD_CHATOPS_CONFIG)")
    _NESTED_PARSERS.update({f"snapshot {k}": v for k, v in snap_sub.choices.items()})

    audit = sub.add_parser("audit", help="check or export the tamper-evident audit log")
    audit_sub = audit.add_subparsers(dest="audit_cmd", metavar="ACTION", parser_class=_Parser)
    audit_sub.required = True
    verify = audit_sub.add_parser("verify", help="check the hash chain: exit 0 intact, 1 changed or deleted rows")
    verify.add_argument("--config", help="TOML config file (default: $ETCD_CHATOPS_CONFIG); its database is checked")
    export = audit_sub.add_parser("export", help="write the audit log as JSON lines")
    export.add_argument("--config", help="TOML config file (default: $ETCD_CHATOPS_CONFIG)")
    export.add_argument("--since", help="ISO date/time (2026-11-25, 2026-11-25T08:00:00Z) or an age (24h, 7d)")
    _NESTED_PARSERS.update({f"audit {k}": v for k, v in audit_sub.choices.items()})

    demo = sub.add_parser("demo", help="play a whole incident on a local cluster and the Slack stand-in")
    demo.add_argument("--keep", action="store_true", help="leave the cluster, the stand-in and the bot running")
    demo.add_argument("--stop", action="store_true", help="stop a demo left running with --keep")
    demo.add_argument("--scenario", choices=("replace", "restore", "nospace", "alerts", "kubeadm"), default="replace",
                      help="replace: a member dies and is replaced (default); restore: quorum is lost and the "
                           "cluster is restored from a snapshot under two approvals; nospace: a full database "
                           "is defragmented; alerts: the watch posts a member down and resolves it (with --keep "
                           "it keeps watching); kubeadm: the restore done on kubeadm hosts over SSH (needs root, "
                           "iproute2 and OpenSSH's sshd)")
    demo.add_argument("--dir", help="where the demo's files go (default: a temporary directory; with --keep, "
                                    "$XDG_RUNTIME_DIR/etcd-chatops-demo-UID)")
    say = sub.add_parser("say", help="type a command in a kept demo's channel, or react to a plan, and print the reply")
    say.add_argument("text", help='the command, e.g. "/etcd status"; or a reaction to the newest plan (or --plan), '
                                  "e.g. :white_check_mark: to approve it")
    say.add_argument("--plan", help="the plan a reaction is for (default: the newest plan in the channel)")
    say.add_argument("--as", dest="person", default="alice", choices=["alice", "bob", "carol", "mallory"],
                     help="who types it: alice (on-call), bob (lead, approver), carol (lead, via the "
                          "leads group), mallory (not on call)")
    say.add_argument("--dir", help="the kept demo's directory (default as for demo --keep)")

    _add_plan_parsers(sub)

    chk = sub.add_parser("check-config", help="validate a config file and print what it defines")
    chk.add_argument("config", nargs="?", help="TOML config file (default: $ETCD_CHATOPS_CONFIG)")
    chk.add_argument("--example", action="store_true",
                     help="print an annotated example of every key instead (the README's configuration reference)")
    return p, sub.choices


_NESTED_PARSERS: dict[str, argparse.ArgumentParser] = {}


def _add_plan_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    """`plan` and its actions (bot.cli.plan runs them)."""
    plan = sub.add_parser("plan", help="break glass: propose, approve and run plans from a shell when Slack is down")
    actions = plan.add_subparsers(dest="plan_cmd", metavar="ACTION", parser_class=_Parser)
    actions.required = True

    def acting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--as", dest="person", required=True, metavar="NAME",
                       help="who acts (recorded and posted as NAME, from a shell); each name counts as one approver")
        p.add_argument("--reason", required=True, help="why this is done from a shell (audited and posted)")
        p.add_argument("--config", help="the bot's TOML config file (default: $ETCD_CHATOPS_CONFIG)")

    propose = actions.add_parser("propose", help="propose a plan, as /etcd replace, restore or defrag would")
    acting(propose)
    propose.add_argument("words", nargs=argparse.REMAINDER, metavar="KIND ARGS",
                         help="what /etcd takes after its name: replace FAILED NEW-NAME PEER-URL [--client-url URL], "
                              "restore [SNAPSHOT] [--force], defrag [--rule EXPR]; --cluster NAME with several "
                              "clusters (after --as, --reason and --config)")
    show = actions.add_parser("show", help="a plan with its approvals and steps; without PLAN, the recent plans")
    show.add_argument("plan", nargs="?", help="the plan's ID")
    show.add_argument("--cluster", help="only this cluster's plans")
    show.add_argument("--config", help="the bot's TOML config file (default: $ETCD_CHATOPS_CONFIG)")
    cont = actions.add_parser("continue", help="confirm the stage a running restore waits on for a person "
                                              "(apiserver-stop, stop, restore, start), as /etcd continue does")
    cont.add_argument("plan", help="the plan's ID")
    cont.add_argument("stage", nargs="?", help="the stage it waits on (default: the one it waits on now)")
    acting(cont)
    for name, what in (("approve", "approve a proposed plan as NAME (a restore needs two names)"),
                       ("run", "run an approved plan here until it ends (or follow the replica that runs it)"),
                       ("resume", "continue an interrupted or failed plan from its step, here"),
                       ("cancel", "cancel a proposed plan, or stop one waiting on a person (a manual stage)"),
                       ("abandon", "close an interrupted or failed plan without undoing anything")):
        p = actions.add_parser(name, help=what)
        p.add_argument("plan", help="the plan's ID")
        acting(p)
    _NESTED_PARSERS.update({f"plan {k}": v for k, v in actions.choices.items()})


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoints", help="comma-separated client URLs, e.g. https://10.0.0.2:2379,https://10.0.0.3:2379")
    p.add_argument("--cacert", help="CA bundle that signed the members' certificates")
    p.add_argument("--cert", help="client certificate (mutual TLS)")
    p.add_argument("--key", help="client certificate's private key")
    p.add_argument("--user", help="etcd user; the password is read from $ETCDCTL_PASSWORD")
    p.add_argument("--timeout", type=float, default=None, help="per-member deadline in seconds (default 2)")
    p.add_argument("--cluster", help="use this cluster from the config file instead of --endpoints")
    p.add_argument("--config", help="TOML config file for --cluster (default: $ETCD_CHATOPS_CONFIG)")


def _config_path(given: str | None) -> str:
    path = given or os.environ.get("ETCD_CHATOPS_CONFIG")
    if not path:
        raise UsageFailure("no config file: pass --config FILE or set ETCD_CHATOPS_CONFIG")
    return path


def _load_config(given: str | None):
    from bot.config import ConfigError, load_config
    try:
        return load_config(_config_path(given))
    except ConfigError as e:
        raise ConfigFailure(f"config: {e}") from None


def _check_tls_files(files: dict[str, Path]) -> None:
    """Load the PEM files as TLS would: a bad one is our one line, not gRPC core's log lines."""
    import ssl
    try:
        if "cacert" in files:
            ssl.create_default_context(cafile=str(files["cacert"]))
    except ssl.SSLError:
        raise UsageFailure(f"--cacert: {files['cacert']}: not a PEM certificate") from None
    try:
        if "cert" in files:
            # a password callback, so an encrypted key fails here instead of prompting on the terminal
            ssl.create_default_context().load_cert_chain(str(files["cert"]), str(files["key"]), password=lambda: b"")
    except ssl.SSLError:
        raise UsageFailure(f"--cert/--key: {files['cert']}, {files['key']}: "
                           f"not a PEM certificate and its key") from None


def _client_from_args(args: argparse.Namespace):
    """An EtcdClient and the cluster's display name, from flags or the config."""
    from bot.domain.cluster import TLSFiles
    from bot.domain.urls import parse_url
    from bot.etcd.client import EtcdClient, client_for

    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageFailure("--timeout must be greater than 0 (a finite number of seconds)")
    if args.cluster:
        if args.endpoints:
            raise UsageFailure("give --endpoints or --cluster, not both")
        config = _load_config(args.config)
        cluster = config.cluster(args.cluster)
        if cluster is None:
            raise UsageFailure(f"--cluster: no cluster named {args.cluster!r} in {config.source} "
                               f"(known: {', '.join(c.name for c in config.clusters)})")
        client = client_for(cluster)
        if args.timeout:
            client.timeout = args.timeout
        return client, cluster.name
    if not args.endpoints:
        raise UsageFailure("--endpoints URL[,URL...] (or --cluster NAME) is required")
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if not endpoints:
        raise UsageFailure(f"--endpoints: no URL given in {args.endpoints!r} (URL[,URL...])")
    for e in endpoints:
        try:
            parse_url(e)
        except ValueError as err:
            raise UsageFailure(f"--endpoints: {err}") from None
    files = {}
    for flag in ("cacert", "cert", "key"):
        value = getattr(args, flag)
        if value is not None:
            if not Path(value).is_file():
                raise UsageFailure(f"--{flag}: {value}: no such file")
            files[flag] = Path(value)
    if ("cert" in files) != ("key" in files):
        raise UsageFailure("--cert and --key go together")
    _check_tls_files(files)
    password = None
    if args.user:
        password = os.environ.get("ETCDCTL_PASSWORD")
        if not password:
            raise UsageFailure("--user needs the password in $ETCDCTL_PASSWORD")
    client = EtcdClient(endpoints, tls=TLSFiles(**files), username=args.user, password=password,
                        timeout=args.timeout or 2.0)
    return client, endpoints[0] + (f" (+{len(endpoints) - 1})" if len(endpoints) > 1 else "")


async def _from_bot_store(config: Config, read: Callable[[Store], Awaitable[T]]) -> T | None:
    """`read` from the bot's own database, when there is one: None when it has none yet; the
    StoreError (or sqlite3.Error) when it cannot be read. The CLI only reads it, never migrates it."""
    from bot.store.backends import store_for

    if isinstance(config.database, Path) and not config.database.is_file():
        return None
    store = store_for(config)
    try:
        await store.open()
        return await read(store)
    finally:
        await store.close()


async def _learn_recorded(client: EtcdClient, args: argparse.Namespace) -> None:
    """--cluster: fall back to the client URLs of the membership the bot last recorded
    (after replacements the configured endpoints go stale)."""
    import sqlite3

    from bot.store.base import StoreError

    try:
        last = await _from_bot_store(_load_config(args.config), lambda s: s.last_membership(args.cluster))
    except (StoreError, sqlite3.Error):
        return  # the configured endpoints alone, as without a bot
    if last is not None:
        client.learn(last.members)


async def _status(args: argparse.Namespace) -> int:
    from bot.domain.errors import EtcdError
    from bot.etcd.health import check_cluster
    from bot.etcd.member_metrics import cluster_metrics
    from bot.output import text as render
    from bot.output.model import status_view

    client, name = _client_from_args(args)
    async with client:
        if args.cluster:
            await _learn_recorded(client, args)
        try:
            health = await check_cluster(client, name)
        except EtcdError as e:
            if getattr(args, "json", False):
                print(json.dumps({"cluster": name, "error": str(e)}))
            else:
                print(render.unreachable_text(name, str(e)), file=sys.stderr)
            return EXIT_FAILED
        metrics = await cluster_metrics(client, health, for_quota=True) if args.cmd == "status" else None
    view = status_view(health, metrics)
    if args.cmd == "members":
        print(render.members_text(view))
        if view.learned:  # stdout stays as etcdctl prints it
            print(f"note: {view.learned}", file=sys.stderr)
        return EXIT_OK
    if args.json:
        print(json.dumps(render.status_json(view), indent=2))
    else:
        print(render.status_text(view))
    return EXIT_OK if view.all_healthy else EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    from bot import logs
    from bot.memory import keep_big_blocks_mapped
    from bot.server import serve
    from bot.settings import SettingsError, SlackSettings
    from bot.store.base import StoreError

    keep_big_blocks_mapped()  # the bot's RSS comes back down after each big snapshot (bot/memory.py)
    config = _load_config(args.config)
    try:
        slack = SlackSettings.from_env()
    except SettingsError as e:
        raise UsageFailure(str(e)) from None
    logs.register_secret(*slack.secrets(), *config.secrets())
    logs.setup(args.log_level)
    if not 0 < args.port < 65536:
        raise UsageFailure(f"--port: {args.port} is not a TCP port")
    if args.http and not slack.signing_secret:
        raise UsageFailure("--http needs SLACK_SIGNING_SECRET to verify Slack's requests")
    if not args.http and not slack.app_token:
        raise UsageFailure("Socket Mode needs SLACK_APP_TOKEN (xapp-...); or pass --http to serve HTTP")
    try:
        _arun(serve(config, slack, args.host, args.port, socket_mode=not args.http))
    except StoreError as e:  # at start; once serving, commands answer "the state store is unavailable"
        print(f"etcd-chatops run: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _snapshot_status(args: argparse.Namespace) -> int:
    from bot.domain.snapshot import SnapshotError
    from bot.etcd.bbolt import snapshot_status
    from bot.output.tables import status_table

    path = Path(args.file)
    if path.is_dir():
        raise UsageFailure(f"{args.file}: is a directory, not a snapshot file")
    if not path.is_file():
        raise UsageFailure(f"{args.file}: no such file")
    try:
        status = snapshot_status(path, verify_trailer=not args.no_verify)
    except SnapshotError as e:
        print(f"etcd-chatops snapshot status: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(status.as_json()) if args.json else status_table(status))
    return EXIT_OK


async def _snapshot_save(args: argparse.Namespace) -> int:
    from bot.config import CLUSTER_NAME, ConfigError, check_age_recipient
    from bot.domain.errors import EtcdError
    from bot.domain.snapshot import SnapshotFailed
    from bot.etcd.health import check_cluster
    from bot.etcd.snapshot_stream import save_snapshot
    from bot.output import text as render
    from bot.output.model import snapshot_view

    for r in args.age_recipient:
        try:
            check_age_recipient(r, "--age-recipient")
        except ConfigError as e:
            raise UsageFailure(str(e)) from None
    if args.name is not None and not CLUSTER_NAME.fullmatch(args.name):
        raise UsageFailure(f"--name: {args.name!r} is not a plain file-name prefix "
                           "(letters, digits, '-', '_', '.'; starting with a letter or digit)")
    client, display = _client_from_args(args)
    name = args.name or args.cluster or "etcd"
    async with client:
        try:
            health = await check_cluster(client, display)
        except EtcdError as e:
            print(f"etcd-chatops snapshot save: cannot read the cluster: {e}", file=sys.stderr)
            return EXIT_FAILED
        source = health.snapshot_source()
        if source is None or source.status is None:
            print("etcd-chatops snapshot save: no healthy member to take a snapshot from", file=sys.stderr)
            return EXIT_FAILED
        try:
            saved = await save_snapshot(client, source.status.endpoint, source.member.name, Path(args.dir), name,
                                        tuple(args.age_recipient), follows_leader=health.linearizable_through(source))
        except SnapshotFailed as e:
            print(f"etcd-chatops snapshot save: {e}", file=sys.stderr)
            return EXIT_FAILED
    view = snapshot_view(saved)
    print(json.dumps(render.saved_json(view)) if args.json else render.saved_text(view))
    return EXIT_OK


async def _catalog_rows(config: Config, cluster: str) -> tuple[list[SnapshotRecord], str | None]:
    """The bot's catalog rows of `cluster` (pruned ones too: their remote copy may remain), or why there are none."""
    import sqlite3

    from bot.store.base import StoreError
    try:
        rows = await _from_bot_store(config, lambda s: s.snapshots(cluster, limit=100000, include_pruned=True))
    except (StoreError, sqlite3.Error) as e:
        return [], f"the bot's catalog could not be read ({e}): the store's objects only"
    return rows or [], None


async def _snapshot_list(args: argparse.Namespace) -> int:
    """Exit 1 when a store could not be listed (the answer holds the local part only)."""
    from bot.backup.catalog import catalog
    from bot.output import text as render

    config = _load_config(args.config)
    clusters = config.clusters
    if args.cluster:
        found = config.cluster(args.cluster)
        if found is None:
            raise UsageFailure(f"--cluster: no cluster named {args.cluster!r} in {config.source} "
                               f"(known: {', '.join(c.name for c in config.clusters)})")
        clusters = [found]
    views, notes = [], []
    for c in clusters:
        rows, note = await _catalog_rows(config, c.name)
        notes += [note] if note else []
        views.append(await catalog(c.snapshots.store, c.name, rows, limit=100000))
    if args.json:
        print(json.dumps([render.catalog_json(v) for v in views], indent=2))
    else:
        print("\n\n".join(render.catalog_text(v) for v in views))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return EXIT_FAILED if any(v.store_error for v in views) else EXIT_OK


def _fetched_problem(path: Path, manifest) -> str | None:
    """A plaintext snapshot's status against its manifest (an encrypted one is checked by size and sha256 only)."""
    from bot.domain.snapshot import SnapshotError
    from bot.etcd.bbolt import snapshot_status
    if manifest.encrypted:
        return None
    try:
        st = snapshot_status(path, True)
    except SnapshotError as e:
        return f"not a valid snapshot: {e}"
    found = (st.hash_hex, st.revision, st.total_keys)
    wanted = (manifest.hash, manifest.revision, manifest.total_keys)
    if found != wanted:
        return (f"its status reads hash {found[0]}, revision {found[1]}, {found[2]} keys; the manifest says hash "
                f"{wanted[0]}, revision {wanted[1]}, {wanted[2]} keys")
    return None


async def _snapshot_fetch(args: argparse.Namespace) -> int:
    """Download NAME into --dir, then check size and sha256 against the manifest (and the bot's catalog, when it
    knows the file) and a plaintext file's status; anything amiss deletes the download and exits 1."""
    import asyncio

    from bot.backup.catalog import Expected, FetchFailed, fetch_verified
    from bot.backup.object_store import ObjectStoreError, OffsiteStore

    name = args.name
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise UsageFailure(f"{name!r} is not a snapshot file name (as snapshot list shows it)")
    directory = Path(args.dir)
    if directory.exists() and not directory.is_dir():
        raise UsageFailure(f"--dir: {args.dir}: not a directory")
    config = _load_config(args.config)
    if args.cluster:
        cluster = config.cluster(args.cluster)
        if cluster is None:
            raise UsageFailure(f"--cluster: no cluster named {args.cluster!r} in {config.source} "
                               f"(known: {', '.join(c.name for c in config.clusters)})")
    elif len(config.clusters) == 1:
        cluster = config.clusters[0]
    else:
        raise UsageFailure(f"{config.source} names {len(config.clusters)} clusters: pass --cluster")
    if cluster.snapshots.store is None:
        raise UsageFailure(f"cluster {cluster.name} has no [snapshots.store] in {config.source}")
    dest = directory / name
    if dest.exists():
        raise UsageFailure(f"{dest} exists; not overwritten")
    prog = "etcd-chatops snapshot fetch"
    try:
        remote = OffsiteStore.from_config(cluster.snapshots.store)
        manifest = await remote.read_manifest(cluster.name, name)
    except ObjectStoreError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if manifest is None:
        print(f"{prog}: {name} is not in {remote.display_url(cluster.name, '')} (or has no manifest to verify it by)",
              file=sys.stderr)
        return EXIT_FAILED
    rows, _ = await _catalog_rows(config, cluster.name)
    row = next((r for r in rows if r.path.rsplit("/", 1)[-1] == name), None)
    foreign = remote.foreign(manifest, cluster.name, name) if row is None else ""
    if row is not None and row.sha256 != manifest.sha256:
        print(f"{prog}: the manifest of {name} says sha256 {manifest.sha256[:16]}…, the bot's catalog "
              f"{row.sha256[:16]}…: not fetched", file=sys.stderr)
        return EXIT_FAILED
    directory.mkdir(parents=True, exist_ok=True)
    part = directory / f".{name}.fetching"   # the store's fetch writes `.part` beside it, then renames
    try:
        await fetch_verified(remote, cluster.name, Expected(name, manifest.size, manifest.sha256), part)
        problem = await asyncio.to_thread(_fetched_problem, part, manifest)
        if problem:
            raise FetchFailed(f"{name} from the store is not the snapshot its manifest describes: {problem}; "
                              "the download was deleted")
        part.rename(dest)
    except FetchFailed as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        part.unlink(missing_ok=True)
    what = "age-encrypted: size and sha256" if manifest.encrypted else "size, sha256 and status"
    print(f"fetched {remote.display_url(cluster.name, name)} to {dest}: {what} match the manifest "
          f"(revision {manifest.revision}, hash {manifest.hash}, sha256 {manifest.sha256})")
    if foreign:
        print(f"{prog}: warning: {name} is FOREIGN, not taken by this bot: {foreign}; it matches what its own "
              "manifest claims, nothing more", file=sys.stderr)
    return EXIT_OK


def parse_since(text: str, now: float) -> float:
    """An ISO date/time (UTC when no zone is given) or an age like 24h -> epoch seconds."""
    import datetime as dt

    from bot.config import parse_duration
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageFailure(f"--since: {text!r} is neither an ISO date/time nor an age like 24h") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


async def _audit(args: argparse.Namespace) -> int:
    import time

    from bot.store.backends import store_for
    from bot.store.base import StoreError

    config = _load_config(args.config)
    if isinstance(config.database, Path) and not config.database.is_file():
        raise UsageFailure(f"no database at {config.database} (database in {config.source})")
    since = parse_since(args.since, time.time()) if getattr(args, "since", None) else None
    store = store_for(config)
    try:
        await store.open()
        if args.audit_cmd == "verify":
            count, problem = await store.verify_audit()
            if problem:
                print(f"audit log NOT intact after checking {count} row(s): {problem}")
                return EXIT_FAILED
            keyed_from = await store.audit_keyed_from()
            if keyed_from is None:
                keying = "unkeyed: anyone who can write the database can rewrite it undetected"
            elif keyed_from == 1:
                keying = "keyed with HMAC"
            else:
                keying = (f"keyed with HMAC from row {keyed_from} (the rows before it were written without a key; "
                          "the keyed rows cover them)")
            print(f"audit log intact: {count} row(s), hash chain verified, {keying}")
            return EXIT_OK
        for row in await store.audit_rows(since):
            print(json.dumps({**dataclasses.asdict(row), "detail": json.loads(row.detail)}, ensure_ascii=False))
        return EXIT_OK
    except StoreError as e:
        print(f"etcd-chatops audit: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await store.close()


def _demo(args: argparse.Namespace) -> int:
    from bot.testing import demo

    directory = Path(args.dir) if args.dir else None
    try:
        if args.cmd == "say":
            return _arun(demo.say(directory or demo.default_dir(), args.text, args.person, plan=args.plan))
        if args.stop:
            print(demo.stop_kept(directory or demo.default_dir()))
            return EXIT_OK
    except demo.DemoError as e:
        raise UsageFailure(str(e)) from None
    return demo.run_demo(directory, args.keep, scenario=args.scenario)


def _check_config(args: argparse.Namespace) -> int:
    if args.example:
        if args.config:
            raise UsageFailure("--example prints the example; give it or a file to check, not both")
        from importlib.resources import files
        sys.stdout.write(files("bot.config").joinpath("example.toml").read_text())
        return EXIT_OK
    config = _load_config(args.config)
    print(f"{config.source}: ok")
    print(f"  database: {config.database_shown}\n  snapshot_dir: {config.snapshot_dir}")
    for c in config.clusters:
        tls = "mutual TLS" if c.cert else ("TLS" if any(e.startswith("https") for e in c.endpoints) else "plaintext")
        print(f"  cluster {c.name}: {len(c.endpoints)} endpoint(s), {tls}, "
              f"channels {', '.join(c.channels) or '(none)'}, launcher {c.launcher.kind}")
        store = c.snapshots.store
        if store is None:
            continue
        print(f"    snapshots off-site: {store.url}/{c.name}/")
        if store.manifest_key is None:
            print(f"    warning: {c.name}'s snapshot store has no manifest key (manifest_key_env/_file, or the "
                  "audit key): the bot cannot tell the objects it wrote from anyone else's, so every object its "
                  "catalog does not know is foreign (restored only by name with --force)")
        else:
            which = "the audit key" if store.manifest_key == config.audit_key else "the manifest key"
            print(f"    manifests signed with {which} (HMAC-SHA256)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC core logs straight to stderr, past our one-line errors and JSON logs; $GRPC_VERBOSITY still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser, subparsers = _parser()
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run":
            return _run(args)
        if args.cmd in ("status", "members"):
            return _arun(_status(args))
        if args.cmd == "check-config":
            return _check_config(args)
        if args.cmd == "snapshot":
            if args.snap_cmd in ("list", "fetch"):
                return _arun(_settled(_snapshot_list(args) if args.snap_cmd == "list" else _snapshot_fetch(args)))
            return _snapshot_status(args) if args.snap_cmd == "status" else _arun(_snapshot_save(args))
        if args.cmd == "audit":
            return _arun(_audit(args))
        if args.cmd in ("demo", "say"):
            return _demo(args)
        if args.cmd == "plan":
            from bot.cli import plan
            return _arun(plan.main(args))
    except UsageFailure as e:
        nested = getattr(args, "snap_cmd", None) or getattr(args, "audit_cmd", None) or getattr(args, "plan_cmd", None)
        if not isinstance(e, ConfigFailure):
            (_NESTED_PARSERS.get(f"{args.cmd} {nested}") or subparsers[args.cmd]).print_usage(sys.stderr)
        print(f"etcd-chatops {args.cmd}{f' {nested}' if nested else ''}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.cmd}")
