"""Tracker and location routes (sync endpoints; FastAPI runs them in a thread pool).

Which session each route takes follows docs/route-decision-guide.md: lists,
searches and single reads take a ``ReadSession`` (a replica, or the primary
while the client's own last write has not reached one); anything that changes
data takes a ``WriteSession``, and so does the one route that must read back
what it has just written.

The aliases come from ``fastapi_rwdb.sqlmodel``: the same dependencies, typed
with SQLModel's session, so ``db.exec(select(...))`` type-checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, HTTPException, Query, Response
from sqlalchemy import delete
from sqlmodel import Session, col, select

import fastapi_rwdb
from fastapi_rwdb.sqlmodel import ReadSession, WriteSession

from .models import (
    Location,
    LocationCreate,
    LocationRead,
    Tracker,
    TrackerCreate,
    TrackerDetail,
    TrackerRead,
    TrackerUpdate,
)
from .worker import fold_new_points

router = APIRouter(prefix="/trackers", tags=["trackers"])

#: How many recent points a tracker's detail carries.
LATEST = 10

Limit = Annotated[int, Query(ge=1, le=500)]


def tracker_or_404(db: Session, tracker_id: int) -> Tracker:
    tracker = db.get(Tracker, tracker_id)
    if tracker is None:
        raise HTTPException(404, "tracker not found")
    return tracker


def latest_locations(db: Session, tracker_id: int, limit: int = LATEST) -> Sequence[Location]:
    newest_first = (col(Location.recorded_at).desc(), col(Location.id).desc())
    query = select(Location).where(Location.tracker_id == tracker_id).order_by(*newest_first)
    return db.exec(query.limit(limit)).all()


def tracker_detail(db: Session, tracker_id: int) -> TrackerDetail:
    """Tracker and latest points from one session, so both come from the same server."""
    tracker = tracker_or_404(db, tracker_id)
    points = [LocationRead.model_validate(p) for p in latest_locations(db, tracker_id)]
    return TrackerDetail(**tracker.model_dump(), latest_locations=points)


# -- reads: replicas ----------------------------------------------------------------


@router.get("", response_model=list[TrackerRead])
def list_trackers(
    db: ReadSession, skip: Annotated[int, Query(ge=0)] = 0, limit: Limit = 100
) -> Sequence[Tracker]:
    """Newest first. A list may trail the primary by the replication lag, which no one
    notices, except the client who just wrote; its token gets it an up-to-date server."""
    newest_first = select(Tracker).order_by(col(Tracker.id).desc())
    return db.exec(newest_first.offset(skip).limit(limit)).all()


@router.get("/search", response_model=list[TrackerRead])
def search_trackers(
    db: ReadSession, q: Annotated[str, Query(min_length=1, max_length=200)], limit: Limit = 50
) -> Sequence[Tracker]:
    """Searches are the typical replica work: often heavy, never writing.

    ``autoescape`` keeps ``%`` and ``_`` in the user's text literal.
    """
    match = col(Tracker.name).icontains(q, autoescape=True)
    return db.exec(select(Tracker).where(match).order_by(col(Tracker.id)).limit(limit)).all()


@router.get("/{tracker_id}", response_model=TrackerDetail)
def get_tracker(tracker_id: int, db: ReadSession) -> TrackerDetail:
    """A 404 here right after a create would be replication lag showing; the
    read-your-writes token is what prevents it for the client that created it."""
    return tracker_detail(db, tracker_id)


@router.get("/{tracker_id}/locations", response_model=list[LocationRead])
def list_locations(tracker_id: int, db: ReadSession, limit: Limit = 100) -> Sequence[Location]:
    tracker_or_404(db, tracker_id)
    return latest_locations(db, tracker_id, limit)


# -- writes: the primary ------------------------------------------------------------


@router.post("", response_model=TrackerRead, status_code=201)
def create_tracker(body: TrackerCreate, db: WriteSession) -> Tracker:
    tracker = Tracker.model_validate(body)
    db.add(tracker)
    db.commit()
    db.refresh(tracker)  # the id and defaults, from the primary that has them
    return tracker


@router.patch("/{tracker_id}", response_model=TrackerRead)
def update_tracker(tracker_id: int, body: TrackerUpdate, db: WriteSession) -> Tracker:
    """Loaded on the write session, not a replica: the row being changed must be
    the primary's current one, or the response could show stale fields."""
    tracker = tracker_or_404(db, tracker_id)
    tracker.sqlmodel_update(body.model_dump(exclude_unset=True))
    db.commit()
    db.refresh(tracker)
    return tracker


@router.delete("/{tracker_id}", status_code=204)
def delete_tracker(tracker_id: int, db: WriteSession) -> Response:
    """One statement: no read first, so nothing can change between check and delete.
    Its locations and summaries go with it (``ON DELETE CASCADE``)."""
    gone = db.execute(
        delete(Tracker).where(col(Tracker.id) == tracker_id).returning(col(Tracker.id))
    ).first()
    if gone is None:
        raise HTTPException(404, "tracker not found")
    db.commit()
    return Response(status_code=204)


@router.post("/{tracker_id}/locations", response_model=TrackerDetail, status_code=201)
def add_location(
    tracker_id: int, body: LocationCreate, db: WriteSession, jobs: BackgroundTasks
) -> TrackerDetail:
    """Record a point and answer with the tracker and its latest points, the new one
    included: a read of what this request just wrote, so it stays on the write session.

    A ``ReadSession`` in this request would also see the point: once a request has
    committed a write, fastapi_rwdb sends its read sessions to the primary. Reading
    through the write session says so in the code, and needs no second connection.

    The daily summary is folded after the response, by the worker's job, which is
    handed this request's token: its replica reads wait for this very point.
    """
    tracker_or_404(db, tracker_id)
    db.add(
        Location(
            tracker_id=tracker_id,
            latitude=body.latitude,
            longitude=body.longitude,
            recorded_at=body.recorded_at or datetime.now(UTC),
        )
    )
    db.commit()
    jobs.add_task(fold_new_points, token=fastapi_rwdb.current_token())
    return tracker_detail(db, tracker_id)
