"""Tracker API: reads on replicas, writes on the primary.

Run it with ``bash scripts/dev.sh demo`` (starts the local stack first), or
``uvicorn example_app.main:app`` with the ``POSTGRES_*`` variables set. Check
which session each route uses with ``python -m fastapi_rwdb audit example_app.main:app``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from sqlalchemy import text

import fastapi_rwdb
from fastapi_rwdb import ReadSession

from . import async_trackers, trackers
from .models import create_tables


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # DDL belongs on the primary; the replicas receive it through replication.
    with fastapi_rwdb.get_database().engines.write.begin() as conn:
        create_tables(conn)
    yield


app = FastAPI(title="fastapi-rwdb example: trackers", lifespan=lifespan)
database = fastapi_rwdb.setup(app)
# A page served from another origin (EXAMPLE_CORS_ORIGINS, comma-separated) may call
# the API with the browser's cookies: docs/quick-start.md's CORS arguments, after setup().
origins = [o.strip() for o in os.environ.get("EXAMPLE_CORS_ORIGINS", "").split(",")]
if any(origins):
    app.add_middleware(
        CORSMiddleware,
        allow_origins=[o for o in origins if o],
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["content-type", database.settings.token_header],
        expose_headers=[database.settings.token_header, "X-RWDB-Read"],
    )
app.include_router(trackers.router)
app.include_router(async_trackers.router)


@app.get("/health/database", tags=["health"])
def database_health(db: ReadSession) -> dict[str, str]:
    """On a read session on purpose: health checks are frequent, and the question a
    load balancer asks is "can this instance serve reads?". A replica answering says
    the read path (HAProxy, PgBouncer, replica) works. "primary" means either that
    no replica is up (HAProxy's read port fell back to the primary) or that this
    client sent a token for a write the replicas have not replayed yet."""
    in_recovery = db.execute(text("SELECT pg_is_in_recovery()")).scalar_one()
    return {"status": "ok", "served_by": "replica" if in_recovery else "primary"}


PAGE = Path(__file__).with_name("static") / "index.html"


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    """A small page (plain HTML and fetch()) that adds a tracker and lists them: the
    browser's own cookie handling carries the read-your-writes token."""
    return PAGE.read_text()
