"""A fake Slack workspace around a local cluster: people, a channel, the bot's
config and the bot as a process. Shared by the demo and the tests, so both
exercise the product the way a real installation runs it.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.testing.cluster import LocalCluster, free_port, log_tail

CHANNEL = "C0INCIDENT"
CHANNELS = {CHANNEL: "inc-etcd", "C0ELSEWHERE": "random"}
ONCALL, LEAD, LEAD2, STRANGER = "U0ONCALL01", "U0LEAD0001", "U0LEAD0002", "U0STRANGER"
USERS = {
    ONCALL: {"name": "alice", "real_name": "Alice (on-call)"},
    LEAD: {"name": "bob", "real_name": "Bob (on-call lead)"},
    LEAD2: {"name": "carol", "real_name": "Carol (secondary lead)"},
    STRANGER: {"name": "mallory", "real_name": "Mallory (not on call)"},
}
LEADS_GROUP = "S0ONCALLLD"
USERGROUPS = {LEADS_GROUP: [LEAD2]}


# Every credential issued in this process, so tests can prove none leaked.
ISSUED: list[str] = []


@dataclass(frozen=True)
class SlackSecrets:
    """Throw-away credentials: random each run, never printed."""

    bot_token: str = field(default_factory=lambda: "xoxb-test-" + secrets.token_hex(12), repr=False)
    signing_secret: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    app_token: str = field(default_factory=lambda: "xapp-test-" + secrets.token_hex(12), repr=False)

    def __post_init__(self) -> None:
        ISSUED.extend(self.all())

    def all(self) -> list[str]:
        return [self.bot_token, self.signing_secret, self.app_token]


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for our config: scalars, lists of scalars, tables, arrays of tables."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    def table(prefix: str, d: dict[str, Any], out: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not _is_table(v) and not _is_table_array(v)}
        for k, v in scalars.items():
            out.append(f"{k} = {value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if _is_table(v):
                out.append(f"\n[{name}]")
                table(name, v, out)
            elif _is_table_array(v):
                for item in v:
                    out.append(f"\n[[{name}]]")
                    table(name, item, out)

    lines: list[str] = []
    table("", data, lines)
    return "\n".join(lines).lstrip() + "\n"


def _is_table(v: Any) -> bool:
    return isinstance(v, dict)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def launcher_argv(cluster_base_dir: Path) -> list[str]:
    """A `command` launcher with actions (start, stop, restore) for a real etcd member in the cluster's directory."""
    return [sys.executable, "-m", "bot.testing.start_member", "--base-dir", str(cluster_base_dir), "--name", "{name}",
            "--action", "{action}"]


def cluster_table(name: str, cluster: LocalCluster, *, channels: tuple[str, ...] = (CHANNEL,),
                  **extra: Any) -> dict[str, Any]:
    """A [[clusters]] entry for a LocalCluster, with the command launcher."""
    table: dict[str, Any] = {"name": name, "endpoints": cluster.all_endpoints, "channels": list(channels),
                             "launcher": {"kind": "command", "argv": launcher_argv(cluster.base_dir),
                                          "timeout_seconds": 60},
                             # no kube-apiserver uses a test cluster: the tests of that restore step ask for it
                             "restore": {"data_dir": str(cluster.base_dir / "data" / "{name}"), "apiserver": "none"},
                             "watch": {"enabled": False}}  # it posts on its own: the tests about it turn it on
    if cluster.tls:
        table.update(cacert=cluster.tls.ca, cert=cluster.tls.client_cert, key=cluster.tls.client_key)
    if cluster.user:
        table.update(username=cluster.user[0], password_file=str(cluster.password_file))
    table.update(extra)
    return table


def write_config(directory: Path, clusters: list[dict[str, Any]], **top: Any) -> Path:
    data: dict[str, Any] = {"database": str(directory / "etcd-chatops.db"),
                            "snapshot_dir": str(directory / "snapshots"),
                            "approval": {"approvers": [LEAD], "approver_groups": [LEADS_GROUP], "ttl_minutes": 30,
                                         "reaction": "white_check_mark", "reject_reaction": "x"}}
    data.update(top)
    data["clusters"] = clusters
    path = directory / "config.toml"
    path.write_text(to_toml(data))
    return path


class BotProcess:
    """`etcd-chatops run --http` as a real process, as it runs in production."""

    def __init__(self, config: Path, api_url: str, creds: SlackSecrets, log_file: Path, port: int | None = None,
                 env: dict[str, str] | None = None):
        self.config, self.api_url, self.creds, self.log_file = config, api_url, creds, log_file
        self.port = port or free_port()
        self.env = env or {}  # e.g. the database's password variable
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = [sys.executable, "-m", "bot", "run", "--http", "--host", "127.0.0.1",
                                "--port", str(self.port), "--config", str(config)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/slack/events"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> BotProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLACK_")}
        env.update(SLACK_BOT_TOKEN=self.creds.bot_token, SLACK_SIGNING_SECRET=self.creds.signing_secret,
                   SLACK_API_URL=self.api_url, **self.env)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the bot exited with {self.proc.returncode}:\n{log_tail(self.log_file)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the bot did not answer /healthz within {timeout:g}s:\n{log_tail(self.log_file)}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the bot dies mid-work, as in a node failure."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        self._signal(signal.SIGTERM, timeout)

    def _signal(self, sig: int, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
