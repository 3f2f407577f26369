from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel


class Item(SQLModel, table=True):
    __tablename__ = "rwdb_items"

    id: int | None = Field(default=None, primary_key=True)
    name: str
    created_at: datetime | None = Field(default=None, sa_column_kwargs={"server_default": "now()"})
