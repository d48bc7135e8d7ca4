"""The read commands (`/etcd status`, `members`, `plans`, `help`) end to end: real etcd, real bolt, the Slack
stand-in."""
from __future__ import annotations

import asyncio
import json
import re
import sys
import time

import pytest

from bot.domain.errors import EtcdError
from bot.etcd.client import EtcdClient
from bot.output.units import humanize_bytes
from bot.testing.workspace import CHANNEL, LEAD, ONCALL, cluster_table
from helpers import (
    APPROVAL,
    OK,
    QUOTA,
    QUOTA_ARGS,
    command,
    ephemeral,
    eventually,
    fill_until_nospace,
    live_markup,
    majority_leads,
    must,
    plan_row,
    propose,
    reply,
    text_of,
    thread,
    urls,
    wait_state,
)


async def test_status_of_a_healthy_cluster(cluster, slack, start_bot):
    await start_bot([cluster_table("prod", cluster)])
    started = time.monotonic()
    delivery = await command(slack, "status")
    assert delivery.body == ""  # acknowledged at once, the answer follows in the channel
    assert delivery.elapsed < 1.0
    msg = await slack.wait_for_message(lambda m: m.source == "chat.postMessage", what="the status reply")
    text = text_of(msg)
    assert msg.channel == CHANNEL and msg.ephemeral_to is None and msg.blocks
    assert "etcd cluster prod: HEALTHY" in text
    assert "3 of 3 voting members healthy, quorum needs 2, tolerates 1 more failure" in text
    for name, member in cluster.members.items():
        assert name in text and member.peer_url in text and member.client_url in text
    assert not re.findall(r"[0-9a-f]{16}", text)  # members by name: no two share one (`members` lists the IDs)
    assert text.count("— leader") == 1 and text.count("— follower") == 2
    assert "v3.5" in text and "DB " in text and "raft index" in text
    assert f"<@{ONCALL}>" in text
    assert time.monotonic() - started < 5


async def test_a_killed_member_is_unmistakably_down(make_cluster, slack, start_bot):
    c = make_cluster(3)
    await start_bot([cluster_table("prod", c, timeout_seconds=2.0)])
    c.kill("member1")
    started = time.monotonic()
    msg = await reply(slack, "status")
    elapsed = time.monotonic() - started
    text = text_of(msg)
    assert "etcd cluster prod: DEGRADED" in text
    assert "2 of 3 voting members healthy, quorum needs 2, tolerates 0 more failures" in text
    down = next(line for line in text.splitlines() if "*member1*" in line)
    assert ":red_circle:" in down and "*DOWN*" in down and "connection refused" in down
    assert "DOWN: member1" in msg.text  # the notification text says it too
    assert elapsed < 2.0 + 1.0  # within about one deadline (a refused connection costs none)


async def test_a_silent_member_costs_one_deadline_not_one_per_call(make_bed, slack, start_bot):
    c = make_bed(3)
    await start_bot([cluster_table("prod", c, timeout_seconds=1.5)])
    c.isolate("member3")  # its host is cut off: nothing answers, not even a refusal
    started = time.monotonic()
    msg = await reply(slack, "status")
    elapsed = time.monotonic() - started
    text = text_of(msg)
    assert "member3" in text and "no answer within 1.5s" in text
    assert 1.5 <= elapsed < 1.5 * 2


async def test_a_member_cut_from_its_peers_is_unhealthy_not_a_follower(make_bed, slack, start_bot):
    """A member cut from its peers still answers the bot, and its own Status says only that it has no leader
    while the other two follow one: it is not healthy (its reads are stale, it takes no writes), and the
    cluster is degraded, not healthy."""
    c = make_bed(3)
    await start_bot([cluster_table("prod", c, timeout_seconds=1.0)])
    c.cut_from_peers("member3")
    async with EtcdClient(c.endpoints, timeout=1.0) as client:
        await eventually(lambda: _leaderless(client, c.member("member3").client_url), 10, "member3 without a leader",
                         retry_on=(EtcdError,))
        # Had member3 led, the other two may still name it, or be electing: asked then, member3 is not
        # "cut off" (nobody follows a leader). The test asks once they follow one of themselves.
        await majority_leads(client, [c.member("member1").client_url, c.member("member2").client_url])
    text = text_of(await reply(slack, "status"))
    assert "etcd cluster prod: DEGRADED" in text and "2 of 3 voting members healthy" in text, text
    line = next(line for line in text.splitlines() if "*member3*" in line)
    assert "*UNHEALTHY*" in line and "cut off from its peers" in line and "follower" not in line, line
    c.heal("member3")
    await eventually(lambda: _says(slack, "etcd cluster prod: HEALTHY"), 15, "the cluster healthy after the heal")


async def _leaderless(client: EtcdClient, url: str) -> bool:
    return (await client.status(url)).leader == 0


async def _says(slack, words: str) -> bool:
    return words in text_of(await reply(slack, "status"))


async def test_members_lists_like_etcdctl(cluster, slack, start_bot):
    await start_bot([cluster_table("prod", cluster)])
    msg = await reply(slack, "members prod")
    for name, member in cluster.members.items():
        assert re.search(rf"[0-9a-f]{{16}}, started, {name}, {member.peer_url}, {member.client_url}, false",
                         text_of(msg))


async def test_mutual_tls_cluster_with_and_without_certificates(make_cluster, slack, start_bot):
    c = make_cluster(3, tls=True)
    with_certs = cluster_table("secure", c)
    without = {**cluster_table("bare", c, channels=("C0ELSEWHERE",)), "cert": None, "key": None}
    without = {k: v for k, v in without.items() if v is not None}
    bot = await start_bot([with_certs])   # one bot each: a config may not name one etcd twice
    assert "etcd cluster secure: HEALTHY" in text_of(await reply(slack, "status"))
    await bot.stop()
    await start_bot([without])
    msg = await reply(slack, "status", channel="C0ELSEWHERE")
    assert "etcd cluster bare: UNREACHABLE" in text_of(msg)
    assert "TLS handshake failed" in text_of(msg) and "client certificate" in text_of(msg)


async def test_requests_not_signed_by_slack_are_refused_and_cause_nothing(cluster, slack, start_bot, creds):
    bot = await start_bot([cluster_table("prod", cluster)])
    unsigned = await slack.send_command("status", user_id=ONCALL, channel_id=CHANNEL, sign=False)
    stale = await slack.send_command("status", user_id=ONCALL, channel_id=CHANNEL, timestamp=int(time.time()) - 301)
    forged = await slack.send_command("status", user_id=ONCALL, channel_id=CHANNEL, signing_secret="not-the-secret")
    assert [unsigned.status, stale.status, forged.status] == [401, 401, 401]
    await reply(slack, "status")  # a genuine request, answered
    # let anything the refused requests might have started finish: every listener has returned
    await eventually(lambda: not bot.ctx.tasks, 10, "the bot to finish every listener it started")
    posts = slack.calls_to("chat.postMessage")
    assert len(posts) == 1, f"refused requests caused posts: {[c.args for c in posts]}"


async def test_an_unbound_channel_gets_one_line_and_the_usage(cluster, slack, start_bot):
    await start_bot([cluster_table("prod", cluster)])
    msg = await ephemeral(slack, "status", channel="C0ELSEWHERE")
    assert "this channel is not bound to any etcd cluster" in text_of(msg)
    assert "/etcd status [cluster]" in text_of(msg)
    assert msg.source == "ack" and not slack.calls_to("chat.postMessage")


async def test_unknown_cluster_and_subcommand(cluster, slack, start_bot):
    await start_bot([cluster_table("prod", cluster)])
    msg = await ephemeral(slack, "status staging")
    assert "unknown cluster 'staging'" in text_of(msg) and "Usage" in text_of(msg)
    msg = await ephemeral(slack, "reboot everything")
    assert "unknown subcommand 'reboot'" in text_of(msg) and "| replace |" in text_of(msg)
    assert not slack.calls_to("chat.postMessage")


async def test_help(cluster, slack, start_bot):
    await start_bot([cluster_table("prod", cluster)])
    msg = await ephemeral(slack, "help")
    for sub in ("status", "members", "replace", "snapshot", "snapshots", "plans", "resume", "cancel"):
        assert f"/etcd {sub}" in text_of(msg)
    assert "This channel speaks for: prod" in text_of(msg)


async def test_member_names_from_etcd_never_become_slack_markup(make_cluster, slack, start_bot, tmp_path):
    """A member named `<!channel>…` (etcd accepts any name) is shown, escaped, in every answer:
    status (blocks and notification text), members, snapshot, snapshots, plans and refusals."""
    prefix = "<!channel><@U0LEAD0001>`*"
    c = make_cluster(3, prefix=prefix)
    await start_bot([cluster_table("prod", c, timeout_seconds=2.0)])
    c.kill(f"{prefix}3")
    start = len(slack.messages)
    status = await reply(slack, "status")
    assert "DOWN: &lt;!channel&gt;&lt;@U0LEAD0001&gt;`*3" in status.text
    listing = must((await reply(slack, "members")).blocks)[1]["text"]["text"]  # a code block no name can end early
    assert "started, &lt;!channel&gt;&lt;@U0LEAD0001&gt;\u02cb*1, " in listing and "`" not in listing[3:-3]
    assert "verified" in text_of(await reply(slack, "snapshot", timeout=60))
    await reply(slack, "snapshots")
    await reply(slack, "plans")
    refusal = await ephemeral(slack, f"replace {prefix}1 member9 http://127.0.0.1:1")
    assert "still answers" in text_of(refusal) and "&lt;!channel&gt;" in refusal.text
    posted = slack.messages[start:]
    assert len(posted) == 6
    assert not [(m.text[:120], live_markup(m)) for m in posted if live_markup(m)]


async def test_plans_gives_each_plan_one_line_and_leaves_launcher_output_to_the_thread(make_cluster, slack, start_bot):
    c = make_cluster(3)
    table = cluster_table("prod", c)
    noisy = "import sys; [print('+ etcd --name member4 step', i, '<!channel>') for i in range(60)]; sys.exit(3)"
    table["launcher"] = {"kind": "command", "argv": [sys.executable, "-c", noisy], "timeout_seconds": 30}
    bot = await start_bot([table], approval=APPROVAL)
    c.kill("member1")
    peer, client = urls()
    plan = await propose(slack, f"replace member1 member4 {peer} --client-url {client}")
    row = await plan_row(bot.ctx.store, plan)
    await slack.react(user=LEAD, channel=CHANNEL, ts=plan.ts, reaction=OK)
    await wait_state(bot.ctx.store, row["id"], ("failed",))
    await slack.wait_for(lambda: "step 59" in thread(slack, plan), what="the launcher's output in the plan's thread")

    listing = await reply(slack, "plans")
    (line,) = [line for line in listing.text.splitlines() if row["id"] in line]
    assert "FAILED · replace member1 with member4 · by" in line and line.endswith("…")
    assert "step 59" not in listing.text and len(line) < 400
    assert not live_markup(listing)
async def test_a_running_learner_is_up_on_a_cluster_with_auth(make_cluster, slack, start_bot):
    """With etcd auth on, a learner refuses authenticated RPCs ("rpc not supported for
    learner"); its status is still read, so it shows up as the learner it is."""
    from conftest import TEST_ETCD_PASSWORD
    c = make_cluster(3)
    c.enable_auth(TEST_ETCD_PASSWORD)
    await start_bot([cluster_table("prod", c)])
    await asyncio.to_thread(c.add_member, "member4", learner=True)
    text = text_of(await reply(slack, "status"))
    line = next(line for line in text.splitlines() if "*member4*" in line)
    assert "DOWN" not in line and ":large_green_circle:" in line and "— learner" in line, line
    assert "etcd cluster prod: HEALTHY" in text


@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "auth"])
async def test_under_quorum_loss_no_survivor_is_a_green_follower(make_cluster, slack, start_bot, auth):
    """With auth on, Authenticate needs a leader: the member list is then read without a token."""
    from conftest import TEST_ETCD_PASSWORD
    c = make_cluster(3)
    if auth:
        c.enable_auth(TEST_ETCD_PASSWORD)
    # With auth, an Authenticate that finds no leader takes half of a read's deadline, and the survivor's Status
    # has the rest. What is shown is under test here, not the deadline, so it is long. (The survivor was shown DOWN
    # once with 2 s and once with 5 s: the member list's wait for the token and the Status's ended together with
    # the Authenticate's deadline, which closed the channel under the Status. test_etcd.py's
    # test_an_authenticate_that_finds_no_leader_cuts_no_other_call_to_that_member keeps that fixed.)
    await start_bot([cluster_table("prod", c, timeout_seconds=5.0)])
    c.kill("member1")
    c.kill("member2")
    text = text_of(await reply(slack, "status"))
    assert "etcd cluster prod: QUORUM LOST" in text
    survivor = next(line for line in text.splitlines() if "*member3*" in line)
    assert "follower" not in survivor and ":large_green_circle:" not in survivor, survivor
    assert "no leader" in survivor and ":large_orange_circle:" in survivor


async def test_nospace_shows_first_with_the_quota_and_the_defrag_to_run(make_cluster, slack, start_bot, cli):
    c = make_cluster(3, extra_args=QUOTA_ARGS)
    await fill_until_nospace(c)
    await start_bot([cluster_table("prod", c)])
    msg = await reply(slack, "status")
    text = text_of(msg)
    assert "*ALARM NOSPACE*" in text
    shown = text[len(msg.text):]  # the blocks
    assert shown.index("ALARM NOSPACE") < shown.index("/etcd defrag prod") < shown.index("raft index")
    assert "etcd refuses writes; run /etcd defrag prod" in msg.text  # the notification says it too
    assert text.count(f"% of {humanize_bytes(QUOTA)} quota)") == 3  # each member's quota, read from its /metrics
    proc = cli("status", "--endpoints", ",".join(c.endpoints), "--json")
    out = json.loads(proc.stdout)
    assert proc.returncode == 1 and {a["alarm"] for a in out["alarms"]} == {"NOSPACE"}  # raised by one or more
    for m in out["members"]:
        assert m["quota_bytes"] == QUOTA and m["quota_usage"] > 0.8 and m["quota_error"] is None
        assert m["db_size"] > 0.8 * QUOTA and m["db_size_in_use"] > 0  # the fields that were there stay
    assert any("/etcd defrag" in line for line in out["advice"])
