"""The bot as one process: the context, the Slack edge with the listeners of handlers/, and the runtime's
background tasks, served over HTTP (POST /slack/events) or a Socket Mode websocket, with probes and
metrics over HTTP either way. The composition root: the one module that knows every layer (the CLI's
`run` serves it; tests run it in-process)."""
from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from aiohttp import web
from slack_bolt.async_app import AsyncApp

from bot.config import Config
from bot.domain.clock import SYSTEM_CLOCK, Clock
from bot.ops.context import BotContext
from bot.runtime import Runtime
from bot.settings import SlackSettings
from bot.slack.app import bolt_app, http_application, socket_mode_handler, until_signal, web_client
from bot.slack.directory import SlackDirectory
from bot.slack.notifier import SlackNotifier
from handlers import register_all

log = logging.getLogger(__name__)

# The listen queue's depth (the kernel caps it at net.core.somaxconn). aiohttp's default is 128: a burst of
# connections while the event loop is busy fills it, the kernel then drops the next SYNs, and each of those
# clients waits out TCP's retransmission, 1 s and then 2 s more, before it is even heard. Slack gives an
# answer 3 s. The Slack stand-in listens as deep, for the bot's own bursts (one connection per Web API call).
LISTEN_BACKLOG = 1024


class BotServer:
    """The bot, serving until stopped."""

    def __init__(self, config: Config, slack: SlackSettings, host: str = "127.0.0.1", port: int = 0,
                 socket_mode: bool = False, clock: Clock = SYSTEM_CLOCK):
        self.config, self.slack, self.clock = config, slack, clock
        self.host, self.port, self.socket_mode = host, port, socket_mode
        self.web = web_client(slack, clock=clock)
        self._ctx: BotContext | None = None
        self._runtime: Runtime | None = None
        self.app: AsyncApp | None = None
        self._runner: web.AppRunner | None = None
        self._socket: Any = None  # an AsyncSocketModeHandler, imported only in Socket Mode

    @property
    def ctx(self) -> BotContext:
        if self._ctx is None:
            raise RuntimeError("the bot is not started")
        return self._ctx

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the bot is not started")
        return self._runtime

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/slack/events"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> BotServer:
        slack, client = self.slack, self.web
        self._ctx = ctx = await BotContext.open(self.config, SlackNotifier(client, self.config),
                                                SlackDirectory(client), tuple(slack.secrets()), self.clock)
        self.app = app = bolt_app(ctx, client, slack)
        register_all(app, ctx)
        self._runtime = await Runtime(ctx).start()
        self._runner = web.AppRunner(http_application(app, ctx, client, slack_events=not self.socket_mode),
                                     access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=LISTEN_BACKLOG)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]  # the kernel's choice
        if self.socket_mode:
            self._socket = socket_mode_handler(app, ctx, slack.app_token,
                                               web_client=web_client(slack, slack.app_token, self.clock))
            await self._socket.connect_async()
        log.info("serving", extra={"ctx_mode": "socket" if self.socket_mode else "http", "ctx_host": self.host,
                                   "ctx_port": self.port})
        return self

    async def stop(self) -> None:
        """Transports first (nothing new arrives), then the background tasks, then the context (which steps
        down, lets in-flight work finish and releases the lease)."""
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._runtime is not None:
            await self._runtime.stop()
        if self._ctx is not None:
            await self._ctx.close()

    async def __aenter__(self) -> BotServer:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


async def serve(config: Config, slack: SlackSettings, host: str, port: int, socket_mode: bool) -> None:
    """Serve until SIGTERM/SIGINT."""
    async with BotServer(config, slack, host, port, socket_mode=socket_mode):
        await until_signal()
