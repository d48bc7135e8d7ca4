"""The ssh launcher's transport: etcd-chatops-node on a control-plane host, over SSH.

A connection is opened per host and step, and the host's key is checked against the pinned
known_hosts before anything is sent. An unknown or changed key, a refused login or a host that
does not answer is a HostError: one line naming the host (and the fingerprint of the key it
offered), never a prompt or a learned key. Nothing of the user's SSH setup counts (no
~/.ssh/config, no agent, no default known_hosts): only the launcher's table.

The bot's words are the node program's argv, each a plain word the node takes (no quoting, no
shell: its forced command reads them from SSH_ORIGINAL_COMMAND); the answer is its one JSON line.
Every call has a deadline, and a connection that drops mid-action is a HostError too: every node
action is idempotent, so the step is repeated on resume. The private key lives in memory only;
neither it nor a snapshot's bytes reach a log or a message.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncssh

from bot.config import NODE_WORD, LauncherConfig
from bot.domain.quorum import MemberState

MARGIN = 30.0                  # seconds an action's SSH call waits beyond the node's own --timeout
NODE_TIMEOUT_MAX = 3600        # the node program's --timeout range
OUTPUT_LIMIT = 1 << 20         # bytes of a node's answer read (its one JSON line, a manifest at most)
WORD = re.compile(NODE_WORD)
STATES = {"running": MemberState.RUNNING, "stopped": MemberState.STOPPED}

# asyncssh logs every channel and command at INFO: the bot logs what it runs itself, once per action.
logging.getLogger("asyncssh").setLevel(logging.WARNING)


@cache
def _ssh() -> ModuleType:
    """asyncssh, imported on the first connection: it costs a process ~0.13 s of CPU, which every CLI command
    and bot that never reaches a host would otherwise pay at start."""
    with warnings.catch_warnings():  # asyncssh still loads DSA, which cryptography deprecates, at import
        warnings.filterwarnings("ignore", message="DSA is deprecated")
        import asyncssh
    return asyncssh


@dataclass(frozen=True)
class Host:
    """Where one member's etcd-chatops-node is reached."""

    member: str
    address: str
    port: int = 22

    @property
    def shown(self) -> str:
        """`m1@10.0.0.2:22`, as every message names the host."""
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.member}@{address}:{self.port}"


def host_for(launcher: LauncherConfig, member: str, peer_url: str) -> Host:
    """The host of `member`: the launcher's `hosts`, else its peer URL's host, port 22."""
    address, port = launcher.host_of(member, peer_url)
    return Host(member, address, port)


class HostError(Exception):
    """A host the bot cannot use: one line that names it."""

    def __init__(self, host: Host, reason: str):
        super().__init__(f"{host.shown}: {reason}")
        self.host, self.reason = host, reason


@dataclass(frozen=True)
class NodeAnswer:
    """One action of etcd-chatops-node on one host: its exit status and its JSON line."""

    host: Host
    action: str
    flags: tuple[str, ...]       # the action's flags, as the bot gave them (no --member, no --timeout)
    exit_status: int | None
    answer: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""              # why there is no JSON answer (the tail of stderr, one line)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and self.answer.get("ok") is True

    @property
    def state(self) -> MemberState:
        return STATES.get(str(self.answer.get("state", "")), MemberState.UNKNOWN)

    @property
    def result(self) -> str:
        """What the node said it did, or why it did not, in one line."""
        if self.answer.get("ok") is True:
            said = str(self.answer.get("detail") or "")
            if not said and self.action == "status":
                present = self.answer.get("snapshot_present")
                said = (f"member {self.answer.get('state', '?')}" if present is None else
                        "the snapshot is on the host already (sha256 checked), not copied again" if present else
                        "the snapshot is not on the host yet")
            changed = self.answer.get("changed")
            return said + (" (nothing to change)" if changed is False and not said else "")
        if self.answer:
            return f"refused ({self.answer.get('code', 'failed')}): {self.answer.get('error', '')}"
        return self.error or f"exit status {self.exit_status}, no answer"

    def line(self) -> str:
        """`m1@10.0.0.2:22 stop --with-apiserver: moved ...; (1.2 s)`: what ran on the host, and its result."""
        ran = " ".join([self.action, *self.flags])
        return f"{self.host.shown} {ran}: {self.result} ({self.seconds:.1f} s)"


class _Offered:
    """The key a host offered when the pinned known_hosts did not trust it (for the error)."""

    def __init__(self) -> None:
        self.key: asyncssh.SSHKey | None = None

    def client(self) -> asyncssh.SSHClient:
        """An asyncssh client that records the untrusted key here (and trusts nothing known_hosts does not)."""
        _ssh()
        import asyncssh  # loaded by _ssh(), without its warnings

        offered = self

        class Pinned(asyncssh.SSHClient):
            def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
                offered.key = key
                return False

        return Pinned()


class NodeSession:
    """One SSH connection to one host, on which the node program's actions run."""

    def __init__(self, launcher: LauncherConfig, host: Host, conn: asyncssh.SSHClientConnection):
        self.launcher, self.host, self.conn = launcher, host, conn

    def command(self, action: str, flags: Sequence[str]) -> list[str]:
        """The whole argv: sudo, the program, the host's configuration as the bot knows it (the node refuses
        it unless it equals its own), the action, the member, the flags. ValueError for a word the node would
        refuse."""
        lc, member = self.launcher, self.host.member
        config = ["--recipe", lc.recipe or ""]
        if lc.recipe == "static-pod":
            config += ["--manifests-dir", lc.on_host(lc.manifests_dir, member)]
        else:
            config += ["--unit", lc.on_host(lc.unit, member)]
        config += ["--etcdutl", lc.etcdutl]
        argv = [*(["sudo", "-n"] if lc.sudo else []), *lc.node_command, *config, action, "--member", member, *flags]
        bad = next((w for w in argv if not WORD.fullmatch(w)), None)
        if bad is not None:
            raise ValueError(f"{bad!r} cannot be sent to etcd-chatops-node (it takes plain words only)")
        return argv

    async def run(self, action: str, flags: Sequence[str] = (), *, timeout: float,
                  stdin: bytes | Path | None = None) -> NodeAnswer:
        """Run one action (flags without --member and --timeout) within `timeout` seconds (the node gets the
        same, the SSH call a margin more). HostError when the connection fails or drops on the way."""
        node_timeout = max(1, min(NODE_TIMEOUT_MAX, int(timeout)))
        argv = self.command(action, [*flags, "--timeout", str(node_timeout)])
        began = time.monotonic()
        try:
            async with asyncio.timeout(node_timeout + MARGIN):
                done = await self.conn.run(" ".join(argv), check=False, encoding=None,
                                           **({"stdin": str(stdin)} if isinstance(stdin, Path)
                                              else {"input": stdin or b""}))
        except TimeoutError:
            raise HostError(self.host, f"{action} did not answer within {node_timeout + MARGIN:g}s") from None
        except (_ssh().Error, OSError) as e:
            raise HostError(self.host, f"the connection dropped during {action}: {_reason(e)}") from None
        seconds = time.monotonic() - began
        out = _text(done.stdout)
        lines = out.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else {}
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if not answer and done.exit_status is None:   # the channel closed without an exit: sshd or the node died
            raise HostError(self.host, f"the connection dropped during {action}: no exit status and no answer "
                                       f"after {seconds:.1f}s")
        error = ""
        if not answer:
            said = (_text(done.stderr).strip().splitlines() or lines or [""])[-1][-300:]
            error = (f"no answer from etcd-chatops-node (exit status {done.exit_status}"
                     + (f": {said}" if said else "") + "): is it installed, and the key's forced command right?")
        return NodeAnswer(self.host, action, tuple(flags), done.exit_status, answer, seconds, error)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return (data if isinstance(data, str) else data[:OUTPUT_LIMIT].decode(errors="replace"))


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _fingerprints(keys: Sequence[asyncssh.SSHKey]) -> str:
    return ", ".join(f"{k.get_algorithm()} {k.get_fingerprint('sha256')}" for k in keys)


@asynccontextmanager
async def session(launcher: LauncherConfig, host: Host) -> AsyncIterator[NodeSession]:
    """A connection to `host` with its key checked against the pinned known_hosts, within the launcher's
    connect deadline; HostError (naming the host, and the fingerprint it offered) otherwise."""
    if launcher.key is None or launcher.known_hosts is None:
        raise HostError(host, "the launcher has no key or known_hosts (an ssh launcher needs both)")
    ssh = _ssh()
    try:
        known = ssh.read_known_hosts(str(launcher.known_hosts))
    except (OSError, ValueError) as e:
        raise HostError(host, f"cannot read known_hosts {launcher.known_hosts}: {_reason(e)}") from None
    offered = _Offered()
    client = offered.client()
    seconds = launcher.connect_timeout_seconds
    try:
        async with asyncio.timeout(seconds):
            conn = await ssh.connect(
                host.address, host.port, username=launcher.user, known_hosts=known,
                client_keys=[ssh.import_private_key(launcher.key)], client_factory=lambda: client,
                config=None, agent_path=None, agent_forwarding=False, preferred_auth="publickey",
                connect_timeout=seconds, login_timeout=seconds, keepalive_interval=15, keepalive_count_max=4)
    except ssh.HostKeyNotVerifiable:
        raise HostError(host, _untrusted(known, host, offered.key)) from None
    except ssh.PermissionDenied:
        raise HostError(host, f"the host refused the bot's key for user {launcher.user} (authorized_keys)") from None
    except TimeoutError:
        raise HostError(host, f"unreachable: no SSH answer within {seconds:g}s") from None
    except (ssh.Error, OSError) as e:
        raise HostError(host, f"unreachable: {_reason(e)}") from None
    try:
        yield NodeSession(launcher, host, conn)
    finally:
        conn.close()
        try:
            async with asyncio.timeout(seconds):
                await conn.wait_closed()
        except (TimeoutError, ssh.Error, OSError):
            pass


def _untrusted(known: asyncssh.SSHKnownHosts, host: Host, offered: asyncssh.SSHKey | None) -> str:
    """Why the host's key was not trusted: unknown to known_hosts, or not the key it pins."""
    seen = f"it offered {_fingerprints([offered])}" if offered is not None else "it offered a key it could not prove"
    trusted = known.match(host.address, host.address, host.port if host.port != 22 else None)[0]
    if not trusted:
        return (f"unknown host key: known_hosts pins no key for it; {seen}. Check that fingerprint on the host "
                "(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) before you add its line")
    return (f"host key CHANGED: {seen}, known_hosts pins {_fingerprints(trusted)}. Nothing was sent; find out why "
            "(a reinstalled host, or someone in the middle) before you change known_hosts")
