"""Tokens across processes, with nothing configured: real uvicorn processes on the stack.

Every deployment runs several processes (workers, pods), and a client's next
request may reach any of them. Here two uvicorn processes take turns: each write
goes to one, the client's own read right after it to the other, while the
replicas are held one second behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fastapi_rwdb.routing.tokens import TokenSigner, derive_key

from ..helpers import replicas_lagging
from .test_token_key import stored_key

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
WRITES = 12


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(port: int, env: dict[str, str], *options: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.process_app:app", "--port", str(port), *options],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_ready(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"uvicorn exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base} did not start")


def no_rwdb_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RWDB_")}


@pytest.fixture
def two_processes() -> Iterator[tuple[str, str]]:
    env = no_rwdb_settings()
    ports = [free_port(), free_port()]
    processes = [serve(port, env) for port in ports]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for base, process in zip(bases, processes, strict=True):
            wait_ready(base, process)
        yield bases[0], bases[1]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


@pytest.fixture
def lagging_replicas() -> Iterator[None]:
    with replicas_lagging():
        yield


@pytest.mark.parametrize("flavour", ["", "/async"], ids=["sync", "async"])
def test_a_token_from_one_process_is_honoured_by_another(
    two_processes: tuple[str, str], lagging_replicas: None, flavour: str
) -> None:
    first, second = two_processes
    stale = []
    for i in range(WRITES):
        writer, reader = (first, second) if i % 2 == 0 else (second, first)
        written = httpx.post(f"{writer}{flavour}/items", timeout=10)
        assert written.status_code == 200, written.text
        token = written.headers["x-rwdb-pin"]
        name = written.json()["name"]
        read = httpx.get(
            f"{reader}{flavour}/items/{name}", headers={"X-RWDB-Pin": token}, timeout=10
        )
        if read.status_code != 200:
            stale.append((i, read.status_code))
    assert stale == [], f"{len(stale)} of {WRITES} own reads did not see the write: {stale}"


@pytest.fixture
def two_workers() -> Iterator[str]:
    port = free_port()
    process = serve(port, no_rwdb_settings(), "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_uvicorn_workers_honour_each_others_tokens(
    two_workers: str, lagging_replicas: None
) -> None:
    """The kernel picks the worker of each connection: write and read until a dozen
    reads have reached another worker than their write."""
    crossed, stale, attempts = 0, [], 0
    while crossed < WRITES and attempts < 20 * WRITES:
        attempts += 1
        written = httpx.post(f"{two_workers}/items", timeout=10)
        assert written.status_code == 200, written.text
        token, name = written.headers["x-rwdb-pin"], written.json()["name"]
        read = httpx.get(f"{two_workers}/items/{name}", headers={"X-RWDB-Pin": token}, timeout=10)
        if read.status_code == 200 and read.json()["pid"] == written.json()["pid"]:
            continue  # same worker: proves nothing either way
        crossed += 1
        if read.status_code != 200:
            stale.append(read.status_code)
    assert crossed == WRITES, f"only {crossed} reads reached the other worker"
    assert stale == [], f"{len(stale)} of {crossed} own reads on the other worker were stale"


def test_with_no_setting_both_sign_with_the_key_kept_in_the_database(
    two_processes: tuple[str, str],
) -> None:
    """No password oracle: the tokens of both processes verify under the key stored in
    ``rwdb_token_key`` and under no key derived from the database password."""
    e = os.environ
    derived = TokenSigner(derive_key(e["POSTGRES_USER"], e["POSTGRES_DB"], e["POSTGRES_PASSWORD"]))
    answers = [httpx.post(f"{base}/items", timeout=10) for base in two_processes]
    tokens = [answer.headers["x-rwdb-pin"] for answer in answers]
    key = stored_key()
    assert key is not None
    stored = TokenSigner(key.encode())
    for token in tokens:
        assert stored.load(token, max_age=60) is not None
        assert derived.load(token, max_age=60) is None
