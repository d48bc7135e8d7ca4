"""LocalCluster: real etcd members on free loopback ports, for the demo and the tests.

Every member's process, ports and data directory live under one base
directory, with a small JSON record per member; that record is the single
source of truth, so members started by another process (the `command`
launcher's helper, `bot.testing.start_member`) are found, killed and
cleaned up like our own.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self

from bot.etcd.binaries import BinaryNotFound, find_binary

if TYPE_CHECKING:  # imported where used: the launcher stand-in, a process per action, imports this module
    from bot.domain.cluster import MemberStatus, TLSFiles
    from bot.etcd.client import EtcdClient

START_TIMEOUT = 30.0
# Base directories of the clusters this process created (tests check that none is left running).
CREATED: list[Path] = []


class ClusterError(RuntimeError):
    pass


# The ports free_port picks from: below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768
# and up by default), so no outgoing connection takes a port between its pick and its bind; and split
# between pytest-xdist's workers (PYTEST_XDIST_WORKER=gwN of PYTEST_XDIST_WORKER_COUNT, inherited by the
# processes a test starts), so two workers never pick the same port.
PORTS = range(20000, 32768)
_random = random.SystemRandom()


def worker_ports() -> range:
    """This process's share of PORTS: all of it, or its pytest-xdist worker's slice."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1):
        return PORTS
    share = len(PORTS) // int(count)
    first = PORTS.start + int(worker[2:]) % int(count) * share
    return range(first, first + share)


# Where this process's next free_port() looks: a random place in its share at first, then onwards. Picked at
# random, a port handed out but not yet bound (a replacement's URLs, chosen when the plan is proposed and bound
# at its start step) could be handed out again to the next test's cluster, started meanwhile in a thread.
_next_port: list[int] = []
_port_lock = threading.Lock()


def free_port() -> int:
    """A port free on 127.0.0.1 right now from this process's share (see PORTS), after the last one it gave:
    a port comes round again only after the whole share (2,553 ports with 5 workers)."""
    ports = worker_ports()
    with _port_lock:
        if not _next_port or _next_port[0] not in ports:
            _next_port[:] = [_random.choice(ports)]
        for _ in range(len(ports)):
            port = _next_port[0]
            _next_port[0] = port + 1 if port + 1 < ports.stop else ports.start
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise ClusterError(f"no free port on 127.0.0.1 in {ports.start}-{ports.stop - 1}")


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` itself listens on TCP `port` (in its own network namespace). An answer on a member's
    port proves nothing alone: when another process holds it, the member exits on its bind error, and until it
    has, the other process answers for it."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


@dataclass
class LocalMember:
    name: str
    client_url: str
    peer_url: str
    data_dir: str
    log_file: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    netns: str | None = None  # the network namespace it runs in (bot.testing.netbed), None on loopback

    @property
    def client_port(self) -> int:
        return _port(self.client_url)

    @property
    def peer_port(self) -> int:
        return _port(self.peer_url)


@dataclass(frozen=True)
class TLSPaths:
    """Everything a member or a client needs for mutual TLS."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _alive(pid: int, base_dir: Path) -> bool:
    """True when `pid` runs and is one of ours (guards against pid reuse)."""
    proc = _children.get(pid)
    if proc is not None:  # our own child: its cmdline is python's until exec
        return proc.poll() is None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return str(base_dir).encode() in cmdline


def processes_naming(roots: Iterable[str]) -> list[tuple[int, str]]:
    """Live processes (not zombies, not this one) whose command line names one of `roots` (a cluster's base
    directory, a test's temporary directory), with that command line: what a test or a seed left running."""
    roots = list(roots)
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(root in cmd for root in roots):
            found.append((int(d.name), cmd))
    return found


def tls_member_args(tls: TLSPaths) -> list[str]:
    return ["--cert-file", tls.server_cert, "--key-file", tls.server_key, "--trusted-ca-file", tls.ca,
            "--client-cert-auth",
            "--peer-cert-file", tls.server_cert, "--peer-key-file", tls.server_key, "--peer-trusted-ca-file", tls.ca,
            "--peer-client-cert-auth"]


def spawn(base_dir: Path, name: str, argv: list[str], env: dict[str, str], client_url: str,
          peer_url: str, netns: str | None = None) -> LocalMember:
    """Start one etcd process detached from our session, logging to a file,
    and record it under `base_dir/members/<name>.json`. With `netns` it runs in that
    network namespace (`ip netns exec` execs etcd, so the pid is etcd's own)."""
    data_dir = base_dir / "data" / name
    log_file = base_dir / "logs" / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    full_argv = [*argv, "--data-dir", str(data_dir)] if "--data-dir" not in argv else argv
    in_netns = ["ip", "netns", "exec", netns] if netns else []
    with open(log_file, "ab") as log:
        proc = subprocess.Popen([*in_netns, *full_argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**_base_env(), **env}, start_new_session=True, cwd=base_dir)
    member = LocalMember(name=name, client_url=client_url, peer_url=peer_url, data_dir=str(data_dir),
                         log_file=str(log_file), argv=full_argv, env=env, pid=proc.pid, netns=netns)
    _record(base_dir, member)
    _children[proc.pid] = proc
    return member


# Popen objects of processes this process started, so that they are reaped.
_children: dict[int, subprocess.Popen] = {}


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep}


def _record(base_dir: Path, member: LocalMember) -> None:
    d = base_dir / "members"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{member.name}.json.tmp"
    tmp.write_text(json.dumps(asdict(member), indent=1))
    tmp.replace(d / f"{member.name}.json")


def load_members(base_dir: Path) -> dict[str, LocalMember]:
    d = base_dir / "members"
    out: dict[str, LocalMember] = {}
    if d.is_dir():
        for p in sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
            data = json.loads(p.read_text())
            out[data["name"]] = LocalMember(**data)
    return out


def ssl_context(tls: TLSPaths | None) -> ssl.SSLContext | None:
    if tls is None:
        return None
    ctx = ssl.create_default_context(cafile=tls.ca)
    ctx.load_cert_chain(tls.client_cert, tls.client_key)
    return ctx


def http_get(url: str, tls: TLSPaths | None, timeout: float = 1.0) -> bytes | None:
    """GET from a member of ours: never through a proxy the environment names (members on a
    test bed's private addresses are as local as loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=ssl_context(tls)))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.read()
    except (OSError, urllib.error.URLError, ssl.SSLError):
        return None


def log_tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalCluster:
    """N real etcd members on 127.0.0.1, torn down by `close()` whatever happens.

    Use as a context manager (sync) or call start()/close(); the methods
    block for at most their timeout and are safe to call from a thread
    (`asyncio.to_thread`) while an event loop runs.
    """

    def __init__(self, size: int = 3, *, tls: bool = False, base_dir: str | Path | None = None,
                 prefix: str = "member", keep: bool = False, extra_args: Sequence[str] = (),
                 cert_days: float = 365.0):
        """`extra_args`: more etcd flags for every member (e.g. a small --quota-backend-bytes);
        `cert_days`: how long the TLS certificates are valid."""
        if size < 1:
            raise ValueError("a cluster needs at least one member")
        self.size = size
        self.extra_args = tuple(extra_args)
        self.prefix = prefix
        self.keep = keep
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="etcd-chatops-cluster-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        CREATED.append(self.base_dir)
        self.token = "etcd-chatops-" + secrets.token_hex(6)
        # Binaries are chosen once, here: a cluster keeps the etcd version (ETCD_BIN_DIR) it was made with.
        self.etcd = str(find_binary("etcd"))
        self.etcdctl_bin = _optional_binary("etcdctl")
        self.tls: TLSPaths | None = self._make_tls(cert_days) if tls else None
        self.scheme = "https" if tls else "http"
        self.user: tuple[str, str] | None = None  # (name, password) once enable_auth ran

    @classmethod
    def attach(cls, base_dir: str | Path, tls: TLSPaths | None = None) -> LocalCluster:
        """A handle on a cluster another process started in `base_dir`
        (its members are found through their records there)."""
        self = cls.__new__(cls)
        self.size, self.prefix, self.keep, self.extra_args = 0, "member", True, ()
        self.base_dir = Path(base_dir)
        self.token = ""
        # The etcd its members run (the version it was made with), and the etcdctl beside it.
        recorded = next((m.argv[0] for m in load_members(self.base_dir).values() if m.argv), None)
        if recorded and os.access(recorded, os.X_OK):
            self.etcd = recorded
            sibling = Path(recorded).with_name("etcdctl")
            self.etcdctl_bin = str(sibling) if os.access(sibling, os.X_OK) else _optional_binary("etcdctl")
        else:
            self.etcd = str(find_binary("etcd"))
            self.etcdctl_bin = _optional_binary("etcdctl")
        self.tls = tls
        if tls is None and (self.base_dir / "tls" / "ca.crt").is_file():
            d = self.base_dir / "tls"
            self.tls = TLSPaths(ca=str(d / "ca.crt"), server_cert=str(d / "server.crt"),
                                server_key=str(d / "server.key"), client_cert=str(d / "client.crt"),
                                client_key=str(d / "client.key"))
        self.scheme = "https" if self.tls else "http"
        self.user = None
        return self

    def _make_tls(self, cert_days: float, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TLSPaths:
        """A CA, and server and client certificates naming `hosts`, under base_dir/tls."""
        from bot.testing import certs
        files = certs.generate(self.base_dir / "tls", hosts=hosts, valid_days=cert_days)
        return TLSPaths(ca=str(files.ca), server_cert=str(files.server_cert), server_key=str(files.server_key),
                        client_cert=str(files.client_cert), client_key=str(files.client_key))

    # -- lifecycle ------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
            return self
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, timeout: float = START_TIMEOUT) -> LocalCluster:
        """Start the initial members and wait until every one reports healthy."""
        for attempt in range(3):  # a port picked free can be taken before etcd binds it
            names = [f"{self.prefix}{i}" for i in range(1, self.size + 1)]
            urls = self._initial_urls(names)
            initial = ",".join(f"{n}={urls[n][1]}" for n in names)
            for n in names:
                self._spawn(n, *urls[n], initial, "new")
            try:
                self.wait_healthy(names, timeout)
                return self
            except ClusterError:
                if attempt == 2 or not any("address already in use" in log_tail(m.log_file)
                                           for m in self.members.values()):
                    raise
                self._kill_all()
                shutil.rmtree(self.base_dir / "members", ignore_errors=True)
                shutil.rmtree(self.base_dir / "data", ignore_errors=True)
                shutil.rmtree(self.base_dir / "logs", ignore_errors=True)
        return self

    def close(self) -> None:
        """Kill every member process (ours or recorded by a helper) and remove the files."""
        self._kill_all()
        if not self.keep:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- members --------------------------------------------------------

    @property
    def members(self) -> dict[str, LocalMember]:
        return load_members(self.base_dir)

    def member(self, name: str) -> LocalMember:
        try:
            return self.members[name]
        except KeyError:
            raise ClusterError(f"no local member named {name!r}") from None

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of the members whose process runs."""
        return [m.client_url for m in self.members.values() if self.running(m.name)]

    @property
    def all_endpoints(self) -> list[str]:
        return [m.client_url for m in self.members.values()]

    def running(self, name: str) -> bool:
        m = self.members.get(name)
        return bool(m and m.pid and _alive(m.pid, self.base_dir))

    def kill(self, name: str) -> None:
        """SIGKILL, as a crashed machine would go."""
        self._signal(name, signal.SIGKILL)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        self._signal(name, signal.SIGTERM, timeout)

    def pause(self, name: str) -> None:
        """SIGSTOP: the kernel still accepts connections but nothing answers,
        as with a black-holed host; only a deadline ends a call to it.

        Returns once every thread is stopped: kill() only wakes one thread, which stops
        the others when it runs, and meanwhile they answer (a request sent right after
        the kill was answered in up to 1 of 10 tries)."""
        self._signal(name, signal.SIGSTOP, wait=False)
        self._wait_threads(name, stopped=True)

    def resume(self, name: str) -> None:
        self._signal(name, signal.SIGCONT, wait=False)
        self._wait_threads(name, stopped=False)

    def _wait_threads(self, name: str, *, stopped: bool, timeout: float = 5.0) -> None:
        """Wait until all (`stopped`) or none of the member's threads are in job-control stop."""
        pid = self.member(name).pid
        deadline = time.monotonic() + timeout
        while pid and _alive(pid, self.base_dir):
            states = _thread_states(pid)
            if states and (all(s == "T" for s in states) if stopped else "T" not in states):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} (pid {pid}) not {'stopped' if stopped else 'running'} after {timeout:g}s: "
                                   f"thread states {''.join(states)}")
            time.sleep(0.001)

    def restart(self, name: str, timeout: float = START_TIMEOUT) -> LocalMember:
        """Start a stopped member again on its own data directory."""
        m = self.member(name)
        if self.running(name):
            raise ClusterError(f"{name} is still running")
        member = spawn(self.base_dir, name, m.argv, m.env, m.client_url, m.peer_url, m.netns)
        self.wait_serving(name, timeout)
        return member

    def rotate_tls(self, timeout: float = START_TIMEOUT) -> None:
        """A new CA and new certificates for every member, as a CA rotation brings: each member is stopped,
        its files replaced in place, and all are started again at once (a restarted member serves only with
        a quorum of its peers). A client that still trusts the old CA can no longer connect."""
        if self.tls is None:
            raise ClusterError("rotate_tls: this cluster does not use TLS")
        from concurrent.futures import ThreadPoolExecutor

        from bot.testing import certs
        names = list(self.members)
        for name in names:
            self.stop(name)
        certs.generate(self.base_dir / "tls")
        with ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(lambda n: self.restart(n, timeout), names))

    def start_member(self, name: str, initial_cluster: str, *, client_port: int | None = None,
                     peer_port: int | None = None, timeout: float = START_TIMEOUT) -> LocalMember:
        """Start a member that was already added with `member add`
        (ETCD_INITIAL_CLUSTER_STATE=existing), as the runbook's step 4."""
        member = self._spawn(name, *self._urls_for(name, client_port, peer_port), initial_cluster, "existing")
        self.wait_serving(name, timeout)
        return member

    def add_member(self, name: str, *, learner: bool = False, timeout: float = START_TIMEOUT) -> LocalMember:
        """`etcdctl member add` then start it: what an operator does by hand. A young
        cluster refuses adds ("unhealthy cluster") until its leader has seen every
        voter for 5 s: retried within `timeout`."""
        client_url, peer_url = self._urls_for(name)
        args = ["member", "add", name, f"--peer-urls={peer_url}"] + (["--learner"] if learner else [])
        deadline = time.monotonic() + timeout
        while (proc := self.etcdctl(*args, check=False)).returncode != 0:
            if "unhealthy cluster" not in proc.stderr or time.monotonic() > deadline:
                raise ClusterError(f"etcdctl member add failed: {proc.stderr.strip()}")
            time.sleep(0.2)
        initial = next((line.split("=", 1)[1].strip().strip('"') for line in proc.stdout.splitlines()
                        if line.startswith("ETCD_INITIAL_CLUSTER=")), None)
        if not initial:
            raise ClusterError(f"etcdctl member add gave no ETCD_INITIAL_CLUSTER: {proc.stdout.strip()}")
        return self.start_member(name, initial, client_port=_port(client_url), peer_port=_port(peer_url),
                                 timeout=timeout)

    # -- waiting --------------------------------------------------------

    def wait_healthy(self, names: Iterable[str] | None = None, timeout: float = START_TIMEOUT) -> None:
        """Until each member answers /health with true (it has a leader and serves)."""
        names = list(names or self.members)
        self._wait(names, timeout, lambda m: (http_get(m.client_url + "/health", self.tls) or b"").find(b'"true"') >= 0,
                   "healthy")

    def wait_serving(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Until the member's client port answers /version (a learner cannot pass /health)."""
        self._wait([name], timeout, lambda m: http_get(m.client_url + "/version", self.tls) is not None, "serving")

    def _wait(self, names: list[str], timeout: float, ok, what: str) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            members = self.members
            for n in list(pending):
                m = members.get(n)
                if m is None:
                    raise ClusterError(f"no local member named {n!r}")
                if not self.running(n):
                    raise ClusterError(f"{n} exited while starting:\n{log_tail(m.log_file)}")
                if ok(m) and m.pid is not None and listening(m.pid, m.client_port):
                    pending.discard(n)
            if pending and time.monotonic() > deadline:
                n = sorted(pending)[0]
                raise ClusterError(f"{n} not {what} after {timeout:g}s:\n{log_tail(members[n].log_file)}")
            if pending:
                time.sleep(0.05)

    # -- tools ----------------------------------------------------------

    def enable_auth(self, password: str, user: str = "root") -> None:
        """Turn etcd authentication on (`user` gets the root role); etcdctl then logs in as `user`."""
        self.etcdctl("user", "add", user, "--new-user-password", password, "--interactive=false")
        if user != "root":
            self.etcdctl("user", "grant-role", user, "root")
        self.etcdctl("auth", "enable")
        self.user = (user, password)
        self.password_file.write_text(password)
        self.password_file.chmod(0o600)

    @property
    def password_file(self) -> Path:
        """Where enable_auth leaves the password, for a bot's `password_file`."""
        return self.base_dir / "etcd-password"

    def etcdctl_args(self, endpoints: list[str] | None = None) -> list[str]:
        args = [self.etcdctl_bin or str(find_binary("etcdctl")), f"--endpoints={','.join(endpoints or self.endpoints)}",
                "--dial-timeout=2s", "--command-timeout=10s"]
        if self.tls:
            args += [f"--cacert={self.tls.ca}", f"--cert={self.tls.client_cert}", f"--key={self.tls.client_key}"]
        if self.user:
            args += [f"--user={self.user[0]}", f"--password={self.user[1]}"]
        return args

    def etcdctl(self, *args: str, endpoints: list[str] | None = None, check: bool = True,
                input: bytes | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run this cluster's etcdctl. No ETCDCTL_API: v3 is the default since etcd 3.4, and etcdctl 3.6
        logs "unrecognized environment variable" for it on every call."""
        proc = subprocess.run([*self.etcdctl_args(endpoints), *args], capture_output=True, text=input is None,
                              input=input, timeout=timeout, env=_base_env())
        if check and proc.returncode != 0:
            raise ClusterError(f"etcdctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def tls_files(self) -> TLSFiles | None:
        """The files for an EtcdClient talking to this cluster, or None without TLS."""
        if not self.tls:
            return None
        from bot.domain.cluster import TLSFiles
        return TLSFiles(Path(self.tls.ca), Path(self.tls.client_cert), Path(self.tls.client_key))

    def member_argv(self) -> list[str]:
        """The etcd command line shared by every member of this cluster."""
        argv = [self.etcd, "--initial-cluster-token", self.token, "--logger", "zap", "--log-level", "warn",
                "--heartbeat-interval", "100", "--election-timeout", "1000"]
        return argv + (tls_member_args(self.tls) if self.tls else []) + list(self.extra_args)

    # -- internals ------------------------------------------------------

    def _url(self, port: int) -> str:
        return f"{self.scheme}://127.0.0.1:{port}"

    def _initial_urls(self, names: list[str]) -> dict[str, tuple[str, str]]:
        """(client URL, peer URL) of each initial member: distinct free loopback ports
        (the kernel may hand out a port twice). The multi-host bed gives each a host instead."""
        fresh = iter(distinct_free_ports(2 * len(names)))
        return {n: (self._url(next(fresh)), self._url(next(fresh))) for n in names}

    def _urls_for(self, name: str, client_port: int | None = None,
                  peer_port: int | None = None) -> tuple[str, str]:
        """(client URL, peer URL) for a member added later, on the ports given or free ones."""
        return self._url(client_port or free_port()), self._url(peer_port or free_port())

    def _netns(self, name: str) -> str | None:
        """The network namespace member `name` runs in: none on loopback."""
        return None

    def _spawn(self, name: str, client_url: str, peer_url: str, initial_cluster: str, state: str) -> LocalMember:
        argv = [*self.member_argv(), "--name", name,
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", initial_cluster, "--initial-cluster-state", state]
        return spawn(self.base_dir, name, argv, {}, client_url, peer_url, self._netns(name))

    def _signal(self, name: str, sig: int, timeout: float = 10.0, wait: bool = True) -> None:
        m = self.member(name)
        if not m.pid or not _alive(m.pid, self.base_dir):
            return
        os.kill(m.pid, sig)
        if wait and not _wait_gone(m.pid, self.base_dir, timeout) and sig != signal.SIGKILL:
            os.kill(m.pid, signal.SIGKILL)
            _wait_gone(m.pid, self.base_dir, 5.0)

    def _kill_all(self) -> None:
        pids = [m.pid for m in load_members(self.base_dir).values() if m.pid]
        for pid in pids:
            if _alive(pid, self.base_dir):
                try:
                    os.kill(pid, signal.SIGKILL)  # works on a SIGSTOPped process too
                except ProcessLookupError:
                    pass
        for pid in pids:
            _wait_gone(pid, self.base_dir, 5.0)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def _optional_binary(name: str) -> str | None:
    """The binary's path, or None when it is missing (the error is raised when it is needed)."""
    try:
        return str(find_binary(name))
    except BinaryNotFound:
        return None


def _thread_states(pid: int) -> list[str]:
    """The state letter of each of the process's threads (/proc/<pid>/task/*/stat)."""
    states: list[str] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return states
    for task in tasks:
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[-1].split()[0])
        except OSError:
            pass  # the thread exited
    return states


def _wait_gone(pid: int, base_dir: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        proc = _children.get(pid)
        if proc is not None and proc.poll() is not None:
            _children.pop(pid, None)
            return True
        if not _alive(pid, base_dir):
            _children.pop(pid, None)
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


# ---------------------------------------------------------------- NOSPACE

QUOTA = 16 * 1024 * 1024  # a --quota-backend-bytes small enough to fill in a second
QUOTA_ARGS = ("--quota-backend-bytes", str(QUOTA))


async def fill_until_nospace(cluster: LocalCluster, value_size: int = 512 * 1024, limit: int = 400, *,
                             quota: int = QUOTA, full: float = 0.85, timeout: float = 30.0) -> int:
    """Overwrite a few keys with big values until etcd refuses writes ("database space exceeded") and every
    member's database holds at least `full` of `quota`; the history left behind is what compaction and
    defragmentation reclaim. Returns the number of writes that succeeded.

    etcd raises NOSPACE from the first member whose database file reaches the quota, and the files differ:
    the same writes applied in fewer commits leave fewer free pages (a member that caught up in one go read
    0.82 of the quota while another read 0.97). Read right after the refusal, a member still applying read
    lower still (a CI run's defrag plan passed 2 members of 3). So once every member has applied every
    write, a member under `full` gets more: the alarm is disarmed and the next write goes through it."""
    from bot.domain.errors import EtcdRequestError
    from bot.etcd.client import EtcdClient
    tls = cluster.tls_files()
    deadline = time.monotonic() + timeout
    async with EtcdClient(cluster.endpoints, tls=tls) as client:
        through = client
        written = 0
        for n in range(limit):
            try:
                await through.put(b"fill/%d" % (n % 4), b"x" * value_size)
                written += 1
                continue
            except EtcdRequestError as e:
                if "database space exceeded" not in str(e):
                    raise
            if through is not client:
                await through.close()
            statuses = await _settled(client, cluster.endpoints, deadline)
            small = [st for st in statuses if st.db_size < full * quota]
            if not small:
                return written
            for alarm in {a for st in statuses for a in st.alarms}:
                await client.alarm_disarm(alarm.member_id, alarm.kind)
            through = EtcdClient([small[0].endpoint], tls=tls)
    raise ClusterError(f"not every member held {full:.0%} of the {quota} bytes quota after {limit} writes of "
                       f"{value_size} bytes")


async def _settled(client: EtcdClient, endpoints: Sequence[str], deadline: float) -> list[MemberStatus]:
    """Every member's status once each has applied all the cluster committed and its database size stopped
    moving (etcd commits it every 100 ms), or ClusterError at `deadline`."""
    from bot.domain.errors import EtcdError
    last: dict[str, int] = {}
    while True:
        try:
            statuses = [await client.status(endpoint, timeout=2.0) for endpoint in endpoints]
        except EtcdError as e:
            statuses, why = [], str(e)
        else:
            committed = max(st.raft_index for st in statuses)
            sizes = {st.endpoint: st.db_size for st in statuses}
            if all(st.raft_applied_index >= committed for st in statuses) and sizes == last:
                return statuses
            last, why = sizes, f"applied {[st.raft_applied_index for st in statuses]} of {committed}, sizes {sizes}"
        if time.monotonic() > deadline:
            raise ClusterError(f"the members did not settle after NOSPACE: {why}")
        await asyncio.sleep(0.25)
