"""The models docs/recipes.md's job-queue recipes name: ``OrderIn``, ``Order``, ``Confirmation``."""

from __future__ import annotations

from sqlmodel import Field, SQLModel

TABLES = (
    "CREATE TABLE IF NOT EXISTS recipe_orders (id bigserial PRIMARY KEY, item text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS recipe_confirmations ("
    " id bigserial PRIMARY KEY, order_id bigint NOT NULL, message text NOT NULL)",
)


class OrderIn(SQLModel):
    item: str


class Order(OrderIn, table=True):
    __tablename__ = "recipe_orders"

    id: int | None = Field(default=None, primary_key=True)


class Confirmation(SQLModel, table=True):
    __tablename__ = "recipe_confirmations"

    id: int | None = Field(default=None, primary_key=True)
    order_id: int
    message: str
