"""A minimal app served by real uvicorn processes in test_processes.py.

It is configured only by the environment, as a deployment would be: no
``RWDB_SECRET_KEY`` unless the test sets one.
"""

from __future__ import annotations

import os
import uuid

from fastapi import FastAPI, HTTPException
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import AsyncReadSession, AsyncWriteSession, ReadSession, WriteSession

app = FastAPI()
fastapi_rwdb.setup(app)


@app.get("/ready")
def ready() -> dict[str, bool]:
    return {"ready": True}


@app.post("/items")
def create(db: WriteSession) -> dict[str, str]:
    name = f"proc-{uuid.uuid4()}"
    db.execute(text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": name})
    db.commit()
    return {"name": name, "pid": str(os.getpid())}


@app.get("/items/{name}")
def read(name: str, db: ReadSession) -> dict[str, str]:
    row = db.execute(text("SELECT name FROM rwdb_items WHERE name = :n"), {"n": name}).first()
    if row is None:
        raise HTTPException(404, "no such item")
    return {"name": row[0], "pid": str(os.getpid())}


@app.post("/async/items")
async def create_async(db: AsyncWriteSession) -> dict[str, str]:
    name = f"proc-{uuid.uuid4()}"
    await db.execute(text("INSERT INTO rwdb_items (name) VALUES (:n)"), {"n": name})
    await db.commit()
    return {"name": name, "pid": str(os.getpid())}


@app.get("/async/items/{name}")
async def read_async(name: str, db: AsyncReadSession) -> dict[str, str]:
    result = await db.execute(text("SELECT name FROM rwdb_items WHERE name = :n"), {"n": name})
    row = result.first()
    if row is None:
        raise HTTPException(404, "no such item")
    return {"name": row[0], "pid": str(os.getpid())}
