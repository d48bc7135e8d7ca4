"""The faulty proxy (bot/testing/proxy.py) the robustness harness puts in front of the object store:
it passes bytes both ways, holds them while stalled and lets them through after, and cuts and refuses
connections while refusing."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bot.testing.proxy import FaultyProxy


@pytest.fixture
async def echo_proxy() -> AsyncIterator[FaultyProxy]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = await FaultyProxy("127.0.0.1", server.sockets[0].getsockname()[1]).start()
    try:
        yield proxy
    finally:
        await proxy.stop()
        server.close()
        await server.wait_closed()


async def test_bytes_pass_are_held_while_stalled_and_flow_after(echo_proxy: FaultyProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy.port)
    writer.write(b"one")
    assert await asyncio.wait_for(reader.readexactly(3), 5) == b"one"
    echo_proxy.stall()
    writer.write(b"two")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(read := asyncio.ensure_future(reader.readexactly(3))), 0.3)
    echo_proxy.flow()
    assert await asyncio.wait_for(read, 5) == b"two"
    writer.close()


async def test_refusing_cuts_open_connections_and_refuses_new_ones(echo_proxy: FaultyProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy.port)
    echo_proxy.refuse()
    assert await asyncio.wait_for(reader.read(10), 5) == b""  # cut
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy.port)
    assert await asyncio.wait_for(reader.read(10), 5) == b""  # accepted, then closed at once
    writer.close()
    echo_proxy.flow()
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy.port)
    writer.write(b"back")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"back"
    writer.close()
