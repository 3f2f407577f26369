"""A counting TCP proxy for the PostgreSQL protocol, to count round trips on the wire.

SQLAlchemy's ``before_cursor_execute`` misses what does not go through a
SQLAlchemy cursor: the pool's pre-ping, psycopg's implicit ``BEGIN``, the
rollback when a connection returns to the pool, and statements sent straight
on the driver connection. So the proxy sits between the app and HAProxy, and
counts the messages the client sends. The client waits for the server after
every simple ``Query`` ('Q'), every ``Sync`` ('S', which closes an
extended-protocol exchange) and every ``Flush`` ('H': asyncpg sends Parse,
Describe, Flush and waits for the statement's description before it binds),
except a ``Flush`` that comes right after a ``Sync`` (the Sync has already made
the server send everything: psycopg's pipeline mode sends both and waits once):
their sum is the number of round trips. It also counts the statements the
server runs: each ``Parse`` ('P') is one, a simple ``Query`` holds as many as
it has non-empty ``;``-separated parts (an empty query, psycopg's ping, is none).

It runs its own event loop in a thread, and only while counting: the timing
runs connect to HAProxy directly. The tests also use it to break connections:
:meth:`WireCounter.break_established` makes every connection open at that moment
die as its client next sends something, as a connection does whose server went
away without a word (the client's socket stays quiet until then).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

_NEGOTIATION_CODES = {80877103, 80877104}  # SSLRequest, GSSENCRequest


class WireCounter:
    def __init__(self, upstream: dict[str, tuple[str, int]]) -> None:
        self._upstream = upstream
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._generation = 0  # of the connections accepted so far
        self._broken_upto = -1  # connections of this generation or older die when used
        self.ports: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self._main, name="wire-counter", daemon=True)

    def __enter__(self) -> WireCounter:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def break_established(self) -> None:
        """Every connection open now is closed, without its server seeing anything,
        as soon as its client sends its next message."""
        with self._lock:
            self._broken_upto = self._generation

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        for name, (host, port) in self._upstream.items():
            server = self._loop.run_until_complete(
                asyncio.start_server(self._handler(host, port), "127.0.0.1", 0)
            )
            self._servers.append(server)
            self.ports[name] = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def _handler(self, host: str, port: int) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with self._lock:
                self._generation += 1
                generation = self._generation
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                writer.close()
                return
            try:
                await asyncio.gather(
                    self._client_to_server(reader, up_writer, generation),
                    self._pipe(up_reader, writer),
                    return_exceptions=True,
                )
            except asyncio.CancelledError:  # shutting down: end quietly
                writer.close()
                up_writer.close()

        return handle

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int
    ) -> None:
        buf = bytearray()
        typed = False  # the start-up packets have no type byte
        last = ""  # the kind of the client's last message
        try:
            while data := await reader.read(65536):
                if generation <= self._broken_upto:
                    break  # closes both sides: the client sees its connection die
                writer.write(data)
                buf += data
                seen: list[str] = []
                while True:
                    if not typed:
                        if len(buf) < 8:
                            break
                        length = int.from_bytes(buf[0:4], "big")
                        code = int.from_bytes(buf[4:8], "big")
                        if len(buf) < length:
                            break
                        del buf[:length]
                        if code not in _NEGOTIATION_CODES:
                            typed = True
                            seen.append("startup")
                    else:
                        if len(buf) < 5:
                            break
                        length = int.from_bytes(buf[1:5], "big")
                        if len(buf) < 1 + length:
                            break
                        kind = chr(buf[0])
                        if kind == "H" and last == "S":
                            # A Flush right after a Sync asks for nothing the Sync has
                            # not: the server sends all it has at the Sync (psycopg's
                            # pipeline sends both, and waits once).
                            kind = "H after S"
                        seen.append(kind)
                        last = kind
                        if kind == "Q":  # a simple query may hold several statements
                            sql = bytes(buf[5 : 1 + length]).rstrip(b"\0")
                            seen += ["statement"] * sum(1 for s in sql.split(b";") if s.strip())
                        elif kind == "P":  # Parse: one statement of the extended protocol
                            seen.append("statement")
                        del buf[: 1 + length]
                if seen:
                    with self._lock:
                        self._counts.update(seen)
                await writer.drain()
        finally:
            writer.close()


def round_trips(counts: Counter[str]) -> int:
    return counts["Q"] + counts["S"] + counts["H"]
