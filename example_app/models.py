"""Tables and request/response shapes of the tracker API.

Timestamps are ``timestamptz`` and always timezone-aware in Python: a naive
value would be read back in the server's time zone, which is one more thing
that can differ between a primary and a replica configured by hand.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import Connection, DateTime, Table, func, select
from sqlmodel import Field, SQLModel

TRACKERS = "example_trackers"
LOCATIONS = "example_locations"
DAILY_SUMMARIES = "example_daily_summaries"

# Any constant works; it only has to be the same for every process creating the tables.
_CREATE_TABLES_LOCK = 0x5257_4442_0005


def _now() -> datetime:
    return datetime.now(UTC)


class TrackerBase(SQLModel):
    name: str = Field(min_length=1, max_length=200, index=True)
    serial: str = Field(min_length=1, max_length=64)


class Tracker(TrackerBase, table=True):
    __tablename__ = TRACKERS

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=_now, sa_type=DateTime(timezone=True))


class TrackerCreate(TrackerBase):
    pass


class TrackerUpdate(SQLModel):
    """Only the fields the client sends are changed (``exclude_unset``)."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    serial: str | None = Field(default=None, min_length=1, max_length=64)


class TrackerRead(TrackerBase):
    id: int
    created_at: datetime


class LocationBase(SQLModel):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)


class Location(LocationBase, table=True):
    __tablename__ = LOCATIONS

    id: int | None = Field(default=None, primary_key=True)
    tracker_id: int = Field(foreign_key=f"{TRACKERS}.id", ondelete="CASCADE", index=True)
    recorded_at: datetime = Field(default_factory=_now, sa_type=DateTime(timezone=True), index=True)
    # Set by the worker (python -m example_app.worker) once the point is in a daily summary.
    processed: bool = Field(default=False, index=True)


class LocationCreate(LocationBase):
    """A fix reported by a tracker; ``recorded_at`` defaults to the time it arrives."""

    recorded_at: datetime | None = None


class LocationRead(LocationBase):
    id: int
    tracker_id: int
    recorded_at: datetime


class TrackerDetail(TrackerRead):
    latest_locations: list[LocationRead]


class DailySummary(SQLModel, table=True):
    """Written by the worker only; one row per tracker and UTC day."""

    __tablename__ = DAILY_SUMMARIES

    tracker_id: int = Field(foreign_key=f"{TRACKERS}.id", ondelete="CASCADE", primary_key=True)
    day: date = Field(primary_key=True)
    locations: int
    first_seen: datetime = Field(sa_type=DateTime(timezone=True))
    last_seen: datetime = Field(sa_type=DateTime(timezone=True))


def example_tables() -> list[Table]:
    return [SQLModel.metadata.tables[name] for name in (TRACKERS, LOCATIONS, DAILY_SUMMARIES)]


def create_tables(conn: Connection) -> None:
    """Create the example's tables (only those) if they are missing.

    Run it on a connection to the primary: DDL on a replica fails, and the
    replicas get the tables through replication anyway. Several workers may
    start at once; a transaction-level advisory lock makes them take turns.
    A session-level lock (``pg_advisory_lock``) would not do here: PgBouncer in
    transaction mode may hand the unlock to another server connection.
    """
    conn.execute(select(func.pg_advisory_xact_lock(_CREATE_TABLES_LOCK)))
    SQLModel.metadata.create_all(conn, tables=example_tables())
