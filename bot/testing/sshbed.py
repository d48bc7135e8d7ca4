"""A control plane on the multi-host bed that the bot reaches over real SSH: the ssh launcher's tests and demo.

Each member runs on a host of the bed (bot.testing.netbed.Network: a network namespace with its
own client and peer addresses). On each host:

- its files under a directory of its own, `<base>/host-<name>` (bot.testing.node.NodeHost: its
  /etc/kubernetes, /etc/systemd/system, /var/lib), so every per-host path of the launcher is one
  `{name}` template;
- a real OpenSSH server (Debian's openssh-server, scripts/install-sshd.sh): `sshd -D` started in
  the host's namespace on its client address, with a host key of its own and one authorized key,
  the bot's, whose forced command is etcd-chatops-node with the host's configuration, as
  deploy/node/README.md tells an administrator to install it;
- etcd, run by the kubelet stand-in (static-pod: a process in the host's namespace watching the
  host's manifests directory) or by the systemctl stand-in (systemd), as kubeadm or an external
  etcd guide would lay it out.

The bot and the tests stay in the root namespace and reach each host's sshd and etcd on the
client link; members talk to each other on the peer link. Faults a test needs: a member whose
data is damaged (it crash-loops), a dead host, a host key that changes, a host cut off, SSH
sessions killed mid-action. Close the bed (or use it as a context manager) to stop everything,
also after a failure; the bed's reaper removes it if this process dies.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.etcd.binaries import find_binary
from bot.testing import certs
from bot.testing.cluster import ClusterError, http_get, log_tail
from bot.testing.netbed import BOT, Host, Link, Network, unavailable
from bot.testing.node import NodeHost, etcd_flags, flag_environment, node_binary, write_static_pod, write_unit

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
CLIENT_PORT, PEER_PORT, METRICS_PORT = 2379, 2380, 2381
START_TIMEOUT = 60.0
# The variables that make a unit one member rather than another: the node program's drop-in sets them.
IDENTITY = ("ETCD_NAME", "ETCD_DATA_DIR", "ETCD_INITIAL_CLUSTER", "ETCD_INITIAL_ADVERTISE_PEER_URLS",
            "ETCD_LISTEN_PEER_URLS", "ETCD_ADVERTISE_CLIENT_URLS", "ETCD_LISTEN_CLIENT_URLS")


def sshd_missing() -> str | None:
    """Why no sshd can run here, in one line (the bed's own reasons first), or None."""
    if reason := unavailable():
        return reason
    if not SSHD.is_file():
        return f"the ssh launcher's tests need OpenSSH's server ({SSHD}): run sh scripts/install-sshd.sh"
    if shutil.which(SSH_KEYGEN) is None:
        return "the ssh launcher's tests need ssh-keygen (Debian's openssh-client)"
    return None


def keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at `path` (and `.pub`); returns the public line. Its private lines are recorded
    with the test keys (bot.testing.certs.KEY_MATERIAL), so the suite proves none leaked."""
    path.unlink(missing_ok=True)
    path.with_suffix(".pub").unlink(missing_ok=True)
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   capture_output=True, timeout=30)
    certs.KEY_MATERIAL.extend(line for line in path.read_text().splitlines()
                              if line and not line.startswith("-----"))
    return path.with_suffix(".pub").read_text().strip()


def fingerprint(public_line: str) -> str:
    """`SHA256:...` of an OpenSSH public key line, as ssh-keygen -lf prints it."""
    out = subprocess.run([SSH_KEYGEN, "-lf", "-"], input=public_line + "\n", capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return out.split()[1]


@dataclass
class SshHost:
    """One host: its place on the network, its files, its sshd."""

    host: Host
    files: NodeHost
    ssh_dir: Path
    sshd: subprocess.Popen[bytes] | None = None
    kubelet: subprocess.Popen[bytes] | None = None
    host_key: str = ""          # its public line

    @property
    def name(self) -> str:
        return self.host.name


class SshControlPlane:
    """Members on bed hosts with sshd and etcd-chatops-node, started as a kubeadm control plane (static-pod) or
    external etcd under systemd would be. `launcher()` is the bot's [clusters.launcher] table for it."""

    def __init__(self, base: Path, recipe: str, size: int = 3, *, timeout: float = 60.0):
        if reason := sshd_missing():
            raise ClusterError(reason)
        self.base, self.recipe, self.size, self.timeout = base, recipe, size, timeout
        self.net = Network(base / "net")
        self.hosts: dict[str, SshHost] = {}
        self.etcd = str(find_binary("etcd"))
        self.etcdctl_bin = str(find_binary("etcdctl"))
        self.etcdutl = str(find_binary("etcdutl"))
        self.node = node_binary()
        self.token = "etcd-chatops-" + secrets.token_hex(6)
        self.bot_key = base / "bot" / "id_ed25519"
        self.known_hosts = base / "bot" / "known_hosts"
        self.members: list[str] = []

    def __enter__(self) -> SshControlPlane:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the bed --------------------------------------------------------

    def start(self) -> SshControlPlane:
        self.base.mkdir(parents=True, exist_ok=True)
        self.net.start()
        self.bot_key.parent.mkdir(parents=True, exist_ok=True)
        self.bot_public = keygen(self.bot_key, "etcd-chatops")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)   # sshd's privilege separation directory
        names = [f"m{i}" for i in range(1, self.size + 1)]
        for name in names:
            self.add_host(name)
        initial = ",".join(f"{n}={self.peer_url(n)}" for n in names)
        for name in names:
            self.members.append(name)
            self._bootstrap(name, initial)
        self.wait_healthy(names)
        return self

    def close(self) -> None:
        self.net.close()   # kills every process in the hosts' namespaces: sshd, kubelets, etcd

    def add_host(self, name: str) -> SshHost:
        """A host with sshd and etcd-chatops-node (and, static-pod, a kubelet with no pods yet): a member's, or a
        spare for a replacement."""
        host = self.net.add_host(name)
        files = NodeHost(self.base / f"host-{name}", self.recipe)
        files.data_root.mkdir(parents=True, exist_ok=True)
        files.logs.mkdir(parents=True, exist_ok=True)
        h = self.hosts[name] = SshHost(host, files, files.root / "etc" / "ssh")
        h.ssh_dir.mkdir(parents=True, exist_ok=True)
        self.rotate_host_key(name, restart=False)
        self._authorize(h)
        self._start_sshd(h)
        if self.recipe == "static-pod":
            files.manifests.mkdir(parents=True, exist_ok=True)
            with open(files.logs / "kubelet.log", "ab") as log:
                h.kubelet = self.net.popen(name, [sys.executable, "-m", "bot.testing.kubelet", "--manifests",
                                                  str(files.manifests), "--logs", str(files.logs), "--grace", "5"],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        else:
            files.config_args(self.etcdutl)   # writes the systemctl stand-in's shim
        return h

    def add_spare(self, name: str) -> SshHost:
        """A new host for a replacement member: sshd and etcd-chatops-node; static-pod, a kubelet with no pod;
        systemd, the etcd unit an administrator installs (its shared parameters, no member's identity)."""
        h = self.add_host(name)
        if self.recipe == "systemd":
            flags = etcd_flags(name=name, data_dir=h.files.data_dir, client_url=self.client_url(name),
                               peer_url=self.peer_url(name), initial_cluster="", token=self.token,
                               metrics_url=f"http://127.0.0.1:{METRICS_PORT}")
            write_unit(h.files, self.etcd, {k: v for k, v in flag_environment(flags).items() if k not in IDENTITY})
        self.write_known_hosts()
        return h

    def _authorize(self, h: SshHost, etcdutl: str | None = None) -> None:
        """authorized_keys: the bot's key, etcd-chatops-node with the host's configuration as its forced command."""
        forced = " ".join([str(self.node), *h.files.config_args(etcdutl or self.etcdutl)])
        (h.ssh_dir / "authorized_keys").write_text(f'restrict,command="{forced}" {self.bot_public}\n')

    def _start_sshd(self, h: SshHost) -> None:
        config = h.ssh_dir / "sshd_config"
        config.write_text(f"""ListenAddress {h.host.client_ip}:22
HostKey {h.ssh_dir / "ssh_host_ed25519_key"}
PidFile none
AuthorizedKeysFile {h.ssh_dir / "authorized_keys"}
StrictModes no
PermitRootLogin forced-commands-only
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
MaxStartups 100
LogLevel ERROR
""")
        with open(h.files.logs / "sshd.log", "ab") as log:
            h.sshd = self.net.popen(h.name, [str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not _listening(h.host.client_ip, 22):
            if h.sshd.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"sshd on {h.name} did not start:\n{log_tail(h.files.logs / 'sshd.log')}")
            time.sleep(0.02)

    def _bootstrap(self, name: str, initial: str) -> None:
        """The member's first start, as kubeadm init/join or an operator's first `systemctl start` would."""
        h = self.hosts[name]
        flags = etcd_flags(name=name, data_dir=h.files.data_dir, client_url=self.client_url(name),
                           peer_url=self.peer_url(name), initial_cluster=initial, token=self.token,
                           metrics_url=f"http://127.0.0.1:{METRICS_PORT}")
        if self.recipe == "static-pod":
            write_static_pod(h.files, self.etcd, flags)
        else:
            write_unit(h.files, self.etcd, flag_environment(flags))
            self.systemctl(name, "start", h.files.unit)

    def systemctl(self, name: str, *args: str) -> None:
        """The systemctl stand-in on host `name` (in its namespace, so what it starts runs there)."""
        h = self.hosts[name]
        subprocess.run(["ip", "netns", "exec", h.host.netns, str(h.files.systemctl), *args], check=True,
                       capture_output=True, timeout=60)

    # -- what the bot and the tests use ---------------------------------

    def client_url(self, name: str) -> str:
        return f"http://{self.hosts[name].host.client_ip}:{CLIENT_PORT}"

    def peer_url(self, name: str) -> str:
        return f"http://{self.hosts[name].host.peer_ip}:{PEER_PORT}"

    @property
    def endpoints(self) -> list[str]:
        return [self.client_url(n) for n in self.members]

    def launcher(self, **over: Any) -> dict[str, Any]:
        """The bot's [clusters.launcher] table for these hosts."""
        table: dict[str, Any] = {
            "kind": "ssh", "recipe": self.recipe, "key_file": str(self.bot_key), "known_hosts": str(self.known_hosts),
            "hosts": {n: h.host.client_ip for n, h in self.hosts.items()},
            "node_command": [str(self.node)], "etcdutl": self.etcdutl, "timeout_seconds": self.timeout,
            "connect_timeout_seconds": 3}
        table["manifests_dir" if self.recipe == "static-pod" else "unit"] = (
            str(self.base / "host-{name}" / "etc" / "kubernetes" / "manifests") if self.recipe == "static-pod"
            else "etcd.service")
        table.update(over)
        return table

    def cluster(self, name: str = "prod", **extra: Any) -> dict[str, Any]:
        """A [[clusters]] table for the bot: these endpoints and this launcher."""
        from bot.testing.workspace import CHANNEL
        table: dict[str, Any] = {"name": name, "endpoints": self.endpoints, "channels": [CHANNEL],
                                 "launcher": self.launcher(), "watch": {"enabled": False},
                                 "restore": {"data_dir": str(self.base / "host-{name}" / "var" / "lib" / "etcd"),
                                             "no_leader_seconds": 0.5,
                                             # static-pod stops it itself; systemd's hosts run no kube-apiserver
                                             "apiserver": "none"}}
        table.update(extra)
        return table

    def etcdctl(self, *args: str, endpoints: list[str] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.etcdctl_bin, f"--endpoints={','.join(endpoints or self.endpoints)}",
                               "--dial-timeout=2s", "--command-timeout=10s", *args], capture_output=True, text=True,
                              timeout=60, env={"PATH": os.environ.get("PATH", "")})
        if check and proc.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def healthy(self, name: str) -> bool:
        return b'"true"' in (http_get(self.client_url(name) + "/health", None) or b"")

    def leaderless(self, name: str) -> bool:
        """The member answers and has no leader (what a survivor of a quorum loss says once it has noticed: its
        /health answers 503, RAFT NO LEADER)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.client_url(name) + "/health", timeout=1) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            body = e.read()
        except OSError:
            return False
        return b"NO LEADER" in body

    def wait_healthy(self, names: list[str], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.healthy(n) for n in names):
            if time.monotonic() > deadline:
                sick = [n for n in names if not self.healthy(n)]
                logs = {n: log_tail(self.hosts[n].files.logs / "etcd.yaml.log") for n in sick}
                raise ClusterError(f"members {sick} not healthy after {timeout:g}s: {logs}")
            time.sleep(0.05)

    def write_known_hosts(self, names: list[str] | None = None) -> None:
        """known_hosts pins the current key of each host in `names` (every host by default)."""
        lines = [f"{h.host.client_ip} {h.host_key}" for n, h in self.hosts.items() if names is None or n in names]
        self.known_hosts.write_text("".join(f"{line}\n" for line in lines))

    # -- faults ---------------------------------------------------------

    def damage(self, name: str) -> None:
        """The member's data is damaged (as after a disk fault): its backend no longer opens, so etcd exits at
        every start and its runner keeps starting it (the kubelet's back-off) or leaves it failed (systemd)."""
        h = self.hosts[name]
        if self.recipe == "static-pod":
            live, aside = h.files.manifests / "etcd.yaml", h.files.manifests / ".etcd.yaml.away"
            live.rename(aside)   # a dotfile: the kubelet stand-in stops the pod
            self._wait_gone(name)
            _scramble(h.files.data_dir)
            aside.rename(live)
        else:
            self.systemctl(name, "stop", h.files.unit)
            self._wait_gone(name)
            _scramble(h.files.data_dir)
            self.systemctl(name, "start", h.files.unit)

    def _wait_gone(self, name: str, timeout: float = 30.0) -> None:
        """Until no etcd process runs on the member's data dir (its port closes before it has let go of its files)."""
        flag = f"--data-dir={self.hosts[name].files.data_dir}".encode()
        deadline = time.monotonic() + timeout
        while any(flag in cmdline.split(b"\0") for cmdline in _cmdlines()):
            if time.monotonic() > deadline:
                raise ClusterError(f"{name}'s etcd did not stop")
            time.sleep(0.05)

    def kill_host(self, name: str) -> None:
        """The host dies: every process in its namespace is killed (sshd, kubelet, etcd) and it stays cut off."""
        h = self.hosts[name]
        for pid in subprocess.run(["ip", "netns", "pids", h.host.netns], capture_output=True, text=True,
                                  timeout=30).stdout.split():
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for other in self.net.addresses(Link.CLIENT):
            if other != name:
                self.net.block(name, other, Link.CLIENT)
        for other in self.net.addresses(Link.PEER):
            if other != name:
                self.net.block(name, other, Link.PEER)

    def rotate_host_key(self, name: str, restart: bool = True) -> str:
        """A new host key (a reinstalled host, or someone in the middle); sshd restarted with it. Returns its
        SHA256 fingerprint. known_hosts is not changed, unless this is the host's first key."""
        h = self.hosts[name]
        first = not h.host_key
        h.host_key = keygen(h.ssh_dir / "ssh_host_ed25519_key", f"root@{name}").rsplit(" ", 1)[0]
        if first:
            self.write_known_hosts()
        if restart and h.sshd is not None:
            h.sshd.terminate()
            h.sshd.wait(10)
            self._start_sshd(h)
        return fingerprint(h.host_key)

    def cut_from_bot(self, name: str) -> None:
        """The bot no longer reaches the host (its packets vanish: a connect costs its whole deadline)."""
        self.net.block(name, BOT, Link.CLIENT)

    def drop_sessions(self, name: str) -> list[int]:
        """Kill every SSH session on the host and all it runs (as a dropped connection or a crash of the node
        program would end them); sshd itself keeps listening. Returns the pids killed."""
        h = self.hosts[name]
        assert h.sshd is not None
        doomed = _descendants(h.sshd.pid)
        for pid in doomed:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return doomed

    def slow_etcdutl(self, name: str, marker: Path, seconds: float = 30.0) -> str:
        """Every host's etcdutl becomes a wrapper that, on host `name` and while `marker` exists, sleeps `seconds`
        before a `snapshot restore` (to cut a restore in the middle). The forced commands name the wrapper, as
        an administrator's would; returns its path, which the launcher's etcdutl must name too."""
        wrapper = self.base / "bin" / "etcdutl"
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(f'#!/bin/sh\ncase "$*" in "snapshot restore "*{self.hosts[name].files.root}/*)\n'
                           f'  if [ -e {marker} ]; then touch {marker}.reached; sleep {seconds}; fi ;;\nesac\n'
                           f'exec {self.etcdutl} "$@"\n')
        wrapper.chmod(0o755)
        for h in self.hosts.values():
            self._authorize(h, str(wrapper))
        return str(wrapper)


def _listening(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((address, port)) == 0


def _scramble(data_dir: Path) -> None:
    """Overwrite the backend's two meta pages with garbage: bbolt refuses to open it, so etcd exits at every
    start (a damaged WAL is not enough: etcd 3.6 sets a torn one aside and may start on what is left)."""
    with open(data_dir / "member" / "snap" / "db", "r+b") as f:
        f.write(os.urandom(2 * 4096))


def _cmdlines() -> list[bytes]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with suppress(OSError):
                found.append((d / "cmdline").read_bytes())
    return found


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found
