"""A kubelet stand-in: runs static pod manifests as plain processes, for the tests.

Nothing here can run a real kubelet, so the static-pod recipe of etcd-chatops-node (which moves
etcd.yaml and kube-apiserver.yaml out of the manifests directory and back) is tested against
this. Like the kubelet it watches one manifests directory (dotfiles ignored) and, for each
manifest there, runs the pod's container `command` + `args` as a process: when the file leaves
the directory the process is stopped (SIGTERM, then SIGKILL after the grace period), when the
file's bytes change it is stopped and started again, and when it exits it is started again after
a back-off (restartPolicy Always). hostPath volumes are the same paths on this machine, so a
volume is never mounted: a mount must name its hostPath's own path (else the pod is refused,
as a layout the stand-in cannot honour), and a `DirectoryOrCreate` path is created, as the
kubelet does. Only what the recipes need: one container per pod, `env` values, no images,
probes or resources.

    python -m bot.testing.kubelet --manifests DIR --logs DIR

Each pod logs to DIR/<manifest name>.log. The pods die with the stand-in (SIGTERM stops them;
SIGKILL of the stand-in kills them through PR_SET_PDEATHSIG), so a test leaves nothing behind.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

POLL_SECONDS = 0.1
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0)   # between restarts of a pod whose process exited
PR_SET_PDEATHSIG = 1


class PodRefused(ValueError):
    """A manifest the stand-in cannot run (the reason is logged to the pod's log)."""


@dataclass
class Pod:
    manifest: Path
    digest: str
    argv: list[str] | None          # None: refused (see the log)
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    exits: int = 0
    next_start: float = 0.0


def pod_command(doc: Any) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a static pod's one container; hostPath directories created."""
    if not isinstance(doc, dict) or doc.get("kind") != "Pod":
        raise PodRefused("not a Pod")
    spec = doc.get("spec") or {}
    containers = spec.get("containers") or []
    if len(containers) != 1:
        raise PodRefused(f"{len(containers)} containers: the stand-in runs pods of one container")
    container = containers[0]
    argv = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    if not argv:
        raise PodRefused("the container has no command")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        host_path = (volumes.get(mount.get("name")) or {}).get("hostPath") or {}
        path = host_path.get("path")
        if path is None:
            raise PodRefused(f"volumeMount {mount.get('name')!r} is not a hostPath volume")
        if mount.get("mountPath") != path:
            raise PodRefused(f"volumeMount {mount.get('name')!r}: mountPath {mount.get('mountPath')} is not its "
                             f"hostPath {path} (the stand-in does not mount)")
        if host_path.get("type") == "DirectoryOrCreate":
            Path(path).mkdir(mode=0o755, parents=True, exist_ok=True)
    env = {str(e["name"]): str(e.get("value", "")) for e in container.get("env") or []}
    return argv, env


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Kubelet:
    """The watch loop; `run()` until `stop()` (or SIGTERM in the process form)."""

    def __init__(self, manifests: Path, logs: Path, grace: float = 10.0):
        self.manifests, self.logs, self.grace = manifests, logs, grace
        self.pods: dict[Path, Pod] = {}
        self.stopping = False

    def run(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            while not self.stopping:
                self.sync()
                time.sleep(POLL_SECONDS)
        finally:
            for path in list(self.pods):
                self._stop(self.pods.pop(path))

    def stop(self) -> None:
        self.stopping = True

    def sync(self) -> None:
        """One pass: stop pods whose file left or changed, start new ones, restart exited ones."""
        seen: dict[Path, bytes] = {}
        if self.manifests.is_dir():
            for p in sorted(self.manifests.iterdir()):
                if p.name.startswith(".") or not p.is_file():
                    continue
                try:
                    seen[p] = p.read_bytes()
                except OSError:
                    continue   # moved away between listing and reading
        for path in [p for p in self.pods if p not in seen]:
            self._stop(self.pods.pop(path))
        now = time.monotonic()
        for path, data in seen.items():
            digest = hashlib.sha256(data).hexdigest()
            pod = self.pods.get(path)
            if pod is None or pod.digest != digest:
                if pod is not None:
                    self._stop(pod)
                pod = self.pods[path] = self._pod(path, data, digest)
            if pod.argv is None:
                continue
            if pod.proc is not None and pod.proc.poll() is not None:
                pod.exits += 1
                self._note(pod, f"exited with status {pod.proc.returncode}")
                pod.proc = None
                pod.next_start = now + BACKOFF_SECONDS[min(pod.exits, len(BACKOFF_SECONDS)) - 1]
            if pod.proc is None and now >= pod.next_start:
                self._start(pod)

    def _pod(self, path: Path, data: bytes, digest: str) -> Pod:
        log = self.logs / f"{path.name}.log"
        try:
            argv, env = pod_command(yaml.safe_load(data))
        except (yaml.YAMLError, PodRefused, OSError) as e:
            pod = Pod(path, digest, None, {}, log)
            self._note(pod, f"refused: {e}")
            return pod
        return Pod(path, digest, argv, env, log)

    def _start(self, pod: Pod) -> None:
        assert pod.argv is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **pod.env}
        with open(pod.log, "ab") as log:
            try:
                pod.proc = subprocess.Popen(pod.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as e:
                pod.exits += 1
                pod.next_start = time.monotonic() + BACKOFF_SECONDS[-1]
                self._note(pod, f"cannot start {pod.argv[0]}: {e}")
                return
        self._note(pod, f"started pid {pod.proc.pid}")

    def _stop(self, pod: Pod) -> None:
        proc, pod.proc = pod.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._note(pod, f"stopped pid {proc.pid} (status {proc.returncode})")

    @staticmethod
    def _note(pod: Pod, text: str) -> None:
        with open(pod.log, "a") as log:
            log.write(f"--- kubelet stand-in: {pod.manifest.name}: {text}\n")


@contextmanager
def kubelet(manifests: Path, logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The stand-in as a process of its own (as the real kubelet is), stopped with its pods on exit."""
    proc = subprocess.Popen([sys.executable, "-m", "bot.testing.kubelet", "--manifests", str(manifests),
                             "--logs", str(logs)], stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kubelet-stand-in", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--manifests", required=True, type=Path, help="the static pod manifests directory")
    p.add_argument("--logs", required=True, type=Path, help="where each pod's output goes")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    args = p.parse_args(argv)
    k = Kubelet(args.manifests, args.logs, args.grace)
    signal.signal(signal.SIGTERM, lambda *_: k.stop())
    signal.signal(signal.SIGINT, lambda *_: k.stop())
    k.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
