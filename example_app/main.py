"""Tracker API: reads on replicas, writes on the primary.

Run it with ``bash scripts/dev.sh demo`` (starts the local stack first).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from sqlalchemy import text
from sqlmodel import SQLModel, select

import fastapi_rwdb
from fastapi_rwdb import AsyncReadSession, ReadSession, WriteSession

from .models import Tracker, TrackerCreate, TrackerRead


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # DDL belongs on the primary; replicas receive it through replication.
    SQLModel.metadata.create_all(fastapi_rwdb.get_database().engines.write)
    yield


app = FastAPI(title="fastapi-rwdb example: trackers", lifespan=lifespan)
fastapi_rwdb.setup(app)


@app.get("/trackers", response_model=list[TrackerRead])
def list_trackers(db: ReadSession, skip: int = 0, limit: int = 100) -> list[Tracker]:
    return list(db.exec(select(Tracker).order_by(Tracker.id).offset(skip).limit(limit)))


@app.get("/trackers/async", response_model=list[TrackerRead])
async def list_trackers_async(db: AsyncReadSession, limit: int = 100) -> list[Tracker]:
    result = await db.exec(select(Tracker).order_by(Tracker.id).limit(limit))
    return list(result)


@app.post("/trackers", response_model=TrackerRead, status_code=201)
def create_tracker(body: TrackerCreate, db: WriteSession) -> Tracker:
    tracker = Tracker.model_validate(body)
    db.add(tracker)
    db.commit()
    db.refresh(tracker)
    return tracker


@app.get("/trackers/{tracker_id}", response_model=TrackerRead)
def get_tracker(tracker_id: int, db: ReadSession) -> Tracker:
    tracker = db.get(Tracker, tracker_id)
    if tracker is None:
        raise HTTPException(404, "tracker not found")
    return tracker


@app.get("/health/database")
def database_health(db: ReadSession) -> dict[str, object]:
    replica = db.execute(text("SELECT pg_is_in_recovery()")).scalar_one()
    return {"status": "ok", "served_by": "replica" if replica else "primary"}
