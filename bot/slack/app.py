"""The Slack edge's parts: the Web API client and its retries, the bolt AsyncApp, the HTTP application
(/slack/events, /healthz, /readyz, /metrics, /alertmanager) and the Socket Mode handler. bot.server assembles them with
the listeners of handlers/ and the runtime into the process."""
from __future__ import annotations

import asyncio
import copy
import hmac
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.authorization.async_authorize import AsyncAuthorize
from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bot.domain.clock import SYSTEM_CLOCK, Clock
from bot.ops.context import BotContext
from bot.settings import SlackSettings
from bot.slack.readiness import ReadinessProbe
from bot.store.base import StoreError
from bot.watch import alertmanager

log = logging.getLogger(__name__)


# Methods that change nothing, or set a state (chat.update): safe to send again.
IDEMPOTENT = frozenset({"chat.update", "auth.test", "usergroups.users.list", "users.info", "conversations.info",
                        "chat.getPermalink", "apps.connections.open"})


def _idempotent(request: HttpRequest) -> bool:
    return request.url.rstrip("/").rsplit("/", 1)[-1] in IDEMPOTENT


class IdempotentServerErrorRetryHandler(AsyncServerErrorRetryHandler):
    """5xx are retried only where a second delivery cannot post twice: Slack may
    have posted a message before answering 500, and a repeat would duplicate it."""

    async def _can_retry_async(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                               error: Exception | None = None) -> bool:
        return _idempotent(request) and await super()._can_retry_async(
            state=state, request=request, response=response, error=error)


class IdempotentConnectionErrorRetryHandler(AsyncConnectionErrorRetryHandler):
    async def _can_retry_async(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                               error: Exception | None = None) -> bool:
        return _idempotent(request) and await super()._can_retry_async(
            state=state, request=request, response=response, error=error)


class RateLimitRetryHandler(AsyncRateLimitErrorRetryHandler):
    """A 429 was not processed: wait its Retry-After (and up to a second more, so that callers who were
    limited together do not return together) on `clock`, then send it again."""

    def __init__(self, clock: Clock, max_retry_count: int):
        super().__init__(max_retry_count=max_retry_count)
        self.clock = clock

    async def prepare_for_next_attempt_async(self, *, state: RetryState, request: HttpRequest,
                                             response: HttpResponse | None = None,
                                             error: Exception | None = None) -> None:
        if response is None:   # (only a 429 response is retried by this handler)
            raise error or RuntimeError("no response to a rate-limited request")
        state.next_attempt_requested = True
        after = next((v for k, v in response.headers.items() if k.lower() == "retry-after"), ["1"])
        await self.clock.sleep(int(after[0]) + random.random())
        state.increment_current_attempt()


def web_client(slack: SlackSettings, token: str | None = None, clock: Clock = SYSTEM_CLOCK) -> AsyncWebClient:
    """The Web API client: 429s wait for Retry-After (on `clock`) and are retried (they were not
    processed); 5xx and broken connections are retried for idempotent methods only."""
    return AsyncWebClient(token=token or slack.bot_token, base_url=slack.api_url, timeout=10,
                          retry_handlers=[RateLimitRetryHandler(clock, max_retry_count=3),
                                          IdempotentServerErrorRetryHandler(max_retry_count=3),
                                          IdempotentConnectionErrorRetryHandler(max_retry_count=2)])


class OneAuthTest(AsyncAuthorize):
    """bolt's authorization of a request, with auth.test asked once for all of them. bolt's own (one
    workspace) asks auth.test on every request until an answer is cached: a fresh bot handed 200 commands at
    once asked 100 times before it acknowledged them, a round trip to Slack and a new connection each: its
    slowest acknowledgement took 0.24-0.30 s quiet and 1.67-2.00 s beside 12 busy loops, against 0.11 s and
    1.06-1.18 s now. Here the first request asks and the others wait for its answer. A success is kept for
    the process's life, as bolt does; a failure is not (the next request asks again)."""

    def __init__(self, client: AsyncWebClient) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # (bolt's, untyped, sets nothing)
        self._client = client
        self._answer: asyncio.Future[AsyncSlackResponse] | None = None

    async def __call__(self, *, context: AsyncBoltContext, enterprise_id: str | None, team_id: str | None,
                       user_id: str | None, actor_enterprise_id: str | None = None, actor_team_id: str | None = None,
                       actor_user_id: str | None = None) -> AuthorizeResult:
        answer = self._answer
        if answer is None or (answer.done() and (answer.cancelled() or answer.exception() is not None)):
            answer = self._answer = asyncio.ensure_future(self._client.auth_test())
        result = await asyncio.shield(answer)   # a request given up on does not cancel the others' answer
        # (no user_id in it for a bot token: the request's stays in the context)
        return AuthorizeResult.from_auth_test_response(auth_test_response=result, bot_token=self._client.token,
                                                       bot_scopes=result.headers.get("x-oauth-scopes"))


def bolt_app(ctx: BotContext, client: AsyncWebClient, slack: SlackSettings) -> AsyncApp:
    """The bolt app over the Web API client: requests verified with the signing secret (HTTP mode), a
    listener's failure logged, never sent back to Slack as a traceback. Listeners are added by the caller
    (bot.server registers handlers/: the edge depends on the engine, never the reverse)."""
    # Named here: bolt's default name is the caller's file, found by inspect.stack(), which under pytest's deep
    # stacks was 1.5% of a profiled suite run's samples.
    # bolt is given the token through OneAuthTest: its copy of the client holds none (with both, bolt would warn
    # at each start that the token goes unused). A listener's client is that copy with the token set.
    tokenless = copy.copy(client)
    tokenless.token = None
    app = AsyncApp(name="etcd-chatops", client=tokenless, authorize=OneAuthTest(client),
                   signing_secret=slack.signing_secret or "unused-in-socket-mode",
                   request_verification_enabled=slack.signing_secret is not None,
                   logger=logging.getLogger("slack_bolt"))

    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        log.error("listener failed", exc_info=error, extra={"ctx_kind": body.get("type") or body.get("command")})

    return app


def http_application(app: AsyncApp, ctx: BotContext, client: AsyncWebClient,
                     slack_events: bool = True) -> web.Application:
    """POST /slack/events for Slack (HTTP mode); /healthz, /readyz and
    /metrics for the orchestrator and Prometheus, and POST /alertmanager for Alertmanager's webhook when
    `[alertmanager]` has a token (both modes)."""
    metrics, probe = ctx.metrics, ReadinessProbe(ctx, client)

    async def events(request: web.Request) -> web.Response:
        started = time.perf_counter()
        bolt_request = await to_bolt_request(request)
        response = await to_aiohttp_response(await app.async_dispatch(bolt_request))
        raw = bolt_request.raw_body[:2000]
        kind = "command" if "command=" in raw else "interaction" if raw.startswith("payload=") else "event"
        metrics.ack_latency.labels(kind=kind).observe(time.perf_counter() - started)
        return response

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(request: web.Request) -> web.Response:
        result = await probe.check()
        return web.json_response({"ready": result.ready, "checks": result.checks},
                                 status=200 if result.ready else 503)

    async def metrics_page(request: web.Request) -> web.Response:
        try:
            await metrics.from_store(ctx.store, ctx.config.clusters)
        except StoreError as e:  # the other metrics still tell the story; /readyz says why
            log.warning("plan and snapshot gauges not updated: state store unavailable",
                        extra={"ctx_error": str(e)})
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    web_app = web.Application()
    if slack_events:
        web_app.router.add_post("/slack/events", events)
    if ctx.config.alertmanager.token is not None:   # without a token the receiver is off: 404
        web_app.router.add_post("/alertmanager", alertmanager_receiver(ctx))
    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_get("/readyz", readyz)
    web_app.router.add_get("/metrics", metrics_page)
    return web_app


def _refused(status: int, reason: str, **headers: str) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)


def alertmanager_receiver(ctx: BotContext) -> Callable[[web.Request], Awaitable[web.Response]]:
    """POST /alertmanager: Alertmanager's webhook (version 4) with its bearer token. A missing or wrong token
    gets 401 and changes nothing, a body over 1 MiB 413, anything not the payload 400; nothing logged holds
    the token or the body. The alerts are filed in the store (bot/watch/alertmanager.py); the leader's watch
    posts them."""
    token = ctx.config.alertmanager.token
    assert token is not None
    expected = token.encode()

    async def receive(request: web.Request) -> web.Response:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            log.warning("alertmanager: delivery refused: missing or wrong bearer token",
                        extra={"ctx_remote": request.remote})
            return _refused(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        if (request.content_length or 0) > alertmanager.MAX_BODY:
            return _refused(413, f"the body is larger than {alertmanager.MAX_BODY} bytes")
        body = b""
        while chunk := await request.content.read(65536):
            body += chunk
            if len(body) > alertmanager.MAX_BODY:
                return _refused(413, f"the body is larger than {alertmanager.MAX_BODY} bytes")
        try:
            alerts = alertmanager.parse(body)
        except alertmanager.BadPayload as e:
            log.warning("alertmanager: delivery refused", extra={"ctx_error": str(e), "ctx_remote": request.remote})
            return _refused(400, str(e))
        try:
            receipt = await alertmanager.receive(ctx, alerts)
        except StoreError as e:   # Alertmanager retries
            log.warning("alertmanager: delivery not filed: state store unavailable", extra={"ctx_error": str(e)})
            return _refused(503, "the bot's state store is unavailable")
        return web.json_response(receipt.to_json())

    return receive


def socket_mode_handler(app: AsyncApp, ctx: BotContext, app_token: str | None, web_client: AsyncWebClient) -> Any:
    """bolt's Socket Mode handler, dropping an envelope delivered before: Slack may
    redeliver one to any of the app's connections, which may be another replica's,
    so the envelope_id is remembered in the shared database. (Events carry an
    event_id too, checked by their listener; a slash command has only this.)"""
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
    from slack_sdk.socket_mode.response import SocketModeResponse

    class Handler(AsyncSocketModeHandler):
        # (bolt's aiohttp handler narrows the client's type the same way)
        async def handle(self, client: SocketModeClient, req: SocketModeRequest) -> None:  # type: ignore[override]
            try:
                first = await ctx.store.first_delivery(f"envelope:{req.envelope_id}")
            except StoreError:
                first = True  # the listener runs and tells the person the store is unavailable
            if first:
                await super().handle(client, req)
                return
            log.info("duplicate envelope ignored", extra={"ctx_envelope_id": req.envelope_id})
            await client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))

    return Handler(app, app_token, web_client=web_client)


async def until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
