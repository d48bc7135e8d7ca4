"""A real Prometheus and a real Alertmanager for tests: Debian's `prometheus` 2.42 and
`prometheus-alertmanager` 0.25 (`scripts/install-prometheus.sh`; `make test` runs it), each
started on a free loopback port with its own temporary data directory and a configuration
written here. Nothing is a stand-in: the same binaries, rule evaluation, notification
pipeline and webhook delivery an operator runs.

- `LocalPrometheus` scrapes its jobs' `/metrics` over plain HTTP, their targets set at any time
  through a file (`scrape(job, members(cluster), {"cluster": "prod"})`: every member's client
  URL, dead ones too, so they show as `up == 0`), evaluates rule files and sends alerts to an
  Alertmanager, scraping and evaluating every second. Prometheus applies new targets only at
  its service discovery's tick, every 5 s: start it first, then what it scrapes.
- `LocalAlertmanager` routes alerts (those matching its matchers, or all) to one webhook
  receiver, as deploy/prometheus/alertmanager-example.yml does for the bot: `send_resolved:
  true`, a bearer token read from a file (`http_config.authorization.credentials_file`), short
  group_wait/interval/repeat; `retarget` points it at a bot started later (a reload).
- `rules_with_for` writes a variant of a rule file with every `for:` shortened, so a test sees
  a rule fire in seconds with its expression and thresholds untouched.

Both are context managers and always stopped (SIGTERM, then SIGKILL); their directories are
in `CREATED`, which the suite's leftover-process check searches command lines for, and the
webhook tokens in `ISSUED`, which the secret check looks for in logs and messages.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from bot.testing.cluster import LocalCluster, free_port, log_tail

BIN = Path(os.environ.get("ETCD_CHATOPS_PROMETHEUS_BIN", "/usr/bin"))
PROMETHEUS, PROMTOOL = BIN / "prometheus", BIN / "promtool"
ALERTMANAGER, AMTOOL = BIN / "prometheus-alertmanager", BIN / "amtool"
START_TIMEOUT = 30.0
QUERY_TIMEOUT = 2.0   # the deadline of one API call
CREATED: list[Path] = []   # every directory a server ran in (the leftover-process check looks for them)
ISSUED: list[str] = []     # every webhook token made (the secret check looks for them)


class PrometheusMissing(RuntimeError):
    """Debian's prometheus or prometheus-alertmanager is not installed here."""


def tool(path: Path) -> Path:
    """`path` when it is an executable, else PrometheusMissing saying how to install it."""
    if not os.access(path, os.X_OK):
        raise PrometheusMissing(f"{path} is not installed: run `sh scripts/install-prometheus.sh` as root "
                                "(`make test` does), or point ETCD_CHATOPS_PROMETHEUS_BIN at a directory holding "
                                "prometheus, promtool, prometheus-alertmanager and amtool")
    return path


def run_tool(path: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run promtool or amtool; the result, whatever its exit status."""
    return subprocess.run([str(tool(path)), *args], capture_output=True, text=True, timeout=timeout)


def rules_with_for(source: Path, duration: str, dest: Path) -> Path:
    """`source`'s rules with every `for:` set to `duration` (a Prometheus duration, e.g. "1s"),
    written to `dest` (JSON is YAML): the same expressions, firing in seconds."""
    import yaml  # (the test extra's PyYAML; only tests need this)

    doc = yaml.safe_load(source.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = duration
    dest.write_text(json.dumps(doc, indent=1))
    return dest


def members(cluster: LocalCluster) -> list[str]:
    """Every member's client address (host:port), running or not: a dead one shows as `up == 0`."""
    return [url.split("://", 1)[1] for url in cluster.all_endpoints]


@dataclass(frozen=True)
class Alert:
    """An alert as either API shows it: Prometheus's `state` is pending or firing, Alertmanager's
    active, suppressed or unprocessed (its `fingerprint` is empty on Prometheus's side)."""

    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    state: str
    fingerprint: str = ""


class _Server:
    """A Prometheus-family server in its own directory on a free loopback port."""

    binary: Path
    what: str

    def __init__(self, base_dir: Path | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"etcd-chatops-{self.what}-", dir=base_dir))
        CREATED.append(self.dir)
        self.log = self.dir / f"{self.what}.log"
        self.port = 0
        self.started_in = 0.0   # seconds from spawning the process to /-/ready
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """The command line for `self.port`, its configuration written."""
        raise NotImplementedError

    def start(self, timeout: float = START_TIMEOUT) -> _Server:
        """Start and wait until /-/ready answers 200; a port taken meanwhile is tried again (3 times)."""
        tool(self.binary)
        for attempt in range(3):
            self.port = free_port()
            began = time.monotonic()
            with open(self.log, "ab") as log:
                self._proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True,
                                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
            if self._wait_ready(began + timeout):
                self.started_in = time.monotonic() - began
                return self
            self.stop()
            if attempt == 2 or "address already in use" not in log_tail(self.log):
                break
        raise RuntimeError(f"{self.what} did not become ready on {self.url} within {timeout:g}s:\n"
                           f"{log_tail(self.log)}")

    def _wait_ready(self, deadline: float) -> bool:
        while self._proc is not None and self._proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as r:
                    if r.status == 200:
                        return True
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL when it lingers past `timeout`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)

    def close(self) -> None:
        """Stop and remove the directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _write(self, name: str, doc: Mapping[str, Any]) -> Path:
        path = self.dir / name
        path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
        return path

    async def _get(self, path: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=QUERY_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http, http.get(self.url + path) as r:
            r.raise_for_status()
            return await r.json()


class LocalAlertmanager(_Server):
    """Alertmanager routing the alerts that match `matchers` (all without) to one webhook
    (`webhook_url`) with a bearer token of its own (`token`, also in `token_file`), the others
    nowhere. Gossip clustering is off: nothing listens beyond its one port."""

    binary, what = ALERTMANAGER, "alertmanager"

    def __init__(self, webhook_url: str, *, matchers: Sequence[str] = (),
                 group_by: Sequence[str] = ("alertname", "cluster"), group_wait: str = "1s",
                 group_interval: str = "1s", repeat_interval: str = "1m", base_dir: Path | None = None) -> None:
        super().__init__(base_dir)
        self.webhook_url = webhook_url
        self.token = secrets.token_urlsafe(24)
        ISSUED.append(self.token)
        self.token_file = self.dir / "webhook-token"
        self.token_file.write_text(self.token + "\n")  # Alertmanager trims the trailing newline
        self.token_file.chmod(0o600)
        timing = {"group_by": list(group_by), "group_wait": group_wait, "group_interval": group_interval,
                  "repeat_interval": repeat_interval}
        self.route: dict[str, Any] = {"receiver": "etcd-chatops", **timing}
        if matchers:
            self.route = {"receiver": "nowhere", **timing,
                          "routes": [{"receiver": "etcd-chatops", "matchers": list(matchers)}]}

    def __enter__(self) -> LocalAlertmanager:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def retarget(self, webhook_url: str, timeout: float = 10.0) -> None:
        """Send to `webhook_url` from now on (a bot started after Alertmanager, on a port chosen then): the
        configuration rewritten and reloaded (POST /-/reload), as an operator's change would be."""
        self.webhook_url = webhook_url
        self._write("alertmanager.yml", self.config())
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as r:
            if r.status != 200:
                raise RuntimeError(f"alertmanager did not reload its configuration: HTTP {r.status}")

    def config(self) -> dict[str, Any]:
        return {"route": self.route,
                "receivers": [{"name": "nowhere"}, {"name": "etcd-chatops", "webhook_configs": [{
                    "url": self.webhook_url, "send_resolved": True, "max_alerts": 0,
                    "http_config": {"authorization": {"type": "Bearer",
                                                      "credentials_file": str(self.token_file)}}}]}]}

    def argv(self) -> list[str]:
        config = self._write("alertmanager.yml", self.config())
        return [str(self.binary), f"--config.file={config}", f"--storage.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", f"--web.external-url={self.url}",
                "--cluster.listen-address=", "--log.level=info"]

    async def alerts(self) -> list[Alert]:
        """GET /api/v2/alerts (one call, QUERY_TIMEOUT): the alerts it holds now."""
        return [Alert(a["labels"].get("alertname", ""), a["labels"], a.get("annotations", {}), a["status"]["state"],
                      a.get("fingerprint", "")) for a in await self._get("/api/v2/alerts")]


class LocalPrometheus(_Server):
    """Prometheus scraping `jobs` (scrape_config names; `scrape` sets their targets) and evaluating
    `rule_files` every `interval`, sending alerts to `alertmanager` (resent every `interval` too,
    instead of every minute)."""

    binary, what = PROMETHEUS, "prometheus"

    def __init__(self, jobs: Sequence[str], rule_files: Sequence[Path] = (), *,
                 alertmanager: LocalAlertmanager | None = None, interval: str = "1s",
                 base_dir: Path | None = None) -> None:
        super().__init__(base_dir)
        self.jobs, self.rule_files = list(jobs), list(rule_files)
        self.alertmanager, self.interval = alertmanager, interval

    def __enter__(self) -> LocalPrometheus:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def targets_file(self, job: str) -> Path:
        return self.dir / f"targets-{job}.json"

    def scrape(self, job: str, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
        """Set `job`'s targets (host:port), with `labels` on every series; Prometheus picks them up at its
        discovery's next tick (every 5 s), then scrapes them every `interval`."""
        if job not in self.jobs:
            raise ValueError(f"no scrape job {job!r}: the jobs are {self.jobs}")
        tmp = self.dir / f".targets-{job}.json.tmp"
        tmp.write_text(json.dumps([{"targets": list(targets), "labels": dict(labels or {})}]))
        tmp.replace(self.targets_file(job))  # whole, never half-written

    def config(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": job, "file_sd_configs": [
                {"files": [str(self.targets_file(job))], "refresh_interval": self.interval}]} for job in self.jobs]}
        if self.alertmanager is not None:
            doc["alerting"] = {"alertmanagers": [{"api_version": "v2", "static_configs": [
                {"targets": [self.alertmanager.url.split("://", 1)[1]]}]}]}
        return doc

    def argv(self) -> list[str]:
        config = self._write("prometheus.yml", self.config())
        return [str(self.binary), f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", f"--rules.alert.resend-delay={self.interval}",
                "--log.level=info"]

    async def alerts(self) -> list[Alert]:
        """GET /api/v1/alerts (one call, QUERY_TIMEOUT): the alerts pending or firing now."""
        body = await self._get("/api/v1/alerts")
        return [Alert(a["labels"].get("alertname", ""), a["labels"], a.get("annotations", {}), a["state"])
                for a in body["data"]["alerts"]]

    async def firing(self, name: str) -> list[Alert]:
        """The alerts named `name` that are firing now."""
        return [a for a in await self.alerts() if a.name == name and a.state == "firing"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (GET /api/v1/query, QUERY_TIMEOUT)."""
        body = await self._get(f"/api/v1/query?query={quote(expr)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result
