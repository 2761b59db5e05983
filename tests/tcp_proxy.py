"""A TCP proxy on loopback that can lose its connections silently, as a network does.

A stateful firewall, a NAT gateway or a load balancer that forgets a connection (an idle
timeout, a restart, a failover of its own) drops that connection's packets from then on: no
FIN, no RST, nothing. Neither end hears of it until its own timeout, or the kernel's
retransmissions give up (about 15 minutes on Linux). `forget()` does that to every connection
open now; connections opened after it pass, as through a firewall that was restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class SilentProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        #: Per open connection: set once it was forgotten (its bytes go nowhere from then on).
        self._open: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.forgotten = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, url: str) -> str:
        """`url` (postgresql://, redis://) with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{self.port}"))

    def forget(self) -> None:
        """Every connection open now is lost, silently; new ones pass."""
        for lost in self._open:
            if not lost.is_set():
                lost.set()
                self.forgotten += 1
        self._open = []

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lost = asyncio.Event()
        self._open.append(lost)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, lost)),
            asyncio.create_task(self._pipe(up_reader, writer, lost)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes)
        finally:
            self._tasks.difference_update(pipes)
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lost: asyncio.Event
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                if lost.is_set():  # a closing end is not heard of either
                    await asyncio.Event().wait()
                writer.close()
                return
            if lost.is_set():
                continue  # dropped: the other end never hears of it, and waits
            writer.write(data)
            await writer.drain()
