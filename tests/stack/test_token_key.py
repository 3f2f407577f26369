"""The token key kept in the database, on the stack: created once whoever asks first,
the same for every process, never derived from the password, and what happens when
the role cannot create the table (a read-only server stands in for a read-only role:
the app role owns its database here, and may not create roles).

Some tests drop ``rwdb_token_key`` in the test database: only under the stack lock,
and each leaves it created again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import Database, RWDBSettings
from fastapi_rwdb.routing.tokens import Token, TokenSigner, derive_key

from ..helpers import primary_url

pytestmark = pytest.mark.stack


def read_port_url() -> str:
    e = os.environ
    return primary_url().replace(f":{e['POSTGRES_PORT']}/", f":{e['POSTGRES_READ_PORT']}/")


def derived() -> TokenSigner:
    e = os.environ
    return TokenSigner(derive_key(e["POSTGRES_USER"], e["POSTGRES_DB"], e["POSTGRES_PASSWORD"]))


def stored_key() -> str | None:
    with psycopg.connect(primary_url(), prepare_threshold=None) as conn:
        if conn.execute("SELECT to_regclass('rwdb_token_key')").fetchone() == (None,):
            return None
        row = conn.execute("SELECT key FROM rwdb_token_key WHERE id = 1").fetchone()
        return None if row is None else str(row[0])


def sample(signer: TokenSigner) -> str:
    return signer.dump(Token(lsn=12345, expires=int(time.time()) + 20))


def verifies(signer: TokenSigner, raw: str) -> bool:
    return signer.load(raw, max_age=30) is not None


@pytest.fixture
def no_key_table() -> Iterator[None]:
    """``rwdb_token_key`` dropped on the primary and gone from the replicas; made
    again (with a new key) afterwards."""
    with psycopg.connect(primary_url(), prepare_threshold=None, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS rwdb_token_key")
    deadline = time.monotonic() + 10
    while True:
        with psycopg.connect(read_port_url(), prepare_threshold=None, autocommit=True) as conn:
            row = conn.execute("SELECT to_regclass('rwdb_token_key')").fetchone()
        if row == (None,):
            break
        assert time.monotonic() < deadline, "the replicas did not replay the DROP in 10 s"
        time.sleep(0.05)
    try:
        yield
    finally:
        Database(RWDBSettings()).signing_keys.load()


async def test_processes_asking_at_once_agree_on_one_key(no_key_table: None) -> None:
    databases = [Database(RWDBSettings()) for _ in range(6)]
    signers = await asyncio.gather(*(db.signing_keys.load_async() for db in databases))
    assert all(s is not None for s in signers)
    key = stored_key()
    assert key is not None and len(key) >= 40
    ours = TokenSigner(key.encode())
    for signer in signers:
        assert signer is not None
        raw = sample(signer)
        assert verifies(ours, raw) and not verifies(derived(), raw)
    # The sync path (a worker thread, as a sync route's) reads the same row.
    raw = await asyncio.to_thread(Database(RWDBSettings()).token_for, 777)
    assert verifies(ours, raw) and not verifies(derived(), raw)


async def test_a_role_that_may_only_read_uses_the_key_already_there() -> None:
    Database(RWDBSettings()).signing_keys.load()  # the table exists
    key = stored_key()
    assert key is not None
    database = Database(RWDBSettings(write_url=read_port_url(), read_url=read_port_url()))
    signer = await database.signing_keys.load_async()
    assert signer is not None
    raw = sample(signer)
    assert verifies(TokenSigner(key.encode()), raw) and not verifies(derived(), raw)


async def test_where_the_table_cannot_be_created_the_derived_key_is_used_and_said(
    no_key_table: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    read_only = RWDBSettings(write_url=read_port_url(), read_url=read_port_url())
    signer = await Database(read_only).signing_keys.load_async()
    assert signer is not None and verifies(derived(), sample(signer))
    assert "rwdb_token_key" in caplog.text and "RWDB_SECRET_KEY" in caplog.text
    assert os.environ["POSTGRES_PASSWORD"] not in caplog.text
    # Settled, not retried on every request: the role will not gain the privilege alone.
    database = Database(read_only)
    database.signing_keys.load()
    assert database.signing_keys.current() is not None
    assert verifies(derived(), database.token_for(5))


def test_a_write_right_after_startup_is_signed_with_the_stored_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lifespan starts fetching the key in the background; a sync route that signs
    before that attempt ends fetches the key itself (it signed with the derived key,
    and warned, when the attempt under way held it back)."""
    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    app = FastAPI()
    fastapi_rwdb.setup(app, Database(RWDBSettings()))  # type: ignore[call-arg]

    @app.post("/write")
    def write(db: fastapi_rwdb.WriteSession) -> dict[str, str | None]:
        db.execute(text("CREATE TABLE IF NOT EXISTS rwdb_key_probe (at timestamptz)"))
        db.execute(text("INSERT INTO rwdb_key_probe VALUES (now())"))
        db.commit()
        return {"token": fastapi_rwdb.current_token()}

    # The lifespan's background attempt waits on this lock, as on a slow primary.
    holder = psycopg.connect(primary_url(), prepare_threshold=None)
    holder.execute("LOCK TABLE rwdb_token_key IN ACCESS EXCLUSIVE MODE")
    release = threading.Timer(1.0, holder.commit)
    release.start()
    try:
        with TestClient(app) as client:
            response = client.post("/write")
    finally:
        release.join()
        holder.close()
    assert response.status_code == 200, response.text
    raw = response.json()["token"]
    key = stored_key()
    assert raw and key is not None
    assert verifies(TokenSigner(key.encode()), raw)
    assert not verifies(derived(), raw)
    assert "password guesses" not in caplog.text
