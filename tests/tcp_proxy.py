"""A TCP proxy for tests, to take a service away from its client and bring it back.

Its port is reserved (bound) at once but refuses connections until :meth:`TcpProxy.serve`;
:meth:`TcpProxy.cut` resets every open connection and every new one until it serves
again. It runs on the test's event loop: a client in another process needs that loop
to keep running (start such a process with ``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `host`:`target_port` while it serves."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        self.port: int = self._sock.getsockname()[1]
        self.up = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Listen (the first time) and forward new connections."""
        self.up = True
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, sock=self._sock)

    def cut(self) -> None:
        """Reset every open connection, and each new one until :meth:`serve`."""
        self.up = False
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def close(self) -> None:
        """Cut everything and stop listening."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        else:
            self._sock.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._open |= {writer, upstream}
        pipes = [
            asyncio.create_task(_pipe(reader, upstream)),
            asyncio.create_task(_pipe(upstream_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            self._open -= {writer, upstream}
            for end in (writer, upstream):
                end.transport.abort()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    sink.transport.abort()
