"""A TCP proxy for tests, to take a service away from its client and bring it back.

Its port is reserved (bound) at once but refuses connections until :meth:`TcpProxy.serve`;
:meth:`TcpProxy.cut` resets every open connection and every new one until it serves
again. It runs on the test's event loop: a client in another process needs that loop
to keep running (start such a process with ``asyncio.to_thread``).

:meth:`TcpProxy.blackhole` is a network partition rather than a crash: nothing is
forwarded either way, yet every socket stays open, so neither end learns anything
until its own timeouts say so. The proxy stops reading from both sides; what they
send waits in the kernel's buffers, as it would while TCP retransmits across a
partition, and :meth:`TcpProxy.heal` forwards it, then everything after. An end that
closes its socket meanwhile (FIN) is seen to close on the heal, after the bytes it
sent before. An end that resets it (RST; RabbitMQ closes with linger 0) loses what it
sent during the blackhole, as a reset connection's unacknowledged bytes are lost on
a real network: on the heal the other end gets a reset, and nothing of those bytes.
A connection made while blackholed is accepted and held: nothing reaches the target
(it is not even connected to it) until the heal, as a SYN not answered yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `host`:`target_port` while it serves."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        self.port: int = self._sock.getsockname()[1]
        self.up = False
        self.blackholed = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._peer: dict[asyncio.StreamWriter, asyncio.StreamWriter] = {}
        self._pipes: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

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
        self._set_flowing(True)  # held connections see their reset and end

    def blackhole(self) -> None:
        """Stop forwarding both ways, every socket left open (see the module docstring)."""
        self._set_flowing(False)

    def heal(self) -> None:
        """Forward again: first what waited during the blackhole, then everything after;
        a side reset meanwhile resets the other instead (see the module docstring)."""
        for end, peer in list(self._peer.items()):
            if _was_reset(end):
                end.transport.abort()  # what it sent is dropped with it
                _reset(peer)
        self._set_flowing(True)

    def _set_flowing(self, flowing: bool) -> None:
        self.blackholed = not flowing
        for writer in self._open:
            _pause(writer, not flowing)
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

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
        self._open.add(writer)
        try:
            if self.blackholed:
                _pause(writer, True)  # held: what the client sends waits in the kernel
                await self._flowing.wait()
                if writer.transport.is_closing():  # cut while held
                    return
            try:
                upstream_reader, upstream = await asyncio.open_connection(
                    self.host, self.target_port
                )
            except OSError:
                writer.transport.abort()
                return
            self.accepted += 1
            self._open.add(upstream)
            self._peer |= {writer: upstream, upstream: writer}
            if self.blackholed:  # began while connecting
                _pause(upstream, True)
            pipes = [
                asyncio.create_task(self._pipe(reader, upstream)),
                asyncio.create_task(self._pipe(upstream_reader, writer)),
            ]
            self._pipes.update(pipes)
            try:
                await asyncio.gather(*pipes, return_exceptions=True)
            finally:
                self._pipes.difference_update(pipes)
                self._open.discard(upstream)
                for end in (writer, upstream):
                    self._peer.pop(end, None)
                upstream.transport.abort()
        finally:
            self._open.discard(writer)
            writer.transport.abort()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await self._flowing.wait()
                data = await source.read(65536)
                if not data:
                    break
                # A blackhole that began while this read waited holds the chunk too.
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        sink.transport.abort()


def _was_reset(writer: asyncio.StreamWriter) -> bool:
    """True when the peer of this socket reset it (its pending error says so)."""
    sock = writer.get_extra_info("socket")
    if sock is None or writer.transport.is_closing():
        return False
    error: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return error != 0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (linger 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None and not writer.transport.is_closing():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _pause(writer: asyncio.StreamWriter, paused: bool) -> None:
    """Stop (or resume) reading from the socket under `writer`."""
    transport = writer.transport
    if transport.is_closing():
        return
    if paused:
        transport.pause_reading()  # type: ignore[attr-defined]
    else:
        transport.resume_reading()  # type: ignore[attr-defined]
