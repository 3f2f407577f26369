"""A database host that vanishes without a FIN is noticed in seconds (issue 20, item 5).

This kernel has no netem or iptables to drop packets, but it has network namespaces.
The client (tests/stack/vanish_client.py) runs in a private namespace of its own and
connects to 127.0.0.1 there; a relay in that namespace carries each connection over a
Unix socket (which crosses namespaces) to a relay in this process, which connects to the
stack's read port on 127.0.0.1. Taking the private namespace's loopback down then drops
every packet of those connections silently, as a vanished host would: no FIN, no RST.
Nothing outside the private namespace changes; the only address used is 127.0.0.1.

Measured both ways in the same run: with the package's options a statement sent after
the loss fails after about RWDB_TCP_USER_TIMEOUT and an idle connection is found dead by
its keepalives; with them off, the statement still has no answer at the cap.

Needs root and ``ip netns`` (iproute2); without them it fails and says so, as every
stack test does when what it needs is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.stack

CLIENT = Path(__file__).with_name("vanish_client.py")
NS_PORT = 15999  # inside the private namespace only
FAST = {
    "tcp_keepalives_idle": 1,
    "tcp_keepalives_interval": 1,
    "tcp_keepalives_count": 2,
    "tcp_user_timeout": 3,
}
OFF = {"tcp_keepalives": False, "tcp_user_timeout": 0}

# The relay inside the namespace: TCP 127.0.0.1:port -> the Unix socket.
_NS_RELAY = """
import socket, sys, threading
port, path = int(sys.argv[1]), sys.argv[2]
def pump(a, b):
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
server = socket.create_server(("127.0.0.1", port))
print("listening", flush=True)
while True:
    down, _ = server.accept()
    up = socket.socket(socket.AF_UNIX)
    up.connect(path)
    for a, b in ((down, up), (up, down)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()
"""


def _pump(a: socket.socket, b: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := a.recv(65536):
            b.sendall(data)
    with contextlib.suppress(OSError):
        b.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def unix_to_read_port(path: str) -> Iterator[None]:
    """This process's relay: the Unix socket -> the stack's read port on 127.0.0.1."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    open_sockets: list[socket.socket] = [server]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                down, _ = server.accept()
                up = socket.create_connection(("127.0.0.1", int(os.environ["POSTGRES_READ_PORT"])))
                open_sockets.extend((down, up))
                for a, b in ((down, up), (up, down)):
                    threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        for sock in open_sockets:
            sock.close()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def private_namespace() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail(
            "this test needs root and iproute2 (ip netns) to make a private network "
            "namespace; run the stack tests as root, or deselect it with "
            "--deselect tests/stack/test_vanished_peer.py",
            pytrace=False,
        )
    name = f"rwdb-vanish-{os.getpid()}"
    try:
        ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.fail(
            f"cannot create a network namespace here ({exc.stderr.decode().strip()}); "
            "the test needs `ip netns add` to work",
            pytrace=False,
        )
    try:
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        ip("netns", "del", name)


def run_client(ns: str, unix_path: str, options: dict[str, Any]) -> dict[str, Any]:
    relay = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _NS_RELAY, str(NS_PORT), unix_path],
        stdout=subprocess.PIPE,
        text=True,
    )
    client: subprocess.Popen[str] | None = None
    try:
        assert relay.stdout is not None and relay.stdout.readline().strip() == "listening"
        env = {**os.environ, "VANISH_PORT": str(NS_PORT), "VANISH_OPTIONS": json.dumps(options)}
        client = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(CLIENT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert client.stdin is not None and client.stdout is not None
        ready = client.stdout.readline().strip()
        assert ready == "ready", f"the client did not connect (said {ready!r})"
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "down")
        client.stdin.write("go\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=60)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result
    finally:
        for process in (client, relay):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")


def test_vanished_peer_noticed_in_seconds(tmp_path: Path) -> None:
    unix_path = str(tmp_path / "read.sock")
    with private_namespace() as ns, unix_to_read_port(unix_path):
        fast = run_client(ns, unix_path, FAST)
        off = run_client(ns, unix_path, OFF)
    print(json.dumps({"fast": fast, "off": off}))
    for driver in ("psycopg", "asyncpg"):
        inflight, idle = fast[f"{driver}_inflight"], fast[f"{driver}_idle"]
        # TCP_USER_TIMEOUT is 3 s: the statement fails then, not at the kernel's ~15 min.
        assert inflight is not None and 2.5 <= inflight["seconds"] <= 6, (driver, fast)
        # Keepalives (1 s idle, 1 s x 2 probes, capped by the 3 s user timeout) dropped
        # the idle connection within the 6 s wait: its statement fails at once.
        assert idle is not None and idle["seconds"] < 1.0, (driver, fast)
        # Without them, the same statement is still unanswered at the cap.
        assert off[f"{driver}_inflight"] is None, (driver, off)
