"""The slack-bolt AsyncApp, and the two ways to serve it: HTTP (aiohttp) and Socket Mode."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.http_retry.builtin_async_handlers import AsyncConnectionErrorRetryHandler, AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot.context import BotContext

log = logging.getLogger(__name__)


def web_client(ctx: BotContext) -> AsyncWebClient:
    """The Web API client; 429s wait for Retry-After and retry (bounded)."""
    return AsyncWebClient(token=ctx.slack.bot_token, base_url=ctx.slack.api_url, timeout=10,
                          retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=3),
                                          AsyncConnectionErrorRetryHandler(max_retry_count=2)])


def build_app(ctx: BotContext) -> AsyncApp:
    from handlers import register_all  # handlers depend on bot, never the reverse at import time

    app = AsyncApp(client=web_client(ctx), signing_secret=ctx.slack.signing_secret or "socket-mode-unsigned",
                   request_verification_enabled=ctx.slack.signing_secret is not None,
                   logger=logging.getLogger("slack_bolt"))

    @app.error
    async def on_error(error: Exception, body: dict[str, Any]) -> None:
        log.error("listener failed", exc_info=error, extra={"ctx_kind": body.get("type") or body.get("command")})

    register_all(app, ctx)
    return app


def http_application(app: AsyncApp, ctx: BotContext) -> web.Application:
    """POST /slack/events for Slack, GET /healthz for the orchestrator."""

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    web_app = web.Application()
    web_app.router.add_post("/slack/events", events)
    web_app.router.add_get("/healthz", healthz)

    async def cleanup(_: web.Application) -> None:
        await ctx.close()

    web_app.on_cleanup.append(cleanup)
    return web_app


async def serve_http(ctx: BotContext, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT."""
    app = build_app(ctx)
    runner = web.AppRunner(http_application(app, ctx), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("serving HTTP", extra={"ctx_host": host, "ctx_port": port})
    try:
        await _until_signal(ready)
    finally:
        await runner.cleanup()


async def serve_socket_mode(ctx: BotContext, ready: asyncio.Event | None = None) -> None:
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    app = build_app(ctx)
    handler = AsyncSocketModeHandler(app, ctx.slack.app_token, web_client=AsyncWebClient(
        token=ctx.slack.app_token, base_url=ctx.slack.api_url))
    await handler.connect_async()
    log.info("connected in Socket Mode")
    try:
        await _until_signal(ready)
    finally:
        await handler.close_async()
        await ctx.close()


async def _until_signal(ready: asyncio.Event | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
