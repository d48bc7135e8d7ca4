"""The slack-bolt AsyncApp and the two ways to serve it: HTTP (aiohttp) and Socket Mode.

`BotRuntime` owns what lives as long as the process: the context (store,
etcd clients), the bolt app and the housekeeping loop. Both transports
start and stop it the same way, and tests run it in-process.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import Config
from bot.ops import leader, lifecycle
from bot.ops.context import BotContext
from bot.ops.schedule import Scheduler
from bot.settings import SlackSettings
from bot.slack.directory import SlackDirectory
from bot.slack.notifier import SlackNotifier
from bot.slack.readiness import ReadinessProbe
from bot.store.base import StoreError
from bot.watch.watcher import Watcher, tidy_alerts

log = logging.getLogger(__name__)
HOUSEKEEPING_SECONDS = 30.0


# Methods that change nothing, or set a state (chat.update): safe to send again.
IDEMPOTENT = frozenset({"chat.update", "auth.test", "usergroups.users.list", "users.info", "conversations.info",
                        "chat.getPermalink", "apps.connections.open"})


def _idempotent(request) -> bool:
    return request.url.rstrip("/").rsplit("/", 1)[-1] in IDEMPOTENT


class IdempotentServerErrorRetryHandler(AsyncServerErrorRetryHandler):
    """5xx are retried only where a second delivery cannot post twice: Slack may
    have posted a message before answering 500, and a repeat would duplicate it."""

    async def _can_retry_async(self, *, state, request, response=None, error=None) -> bool:
        return _idempotent(request) and await super()._can_retry_async(
            state=state, request=request, response=response, error=error)


class IdempotentConnectionErrorRetryHandler(AsyncConnectionErrorRetryHandler):
    async def _can_retry_async(self, *, state, request, response=None, error=None) -> bool:
        return _idempotent(request) and await super()._can_retry_async(
            state=state, request=request, response=response, error=error)


def web_client(slack: SlackSettings, token: str | None = None) -> AsyncWebClient:
    """The Web API client: 429s wait for Retry-After and are retried (they were not
    processed); 5xx and broken connections are retried for idempotent methods only."""
    return AsyncWebClient(token=token or slack.bot_token, base_url=slack.api_url, timeout=10,
                          retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=3),
                                          IdempotentServerErrorRetryHandler(max_retry_count=3),
                                          IdempotentConnectionErrorRetryHandler(max_retry_count=2)])


class BotRuntime:
    def __init__(self, config: Config, slack: SlackSettings):
        self.config, self.slack = config, slack
        self.web = web_client(slack)
        self._ctx: BotContext | None = None
        self.app: AsyncApp | None = None
        self._housekeeping: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self.watcher: Watcher | None = None

    @property
    def ctx(self) -> BotContext:
        if self._ctx is None:
            raise RuntimeError("the bot is not started")
        return self._ctx

    async def start(self) -> AsyncApp:
        from handlers import register_all  # the edge depends on the engine, never the reverse

        client, slack = self.web, self.slack
        self._ctx = await BotContext.open(self.config, SlackNotifier(client, self.config), SlackDirectory(client),
                                          tuple(slack.secrets()))
        app = AsyncApp(client=client, signing_secret=slack.signing_secret or "unused-in-socket-mode",
                       request_verification_enabled=slack.signing_secret is not None,
                       logger=logging.getLogger("slack_bolt"))

        @app.error
        async def on_error(error: Exception, body: dict[str, Any]) -> None:
            log.error("listener failed", exc_info=error, extra={"ctx_kind": body.get("type") or body.get("command")})

        register_all(app, self.ctx)
        self.app = app
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep(), name="housekeeping")
        self.watcher = self.ctx.watch = Watcher(self.ctx)
        self._watch = asyncio.get_running_loop().create_task(self.watcher.run(), name="watch")
        return app

    async def _housekeep(self) -> None:
        """Forever, on the leader only: expire unapproved plans, take scheduled
        snapshots and tidy the alert rows. (Plans the last leader left running are taken over by the
        context's leadership loop, bot/ops/leader.py.) Runs beside serving, so a slow Slack
        never delays start-up."""
        scheduler, last = Scheduler(self.ctx), -HOUSEKEEPING_SECONDS
        while True:
            if self.ctx.is_leader() and time.monotonic() - last >= HOUSEKEEPING_SECONDS:
                last = time.monotonic()
                for job in (lambda: lifecycle.expire_stale(self.ctx), lambda: tidy_alerts(self.ctx), scheduler.run_due):
                    try:
                        await job()
                    except Exception:
                        log.exception("housekeeping failed")
            await asyncio.sleep(leader.PICKUP_SECONDS)  # a new leader starts its housekeeping within a second

    async def stop(self) -> None:
        for task in (self._watch, self._housekeeping):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._ctx is not None:
            await self._ctx.close()

    def http_application(self, slack_events: bool = True) -> web.Application:
        """POST /slack/events for Slack (HTTP mode); /healthz, /readyz and
        /metrics for the orchestrator and Prometheus (both modes)."""
        if self.app is None:
            raise RuntimeError("the bot is not started")
        app, metrics, probe = self.app, self.ctx.metrics, ReadinessProbe(self.ctx, self.web)

        async def events(request: web.Request) -> web.Response:
            started = time.perf_counter()
            bolt_request = await to_bolt_request(request)
            response = await to_aiohttp_response(await app.async_dispatch(bolt_request))
            kind = "command" if "command=" in bolt_request.raw_body[:2000] else "event"
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
                await metrics.from_store(self.ctx.store, self.ctx.config.clusters)
            except StoreError as e:  # the other metrics still tell the story; /readyz says why
                log.warning("plan and snapshot gauges not updated: state store unavailable",
                            extra={"ctx_error": str(e)})
            return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8",
                                headers={"X-Content-Type-Options": "nosniff"})

        web_app = web.Application()
        if slack_events:
            web_app.router.add_post("/slack/events", events)
        web_app.router.add_get("/healthz", healthz)
        web_app.router.add_get("/readyz", readyz)
        web_app.router.add_get("/metrics", metrics_page)
        return web_app


class BotServer:
    """The bot, serving until stopped: Slack over HTTP (POST /slack/events) or
    over a Socket Mode websocket; probes and metrics over HTTP either way.
    Tests run it in-process."""

    def __init__(self, config: Config, slack: SlackSettings, host: str = "127.0.0.1", port: int = 0,
                 socket_mode: bool = False):
        self.runtime = BotRuntime(config, slack)
        self.host, self.port, self.socket_mode = host, port, socket_mode
        self._runner: web.AppRunner | None = None
        self._socket: Any = None  # an AsyncSocketModeHandler, imported only in Socket Mode

    @property
    def ctx(self) -> BotContext:
        return self.runtime.ctx

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/slack/events"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> BotServer:
        app = await self.runtime.start()
        self._runner = web.AppRunner(self.runtime.http_application(slack_events=not self.socket_mode),
                                     access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]  # the kernel's choice
        if self.socket_mode:
            slack = self.runtime.slack
            self._socket = socket_mode_handler(app, self.ctx, slack.app_token,
                                               web_client=web_client(slack, slack.app_token))
            await self._socket.connect_async()
        log.info("serving", extra={"ctx_mode": "socket" if self.socket_mode else "http", "ctx_host": self.host,
                                   "ctx_port": self.port})
        return self

    async def stop(self) -> None:
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.runtime.stop()

    async def __aenter__(self) -> BotServer:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def socket_mode_handler(app: AsyncApp, ctx: BotContext, app_token: str | None, web_client: AsyncWebClient) -> Any:
    """bolt's Socket Mode handler, dropping an envelope delivered before: Slack may
    redeliver one to any of the app's connections, which may be another replica's,
    so the envelope_id is remembered in the shared database. (Events carry an
    event_id too, checked by their listener; a slash command has only this.)"""
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
    from slack_sdk.socket_mode.response import SocketModeResponse

    class Handler(AsyncSocketModeHandler):
        async def handle(self, client, req) -> None:
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


async def serve(config: Config, slack: SlackSettings, host: str, port: int, socket_mode: bool) -> None:
    """Serve until SIGTERM/SIGINT."""
    async with BotServer(config, slack, host, port, socket_mode=socket_mode):
        await until_signal()


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
