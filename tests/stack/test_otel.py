"""OpenTelemetry: routing decisions as span attributes, token events as span events.

Against one plain PostgreSQL (the test kit's throwaway server), with the SDK's
in-memory exporter; and, in subprocesses, that nothing of OpenTelemetry is
imported before it is needed, nor at all without it.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fastapi_rwdb import Database
from tests.stack.test_testing_plugin import plain_postgres, plain_settings, serving

from ..helpers import client

__all__ = ["plain_postgres"]


@pytest.fixture
def spans() -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


@pytest.mark.parametrize("flavour", ["", "/async"])
async def test_routing_decisions_and_token_events_reach_the_current_span(
    plain_postgres: str, spans: tuple[Any, InMemorySpanExporter], flavour: str
) -> None:
    tracer, exporter = spans
    database = Database(plain_settings(plain_postgres))
    async with serving(database) as app, client(app) as c:
        with tracer.start_as_current_span("plain read"):
            await c.get(f"{flavour}/items/nothing")
        with tracer.start_as_current_span("write"):
            name = (await c.post(f"{flavour}/items")).json()["name"]
        with tracer.start_as_current_span("read with token"):
            await c.get(f"{flavour}/items/{name}")
    plain = only(exporter, "plain read").attributes or {}
    assert plain["rwdb.read.target"] == "replica"
    assert plain["rwdb.read.reason"] == "default"
    assert plain["rwdb.read.position_checked"] is False
    assert "rwdb.read.min_lsn" not in plain
    write = only(exporter, "write")
    assert [e.name for e in write.events] == ["rwdb.token.issued"]
    assert "rwdb.read.target" not in (write.attributes or {})
    pinned = only(exporter, "read with token").attributes or {}
    assert pinned["rwdb.read.position_checked"] is True
    assert pinned["rwdb.read.reason"] == "caught-up"
    assert "/" in str(pinned["rwdb.read.min_lsn"])


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


def test_opentelemetry_is_imported_only_at_the_first_event() -> None:
    # (FastAPI itself may import opentelemetry when it is installed: what is checked is
    # that fastapi_rwdb's bridge takes it only when a decision is made.)
    out = run(
        "import fastapi_rwdb\n"
        "from fastapi_rwdb.observe import listeners as observers, metrics, otel\n"
        "print(observers.active, otel._trace is None)\n"
        "metrics.record_route('replica', 'default')\n"
        "print(otel._trace is None)\n"
    )
    assert out.splitlines() == ["True True", "False"]


def test_without_opentelemetry_nothing_listens_and_nothing_is_imported() -> None:
    out = run(
        "import sys, fastapi, sqlalchemy  # (recent FastAPI imports opentelemetry itself)\n"
        "sys.modules['opentelemetry'] = None  # from here on, as if not installed\n"
        "import fastapi_rwdb\n"
        "from fastapi_rwdb.observe import listeners as observers, metrics\n"
        "metrics.record_route('replica', 'default')\n"
        "print(observers.active, 'fastapi_rwdb.observe.otel' in sys.modules)\n"
    )
    assert out == "False False"
