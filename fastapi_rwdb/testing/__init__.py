"""A pytest plugin for the application's own tests: see routing, simulate lag, seed safely.

Registered through the ``pytest11`` entry point, so installing the package makes
it available; it does nothing until a test asks for one of its fixtures, marks
or options:

``rwdb_routes``
    A :class:`RoutingRecorder`: every read session's routing decision (target,
    reason) and every token issued, rejected or cleared, grouped by the request
    that made it, so a test can say "this GET read a replica", "this POST issued
    a token", "this read was pinned".
``rwdb``
    A :class:`RWDBKit`: :meth:`~RWDBKit.stale_replica` makes the read side lag
    behind on any PostgreSQL, even one plain server in CI; :meth:`~RWDBKit.seed`
    writes fixture rows and hands the test client the token for them, as a real
    write through the API would.
``@pytest.mark.rwdb_stale``
    Runs the test inside :func:`stale_replica` of the process-wide
    :class:`~fastapi_rwdb.Database` (the one ``setup()`` installed at import).
``--rwdb-stale`` (or ``rwdb_stale = true`` in the ini file)
    The whole run reads from one stale replica, as if the replicas never caught up,
    and ends with the routes whose reads saw older data than the primary had
    (:mod:`.plugin`).

How the stale replica works, and why it holds through lifespans and
``configure()``: :mod:`.stale`.
"""

from ..stand_ins import StaleReplicaError
from .plugin import (
    _rwdb_stale_everywhere,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_setup,
    pytest_terminal_summary,
    rwdb,
    rwdb_routes,
    rwdb_stale_replica,
)
from .recorder import ReadDecision, RecordedRequest, RoutingRecorder
from .seeding import RWDBKit, give_token
from .stale import StaleRead, StaleReadLog, StaleReplica, stale_replica

__all__ = [
    "RWDBKit",
    "ReadDecision",
    "RecordedRequest",
    "RoutingRecorder",
    "StaleRead",
    "StaleReadLog",
    "StaleReplica",
    "StaleReplicaError",
    "give_token",
    "stale_replica",
]

# The plugin's hooks and fixtures, where pytest looks for them (this module is the
# entry point); listed so that linters see them used.
_PLUGIN = (
    _rwdb_stale_everywhere,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_setup,
    pytest_terminal_summary,
    rwdb,
    rwdb_routes,
    rwdb_stale_replica,
)
