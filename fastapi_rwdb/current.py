"""Which :class:`~fastapi_rwdb.Database` serves: the app's inside a request, the
process-wide default elsewhere (:func:`configure`, :func:`using`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .database import Database
from .routing.request import request_state
from .settings import RWDBSettings

_default = Database()
_default_lock = threading.Lock()


def get_database() -> Database:
    """The :class:`Database` the dependencies and scopes use.

    Inside a request, the one of the app serving it (its middleware says which,
    so two apps set up with different settings can share a process); elsewhere
    the process-wide one that :func:`configure` (and so ``setup()``) installs.
    """
    state = request_state.get()
    if state is not None and isinstance(state.database, Database):
        return state.database
    return _default


def configure(database: Database | RWDBSettings | None = None) -> Database:
    """Replace the process-wide :class:`Database` (before serving requests).

    Settings are loaded and checked right away, so a bad configuration stops
    start-up instead of the first request. The one replaced is disposed of,
    unless an app set up with it still serves requests with it (its middleware
    says which Database to use): that app's lifespan disposes of it at shutdown.
    """
    global _default
    if not isinstance(database, Database):
        database = Database(database)
    database.check()
    with _default_lock:
        old, _default = _default, database
    if old is not database and old._built and not old._apps:
        old.dispose_sync()
    return database


@contextmanager
def using(database: Database) -> Iterator[Database]:
    """Make ``database`` the process-wide :class:`Database` for a ``with`` block,
    then put the previous one back, even if the block raises.

    For tests and scripts that need another cluster or other settings for a
    while. Nothing is disposed of on the way in or out: ``database`` is the
    caller's to dispose of. Requests still use their own app's Database. The
    default is one per process, not per thread or task: blocks in concurrent
    threads or tasks would swap it under each other.
    """
    global _default
    with _default_lock:
        previous, _default = _default, database
    try:
        yield database
    finally:
        with _default_lock:
            _default = previous
