"""Listeners to each routing decision and token event, beside the Prometheus counters.

The test kit's recorder (:mod:`fastapi_rwdb.testing`) and the OpenTelemetry
bridge (:mod:`fastapi_rwdb.observe.otel`, installed here when ``opentelemetry-api`` is)
listen here. With no listener installed,
what :mod:`fastapi_rwdb.observe.metrics` pays per event is one check of ``active``.
Listeners run in the thread (and the context) of the request that made the
decision, so they can look at ``request_state``; they must be quick and must
not raise.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable

#: (target, reason, checked_lsn): checked_lsn is the WAL position the replica had to
#: have replayed (the client's token, a fresh read's, the lag floor), else None.
RouteListener = Callable[[str, str, "int | None"], None]
#: The token event: "issued", "rejected" or "cleared".
TokenListener = Callable[[str], None]

active = False
_routes: tuple[RouteListener, ...] = ()
_tokens: tuple[TokenListener, ...] = ()
_lock = threading.Lock()


def listen(
    on_route: RouteListener | None = None, on_token: TokenListener | None = None
) -> Callable[[], None]:
    """Install listeners; returns the function that removes them again."""
    global _routes, _tokens, active
    with _lock:
        if on_route is not None:
            _routes = (*_routes, on_route)
        if on_token is not None:
            _tokens = (*_tokens, on_token)
        active = bool(_routes or _tokens)

    def remove() -> None:
        global _routes, _tokens, active
        with _lock:
            _routes = tuple(f for f in _routes if f is not on_route)
            _tokens = tuple(f for f in _tokens if f is not on_token)
            active = bool(_routes or _tokens)

    return remove


def route(target: str, reason: str, checked_lsn: int | None) -> None:
    for listener in _routes:
        listener(target, reason, checked_lsn)


def token(event: str) -> None:
    for listener in _tokens:
        listener(event)


def _listen_for_opentelemetry() -> None:
    """With ``opentelemetry-api`` installed, routing decisions go on the current span.

    Only asks whether the package exists: it is imported on the first event.
    """
    if importlib.util.find_spec("opentelemetry") is None:
        return
    from . import otel

    listen(otel.on_route, otel.on_token)


_listen_for_opentelemetry()
