"""A real PostgreSQL 15 for tests: Debian's binaries, a temporary data directory,
a free loopback port, a throwaway password.

PostgreSQL refuses to run as root, so as root the directory is handed to the
`postgres` user and every server command runs through `runuser -u postgres --`
(as another user, as that user). `stop()` is fast shutdown, then SIGKILL if it
lingers; `restart()` keeps the port, so URLs handed out stay valid.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bot.runtime.leader import process_alive
from bot.testing.cluster import free_port

PG_BIN = Path(os.environ.get("ETCD_CHATOPS_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "etcd_chatops"                        # the superuser initdb creates
PASSWORD_ENV = "ETCD_CHATOPS_TEST_PG_PASSWORD"  # how bot processes under test get the password
CREATED: list[Path] = []                     # every data directory made (the leftover-process check looks for them)
ISSUED: list[str] = []                       # every password made (the secret check looks for them)


class PostgresMissing(RuntimeError):
    """No PostgreSQL 15 server binaries here."""


class LocalPostgres:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="etcd-chatops-pg-"))
        CREATED.append(self.dir)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.password = secrets.token_hex(16)
        ISSUED.append(self.password)
        self.port = 0
        self._as_postgres = os.geteuid() == 0
        self._databases = 0

    # -- lifecycle ------------------------------------------------------

    def start(self) -> LocalPostgres:
        """initdb (first time), then start and wait until it accepts connections."""
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (PG_BIN / tool).is_file():
                raise PostgresMissing(f"PostgreSQL 15 is not installed: no {PG_BIN / tool}; "
                                      "run `sh scripts/install-postgres.sh` as root (`make test` does), "
                                      "or point ETCD_CHATOPS_PG_BIN at a PostgreSQL 15 bin directory")
        if not self.data.exists():
            self._initdb()
        fixed = bool(self.port)  # a restart keeps its port: URLs handed out stay valid
        for _ in range(1 if fixed else 3):  # a free port may be taken before the server binds it
            self.port = self.port if fixed else free_port()
            options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            proc = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                             "start")
            if proc.returncode == 0:
                return self
        tail = self.log.read_text(errors="replace")[-800:] if self.log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start on port {self.port}: {proc.stdout}{proc.stderr}\n{tail}")

    def _initdb(self) -> None:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            for path in (self.dir, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        proc = self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "-E", "UTF8",
                         "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        pwfile.unlink()
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {proc.stdout[-400:]}{proc.stderr[-800:]}")

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        return subprocess.run([*prefix, str(PG_BIN / tool), *args], capture_output=True, text=True, cwd=self.dir,
                              timeout=120)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Fast shutdown (clients are disconnected); SIGKILL if it does not go within 30 s."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        deadline = time.monotonic() + 5
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(pid):  # the server's processes are its group when pg_ctl made it a session leader
            if _is_group_leader(pid):
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            (self.data / "postmaster.pid").unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop and remove the data directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- databases --------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """A URL without the password (give it as `password`, or PASSWORD_ENV through env())."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        return {PASSWORD_ENV: self.password}

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database (one per test: no state shared); its URL."""
        import psycopg

        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}_{secrets.token_hex(3)}"
        with psycopg.connect(self.url(), password=self.password, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False
