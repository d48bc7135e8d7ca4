"""A systemctl stand-in: start, stop, is-active and daemon-reload of simple units, for the tests.

Nothing here can run systemd, so the systemd recipe of etcd-chatops-node (which writes a drop-in,
reloads, and starts and stops the unit) is tested against this. `write_shim` makes a `systemctl`
executable bound to one unit directory and one state directory; each call reads `<unit>` and its
drop-ins `<unit>.d/*.conf` from the unit directory (the [Service] section's ExecStart=,
Environment= and EnvironmentFile=, drop-ins in file-name order) and keeps what it started under
the state directory, so separate invocations agree. As with systemd, a unit's definition is
loaded once and again only at `daemon-reload`: a drop-in edited without a reload does not count
(`start` warns, as systemctl does). Only what the recipe needs: the service runs as ExecStart in
a fresh session with the unit's environment; `start` returns once it is spawned (with or without
--no-block); `stop` sends SIGTERM, then SIGKILL after TimeoutStopSec (10 s); a service that exited
by itself is `failed`. No dependencies, specifiers, restart policies or journal (the output goes
to <state dir>/<unit>.log).

    python -m bot.testing.systemctl --unit-dir DIR --state-dir DIR start|stop|is-active|daemon-reload [UNIT]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STOP_TIMEOUT = 10.0


class UnitError(RuntimeError):
    pass


@dataclass(frozen=True)
class Definition:
    """A unit as loaded: what `start` runs."""

    argv: list[str]
    env: dict[str, str]
    digest: str          # of the files it was loaded from, to tell that they changed since


def unit_files(unit_dir: Path, unit: str) -> list[Path]:
    path = unit_dir / unit
    if not path.is_file():
        raise UnitError(f"Unit {unit} not found.")
    return [path, *sorted((unit_dir / f"{unit}.d").glob("*.conf"), key=lambda p: p.name)]


def service_entries(path: Path) -> list[tuple[str, str]]:
    """The [Service] section's key=value entries, continuation lines joined."""
    out: list[tuple[str, str]] = []
    section, pending = "", ""
    for raw in path.read_text().splitlines():
        line = (pending + " " + raw.strip()) if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            out.append((key.strip(), value.strip()))
    return out


def load(unit_dir: Path, unit: str) -> Definition:
    files = unit_files(unit_dir, unit)
    env: dict[str, str] = {}
    env_files: list[str] = []
    argv: list[str] = []
    for path in files:
        for key, value in service_entries(path):
            if key == "Environment":
                if not value:
                    env = {}
                for word in shlex.split(value):
                    if "=" in word:
                        k, v = word.split("=", 1)
                        env[k] = v
            elif key == "EnvironmentFile":
                env_files = [*env_files, value] if value else []
            elif key == "ExecStart":
                argv = shlex.split(value.lstrip("@-:+!")) if value else []
    for name in env_files:
        path = Path(name.lstrip("-"))
        if not path.is_file():
            if name.startswith("-"):
                continue
            raise UnitError(f"{unit}: EnvironmentFile {path} not found")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and line[0] not in "#;" and "=" in line:
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip().strip("\"'")
    if not argv:
        raise UnitError(f"{unit} has no ExecStart=")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    return Definition(argv, env, digest)


class Systemctl:
    """The units of one unit directory, with their state under `state_dir`."""

    def __init__(self, unit_dir: Path, state_dir: Path):
        self.unit_dir, self.state_dir = unit_dir, state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def _file(self, unit: str, suffix: str) -> Path:
        return self.state_dir / f"{unit}.{suffix}"

    def definition(self, unit: str) -> Definition:
        """The loaded definition (loaded now if it never was: systemd loads units at boot)."""
        saved = self._file(unit, "loaded.json")
        if saved.is_file():
            return Definition(**json.loads(saved.read_text()))
        return self.reload_unit(unit)

    def reload_unit(self, unit: str) -> Definition:
        d = load(self.unit_dir, unit)
        self._file(unit, "loaded.json").write_text(json.dumps(asdict(d)))
        return d

    def daemon_reload(self) -> None:
        for path in sorted(self.unit_dir.glob("*.service")):
            self.reload_unit(path.name)

    def pid(self, unit: str) -> tuple[int, bool] | None:
        """The service's main pid and whether it still runs, or None when it was never started or stopped."""
        try:
            pid, started = json.loads(self._file(unit, "pid").read_text())
        except (OSError, ValueError):
            return None
        return pid, _start_time(pid) == started

    def is_active(self, unit: str) -> str:
        state = self.pid(unit)
        if state is None:
            return "inactive"
        return "active" if state[1] else "failed"

    def start(self, unit: str) -> None:
        if self.is_active(unit) == "active":
            return
        d = self.definition(unit)
        if load(self.unit_dir, unit).digest != d.digest:
            print(f"Warning: The unit file, source configuration file or drop-ins of {unit} changed on disk. "
                  "Run 'systemctl daemon-reload' to reload units.", file=sys.stderr)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **d.env}
        with open(self._file(unit, "log"), "ab") as log:
            proc = subprocess.Popen(d.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, cwd="/")
        self._file(unit, "pid").write_text(json.dumps([proc.pid, _start_time(proc.pid)]))

    def stop(self, unit: str) -> None:
        state = self.pid(unit)
        if state is not None and state[1]:
            pid = state[0]
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while _start_time(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            if _start_time(pid) is not None:
                os.kill(pid, signal.SIGKILL)
                while _start_time(pid) is not None:
                    time.sleep(0.02)
        self._file(unit, "pid").unlink(missing_ok=True)

    def kill_all(self) -> None:
        """Teardown: SIGKILL every service still running."""
        for path in self.state_dir.glob("*.pid"):
            unit = path.name[: -len(".pid")]
            state = self.pid(unit)
            if state is not None and state[1]:
                os.kill(state[0], signal.SIGKILL)
            path.unlink(missing_ok=True)


def _start_time(pid: int) -> int | None:
    """The process's start time (guards against pid reuse); None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in "ZX":
        _reap(pid)
        return None
    return int(fields[19])


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def write_shim(path: Path, unit_dir: Path, state_dir: Path) -> Path:
    """A `systemctl` executable at `path` that runs this stand-in on `unit_dir` and `state_dir`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n# systemctl stand-in (bot/testing/systemctl.py)\nexec "
                    + shlex.join([sys.executable, "-m", "bot.testing.systemctl", "--unit-dir", str(unit_dir),
                                  "--state-dir", str(state_dir)]) + ' "$@"\n')
    path.chmod(0o755)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="systemctl", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--unit-dir", required=True, type=Path)
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--no-block", action="store_true", help="accepted; start never blocks here")
    p.add_argument("command", choices=("start", "stop", "is-active", "daemon-reload"))
    p.add_argument("unit", nargs="?")
    args = p.parse_intermixed_args(argv)
    s = Systemctl(args.unit_dir, args.state_dir)
    if args.command == "daemon-reload":
        s.daemon_reload()
        return 0
    if not args.unit:
        print(f"systemctl {args.command}: a unit is required", file=sys.stderr)
        return 2
    try:
        if args.command == "is-active":
            state = s.is_active(args.unit)
            print(state)
            return 0 if state == "active" else 3
        if args.command == "start":
            s.start(args.unit)
        else:
            s.stop(args.unit)
    except UnitError as e:
        print(f"Failed to {args.command} {args.unit}: {e}", file=sys.stderr)
        return 5
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
