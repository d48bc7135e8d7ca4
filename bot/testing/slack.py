"""A local Slack stand-in: Slack's wire protocol on 127.0.0.1, no workspace needed.

Tests and the demo run the real bot (real slack-bolt, real slack_sdk) against
it. The bot's AsyncWebClient gets ``base_url = stand_in.api_url`` and talks to
it exactly as it talks to slack.com; the stand-in delivers slash commands and
events to the bot exactly as Slack does: signed HTTP POSTs to ``bot_url`` or,
when the bot connected over Socket Mode, envelopes on the websocket, waiting
for the ack. Everything the bot does is recorded (``calls``, ``messages``) so
tests assert on what a user would see, faults can be injected
(``fail_next``) to test the bot's reliability, and a call can be held
(``hold``) to pause the bot at a chosen moment while the test acts.

A small control API (``/_standin/...``) and ``main()`` let a driver in another
process (a ``say`` CLI, the demo) use a stand-in running as a subprocess.

Secrets (bot token, app token, signing secret) are only compared and used to
sign; they are never stored in records, logged or printed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import string
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

__all__ = ["ApiCall", "Delivery", "Gate", "Message", "OpenView", "SlackStandIn", "blocks_problem", "sign_request",
           "main"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Slack lets an app use a slash command's response_url this many times ...
RESPONSE_URL_MAX_USES = 5
#: ... within this many seconds.
RESPONSE_URL_TTL = 30 * 60
#: How long a delivery waits for the bot's HTTP answer or Socket Mode ack.
DEFAULT_DELIVERY_TIMEOUT = 10.0
#: Control API: the bot is considered done once nothing changed for this long.
QUIET_PERIOD = 0.3
#: Polling interval of wait_for (the bot runs in the same loop or another process).
POLL_INTERVAL = 0.01
#: Slack takes every connection the bot opens, and slack_sdk opens one per Web API call. With aiohttp's default
#: listen queue (128), a burst while this loop is busy made the kernel drop SYNs: the bot's call then waited out
#: TCP's retransmission (1 s, then 2 s more), a delay real Slack does not add.
LISTEN_BACKLOG = 1024

_ID_CHARS = string.ascii_uppercase + string.digits


def sign_request(signing_secret: str, timestamp: int, body: str) -> str:
    """Slack's request signature: ``v0=`` + hex HMAC-SHA256 of ``v0:{timestamp}:{body}``.

    This is what slack_sdk's SignatureVerifier (used by bolt) recomputes over
    the raw body; the body must be sent byte for byte as signed.
    """
    base = f"v0:{timestamp}:{body}".encode()
    return "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()


@dataclass
class ApiCall:
    """One recorded Web API call (the token is never stored)."""

    method: str
    args: dict
    status: int
    response: dict
    at: float


@dataclass
class Message:
    """A message visible in the fake workspace."""

    channel: str
    ts: str
    text: str
    blocks: list | None
    user: str
    thread_ts: str | None = None
    ephemeral_to: str | None = None
    source: str = ""
    edits: list[dict] = field(default_factory=list)
    reactions: dict[str, list[str]] = field(default_factory=dict)
    #: chat.delete or a response_url delete_original hid it (kept so indexes stay stable).
    deleted: bool = False


@dataclass
class Delivery:
    """The result of delivering one request (command or event) to the bot."""

    status: int  # bot's HTTP status, 200 for a Socket Mode ack, 0 when there was no answer
    body: str
    elapsed: float
    json: dict | None
    mode: str = ""  # "http" or "socket"
    event_id: str | None = None  # for events: the id to reuse for a redelivery
    envelope_id: str | None = None  # Socket Mode: the envelope's id, to redeliver it (to another connection)
    error: str | None = None  # why status is 0 (timeout, connection refused)


class _ApiError(Exception):
    """A Slack-style ``{"ok": false, "error": ...}`` answer."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass
class _Failure:
    status: int
    remaining: int
    retry_after: int | None
    error: str | None
    match: Callable[[dict], bool] | None = None


class Gate:
    """Holds the next Web API call to `method` that `match` accepts, unanswered and unprocessed, until
    `release()`: the bot waits on it exactly as long as the test needs, e.g. a plan that announces
    step 3 (its chat.update) stays before step 3 while the test changes the cluster. Later calls pass.

    The bot's Web API client gives up on an unanswered call after its own timeout (10 s); a hold
    that outlasts it proved nothing (the bot went on without the call), so `release()` says so."""

    def __init__(self, method: str, match: Callable[[dict[str, Any]], bool] | None) -> None:
        self.method, self.match = method, match
        self.args: dict[str, Any] | None = None   # the held call's arguments, once it arrived
        self.dropped: bool | None = None          # once released: whether its client had given up on it
        self._request: web.Request | None = None
        self._arrived = asyncio.Event()
        self._open = asyncio.Event()

    def takes(self, method: str, args: dict[str, Any]) -> bool:
        """Whether this gate holds that call (the first one it matches; none once released)."""
        return (self.args is None and not self._open.is_set() and method == self.method
                and (self.match is None or self.match(args)))

    async def hold(self, request: web.Request, args: dict[str, Any]) -> bool:
        """Keep the call until released; False when its client went away meanwhile (drop the call)."""
        self.args, self._request = args, request
        self._arrived.set()
        await self._open.wait()
        self.dropped = self._gone()
        return not self.dropped

    def _gone(self) -> bool:
        transport = self._request.transport if self._request is not None else None
        return self._request is not None and (transport is None or transport.is_closing())

    @property
    def holding(self) -> bool:
        return self._arrived.is_set() and not self._open.is_set()

    @property
    def abandoned(self) -> bool:
        """It holds a call whose client gave up on it (closed the connection)."""
        return self.holding and self._gone()

    async def reached(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the bot made the call the gate holds; its arguments."""
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for a {self.method} call to hold") from None
        assert self.args is not None
        return self.args

    def release(self) -> None:
        """Let the held call through (and every later one). AssertionError if the bot gave up on it."""
        gone = self.abandoned
        self._open.set()
        if gone:
            raise AssertionError(f"the bot gave up on the held {self.method} call before it was released "
                                 "(its client's timeout): hold it for less time")

    def open(self) -> None:
        """Release without judging (the stand-in stops, or the bot was killed on purpose)."""
        self._open.set()


@dataclass
class _ResponseUrl:
    """What a slash command's response_url belongs to."""

    user_id: str
    channel_id: str
    created: float
    uses: int = 0
    last: Message | None = None  # the message replace_original / delete_original act on


#: A click's trigger_id opens a modal (views.open) only this many seconds after the click, and only once.
TRIGGER_TTL = 3.0
#: Slack's limits on the blocks of a message, and of a view.
MESSAGE_BLOCKS_MAX, VIEW_BLOCKS_MAX = 50, 100


@dataclass
class OpenView:
    """A modal as its user sees it: opened (views.open), replaced (views.update or a submission's
    `response_action: update`), showing inline errors, or closed."""

    id: str
    user: str
    view: dict[str, Any]
    hash: str
    trigger_id: str
    errors: dict[str, str] = field(default_factory=dict)     # what the last submission was told, by block_id
    closed: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)   # the views it showed before


def blocks_problem(blocks: Any, limit: int = MESSAGE_BLOCKS_MAX) -> str | None:
    """Why Slack would refuse these blocks, by slack_sdk's models (an unknown block type or field, a
    text over its limit), or None. A field the models do not know fails too: Slack refuses it."""
    from slack_sdk.errors import SlackObjectFormationError
    from slack_sdk.models.blocks import Block
    if blocks is None:
        return None
    if not isinstance(blocks, list) or len(blocks) > limit:
        return f"blocks must be a list of at most {limit}"
    for i, raw in enumerate(blocks):
        parsed = Block.parse(raw) if isinstance(raw, dict) else None
        if parsed is None or type(parsed) is Block:
            return f"blocks[{i}]: not a block slack_sdk knows: {str(raw)[:200]}"
        try:
            parsed.validate_json()
            again = parsed.to_dict()
        except SlackObjectFormationError as e:
            return f"blocks[{i}] ({raw.get('type')}): {e}"
        if again != raw:
            return f"blocks[{i}] ({raw.get('type')}): fields slack_sdk does not know or reads otherwise: {raw}"
    return None


def _valid_blocks(blocks: Any) -> Any:
    """The blocks of a message, or the error Slack answers (invalid_blocks; the reason is logged)."""
    if problem := blocks_problem(blocks):
        log.warning("invalid_blocks: %s", problem)
        raise _ApiError("invalid_blocks")
    return blocks


def _view_problem(view: Any, kinds: tuple[str, ...]) -> str | None:
    """Why Slack would refuse this view (views.open/update/publish), or None."""
    from slack_sdk.errors import SlackObjectFormationError
    from slack_sdk.models.views import View
    if not isinstance(view, dict) or view.get("type") not in kinds:
        return f"a view of type {' or '.join(kinds)} is needed"
    unknown = set(view) - View.attributes
    if unknown:
        return f"unknown view fields {sorted(unknown)}"
    try:
        View(**view).validate_json()
    except (SlackObjectFormationError, TypeError) as e:
        return str(e)
    if any(b.get("type") == "input" for b in view.get("blocks", [])) and not view.get("submit"):
        return "a modal with inputs needs a submit button"
    return blocks_problem(view.get("blocks"), VIEW_BLOCKS_MAX)


def _random_id(prefix: str, n: int = 10) -> str:
    return prefix + "".join(secrets.choice(_ID_CHARS) for _ in range(n))


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _maybe_json(value: Any, error: str) -> Any:
    """Form bodies carry blocks/attachments as JSON text; JSON bodies as lists."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise _ApiError(error) from None
    return value


class SlackStandIn:
    """Slack's Web API, response_url sink, Socket Mode and request delivery on loopback."""

    def __init__(
        self,
        *,
        bot_token: str,
        signing_secret: str,
        app_token: str | None = None,
        team_id: str = "T0TEAM0001",
        bot_user_id: str = "U0BOT00001",
        bot_id: str = "B0BOT00001",
        users: dict[str, dict] | None = None,
        usergroups: dict[str, list[str]] | None = None,
        channels: dict[str, str] | None = None,
        app_id: str = "A0APP00001",
        team_domain: str = "etcd-chatops-test",
        bot_name: str = "etcd-chatops",
    ) -> None:
        if not bot_token or not signing_secret:
            raise ValueError("bot_token and signing_secret are required")
        self._bot_token = bot_token
        self._signing_secret = signing_secret
        self._app_token = app_token
        self.team_id = team_id
        self.team_domain = team_domain
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.bot_name = bot_name
        self.app_id = app_id
        self.users = dict(users) if users is not None else None
        self.usergroups = {k: list(v) for k, v in usergroups.items()} if usergroups is not None else {}
        self.channels = dict(channels) if channels is not None else None
        # Slack's legacy verification token, sent in every payload; bolt ignores it.
        self.verification_token = "vt" + secrets.token_hex(12)

        self.url: str = ""
        self.api_url: str = ""
        self.bot_url: str | None = None
        self.calls: list[ApiCall] = []
        self.messages: list[Message] = []

        self._by_key: dict[tuple[str, str], Message] = {}
        self._dm_channels: dict[str, str] = {}  # D... -> user id
        self._failures: dict[str, list[_Failure]] = {}
        self._gates: list[Gate] = []
        self._responses: dict[str, _ResponseUrl] = {}
        self._tickets: set[str] = set()
        self._sockets: list[web.WebSocketResponse] = []
        self._pending_acks: dict[str, asyncio.Future[dict]] = {}
        self._last_ts_us = 0
        self._last_change = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        # interactivity (the section of that name): views by id, Home tabs by user, trigger_ids issued
        self.views: dict[str, OpenView] = {}
        self.homes: dict[str, dict[str, Any]] = {}
        self.dialogs: list[dict[str, Any] | None] = []   # the confirm dialog of each click (None: none)
        self.interactions: list[dict[str, Any]] = []     # every interactive payload delivered
        self.trigger_ttl = TRIGGER_TTL
        self._triggers: dict[str, tuple[float, str]] = {}   # trigger_id -> (issued, user)
        self._exchanged: set[str] = set()                   # trigger_ids that opened a view already

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on loopback; port 0 lets the OS pick a free port."""
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("the Slack stand-in only listens on 127.0.0.1")
        if self._runner is not None:
            raise RuntimeError("already started")
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle_api)
        app.router.add_post("/response/{rid}", self._handle_response_url)
        app.router.add_get("/socket", self._handle_socket)
        app.router.add_post("/_standin/command", self._ctl_command)
        app.router.add_post("/_standin/event", self._ctl_event)
        app.router.add_post("/_standin/react", self._ctl_react)
        app.router.add_get("/_standin/messages", self._ctl_messages)
        app.router.add_get("/_standin/calls", self._ctl_calls)
        app.router.add_get("/_standin/health", self._ctl_health)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", port, backlog=LISTEN_BACKLOG)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{bound_port}"
        self.api_url = self.url + "/api/"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        log.info("slack stand-in listening on %s", self.url)

    async def stop(self) -> None:
        """Open the gates, close websockets, pending acks, the server and the delivery session."""
        for gate in self._gates:
            gate.open()
        self._gates.clear()
        for fut in self._pending_acks.values():
            fut.cancel()
        self._pending_acks.clear()
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"stand-in stopping")
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> SlackStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ inspection

    def calls_to(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method]

    def channel_messages(
        self,
        channel: str,
        *,
        include_threads: bool = True,
        include_ephemeral: bool = True,
        include_deleted: bool = False,
    ) -> list[Message]:
        """Messages of one channel in posting order (deleted ones hidden, as in Slack)."""
        return [
            m
            for m in self.messages
            if m.channel == channel
            and (include_threads or m.thread_ts is None or m.thread_ts == m.ts)
            and (include_ephemeral or m.ephemeral_to is None)
            and (include_deleted or not m.deleted)
        ]

    def find_message(self, channel: str, ts: str) -> Message | None:
        return self._by_key.get((channel, ts))

    def add_user_message(self, channel: str, user: str, text: str, *, thread_ts: str | None = None) -> Message:
        """Record a message written by a human (no event is delivered), e.g. to react to it."""
        msg = Message(channel=channel, ts=self._next_ts(), text=text, blocks=None, user=user,
                      thread_ts=thread_ts, source="user")
        self._add(msg)
        return msg

    async def wait_for(
        self, predicate: Callable[[], T | None | bool], timeout: float = 10.0, what: str = ""
    ) -> T:
        """Poll until predicate() is truthy and return its value; TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value  # type: ignore[return-value]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what or 'a condition'}")
            await asyncio.sleep(POLL_INTERVAL)

    async def wait_for_message(
        self,
        predicate: Callable[[Message], bool],
        timeout: float = 10.0,
        what: str = "",
        *,
        after: int = 0,
    ) -> Message:
        """The oldest message at index >= ``after`` matching predicate, waiting for it if needed. At the
        deadline the error quotes what was posted meanwhile (a refusal instead of the message awaited)."""

        def find() -> Message | None:
            for m in self.messages[after:]:
                if predicate(m):
                    return m
            return None

        try:
            return await self.wait_for(find, timeout, what or "a matching message")
        except TimeoutError as e:
            posted = [m.text[:300] for m in self.messages[after:]]
            raise TimeoutError(f"{e}; posted meanwhile: {posted!r}") from None

    @property
    def socket_connected(self) -> bool:
        return any(not ws.closed for ws in self._sockets)

    async def wait_socket_connected(self, timeout: float = 10.0) -> None:
        await self.wait_for(lambda: self.socket_connected, timeout, "a Socket Mode connection")

    async def disconnect_socket(self, reason: str = "refresh_requested") -> None:
        """Send Slack's ``disconnect`` message: slack_sdk then reconnects via apps.connections.open."""
        for ws in list(self._sockets):
            if not ws.closed:
                await ws.send_str(json.dumps(
                    {"type": "disconnect", "reason": reason, "debug_info": {"host": "standin-127.0.0.1"}}
                ))

    # ------------------------------------------------------------------ fault injection

    def fail_next(
        self,
        method: str,
        *,
        status: int = 500,
        count: int = 1,
        retry_after: int | None = None,
        error: str | None = None,
        match: Callable[[dict], bool] | None = None,
    ) -> None:
        """Make the next ``count`` calls to ``method`` answer ``status`` (still recorded).

        429 always carries Retry-After (default 1 s) and error "ratelimited", like Slack.
        status=200 with an ``error`` injects an ``ok: false`` answer. With ``match``, only
        calls whose arguments satisfy it fail (a fault at one precise moment of a flow).
        """
        if status == 429 and retry_after is None:
            retry_after = 1
        self._failures.setdefault(method, []).append(_Failure(status, count, retry_after, error, match))

    def hold(self, method: str, *, match: Callable[[dict[str, Any]], bool] | None = None) -> Gate:
        """Hold the next call to ``method`` (whose arguments satisfy ``match``) until the gate is released:
        ``gate = slack.hold(...)``, then ``await gate.reached()``, act, ``gate.release()``."""
        gate = Gate(method, match)
        self._gates.append(gate)
        return gate

    def _take_failure(self, method: str, args: dict | None = None) -> _Failure | None:
        queue = self._failures.get(method) or []
        for f in list(queue):
            if f.remaining <= 0:
                queue.remove(f)
                continue
            if f.match is not None and not f.match(args or {}):
                continue
            f.remaining -= 1
            if f.remaining == 0:
                queue.remove(f)
            return f
        return None

    # ------------------------------------------------------------------ recording helpers

    def _next_ts(self) -> str:
        """Slack-shaped, unique and increasing: wall-clock microseconds, bumped if needed."""
        us = max(int(time.time() * 1_000_000), self._last_ts_us + 1)
        self._last_ts_us = us
        return f"{us // 1_000_000}.{us % 1_000_000:06d}"

    def _add(self, msg: Message) -> Message:
        self.messages.append(msg)
        self._by_key[(msg.channel, msg.ts)] = msg
        self._touch()
        return msg

    def _touch(self) -> None:
        self._last_change = time.monotonic()

    def _message_json(self, msg: Message) -> dict:
        d: dict[str, Any] = {"type": "message", "user": msg.user, "text": msg.text, "ts": msg.ts,
                             "team": self.team_id}
        if msg.user == self.bot_user_id:
            d.update({"bot_id": self.bot_id, "app_id": self.app_id})
        if msg.blocks:
            d["blocks"] = msg.blocks
        if msg.thread_ts:
            d["thread_ts"] = msg.thread_ts
        if msg.edits:
            d["edited"] = {"user": msg.user, "ts": msg.ts}
        return d

    def _user_record(self, user_id: str) -> dict | None:
        if user_id == self.bot_user_id:
            return {"name": self.bot_name, "real_name": self.bot_name, "is_bot": True}
        if self.users is None:
            return {"name": user_id.lower(), "real_name": user_id}
        return self.users.get(user_id)

    def _channel_name(self, channel_id: str) -> str:
        if channel_id.startswith("D"):
            return "directmessage"
        if self.channels is not None and channel_id in self.channels:
            return self.channels[channel_id]
        return channel_id.lower()

    def _resolve_channel(self, channel: Any) -> str:
        """Channel id, ``#name`` or a user id (a DM), as chat.postMessage accepts."""
        if not channel or not isinstance(channel, str):
            raise _ApiError("channel_not_found")
        if channel in self._dm_channels:
            return channel
        if channel.startswith("#"):
            name = channel[1:]
            for cid, cname in (self.channels or {}).items():
                if cname == name:
                    return cid
            raise _ApiError("channel_not_found")
        if channel[0] in "UW" and (self.users is None or channel in self.users):
            dm = "D" + channel[1:]
            self._dm_channels[dm] = channel
            return dm
        if self.channels is None or channel in self.channels:
            return channel
        raise _ApiError("channel_not_found")

    # ------------------------------------------------------------------ Web API

    async def _read_args(self, request: web.Request) -> dict[str, Any]:
        """Merge query string, form body and JSON body, as Slack does."""
        args: dict[str, Any] = dict(request.query)
        if request.method == "POST" and request.can_read_body:
            if request.content_type == "application/json":
                try:
                    body = await request.json()
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise _ApiError("invalid_json") from None
                if not isinstance(body, dict):
                    raise _ApiError("invalid_json")
                args.update(body)
            elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
                form = await request.post()
                for k, v in form.items():
                    args[k] = v if isinstance(v, str) else f"(file {getattr(v, 'filename', '')})"
        return args

    def _auth_error(self, method: str, token: str | None) -> str | None:
        if not token:
            return "not_authed"
        is_bot = hmac.compare_digest(token.encode(), self._bot_token.encode())
        is_app = self._app_token is not None and hmac.compare_digest(token.encode(), self._app_token.encode())
        if method == "apps.connections.open":
            return None if is_app else ("not_allowed_token_type" if is_bot else "invalid_auth")
        if is_bot:
            return None
        return "not_allowed_token_type" if is_app else "invalid_auth"

    async def _handle_api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        at = time.monotonic()
        headers: dict[str, str] = {}
        status = 200
        args: dict[str, Any] = {}
        try:
            args = await self._read_args(request)
            token = args.pop("token", None)
            auth = request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                token = auth[7:].strip()
            gate = next((g for g in self._gates if g.takes(method, args)), None)
            if gate is not None:
                kept = await gate.hold(request, args)
                if gate in self._gates:
                    self._gates.remove(gate)
                if not kept:   # its client gave up: the call never happened
                    return web.json_response({"ok": False, "error": "request_timeout"}, status=408)
            failure = self._take_failure(method, args)
            if failure is not None:
                status = failure.status
                error = failure.error or ("ratelimited" if status == 429 else "internal_error")
                body: dict[str, Any] = {"ok": False, "error": error}
                if failure.retry_after is not None:
                    headers["Retry-After"] = str(failure.retry_after)
            else:
                handler = self._methods.get(method)
                if handler is None:
                    raise _ApiError("unknown_method")
                auth_error = self._auth_error(method, token)
                if auth_error:
                    raise _ApiError(auth_error)
                body = handler(self, args)
        except _ApiError as e:
            body = {"ok": False, "error": e.error}
        self.calls.append(ApiCall(method=method, args=args, status=status, response=body, at=at))
        self._touch()
        return web.json_response(body, status=status, headers=headers)

    def _api_auth_test(self, args: dict) -> dict:
        return {
            "ok": True,
            "url": self.url + "/",
            "team": self.team_domain,
            "user": self.bot_name,
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _api_post_message(self, args: dict) -> dict:
        channel = self._resolve_channel(args.get("channel"))
        text = args.get("text")
        blocks = _valid_blocks(_maybe_json(args.get("blocks"), "invalid_blocks"))
        attachments = _maybe_json(args.get("attachments"), "invalid_attachments")
        if not text and not blocks and not attachments:
            raise _ApiError("no_text")
        thread_ts = args.get("thread_ts") or None
        if thread_ts:
            parent = self.find_message(channel, thread_ts)
            if parent is not None and parent.thread_ts:
                thread_ts = parent.thread_ts  # a reply to a reply goes to the same thread
        msg = self._add(Message(channel=channel, ts=self._next_ts(), text=text or "", blocks=blocks or None,
                                user=self.bot_user_id, thread_ts=thread_ts, source="chat.postMessage"))
        return {"ok": True, "channel": channel, "ts": msg.ts, "message": self._message_json(msg)}

    def _api_update(self, args: dict) -> dict:
        channel = self._resolve_channel(args.get("channel"))
        msg = self.find_message(channel, str(args.get("ts") or ""))
        if msg is None or msg.deleted or msg.ephemeral_to is not None:
            raise _ApiError("message_not_found")
        if msg.user != self.bot_user_id:
            raise _ApiError("cant_update_message")
        if "text" not in args and "blocks" not in args and "attachments" not in args:
            raise _ApiError("no_text")
        blocks = _valid_blocks(_maybe_json(args.get("blocks"), "invalid_blocks"))
        msg.edits.append({"text": msg.text, "blocks": msg.blocks})
        if "text" in args:
            msg.text = args.get("text") or ""
        if "blocks" in args:
            msg.blocks = blocks or None  # an empty list removes the blocks
        self._touch()
        return {"ok": True, "channel": channel, "ts": msg.ts, "text": msg.text, "message": self._message_json(msg)}

    def _api_delete(self, args: dict) -> dict:
        channel = self._resolve_channel(args.get("channel"))
        msg = self.find_message(channel, str(args.get("ts") or ""))
        if msg is None or msg.deleted or msg.ephemeral_to is not None:
            raise _ApiError("message_not_found")
        if msg.user != self.bot_user_id:
            raise _ApiError("cant_delete_message")
        msg.deleted = True
        self._touch()
        return {"ok": True, "channel": channel, "ts": msg.ts}

    def _api_post_ephemeral(self, args: dict) -> dict:
        channel = self._resolve_channel(args.get("channel"))
        user = args.get("user")
        if not user or self._user_record(user) is None:
            raise _ApiError("user_not_in_channel")
        text = args.get("text")
        blocks = _valid_blocks(_maybe_json(args.get("blocks"), "invalid_blocks"))
        if not text and not blocks and not args.get("attachments"):
            raise _ApiError("no_text")
        msg = self._add(Message(channel=channel, ts=self._next_ts(), text=text or "", blocks=blocks or None,
                                user=self.bot_user_id, thread_ts=args.get("thread_ts") or None,
                                ephemeral_to=user, source="chat.postEphemeral"))
        return {"ok": True, "message_ts": msg.ts}

    def _react_target(self, args: dict) -> tuple[Message, str]:
        name = str(args.get("name") or "").strip(":")
        if not name:
            raise _ApiError("invalid_name")
        channel = self._resolve_channel(args.get("channel"))
        msg = self.find_message(channel, str(args.get("timestamp") or ""))
        if msg is None or msg.deleted or msg.ephemeral_to is not None:
            raise _ApiError("message_not_found")
        return msg, name

    def _api_reactions_add(self, args: dict) -> dict:
        msg, name = self._react_target(args)
        users = msg.reactions.setdefault(name, [])
        if self.bot_user_id in users:
            raise _ApiError("already_reacted")
        users.append(self.bot_user_id)
        self._touch()
        return {"ok": True}

    def _api_reactions_remove(self, args: dict) -> dict:
        msg, name = self._react_target(args)
        users = msg.reactions.get(name, [])
        if self.bot_user_id not in users:
            raise _ApiError("no_reaction")
        users.remove(self.bot_user_id)
        if not users:
            del msg.reactions[name]
        self._touch()
        return {"ok": True}

    def _api_usergroup_users(self, args: dict) -> dict:
        group = args.get("usergroup")
        if not group or group not in self.usergroups:
            raise _ApiError("no_such_subteam")
        return {"ok": True, "users": list(self.usergroups[group])}

    def _api_users_info(self, args: dict) -> dict:
        user_id = args.get("user")
        record = self._user_record(user_id) if user_id else None
        if record is None:
            raise _ApiError("user_not_found")
        name = record.get("name", user_id.lower())
        real_name = record.get("real_name", name)
        is_bot = bool(record.get("is_bot", False))
        user = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "real_name": real_name,
            "deleted": bool(record.get("deleted", False)),
            "is_bot": is_bot,
            "is_app_user": False,
            "is_admin": bool(record.get("is_admin", False)),
            "tz": record.get("tz", "UTC"),
            "profile": {
                "real_name": real_name,
                "real_name_normalized": real_name,
                "display_name": record.get("display_name", name),
                "display_name_normalized": record.get("display_name", name),
                "team": self.team_id,
            },
        }
        if is_bot:
            user["profile"]["bot_id"] = self.bot_id
        return {"ok": True, "user": user}

    def _api_conversations_info(self, args: dict) -> dict:
        channel = args.get("channel")
        if not channel:
            raise _ApiError("channel_not_found")
        if channel in self._dm_channels:
            return {"ok": True, "channel": {"id": channel, "is_im": True, "user": self._dm_channels[channel],
                                            "is_channel": False, "is_private": True, "is_archived": False}}
        if self.channels is not None and channel not in self.channels:
            raise _ApiError("channel_not_found")
        name = self._channel_name(channel)
        return {
            "ok": True,
            "channel": {
                "id": channel, "name": name, "name_normalized": name, "is_channel": True, "is_group": False,
                "is_im": False, "is_mpim": False, "is_private": False, "is_archived": False, "is_general": False,
                "is_member": True, "is_ext_shared": False, "context_team_id": self.team_id,
                "created": 1700000000, "creator": self.bot_user_id,
            },
        }

    def _api_conversations_open(self, args: dict) -> dict:
        users = [u for u in str(args.get("users") or "").split(",") if u]
        if len(users) != 1:
            raise _ApiError("users_list_not_supplied" if not users else "not_supported")
        if self._user_record(users[0]) is None:
            raise _ApiError("user_not_found")
        dm = self._resolve_channel(users[0])
        return {"ok": True, "channel": {"id": dm}}

    def _api_permalink(self, args: dict) -> dict:
        channel = self._resolve_channel(args.get("channel"))
        msg = self.find_message(channel, str(args.get("message_ts") or ""))
        if msg is None or msg.ephemeral_to is not None:
            raise _ApiError("message_not_found")
        link = f"{self.url}/archives/{channel}/p{msg.ts.replace('.', '')}"
        if msg.thread_ts and msg.thread_ts != msg.ts:
            link += "?" + urlencode({"thread_ts": msg.thread_ts, "cid": channel})
        return {"ok": True, "channel": channel, "permalink": link}

    def _api_connections_open(self, args: dict) -> dict:
        ticket = str(uuid.uuid4())
        self._tickets.add(ticket)
        ws_url = self.url.replace("http://", "ws://", 1) + "/socket?" + urlencode(
            {"ticket": ticket, "app_id": self.app_id})
        return {"ok": True, "url": ws_url}

    _methods: dict[str, Callable[[SlackStandIn, dict], dict]] = {
        "auth.test": _api_auth_test,
        "chat.postMessage": _api_post_message,
        "chat.update": _api_update,
        "chat.delete": _api_delete,
        "chat.postEphemeral": _api_post_ephemeral,
        "chat.getPermalink": _api_permalink,
        "reactions.add": _api_reactions_add,
        "reactions.remove": _api_reactions_remove,
        "usergroups.users.list": _api_usergroup_users,
        "users.info": _api_users_info,
        "conversations.info": _api_conversations_info,
        "conversations.open": _api_conversations_open,
        "apps.connections.open": _api_connections_open,
    }

    # ------------------------------------------------------------------ response_url sink

    async def _handle_response_url(self, request: web.Request) -> web.Response:
        ctx = self._responses.get(request.match_info["rid"])
        if ctx is None:
            return web.Response(status=404, text="no_such_url")
        if time.monotonic() - ctx.created > RESPONSE_URL_TTL:
            return web.Response(status=404, text="expired_url")
        if ctx.uses >= RESPONSE_URL_MAX_USES:
            return web.Response(status=404, text="used_url")
        try:
            body = json.loads(await request.text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.Response(status=400, text="invalid_payload")
        if not isinstance(body, dict):
            return web.Response(status=400, text="invalid_payload")
        ctx.uses += 1
        if _truthy(body.get("delete_original")):
            if ctx.last is not None:
                ctx.last.deleted = True
                self._touch()
            return web.Response(text="ok")
        text = body.get("text") or ""
        blocks = body.get("blocks") or None
        if not text and not blocks and not body.get("attachments"):
            return web.Response(status=400, text="no_text")
        if blocks_problem(blocks):
            return web.Response(status=400, text="invalid_blocks")
        in_channel = body.get("response_type") == "in_channel"
        if _truthy(body.get("replace_original")) and ctx.last is not None and not ctx.last.deleted:
            ctx.last.edits.append({"text": ctx.last.text, "blocks": ctx.last.blocks})
            ctx.last.text, ctx.last.blocks = text, blocks
            self._touch()
        else:
            ctx.last = self._add(Message(
                channel=ctx.channel_id, ts=self._next_ts(), text=text, blocks=blocks, user=self.bot_user_id,
                thread_ts=body.get("thread_ts") or None, ephemeral_to=None if in_channel else ctx.user_id,
                source="response_url"))
        return web.Response(text="ok")

    # ------------------------------------------------------------------ Socket Mode server

    async def _handle_socket(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            return web.Response(status=401, text="invalid ticket")
        self._tickets.discard(ticket)
        # autoping answers slack_sdk's "sdk-ping-pong:<t>" pings with the same payload,
        # which is how it decides the connection is alive.
        ws = web.WebSocketResponse(autoping=True, timeout=2.0)
        await ws.prepare(request)
        await ws.send_str(json.dumps({
            "type": "hello",
            "num_connections": len([s for s in self._sockets if not s.closed]) + 1,
            "debug_info": {"host": "standin-127.0.0.1", "build_number": 1, "approximate_connection_time": 18060},
            "connection_info": {"app_id": self.app_id},
        }))
        self._sockets.append(ws)
        log.info("socket mode client connected")
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._on_socket_text(msg.data)
        finally:
            self._sockets.remove(ws)
            log.info("socket mode client disconnected")
        return ws

    def _on_socket_text(self, data: str) -> None:
        try:
            ack = json.loads(data)
        except json.JSONDecodeError:
            log.warning("socket mode: a non-JSON message was ignored")
            return
        if not isinstance(ack, dict):
            return
        fut = self._pending_acks.pop(str(ack.get("envelope_id")), None)
        if fut is not None and not fut.done():
            fut.set_result(ack)
        elif ack.get("envelope_id"):
            log.warning("socket mode: an ack for an unknown or late envelope was ignored")

    # ------------------------------------------------------------------ delivering to the bot

    def _delivery_mode(self, to: str | int | None = None) -> str:
        """`to`: a bot's URL (HTTP), or the index of an open Socket Mode connection, oldest first
        (several replicas of the bot); None: `bot_url`, else the newest connection."""
        if isinstance(to, str) or (to is None and self.bot_url):
            return "http"
        if self.socket_connected:
            return "socket"
        raise RuntimeError("nowhere to deliver: set bot_url or connect a Socket Mode client")

    async def _deliver_http(
        self, body: str, content_type: str, extra_headers: dict[str, str], *, sign: bool,
        timestamp: int | None, signing_secret: str | None, timeout: float, to: str | int | None = None,
    ) -> Delivery:
        url = to if isinstance(to, str) else self.bot_url
        assert self._session is not None and url, "stand-in not started"
        headers = {"Content-Type": content_type, "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
                   **extra_headers}
        if sign:
            ts = int(time.time()) if timestamp is None else timestamp
            headers["X-Slack-Request-Timestamp"] = str(ts)
            headers["X-Slack-Signature"] = sign_request(signing_secret or self._signing_secret, ts, body)
        t0 = time.monotonic()
        try:
            async with self._session.post(url, data=body.encode(), headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
                status, rtype = resp.status, resp.content_type
        except TimeoutError:
            return Delivery(0, "", time.monotonic() - t0, None, mode="http",
                            error=f"no answer within {timeout:g}s")
        except aiohttp.ClientError as e:
            return Delivery(0, "", time.monotonic() - t0, None, mode="http", error=f"{type(e).__name__}: {e}")
        elapsed = time.monotonic() - t0
        parsed: dict | None = None
        if text and (rtype == "application/json" or text.lstrip().startswith("{")):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(text)
                parsed = value if isinstance(value, dict) else None
        return Delivery(status, text, elapsed, parsed, mode="http")

    async def _deliver_socket(self, envelope: dict, *, timeout: float, to: str | int | None = None) -> Delivery:
        if isinstance(to, int):
            ws = self._sockets[to] if to < len(self._sockets) and not self._sockets[to].closed else None
        else:
            ws = next((s for s in reversed(self._sockets) if not s.closed), None)
        if ws is None:
            raise RuntimeError(f"no Socket Mode client is connected{'' if to is None else f' as connection {to}'}")
        env_id = envelope["envelope_id"]
        fut: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._pending_acks[env_id] = fut
        t0 = time.monotonic()
        try:
            await ws.send_str(json.dumps(envelope))
            ack = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return Delivery(0, "", time.monotonic() - t0, None, mode="socket", error=f"no ack within {timeout:g}s")
        finally:
            self._pending_acks.pop(env_id, None)
        elapsed = time.monotonic() - t0
        payload = ack.get("payload")
        body = json.dumps(payload) if payload is not None else ""
        return Delivery(200, body, elapsed, payload if isinstance(payload, dict) else None, mode="socket",
                        envelope_id=env_id)

    async def send_command(
        self,
        text: str,
        *,
        user_id: str,
        channel_id: str,
        command: str = "/etcd",
        sign: bool = True,
        timestamp: int | None = None,
        signing_secret: str | None = None,
        timeout: float = DEFAULT_DELIVERY_TIMEOUT,
        to: str | int | None = None,
        envelope_id: str | None = None,
    ) -> Delivery:
        """Deliver a slash command as Slack does; a non-empty ack is recorded as Slack shows it.
        `to` picks the replica (see _delivery_mode); `envelope_id` redelivers a Socket Mode envelope."""
        mode = self._delivery_mode(to)
        rid = secrets.token_hex(12)
        self._responses[rid] = ctx = _ResponseUrl(user_id=user_id, channel_id=channel_id, created=time.monotonic())
        user = self._user_record(user_id) or {}
        form = {
            "token": self.verification_token,
            "team_id": self.team_id,
            "team_domain": self.team_domain,
            "channel_id": channel_id,
            "channel_name": self._channel_name(channel_id),
            "user_id": user_id,
            "user_name": user.get("name", user_id.lower()),
            "command": command,
            "text": text,
            "api_app_id": self.app_id,
            "is_enterprise_install": "false",
            "response_url": f"{self.url}/response/{rid}",
            "trigger_id": f"{int(time.time())}.{secrets.randbelow(10**12)}.{secrets.token_hex(16)}",
        }
        if mode == "http":
            delivery = await self._deliver_http(
                urlencode(form), "application/x-www-form-urlencoded", {}, sign=sign, timestamp=timestamp,
                signing_secret=signing_secret, timeout=timeout, to=to)
        else:
            delivery = await self._deliver_socket(
                {"envelope_id": envelope_id or str(uuid.uuid4()), "type": "slash_commands", "payload": form,
                 "accepts_response_payload": True}, timeout=timeout, to=to)
        if delivery.status == 200:
            self._record_ack(ctx, delivery)
        return delivery

    def _record_ack(self, ctx: _ResponseUrl, delivery: Delivery) -> None:
        """What Slack shows for an ack body: ephemeral to the user, or in channel."""
        if delivery.json is not None:
            text = delivery.json.get("text") or ""
            blocks = delivery.json.get("blocks") or None
            in_channel = delivery.json.get("response_type") == "in_channel"
        else:
            text, blocks, in_channel = delivery.body.strip(), None, False
        if not text and not blocks:
            return
        ctx.last = self._add(Message(
            channel=ctx.channel_id, ts=self._next_ts(), text=text, blocks=blocks, user=self.bot_user_id,
            ephemeral_to=None if in_channel else ctx.user_id, source="ack"))

    async def send_event(
        self,
        event: dict,
        *,
        event_id: str | None = None,
        retry_num: int | None = None,
        retry_reason: str | None = None,
        sign: bool = True,
        timestamp: int | None = None,
        timeout: float = DEFAULT_DELIVERY_TIMEOUT,
        to: str | int | None = None,
        envelope_id: str | None = None,
    ) -> Delivery:
        """Deliver an Events API event_callback; pass the same event_id to redeliver it (and, in
        Socket Mode, the same envelope_id); `to` picks the replica (see _delivery_mode)."""
        mode = self._delivery_mode(to)
        event_id = event_id or _random_id("Ev")
        envelope = {
            "token": self.verification_token,
            "team_id": self.team_id,
            "context_team_id": self.team_id,
            "context_enterprise_id": None,
            "api_app_id": self.app_id,
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "authorizations": [{
                "enterprise_id": None, "team_id": self.team_id, "user_id": self.bot_user_id,
                "is_bot": True, "is_enterprise_install": False,
            }],
            "is_ext_shared_channel": False,
            "event_context": "4-" + secrets.token_urlsafe(24),
        }
        if mode == "http":
            headers: dict[str, str] = {}
            if retry_num is not None:
                headers["X-Slack-Retry-Num"] = str(retry_num)
                headers["X-Slack-Retry-Reason"] = retry_reason or "http_timeout"
            delivery = await self._deliver_http(
                json.dumps(envelope), "application/json", headers, sign=sign, timestamp=timestamp,
                signing_secret=None, timeout=timeout, to=to)
        else:
            # Slack sends retry_attempt 0 / retry_reason "" on a first delivery.
            delivery = await self._deliver_socket(
                {"envelope_id": envelope_id or str(uuid.uuid4()), "type": "events_api", "payload": envelope,
                 "accepts_response_payload": False, "retry_attempt": retry_num or 0,
                 "retry_reason": (retry_reason or "timeout") if retry_num else ""}, timeout=timeout, to=to)
        delivery.event_id = event_id
        return delivery

    async def react(
        self,
        *,
        user: str,
        channel: str,
        ts: str,
        reaction: str,
        event_id: str | None = None,
        retry_num: int | None = None,
        retry_reason: str | None = None,
        removed: bool = False,
        to: str | int | None = None,
    ) -> Delivery:
        """A user adds (or removes) a reaction: record it, deliver reaction_added/removed (to replica `to`)."""
        msg = self.find_message(channel, ts)
        if msg is None:
            raise LookupError(f"no message {ts} in {channel} to react to")
        reaction = reaction.strip(":")
        users = msg.reactions.setdefault(reaction, [])
        if removed:
            if user in users:
                users.remove(user)
        elif user not in users:
            users.append(user)
        if not users:
            msg.reactions.pop(reaction, None)
        self._touch()
        event = {
            "type": "reaction_removed" if removed else "reaction_added",
            "user": user,
            "reaction": reaction,
            "item": {"type": "message", "channel": channel, "ts": ts},
            "item_user": msg.user,
            "event_ts": self._next_ts(),
        }
        return await self.send_event(event, event_id=event_id, retry_num=retry_num, retry_reason=retry_reason, to=to)

    # ------------------------------------------------------------------ control API

    async def _settle(self, start: int, wait: float) -> None:
        """Wait until a message posted since index ``start`` exists and things are quiet."""
        deadline = time.monotonic() + wait
        with contextlib.suppress(TimeoutError):
            await self.wait_for(lambda: len(self.messages) > start, wait, "a reply")
            await self.wait_for(lambda: time.monotonic() - self._last_change >= QUIET_PERIOD,
                                max(0.0, deadline - time.monotonic()), "quiet")

    @staticmethod
    async def _json_body(request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="body must be a JSON object") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    def message_dict(self, index: int) -> dict:
        """A message as the control API reports it (with its index in ``messages``)."""
        return {"index": index, **asdict(self.messages[index])}

    async def _controlled(self, request: web.Request, deliver: Callable[[dict], Awaitable[Delivery]],
                          default_wait: float) -> web.Response:
        body = await self._json_body(request)
        wait = float(body.get("wait", default_wait))
        start = len(self.messages)
        try:
            delivery = await deliver(body)
        except KeyError as e:
            return web.json_response({"error": f"missing field {e}"}, status=400)
        except (RuntimeError, LookupError) as e:
            return web.json_response({"error": str(e)}, status=409)
        if wait > 0 and delivery.status == 200:
            await self._settle(start, wait)
        end = len(self.messages)
        return web.json_response({
            "delivery": asdict(delivery),
            "messages": [self.message_dict(i) for i in range(start, end)],
            "next_index": end,
        })

    async def _ctl_command(self, request: web.Request) -> web.Response:
        return await self._controlled(request, lambda b: self.send_command(
            str(b["text"]), user_id=str(b["user_id"]), channel_id=str(b["channel_id"]),
            command=str(b.get("command", "/etcd"))), default_wait=15.0)

    async def _ctl_event(self, request: web.Request) -> web.Response:
        return await self._controlled(request, lambda b: self.send_event(
            dict(b["event"]), event_id=b.get("event_id"), retry_num=b.get("retry_num"),
            retry_reason=b.get("retry_reason")), default_wait=0.0)

    async def _ctl_react(self, request: web.Request) -> web.Response:
        return await self._controlled(request, lambda b: self.react(
            user=str(b["user"]), channel=str(b["channel"]), ts=str(b["ts"]), reaction=str(b["reaction"]),
            event_id=b.get("event_id"), retry_num=b.get("retry_num"), removed=bool(b.get("removed", False))),
            default_wait=0.0)

    async def _ctl_messages(self, request: web.Request) -> web.Response:
        channel = request.query.get("channel")
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="after must be an integer") from None
        out = [self.message_dict(i) for i in range(max(0, after), len(self.messages))
               if channel is None or self.messages[i].channel == channel]
        return web.json_response(out)

    async def _ctl_calls(self, request: web.Request) -> web.Response:
        method = request.query.get("method")
        return web.json_response([asdict(c) for c in self.calls if method is None or c.method == method])

    async def _ctl_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "socket_connected": self.socket_connected, "bot_url": self.bot_url})


    # ------------------------------------------------------------------ interactivity: buttons, modals, App Home
    # Slack's side of Block Kit interactivity: a person clicks a button (block_actions, with a trigger_id
    # that opens a modal only within TRIGGER_TTL seconds, once), submits a modal (view_submission, answered
    # with nothing, inline errors or a new view), opens the App Home tab (app_home_opened); the bot draws
    # with views.open, views.update and views.publish. Every view, like every message, must pass
    # slack_sdk's models, as Slack's own validation would refuse it.

    def _issue_trigger(self, user: str) -> str:
        """A trigger_id for an interaction of `user`: it opens one modal, for that user, within trigger_ttl."""
        trigger = f"{int(time.time())}.{secrets.randbelow(10**12)}.{secrets.token_hex(16)}"
        self._triggers[trigger] = (time.monotonic(), user)
        return trigger

    def _user_json(self, user: str) -> dict[str, Any]:
        record = self._user_record(user) or {}
        name = record.get("name", user.lower())
        return {"id": user, "username": name, "name": name, "team_id": self.team_id}

    async def deliver_interaction(self, payload: dict[str, Any], *, sign: bool = True,
                                  timeout: float = DEFAULT_DELIVERY_TIMEOUT, to: str | int | None = None) -> Delivery:
        """An interactive payload as Slack sends it: the form field `payload` (HTTP), or an `interactive`
        envelope (Socket Mode); signed like everything else. Every payload is kept in `interactions`, so a
        test can deliver one again (to another replica) or unsigned."""
        self.interactions.append(payload)
        if self._delivery_mode(to) == "http":
            return await self._deliver_http(urlencode({"payload": json.dumps(payload)}),
                                            "application/x-www-form-urlencoded", {}, sign=sign, timestamp=None,
                                            signing_secret=None, timeout=timeout, to=to)
        return await self._deliver_socket({"envelope_id": str(uuid.uuid4()), "type": "interactive",
                                           "payload": payload, "accepts_response_payload": True},
                                          timeout=timeout, to=to)

    @staticmethod
    def buttons(msg: Message | dict[str, Any]) -> list[dict[str, Any]]:
        """Every button of a message (or a view), in order, each with its block's block_id added."""
        blocks = msg.blocks if isinstance(msg, Message) else msg.get("blocks")
        found = []
        for block in blocks or []:
            elements = block.get("elements", []) if block.get("type") == "actions" else [block.get("accessory")]
            found += [{**e, "block_id": block.get("block_id", "")} for e in elements
                      if isinstance(e, dict) and e.get("type") == "button"]
        return found

    async def click(self, user: str, msg: Message, action_id: str, *, value: str | None = None,
                    timeout: float = DEFAULT_DELIVERY_TIMEOUT, to: str | int | None = None) -> Delivery:
        """`user` clicks the button `action_id` (the one with `value`, when several share it) of `msg`,
        confirming its dialog if it has one: Slack sends block_actions with a fresh trigger_id and a
        response_url. LookupError if the message shows no such button (to this user)."""
        if msg.deleted or (msg.ephemeral_to is not None and msg.ephemeral_to != user):
            raise LookupError(f"{user} cannot see message {msg.ts}")
        button = next((b for b in self.buttons(msg) if b.get("action_id") == action_id
                       and (value is None or b.get("value") == value)), None)
        if button is None:
            raise LookupError(f"no button {action_id!r} on message {msg.ts}")
        self.dialogs.append(button.get("confirm"))
        rid = secrets.token_hex(12)
        self._responses[rid] = _ResponseUrl(user_id=user, channel_id=msg.channel, created=time.monotonic(),
                                            last=msg if msg.ephemeral_to else None)
        action: dict[str, Any] = {"type": "button", "action_id": action_id, "block_id": button["block_id"],
                  "text": button.get("text"), "action_ts": self._next_ts(),
                  **{k: button[k] for k in ("value", "style", "url") if k in button}}
        payload: dict[str, Any] = {
            "type": "block_actions", "user": self._user_json(user), "api_app_id": self.app_id,
            "token": self.verification_token, "trigger_id": self._issue_trigger(user),
            "team": {"id": self.team_id, "domain": self.team_domain}, "enterprise": None,
            "is_enterprise_install": False,
            "container": {"type": "message", "message_ts": msg.ts, "channel_id": msg.channel,
                          "is_ephemeral": msg.ephemeral_to is not None},
            "channel": {"id": msg.channel, "name": self._channel_name(msg.channel)},
            "state": {"values": {}}, "response_url": f"{self.url}/response/{rid}", "actions": [action]}
        if msg.ephemeral_to is None:   # Slack sends the message only when it is not ephemeral
            payload["message"] = self._message_json(msg)
        return await self.deliver_interaction(payload, timeout=timeout, to=to)

    def open_views(self, user: str | None = None) -> list[OpenView]:
        return [v for v in self.views.values() if not v.closed and (user is None or v.user == user)]

    async def submit(self, view: OpenView, values: dict[str, str], *, timeout: float = DEFAULT_DELIVERY_TIMEOUT,
                     to: str | int | None = None) -> Delivery:
        """Its user submits the modal with `values` (block_id -> text typed, or the value of the option
        chosen): Slack sends view_submission and acts on the answer: none closes the modal,
        `response_action: errors` keeps it open showing them (each must name an input block),
        `update` replaces it. Slack itself refuses to submit a required input left empty (ValueError)."""
        if view.closed:
            raise LookupError(f"view {view.id} is closed")
        state: dict[str, dict[str, dict[str, Any]]] = {}
        for block in view.view.get("blocks", []):
            if block.get("type") != "input":
                continue
            element, bid = block["element"], block["block_id"]
            typed = values.get(bid)
            if not typed and not block.get("optional", False):
                raise ValueError(f"Slack does not submit a modal whose required field {bid!r} is empty")
            if element["type"] == "static_select":
                chosen = next((o for o in element.get("options", []) if o["value"] == typed), None)
                if typed and chosen is None:
                    raise LookupError(f"{bid!r} has no option {typed!r}")
                entry: dict[str, Any] = {"type": "static_select", "selected_option": chosen}
            else:
                entry = {"type": element["type"], "value": typed or None}
            state[bid] = {element["action_id"]: entry}
        unknown = set(values) - set(state)
        if unknown:
            raise LookupError(f"the modal has no input {sorted(unknown)}")
        payload = {"type": "view_submission", "team": {"id": self.team_id, "domain": self.team_domain},
                   "user": self._user_json(view.user), "api_app_id": self.app_id, "token": self.verification_token,
                   "trigger_id": self._issue_trigger(view.user), "is_enterprise_install": False, "enterprise": None,
                   "response_urls": [], "view": {**self._view_json(view), "state": {"values": state}}}
        delivery = await self.deliver_interaction(payload, timeout=timeout, to=to)
        if delivery.status == 200:
            self._answer_submission(view, delivery)
        return delivery

    def _answer_submission(self, view: OpenView, delivery: Delivery) -> None:
        answer = delivery.json or {}
        action = answer.get("response_action")
        if action == "errors":
            errors = answer.get("errors") or {}
            inputs = {b.get("block_id") for b in view.view.get("blocks", []) if b.get("type") == "input"}
            if not isinstance(errors, dict) or not errors or not set(errors) <= inputs:
                raise AssertionError(f"Slack refuses errors that name no input block of the view: {errors}")
            view.errors = dict(errors)
        elif action == "update":
            problem = _view_problem(answer.get("view"), ("modal",))
            if problem:
                raise AssertionError(f"Slack refuses the updated view: {problem}")
            self._replace_view(view, answer["view"])
        elif action in (None, "clear"):
            view.closed = True
        else:
            raise AssertionError(f"unknown response_action {action!r}")
        self._touch()

    async def open_home(self, user: str, *, to: str | int | None = None) -> Delivery:
        """`user` opens the app's Home tab: the event app_home_opened."""
        home = self.homes.get(user)
        event: dict[str, Any] = {"type": "app_home_opened", "user": user, "channel": self._resolve_channel(user),
                                 "tab": "home", "event_ts": self._next_ts()}
        if home is not None:
            event["view"] = home
        return await self.send_event(event, to=to)

    def _view_json(self, view: OpenView) -> dict[str, Any]:
        return {**view.view, "id": view.id, "team_id": self.team_id, "hash": view.hash, "app_id": self.app_id,
                "bot_id": self.bot_id, "root_view_id": view.id, "previous_view_id": None,
                "state": {"values": {}}}

    def _replace_view(self, view: OpenView, new: dict[str, Any]) -> None:
        view.history.append(view.view)
        view.view, view.hash, view.errors = new, secrets.token_hex(8), {}

    def _api_views_open(self, args: dict[str, Any]) -> dict[str, Any]:
        trigger = str(args.get("trigger_id") or "")
        view = _maybe_json(args.get("view"), "invalid_arguments")
        issued = self._triggers.get(trigger)
        if trigger in self._exchanged:
            raise _ApiError("exchanged_trigger_id")
        if issued is None:
            raise _ApiError("invalid_trigger_id")
        if time.monotonic() - issued[0] > self.trigger_ttl:
            raise _ApiError("expired_trigger_id")
        if problem := _view_problem(view, ("modal",)):
            log.warning("views.open refused: %s", problem)
            raise _ApiError("invalid_arguments")
        del self._triggers[trigger]   # once: a second views.open with it is refused
        self._exchanged.add(trigger)
        opened = OpenView(id=_random_id("V"), user=issued[1], view=view, hash=secrets.token_hex(8),
                          trigger_id=trigger)
        self.views[opened.id] = opened
        return {"ok": True, "view": self._view_json(opened)}

    def _api_views_update(self, args: dict[str, Any]) -> dict[str, Any]:
        found = self.views.get(str(args.get("view_id") or ""))
        if found is None or found.closed:
            raise _ApiError("not_found")
        if args.get("hash") and args["hash"] != found.hash:
            raise _ApiError("hash_conflict")
        view = _maybe_json(args.get("view"), "invalid_arguments")
        if problem := _view_problem(view, ("modal",)):
            log.warning("views.update refused: %s", problem)
            raise _ApiError("invalid_arguments")
        self._replace_view(found, view)
        return {"ok": True, "view": self._view_json(found)}

    def _api_views_publish(self, args: dict[str, Any]) -> dict[str, Any]:
        user = str(args.get("user_id") or "")
        if self._user_record(user) is None:
            raise _ApiError("user_not_found")
        view = _maybe_json(args.get("view"), "invalid_arguments")
        if problem := _view_problem(view, ("home",)):
            log.warning("views.publish refused: %s", problem)
            raise _ApiError("invalid_arguments")
        self.homes[user] = view
        return {"ok": True, "view": {**view, "id": _random_id("V"), "team_id": self.team_id}}


SlackStandIn._methods.update({
    "views.open": SlackStandIn._api_views_open,
    "views.update": SlackStandIn._api_views_update,
    "views.publish": SlackStandIn._api_views_publish,
})


# ---------------------------------------------------------------------- standalone


async def _serve(stand_in: SlackStandIn, port: int, ready_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stand_in.start(port=port)
    try:
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(stand_in.url + "\n")
            os.replace(tmp, ready_file)
        print(f"slack stand-in listening on {stand_in.url}", flush=True)
        await stop.wait()
    finally:
        await stand_in.stop()
        if ready_file is not None:
            with contextlib.suppress(OSError):
                ready_file.unlink()


def main(argv: list[str] | None = None) -> int:
    """``python -m bot.testing.slack``: secrets from the environment only, never argv."""
    parser = argparse.ArgumentParser(
        prog="python -m bot.testing.slack",
        description="Run the Slack stand-in on 127.0.0.1. Tokens come from SLACK_BOT_TOKEN, "
                    "SLACK_SIGNING_SECRET and (for Socket Mode) SLACK_APP_TOKEN.")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: pick a free one)")
    parser.add_argument("--bot-url", default=None,
                        help="where to POST commands/events (omit to deliver over Socket Mode)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write the base URL here once listening")
    parser.add_argument("--fixtures", type=Path, default=None,
                        help='JSON file: {"users": {...}, "usergroups": {...}, "channels": {...}}')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    missing = [n for n in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET") if not os.environ.get(n)]
    if missing:
        print(f"slack stand-in: set {' and '.join(missing)} in the environment", file=sys.stderr)
        return 2
    fixtures: dict[str, Any] = {}
    if args.fixtures is not None:
        try:
            fixtures = json.loads(args.fixtures.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"slack stand-in: cannot read fixtures {args.fixtures}: {e}", file=sys.stderr)
            return 2
    known = {"users", "usergroups", "channels", "team_id", "bot_user_id", "bot_id", "app_id", "team_domain",
             "bot_name"}
    stand_in = SlackStandIn(
        bot_token=os.environ["SLACK_BOT_TOKEN"],
        signing_secret=os.environ["SLACK_SIGNING_SECRET"],
        app_token=os.environ.get("SLACK_APP_TOKEN") or None,
        **{k: v for k, v in fixtures.items() if k in known},
    )
    stand_in.bot_url = args.bot_url
    asyncio.run(_serve(stand_in, args.port, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
