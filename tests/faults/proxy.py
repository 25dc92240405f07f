"""A small asyncio TCP proxy for fault tests: pass, delay, blackhole or reset, switchable live.

It runs its own event loop in a thread, listens on 127.0.0.1:0 and forwards to a target set
later (the node behind it binds its port first).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Literal

Mode = Literal["pass", "delay", "blackhole", "reset"]


class Proxy:
    def __init__(self) -> None:
        self.mode: Mode = "pass"
        self.delay_s = 0.05
        self.target: tuple[str, int] | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def set_mode(self, mode: Mode) -> None:
        """Switch mode; "reset" and "blackhole" also cut connections already open."""
        self.mode = mode
        if mode == "reset":
            self._loop.call_soon_threadsafe(self._abort_all)

    def _shutdown(self) -> None:
        self._abort_all()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.call_later(0.2, self._loop.stop)

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()  # RST

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset" or self.target is None:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = {
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        }
        # When either side closes or fails, close both: no half-open pairs pile up.
        _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                data = await reader.read(1 << 16)
            except OSError:
                return
            if not data:
                return
            while self.mode == "blackhole":  # noqa: ASYNC110 - keep the socket open, forward nothing
                await asyncio.sleep(0.05)
            if self.mode == "reset":
                writer.transport.abort()
                return
            if self.mode == "delay":
                await asyncio.sleep(self.delay_s)
            writer.write(data)
            await writer.drain()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._shutdown)
        with contextlib.suppress(RuntimeError):
            self._thread.join(5)
