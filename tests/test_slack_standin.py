"""The Slack stand-in against the real slack_sdk and slack_bolt, over loopback HTTP and websockets.

Nothing is mocked: the Web API is exercised with slack_sdk's AsyncWebClient,
deliveries with a real bolt AsyncApp served by aiohttp (HTTP mode) or
connected with bolt's AsyncSocketModeHandler (Socket Mode).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot.testing.slack import Delivery, Message, SlackStandIn, sign_request
from helpers import eventually

REPO = Path(__file__).resolve().parents[1]

BOT_TOKEN = "xoxb-000000000-standin-test-token"
APP_TOKEN = "xapp-1-A0APP00001-standin-test-token"
SIGNING_SECRET = "standin-test-signing-secret-0123456789"

ALICE, BOB, CAROL = "U0ALICE001", "U0BOB00001", "U0CAROL001"
OPS, RANDOM = "C0OPS00001", "C0RANDOM01"
USERS = {
    ALICE: {"name": "alice", "real_name": "Alice Operator"},
    BOB: {"name": "bob", "real_name": "Bob Approver"},
    CAROL: {"name": "carol", "real_name": "Carol Viewer"},
}
USERGROUPS = {"S0ETCDOPS1": [ALICE, BOB]}
CHANNELS = {OPS: "etcd-ops", RANDOM: "random"}


@pytest.fixture(autouse=True)
async def no_task_left_behind() -> AsyncIterator[None]:
    """Torn down last: every task a test started (servers, bolt, Socket Mode) has finished."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()

    def leftovers() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t is not current and t not in before and not t.done()]

    # cancelled tasks need a loop iteration or two to finish unwinding
    with contextlib.suppress(AssertionError):  # the assertion below names the tasks
        await eventually(lambda: not leftovers(), 2.0, "every task to finish", interval=0.01)
    assert not leftovers(), f"tasks left running: {leftovers()}"


def make_stand_in() -> SlackStandIn:
    return SlackStandIn(bot_token=BOT_TOKEN, signing_secret=SIGNING_SECRET, app_token=APP_TOKEN,
                        users=USERS, usergroups=USERGROUPS, channels=CHANNELS)


@pytest.fixture
async def slack() -> AsyncIterator[SlackStandIn]:
    stand_in = make_stand_in()
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.stop()


@pytest.fixture
async def web_client(slack: SlackStandIn) -> AsyncIterator[AsyncWebClient]:
    async with aiohttp.ClientSession() as session:
        yield AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url, session=session)


SECTION = {"type": "section", "text": {"type": "mrkdwn", "text": "hello"}}
FORM = {"type": "modal", "callback_id": "form", "title": {"type": "plain_text", "text": "A form"},
        "submit": {"type": "plain_text", "text": "Send"}, "blocks": [
            {**SECTION, "block_id": "intro"},
            {"type": "input", "block_id": "name", "label": {"type": "plain_text", "text": "Name"},
             "element": {"type": "plain_text_input", "action_id": "value"}}]}
OPEN_BUTTON = {"type": "actions", "block_id": "act", "elements": [
    {"type": "button", "action_id": "open", "text": {"type": "plain_text", "text": "Open"}, "value": "v",
     "confirm": {"title": {"type": "plain_text", "text": "Sure?"}, "text": {"type": "plain_text", "text": "It opens"},
                 "confirm": {"type": "plain_text", "text": "Yes"}, "deny": {"type": "plain_text", "text": "No"}}}]}


class Bot:
    """A real bolt AsyncApp with the listeners the bot-side contract relies on."""

    def __init__(self, slack: SlackStandIn, session: aiohttp.ClientSession) -> None:
        self.client = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url, session=session)
        self.app = AsyncApp(client=self.client, signing_secret=SIGNING_SECRET)
        self.events: list[tuple[str, str, str | None, str | None]] = []  # (type, event_id, retry num, reason)
        self.hold_ack: asyncio.Event | None = None
        self.in_listener = asyncio.Event()
        self.inflight = 0
        self.response_url: str | None = None
        app = self.app

        @app.command("/etcd")
        async def etcd(ack: Any, command: dict, say: Any, respond: Any) -> None:
            self.inflight += 1
            try:
                text = command["text"]
                self.in_listener.set()
                if self.hold_ack is not None:
                    await self.hold_ack.wait()
                if text.startswith("ack-text "):
                    await ack("acked: " + text[len("ack-text "):])
                elif text.startswith("ack-channel "):
                    await ack(text="everyone: " + text[len("ack-channel "):], response_type="in_channel")
                elif text == "keep-url":
                    self.response_url = command["response_url"]
                    await ack()
                elif text.startswith("respond "):
                    await ack()
                    await respond("only you: " + text[len("respond "):])
                else:
                    await ack()
                    await say("pong: " + text)
            finally:
                self.inflight -= 1

        @app.event("reaction_added")
        async def reaction_added(body: dict, event: dict, request: Any) -> None:
            self.events.append(("reaction_added", body["event_id"],
                                request.headers.get("x-slack-retry-num", [None])[0],
                                request.headers.get("x-slack-retry-reason", [None])[0]))

        @app.event("reaction_removed")
        async def reaction_removed(body: dict) -> None:
            self.events.append(("reaction_removed", body["event_id"], None, None))

        @app.action("open")
        async def open_form(ack: Any, body: dict, client: AsyncWebClient) -> None:
            await ack()
            await client.views_open(trigger_id=body["trigger_id"], view=FORM)

        @app.view("form")
        async def submitted(ack: Any, view: dict) -> None:
            typed = view["state"]["values"]["name"]["value"]["value"]
            if typed == "bad":
                await ack(response_action="errors", errors={"name": "not a good name"})
            elif typed == "wrong-block":
                await ack(response_action="errors", errors={"intro": "the intro is no input"})
            else:
                await ack()

        @app.event("app_home_opened")
        async def home(event: dict, client: AsyncWebClient) -> None:
            await client.views_publish(user_id=event["user"], view={"type": "home", "blocks": [SECTION]})

    async def idle(self, slack: SlackStandIn) -> None:
        """Listeners finished (so teardown cancels nothing half-way through an API call)."""
        await slack.wait_for(lambda: self.inflight == 0, 5.0, "bolt listeners to finish")


@pytest.fixture
async def http_bot(slack: SlackStandIn) -> AsyncIterator[Bot]:
    """The bolt app served over HTTP by aiohttp on a free port; slack.bot_url points at it."""
    async with aiohttp.ClientSession() as session:
        bot = Bot(slack, session)

        async def endpoint(request: web.Request) -> web.Response:
            return await to_aiohttp_response(await bot.app.async_dispatch(await to_bolt_request(request)))

        web_app = web.Application()
        web_app.router.add_post("/slack/events", endpoint)
        runner = web.AppRunner(web_app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            slack.bot_url = f"http://127.0.0.1:{runner.addresses[0][1]}/slack/events"
            yield bot
            await bot.idle(slack)
        finally:
            slack.bot_url = None
            await runner.cleanup()


@pytest.fixture
async def socket_bot(slack: SlackStandIn) -> AsyncIterator[tuple[Bot, AsyncSocketModeHandler]]:
    """The bolt app connected over Socket Mode (apps.connections.open on the stand-in)."""
    async with aiohttp.ClientSession() as session:
        bot = Bot(slack, session)
        handler = AsyncSocketModeHandler(bot.app, app_token=APP_TOKEN)
        try:
            await handler.connect_async()
            await slack.wait_socket_connected(5.0)
            yield bot, handler
            await bot.idle(slack)
        finally:
            await handler.close_async()
            await slack.wait_for(lambda: not slack.socket_connected, 5.0, "the socket to close")


def pong_in(channel: str, text: str) -> Callable[[Message], bool]:
    return lambda m: m.channel == channel and m.text == text and m.ephemeral_to is None


# ---------------------------------------------------------------------------- helpers


def test_sign_request_matches_slack_sdk_verifier() -> None:
    ts = int(time.time())
    body = "token=x&text=status+prod"
    sig = sign_request(SIGNING_SECRET, ts, body)
    assert sig.startswith("v0=") and len(sig) == 3 + 64
    verifier = SignatureVerifier(SIGNING_SECRET)
    assert verifier.is_valid(body, str(ts), sig)
    assert not verifier.is_valid(body + "x", str(ts), sig)


async def test_wait_for_times_out_naming_what(slack: SlackStandIn) -> None:
    with pytest.raises(TimeoutError, match="the impossible"):
        await slack.wait_for(lambda: None, 0.05, "the impossible")
    assert await slack.wait_for(lambda: 42, 1.0) == 42


async def test_a_message_not_posted_in_time_is_named_with_what_was_posted_instead(slack: SlackStandIn,
                                                                                    web_client: AsyncWebClient) -> None:
    """A test that waits for a plan and gets a refusal says so at its deadline, not only that it timed out."""
    before = len(slack.messages)
    await web_client.chat_postMessage(channel=OPS, text="cannot replace member1 in prod: no leader")
    with pytest.raises(TimeoutError, match=r"the plan message; posted meanwhile: \['cannot replace member1"):
        await slack.wait_for_message(lambda m: "Plan" in m.text, 0.05, "the plan message", after=before)


# ---------------------------------------------------------------------------- Web API


async def test_auth_test_post_and_get(slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    resp = await web_client.auth_test()
    assert resp["ok"] and resp["user_id"] == slack.bot_user_id and resp["bot_id"] == slack.bot_id
    assert resp["team_id"] == slack.team_id and resp["is_enterprise_install"] is False
    assert resp["user"] == "etcd-chatops" and resp["url"].startswith(slack.url)
    got = await web_client.api_call("auth.test", http_verb="GET")
    assert got["user_id"] == slack.bot_user_id
    assert [c.status for c in slack.calls_to("auth.test")] == [200, 200]


async def test_invalid_and_missing_token(slack: SlackStandIn) -> None:
    bad = AsyncWebClient(token="xoxb-wrong", base_url=slack.api_url)
    with pytest.raises(SlackApiError) as e:
        await bad.chat_postMessage(channel=OPS, text="hi")
    assert e.value.response.status_code == 200 and e.value.response["error"] == "invalid_auth"
    with pytest.raises(SlackApiError) as e:
        await AsyncWebClient(base_url=slack.api_url).auth_test()
    assert e.value.response["error"] == "not_authed"
    with pytest.raises(SlackApiError) as e:  # the app-level token cannot post
        await AsyncWebClient(token=APP_TOKEN, base_url=slack.api_url).chat_postMessage(channel=OPS, text="x")
    assert e.value.response["error"] == "not_allowed_token_type"
    assert slack.messages == []
    assert all("token" not in c.args for c in slack.calls)
    assert BOT_TOKEN not in json.dumps([c.args for c in slack.calls])


async def test_post_update_thread_and_errors(slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*prod* healthy"}}]
    first = await web_client.chat_postMessage(channel=OPS, text="prod healthy", blocks=blocks)
    assert first["channel"] == OPS and first["message"]["blocks"] == blocks
    reply = await web_client.chat_postMessage(channel=OPS, text="details", thread_ts=first["ts"])
    assert float(reply["ts"]) > float(first["ts"])
    msg = slack.find_message(OPS, first["ts"])
    assert msg is not None and msg.user == slack.bot_user_id and msg.source == "chat.postMessage"
    assert slack.find_message(OPS, reply["ts"]).thread_ts == first["ts"]  # type: ignore[union-attr]

    await web_client.chat_update(channel=OPS, ts=first["ts"], text="prod degraded", blocks=[])
    assert msg.text == "prod degraded" and msg.blocks is None
    assert msg.edits == [{"text": "prod healthy", "blocks": blocks}]
    assert [m.ts for m in slack.channel_messages(OPS, include_threads=False)] == [first["ts"]]

    for call, error in [
        (web_client.chat_update(channel=OPS, ts="1.000001", text="x"), "message_not_found"),
        (web_client.chat_postMessage(channel="C0NOTHERE1", text="x"), "channel_not_found"),
        (web_client.api_call("chat.postMessage", json={"channel": OPS}), "no_text"),
        (web_client.api_call("no.such.method"), "unknown_method"),
    ]:
        with pytest.raises(SlackApiError) as e:
            await call
        assert e.value.response["error"] == error
    assert slack.calls_to("no.such.method")[0].response == {"ok": False, "error": "unknown_method"}


async def test_form_encoded_blocks_and_channel_by_name(slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    blocks = [{"type": "section", "text": {"type": "plain_text", "text": "hello"}}]
    resp = await web_client.api_call(
        "chat.postMessage", data={"channel": "#etcd-ops", "text": "hello", "blocks": json.dumps(blocks)})
    assert resp["channel"] == OPS
    assert slack.find_message(OPS, resp["ts"]).blocks == blocks  # type: ignore[union-attr]
    assert slack.calls[-1].args["blocks"] == json.dumps(blocks)  # recorded as sent


async def test_ephemeral_reactions_permalink(slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    eph = await web_client.chat_postEphemeral(channel=OPS, user=ALICE, text="only alice")
    m = slack.find_message(OPS, eph["message_ts"])
    assert m is not None and m.ephemeral_to == ALICE and m.source == "chat.postEphemeral"
    assert slack.channel_messages(OPS, include_ephemeral=False) == []

    post = await web_client.chat_postMessage(channel=OPS, text="approve?")
    await web_client.reactions_add(channel=OPS, timestamp=post["ts"], name="eyes")
    assert slack.find_message(OPS, post["ts"]).reactions == {"eyes": [slack.bot_user_id]}  # type: ignore
    with pytest.raises(SlackApiError) as e:
        await web_client.reactions_add(channel=OPS, timestamp=post["ts"], name="eyes")
    assert e.value.response["error"] == "already_reacted"
    with pytest.raises(SlackApiError) as e:
        await web_client.reactions_add(channel=OPS, timestamp="1.000002", name="eyes")
    assert e.value.response["error"] == "message_not_found"

    link = await web_client.chat_getPermalink(channel=OPS, message_ts=post["ts"])
    assert link["permalink"] == f"{slack.url}/archives/{OPS}/p{post['ts'].replace('.', '')}"


async def test_directory_methods(slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    members = await web_client.usergroups_users_list(usergroup="S0ETCDOPS1")
    assert members["users"] == [ALICE, BOB]
    with pytest.raises(SlackApiError) as e:
        await web_client.usergroups_users_list(usergroup="S0NOPE0001")
    assert e.value.response["error"] == "no_such_subteam"

    user = (await web_client.users_info(user=ALICE))["user"]
    assert user["id"] == ALICE and user["name"] == "alice" and user["is_bot"] is False
    assert user["profile"]["real_name"] == "Alice Operator" and user["profile"]["display_name"] == "alice"
    with pytest.raises(SlackApiError) as e:
        await web_client.users_info(user="U0NOBODY01")
    assert e.value.response["error"] == "user_not_found"

    chan = (await web_client.conversations_info(channel=OPS))["channel"]
    assert chan["id"] == OPS and chan["name"] == "etcd-ops" and chan["is_channel"] is True
    with pytest.raises(SlackApiError) as e:
        await web_client.conversations_info(channel="C0NOTHERE1")
    assert e.value.response["error"] == "channel_not_found"


async def test_rate_limit_is_retried_by_slack_sdk(slack: SlackStandIn) -> None:
    client = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url,
                            retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)])
    slack.fail_next("chat.postMessage", status=429, retry_after=1)
    t0 = time.monotonic()
    resp = await client.chat_postMessage(channel=OPS, text="after the limit")
    assert resp["ok"] and time.monotonic() - t0 >= 1.0  # slack_sdk honoured Retry-After
    calls = slack.calls_to("chat.postMessage")
    assert [c.status for c in calls] == [429, 200]
    assert calls[0].response == {"ok": False, "error": "ratelimited"}
    assert [m.text for m in slack.messages] == ["after the limit"]


async def test_rate_limit_without_retry_handler_surfaces(slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    slack.fail_next("chat.update", status=429, retry_after=7)
    with pytest.raises(SlackApiError) as e:
        await web_client.chat_update(channel=OPS, ts="1.1", text="x")
    assert e.value.response.status_code == 429 and e.value.response.headers["Retry-After"] == "7"


async def test_server_error(slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    slack.fail_next("users.info", status=500)
    with pytest.raises(SlackApiError) as e:
        await web_client.users_info(user=ALICE)
    assert e.value.response.status_code == 500
    assert (await web_client.users_info(user=ALICE))["user"]["id"] == ALICE  # only the next call failed

    retrying = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url,
                              retry_handlers=[AsyncServerErrorRetryHandler(max_retry_count=2)])
    slack.fail_next("users.info", status=503, count=2)
    assert (await retrying.users_info(user=BOB))["user"]["id"] == BOB
    assert [c.status for c in slack.calls_to("users.info")] == [500, 200, 503, 503, 200]


async def test_injected_api_error(slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    slack.fail_next("chat.postMessage", status=200, error="not_in_channel")
    with pytest.raises(SlackApiError) as e:
        await web_client.chat_postMessage(channel=OPS, text="x")
    assert e.value.response["error"] == "not_in_channel"
    await web_client.chat_postMessage(channel=OPS, text="y")
    assert [m.text for m in slack.messages] == ["y"]


async def test_apps_connections_open_needs_app_token(slack: SlackStandIn) -> None:
    with pytest.raises(SlackApiError) as e:
        await AsyncWebClient(base_url=slack.api_url).apps_connections_open(app_token=BOT_TOKEN)
    assert e.value.response["error"] == "not_allowed_token_type"
    resp = await AsyncWebClient(base_url=slack.api_url).apps_connections_open(app_token=APP_TOKEN)
    assert resp["url"].startswith(slack.url.replace("http", "ws") + "/socket?")


async def test_response_url_sink_rules(slack: SlackStandIn, http_bot: Bot) -> None:
    await slack.send_command("keep-url", user_id=ALICE, channel_id=OPS)
    url = await slack.wait_for(lambda: http_bot.response_url, 5.0, "the response_url")
    assert url.startswith(slack.url + "/response/")

    async def post(body: dict) -> tuple[int, str]:
        async with http.post(url, json=body) as r:
            return r.status, await r.text()

    async with aiohttp.ClientSession() as http:
        async with http.post(slack.url + "/response/unknown", json={"text": "x"}) as r:
            assert r.status == 404
        assert await post({"text": "working..."}) == (200, "ok")
        [working] = slack.messages
        assert (working.text, working.ephemeral_to, working.source) == ("working...", ALICE, "response_url")
        assert await post({"text": "done", "replace_original": True}) == (200, "ok")
        assert len(slack.messages) == 1 and working.text == "done" and working.edits[0]["text"] == "working..."
        assert await post({"text": "for all", "response_type": "in_channel"}) == (200, "ok")
        assert slack.messages[-1].ephemeral_to is None
        assert await post({"delete_original": True}) == (200, "ok")
        assert slack.messages[-1].deleted and slack.channel_messages(OPS) == [working]
        assert (await post({"text": "fifth"}))[0] == 200
        assert await post({"text": "sixth"}) == (404, "used_url")  # Slack allows 5 uses


async def test_delete_and_dm(slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    post = await web_client.chat_postMessage(channel=OPS, text="oops")
    await web_client.chat_delete(channel=OPS, ts=post["ts"])
    assert slack.channel_messages(OPS) == [] and slack.messages[0].deleted
    with pytest.raises(SlackApiError) as e:
        await web_client.chat_update(channel=OPS, ts=post["ts"], text="x")
    assert e.value.response["error"] == "message_not_found"
    dm = (await web_client.conversations_open(users=BOB))["channel"]["id"]
    sent = await web_client.chat_postMessage(channel=dm, text="psst")
    assert sent["channel"] == dm and slack.channel_messages(dm)[0].text == "psst"
    assert (await web_client.chat_postMessage(channel=BOB, text="again"))["channel"] == dm


# ---------------------------------------------------------------------------- HTTP delivery to bolt


async def test_signed_command_reaches_bolt_and_it_posts(slack: SlackStandIn, http_bot: Bot) -> None:
    delivery = await slack.send_command("status prod", user_id=ALICE, channel_id=OPS)
    assert isinstance(delivery, Delivery)
    assert delivery.status == 200 and delivery.body == "" and delivery.mode == "http"
    assert delivery.elapsed < 3.0  # inside Slack's 3 s budget
    msg = await slack.wait_for_message(pong_in(OPS, "pong: status prod"), 5.0, "the pong")
    assert msg.user == slack.bot_user_id and msg.source == "chat.postMessage"
    assert slack.calls_to("auth.test"), "bolt authorizes with auth.test first"
    # the ack was empty, so nothing but the pong is visible
    assert [m.text for m in slack.messages] == ["pong: status prod"]


@pytest.mark.parametrize("how", ["unsigned", "stale", "mis-signed"])
async def test_bad_signatures_are_rejected(slack: SlackStandIn, http_bot: Bot, how: str) -> None:
    kwargs: dict[str, Any] = {  # type: ignore[assignment]  # (mypy joins the values to `object`)
        "unsigned": {"sign": False},
        "stale": {"timestamp": int(time.time()) - 6 * 60},
        "mis-signed": {"signing_secret": "not-the-secret"},
    }[how]
    delivery = await slack.send_command("status prod", user_id=ALICE, channel_id=OPS, **kwargs)
    assert delivery.status == 401
    assert delivery.json == {"error": "invalid request"}
    # a good command afterwards is the only one that posts
    await slack.send_command("after", user_id=ALICE, channel_id=OPS)
    await slack.wait_for_message(pong_in(OPS, "pong: after"), 5.0, "the pong")
    assert [m.text for m in slack.messages] == ["pong: after"]
    assert len(slack.calls_to("chat.postMessage")) == 1
    await http_bot.idle(slack)   # (the listener ends once Slack answered its post: after the pong is seen)


async def test_bad_event_signature_rejected(slack: SlackStandIn, http_bot: Bot) -> None:
    post = slack.add_user_message(OPS, ALICE, "look")
    event = {"type": "reaction_added", "user": BOB, "reaction": "eyes",
             "item": {"type": "message", "channel": OPS, "ts": post.ts}, "item_user": ALICE,
             "event_ts": post.ts}
    assert (await slack.send_event(event, sign=False)).status == 401
    assert (await slack.send_event(event, timestamp=int(time.time()) - 3600)).status == 401
    assert http_bot.events == []


async def test_ack_text_is_an_ephemeral_message(slack: SlackStandIn, http_bot: Bot) -> None:
    delivery = await slack.send_command("ack-text hello", user_id=BOB, channel_id=OPS)
    assert delivery.status == 200 and delivery.body == "acked: hello"  # bolt acks plain text
    [msg] = slack.messages
    assert (msg.channel, msg.text, msg.ephemeral_to, msg.source) == (OPS, "acked: hello", BOB, "ack")

    delivery = await slack.send_command("ack-channel all", user_id=BOB, channel_id=OPS)
    assert delivery.json == {"text": "everyone: all", "response_type": "in_channel"}
    assert slack.messages[-1].ephemeral_to is None and slack.messages[-1].source == "ack"


async def test_respond_goes_to_the_response_url_sink(slack: SlackStandIn, http_bot: Bot) -> None:
    await slack.send_command("respond hi", user_id=CAROL, channel_id=RANDOM)
    msg = await slack.wait_for_message(lambda m: m.source == "response_url", 5.0, "the respond()")
    assert (msg.channel, msg.text, msg.ephemeral_to) == (RANDOM, "only you: hi", CAROL)
    assert slack.channel_messages(RANDOM, include_ephemeral=False) == []


async def test_reaction_and_redelivery_keep_the_event_id(slack: SlackStandIn, http_bot: Bot) -> None:
    post = await http_bot.client.chat_postMessage(channel=OPS, text="approve replacing member 2?")
    first = await slack.react(user=BOB, channel=OPS, ts=post["ts"], reaction="white_check_mark")
    assert first.status == 200 and first.event_id and first.event_id.startswith("Ev")
    again = await slack.react(user=BOB, channel=OPS, ts=post["ts"], reaction="white_check_mark",
                              event_id=first.event_id, retry_num=1)
    assert again.status == 200 and again.event_id == first.event_id
    await slack.wait_for(lambda: len(http_bot.events) == 2, 5.0, "both deliveries")
    assert http_bot.events == [("reaction_added", first.event_id, None, None),
                               ("reaction_added", first.event_id, "1", "http_timeout")]
    msg = slack.find_message(OPS, post["ts"])
    assert msg is not None and msg.reactions == {"white_check_mark": [BOB]}

    removed = await slack.react(user=BOB, channel=OPS, ts=post["ts"], reaction="white_check_mark", removed=True)
    assert removed.event_id != first.event_id
    await slack.wait_for(lambda: len(http_bot.events) == 3, 5.0, "the removal")
    assert http_bot.events[-1][0] == "reaction_removed" and msg.reactions == {}


async def test_react_to_unknown_message_is_an_error(slack: SlackStandIn, http_bot: Bot) -> None:
    with pytest.raises(LookupError):
        await slack.react(user=BOB, channel=OPS, ts="1.000003", reaction="eyes")


async def test_delivery_to_a_dead_bot_reports_status_0(slack: SlackStandIn) -> None:
    with pytest.raises(RuntimeError, match="nowhere to deliver"):
        await slack.send_command("x", user_id=ALICE, channel_id=OPS)
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    await runner.cleanup()  # nothing listens there any more
    slack.bot_url = f"http://127.0.0.1:{port}/slack/events"
    delivery = await slack.send_command("x", user_id=ALICE, channel_id=OPS)
    assert delivery.status == 0 and delivery.error


async def test_control_api_command(slack: SlackStandIn, http_bot: Bot) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(slack.url + "/_standin/command",
                             json={"text": "status prod", "user_id": ALICE, "channel_id": OPS}) as r:
            assert r.status == 200
            answer = await r.json()
        assert answer["delivery"]["status"] == 200
        assert [m["text"] for m in answer["messages"]] == ["pong: status prod"]
        ts = answer["messages"][0]["ts"]
        async with http.post(slack.url + "/_standin/react",
                             json={"user": BOB, "channel": OPS, "ts": ts, "reaction": "eyes"}) as r:
            assert (await r.json())["delivery"]["status"] == 200
        async with http.get(slack.url + "/_standin/messages", params={"channel": OPS, "after": "0"}) as r:
            listed = await r.json()
        assert [m["text"] for m in listed] == ["pong: status prod"] and listed[0]["index"] == 0
        async with http.get(slack.url + "/_standin/calls") as r:
            calls_text = await r.text()
        assert "chat.postMessage" in calls_text and BOT_TOKEN not in calls_text
    await slack.wait_for(lambda: http_bot.events, 5.0, "the reaction event")


# ---------------------------------------------------------------------------- Socket Mode


async def test_socket_mode_command_and_event(slack: SlackStandIn, socket_bot: tuple[Bot, Any]) -> None:
    bot, _ = socket_bot
    assert slack.calls_to("apps.connections.open")[0].status == 200
    delivery = await slack.send_command("status prod", user_id=ALICE, channel_id=OPS)
    assert delivery.mode == "socket" and delivery.status == 200 and delivery.body == ""
    await slack.wait_for_message(pong_in(OPS, "pong: status prod"), 5.0, "the pong")

    post = slack.messages[-1]
    ev = await slack.react(user=BOB, channel=OPS, ts=post.ts, reaction="eyes")
    assert ev.status == 200 and ev.mode == "socket"
    # redelivery: retry_attempt/retry_reason become bolt's x-slack-retry-* headers
    await slack.react(user=BOB, channel=OPS, ts=post.ts, reaction="eyes", event_id=ev.event_id, retry_num=2,
                      retry_reason="timeout")
    await slack.wait_for(lambda: len(bot.events) == 2, 5.0, "both events")
    # Slack (and so the stand-in) sends retry_attempt 0, retry_reason "" on a first delivery:
    # bolt surfaces them as x-slack-retry-num "0" and x-slack-retry-reason ""
    assert bot.events == [("reaction_added", ev.event_id, "0", ""),
                          ("reaction_added", ev.event_id, "2", "timeout")]


async def test_socket_mode_send_command_returns_after_the_ack(
        slack: SlackStandIn, socket_bot: tuple[Bot, Any]) -> None:
    bot, _ = socket_bot
    bot.hold_ack = asyncio.Event()
    task = asyncio.ensure_future(slack.send_command("ack-text held", user_id=ALICE, channel_id=OPS))
    try:
        await asyncio.wait_for(bot.in_listener.wait(), 5.0)
        assert not task.done()  # bolt has the envelope but has not acked
        bot.hold_ack.set()
        delivery = await asyncio.wait_for(task, 5.0)
    finally:
        bot.hold_ack.set()
        if not task.done():
            task.cancel()
    assert delivery.status == 200 and delivery.json == {"text": "acked: held"}
    [msg] = slack.messages
    assert (msg.text, msg.ephemeral_to, msg.source) == ("acked: held", ALICE, "ack")


async def test_socket_mode_respond_and_reconnect(slack: SlackStandIn, socket_bot: tuple[Bot, Any]) -> None:
    await slack.send_command("respond hi", user_id=CAROL, channel_id=OPS)
    msg = await slack.wait_for_message(lambda m: m.source == "response_url", 5.0, "the respond()")
    assert msg.ephemeral_to == CAROL
    # Slack asks clients to reconnect now and then; slack_sdk opens a new connection
    await slack.disconnect_socket()
    await slack.wait_for(lambda: len(slack.calls_to("apps.connections.open")) == 2, 10.0, "a reconnect")
    await slack.wait_socket_connected(5.0)
    await slack.send_command("again", user_id=ALICE, channel_id=OPS)
    await slack.wait_for_message(pong_in(OPS, "pong: again"), 5.0, "the pong after reconnecting")


# ---------------------------------------------------------------------------- standalone process


# ---------------------------------------------------------------------------- interactivity


async def test_a_click_opens_a_modal_whose_submission_shows_inline_errors(slack: SlackStandIn,
                                                                          http_bot: Bot) -> None:
    await _modal_round_trip(slack, http_bot, "http")


async def test_a_click_and_a_submission_over_socket_mode(slack: SlackStandIn, socket_bot: tuple[Bot, Any]) -> None:
    await _modal_round_trip(slack, socket_bot[0], "socket")


async def _modal_round_trip(slack: SlackStandIn, bot: Bot, mode: str) -> None:
    posted = await bot.client.chat_postMessage(channel=OPS, text="open?", blocks=[SECTION, OPEN_BUTTON])
    msg = slack.find_message(OPS, posted["ts"])
    assert msg is not None
    with pytest.raises(LookupError):
        await slack.click(ALICE, msg, "no-such-button")
    delivery = await slack.click(ALICE, msg, "open")
    assert delivery.status == 200 and delivery.mode == mode
    assert slack.dialogs == [SlackStandIn.buttons(msg)[0]["confirm"]]   # the dialog the click confirmed
    payload = slack.interactions[-1]
    assert payload["type"] == "block_actions" and payload["actions"][0]["value"] == "v"
    assert payload["container"] == {"type": "message", "message_ts": msg.ts, "channel_id": OPS, "is_ephemeral": False}
    (view,) = await slack.wait_for(lambda: slack.open_views(ALICE), 5, "the modal")
    assert view.view["callback_id"] == "form" and view.trigger_id == payload["trigger_id"]

    with pytest.raises(ValueError, match="required field 'name' is empty"):
        await slack.submit(view, {})
    await slack.submit(view, {"name": "bad"})
    assert view.errors == {"name": "not a good name"} and not view.closed
    with pytest.raises(AssertionError, match="name no input block"):
        await slack.submit(view, {"name": "wrong-block"})
    await slack.submit(view, {"name": "good"})
    assert view.closed and slack.interactions[-1]["view"]["state"]["values"]["name"]["value"]["value"] == "good"
    await bot.idle(slack)


async def test_views_open_takes_a_fresh_trigger_once(slack: SlackStandIn, http_bot: Bot,
                                                     web_client: AsyncWebClient) -> None:
    posted = await web_client.chat_postMessage(channel=OPS, text="open?", blocks=[OPEN_BUTTON])
    msg = slack.find_message(OPS, posted["ts"])
    assert msg is not None
    await slack.click(BOB, msg, "open")
    await slack.wait_for(lambda: slack.open_views(BOB), 5, "the modal")
    trigger = slack.interactions[-1]["trigger_id"]
    for used, error in ((trigger, "exchanged_trigger_id"), ("1.2.nonsense", "invalid_trigger_id")):
        with pytest.raises(SlackApiError) as e:
            await web_client.views_open(trigger_id=used, view=FORM)
        assert e.value.response["error"] == error
    slack.trigger_ttl = 0.0   # Slack's 3 s passed before the bot used it
    made = len(slack.calls_to("views.open"))
    await slack.click(BOB, msg, "open")   # answered at bolt's ack: the listener calls views.open after it
    late = await slack.wait_for(lambda: slack.calls_to("views.open")[made:], 5, "the listener's views.open")
    assert late[-1].response == {"ok": False, "error": "expired_trigger_id"}
    await http_bot.idle(slack)
    assert len(slack.open_views(BOB)) == 1


async def test_blocks_and_views_slack_would_refuse_are_refused(slack: SlackStandIn, http_bot: Bot,
                                                               web_client: AsyncWebClient) -> None:
    for blocks in ([{**SECTION, "txet": "typo"}], [{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3001}}],
                   [{"type": "no-such-block"}], [SECTION] * 51):
        with pytest.raises(SlackApiError) as e:
            await web_client.chat_postMessage(channel=OPS, text="x", blocks=blocks)
        assert e.value.response["error"] == "invalid_blocks"
    assert slack.messages == []
    posted = await web_client.chat_postMessage(channel=OPS, text="open?", blocks=[OPEN_BUTTON])
    msg = slack.find_message(OPS, posted["ts"])
    assert msg is not None
    await slack.click(CAROL, msg, "open")
    (view,) = await slack.wait_for(lambda: slack.open_views(CAROL), 5, "the modal")
    for bad in ({**FORM, "submit": None}, {**FORM, "title": {"type": "plain_text", "text": "x" * 25}},
                {**FORM, "colour": "red"}, {**FORM, "type": "home"}):
        with pytest.raises(SlackApiError) as e:
            await web_client.views_update(view_id=view.id, view={k: v for k, v in bad.items() if v is not None})
        assert e.value.response["error"] == "invalid_arguments"
    with pytest.raises(SlackApiError) as e:
        await web_client.views_update(view_id=view.id, hash="stale", view=FORM)
    assert e.value.response["error"] == "hash_conflict"
    await web_client.views_update(view_id=view.id, hash=view.hash, view={**FORM, "title": {
        "type": "plain_text", "text": "Again"}})
    assert view.view["title"]["text"] == "Again" and view.history == [FORM]
    with pytest.raises(SlackApiError) as e:
        await web_client.views_publish(user_id=ALICE, view=FORM)
    assert e.value.response["error"] == "invalid_arguments"


async def test_app_home_opened_and_views_publish(slack: SlackStandIn, http_bot: Bot) -> None:
    delivery = await slack.open_home(ALICE)
    assert delivery.status == 200
    await slack.wait_for(lambda: slack.homes.get(ALICE), 5, "the home tab")
    assert slack.homes[ALICE] == {"type": "home", "blocks": [SECTION]}
    await http_bot.idle(slack)


async def test_main_runs_standalone_and_stops_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    fixtures = tmp_path / "fixtures.json"
    fixtures.write_text(json.dumps({"users": USERS, "channels": CHANNELS, "usergroups": USERGROUPS}))
    env = {**os.environ, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET,
           "SLACK_APP_TOKEN": APP_TOKEN, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.testing.slack", "--ready-file", str(ready), "--fixtures", str(fixtures)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def started() -> bool:
            assert proc.poll() is None, proc.communicate()
            return ready.exists()

        await eventually(started, 15, "the stand-in to become ready", interval=0.02)
        url = ready.read_text().strip()

        async def use() -> None:
            client = AsyncWebClient(token=BOT_TOKEN, base_url=url + "/api/")
            assert (await client.users_info(user=ALICE))["user"]["name"] == "alice"
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/_standin/calls") as r:
                    assert [c["method"] for c in await r.json()] == ["users.info"]

        await use()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert url in out
    for secret in (BOT_TOKEN, APP_TOKEN, SIGNING_SECRET):
        assert secret not in out and secret not in err
    assert not ready.exists()


def test_main_refuses_to_run_without_secrets(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLACK_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "bot.testing.slack"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "SLACK_BOT_TOKEN" in proc.stderr


async def test_a_gate_holds_the_call_it_matches_until_released_and_lets_the_others_pass(
        slack: SlackStandIn, web_client: AsyncWebClient) -> None:
    gate = slack.hold("chat.postMessage", match=lambda args: args.get("text", "").startswith("held"))
    assert (await web_client.chat_postMessage(channel=OPS, text="before"))["ok"]
    held = asyncio.create_task(web_client.chat_postMessage(channel=OPS, text="held 1"))
    assert (await gate.reached(timeout=5))["text"] == "held 1"
    # held: unanswered, not processed, not recorded; a later matching call passes the gate
    assert (await web_client.chat_postMessage(channel=OPS, text="held 2"))["ok"]
    assert not held.done() and [m.text for m in slack.messages] == ["before", "held 2"]
    assert [c.args["text"] for c in slack.calls_to("chat.postMessage")] == ["before", "held 2"]
    gate.release()
    assert (await held)["ok"] and gate.dropped is False
    assert [m.text for m in slack.messages] == ["before", "held 2", "held 1"]


async def test_a_held_call_its_client_gave_up_on_is_dropped_and_its_release_says_so(slack: SlackStandIn) -> None:
    impatient = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url, timeout=1, retry_handlers=[])
    gate = slack.hold("chat.update")
    posted = await impatient.chat_postMessage(channel=OPS, text="v1")
    edit = asyncio.create_task(impatient.chat_update(channel=OPS, ts=posted["ts"], text="v2"))
    await gate.reached(timeout=5)
    with pytest.raises((TimeoutError, aiohttp.ClientError)):
        await edit   # the client's own deadline
    await eventually(lambda: gate.abandoned, 5, "the stand-in to see the client gone")
    with pytest.raises(AssertionError, match="gave up on the held chat.update"):
        gate.release()
    await eventually(lambda: gate.dropped is not None, 5, "the held call to be let go")
    assert gate.dropped and slack.messages[0].text == "v1" and not slack.calls_to("chat.update")
