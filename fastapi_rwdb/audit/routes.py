"""Reading FastAPI's route tree: every route of an app with the session dependencies
it reaches.

Routes of included routers are not all in ``app.routes`` in recent FastAPI
(0.165 keeps them behind lazily built entries); they are reached with
``fastapi.routing.iter_route_contexts`` where it exists, which also applies the
prefixes and the dependencies of every router on the way. Mounted
sub-applications are entered. Nothing is called: only what FastAPI built
(``route.dependant``) is read, down through sub-dependencies and
``Annotated[..., Depends(...)]`` aliases; the package's session dependencies
are recognised by identity.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fastapi.routing

from ..web.dependencies import SESSION_DEPENDENCIES as _DEPENDENCIES
from .report import SessionUse, Side

#: The package's session dependencies, recognised by identity (after unwrapping
#: ``functools.partial`` and ``functools.wraps`` decorators).
SESSION_DEPENDENCIES: dict[Callable[..., Any], Side] = {
    call: side for call, (side, _) in _DEPENDENCIES.items()
}
#: Read sessions that are not plain replica reads, and what the audit calls them.
READ_KINDS: dict[Callable[..., Any], str] = {
    call: kind for call, (_, kind) in _DEPENDENCIES.items() if kind is not None
}

_iter_route_contexts: Callable[[Sequence[Any]], Iterable[Any]] | None = getattr(
    fastapi.routing, "iter_route_contexts", None
)


def iter_routes(routes: Sequence[Any], prefix: str = "") -> Iterator[Any]:
    """Every route, with included routers expanded and mounted apps entered.

    Yields the route objects themselves, or FastAPI's ``RouteContext`` wrappers,
    which answer ``path``, ``methods``, ``endpoint`` and ``dependant`` the same way
    but with the including routers' prefixes and dependencies applied.
    """
    contexts = _iter_route_contexts(routes) if _iter_route_contexts is not None else routes
    for route in contexts:
        if getattr(route, "dependant", None) is None:
            sub_routes = getattr(route, "routes", None)
            if sub_routes:  # Mount or Host: a sub-application or a plain Router
                yield from iter_routes(sub_routes, prefix + (getattr(route, "path", "") or ""))
                continue
        if prefix:
            yield _Prefixed(route, prefix)
        else:
            yield route


class _Prefixed:
    """A route of a mounted application, seen with the mount path in front."""

    def __init__(self, route: Any, prefix: str) -> None:
        self._route = route
        self.path = prefix + str(getattr(route, "path", ""))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._route, name)


def unwrap(call: Any) -> Any:
    while isinstance(call, functools.partial):
        call = call.func
    try:
        return inspect.unwrap(call)
    except ValueError:  # a __wrapped__ cycle
        return call


def callable_name(call: Any) -> str:
    name = getattr(call, "__qualname__", None) or getattr(call, "__name__", None)
    return str(name) if name else type(call).__qualname__


def qualified_name(call: Any) -> str:
    call = unwrap(call)
    return f"{getattr(call, '__module__', '?')}.{callable_name(call)}"


def session_uses(dependant: Any, via: tuple[str, ...] = ()) -> Iterator[SessionUse]:
    for sub in getattr(dependant, "dependencies", ()):
        call = unwrap(sub.call)
        side = side_of(call)
        if side is not None:
            yield SessionUse(callable_name(call), side, via, READ_KINDS.get(call))
        else:
            yield from session_uses(sub, (*via, callable_name(call)))


def side_of(call: Any) -> Side | None:
    try:
        return SESSION_DEPENDENCIES.get(call)
    except TypeError:  # an unhashable callable object
        return None


def dedupe(uses: Iterable[SessionUse]) -> Iterator[SessionUse]:
    """The same dependency reached the same way twice (a router declares it and the
    endpoint asks for it again) is one session: FastAPI caches it per request."""
    seen: set[SessionUse] = set()
    for use in uses:
        if use not in seen:
            seen.add(use)
            yield use
