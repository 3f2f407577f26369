"""The pytest plugin's hooks and fixtures (registered through the ``pytest11`` entry point).

``--rwdb-stale`` (or ``rwdb_stale = true`` in the ini file) runs the whole run inside
one stale replica, entered before the first fixture of the first test, and ends
the run with a report of every route whose read saw older data than the primary
had at that moment.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .recorder import RoutingRecorder
from .seeding import RWDBKit
from .stale import StaleReadLog, StaleReplica, stale_replica

_LOG = pytest.StashKey[StaleReadLog]()
_EVERYWHERE = "_rwdb_stale_everywhere"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--rwdb-stale",
        action="store_true",
        default=None,
        help="fastapi_rwdb: run every test as if the replicas never caught up, and report "
        "each route whose read saw older data than the primary had",
    )
    parser.addini(
        "rwdb_stale", "fastapi_rwdb: as --rwdb-stale, from the ini file", type="bool", default=False
    )


def _everywhere(config: pytest.Config) -> bool:
    option = config.getoption("--rwdb-stale", default=None)
    return bool(option) if option is not None else bool(config.getini("rwdb_stale"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "rwdb_stale: run the test with fastapi_rwdb's read side frozen at the test's start "
        "(a stale replica, on any PostgreSQL); see fastapi_rwdb.testing",
    )
    if _everywhere(config):
        config.stash[_LOG] = StaleReadLog()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    everywhere = _everywhere(config)
    for item in items:
        names: list[str] = item.fixturenames  # type: ignore[attr-defined]
        if everywhere:
            names.insert(0, _EVERYWHERE)
        elif item.get_closest_marker("rwdb_stale") is not None:
            names.append("rwdb_stale_replica")


@pytest.fixture(scope="session")
def _rwdb_stale_everywhere(request: pytest.FixtureRequest) -> Iterator[StaleReplica]:
    """One stale replica for the whole run, entered before any other fixture: a write made
    in one test is as missing from the reads of every later test as it is from replicas
    that lag longer than the run (a block per test would let the "replica" catch up
    between tests, and a token from an earlier test read the snapshot, not the primary)."""
    with stale_replica(log=request.config.stash[_LOG], everywhere=True) as stale:
        yield stale


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    log = item.config.stash.get(_LOG, None)
    if log is not None:
        log.test = item.nodeid  # the stale reads from here on are this test's


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    log = terminalreporter.config.stash.get(_LOG, None)
    if log is None:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fastapi-rwdb: reads older than the primary (--rwdb-stale)")
    routes = log.by_route()
    if not routes:
        write("No read saw older data than the primary had.")
        return
    write(
        f"{len(routes)} route(s) read older data than the primary had: each needs the "
        "client's token, a fresh read or the primary (docs/route-decision-guide.md)."
    )
    for route, reads in sorted(routes.items()):
        tests = sorted({read.test for read in reads})
        write(f"{route}: {len(reads)} stale read(s) in {len(tests)} test(s)")
        for test in tests[:5]:
            write(f"    {test}")
        write(f"    first statement: {reads[0].statement}")


@pytest.fixture
def rwdb_routes() -> Iterator[RoutingRecorder]:
    """Records every read session's routing decision and every token event, per request."""
    with RoutingRecorder().installed() as recorder:
        yield recorder


@pytest.fixture
def rwdb() -> RWDBKit:
    """Seeding with tokens (``rwdb.seed(client)``), a stale replica (``rwdb.stale_replica()``)."""
    return RWDBKit()


@pytest.fixture
def rwdb_stale_replica() -> Iterator[StaleReplica]:
    """The test runs with the process-wide Database's read side frozen at its start."""
    with stale_replica() as stale:
        yield stale
