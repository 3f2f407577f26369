from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class TrackerBase(SQLModel):
    name: str = Field(min_length=1, max_length=200, index=True)
    serial: str = Field(min_length=1, max_length=64)


class Tracker(TrackerBase, table=True):
    __tablename__ = "example_trackers"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=_now)


class TrackerCreate(TrackerBase):
    pass


class TrackerRead(TrackerBase):
    id: int
    created_at: datetime
