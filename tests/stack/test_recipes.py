"""Every recipe of docs/recipes.md, run as the page prints it, against the stack.

Alembic runs the page's ``env.py`` through the write port (HAProxy -> PgBouncer in
transaction mode); the Celery and arq recipes run in real worker processes on the
stack's Redis while the replicas are held two seconds behind: the job handed the
request's token finds the order, the same job handed ``None`` (the control) does
not, which shows the replicas it reads really lag. The CI recipe's workflow is
parsed and its commands are run or compared with what this repository runs.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from fastapi_rwdb import RWDBSettings

from ..helpers import dsn, replicas_lagging, served_client
from ..recipe_models import TABLES
from ..recipes import ROOT, log_tail, recipe, stop, wait_for, worker_env

pytestmark = pytest.mark.stack

MIGRATION = '''
"""recipe widgets"""
import sqlalchemy as sa
from alembic import context, op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    if not context.is_offline_mode():  # the migration's own connection: on the primary
        assert op.get_bind().exec_driver_sql("SELECT pg_is_in_recovery()").scalar() is False
    op.create_table(
        "recipe_widgets",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("recipe_widgets")
'''

MODELS = """
import sqlalchemy as sa

metadata = sa.MetaData()
widgets = sa.Table(
    "recipe_widgets", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
)
"""


def ci_workflow() -> dict[str, Any]:
    workflow = yaml.safe_load(recipe("# .github/workflows/test.yml"))
    assert isinstance(workflow, dict)
    return workflow


def ci_step(command: str) -> list[str]:
    """The CI recipe's step whose command starts with ``command``, split as a shell would."""
    runs = [step["run"] for step in ci_workflow()["jobs"]["test"]["steps"] if "run" in step]
    found = [run for run in runs if run.startswith(command)]
    assert len(found) == 1, f"the CI recipe has no single step {command!r}: {runs}"
    return shlex.split(found[0], comments=True)


def primary(sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn(), prepare_threshold=None) as conn:
        cursor = conn.execute(sql)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def alembic_project(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = migrations\n")
    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    (tmp_path / "migrations" / "env.py").write_text(recipe("# migrations/env.py"))
    (tmp_path / "migrations" / "versions" / "0001_widgets.py").write_text(MIGRATION)
    (tmp_path / "myservice").mkdir()
    (tmp_path / "myservice" / "__init__.py").write_text("")
    (tmp_path / "myservice" / "models.py").write_text(textwrap.dedent(MODELS))
    primary("DROP TABLE IF EXISTS recipe_widgets; DROP TABLE IF EXISTS alembic_version")
    try:
        yield tmp_path
    finally:
        primary("DROP TABLE IF EXISTS recipe_widgets; DROP TABLE IF EXISTS alembic_version")


def alembic(project: Path, *args: str) -> str:
    env = worker_env()
    env["PYTHONPATH"] = f"{project}:{env['PYTHONPATH']}"
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"  # `alembic` of this venv, as CI's
    done = subprocess.run(
        list(args), cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{shlex.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_alembic_recipe_migrates_through_the_write_port(alembic_project: Path) -> None:
    alembic(alembic_project, *ci_step("alembic upgrade head"))  # the CI recipe's step
    assert primary("SELECT version_num FROM alembic_version") == [("0001",)]
    assert primary("SELECT to_regclass('recipe_widgets') IS NOT NULL") == [(True,)]
    offline = alembic(alembic_project, "alembic", "upgrade", "head", "--sql")
    assert "CREATE TABLE recipe_widgets" in offline
    alembic(alembic_project, "alembic", "downgrade", "base")
    assert primary("SELECT to_regclass('recipe_widgets') IS NULL") == [(True,)]


def test_ci_recipe_settings_and_commands() -> None:
    workflow = ci_workflow()
    job = workflow["jobs"]["test"]
    env = {k: str(v) for k, v in job["env"].items()}
    assert "postgres" in job["services"]
    settings = RWDBSettings(**_by_alias(env))
    write, read = settings.url("write", "psycopg"), settings.url("read", "psycopg")
    assert (write.host, write.port) == (read.host, read.port), (
        "the CI recipe's read side is the write side"
    )
    assert (
        settings.prepared_statements is False
    )  # as the recipe's text says, through PgBouncer or not
    # what this repository installs and runs: the same install, and the audit on a real app
    assert ci_step("pip install") == ["pip", "install", "-e", ".[dev]"]
    assert "-e '.[dev]'" in (ROOT / "scripts" / "dev.sh").read_text()
    audit = ci_step("python -m fastapi_rwdb audit")
    assert audit[-1] == "myservice.main:app"
    done = subprocess.run(
        [sys.executable, *audit[1:-1], "tests.recipe_celery:app"],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "/orders" in done.stdout
    assert ci_step("pytest") == ["pytest"]


def _by_alias(env: dict[str, str]) -> dict[str, str]:
    """The workflow's variables by RWDBSettings' field names (each field reads one variable)."""
    names = {str(f.validation_alias): name for name, f in RWDBSettings.model_fields.items()}
    unknown = sorted(set(env) - set(names))
    assert not unknown, f"the CI recipe sets variables RWDBSettings does not read: {unknown}"
    return {names[k]: v for k, v in env.items()}


# --------------------------------------------------------------------------- job queues


@pytest.fixture(scope="module")
def order_tables() -> None:
    for sql in TABLES:
        primary(sql)


@pytest.fixture
def lagging_replicas() -> Iterator[None]:
    with replicas_lagging("2s"):
        yield


def confirmations(order_id: int) -> list[str]:
    return [
        row[0]
        for row in primary(
            f"SELECT message FROM recipe_confirmations WHERE order_id = {int(order_id)}"
        )
    ]


def wait_confirmed(order_id: int) -> list[str]:
    deadline = time.monotonic() + 20
    while not (found := confirmations(order_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@pytest.fixture(scope="module")
def celery_worker(tmp_path_factory: pytest.TempPathFactory, order_tables: None) -> Iterator[Any]:
    from ..recipe_celery import celery_app

    log = tmp_path_factory.mktemp("celery") / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.recipe_celery:celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "--loglevel",
                "info",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=worker_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        celery_app.control.purge()
        wait_for(
            lambda: bool(celery_app.control.ping(timeout=0.5)),
            "the Celery worker's pong",
            process,
            log,
        )
        yield celery_app
    finally:
        stop(process)


async def test_celery_job_reads_its_requests_write(
    celery_worker: Any, lagging_replicas: None
) -> None:
    from .. import recipe_celery

    async with served_client(recipe_celery.app) as client:
        response = await client.post("/orders", json={"item": "tea"})
    assert response.status_code == 200, response.text
    order_id = response.json()["id"]
    control = recipe_celery.send_confirmation.delay(order_id, None)  # type: ignore[attr-defined]
    await asyncio.to_thread(control.get, timeout=20, propagate=False)
    assert control.failed() and isinstance(control.result, LookupError), (
        f"the control job (no token) should miss the order on the lagging replicas: "
        f"{control.result!r}"
    )
    assert await asyncio.to_thread(wait_confirmed, order_id) == [f"order {order_id} confirmed: tea"]


@pytest.fixture
async def arq_worker(tmp_path: Path, order_tables: None) -> AsyncIterator[Any]:
    from arq import create_pool
    from arq.connections import RedisSettings

    from .. import recipe_arq

    log = tmp_path / "arq.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "arq", "tests.recipe_arq.WorkerSettings"],
            cwd=ROOT,
            env=worker_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    pool = await create_pool(RedisSettings.from_dsn(recipe_arq.REDIS_URL))
    recipe_arq.redis = pool
    try:
        await asyncio.to_thread(
            wait_for,
            lambda: "Starting worker" in log.read_text(),
            "the arq worker's start",
            process,
            log,
        )
        yield pool
    finally:
        recipe_arq.redis = None
        await (getattr(pool, "aclose", None) or pool.close)()  # redis-py 5 / 4 (lowest)
        stop(process)
        print(log_tail(log))


async def test_arq_job_reads_its_requests_write(arq_worker: Any, lagging_replicas: None) -> None:
    from .. import recipe_arq

    async with served_client(recipe_arq.app) as client:
        response = await client.post("/orders", json={"item": "coffee"})
    assert response.status_code == 200, response.text
    order_id = response.json()["id"]
    control = await arq_worker.enqueue_job("send_confirmation", order_id, None)
    with pytest.raises(LookupError):
        await control.result(timeout=20)
    assert await asyncio.to_thread(wait_confirmed, order_id) == [
        f"order {order_id} confirmed: coffee"
    ]
