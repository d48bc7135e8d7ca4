"""Property-based fuzzing (Hypothesis) of everything that reads input nobody controls.

1. `bot.commands.parse` on any text: a Command, or a UsageError with a
   one-line reason and a usage; never anything else.
2. Any `/etcd` text through the real bot (slack-bolt over HTTP, the Slack
   stand-in, a real 3-member cluster): acknowledged with 200, answered, no
   traceback in any message, nothing changed.
3. Any `reaction_added`-like event: acknowledged with 200, no traceback, and
   a plan changes state only when the approval or rejection reaction of an
   allowed person lands on that plan's message.
4. A real snapshot with flipped bits or cut short: with etcd's sha256 trailer
   every such damage is refused with one line; without it, a status or one
   line; each read within a hard time budget.

The end-to-end properties (2, 3) run many examples against ONE bot per test:
pytest-asyncio runs each example of an `async def` `@given` test on the test's
own event loop, after the function-scoped fixtures (stand-in, bot, cluster)
were set up once. That is what we want here (starting a bot per example would
cost seconds), so Hypothesis' function-scoped-fixture health check is
suppressed on purpose, and every example checks its properties against the
state it found when it began, never against a fresh bot.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from bot.commands.grammar import Command, UsageError
from bot.commands.registry import specs
from bot.commands.table import parse
from bot.config import parse_duration
from bot.domain.cluster import ClusterHealth
from bot.domain.mrkdwn import escape
from bot.domain.snapshot import SnapshotError
from bot.domain.urls import Unusable, parse_url, read_url, shown_urls, usable_urls
from bot.etcd.bbolt import snapshot_status
from bot.etcd.client import EtcdClient
from bot.etcd.health import check_cluster
from bot.testing.cluster import LocalCluster, free_port
from bot.testing.slack import Message, SlackStandIn
from bot.testing.workspace import CHANNEL, LEAD, LEAD2, LEADS_GROUP, ONCALL, STRANGER, cluster_table
from helpers import eventually, is_plan_message, live_markup, text_of
from snapshot_fixtures import ScenarioCluster, put_many, save_snapshot

SPECS = specs()

OTHER_CHANNEL = "C0ELSEWHERE"  # a channel of the workspace bound to no cluster
APPROVAL = {"approvers": [LEAD, ONCALL], "approver_groups": [LEADS_GROUP], "ttl_minutes": 30,
            "reaction": "white_check_mark", "reject_reaction": "x"}
APPROVERS = {LEAD, ONCALL, LEAD2}  # LEAD2 through the user group
PROPOSER = ONCALL                  # an approver, who may not approve their own plan (allow_self_approval off)

# No example database in the work tree (failures print the example and a reproduction blob instead).
FUZZ = settings(database=None, print_blob=True, deadline=None)
E2E = settings(FUZZ, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
QUIET_TIMEOUT = 30.0  # seconds an answer may take before an example fails (a status takes milliseconds)


# ---------------------------------------------------------------- strategies: command text

KNOWN_WORDS = [*SPECS, "STATUS", "Replace", "snapshot", "-h", "--help", "prod", "staging", "member1", "member4",
               "8211f1d0f64f3269", "p-0001", ""]
OPTIONS = ["--cluster", "--cluster=prod", "--cluster=", "--client-url", "--client-url=http://10.0.0.5:2379",
           "--no-learner", "--no-learner=yes", "--help", "-h", "--", "---", "--colour"]
URL_SAMPLES = ["http://10.0.0.4:2380", "https://10.0.0.4:2380", "http://[::1]:2380", "10.0.0.4:2380",
               "http://h:0", "http://h:65536", "http://h:x", "http://u:p@h:1", "ftp://h:1", "http://h:1/p",
               "http://h:1?q", "http://-bad-:1", "http://[::1:2380", "http://10.0.0.4:2380/", "http://"]
ODD = ["&amp;", "&lt;", "&gt;", "&amp;lt;", "&", "<", ">", "<>", "<<http://x|y>>", "\u201c", "\u201d", "\u2018",
       "\u2019", "\u00a0", '"', "'", "\\", "`", "*", "<@U0LEAD0001>", "<!channel>", "<#C0INCIDENT|inc>",
       "<!subteam^S0ONCALLLD>", "\x00", "\x1b[31m", "\u202e", "\ufeff", "\U0001F525", "e\u0301"]
CONTROL = [chr(i) for i in range(32)] + ["\x7f", "\x85", "\u2028", "\u2029", "\u3000"]

urls = st.one_of(
    st.sampled_from(URL_SAMPLES),
    st.builds(lambda host, port, scheme: f"{scheme}://{host}:{port}",
              st.one_of(st.sampled_from(["127.0.0.1", "10.0.0.4", "etcd-4.example", "[::1]"]), st.text(max_size=8)),
              st.integers(-2, 70000), st.sampled_from(["http", "https", "HTTP", "grpc"])),
)
slack_links = st.builds(lambda url, label, labelled: f"<{url}|{label}>" if labelled else f"<{url}>",
                        urls, st.text(max_size=10), st.booleans())
tokens = st.one_of(
    st.sampled_from(KNOWN_WORDS), st.sampled_from(OPTIONS), urls, slack_links, st.sampled_from(ODD),
    st.sampled_from(CONTROL), st.text(max_size=12),
    st.builds(lambda word, quote: f"{quote}{word}{quote}", st.sampled_from(KNOWN_WORDS),
              st.sampled_from(['"', "'", "\u201c", "\u2018", "&quot;"])),
)
separators = st.sampled_from([" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", ""])
mixed = st.lists(st.tuples(tokens, separators), max_size=9).map(lambda parts: "".join(t + s for t, s in parts))
long_texts = st.builds(lambda word, chunk, n: f"{word} {chunk * n}", st.sampled_from(KNOWN_WORDS),
                       st.sampled_from(["x", "member1 ", "\"", "<http://h:1|h>", "&amp;", "\u00e9", "--cluster "]),
                       st.integers(500, 6000))
any_text = st.one_of(st.text(), mixed, mixed.map(str.upper), long_texts,
                     st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=1500))


def _is_one_line(text: str) -> bool:
    return bool(text) and len(text.splitlines()) == 1 and "\r" not in text and "\n" not in text


# ---------------------------------------------------------------- 1. parse: pure

@pytest.mark.slow
@settings(FUZZ, max_examples=1500)
@given(any_text)
def test_parse_returns_a_command_or_a_one_line_usage_error(text):
    try:
        cmd = parse(text)
    except UsageError as e:
        assert isinstance(e.reason, str) and _is_one_line(e.reason), f"reason is not one line: {e.reason!r}"
        assert isinstance(e.usage, str) and e.usage.strip() and "/etcd" in e.usage
        return
    # Anything else escaping is the failure Hypothesis reports. A Command must be one the specs allow.
    assert isinstance(cmd, Command) and cmd.name in SPECS
    spec = cmd.spec
    assert cmd.flags <= {f.lstrip("-").replace("-", "_") for f in spec.flags}
    allowed = {p.strip("[]").replace("-", "_") for p in spec.positionals} | \
              {o.lstrip("-").replace("-", "_") for o in spec.options}
    if cmd.name == "help":
        allowed.add("topic")
        assert cmd.args.get("topic", "help") in SPECS
    assert set(cmd.args) <= allowed
    for key in spec.urls:
        if key in cmd.args:  # a URL is normalised once: parsing the result gives it back
            assert parse_url(cmd.args[key]).url == cmd.args[key]
    for key in spec.durations:
        assert parse_duration(cmd.args[key]) >= 1
    rest = spec.positionals[-1].strip("[]").replace("-", "_") if spec.rest else None
    if rest is not None and (rest in cmd.args or spec.positionals[-1][0] != "["):
        # free text (required, or optional and given) is stored and posted: one line, no control characters
        text = cmd.args[rest]
        assert text and text == text.strip() and not any(unicodedata.category(ch) == "Cc" for ch in text)


@settings(FUZZ, max_examples=500)
@given(st.one_of(urls, st.text(), st.builds(lambda u, t: u + t, urls, st.text(max_size=6))))
def test_a_url_etcd_hands_back_is_read_never_raised(text):
    """Member lists hold whatever `member add` was given: reading one is total."""
    found = read_url(text)
    if isinstance(found, Unusable):
        assert str(found).startswith("unusable URL ") and found.text == text
        with pytest.raises(ValueError):
            parse_url(text)
    else:
        assert read_url(found.url) == found and parse_url(text) == found
    assert shown_urls([text]) and usable_urls([text]) == ([] if isinstance(found, Unusable) else [found.url])


# ---------------------------------------------------------------- 2. any /etcd text through the bot

def _valid_commands() -> st.SearchStrategy[str]:
    """Texts that parse: every subcommand with plausible and odd arguments."""
    cluster_arg = st.sampled_from(["", " prod", " --cluster prod", " --cluster=prod", " staging", " --cluster staging"])
    failed = st.sampled_from(["member1", "member2", "member3", "member9", "MEMBER1", "0000000000000001", '""'])
    new_name = st.sampled_from(["member4", "member2", "m-5", "x" * 70])
    peer = st.sampled_from(["http://127.0.0.1:{port}", "http://10.255.255.1:2380", "https://[::1]:{port}",
                            "<http://127.0.0.1:{port}|127.0.0.1:{port}>"])
    replace = st.builds(
        lambda f, n, p, port, client, learner, c: f"replace {f} {n} {p.format(port=port)}"
                                                   f"{client}{learner}{c}",
        failed, new_name, peer, st.integers(20000, 60000),
        st.sampled_from(["", " --client-url http://127.0.0.1:23790", " --client-url=http://10.0.0.9:2379"]),
        st.sampled_from(["", " --no-learner"]), st.sampled_from(["", " --cluster prod", " --cluster=staging"]))
    simple = st.builds(lambda name, c: f"{name}{c}", st.sampled_from(["status", "members", "plans", "snapshots"]),
                       cluster_arg)
    plan_ids = st.builds(lambda name, pid: f"{name} {pid}", st.sampled_from(["cancel", "resume"]),
                         st.one_of(st.sampled_from(["p-0001", "'; drop table plans; --", "%", "_"]),
                                   st.text(alphabet="0123456789abcdef-", min_size=1, max_size=12)))
    helps = st.builds(lambda name, flag: f"{name} {flag}".strip(), st.sampled_from(["", *SPECS]),
                      st.sampled_from(["", "--help", "-h"]))
    return st.one_of(simple, replace, plan_ids, helps)


command_texts = st.one_of(_valid_commands(), _valid_commands(), mixed, st.text(max_size=40), long_texts)
users = st.sampled_from([ONCALL, LEAD, LEAD2, STRANGER])
channels = st.sampled_from([CHANNEL, CHANNEL, CHANNEL, OTHER_CHANNEL])


def _traceback_free(messages: list[Message]) -> None:
    for m in messages:
        text = text_of(m)
        for leak in ("Traceback", 'File "', "failed inside the bot"):
            assert leak not in text, f"a Slack message shows {leak!r}: {text[:500]!r}"


def _listener_failures(records: list[logging.LogRecord]) -> list[str]:
    """Errors the bot logged because a listener or a command crashed (the person got no proper answer)."""
    return [f"{r.name}: {r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else f"{r.name}: {r.getMessage()}"
            for r in records if r.levelno >= logging.ERROR and r.name.startswith(("bot", "handlers", "slack_bolt"))]


async def _settled(slack: SlackStandIn, bot, start: int, what: str) -> list[Message]:
    """Wait (bounded) until the bot has answered and holds no in-flight work; the messages since `start`.

    Each listener counts itself as in-flight work before its first await (ctx.track_current_task),
    which is before a slash command is acknowledged and before an event's 200 reaches the sender.
    """
    await slack.wait_for(lambda: len(slack.messages) > start and not bot.ctx.tasks, timeout=QUIET_TIMEOUT,
                         what=f"an answer to {what} and no work in flight")
    return slack.messages[start:]


@dataclass
class ReadOnlyRig:
    bot: Any
    client: EtcdClient
    member_ids: set[int]


@pytest.fixture
async def readonly_rig(cluster, slack, start_bot):
    """One bot on the shared (read-only) cluster for all examples of a test."""
    bot = await start_bot([cluster_table("prod", cluster)], approval=APPROVAL)
    async with EtcdClient(cluster.endpoints) as client:
        yield ReadOnlyRig(bot, client, {m.id for m in await client.member_list()})


def _takes_a_snapshot(text: str) -> bool:
    try:
        return parse(text).name == "snapshot"
    except UsageError:
        return False


@settings(E2E, max_examples=300)
@given(text=command_texts, user=users, channel=channels)
async def test_any_command_text_is_answered_and_changes_nothing(readonly_rig, slack, caplog, text, user, channel):
    assume(not _takes_a_snapshot(text))  # real snapshots: slow, and tested in their own files
    rig = readonly_rig
    start, logged = len(slack.messages), len(caplog.records)
    delivery = await slack.send_command(text, user_id=user, channel_id=channel)
    assert delivery.status == 200, f"HTTP {delivery.status} {delivery.error or ''}: {delivery.body[:300]!r}"
    new = await _settled(slack, rig.bot, start, f"/etcd {text!r}")
    _traceback_free(new)
    assert not [(m.text[:200], live_markup(m)) for m in new if live_markup(m)], "the answer holds live Slack markup"
    assert not _listener_failures(caplog.records[logged:])
    for_user = [m for m in new if m.ephemeral_to == user]
    in_channel = [m for m in new if m.ephemeral_to is None and m.channel == channel and m.thread_ts is None]
    assert for_user or in_channel, f"/etcd {text!r} was not answered: {[text_of(m)[:200] for m in new]}"
    assert not [m for m in new if m.ephemeral_to not in (None, user)], "an ephemeral reply reached someone else"

    try:
        expected = parse(text)
    except UsageError as e:  # answered in the acknowledgement itself, only to the user: reason, then usage
        hypothesis.event("usage error")
        assert [m.source for m in new] == ["ack"] and for_user
        lines = for_user[0].text.splitlines()
        assert lines[0] == f":warning: {escape(e.reason)}" and lines[1] == f"Usage: {escape(e.usage.splitlines()[0])}"
    else:
        hypothesis.event(f"{expected.name}: {'ephemeral' if for_user else 'channel'} answer")
        if expected.name == "help":
            assert [m.source for m in new] == ["ack"] and for_user[0].text.startswith("/etcd commands:")
        elif expected.name == "menu":  # the cluster's actions as buttons, to the user alone; where no cluster is
            # bound to the channel and none is named, the help
            assert for_user and (slack.buttons(for_user[0]) or for_user[0].text.startswith("/etcd commands:")
                                 or for_user[0].text.startswith(":warning: "))
        else:
            answer = (for_user or in_channel)[0]
            if answer.ephemeral_to:  # a refusal: one line of reason first
                assert answer.text.startswith(":warning: ") and _is_one_line(answer.text.splitlines()[0])

    # Nothing changed that nobody asked to change: the same members; no plan past `proposed`.
    assert {m.id for m in await rig.client.member_list()} == rig.member_ids
    plans = await rig.bot.ctx.store.plans(limit=1000)
    assert all(p["state"] == "proposed" for p in plans), [(p["id"], p["state"]) for p in plans]


async def test_help_for_a_subcommand_with_required_arguments(cluster, slack, start_bot):
    await start_bot([cluster_table("prod", cluster)])
    for text in ("replace --help", "cancel -h", "resume --help"):
        start = len(slack.messages)
        delivery = await slack.send_command(text, user_id=ONCALL, channel_id=CHANNEL)
        assert delivery.status == 200, f"/etcd {text}: HTTP {delivery.status}"
        usage = SPECS[text.split()[0]].usage
        assert any(m.ephemeral_to == ONCALL and escape(usage) in text_of(m) for m in slack.messages[start:]), text


# ---------------------------------------------------------------- 3. reaction events

POOL = 6  # cluster names (same LocalCluster, each through its own relays) with a plan each: one open plan per cluster


async def _relay(port: int) -> asyncio.Server:
    """A loopback TCP relay to 127.0.0.1:`port`: another address for the same member.

    The rig names one etcd six times on purpose (its plans never get past their re-check), and the
    config refuses two names with the same host:port, so each name reaches the members through relays
    of its own. A relay closes a connection it cannot pass on, as a member that went away does."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@dataclass
class ReactionRig:
    bot: Any
    slack: SlackStandIn
    cluster: LocalCluster
    client: EtcdClient
    member_ids: set[int]
    names: list[str]
    decided: list[dict] = field(default_factory=list)   # plans an example approved or rejected
    other_ts: str = ""                                  # a bot message that is not a plan
    previous: tuple[dict, str] | None = None            # the last event delivered, and its event_id

    async def proposed(self) -> list[dict]:
        return await self.bot.ctx.store.plans(states=("proposed",), limit=1000)

    async def current(self) -> dict:
        """A proposed plan to react to; proposes a batch when none is left."""
        rows = await self.proposed()
        if not rows:
            await self.propose_batch()
            rows = await self.proposed()
        return rows[0]

    async def propose_batch(self) -> None:
        """member1 down, one plan per cluster name without an open plan, member1 back and healthy:
        an approved plan then stops at its first step ("answers and is healthy again"), so approvals
        change plan states and never the cluster."""
        store = self.bot.ctx.store
        self.cluster.kill("member1")
        await self.wait_health(lambda h: h.leader_id is not None and h.quorum.ok and not h.find("member1").healthy,
                               "a leader among member2 and member3")
        for name in self.names:
            if await store.open_plan(name):
                continue
            start = len(self.slack.messages)
            port = free_port()
            delivery = await self.slack.send_command(f"replace member1 member4 http://127.0.0.1:{port} "
                                                     f"--cluster {name}", user_id=PROPOSER, channel_id=CHANNEL)
            assert delivery.status == 200
            await self.slack.wait_for_message(is_plan_message,
                                              after=start, timeout=30, what=f"the plan message for {name}")
            await self.slack.wait_for(lambda: not self.bot.ctx.tasks, timeout=30, what="the proposal to settle")
        await asyncio.to_thread(self.cluster.restart, "member1")
        # Healthy as the bot judges it, so that no approved plan gets past its re-check.
        await self.wait_health(lambda h: h.all_healthy, "member1 healthy again")

    async def wait_health(self, ok, what: str, timeout: float = 30.0) -> ClusterHealth:
        async def judged() -> ClusterHealth | None:
            health = await check_cluster(self.client, "fuzz")
            return health if ok(health) else None
        return await eventually(judged, timeout, what)


@pytest.fixture
async def reaction_rig(make_cluster, slack, start_bot):
    c = make_cluster(3)
    names = [f"p{i}" for i in range(POOL)]
    relays = {n: [await _relay(m.client_port) for m in c.members.values()] for n in names}
    try:
        bot = await start_bot([cluster_table(n, c, endpoints=[f"http://127.0.0.1:{r.sockets[0].getsockname()[1]}"
                                                              for r in relays[n]]) for n in names],
                              approval=APPROVAL)
        other = await bot.web.chat_postMessage(channel=CHANNEL, text="not a plan")
        async with EtcdClient(c.endpoints) as client:
            rig = ReactionRig(bot, slack, c, client, {m.id for m in await client.member_list()}, names,
                              other_ts=other["ts"])
            await rig.propose_batch()
            yield rig
    finally:
        for relay in (r for rs in relays.values() for r in rs):
            relay.close()


MISSING = object()  # a field left out of the event
TARGETS = ["plan", "decided plan", "plan reply", "other message", "unknown ts"]
REACTIONS = ["white_check_mark", "x", "white_check_mark::skin-tone-2", "x::skin-tone-6", "+1", "+1::skin-tone-2",
             "eyes", "heavy_check_mark", ":white_check_mark:", "White_Check_Mark", "white_check_mark_x", ""]
PEOPLE = [LEAD, LEAD2, ONCALL, STRANGER, "U0BOT00001", ""]


@dataclass(frozen=True)
class EventSpec:
    """A reaction_added event with symbolic references (the plan's ts is known only when it runs)."""
    user: Any
    reaction: Any
    item: Any           # MISSING, None, a non-dict, or a dict of symbolic fields
    redeliver: bool     # replay the previous event with its event_id, as Slack's retries do
    extra: dict


def _maybe(strategy: st.SearchStrategy, *odd: Any) -> st.SearchStrategy:
    return st.one_of(strategy, st.sampled_from([MISSING, *odd]))


item_fields = st.fixed_dictionaries({}, optional={
    "type": st.one_of(st.just("message"), st.sampled_from(["file", "file_comment", "Message", ""]),
                      st.text(max_size=6)),
    "channel": st.one_of(st.just(CHANNEL), st.sampled_from([OTHER_CHANNEL, "", "c0incident"]), st.text(max_size=10)),
    "ts": st.one_of(st.sampled_from(TARGETS), st.text(max_size=18)),
})
DECIDING = ["white_check_mark", "x", "white_check_mark::skin-tone-2", "x::skin-tone-6"]
well_formed = st.builds(
    EventSpec, user=st.one_of(st.sampled_from([LEAD, LEAD2, ONCALL]), st.sampled_from(PEOPLE)),
    reaction=st.one_of(st.sampled_from(DECIDING), st.sampled_from(REACTIONS)),
    item=st.builds(lambda target: {"type": "message", "channel": CHANNEL, "ts": target},
                   st.one_of(st.just("plan"), st.sampled_from(TARGETS))),
    redeliver=st.just(False), extra=st.just({}))
arbitrary = st.builds(
    EventSpec, user=_maybe(st.one_of(st.sampled_from(PEOPLE), st.text(max_size=12)), None),
    reaction=_maybe(st.one_of(st.sampled_from(REACTIONS), st.text(max_size=30)), None),
    item=st.one_of(item_fields, st.sampled_from([MISSING, None, "message", [CHANNEL], 7])),
    redeliver=st.integers(0, 4).map(lambda n: n == 0),
    extra=st.fixed_dictionaries({}, optional={"item_user": st.sampled_from([ONCALL, "U0BOT00001", ""]),
                                              "event_ts": st.text(max_size=18), "hidden": st.booleans()}))
events = st.one_of(well_formed, well_formed, arbitrary)


def _shaped_as_slack_sends(event: dict) -> bool:
    """Strings where Slack sends strings, an object as item. (The bot is not required to log
    nothing for other shapes, only to acknowledge them and change nothing.)"""
    item = event.get("item", {})
    return (all(isinstance(event.get(k, ""), str) for k in ("user", "reaction")) and isinstance(item, dict)
            and all(isinstance(v, str) for v in item.values()))


def _reaction_name(reaction: Any) -> str | None:
    """What Slack means: `name` or `name::skin-tone-N`; no colons around it."""
    return reaction.split("::", 1)[0] if isinstance(reaction, str) else None


def _decision(row: dict, user: Any, reaction: Any) -> str | None:
    """What a reaction on a proposed plan's own message must do: the configured reaction of an
    approver who is not the proposer approves; the reject reaction of an approver or the proposer
    rejects; anything else changes nothing."""
    name = _reaction_name(reaction)
    if name == APPROVAL["reaction"] and user in APPROVERS and user != row["proposer"]:
        return "approved"
    if name == APPROVAL["reject_reaction"] and (user in APPROVERS or user == row["proposer"]):
        return "rejected"
    return None


@settings(E2E, max_examples=200)
@given(spec=events)
async def test_reactions_change_a_plan_only_when_an_allowed_person_decides(reaction_rig, slack, caplog, spec):
    rig = reaction_rig
    store = rig.bot.ctx.store
    plan = await rig.current()
    replies = [m for m in slack.messages if m.thread_ts == plan["message_ts"]]
    resolve = {"plan": plan["message_ts"], "other message": rig.other_ts, "unknown ts": "1700000000.000001",
               "decided plan": rig.decided[-1]["message_ts"] if rig.decided else plan["message_ts"],
               "plan reply": replies[-1].ts if replies else plan["message_ts"]}

    if spec.redeliver and rig.previous is not None:
        event, event_id = rig.previous
        retry: dict[str, Any] = {"event_id": event_id, "retry_num": 1, "retry_reason": "http_timeout"}
    else:
        event = {"type": "reaction_added"}
        for key, value in (("user", spec.user), ("reaction", spec.reaction), ("item", spec.item)):
            if value is not MISSING:
                event[key] = value
        if isinstance(spec.item, dict):
            event["item"] = {k: resolve.get(v, v) if k == "ts" else v for k, v in spec.item.items()}
        event.update(spec.extra)
        retry = {}
    note(f"event: {event!r} {retry}")

    before = {p["id"]: (p["state"], p["decided_by"]) for p in await store.plans(limit=1000)}
    item = event.get("item")
    on_plan = (not retry and isinstance(item, dict) and item.get("type") == "message"
               and item.get("channel") == plan["channel"] and item.get("ts") == plan["message_ts"])
    expected = _decision(plan, event.get("user"), event.get("reaction")) if on_plan else None
    event_kind = "redelivery" if retry else "on the plan" if on_plan else "elsewhere"
    hypothesis.event(f"{event_kind}: {expected or 'no change'}")

    start, logged = len(slack.messages), len(caplog.records)
    delivery = await slack.send_event(event, **retry)
    assert delivery.status == 200, f"HTTP {delivery.status} {delivery.error or ''}: {delivery.body[:300]!r}"
    rig.previous = (event, delivery.event_id)
    await slack.wait_for(lambda: not rig.bot.ctx.tasks, timeout=QUIET_TIMEOUT, what="the reaction's work to end")
    _traceback_free(slack.messages[start:])
    if retry:  # Slack's redelivery of an event already delivered: acted on once, so now silent
        assert slack.messages[start:] == [], [text_of(m)[:200] for m in slack.messages[start:]]
    if _shaped_as_slack_sends(event):
        assert not _listener_failures(caplog.records[logged:])

    after = {p["id"]: p for p in await store.plans(limit=1000)}
    for plan_id, (state, decided_by) in before.items():
        row = after[plan_id]
        if plan_id == plan["id"] and expected is not None:
            assert row["decided_by"] == event.get("user"), row
            if expected == "approved":  # it ran, and stopped at its re-check: the failed member is healthy
                assert row["state"] == "failed" and "answers and is healthy again" in (row["error"] or ""), row
            else:
                assert row["state"] == "rejected", row
            rig.decided.append(row)
        else:
            assert (row["state"], row["decided_by"]) == (state, decided_by), \
                f"plan {plan_id} went {state} -> {row['state']} on an event that decides nothing for it"
    assert set(after) == set(before), "a reaction created a plan"
    assert {m.id for m in await rig.client.member_list()} == rig.member_ids


# ---------------------------------------------------------------- 4. damaged snapshots

class OverBudget(BaseException):
    """Raised by SIGALRM in the middle of a read: BaseException, so no `except Exception` hides it."""


@contextlib.contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """A hard limit on a synchronous call (the reader runs on this, the main, thread)."""
    def expired(signum, frame):
        raise OverBudget(f"snapshot_status took more than {seconds:g}s: it must never hang")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


READ_BUDGET = 10.0  # seconds; a read of the snapshot below takes milliseconds


@dataclass(frozen=True)
class RealSnapshot:
    data: bytes          # as `etcdctl snapshot save` wrote it: bbolt data, then the 32-byte sha256 trailer
    whole: Any           # its status
    work: Path           # a scratch file for damaged copies


@pytest.fixture(scope="module")
def real_snapshot(tmp_path_factory) -> RealSnapshot:
    """A real etcd snapshot with branch pages (2,500 keys) and overflow pages (big values)."""
    d = tmp_path_factory.mktemp("fuzz-snapshot")
    with ScenarioCluster(1) as c:
        put_many(c, [(f"/registry/pods/ns-{i % 7}/pod-{i:05d}", f"v{i}" * 20) for i in range(2500)])
        for i in range(3):
            c.etcdctl("put", f"/registry/secrets/big-{i}", "s" * 30_000)
        c.etcdctl("del", "/registry/pods/ns-3", "--prefix")
        path = save_snapshot(c, d / "real.db")
    whole = snapshot_status(path)
    assert whole.has_trailer and whole.total_keys > 2500 and whole.total_size == path.stat().st_size - 32
    return RealSnapshot(path.read_bytes(), whole, d / "damaged.db")


def _read(path: Path):
    """snapshot_status within the budget: a status, or the SnapshotError (checked to be one line)."""
    with time_budget(READ_BUDGET):
        try:
            return snapshot_status(path)
        except SnapshotError as e:
            message = str(e)
            assert message.startswith(f"{path}: ") and _is_one_line(message), repr(message)
            return e


def _bit_flips(size: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    """Distinct (byte, bit) pairs, so no two flips cancel out; biased to the structure that matters:
    meta pages, page headers and element arrays, and the trailer."""
    page = 4096
    pages = (size - 32) // page
    position = st.one_of(
        st.integers(0, size - 1),
        st.integers(0, 2 * page - 1),                                                      # the meta pages
        st.builds(lambda p, o: p * page + o, st.integers(2, pages - 1), st.integers(0, 95)),  # headers, elements
        st.integers(size - 32, size - 1),                                                  # the trailer
    )
    return st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=4, unique=True)


def _flipped(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, bit in flips:
        out[pos] ^= 1 << bit
    return bytes(out)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_every_bit_flip_in_a_snapshot_with_its_trailer_is_refused(real_snapshot, data):
    """Any change to any bit of bbolt data or trailer breaks the sha256: refused, one line."""
    flips = data.draw(_bit_flips(len(real_snapshot.data)), label="flips (byte, bit)")
    real_snapshot.work.write_bytes(_flipped(real_snapshot.data, flips))
    result = _read(real_snapshot.work)
    assert isinstance(result, SnapshotError), f"damaged snapshot accepted: {result}"


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_every_truncation_of_a_snapshot_with_its_trailer_is_refused(real_snapshot, data):
    """Cut anywhere: refused with one line, except a cut within the 32-byte trailer, which leaves the
    bbolt file whole: a valid raw copy (bolt reads any file that holds its pages) whose status is the
    snapshot's."""
    size = len(real_snapshot.data)
    length = data.draw(st.one_of(st.integers(0, size - 1), st.sampled_from([0, 1, 79, 80, 4096, 8192, size - 33,
                                                                            size - 32, size - 31, size - 1]),
                                 st.builds(lambda k: k * 512 + 32, st.integers(0, size // 512 - 1)),
                                 st.builds(lambda k: k * 4096, st.integers(1, size // 4096))),
                       label="length")
    assume(0 <= length < size)
    real_snapshot.work.write_bytes(real_snapshot.data[:length])
    result = _read(real_snapshot.work)
    if length >= size - 32:
        whole = real_snapshot.whole
        assert not isinstance(result, SnapshotError), result
        assert (result.hash, result.revision, result.total_keys, result.total_size, result.has_trailer) == \
               (whole.hash, whole.revision, whole.total_keys, whole.total_size, False)
    else:
        assert isinstance(result, SnapshotError), f"a snapshot cut to {length:,} of {size:,} bytes was accepted"


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_damage_to_a_raw_bbolt_file_is_read_or_refused_in_bounded_time(real_snapshot, data):
    """Without the trailer nothing proves integrity: a flip in unused space may leave a readable file.
    Whatever happens is a status or a one-line SnapshotError, within the budget, in this process
    (a crash would end the test run)."""
    raw = real_snapshot.data[:-32]
    flips = data.draw(_bit_flips(len(raw) + 32).map(lambda fs: [(p, b) for p, b in fs if p < len(raw)]),
                      label="flips (byte, bit)")
    damaged = _flipped(raw, flips)
    if data.draw(st.booleans(), label="also cut"):
        damaged = damaged[:data.draw(st.integers(1, len(raw)), label="length")]
    real_snapshot.work.write_bytes(damaged)
    result = _read(real_snapshot.work)
    hypothesis.event("refused" if isinstance(result, SnapshotError) else "read")
    if not isinstance(result, SnapshotError):
        assert result.total_size <= len(damaged) and not result.has_trailer
