"""Alertmanager's webhook into the bot: POST /alertmanager on the port serving /metrics.

The pure part (the payload, which cluster an alert is, what each alert name becomes, grace and resolution
for what Alertmanager sees, the message) without servers; then the real bot with the Slack stand-in,
deliveries made as Alertmanager makes them: refused ones change nothing and log no token; a redelivery
posts nothing; Alertmanager's alert and the watch's condition are one message that says both saw it; a
mute holds both; two replicas on one PostgreSQL post once. (A real Prometheus and Alertmanager deliver
to the bot in test_prometheus_rules.py.)"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import StartBot
from test_watch_conditions import PROD, facts, member

from bot.config import ClusterConfig, parse_config
from bot.domain.plan import PlanKind
from bot.domain.record import ReceivedAlert
from bot.output import blocks
from bot.server import BotServer
from bot.testing import prometheus as prometheus_module
from bot.testing.cluster import LocalCluster, free_port
from bot.testing.postgres import PASSWORD_ENV, LocalPostgres
from bot.testing.slack import Message, SlackStandIn
from bot.testing.workspace import CHANNEL, LEAD, cluster_table
from bot.watch import alertmanager
from bot.watch.alertmanager import BadPayload, findings, owners, parse
from bot.watch.conditions import Facts, Finding, expected, merge
from bot.watch.tracker import Act, Decision, Tracker
from bot.watch.watcher import alert_view
from helpers import eventually, must, replies, reply, snapshot_record, text_of, thread

STARTS = "2026-12-01T10:00:00.123456789Z"


def alert(name: str, status: str = "firing", fingerprint: str | None = None, starts: str = STARTS,
          annotations: dict[str, str] | None = None, **labels: str) -> dict[str, Any]:
    """One alert of a delivery, as Alertmanager 0.25 writes it."""
    labels = {"alertname": name, "cluster": "prod", "job": "etcd", "severity": "warning", **labels}
    return {"status": status, "labels": labels,
            "annotations": annotations or {"summary": f"{name} summary.", "description": f"{name} described."},
            "startsAt": starts, "endsAt": "2026-12-01T10:05:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph",
            "fingerprint": fingerprint or hashlib.sha256(name.encode()).hexdigest()[:16]}


def delivery(*alerts: dict[str, Any]) -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {"version": "4", "groupKey": '{}:{alertname="x"}', "truncatedAlerts": 0, "status": status,
            "receiver": "etcd-chatops", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "alerts": list(alerts)}


def received(*alerts: dict[str, Any]) -> list[ReceivedAlert]:
    return parse(json.dumps(delivery(*alerts)).encode())


# ---------------------------------------------------------------- the payload, without servers

def test_a_delivery_is_read_as_alertmanager_writes_it() -> None:
    (a,) = received(alert("etcdNoLeader", instance="10.0.0.3:2379", fingerprint="c0ffee0123456789"))
    assert (a.alertname, a.status, a.fingerprint, a.labels["instance"]) == (
        "etcdNoLeader", "firing", "c0ffee0123456789", "10.0.0.3:2379")
    assert a.starts_at == pytest.approx(1796119200.123456) and a.ends_at is None   # nanoseconds read, Go's zero time
    (done,) = received(alert("etcdNoLeader", "resolved"))
    assert done.ends_at == pytest.approx(1796119500.0)
    bare = {k: v for k, v in alert("etcdNoLeader").items() if k != "fingerprint"}
    assert received(bare)[0].fingerprint == received(bare)[0].fingerprint != ""   # made from the labels


@pytest.mark.parametrize(("body", "says"), [
    (b"{not json", "not JSON"), (b"[]", "not a JSON object"), (json.dumps({**delivery(), "version": "3"}).encode(),
                                                              "not Alertmanager's webhook version 4"),
    (json.dumps({**delivery(), "alerts": {}}).encode(), "alerts is not a list"),
    (json.dumps(delivery({**alert("x"), "status": "pending"})).encode(), "alerts[0].status"),
    (json.dumps(delivery({**alert("x"), "startsAt": "yesterday"})).encode(), "alerts[0].startsAt is not an RFC 3339"),
    (json.dumps(delivery({**alert("x"), "labels": {"a": 1}})).encode(), "alerts[0].labels is not an object"),
    (b"\xff\xfe", "not JSON")])
def test_what_is_not_the_payload_is_refused_in_one_line(body: bytes, says: str) -> None:
    with pytest.raises(BadPayload, match=re.escape(says)):
        parse(body)


def test_an_alert_belongs_to_the_one_cluster_whose_alert_labels_it_carries() -> None:
    config = parse_config({"clusters": [
        {"name": "prod", "endpoints": ["http://10.0.0.1:2379"]},
        {"name": "staging", "endpoints": ["http://10.0.1.1:2379"], "alert_labels": {"job": "etcd-staging", "env": "s"}},
    ]}, Path("."))
    assert [c.name for c in owners(config, {"cluster": "prod", "job": "x"})] == ["prod"]
    assert [c.name for c in owners(config, {"job": "etcd-staging", "env": "s", "cluster": "x"})] == ["staging"]
    assert owners(config, {"job": "etcd-staging"}) == [] and owners(config, {}) == []


def test_members_down_lands_on_the_member_the_bot_sees_down_with_its_replace_command() -> None:
    f = facts(member(1, up=False), member(2), member(3))
    attached: dict[str, set[tuple[str, str]]] = {}
    (down,) = findings(f, received(alert("etcdMembersDown", fingerprint="f1")), attached)
    assert down.key == ("member_down", "member1") and down.sources == ("alertmanager:etcdMembersDown",)
    assert down.suggestions[0] == "/etcd replace member1 member4 http://NEW-HOST:2380 --cluster prod"
    (both,) = merge([*conditions_findings(f, "member_down"), down])
    assert both.sources == ("watch", "alertmanager:etcdMembersDown") and both.severity == "warning"
    # The bot sees member1 back first: the alert stays on member1's message (no second one), with no replace.
    (still,) = findings(facts(member(1), member(2), member(3)), received(alert("etcdMembersDown", fingerprint="f1")),
                        attached)
    assert still.key == ("member_down", "member1") and still.suggestions == ("/etcd status prod",)
    assert "member1 answers the bot now" in still.summary
    (nobody,) = findings(facts(member(1), member(2)), received(alert("etcdMembersDown", fingerprint="f2")), {})
    assert nobody.key == ("member_down", "cluster") and "every member answers the bot" in nobody.summary


def test_the_bots_own_plan_holds_back_alertmanagers_alerts_as_it_holds_the_watchs() -> None:
    """Quiet while busy covers both sources: the member a replacement replaces, and a defragmentation's slow
    commits, are expected whoever saw them; another member down, or a quorum loss, are not."""
    from test_rendering import plan_row
    replacing = plan_row(1, "running")   # replaces member1
    (down,) = findings(facts(member(1, up=False), member(2), member(3)),
                       received(alert("etcdMembersDown", fingerprint="f1")), {})
    assert down.members[0] == "member1" and expected(replacing, down)
    (other,) = findings(facts(member(1), member(2, up=False), member(3)),
                        received(alert("etcdMembersDown", fingerprint="f2")), {})
    assert other.members[0] == "member2" and not expected(replacing, other)
    defragging = dataclasses.replace(replacing, kind=PlanKind.DEFRAG)
    f = facts(member(1), member(2), member(3))
    (slow,) = findings(f, received(alert("etcdHighCommitDurations", instance="10.0.0.2:2379")), {})
    assert expected(defragging, slow)
    (lost,) = findings(f, received(alert("etcdInsufficientMembers", severity="critical")), {})
    assert not expected(defragging, lost)


def conditions_findings(f: Facts, kind: str) -> list[Finding]:
    from bot.watch.conditions import evaluate
    return [x for x in evaluate(f).findings if x.kind == kind]


def test_insufficient_members_suggests_a_restore_only_when_the_bot_sees_the_quorum_lost() -> None:
    newest = snapshot_record(path="/snaps/prod-r42.db", revision=42)
    lost = received(alert("etcdInsufficientMembers", severity="critical"))
    (seen,) = findings(facts(member(1, up=False), member(2, up=False), member(3), newest_snapshot=newest), lost, {})
    assert seen.key == ("quorum_lost", "cluster") and seen.severity == "critical"
    assert seen.suggestions[0] == "/etcd restore prod-r42.db --cluster prod"
    from bot.watch.conditions import Facts
    (blind,) = findings(Facts(cluster=PROD, now=0.0, health=None, error="deadline exceeded"), lost, {})
    assert blind.suggestions == ("/etcd status prod",) and not any("restore" in s for s in blind.suggestions)
    assert "the bot reaches no member of prod, so it cannot confirm it" in blind.summary
    (held,) = findings(facts(member(1), member(2), member(3)), lost, {})
    assert held.suggestions == ("/etcd status prod",) and "but 3 of 3 voters answer the bot healthy" in held.summary


def test_each_known_name_has_its_condition_and_next_command_and_others_are_posted_plainly() -> None:
    f = facts(member(1), member(2), member(3))
    expected = {"etcdNoLeader": ("no_leader", "/etcd status prod"),
                "etcdHighFsyncDurations": ("wal_fsync", "/etcd perf prod"),
                "etcdHighCommitDurations": ("backend_commit", "/etcd perf prod"),
                "etcdGRPCRequestsSlow": ("grpc_slow", "/etcd perf prod"),
                "etcdMemberCommunicationSlow": ("peer_rtt", "/etcd perf prod"),
                "etcdDatabaseQuotaLowSpace": ("quota", "/etcd defrag prod"),
                "etcdDatabaseHighFragmentationRatio": ("fragmentation", "/etcd defrag prod"),
                "etcdHighNumberOfLeaderChanges": ("leader_churn", "/etcd perf prod")}
    for name, (kind, command) in expected.items():
        (found,) = findings(f, received(alert(name, instance="10.0.0.2:2379")), {})
        assert (found.kind, found.suggestions[0]) == (kind, command), name
        assert found.members == ("member2",), name   # its instance label is member2's client URL
    shipped = yaml.safe_load((Path(__file__).parent.parent / "deploy/prometheus/etcd-mixin-alerts.yaml").read_text())
    assert {r["alert"] for g in shipped["groups"] for r in g["rules"]} == set(alertmanager.KNOWN)  # every mixin alert
    odd = alert("KubeletDown", annotations={"summary": "Kubelet is down <!channel>",
                                           "runbook_url": "https://runbooks.example/kubeletdown"})
    (plain,) = findings(f, received(odd), {})
    assert plain.key == ("alertmanager", "KubeletDown") and plain.suggestions == ()
    assert plain.links == (("KubeletDown", "https://runbooks.example/kubeletdown"),)
    sneaky = alert("Sneaky", annotations={"summary": "x", "runbook_url": "javascript:alert(1)"})
    assert findings(f, received(sneaky), {})[0].links == ()


def test_what_alertmanager_sees_opens_at_once_and_resolves_when_it_says_so() -> None:
    watched = Finding("member_down", "member1", "connection refused")
    alerted = dataclasses.replace(watched, sources=("alertmanager:etcdMembersDown",))
    t = Tracker(grace=45)
    assert [d.act for d in t.step([alerted], set(), 0.0)] == [Act.OPEN]           # no grace: its `for:` waited
    assert [d.act for d in t.step([], {"member_down"}, 10.0)] == [Act.RESOLVE]   # the watch cannot tell: no matter
    t = Tracker(grace=45)
    t.step([alerted], set(), 0.0)
    t.step(merge([watched, alerted]), set(), 10.0)   # the watch sees it too
    assert t.step([], set(), 20.0) == [] and t.step([], {"member_down"}, 100.0) == []   # the watch's grace; unknown
    assert [d.act for d in t.step([], set(), 120.0)] == [Act.RESOLVE]


def test_the_message_says_who_saw_it_and_links_the_runbook_safely() -> None:
    f = Finding("fragmentation", "database", "mostly free <!channel>", suggestions=("/etcd defrag prod",),
                severity="warning", sources=("watch", "alertmanager:etcdDatabaseHighFragmentationRatio"),
                links=(("etcdDatabaseHighFragmentationRatio", "https://etcd.io/docs/v3.5/op-guide/maintenance/"),
                       ("evil", "https://x.example/a|b>c")))
    shown = blocks.alert_reply(alert_view("prod", f, 0.0, 60.0, 0))
    text = json.dumps(shown.blocks)
    assert "seen by the watch and Alertmanager (etcdDatabaseHighFragmentationRatio)" in text
    assert "<https://etcd.io/docs/v3.5/op-guide/maintenance/|runbook: etcdDatabaseHighFragmentationRatio>" in text
    assert "https://x.example/a|b&gt;c" in text and "<https://x.example" not in text   # not a link: shown as text
    assert "<!channel>" not in text and "WARNING" in text


# ---------------------------------------------------------------- the real bot

@pytest.fixture
def token(tmp_path: Path) -> dict[str, str]:
    """[alertmanager] with a bearer token in a 0600 file (the secret check looks for it in every log)."""
    value = secrets.token_urlsafe(24)
    prometheus_module.ISSUED.append(value)
    path = tmp_path / "alertmanager.token"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return {"token_file": str(path), "value": value}


def am_config(token: dict[str, str]) -> dict[str, str]:
    return {"token_file": token["token_file"]}


async def post(bot: BotServer, body: bytes | dict[str, Any], token: str | None, scheme: str = "Bearer",
               headers: dict[str, str] | None = None) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"{scheme} {token}"
    async with aiohttp.ClientSession() as http, http.post(f"{bot.base_url}/alertmanager", data=data,
                                                          headers=sent) as r:
        return r.status, await r.text()


def resolutions(slack: SlackStandIn, posted: Message) -> int:
    return sum("resolved after" in m.text for m in replies(slack, posted))


def top(slack: SlackStandIn, word: str) -> list[Message]:
    return [m for m in slack.channel_messages(CHANNEL, include_threads=False, include_ephemeral=False)
            if m.source == "chat.postMessage" and word in m.text]


class Rounds:
    """The watch's rounds that ended, counted around the real Watcher.round of each bot: "nothing more is
    posted" is asserted after rounds that would have posted it (the watch runs one a second in these tests),
    not after a pause."""

    def __init__(self, *bots: BotServer) -> None:
        self.done = 0
        for bot in bots:
            watcher = must(bot.runtime.watcher)
            real = watcher.round

            async def counted(cluster: ClusterConfig, real: Callable[[ClusterConfig], Awaitable[list[Decision]]] = real
                              ) -> list[Decision]:
                try:
                    return await real(cluster)
                finally:
                    self.done += 1
            watcher.round = counted  # type: ignore[method-assign]

    async def after(self, n: int = 2) -> None:
        start = self.done
        await eventually(lambda: self.done >= start + n, 10, f"{n} more rounds of the watch")


async def test_without_a_token_the_receiver_is_off(cluster: LocalCluster, slack: SlackStandIn,
                                                   start_bot: StartBot) -> None:
    bot = await start_bot([cluster_table("prod", cluster)])
    assert (await post(bot, delivery(alert("etcdNoLeader")), "anything"))[0] == 404


async def test_refused_deliveries_change_nothing_and_no_log_holds_the_token(
        cluster: LocalCluster, slack: SlackStandIn, start_bot: StartBot, token: dict[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bot = await start_bot([cluster_table("prod", cluster, watch={"enabled": False, "interval": "1s"})],
                          alertmanager=am_config(token))
    rounds = Rounds(bot)
    good = delivery(alert("etcdNoLeader"))
    wrong = secrets.token_urlsafe(24)
    prometheus_module.ISSUED.append(wrong)
    for given, scheme in ((None, "Bearer"), (wrong, "Bearer"), (token["value"], "Basic"), ("", "Bearer"),
                          (token["value"][:-1], "Bearer")):
        status, body = await post(bot, good, given, scheme)
        assert status == 401 and "missing or wrong bearer token" in body, (given, scheme)
    huge = json.dumps(delivery(*[alert(f"a{i}", annotations={"description": "x" * 2000}) for i in range(600)]))
    assert len(huge) > alertmanager.MAX_BODY
    assert (await post(bot, huge.encode(), token["value"]))[0] == 413
    chunks = [huge[i:i + 65536].encode() for i in range(0, len(huge), 65536)]

    async def streamed() -> AsyncIterator[bytes]:   # no Content-Length: the body is counted as it arrives
        for chunk in chunks:
            yield chunk
    async with aiohttp.ClientSession() as http, http.post(f"{bot.base_url}/alertmanager", data=streamed(),
                                                          headers={"Authorization": f"Bearer {token['value']}"}) as r:
        assert r.status == 413
    for bad in (b"{not json", json.dumps({**good, "version": "3"}).encode()):
        status, body = await post(bot, bad, token["value"])
        assert status == 400 and json.loads(body)["error"], body
    assert await bot.ctx.store.received_alerts("prod") == []
    await rounds.after()
    assert slack.channel_messages(CHANNEL, include_threads=True, include_ephemeral=True) == []
    logged = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert token["value"] not in logged and wrong not in logged and "delivery refused" in logged


async def test_an_unknown_alert_is_posted_once_however_often_delivered_and_resolved_in_its_thread(
        cluster: LocalCluster, slack: SlackStandIn, start_bot: StartBot, token: dict[str, str]) -> None:
    """The cluster's own watch is off: Alertmanager's alerts are still posted, plainly, with the runbook."""
    bot = await start_bot([cluster_table("prod", cluster, watch={"enabled": False, "interval": "1s"})],
                          alertmanager=am_config(token))
    rounds = Rounds(bot)
    odd = alert("KubeletTooManyPods", fingerprint="0123456789abcdef",
                annotations={"summary": "Too many pods on node-3 <!here>", "runbook_url": "https://runbooks.example/p"})
    sent = time.monotonic()
    status, body = await post(bot, delivery(odd), token["value"])
    assert status == 200 and json.loads(body) == {"changed": 1, "repeated": 0, "unmatched": 0}
    posted = await slack.wait_for(lambda: next(iter(top(slack, "ALERT KubeletTooManyPods")), None), 10,
                                  "the alert posted")
    took = time.monotonic() - sent
    shown = text_of(posted)
    assert "Too many pods on node-3 &lt;!here&gt;" in shown and "<https://runbooks.example/p|runbook:" in shown
    assert "seen by Alertmanager (KubeletTooManyPods)" in shown
    for _ in range(3):   # Alertmanager's repeat_interval, and its retries
        assert json.loads((await post(bot, delivery(odd), token["value"]))[1])["repeated"] == 1
    listing = await reply(slack, "alerts prod")
    assert "1 open condition" in listing.text and "seen by Alertmanager (KubeletTooManyPods)" in listing.text
    await post(bot, delivery(alert("KubeletTooManyPods", "resolved", fingerprint="0123456789abcdef",
                                   annotations=odd["annotations"])), token["value"])
    await slack.wait_for(lambda: "resolved after" in thread(slack, posted), 10, "the resolution in the thread")
    await post(bot, delivery(alert("KubeletTooManyPods", "resolved", fingerprint="0123456789abcdef")),
               token["value"])
    await rounds.after()
    assert len(top(slack, "ALERT KubeletTooManyPods")) == 1 and resolutions(slack, posted) == 1
    print(f"delivery to message (this replica leads): {took * 1000:.0f} ms")


async def test_an_alert_of_no_cluster_is_counted_and_logged_once_and_not_posted(
        cluster: LocalCluster, slack: SlackStandIn, start_bot: StartBot, token: dict[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    bot = await start_bot([cluster_table("prod", cluster, alert_labels={"job": "etcd-prod"})],
                          alertmanager=am_config(token))
    stray = alert("etcdNoLeader", fingerprint="feedfacefeedface", job="etcd-staging")
    mine = alert("etcdNoLeader", fingerprint="0000000000000001", job="etcd-prod", cluster="whatever")
    for _ in range(2):
        status, body = await post(bot, delivery(stray, mine), token["value"])
        assert status == 200 and json.loads(body)["unmatched"] == 1
    async with aiohttp.ClientSession() as http, http.get(f"{bot.base_url}/metrics") as r:
        page = await r.text()
    assert "etcd_chatops_alertmanager_unmatched_total 2.0" in page
    lines = [r for r in caplog.records if "matches no cluster" in r.getMessage()]
    assert len(lines) == 1 and lines[0].__dict__["ctx_labels"]["job"] == "etcd-staging"
    (posted,) = await slack.wait_for(lambda: top(slack, "NO LEADER") or None, 10, "the matched alert posted")
    assert "cluster *prod*" in text_of(posted)


async def test_alertmanager_and_the_watch_on_one_member_down_are_one_message_whichever_ends_first(
        make_cluster: Callable[..., LocalCluster], slack: SlackStandIn, start_bot: StartBot,
        token: dict[str, str]) -> None:
    """A member dies: the watch and Alertmanager's etcdMembersDown are one message, with the bot's replace
    command, saying both saw it. Alertmanager resolving first leaves it open (the watch still sees it down);
    the member back, the watch resolves it in its thread, once."""
    c = make_cluster(3)
    bot = await start_bot([cluster_table("prod", c, watch={"interval": "1s", "grace": "2s"}, timeout_seconds=0.5)],
                          alertmanager=am_config(token))
    health = await bot.ctx.check(bot.ctx.config.clusters[0])
    victim = next(h.member.name for h in health.members if h.member.id != health.leader_id)  # no election
    c.kill(victim)
    down = alert("etcdMembersDown", fingerprint="00000000000000aa")
    assert (await post(bot, delivery(down), token["value"]))[0] == 200   # before the watch's grace ends
    posted = await slack.wait_for(lambda: next(iter(top(slack, f"MEMBER DOWN {victim}")), None), 10,
                                  "one member-down message")
    await slack.wait_for(lambda: "seen by the watch and Alertmanager (etcdMembersDown)" in text_of(posted), 10,
                         "the message to say both saw it")
    assert f"/etcd replace {victim} member4 http://NEW-HOST:" in text_of(posted)
    await post(bot, delivery(alert("etcdMembersDown", "resolved", fingerprint="00000000000000aa")), token["value"])
    await slack.wait_for(lambda: "seen by the watch" in text_of(posted) and "Alertmanager" not in text_of(posted), 10,
                         "the message held by the watch alone")
    assert "resolved" not in thread(slack, posted)
    await asyncio.to_thread(c.restart, victim)
    await slack.wait_for(lambda: "resolved after" in thread(slack, posted), 15, "the resolution in the thread")
    assert len(top(slack, "MEMBER DOWN")) == 1 and resolutions(slack, posted) == 1


async def test_a_quorum_loss_the_bot_cannot_see_is_never_a_restore_and_a_mute_holds_alertmanager_too(
        slack: SlackStandIn, start_bot: StartBot, token: dict[str, str]) -> None:
    """Nothing answers the bot: etcdInsufficientMembers says so, suggests looking, never a restore. Muted,
    Alertmanager's alerts are held back like the watch's (and /etcd alerts says so); unmuted, posted."""
    dead = {"name": "prod", "endpoints": [f"http://127.0.0.1:{free_port()}"], "channels": [CHANNEL],
            "watch": {"enabled": False, "interval": "1s"}, "timeout_seconds": 0.5}
    bot = await start_bot([dead], alertmanager=am_config(token))
    await reply(slack, "mute prod 1h maintenance", user=LEAD)
    lost = alert("etcdInsufficientMembers", fingerprint="00000000000000bb", severity="critical")
    assert (await post(bot, delivery(lost), token["value"]))[0] == 200
    watcher = must(bot.runtime.watcher)
    await eventually(lambda: "prod" in watcher.clusters and bool(watcher.clusters["prod"].held), 10,
                     "the alert held back")
    listing = (await reply(slack, "alerts prod")).text
    assert "held back: muted" in listing and "quorum lost cluster" in listing
    assert top(slack, "QUORUM LOST") == []
    await reply(slack, "unmute prod", user=LEAD)
    posted = await slack.wait_for(lambda: next(iter(top(slack, "QUORUM LOST")), None), 10, "posted once unmuted")
    shown = text_of(posted)
    assert "the bot reaches no member of prod, so it cannot confirm it" in shown and "CRITICAL" in shown
    assert "/etcd restore" not in shown and "`/etcd status prod`" in shown


async def test_two_replicas_receiving_the_same_deliveries_post_one_message(
        cluster: LocalCluster, slack: SlackStandIn, start_bot: StartBot, token: dict[str, str],
        postgres: LocalPostgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two bots on one PostgreSQL; Alertmanager's deliveries reach either (a Service) or both (two
    Alertmanagers in HA): one message, posted by the leader, one resolution."""
    monkeypatch.setenv(PASSWORD_ENV, postgres.password)
    shared = {"database": postgres.create_database(), "database_password_env": PASSWORD_ENV,
              "alertmanager": am_config(token)}
    table = cluster_table("prod", cluster, watch={"enabled": False, "interval": "1s"})
    a = await start_bot([table], replicas={"replica_id": "replica-a", "lease_seconds": 3}, **shared)
    b = await start_bot([table], replicas={"replica_id": "replica-b", "lease_seconds": 3}, **shared)
    rounds = Rounds(a, b)   # the leader's rounds (the other's loop only waits)
    await eventually(lambda: a.ctx.is_leader() != b.ctx.is_leader(), 10, "one leader")
    follower = b if a.ctx.is_leader() else a
    slow = alert("etcdHighCommitDurations", fingerprint="00000000000000cc", instance="10.9.9.9:2379")
    sent = time.monotonic()
    answers = await asyncio.gather(post(a, delivery(slow), token["value"]), post(b, delivery(slow), token["value"]))
    assert sorted(json.loads(body)["changed"] for _, body in answers) == [0, 1]   # one replica's write wins
    posted = await slack.wait_for(lambda: next(iter(top(slack, "SLOW BACKEND COMMIT")), None), 10, "the alert")
    took = time.monotonic() - sent
    sent = time.monotonic()
    await post(follower, delivery(alert("etcdHighCommitDurations", "resolved", fingerprint="00000000000000cc")),
               token["value"])
    await slack.wait_for(lambda: "resolved after" in thread(slack, posted), 10, "the resolution from the follower")
    via_follower = time.monotonic() - sent
    await rounds.after()
    assert len(top(slack, "SLOW BACKEND COMMIT")) == 1 and resolutions(slack, posted) == 1
    print(f"delivery to message with two replicas: {took * 1000:.0f} ms (both received it); "
          f"resolution delivered to the follower only, to its note: {via_follower * 1000:.0f} ms")


def test_cluster_config_alert_labels_default_to_the_cluster_label() -> None:
    assert ClusterConfig(name="prod", endpoints=("http://a:1",)).alert_match == {"cluster": "prod"}


async def test_a_replica_that_becomes_leader_posts_what_another_replica_received_within_a_second(
        cluster: LocalCluster, tmp_path: Path, token: dict[str, str]) -> None:
    """The leader's watch of a cluster (a round a minute) did not run yet when this replica became leader; an
    alert another replica filed meanwhile is posted within the poll, not at the next round (before: up to 60 s)."""
    from bot.config import load_config
    from bot.ops.context import BotContext
    from bot.ops.notify import PlainDirectory, PlainNotifier
    from bot.testing.workspace import write_config
    from bot.watch.watcher import POLL_SECONDS, Watcher
    table = cluster_table("prod", cluster, watch={"enabled": False, "interval": "60s"})
    config = load_config(write_config(tmp_path, [table], alertmanager=am_config(token)))
    notifier = PlainNotifier()
    ctx = await BotContext.open(config, notifier, PlainDirectory())
    leading = False
    watcher = Watcher(ctx, should_watch=lambda: leading)
    task = asyncio.create_task(watcher.run())
    try:
        await eventually(lambda: "prod" in watcher._wakes, 5, "its first turn, while another replica leads")
        leading = True
        (filed,) = received(alert("etcdHighCommitDurations", fingerprint="00000000000000dd"))
        assert await ctx.store.receive_alert(dataclasses.replace(filed, cluster="prod"))   # another replica's write
        await eventually(lambda: any("SLOW BACKEND COMMIT" in line for line in notifier.lines),
                         POLL_SECONDS + 10, "the alert posted by the new leader")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ctx.close()
