"""Read engines that stand in for a cluster's read side, process-wide, while they are set.

The test kit's stale replica (:mod:`fastapi_rwdb.testing`) reads from a snapshot
of the primary instead of the replicas. It must keep doing so for every
:class:`~fastapi_rwdb.Database` of that cluster for as long as its block lasts:
one an app's ``setup()`` makes inside the block, one whose engines an ending
lifespan disposed of and that rebuilds them on first use. Holding the stand-in
in one Database would lose it at the first of those. So it is kept here, keyed
by the cluster's write endpoint (``host:port/database``), and a Database asks
here whenever it hands out its read engines or makes its sessionmakers.

What it costs a process that never uses it: one check that the table is empty
per read-engine lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import RWDBError


class StaleReplicaError(RWDBError):
    """The test kit's stale replica cannot keep its promise; raised rather than letting
    reads go, silently, to a read side that is not the stale one."""


@dataclass(frozen=True, slots=True)
class StandIn:
    """The read engines of both drivers that replace a cluster's read side."""

    sync: Engine
    aio: AsyncEngine
    #: Every cluster's reads must be stood in for while this one is in force (the whole
    #: run under ``--rwdb-stale``): a Database of another cluster refuses to read.
    everywhere: bool = False


_stand_ins: dict[str, list[StandIn]] = {}  # by endpoint; the last one set is in force
_lock = threading.Lock()
#: Bumped on every change: a Database rebuilds sessionmakers made under another value.
generation = 0


def for_endpoint(endpoint: str) -> StandIn | None:
    """The stand-in for the cluster whose write endpoint is ``endpoint``, if any.

    Raises :class:`StaleReplicaError` when a stand-in for every cluster is in force
    (``everywhere``) and none is for this one: its reads would see real, current data
    in a run that promised a stale read side everywhere.
    """
    if not _stand_ins:
        return None
    found = _stand_ins.get(endpoint)
    if found:
        return found[-1]
    frozen = ", ".join(sorted(e for e, stack in _stand_ins.items() if stack[-1].everywhere))
    if frozen:
        raise StaleReplicaError(
            f"a Database of the cluster at {endpoint} was used while the stale replica "
            f"stands in for {frozen} only, for the whole run (--rwdb-stale): its reads "
            "would not be stale. The run freezes the read side of the process-wide "
            "Database as the first test starts; configure the app's Database before "
            "then (at import, or in a conftest), or run this test without --rwdb-stale."
        )
    return None


@contextmanager
def standing_in(endpoint: str, stand_in: StandIn) -> Iterator[None]:
    """Every Database of the cluster at ``endpoint`` reads through ``stand_in`` while the
    block lasts; read sessions made before it keep the engines they were made with. A
    block inside another on the same cluster is in force until it ends, then the outer
    one is again."""
    global generation
    with _lock:
        _stand_ins.setdefault(endpoint, []).append(stand_in)
        generation += 1
    try:
        yield
    finally:
        with _lock:
            stack = _stand_ins[endpoint]
            stack.remove(stand_in)
            if not stack:
                del _stand_ins[endpoint]
            generation += 1
