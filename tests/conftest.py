"""Shared fixtures: real etcd clusters, and a guard that nothing is left running."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bot.etcd.binaries import find_binary
from bot.testing import certs as certs_module
from bot.testing import cluster as cluster_module
from bot.testing import netbed as netbed_module
from bot.testing import postgres as postgres_module
from bot.testing import prometheus as prometheus_module
from bot.testing import s3 as s3_module
from bot.testing import workspace as workspace_module
from bot.testing.cluster import LocalCluster
from bot.testing.netbed import NetnsCluster
from bot.testing.postgres import LocalPostgres, PostgresMissing
from bot.testing.versions import EtcdVersionMissing, etcd_bin_dir

ROOT = Path(__file__).resolve().parent.parent
TEST_ETCD_PASSWORD = "rootpw-" + os.urandom(6).hex()  # tests that enable etcd auth use this
TEST_AUDIT_KEY = "auditkey-" + os.urandom(16).hex()    # tests that key the audit chain use this
TEST_MANIFEST_KEY = "manifestkey-" + os.urandom(16).hex()  # tests that sign the store's manifests use this

# A test that uses any of these (directly or through another fixture) runs real etcd, the Slack
# stand-in or the bot: it is end to end. `make test-fast` runs the others.
E2E_FIXTURES = {"cluster", "make_cluster", "netbed", "slack", "start_bot",
                "real", "real_snapshot",  # (snapshots of real etcd clusters, in test_bbolt and test_fuzz)
                "postgres", "pg_url",  # a real PostgreSQL server
                "s3"}  # (moto's S3 server)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark end-to-end tests `e2e` by the fixtures they use, so new tests are marked without edits.
    Tests that start processes without these fixtures carry `pytestmark = pytest.mark.e2e`.
    Tests that share a module-scoped fixture (a cluster's snapshots, built once) form one pytest-xdist
    group (`--dist loadgroup`), so they run in one process and the fixture is built once. End-to-end and
    slow tests are ordered first."""
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
        info = getattr(item, "_fixtureinfo", None)
        if info is not None and any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    # pytest-xdist hands tests out in this order: the long ones (end-to-end, slow) first, so none starts late
    # and keeps one worker busy after the others are done; the quick pure ones fill the workers' tails.
    items.sort(key=lambda item: not any(item.get_closest_marker(m) for m in ("e2e", "slow", "robustness")))


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every etcd, bot or helper process a test starts must be gone when the suite ends.
    Only processes started under this session's directories are judged (other test
    sessions may run on the machine at the same time)."""
    yield
    roots = ([str(p) for p in cluster_module.CREATED + postgres_module.CREATED + prometheus_module.CREATED]
             + [str(tmp_path_factory.getbasetemp())])
    left = [(pid, cmd[:200]) for pid, cmd in cluster_module.processes_naming(roots)]
    for pid, _ in left:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not left, f"processes left running by the tests: {left}"


@pytest.fixture(scope="session", autouse=True)
def no_network_left_behind() -> Iterator[None]:
    """Every namespace, bridge, veth and TAP a multi-host bed of this session made must be gone
    at the end (other sessions' beds, with other name prefixes, are not judged)."""
    yield
    left = netbed_module.leftovers(netbed_module.CREATED)
    for prefix in netbed_module.CREATED:
        netbed_module.teardown(prefix)
    assert not left, f"left behind by the multi-host beds: {left}"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter("%(name)s %(levelname)s %(message)s").format(record))


STAND_INS: list[SlackStandIn] = []  # every Slack stand-in the session started


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_logs_or_messages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No token, signing secret, password or private key appears in any log line,
    any Slack message or API call, or any log file the suite produced."""
    capture = _Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.INFO)
    yield
    root.removeHandler(capture)
    root.setLevel(level)
    issued = (workspace_module.ISSUED + certs_module.KEY_MATERIAL + postgres_module.ISSUED + s3_module.ISSUED
              + prometheus_module.ISSUED
              + [TEST_ETCD_PASSWORD, TEST_AUDIT_KEY, TEST_MANIFEST_KEY])
    secrets = [s for s in issued if len(s) >= 6]
    places: list[tuple[str, str]] = [("log", line) for line in capture.lines]
    for stand_in in STAND_INS:
        places += [("slack message", json.dumps(dataclasses.asdict(m))) for m in stand_in.messages]
        places += [("slack call", json.dumps(dataclasses.asdict(c), default=str)) for c in stand_in.calls]
    for path in Path(tmp_path_factory.getbasetemp()).rglob("*.log"):
        places.append((f"file {path.name}", path.read_text(errors="replace")))
    leaks = sorted({f"{where} holds a secret ({secret[:4]}…)" for where, text in places for secret in secrets
                    if secret in text})
    assert not leaks, leaks


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A healthy 3-member cluster shared by read-only tests: do not kill its members."""
    with LocalCluster(3) as c:
        yield c


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """A real PostgreSQL 15 for the session (started on first use, stopped at the end, also
    after failures). Missing PostgreSQL fails the test: `make test` installs it."""
    server = LocalPostgres()
    try:
        missing = None
        try:
            server.start()
        except PostgresMissing as e:
            missing = str(e)
        if missing:
            pytest.fail(missing, pytrace=False)
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres: LocalPostgres) -> str:
    """A fresh database of the session's PostgreSQL (no state shared between tests); its URL
    (the password is `postgres.password`)."""
    return postgres.create_database()


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m bot ARGS` (the etcd-chatops CLI) from the repository, capturing its output.
    SLACK_* variables are dropped, so a developer's own tokens never reach the CLI under test; the rest
    of the environment is read at each run (the `s3` fixture's credentials, set by the test, reach it)."""
    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLACK_")}
        return subprocess.run([sys.executable, "-m", "bot", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env=env)
    return run


class WarmCluster:
    """A plain 3-member cluster started in the background while one test runs, for the next test that asks for one.
    etcd refuses a membership change until its leader has been connected to every voter for 5 s (its
    HealthInterval): on a cluster the test had just started, each replacement waited out the rest of those 5 s
    at its add step (3.3 s of a 7 s replacement)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="warm-cluster")
        self._next: tuple[LocalCluster, Future[LocalCluster]] | None = None

    @staticmethod
    def _start_and_pause(cluster: LocalCluster) -> LocalCluster:
        """Started, then stopped (SIGSTOP) while it waits: an idle 3-member cluster costs 0.034 CPU-seconds a
        second, and one waited beside each worker all through the suite. Its peers' connections stay up
        meanwhile (the kernel keeps them), so the leader's 5 s of contact with every voter still counts."""
        cluster.start()
        for name in cluster.members:
            cluster.pause(name)
        return cluster

    def take(self) -> LocalCluster | None:
        """The cluster started since the last take (None the first time, or when its start failed, or it runs
        another etcd release than the test asks for); the next one starts now."""
        ready, self._next = self._next, None
        if ready is not None and ready[0].etcd != str(find_binary("etcd")):
            self._next = ready   # made for the release the suite runs by default: kept for a test that does
            return None
        taken = None
        if ready is not None:
            try:
                taken = ready[1].result()
                for name in taken.members:
                    taken.resume(name)
            except Exception:
                ready[0].close()   # the test starts its own, and says why if that fails too
                taken = None
        fresh = LocalCluster(3)
        self._next = fresh, self._pool.submit(self._start_and_pause, fresh)
        return taken

    def settle(self) -> None:
        """Until the next cluster has started (and stopped to wait): a test that times the bot keeps the test
        bed's own work off the CPU meanwhile."""
        if self._next is not None:
            with contextlib.suppress(Exception):  # a failed start is the next taker's to report
                self._next[1].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._next is not None:
            self._next[0].close()


@pytest.fixture(scope="session")
def warm_cluster() -> Iterator[WarmCluster]:
    warm = WarmCluster()
    try:
        yield warm
    finally:
        warm.close()


@pytest.fixture
def make_cluster(warm_cluster: WarmCluster) -> Iterator[Callable[..., LocalCluster]]:
    """Fresh clusters for destructive tests, torn down even when the test fails (a plain 3-member one was
    started while the previous test ran: see WarmCluster)."""
    made: list[LocalCluster] = []

    def make(size: int = 3, **kwargs: Any) -> LocalCluster:
        if size == 3 and not kwargs and (warm := warm_cluster.take()) is not None:
            made.append(warm)
            return warm
        c = LocalCluster(size, **kwargs)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.close()


@pytest.fixture
def use_etcd(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """use_etcd("3.6") points ETCD_BIN_DIR at that etcd release (bot/testing/versions.py) for the rest
    of the test: clusters made afterwards run it, and the bot finds its etcdctl and etcdutl. A release
    that is not on the machine fails the test with the line saying what to run."""
    def use(release: str) -> Path:
        try:
            directory = etcd_bin_dir(release)
        except EtcdVersionMissing as e:
            pytest.fail(str(e), pytrace=False)
        monkeypatch.setenv("ETCD_BIN_DIR", str(directory))
        return directory
    return use


@pytest.fixture
def netbed() -> None:
    """The multi-host bed (bot/testing/netbed.py) can run here. Where it cannot (not root, no
    iproute2) the test is skipped with the reason, but under CI=true it fails: CI runs as root,
    so a bed that cannot start there is a defect, never a silent skip."""
    if reason := netbed_module.unavailable():
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def make_bed(netbed: None) -> Iterator[Callable[..., NetnsCluster]]:
    """Fresh clusters on the multi-host bed, torn down even when the test fails."""
    made: list[NetnsCluster] = []

    def make(size: int = 3, **kwargs: Any) -> NetnsCluster:
        c = NetnsCluster(size, **kwargs)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.close()


# ---------------------------------------------------------------- Slack and the bot

from bot.config import load_config  # noqa: E402
from bot.domain.clock import SYSTEM_CLOCK, Clock  # noqa: E402
from bot.server import BotServer  # noqa: E402
from bot.settings import SlackSettings  # noqa: E402
from bot.testing.slack import SlackStandIn  # noqa: E402
from bot.testing.workspace import CHANNELS, USERGROUPS, USERS, SlackSecrets, write_config  # noqa: E402

# The start_bot fixture: start the bot on these [[clusters]] tables (and top-level keys), against the stand-in.
StartBot = Callable[..., Awaitable[BotServer]]


@pytest.fixture
def creds() -> SlackSecrets:
    return SlackSecrets()


@pytest.fixture
async def slack(creds: SlackSecrets) -> AsyncIterator[SlackStandIn]:
    """The Slack stand-in with the fixture workspace's people and channels."""
    stand_in = SlackStandIn(bot_token=creds.bot_token, signing_secret=creds.signing_secret, app_token=creds.app_token,
                            users=USERS, usergroups=USERGROUPS, channels=CHANNELS)
    await stand_in.start()
    STAND_INS.append(stand_in)
    try:
        yield stand_in
    finally:
        await stand_in.stop()


@pytest.fixture
async def start_bot(slack: SlackStandIn, creds: SlackSecrets, tmp_path: Path) -> AsyncIterator[StartBot]:
    """Start the real bot (bolt AsyncApp over aiohttp) in-process against the stand-in."""
    bots: list[BotServer] = []

    async def start(clusters: list[dict[str, Any]], *, clock: Clock = SYSTEM_CLOCK, **top: Any) -> BotServer:
        """`clock`: the time of the bot's background loops (a ManualClock: the test moves it)."""
        config = load_config(write_config(tmp_path, clusters, **top))
        settings = SlackSettings(bot_token=creds.bot_token, signing_secret=creds.signing_secret,
                                 app_token=creds.app_token, api_url=slack.api_url)
        bot = BotServer(config, settings, clock=clock)
        bots.append(bot)
        await bot.start()
        slack.bot_url = bot.url
        return bot

    yield start
    for bot in bots:
        await bot.stop()


# ---------------------------------------------------------------- off-site stores

@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[s3_module.MotoS3]:
    """moto's S3 server on a free loopback port with a bucket; its throw-away credentials are in
    this test's environment only (where the bot, in-process or a child process, reads them)."""
    server = s3_module.MotoS3()
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    with server:
        yield server


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The off-site upload retries' backoff shortened (the schedule is the same, only the waits are short)."""
    from bot.ops import snapshots as ops_snapshots
    monkeypatch.setattr(ops_snapshots, "UPLOAD_RETRY_BACKOFF", (0.1, 0.2))


@pytest.fixture
def manifest_key(tmp_path: Path) -> dict[str, str]:
    """`[snapshots.store]` keys that sign the store's manifests with TEST_MANIFEST_KEY (from a 0600 file)."""
    path = tmp_path / "manifest.key"
    path.write_text(TEST_MANIFEST_KEY + "\n")
    path.chmod(0o600)
    return {"manifest_key_file": str(path)}


@pytest.fixture
def file_store(tmp_path: Path) -> Path:
    """A directory as a `file://` off-site store (a mounted filesystem)."""
    path: Path = tmp_path / "offsite"
    path.mkdir()
    return path
