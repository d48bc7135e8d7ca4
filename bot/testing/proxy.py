"""A TCP proxy on loopback that can refuse or stall what passes through it: a service that fails
the way a network or an overloaded server does, in front of a real one (moto's S3 server, for an
object store that refuses connections or hangs mid-upload).

`refuse()` closes every connection it holds and each new one at once (the client sees a reset);
`stall()` holds every byte in both directions until `flow()`, so a client in the middle of a
request waits on its own deadline; `flow()` lets everything through again, held bytes first.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum

CHUNK = 64 * 1024


class Mode(enum.Enum):
    FLOW = "flow"
    STALL = "stall"
    REFUSE = "refuse"


class FaultyProxy:
    """`await start()`, point the client at `url`, switch modes with `flow()`, `stall()`, `refuse()`;
    `await stop()` closes the listener and every connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = Mode.FLOW
        self.port = 0
        self.connections = 0      # accepted since start (refused ones too)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def refusing(self) -> bool:
        return self.mode is Mode.REFUSE

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultyProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._cut_all()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def flow(self) -> None:
        self.mode = Mode.FLOW
        self._flowing.set()

    def stall(self) -> None:
        self.mode = Mode.STALL
        self._flowing.clear()

    def refuse(self) -> None:
        self.mode = Mode.REFUSE
        self._flowing.set()  # held bytes go nowhere: their connections are cut
        self._cut_all()

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode is Mode.REFUSE:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self.refusing:  # refused while this connection was being made
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pumps = [asyncio.create_task(self._pump(reader, up_writer)), asyncio.create_task(self._pump(up_reader, writer))]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                await self._flowing.wait()
                if self.refusing:
                    return
                writer.write(data)
                await writer.drain()
