"""What a platform team relies on: Socket Mode, rate limits, roles, channel
binding, the audit chain, several clusters, probes and metrics."""
from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import subprocess
import sys
from types import SimpleNamespace

import aiohttp
import pytest

import bot.slack.app as slack_app
from bot.config import load_config
from bot.server import BotServer
from bot.settings import SlackSettings
from bot.testing.clock import ManualClock
from bot.testing.workspace import (
    CHANNEL,
    LEAD,
    LEAD2,
    LEADS_GROUP,
    ONCALL,
    STRANGER,
    BotProcess,
    cluster_table,
    write_config,
)
from helpers import command, ephemeral, eventually, reply, text_of


async def test_socket_mode_end_to_end(cluster, slack, creds, tmp_path):
    """apps.connections.open, a websocket, envelopes acked with their envelope_id."""
    config = load_config(write_config(tmp_path, [cluster_table("prod", cluster)]))
    settings = SlackSettings(bot_token=creds.bot_token, signing_secret=None, app_token=creds.app_token,
                             api_url=slack.api_url)
    slack.bot_url = None
    async with BotServer(config, settings, socket_mode=True) as bot:
        await slack.wait_socket_connected(timeout=15)
        assert slack.calls_to("apps.connections.open")[-1].status == 200
        msg = await reply(slack, "status")
        assert "etcd cluster prod: HEALTHY" in text_of(msg)
        usage = await ephemeral(slack, "nonsense")
        assert "unknown subcommand 'nonsense'" in text_of(usage) and usage.source == "ack"
        # an event through the socket: a reaction on a message that is no plan is ignored, and acked
        note = slack.add_user_message(CHANNEL, ONCALL, "hello")
        delivery = await slack.react(user=LEAD, channel=CHANNEL, ts=note.ts, reaction="white_check_mark")
        assert delivery.mode == "socket" and delivery.status == 200
        async with aiohttp.ClientSession() as http:  # probes are served in Socket Mode too
            async with http.get(f"{bot.base_url}/healthz") as r:
                assert r.status == 200
            async with http.post(f"{bot.base_url}/slack/events", data="x") as r:
                assert r.status in (404, 405)  # no HTTP event endpoint in Socket Mode


# The retry waits Retry-After plus a jitter of [0, 1) s: the test runs at both ends of the jitter. (It drew the
# jitter at random, and moved the clock 1.99 s: a draw above 0.99, once in a hundred runs, failed it.)
@pytest.mark.parametrize("jitter", [0.0, math.nextafter(1.0, 0.0)], ids=["no-jitter", "most-jitter"])
async def test_rate_limited_posts_wait_and_are_posted_once(cluster, slack, start_bot, monkeypatch, jitter):
    monkeypatch.setattr(slack_app, "random", SimpleNamespace(random=lambda: jitter))
    clock = ManualClock()   # Retry-After is waited out on the bot's clock: moved here, not waited for
    await start_bot([cluster_table("prod", cluster)], clock=clock)
    await eventually(lambda: clock.asleep() == ["upkeep"], 10, "the upkeep asleep on the bot's clock")
    slack.fail_next("chat.postMessage", status=429, retry_after=1)
    await command(slack, "status")
    await eventually(lambda: len(clock.asleep()) == 2, 20, "the limited post to wait on the bot's clock")
    await clock.advance(0.99)
    statuses = [c.status for c in slack.calls_to("chat.postMessage")]
    assert statuses == [429], "sent again before Retry-After"
    await clock.advance(1.01)   # 2 s in all: Retry-After, and the jitter of less than a second more
    assert [c.status for c in slack.calls_to("chat.postMessage")] == [429, 200]
    (msg,) = [m for m in slack.messages if m.source == "chat.postMessage"]
    assert "HEALTHY" in text_of(msg)


async def test_roles_are_enforced_and_refusals_name_the_role(cluster, slack, start_bot):
    access = {"readers": [ONCALL, LEAD], "reader_groups": [LEADS_GROUP], "operators": [ONCALL],
              "approvers": [LEAD]}
    bot = await start_bot([cluster_table("prod", cluster, access=access)])
    msg = await ephemeral(slack, "status", user=STRANGER)
    assert "/etcd status on prod needs the reader role" in text_of(msg)
    assert f"<@{ONCALL}>" in text_of(msg) and f"<!subteam^{LEADS_GROUP}>" in text_of(msg)
    assert "HEALTHY" in text_of(await reply(slack, "status", user=LEAD2))  # a reader through the user group
    msg = await ephemeral(slack, "snapshot", user=LEAD)
    assert "/etcd snapshot on prod needs the operator role" in text_of(msg)
    msg = await ephemeral(slack, "replace member1 member4 http://127.0.0.1:1", user=LEAD)
    assert "needs the operator role" in text_of(msg)
    refusals = [json.loads(r.detail) for r in await bot.ctx.store.audit_rows() if r.action == "refused"]
    assert [d["missing_role"] for d in refusals] == ["reader", "operator", "operator"]
    assert not await bot.ctx.store.snapshots("prod")


async def test_every_command_is_bound_to_its_channels(cluster, slack, start_bot):
    await start_bot([cluster_table("prod", cluster)])
    for text in ("status prod", "members", "plans", "snapshots", "snapshot", "resume abc123", "cancel abc123",
                 "replace member1 member4 http://127.0.0.1:1"):
        msg = await ephemeral(slack, text, channel="C0ELSEWHERE")
        assert "not bound" in text_of(msg), text
    assert not slack.calls_to("chat.postMessage")


async def test_several_clusters_in_one_channel(make_cluster, cluster, slack, start_bot):
    other = make_cluster(1)
    await start_bot([cluster_table("blue", cluster), cluster_table("green", other)])
    msg = await ephemeral(slack, "status")
    assert "bound to several clusters (blue, green): name one with --cluster NAME" in text_of(msg)
    assert "etcd cluster green: HEALTHY" in text_of(await reply(slack, "status --cluster green"))
    assert "etcd cluster blue: HEALTHY" in text_of(await reply(slack, "status blue"))
    assert "etcd cluster green" in text_of(await reply(slack, "members green"))


async def test_audit_chain_verifies_and_detects_tampering(cluster, slack, start_bot, tmp_path, cli):
    await start_bot([cluster_table("prod", cluster)])
    await reply(slack, "status")
    await ephemeral(slack, "status", channel="C0ELSEWHERE")
    await ephemeral(slack, "frobnicate")
    cfg = str(tmp_path / "config.toml")

    def audit(*args: str) -> subprocess.CompletedProcess:
        return cli("audit", *args, "--config", cfg)

    ok = audit("verify")
    assert ok.returncode == 0 and "audit log intact: 3 row(s)" in ok.stdout
    rows = [json.loads(line) for line in audit("export").stdout.splitlines()]
    assert [r["action"] for r in rows] == ["command", "refused", "usage_error"]
    assert rows[0]["user"] == ONCALL and rows[0]["cluster"] == "prod" and rows[0]["channel"] == CHANNEL
    assert rows[1]["channel"] == "C0ELSEWHERE"
    assert audit("export", "--since", "1h").stdout.count("\n") == 3
    assert audit("export", "--since", "2999-01-01").stdout == ""
    bad = audit("export", "--since", "yesterday")
    assert bad.returncode == 2 and "--since: 'yesterday' is neither" in bad.stderr

    db = sqlite3.connect(tmp_path / "etcd-chatops.db")
    db.execute("UPDATE audit SET user = 'U0INNOCENT' WHERE id = 2")
    db.commit()
    tampered = audit("verify")
    assert tampered.returncode == 1 and "row 2: content does not match its hash" in tampered.stdout
    db.execute("UPDATE audit SET user = ? WHERE id = 2", [rows[1]["user"]])
    db.execute("DELETE FROM audit WHERE id = 2")
    db.commit()
    db.close()
    deleted = audit("verify")
    assert deleted.returncode == 1 and "row 2 is missing" in deleted.stdout


async def test_probes_and_metrics(cluster, slack, start_bot):
    bot = await start_bot([cluster_table("prod", cluster)])
    await reply(slack, "status")
    await ephemeral(slack, "frobnicate")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{bot.base_url}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{bot.base_url}/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["ready"]
            assert body["checks"] == {"database": "ok", "slack": "ok", "etcd:prod": "ok (3 members)", "role": "leader"}
        async with http.get(f"{bot.base_url}/metrics") as r:
            text = await r.text()
    assert 'etcd_chatops_commands_total{command="status",outcome="ok"} 1.0' in text
    assert 'etcd_chatops_commands_total{command="invalid",outcome="usage_error"} 1.0' in text
    assert 'etcd_chatops_ack_latency_seconds_count{kind="command"} 2.0' in text
    assert 'etcd_chatops_plans{state="proposed"} 0.0' in text
    assert 'etcd_chatops_cluster_reachable{cluster="prod"} 1.0' in text
    assert "etcd_chatops_leader 1.0" in text  # one replica: it holds the lease
    assert 'etcd_chatops_lease_renewals_total{outcome="held"}' in text


async def test_readiness_fails_on_slack_auth_not_on_a_dead_cluster(make_cluster, slack, creds, tmp_path):
    dead = make_cluster(1)
    dead.kill("member1")
    config = load_config(write_config(tmp_path, [cluster_table("prod", dead)]))
    good = SlackSettings(bot_token=creds.bot_token, signing_secret=creds.signing_secret, api_url=slack.api_url)
    async with BotServer(config, good) as bot, aiohttp.ClientSession() as http:
        async with http.get(f"{bot.base_url}/readyz") as r:
            body = await r.json()
        assert r.status == 200 and body["checks"]["etcd:prod"].startswith("unreachable")
    wrong = SlackSettings(bot_token="xoxb-not-the-token", signing_secret=creds.signing_secret, api_url=slack.api_url)
    async with BotServer(config, wrong) as bot, aiohttp.ClientSession() as http:
        async with http.get(f"{bot.base_url}/readyz") as r:
            body = await r.json()
        assert r.status == 503 and not body["ready"] and body["checks"]["slack"].startswith("auth.test failed")


async def test_a_bad_environment_exits_2_with_one_line(tmp_path, cluster):
    config = write_config(tmp_path, [cluster_table("prod", cluster)])
    base = [sys.executable, "-m", "bot", "run", "--config", str(config)]
    env = {"PATH": "/usr/bin:/bin"}
    cases = [
        (base + ["--http"], env, "SLACK_BOT_TOKEN is not set"),
        (base + ["--http"], {**env, "SLACK_BOT_TOKEN": "xoxb-x"}, "--http needs SLACK_SIGNING_SECRET"),
        (base, {**env, "SLACK_BOT_TOKEN": "xoxb-x"}, "Socket Mode needs SLACK_APP_TOKEN"),
        ([sys.executable, "-m", "bot", "run", "--http"], {**env, "SLACK_BOT_TOKEN": "xoxb-x"}, "no config file"),
        (base + ["--http", "--port", "70000"], {**env, "SLACK_BOT_TOKEN": "xoxb-x", "SLACK_SIGNING_SECRET": "s"},
         "--port: 70000 is not a TCP port"),
    ]
    for argv, environment, message in cases:
        proc = subprocess.run(argv, capture_output=True, text=True, env=environment, timeout=30)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (message, proc.stderr)
        assert "Traceback" not in proc.stderr


async def test_logs_are_json_lines(cluster, slack, creds, tmp_path):
    config = write_config(tmp_path, [cluster_table("prod", cluster)])
    bot = await asyncio.to_thread(BotProcess(config, slack.api_url, creds, tmp_path / "bot.log").start)
    try:
        slack.bot_url = bot.url
        await reply(slack, "status")
        await ephemeral(slack, "frobnicate")
    finally:
        await asyncio.to_thread(bot.stop)
    lines = [line for line in (tmp_path / "bot.log").read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    command = next(e for e in entries if e["msg"] == "command")
    assert command["command"] == "status" and command["cluster"] == "prod" and command["user"] == "U0ONCALL01"
