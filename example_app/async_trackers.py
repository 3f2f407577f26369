"""The same rules on asyncpg: ``AsyncReadSession`` for reads, ``AsyncWriteSession``
for writes and for reading back a write in the same request.

Mounted under ``/async`` so both flavours can be compared side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from fastapi_rwdb.sqlmodel import AsyncReadSession, AsyncWriteSession

from .models import (
    Location,
    LocationCreate,
    LocationRead,
    Tracker,
    TrackerCreate,
    TrackerDetail,
    TrackerRead,
)
from .trackers import LATEST

router = APIRouter(prefix="/async/trackers", tags=["async"])


async def tracker_detail(db: AsyncSession, tracker_id: int) -> TrackerDetail:
    tracker = await db.get(Tracker, tracker_id)
    if tracker is None:
        raise HTTPException(404, "tracker not found")
    newest_first = (col(Location.recorded_at).desc(), col(Location.id).desc())
    query = select(Location).where(Location.tracker_id == tracker_id).order_by(*newest_first)
    points = (await db.exec(query.limit(LATEST))).all()
    return TrackerDetail(
        **tracker.model_dump(),
        latest_locations=[LocationRead.model_validate(p) for p in points],
    )


@router.get("", response_model=list[TrackerRead])
async def list_trackers(
    db: AsyncReadSession, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> Sequence[Tracker]:
    newest_first = select(Tracker).order_by(col(Tracker.id).desc())
    return (await db.exec(newest_first.limit(limit))).all()


@router.get("/{tracker_id}", response_model=TrackerDetail)
async def get_tracker(tracker_id: int, db: AsyncReadSession) -> TrackerDetail:
    return await tracker_detail(db, tracker_id)


@router.post("", response_model=TrackerRead, status_code=201)
async def create_tracker(body: TrackerCreate, db: AsyncWriteSession) -> Tracker:
    tracker = Tracker.model_validate(body)
    db.add(tracker)
    await db.commit()
    # Async sessions keep their objects after commit (no lazy reload can happen
    # outside the event loop's reach); the id came back with the INSERT.
    return tracker


@router.post("/{tracker_id}/locations", response_model=TrackerDetail, status_code=201)
async def add_location(
    tracker_id: int, body: LocationCreate, db: AsyncWriteSession
) -> TrackerDetail:
    """Write, then read it back on the same (write) session; see the sync twin."""
    if await db.get(Tracker, tracker_id) is None:
        raise HTTPException(404, "tracker not found")
    db.add(
        Location(
            tracker_id=tracker_id,
            latitude=body.latitude,
            longitude=body.longitude,
            recorded_at=body.recorded_at or datetime.now(UTC),
        )
    )
    await db.commit()
    return await tracker_detail(db, tracker_id)
