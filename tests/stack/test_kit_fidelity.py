"""The test kit never lies: a sample suite (tests/stack/kit_sample) fails the same tests,
with the same symptoms, inside the kit's stale replica on one plain PostgreSQL as on
the stack with its replicas five minutes behind (longer than the run), and
``--rwdb-stale`` names exactly the routes those reads went through.

The sample suite is what broke the kit before: a module-scoped client whose
``with TestClient(app)`` ends the app's lifespan between modules (its
``dispose()`` made the kit silently read the real read URL), a function-scoped
client with a lifespan of its own, session-scoped clients with and without a lifespan, an async
client, fixtures that write through a session of their own, a login flow whose token
must keep working, and a token from an earlier test (a stale replica per test would
have caught up with it; a lagging cluster has not).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psycopg

from ..helpers import dsn, replicas_lagging
from .kit_sample.schema import SCHEMA, TABLE
from .test_testing_plugin import plain_postgres

__all__ = ["plain_postgres"]

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "tests/stack/kit_sample"
#: What replicas that lag longer than the run break in the sample: reads of rows a
#: fixture wrote, by a client holding no token (whatever its scope, lifespan or driver).
#: A client holding a token from an earlier test reads the primary and passes, as do
#: the login flow and the reads of what never changes.
BROKEN = {
    "check_login.py::test_async_read_of_a_fixture_user",
    "check_users.py::test_sync_read_of_a_fixture_user",
    "check_users.py::test_fixture_user_through_a_function_scoped_client",
    "check_users.py::test_fixture_user_through_a_session_client_without_lifespan",
    "check_users.py::test_fixture_user_through_a_session_client_with_lifespan",
}
BROKEN_ROUTES = {"GET /users/{user_id}", "GET /async/users/{user_id}"}
PASSING = 4


def run_sample(tmp_path: Path, env: dict[str, str], *options: str) -> tuple[dict[str, str], str]:
    """The sample suite in a pytest of its own: each failed test with its failure
    message, and what pytest printed."""
    return run_suite(tmp_path, env, SAMPLE, len(BROKEN) + PASSING, *options)


def run_suite(
    tmp_path: Path, env: dict[str, str], path: str, count: int, *options: str
) -> tuple[dict[str, str], str]:
    junit = tmp_path / f"junit-{time.monotonic_ns()}.xml"
    command = [sys.executable, "-m", "pytest", path, "-o", "python_files=check_*.py test_*.py"]
    done = subprocess.run(
        [*command, "-p", "no:cacheprovider", "-q", f"--junitxml={junit}", *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert junit.exists(), f"the inner pytest wrote no report:\n{done.stdout}\n{done.stderr}"
    cases = ET.parse(junit).getroot().iter("testcase")  # noqa: S314 - our own run's file
    outcomes: dict[str, str] = {}
    ran = 0
    for case in cases:
        ran += 1
        name = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
        failure = case.find("failure")
        if failure is not None:
            outcomes[name] = failure.get("message", "")
        assert case.find("error") is None and case.find("skipped") is None, done.stdout
    assert ran == count, done.stdout + done.stderr
    return outcomes, done.stdout


def plain_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "RWDB_"))}
    return {**env, "RWDB_WRITE_URL": url, "RWDB_READ_URL": url}


def symptom(message: str) -> str:
    return "404" if "404" in message else message


def test_the_kit_fails_what_a_lagging_cluster_fails(plain_postgres: str, tmp_path: Path) -> None:
    with psycopg.connect(plain_postgres, autocommit=True) as conn:
        conn.execute(SCHEMA)
    # Without the kit, one plain server is a replica that is never behind: all pass.
    control, _ = run_sample(tmp_path, plain_env(plain_postgres))
    assert control == {}
    kit, printed = run_sample(tmp_path, plain_env(plain_postgres), "--rwdb-stale")
    assert set(kit) == BROKEN, printed
    assert {symptom(m) for m in kit.values()} == {"404"}, kit

    # The same suite on the stack, replicas five minutes behind.
    with psycopg.connect(dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute(SCHEMA)
        conn.execute(f"TRUNCATE {TABLE}")
    time.sleep(1.5)  # the replicas have the table before they fall behind
    with replicas_lagging("300s"):
        lagging, printed = run_sample(tmp_path, dict(os.environ))
    assert set(lagging) == set(kit), printed
    assert {name: symptom(m) for name, m in lagging.items()} == {
        name: symptom(m) for name, m in kit.items()
    }


def test_the_report_names_exactly_the_routes_that_read_stale_data(
    plain_postgres: str, tmp_path: Path
) -> None:
    with psycopg.connect(plain_postgres, autocommit=True) as conn:
        conn.execute(SCHEMA)
    # The ini option this time (as a project's pytest.ini would set it).
    failed, printed = run_sample(tmp_path, plain_env(plain_postgres), "-o", "rwdb_stale=true")
    assert set(failed) == BROKEN, printed
    report = printed.split("reads older than the primary (--rwdb-stale)", 1)[1]
    named = {line.split(":")[0] for line in report.splitlines() if line.startswith("GET ")}
    assert named == BROKEN_ROUTES, report
    assert "/me" not in report and "/health" not in report


def test_on_example_apps_suite_the_report_names_no_route(tmp_path: Path) -> None:
    """example_app's tests read through the cookie their own writes set, so replicas
    that lag break none of their reads, and the report must name no route. The one
    test that fails is a documented limit, not a stale read: the snapshot is read on
    the primary, so /health/database's pg_is_in_recovery() answers "primary"."""
    suite = "tests/stack/test_example_app.py"
    failed, printed = run_suite(tmp_path, dict(os.environ), suite, 12, "--rwdb-stale")
    assert set(failed) == {"test_example_app.py::test_health_is_served_by_a_replica"}, printed
    assert "primary" in next(iter(failed.values()))
    report = printed.split("reads older than the primary (--rwdb-stale)", 1)[1]
    assert "No read saw older data than the primary had." in report, report
