"""deploy/prometheus/ with the real tools: promtool checks and unit-tests the rules, amtool checks the
Alertmanager example, and a real Prometheus and Alertmanager (bot/testing/prometheus.py) see a real
cluster lose members and deliver the alerts as Alertmanager's webhook, the wiring the bot's receiver
uses; and the bot's own rules fire on the real bot's /metrics."""
from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from bot.domain.snapshot import NewSnapshot
from bot.ops.metrics import Metrics
from bot.testing.cluster import free_port
from bot.testing.prometheus import (
    AMTOOL,
    PROMTOOL,
    LocalAlertmanager,
    LocalPrometheus,
    members,
    rules_with_for,
    run_tool,
)
from bot.testing.workspace import cluster_table
from helpers import eventually

pytestmark = pytest.mark.e2e  # Debian's prometheus and alertmanager tools (make test installs them)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "prometheus"
BOT_RULES = DEPLOY / "etcd-chatops-rules.yaml"
MIXIN_RULES = DEPLOY / "etcd-mixin-alerts.yaml"
RULE_TESTS = DEPLOY / "tests" / "etcd-chatops-rules.test.yaml"
MIXIN_TESTS = DEPLOY / "tests" / "etcd-mixin-alerts.test.yaml"
AM_EXAMPLE = DEPLOY / "alertmanager-example.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
MIXIN_NAMES = {"etcdMembersDown", "etcdInsufficientMembers", "etcdNoLeader", "etcdHighNumberOfLeaderChanges",
               "etcdHighNumberOfFailedGRPCRequests", "etcdGRPCRequestsSlow", "etcdMemberCommunicationSlow",
               "etcdHighNumberOfFailedProposals", "etcdHighFsyncDurations", "etcdHighCommitDurations",
               "etcdDatabaseQuotaLowSpace", "etcdExcessiveDatabaseGrowth", "etcdDatabaseHighFragmentationRatio"}


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


# ---------------------------------------------------------------- the files, checked by the tools

def test_both_rule_files_pass_promtool_check() -> None:
    for path, count in ((BOT_RULES, 6), (MIXIN_RULES, 15)):
        result = run_tool(PROMTOOL, "check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {count} rules found" in result.stdout, result.stdout
    assert {r["alert"] for r in rules(MIXIN_RULES)} == MIXIN_NAMES  # the mixin's 13 names (two come twice)


def test_the_rule_unit_tests_pass_and_see_every_rule_fire_and_stay_quiet() -> None:
    """Every rule of both files, the bot's and the mixin's (at its own `for:`, never about the bot's own
    replicas), fires in one case and stays quiet in another."""
    for tests, path in ((RULE_TESTS, BOT_RULES), (MIXIN_TESTS, MIXIN_RULES)):
        result = run_tool(PROMTOOL, "test", "rules", str(tests))
        assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
        fired: set[str] = set()
        quiet: set[str] = set()
        for case in yaml.safe_load(tests.read_text())["tests"]:
            for check in case["alert_rule_test"]:
                (fired if check["exp_alerts"] else quiet).add(check["alertname"])
        names = {r["alert"] for r in rules(path)}
        assert fired == names and quiet == names, (tests.name, names - fired, names - quiet)
    levels = {a["exp_labels"]["severity"] for case in yaml.safe_load(MIXIN_TESTS.read_text())["tests"]
              for check in case["alert_rule_test"] for a in check["exp_alerts"]}
    assert levels == {"warning", "critical"}   # the two-level alerts are tested at both levels


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: the backup rule at three times the schedule instead of two."""
    (tmp_path / "tests").mkdir()
    broken = BOT_RULES.read_text().replace("> 2 * max by (job, cluster) (etcd_chatops_snapshot_schedule_seconds",
                                           "> 3 * max by (job, cluster) (etcd_chatops_snapshot_schedule_seconds", 1)
    assert broken != BOT_RULES.read_text()
    (tmp_path / BOT_RULES.name).write_text(broken)
    (tmp_path / "tests" / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = run_tool(PROMTOOL, "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name))
    assert result.returncode == 1, result.stdout
    assert "alertname: EtcdChatopsBackupMissed" in result.stderr, result.stderr


def test_the_alertmanager_example_is_valid_and_sends_etcd_alerts_to_the_bot_and_its_own_elsewhere() -> None:
    result = run_tool(AMTOOL, "check-config", str(AM_EXAMPLE))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    for labels, receiver in ((["alertname=etcdMembersDown", "cluster=prod"], "etcd-chatops"),
                             (["alertname=etcdInsufficientMembers"], "etcd-chatops"),
                             (["alertname=EtcdChatopsDown"], "default")):
        routed = run_tool(AMTOOL, "config", "routes", "test", f"--config.file={AM_EXAMPLE}",
                          f"--verify.receivers={receiver}", *labels)
        assert routed.returncode == 0, (labels, routed.stdout + routed.stderr)
    config = yaml.safe_load(AM_EXAMPLE.read_text())
    (hook,) = next(r for r in config["receivers"] if r["name"] == "etcd-chatops")["webhook_configs"]
    assert hook["url"].endswith("/alertmanager") and hook["send_resolved"] is True
    assert set(hook["http_config"]["authorization"]) == {"type", "credentials_file"}  # never an inline token


# ---------------------------------------------------------------- the metrics they name

def exported_names() -> set[str]:
    """Every series name the bot's registry can export (counters with _total, histograms' parts)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]}


def test_the_rules_and_the_dashboard_name_only_metrics_the_bot_exports_and_the_readme_lists_each() -> None:
    exported = exported_names()
    for path in (BOT_RULES, DASHBOARD):
        named = set(re.findall(r"etcd_chatops_[a-z_]+", path.read_text()))
        assert named and named <= exported, (path.name, named - exported)
    readme = (ROOT / "README.md").read_text()
    families = {family.name for family in Metrics().registry.collect()}
    assert not {name for name in families if name not in readme}, "metrics missing from the README"


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, with Grafana's variables filled in, as a recording rule that promtool parses."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"].replace("$__rate_interval", "1m").replace("$job", "etcd-chatops")
             for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 15
    recorded = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": e}
                                                            for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard.yaml").write_text(json.dumps(recorded))
    result = run_tool(PROMTOOL, "check", "rules", str(tmp_path / "dashboard.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- real Prometheus and Alertmanager

@dataclass
class Delivery:
    authorization: str
    body: dict[str, Any]


@dataclass
class Receiver:
    """A tiny webhook receiver: what the bot's POST /alertmanager will be given."""

    url: str
    deliveries: list[Delivery] = field(default_factory=list)

    def alerts(self, name: str, status: str) -> list[dict[str, Any]]:
        return [a for d in self.deliveries for a in d.body.get("alerts", [])
                if a["labels"].get("alertname") == name and a["status"] == status]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    hook = Receiver(f"http://127.0.0.1:{port}/alertmanager")

    async def take(request: web.Request) -> web.Response:
        hook.deliveries.append(Delivery(request.headers.get("Authorization", ""), await request.json()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/alertmanager", take)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield hook
    finally:
        await runner.cleanup()


RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def check_webhook(body: dict[str, Any], receiver: str) -> None:
    """Alertmanager's webhook payload, version 4, as its documentation gives it."""
    assert body["version"] == "4" and body["receiver"] == receiver, body
    assert body["status"] in ("firing", "resolved") and isinstance(body["groupKey"], str) and body["groupKey"]
    assert body["truncatedAlerts"] == 0 and body["externalURL"].startswith("http://127.0.0.1:")
    for key in ("groupLabels", "commonLabels", "commonAnnotations"):
        assert isinstance(body[key], dict), key
    assert body["alerts"]
    for alert in body["alerts"]:
        assert alert["status"] in ("firing", "resolved")
        assert {"alertname", "severity", "job", "cluster"} <= set(alert["labels"]), alert
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        assert RFC3339.match(alert["startsAt"]) and RFC3339.match(alert["endsAt"]), alert
        assert alert["generatorURL"].startswith("http://") and re.fullmatch(r"[0-9a-f]{16}", alert["fingerprint"])


async def scalar(prom: LocalPrometheus, expr: str) -> float | None:
    """An instant query's single value, or None while it has none."""
    vector = await prom.query(expr)
    return float(vector[0]["value"][1]) if vector else None


async def test_real_prometheus_and_alertmanager_alert_on_a_cluster_losing_members_and_on_the_bot(
        make_cluster, start_bot, receiver: Receiver, tmp_path: Path, file_store: Path) -> None:
    """A real Prometheus scrapes a real 3-member cluster and the real bot, with both rule files at
    `for: 1s`. Two members killed fire etcdMembersDown and (quorum lost) etcdInsufficientMembers, and
    Alertmanager posts them as its version-4 webhook with the bearer token; a member back resolves
    the quorum loss, and that is posted too. The bot's own rules, on its real /metrics: its newest
    snapshot an hour old on a one-minute schedule (which cannot write: its directory is a file) is
    a missed backup; its off-site copy counts from the bot's start, so not yet; it leads; a second
    target that does not answer is a replica down, the bot itself is not. Only etcd's alerts go to
    the receiver, as alertmanager-example.yml routes them."""
    from bot.store.sqlite import SqliteStore
    rule_files = [rules_with_for(path, "1s", tmp_path / f"fast-{path.name}") for path in (MIXIN_RULES, BOT_RULES)]
    with LocalAlertmanager(receiver.url, matchers=['alertname=~"etcd.*"'], base_dir=tmp_path) as am, \
            LocalPrometheus(["etcd", "etcd-chatops"], rule_files, alertmanager=am,
                            base_dir=tmp_path) as prom:
        # Everything starts while Prometheus's discovery waits for its first tick (5 s).
        cluster = make_cluster(3)
        store = await SqliteStore(tmp_path / "etcd-chatops.db").open()
        await store.record_snapshot(NewSnapshot(
            cluster="prod", path=str(tmp_path / "old.db"), member="member1", revision=1, hash="0",
            total_keys=1, live_keys=None, total_size=1, file_size=1, sha256="0", encrypted=False,
            requested_by="the schedule", reason="scheduled", duration=0.1, created_at=time.time() - 3600))
        await store.close()
        (tmp_path / "snapshots").mkdir()
        (tmp_path / "snapshots" / "prod").write_text("not a directory")
        bot = await start_bot([cluster_table("prod", cluster, snapshots={
            "every": "1m", "store": {"url": file_store.as_uri()}})])
        dead_replica = f"127.0.0.1:{free_port()}"
        prom.scrape("etcd", members(cluster), {"cluster": "prod"})
        prom.scrape("etcd-chatops", [bot.base_url.split("://", 1)[1], dead_replica])
        cluster.kill("member1")
        cluster.kill("member2")

        [down] = await eventually(lambda: prom.firing("etcdMembersDown"), 20, "etcdMembersDown firing")
        assert down.labels["cluster"] == "prod" and down.labels["job"] == "etcd"  # not the bot's dead replica
        assert await scalar(prom, 'sum(up{job="etcd"})') == 1
        [lost] = await eventually(lambda: prom.firing("etcdInsufficientMembers"), 15, "etcdInsufficientMembers firing")
        assert lost.labels["cluster"] == "prod" and lost.labels["severity"] == "critical"

        [missed] = await eventually(lambda: prom.firing("EtcdChatopsBackupMissed"), 15, "EtcdChatopsBackupMissed")
        assert missed.labels["cluster"] == "prod" and "prod is 1h" in missed.annotations["description"], missed

        async def replicas_down() -> list[str]:  # (before its first scrape the rules saw no bot at all)
            return [a.labels.get("instance", "") for a in await prom.firing("EtcdChatopsDown")]
        assert await eventually(replicas_down, 15, "EtcdChatopsDown for the dead replica") == [dead_replica]
        quiet = {"EtcdChatopsNoLeader", "EtcdChatopsOffsiteBackupMissed", "EtcdChatopsLeaseRenewalsFailing",
                 "EtcdChatopsAlertsUnmatched"}
        assert not quiet & {a.name for a in await prom.alerts()}
        offsite = await scalar(prom, 'etcd_chatops_snapshot_offsite_last_timestamp_seconds{cluster="prod"}')
        assert offsite is not None and abs(offsite - bot.ctx.metrics.started) < 1  # no copy yet: from the start

        await eventually(lambda: receiver.alerts("etcdInsufficientMembers", "firing")
                         and receiver.alerts("etcdMembersDown", "firing"), 15, "both alerts delivered")
        held = {a.name for a in await am.alerts() if a.state == "active"}
        assert {"etcdMembersDown", "etcdInsufficientMembers", "EtcdChatopsBackupMissed"} <= held, held

        cluster.restart("member2")  # a quorum again: the loss resolves, and Alertmanager says so
        await eventually(lambda: receiver.alerts("etcdInsufficientMembers", "resolved"), 20,
                         "etcdInsufficientMembers resolved")
    assert receiver.deliveries
    for delivery in receiver.deliveries:
        assert delivery.authorization == f"Bearer {am.token}"
        check_webhook(delivery.body, "etcd-chatops")
        assert all(a["labels"]["alertname"].startswith("etcd") for a in delivery.body["alerts"])


# ---------------------------------------------------------------- the real bot as Alertmanager's receiver

async def test_a_member_killed_is_one_message_whoever_sees_it_and_its_return_resolves_it(
        make_cluster, start_bot, slack, tmp_path: Path) -> None:
    """A real Prometheus scrapes a real cluster with the mixin's rules at `for: 1s`, and a real Alertmanager
    posts to the real bot, which watches the cluster too. A follower killed: the watch and etcdMembersDown
    are one message, with the bot's `/etcd replace` for that member, saying both saw it; the member back,
    both resolve, and the message is resolved in its thread, once."""
    from bot.testing.workspace import CHANNEL, cluster_table
    from helpers import replies, text_of
    fast = rules_with_for(MIXIN_RULES, "1s", tmp_path / "fast-mixin.yaml")
    with LocalAlertmanager("http://127.0.0.1:9/not-yet", matchers=['alertname=~"etcd.*"'], base_dir=tmp_path) as am, \
            LocalPrometheus(["etcd"], [fast], alertmanager=am, base_dir=tmp_path) as prom:
        # Everything starts while Prometheus's discovery waits for its first tick (5 s).
        cluster = make_cluster(3)
        bot = await start_bot([cluster_table("prod", cluster, watch={"interval": "1s", "grace": "2s"},
                                             timeout_seconds=0.5)], alertmanager={"token_file": str(am.token_file)})
        am.retarget(f"{bot.base_url}/alertmanager")
        prom.scrape("etcd", members(cluster), {"cluster": "prod"})
        await eventually(lambda: scalar(prom, 'sum(up{job="etcd"})'), 20, "Prometheus scraping the members")
        health = await bot.ctx.check(bot.ctx.config.clusters[0])
        victim = next(h.member.name for h in health.members if h.member.id != health.leader_id)  # no election

        def member_down() -> list[Any]:
            return [m for m in slack.channel_messages(CHANNEL, include_threads=False, include_ephemeral=False)
                    if m.source == "chat.postMessage" and "MEMBER DOWN" in m.text]

        async def alertmanager_says(status: str) -> bool:
            rows = await bot.ctx.store.received_alerts("prod")
            return any(r.alertname == "etcdMembersDown" for r in rows) == (status == "firing")

        cluster.kill(victim)
        [posted] = await eventually(member_down, 20, "the member-down message")
        await eventually(lambda: alertmanager_says("firing"), 30, "Alertmanager's etcdMembersDown delivered")
        await eventually(lambda: "seen by the watch and Alertmanager (etcdMembersDown)" in text_of(posted), 10,
                         "the message saying both saw it")
        assert f"/etcd replace {victim} member4 http://NEW-HOST:" in text_of(posted)
        assert member_down() == [posted]

        cluster.restart(victim)
        await eventually(lambda: alertmanager_says("resolved"), 30, "Alertmanager's resolution delivered")
        await eventually(lambda: any("resolved after" in m.text for m in replies(slack, posted)), 15,
                         "the resolution in the message's thread")
        assert member_down() == [posted] and sum("resolved after" in m.text for m in replies(slack, posted)) == 1
