"""A TCP proxy that holds every byte for a fixed time each way: a real round-trip time
between the app and HAProxy on a kernel without ``netem``.

    .venv/bin/python -m benchmarks.delay --one-way-ms 0.25 write=127.0.0.1:5432 read=127.0.0.1:5433

prints one ``NAME PORT`` line per listener (127.0.0.1 only), then serves until
killed. A round trip through it costs ``2 x one-way`` more than around it.

Why threads and not asyncio: asyncio's timers wake through ``epoll_wait``, whose
timeout is whole milliseconds, so a 0.25 ms delay would become about 1 ms. Here
one thread reads every socket (``selectors``, no timeout needed: it only waits
for data) and stamps each chunk with the time it may leave; one sender thread
keeps the chunks in a heap and waits on a condition variable, whose timed wait
has microsecond resolution (Linux adds its timer slack, about 50 us). Order on a
connection is kept: equal delays, and ties broken by arrival order. It runs in its
own process, so its CPU is not charged to the app being measured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import heapq
import itertools
import selectors
import socket
import sys
import threading
import time


class _Pair:
    """The two sockets of one proxied connection; both are closed once each side
    has been told the other ended."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.peer = {client: upstream, upstream: client}
        self.ended = 0

    def close(self) -> None:
        for sock in self.peer:
            with contextlib.suppress(OSError):
                sock.close()


class DelayProxy:
    def __init__(self, upstreams: dict[str, tuple[str, int]], one_way: float) -> None:
        self.one_way = one_way
        self.selector = selectors.DefaultSelector()
        self.heap: list[tuple[float, int, socket.socket, bytes | None, _Pair]] = []
        self.cond = threading.Condition()
        self.seq = itertools.count()
        self.ports: dict[str, int] = {}
        for name, upstream in upstreams.items():
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(256)
            self.ports[name] = listener.getsockname()[1]
            self.selector.register(listener, selectors.EVENT_READ, ("listen", upstream))

    def serve_forever(self) -> None:
        threading.Thread(target=self._send_loop, name="delay-sender", daemon=True).start()
        while True:
            for key, _ in self.selector.select():
                if key.data[0] == "listen":
                    self._accept(key.fileobj, key.data[1])  # type: ignore[arg-type]
                else:
                    self._read(key.fileobj, key.data[1])  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket, upstream: tuple[str, int]) -> None:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(upstream, timeout=5)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        pair = _Pair(client, server)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.selector.register(sock, selectors.EVENT_READ, ("data", pair))

    def _read(self, sock: socket.socket, pair: _Pair) -> None:
        try:
            data: bytes | None = sock.recv(262144)
        except OSError:
            data = b""
        if not data:  # this side ended: the other learns it after the same delay
            self.selector.unregister(sock)
            data = None
        due, seq = time.perf_counter() + self.one_way, next(self.seq)
        with self.cond:
            heapq.heappush(self.heap, (due, seq, pair.peer[sock], data, pair))
            if self.heap[0][1] == seq:  # the sender may be waiting for a later one
                self.cond.notify()

    def _send_loop(self) -> None:
        while True:
            with self.cond:
                while True:
                    if not self.heap:
                        self.cond.wait()
                        continue
                    wait = self.heap[0][0] - time.perf_counter()
                    if wait <= 0:
                        break
                    self.cond.wait(wait)
                _, _, sock, data, pair = heapq.heappop(self.heap)
            if data is None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                pair.ended += 1
                if pair.ended == 2:
                    pair.close()
                continue
            try:
                sock.sendall(data)
            except OSError:  # both ends learn it through the reader, which closes them
                for end in pair.peer:
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)


def _upstream(text: str) -> tuple[str, tuple[str, int]]:
    name, _, address = text.partition("=")
    host, _, port = address.rpartition(":")
    if host != "127.0.0.1":
        raise SystemExit(f"{text}: only 127.0.0.1 may be proxied")
    return name, (host, int(port))


def _tight_timers() -> None:
    """Ask Linux to wake the sender on time: the default timer slack (50 us) would be
    added to every delayed chunk. Best effort: elsewhere the delays are a bit longer,
    and the measured round-trip time says so."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.delay", description=__doc__)
    parser.add_argument("--one-way-ms", type=float, required=True)
    parser.add_argument("upstream", nargs="+", help="NAME=127.0.0.1:PORT")
    args = parser.parse_args(argv)
    _tight_timers()
    proxy = DelayProxy(dict(map(_upstream, args.upstream)), args.one_way_ms / 1e3)
    for name, port in proxy.ports.items():
        print(name, port, flush=True)
    sys.stdout.close()
    proxy.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
