"""A small app as teams write them: users, a login, sync and async reads.

Used by tests/stack/test_kit_fidelity.py, which runs the sample suite (the
``check_*.py`` files here) twice: inside the test kit's stale replica on one plain
PostgreSQL, and on the stack with replicas far behind.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import AsyncReadSession, ReadSession, WriteSession

from .schema import TABLE

app = FastAPI()
fastapi_rwdb.setup(app)


class NewUser(BaseModel):
    name: str


def _user(row: Any) -> dict[str, Any]:
    if row is None:
        raise HTTPException(404, "no such user")
    return {"id": row[0], "name": row[1]}


@app.post("/users")
def create_user(body: NewUser, db: WriteSession) -> dict[str, Any]:
    row = db.execute(
        text(f"INSERT INTO {TABLE} (name) VALUES (:n) RETURNING id, name"), {"n": body.name}
    ).one()
    db.commit()
    return _user(row)


@app.get("/users/{user_id}")
def read_user(user_id: int, db: ReadSession) -> dict[str, Any]:
    query = text(f"SELECT id, name FROM {TABLE} WHERE id = :i")
    return _user(db.execute(query, {"i": user_id}).first())


@app.get("/async/users/{user_id}")
async def read_user_async(user_id: int, db: AsyncReadSession) -> dict[str, Any]:
    query = text(f"SELECT id, name FROM {TABLE} WHERE id = :i")
    return _user((await db.execute(query, {"i": user_id})).first())


@app.post("/login")
def login(body: NewUser, db: WriteSession) -> dict[str, Any]:
    """Signs a user up on first login (a write): the client's next reads must see it."""
    row = db.execute(
        text(
            f"INSERT INTO {TABLE} (name) VALUES (:n) ON CONFLICT (name) DO UPDATE"
            " SET name = EXCLUDED.name RETURNING id, name"
        ),
        {"n": body.name},
    ).one()
    db.commit()
    return _user(row)


@app.get("/me")
def me(db: ReadSession, x_user: str = Header()) -> dict[str, Any]:
    query = text(f"SELECT id, name FROM {TABLE} WHERE name = :n")
    return _user(db.execute(query, {"n": x_user}).first())


@app.get("/health")
def health(db: ReadSession) -> dict[str, Any]:
    """Reads nothing that changes: never stale."""
    return {"ok": db.execute(text("SELECT 1")).scalar_one() == 1}
