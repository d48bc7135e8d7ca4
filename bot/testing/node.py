"""etcd-chatops-node for the tests: its build, and control-plane hosts laid out in directories.

The node program (deploy/node, Go) is built once per change of its sources into build/node/
(`python -m bot.testing.node` prints the binary's path; `make test` runs it). A `NodeHost` is one
control-plane host's files under a directory of its own (its /etc/kubernetes, /etc/systemd/system,
/var/lib), with the node program's configuration flags pointing there, so several hosts share
this machine; kubeadm-style static pod manifests and systemd units for its etcd member are
written by `write_static_pod` and `write_unit`.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.etcd.binaries import find_binary
from bot.testing import certs
from bot.testing.cluster import TLSPaths, distinct_free_ports, http_get, tls_member_args
from bot.testing.kubelet import kubelet
from bot.testing.systemctl import Systemctl, write_shim

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "deploy" / "node"
BUILD = ROOT / "build" / "node"
BINARY = BUILD / "etcd-chatops-node"
GO_BUILD = ("build", "-trimpath", "-ldflags=-s -w")   # static (CGO_ENABLED=0), no debug symbols


class NodeBuildError(RuntimeError):
    pass


def _sources_digest() -> str:
    h = hashlib.sha256(" ".join(GO_BUILD).encode())
    for p in sorted([*SOURCE.glob("*.go"), SOURCE / "go.mod", SOURCE / "go.sum"]):
        if not p.name.endswith("_test.go"):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def node_binary() -> Path:
    """The static binary built from deploy/node's current sources (built only when they changed)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    digest = _sources_digest()
    stamp = BUILD / "sources.sha256"
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # two test runs at once build once
        if BINARY.is_file() and stamp.is_file() and stamp.read_text() == digest:
            return BINARY
        go = shutil.which("go")
        if go is None:
            raise NodeBuildError("Go (1.22 or newer) is needed to build deploy/node (etcd-chatops-node)")
        tmp = BUILD / "etcd-chatops-node.tmp"
        proc = subprocess.run([go, *GO_BUILD, "-o", str(tmp), "."], cwd=SOURCE, capture_output=True,
                              text=True, env={**os.environ, "CGO_ENABLED": "0"}, timeout=600)
        if proc.returncode != 0:
            raise NodeBuildError(f"go build in deploy/node failed:\n{proc.stderr[-3000:]}")
        tmp.replace(BINARY)
        stamp.write_text(digest)
    return BINARY


@dataclass(frozen=True)
class Answer:
    """One run of the node program: its exit status and its one JSON line."""

    status: int
    json: dict[str, Any]
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.json.get("ok") is True


@dataclass(frozen=True)
class NodeHost:
    """One control-plane host's files under `root` (its /etc and /var/lib)."""

    root: Path
    recipe: str                 # "static-pod" | "systemd"
    unit: str = "etcd.service"

    @property
    def manifests(self) -> Path:
        return self.root / "etc" / "kubernetes" / "manifests"

    @property
    def holding(self) -> Path:
        return self.root / "etc" / "kubernetes" / "etcd-chatops-held"

    @property
    def unit_dir(self) -> Path:
        return self.root / "etc" / "systemd" / "system"

    @property
    def data_root(self) -> Path:
        return self.root / "var" / "lib"

    @property
    def data_dir(self) -> Path:
        return self.data_root / "etcd"

    @property
    def state_dir(self) -> Path:
        return self.data_root / "etcd-chatops-node"

    @property
    def snapshot_dir(self) -> Path:
        return self.state_dir / "snapshots"

    @property
    def systemctl(self) -> Path:
        return self.root / "bin" / "systemctl"

    @property
    def systemctl_state(self) -> Path:
        return self.root / "run" / "systemctl"

    @property
    def logs(self) -> Path:
        return self.root / "var" / "log"

    def config_args(self, etcdutl: str) -> list[str]:
        """The node program's configuration for this host (what its forced command would fix)."""
        args = ["--recipe", self.recipe, "--state-dir", str(self.state_dir), "--data-root", str(self.data_root),
                "--etcdutl", etcdutl]
        if self.recipe == "static-pod":
            return args + ["--manifests-dir", str(self.manifests), "--holding-dir", str(self.holding)]
        if not self.systemctl.exists():
            write_shim(self.systemctl, self.unit_dir, self.systemctl_state)
        return args + ["--unit", self.unit, "--unit-dir", str(self.unit_dir), "--systemctl", str(self.systemctl)]


def run_node(argv: list[str], *, stdin: bytes | None = None, env: dict[str, str] | None = None,
             timeout: float = 180.0) -> Answer:
    """Run the node program (`argv` includes the binary); its stdout must be exactly one JSON line."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    proc = subprocess.run(argv, input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout,
                          env={**base, **(env or {})})
    out = proc.stdout.decode()
    lines = out.splitlines()
    if len(lines) != 1:
        raise AssertionError(f"the node program printed {len(lines)} lines (exit {proc.returncode}): {out!r} "
                             f"stderr {proc.stderr.decode()[-2000:]!r}")
    return Answer(proc.returncode, json.loads(lines[0]), out, proc.stderr.decode())


# ---------------------------------------------------------------- what a host runs

def etcd_flags(*, name: str, data_dir: Path, client_url: str, peer_url: str, initial_cluster: str, token: str,
               metrics_url: str | None, tls: TLSPaths | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """kubeadm's etcd flags, on this machine's ports, plus short timeouts for the tests."""
    flags = [*as_flags(tls_member_args(tls) if tls else []), f"--advertise-client-urls={client_url}",
             f"--data-dir={data_dir}",
             "--election-timeout=1000", "--heartbeat-interval=100",
             f"--initial-advertise-peer-urls={peer_url}", f"--initial-cluster={initial_cluster}",
             f"--initial-cluster-token={token}", f"--listen-client-urls={client_url}"]
    if metrics_url:
        flags.append(f"--listen-metrics-urls={metrics_url}")
    return flags + [f"--listen-peer-urls={peer_url}", "--log-level=warn", "--logger=zap", f"--name={name}",
                    "--snapshot-count=10000", *extra]


def write_static_pod(host: NodeHost, etcd: str, flags: list[str]) -> tuple[Path, Path]:
    """etcd.yaml as kubeadm writes it (the command's binary an absolute path here, the hostPath the
    host's data dir) and a kube-apiserver.yaml whose container is a long-running stand-in process."""
    host.manifests.mkdir(parents=True, exist_ok=True)
    client = next(f.split("=", 1)[1] for f in flags if f.startswith("--advertise-client-urls="))
    command = "".join(f"    - {f}\n" for f in [etcd, *flags])
    etcd_yaml = host.manifests / "etcd.yaml"
    etcd_yaml.write_text(f"""apiVersion: v1
kind: Pod
metadata:
  annotations:
    kubeadm.kubernetes.io/etcd.advertise-client-urls: {client}
  creationTimestamp: null
  labels:
    component: etcd
    tier: control-plane
  name: etcd
  namespace: kube-system
spec:
  containers:
  - command:
{command}    image: registry.k8s.io/etcd:3.5.15-0
    imagePullPolicy: IfNotPresent
    name: etcd
    resources:
      requests:
        cpu: 100m
        memory: 100Mi
    volumeMounts:
    - mountPath: {host.data_dir}
      name: etcd-data
  hostNetwork: true
  priority: 2000001000
  priorityClassName: system-node-critical
  securityContext:
    seccompProfile:
      type: RuntimeDefault
  volumes:
  - hostPath:
      path: {host.data_dir}
      type: DirectoryOrCreate
    name: etcd-data
status: {{}}
""")
    etcd_yaml.chmod(0o600)
    apiserver = host.manifests / "kube-apiserver.yaml"
    apiserver.write_text(f"""apiVersion: v1
kind: Pod
metadata:
  labels:
    component: kube-apiserver
    tier: control-plane
  name: kube-apiserver
  namespace: kube-system
spec:
  containers:
  - command:
    - {sys.executable}
    - -c
    - import signal; signal.pause()
    - kube-apiserver-stand-in
    - {host.root}
    name: kube-apiserver
  hostNetwork: true
""")
    return etcd_yaml, apiserver


def write_unit(host: NodeHost, etcd: str, env: dict[str, str]) -> Path:
    """An etcd unit as external-etcd guides write it: ExecStart the binary, parameters as ETCD_* variables."""
    host.unit_dir.mkdir(parents=True, exist_ok=True)
    unit = host.unit_dir / host.unit
    lines = "".join(f'Environment="{k}={v}"\n' for k, v in env.items())
    unit.write_text(f"""[Unit]
Description=etcd key-value store
After=network-online.target

[Service]
Type=notify
{lines}ExecStart={etcd}
Restart=on-failure
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
""")
    return unit


def as_flags(args: list[str]) -> list[str]:
    """`--flag value` and bare `--switch` arguments written as kubeadm writes them: --flag=value, --switch=true."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "true"
        out.append(f"{arg}={value}")
    return out


def flag_environment(flags: list[str]) -> dict[str, str]:
    """etcd's flags as its ETCD_* variables (--data-dir=x → ETCD_DATA_DIR=x)."""
    env = {}
    for f in flags:
        name, value = f.removeprefix("--").split("=", 1)
        env["ETCD_" + name.upper().replace("-", "_")] = value
    return env


# ---------------------------------------------------------------- a cluster on the stand-ins

@dataclass(frozen=True)
class StandInMember:
    name: str
    host: NodeHost
    client_url: str
    peer_url: str
    metrics_url: str | None


class StandInCluster:
    """Real etcd members, each on a NodeHost of its own and run by a stand-in: the kubelet stand-in
    (static-pod) or the systemctl stand-in (systemd), on loopback ports picked at run time.
    Close it (or use it as a context manager) to stop every process, also after a failure."""

    def __init__(self, base: Path, recipe: str, size: int = 3, *, metrics: bool = True, tls: bool = False,
                 extra_flags: tuple[str, ...] = ()):
        """`tls`: mutual TLS on client and peer URLs, as kubeadm sets them up; `extra_flags`: more etcd
        flags (--name=value) for every member."""
        self.base, self.recipe, self.metrics, self.extra_flags = base, recipe, metrics, extra_flags
        self.tls: TLSPaths | None = None
        if tls:
            files = certs.generate(base / "pki")
            self.tls = TLSPaths(ca=str(files.ca), server_cert=str(files.server_cert),
                                server_key=str(files.server_key), client_cert=str(files.client_cert),
                                client_key=str(files.client_key))
        self.scheme = "https" if tls else "http"
        self.etcd = str(find_binary("etcd"))
        self.etcdctl_bin = str(find_binary("etcdctl"))
        self.etcdutl = str(find_binary("etcdutl"))
        self.binary = node_binary()
        self.token = "etcd-chatops-" + secrets.token_hex(6)
        self.hosts: dict[str, NodeHost] = {}
        self.members: dict[str, StandInMember] = {}
        self._stack = ExitStack()
        self._planned = [f"m{i}" for i in range(1, size + 1)]

    def __enter__(self) -> StandInCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, name: str) -> NodeHost:
        """The host for member `name` (made, with its kubelet stand-in running, on first use)."""
        if name not in self.hosts:
            host = NodeHost(self.base / f"host-{name}", self.recipe)
            host.data_root.mkdir(parents=True, exist_ok=True)
            host.config_args(self.etcdutl)   # writes the systemctl shim
            if self.recipe == "static-pod":
                host.manifests.mkdir(parents=True, exist_ok=True)
                self._stack.enter_context(kubelet(host.manifests, host.logs))
            self.hosts[name] = host
        return self.hosts[name]

    def plan_member(self, name: str) -> StandInMember:
        client, peer, metrics = distinct_free_ports(3)
        m = StandInMember(name, self.host(name), f"{self.scheme}://127.0.0.1:{client}",
                          f"{self.scheme}://127.0.0.1:{peer}", f"http://127.0.0.1:{metrics}" if self.metrics else None)
        self.members[name] = m
        return m

    def flags(self, m: StandInMember, initial_cluster: str) -> list[str]:
        return etcd_flags(name=m.name, data_dir=m.host.data_dir, client_url=m.client_url, peer_url=m.peer_url,
                          initial_cluster=initial_cluster, token=self.token, metrics_url=m.metrics_url,
                          tls=self.tls, extra=self.extra_flags)

    def start(self, timeout: float = 60.0) -> StandInCluster:
        """Bootstrap the planned members as `kubeadm init`/`join` or an operator's first
        `systemctl start` would, and wait until every one is healthy."""
        members = [self.plan_member(n) for n in self._planned]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        for m in members:
            if self.recipe == "static-pod":
                write_static_pod(m.host, self.etcd, self.flags(m, initial))
            else:
                write_unit(m.host, self.etcd, flag_environment(self.flags(m, initial)))
                subprocess.run([str(m.host.systemctl), "start", m.host.unit], check=True, timeout=60)
        self.wait_healthy([m.name for m in members], timeout)
        return self

    def close(self) -> None:
        self._stack.close()   # kubelet stand-ins stop their pods
        for host in self.hosts.values():
            if host.recipe == "systemd" and host.systemctl_state.is_dir():
                Systemctl(host.unit_dir, host.systemctl_state).kill_all()

    def node(self, name: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> Answer:
        """Run the node program on member `name`'s host."""
        return run_node([str(self.binary), *self.host(name).config_args(self.etcdutl), *args], stdin=stdin, env=env)

    def etcdctl(self, *args: str, endpoints: list[str] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        eps = endpoints or [m.client_url for m in self.members.values()]
        tls = [f"--cacert={self.tls.ca}", f"--cert={self.tls.client_cert}",
               f"--key={self.tls.client_key}"] if self.tls else []
        proc = subprocess.run([self.etcdctl_bin, f"--endpoints={','.join(eps)}", "--dial-timeout=2s",
                               "--command-timeout=10s", *tls, *args], capture_output=True, text=True, timeout=60,
                              env={"PATH": os.environ.get("PATH", ""), "ETCDCTL_API": "3"})
        if check and proc.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def healthy(self, name: str) -> bool:
        return b'"true"' in (http_get(self.members[name].client_url + "/health", self.tls) or b"")

    def wait_healthy(self, names: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.healthy(n) for n in names):
            if time.monotonic() > deadline:
                sick = [n for n in names if not self.healthy(n)]
                raise AssertionError(f"members {sick} not healthy after {timeout:g}s")
            time.sleep(0.05)


def main() -> int:
    try:
        print(node_binary())
    except NodeBuildError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
