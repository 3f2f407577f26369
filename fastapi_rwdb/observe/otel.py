"""OpenTelemetry: each read session's routing decision on the current span, token events
as span events.

Active when ``opentelemetry-api`` is installed (``pip install 'fastapi-rwdb[otel]'``):
:mod:`fastapi_rwdb.observe.listeners` installs these listeners at import, after asking only
whether the package exists; ``opentelemetry`` itself is imported on the first
event. Without it nothing is imported and nothing is called. With it but no SDK
configured, the current span does not record, and a listener returns after one
check.

Span attributes (of the span current when the read session chose, usually the
request's server span; the last read session's decision wins):

``rwdb.read.target``
    ``replica`` or ``primary``.
``rwdb.read.reason``
    as in ``X-RWDB-Read`` and the ``rwdb_reads_routed_total`` counter
    (``default``, ``caught-up``, ``replica-behind``, ``wrote-in-request``, ...).
``rwdb.read.position_checked``
    whether the replica's WAL position was checked (against the client's token,
    a fresh read's position, or the lag limit).
``rwdb.read.min_lsn``
    the position it had to have replayed, when one was checked.

Span events: ``rwdb.token.issued``, ``rwdb.token.cleared``, ``rwdb.token.rejected``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ..routing.lsn import format_lsn

_trace: ModuleType | None = None


def _span() -> Any:
    global _trace
    if _trace is None:
        from opentelemetry import trace

        _trace = trace
    span = _trace.get_current_span()
    return span if span.is_recording() else None


def on_route(target: str, reason: str, checked_lsn: int | None) -> None:
    span = _span()
    if span is None:
        return
    span.set_attribute("rwdb.read.target", target)
    span.set_attribute("rwdb.read.reason", reason)
    span.set_attribute("rwdb.read.position_checked", checked_lsn is not None)
    if checked_lsn is not None:
        span.set_attribute("rwdb.read.min_lsn", str(format_lsn(checked_lsn)))


def on_token(event: str) -> None:
    span = _span()
    if span is not None:
        span.add_event(f"rwdb.token.{event}")
