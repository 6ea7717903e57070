"""The HTTP front door's listening socket: streamed lines must leave as they are written."""

from __future__ import annotations

import asyncio
import socket

from lumen_vlm.transports.http import listen_socket


def test_accepted_connections_have_nodelay() -> None:
    """asyncio (and so uvicorn) turns Nagle off on an accepted connection only when the listening
    socket says it is TCP; with Nagle on, each streamed token waits for the client's delayed ACK."""

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listen_socket("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
