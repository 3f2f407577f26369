"""Which database session each route of an application uses, checked against the
route-decision guide (``docs/route-decision-guide.md``).

Nothing is called and nothing connects: the audit reads the dependency tree
FastAPI built for every route (``route.dependant``), down through
sub-dependencies, ``Annotated[..., Depends(...)]`` aliases and the dependencies
of routers and of the app, and recognises this package's session dependencies
by identity. A dependency of your own that wraps ``get_read_db`` is seen through;
one that opens a session by itself (``get_read_db_context()`` inside an
endpoint) is not, since that is ordinary code and not a declared dependency.

Routes of included routers are not all in ``app.routes`` in recent FastAPI
(0.165 keeps them behind lazily built entries); they are reached with
``fastapi.routing.iter_route_contexts``, which also applies the prefixes and the
dependencies of every router on the way. Mounted sub-applications are visited
too. Use it from the command line (``python -m fastapi_rwdb audit MODULE:APP``)
or call :func:`audit_app`.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import json
import textwrap
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import fastapi
import fastapi.routing

from .dependencies import (
    get_async_db,
    get_async_fresh_read_db,
    get_async_primary_read_db,
    get_async_read_db,
    get_async_write_db,
    get_db,
    get_fresh_read_db,
    get_primary_read_db,
    get_read_db,
    get_write_db,
)

Side = Literal["read", "write"]
Level = Literal["error", "note"]

#: The package's session dependencies, recognised by identity (after unwrapping
#: ``functools.partial`` and ``functools.wraps`` decorators).
SESSION_DEPENDENCIES: dict[Callable[..., Any], Side] = {
    get_write_db: "write",
    get_db: "write",
    get_async_write_db: "write",
    get_async_db: "write",
    get_read_db: "read",
    get_async_read_db: "read",
    get_fresh_read_db: "read",
    get_async_fresh_read_db: "read",
    get_primary_read_db: "read",
    get_async_primary_read_db: "read",
}
#: Read sessions that are not plain replica reads, and what the audit calls them.
READ_KINDS: dict[Callable[..., Any], str] = {
    get_fresh_read_db: "fresh",
    get_async_fresh_read_db: "fresh",
    get_primary_read_db: "primary",
    get_async_primary_read_db: "primary",
}
KIND_MEANINGS = {
    "fresh": "a read session that sees every write committed anywhere before its first "
    "read (a replica that has replayed the primary's current position, else the primary)",
    "primary": "a read-only session on the primary (its own pool, never a write connection)",
}

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAFE_METHODS = frozenset({"GET", "HEAD"})
GUIDE = "docs/route-decision-guide.md"

_iter_route_contexts: Callable[[Sequence[Any]], Iterable[Any]] | None = getattr(
    fastapi.routing, "iter_route_contexts", None
)


class AuditUsageError(Exception):
    """The audit could not start: the target cannot be imported or is not an app."""


@dataclass(frozen=True, slots=True)
class SessionUse:
    """One session dependency of a route, and the dependencies it is reached through."""

    dependency: str
    side: Side
    via: tuple[str, ...] = ()  # outermost first; empty when the route asks for it directly
    kind: str | None = None  # "fresh" or "primary" for those read sessions (READ_KINDS)

    @property
    def label(self) -> str:
        label = " > ".join((*self.via, self.dependency))
        return f"{label} [{self.kind}]" if self.kind else label


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    code: str
    message: str
    ignored: bool = False  # matched an --ignore pattern: shown, never fails the audit


@dataclass(frozen=True, slots=True)
class RouteAudit:
    path: str
    methods: tuple[str, ...]  # empty for websockets
    name: str
    endpoint: str
    uses: tuple[SessionUse, ...]
    findings: tuple[Finding, ...] = ()

    @property
    def sides(self) -> tuple[Side, ...]:
        present = {use.side for use in self.uses}
        return tuple(side for side in ("read", "write") if side in present)

    @property
    def label(self) -> str:
        return f"{','.join(self.methods) or 'WEBSOCKET'} {self.path}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "path": self.path,
            "name": self.name,
            "endpoint": self.endpoint,
            "sides": list(self.sides),
            "sessions": [
                {"dependency": u.dependency, "side": u.side, "via": list(u.via)}
                | ({"kind": u.kind} if u.kind else {})
                for u in self.uses
            ],
            "findings": [
                {"level": f.level, "code": f.code, "message": f.message, "ignored": f.ignored}
                for f in self.findings
            ],
        }


@dataclass(frozen=True, slots=True)
class AuditReport:
    target: str
    routes: tuple[RouteAudit, ...] = field(default_factory=tuple)

    def _count(self, level: Level) -> int:
        return sum(1 for r in self.routes for f in r.findings if f.level == level and not f.ignored)

    @property
    def errors(self) -> int:
        return self._count("error")

    @property
    def notes(self) -> int:
        return self._count("note")

    @property
    def ignored(self) -> int:
        return sum(1 for r in self.routes for f in r.findings if f.ignored)

    def exit_code(self, *, strict: bool = False) -> int:
        """1 when something must be fixed (with ``strict``, notes too), else 0."""
        return 1 if self.errors or (strict and self.notes) else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.target,
            "summary": {
                "routes": len(self.routes),
                "errors": self.errors,
                "notes": self.notes,
                "ignored": self.ignored,
            },
            "guide": GUIDE,
            "routes": [r.to_dict() for r in self.routes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self, width: int = 100) -> str:
        return "\n".join(_text_lines(self, width))


# -- walking the app ---------------------------------------------------------------------


def audit_app(
    app: Any, *, target: str = "app", ignore: Sequence[str] = (), include_plain: bool = False
) -> AuditReport:
    """Audit a FastAPI app (or an ``APIRouter``, or anything with ``.routes``).

    ``ignore`` holds ``fnmatch`` patterns matched against ``"METHOD /path"``; the
    findings of a matching route are kept but marked ignored. Routes that use no
    session are listed too; routes without a dependency tree (the docs pages,
    static files) only with ``include_plain``.
    """
    routes = []
    for route in _iter_routes(getattr(app, "routes", ())):
        dependant = getattr(route, "dependant", None)
        if dependant is None and not include_plain:
            continue
        uses = tuple(_dedupe(_session_uses(dependant))) if dependant is not None else ()
        endpoint = getattr(route, "endpoint", None)
        audited = RouteAudit(
            path=str(route.path),
            methods=tuple(sorted(getattr(route, "methods", None) or ())),
            name=str(getattr(route, "name", "") or ""),
            endpoint=_qualified_name(endpoint) if endpoint is not None else "",
            uses=uses,
        )
        findings = check_route(audited)
        if dependant is not None:
            findings += tuple(_late_teardowns(dependant))
        if findings and _ignored(audited, ignore):
            findings = tuple(replace(f, ignored=True) for f in findings)
        routes.append(replace(audited, findings=findings))
    return AuditReport(target=target, routes=tuple(routes))


def audit(target: str, *, ignore: Sequence[str] = ()) -> AuditReport:
    """Import ``MODULE:ATTR`` and audit it; raises :class:`AuditUsageError`."""
    return audit_app(load_app(target), target=target, ignore=ignore)


def _iter_routes(routes: Sequence[Any], prefix: str = "") -> Iterator[Any]:
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
                yield from _iter_routes(sub_routes, prefix + (getattr(route, "path", "") or ""))
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


def _session_uses(dependant: Any, via: tuple[str, ...] = ()) -> Iterator[SessionUse]:
    for sub in getattr(dependant, "dependencies", ()):
        call = _unwrap(sub.call)
        side = _side(call)
        if side is not None:
            yield SessionUse(_callable_name(call), side, via, READ_KINDS.get(call))
        else:
            yield from _session_uses(sub, (*via, _callable_name(call)))


#: From FastAPI 0.118 a yield dependency's teardown runs after the response has been
#: sent; the releases before it (0.106 on) ran it just before the response. There is
#: no feature to look for: 0.121 added ``Depends(..., scope="function")`` to get the
#: old order back, three releases later.
TEARDOWN_AFTER_RESPONSE = tuple(int(p) for p in fastapi.__version__.split(".")[:2]) >= (0, 118)
#: ``Depends(..., scope="function")``: the teardown runs before the response.
DEPENDS_SCOPE = "scope" in inspect.signature(fastapi.Depends).parameters


def _late_teardowns(dependant: Any) -> Iterator[Finding]:
    """A yield dependency of the app's own that holds a write session: FastAPI runs its
    teardown after the response has been sent (unless ``scope="function"``), so a
    commit there reaches the client without a read-your-writes token."""
    if not TEARDOWN_AFTER_RESPONSE:
        return
    for sub in getattr(dependant, "dependencies", ()):
        call = _unwrap(sub.call)
        if _side(call) is not None:
            continue
        yields = inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call)
        writes = any(use.side == "write" for use in _session_uses(sub))
        if yields and writes and getattr(sub, "scope", None) != "function":
            name = _callable_name(call)
            yield Finding(
                "note",
                "teardown-after-response",
                f"{name} is a yield dependency holding a write session; its code after "
                "`yield` runs once the response has been sent, so a commit there gives the "
                "client no read-your-writes token (fastapi_rwdb logs a warning when it "
                "happens). Commit before returning"
                + (
                    f", or declare Depends({name}, scope='function') so the teardown runs "
                    "before the response."
                    if DEPENDS_SCOPE
                    else "."
                ),
            )
        yield from _late_teardowns(sub)


def _side(call: Any) -> Side | None:
    try:
        return SESSION_DEPENDENCIES.get(call)
    except TypeError:  # an unhashable callable object
        return None


def _unwrap(call: Any) -> Any:
    while isinstance(call, functools.partial):
        call = call.func
    try:
        return inspect.unwrap(call)
    except ValueError:  # a __wrapped__ cycle
        return call


def _dedupe(uses: Iterable[SessionUse]) -> Iterator[SessionUse]:
    """The same dependency reached the same way twice (a router declares it and the
    endpoint asks for it again) is one session: FastAPI caches it per request."""
    seen: set[SessionUse] = set()
    for use in uses:
        if use not in seen:
            seen.add(use)
            yield use


def _callable_name(call: Any) -> str:
    name = getattr(call, "__qualname__", None) or getattr(call, "__name__", None)
    return str(name) if name else type(call).__qualname__


def _qualified_name(call: Any) -> str:
    call = _unwrap(call)
    return f"{getattr(call, '__module__', '?')}.{_callable_name(call)}"


def _ignored(route: RouteAudit, patterns: Sequence[str]) -> bool:
    names = [f"{m} {route.path}" for m in route.methods] or [f"WEBSOCKET {route.path}"]
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


# -- the rules ---------------------------------------------------------------------------


def check_route(route: RouteAudit) -> tuple[Finding, ...]:
    """The guide's rules, applied to one route's methods and session sides."""
    methods, sides = set(route.methods), set(route.sides)
    unsafe = sorted(methods & UNSAFE_METHODS)
    safe = sorted(methods & SAFE_METHODS)
    findings = []
    if unsafe and sides == {"read"}:
        verb = "/".join(unsafe)
        findings.append(
            Finding(
                "error",
                "write-method-read-session",
                f"{verb} route with read sessions only. {verb} requests change data, and a "
                "read session refuses to (ReadOnlySessionError); its reads may also come "
                "from a replica that lacks the latest writes. Use WriteSession / "
                "AsyncWriteSession (get_write_db / get_async_write_db). If it really only "
                f"reads (a search that takes a body), keep it and pass --ignore '{verb} "
                f"{route.path}'.",
            )
        )
    if safe and "write" in sides:
        verb = "/".join(safe)
        findings.append(
            Finding(
                "note",
                "read-method-write-session",
                f"{verb} route on the primary (it uses a write session). Keep it if the "
                "answer must be absolutely current whatever other clients wrote (money, "
                "stock, SELECT ... FOR UPDATE, advisory locks, nextval()) or if the "
                f"route writes (then it should not be a {verb}: those get retried, "
                "prefetched and cached). Otherwise a read session takes this load off the "
                "primary, and a client's own recent writes still reach it through the "
                "read-your-writes token.",
            )
        )
    if sides == {"read", "write"}:
        findings.append(
            Finding(
                "note",
                "read-and-write-sessions",
                "Uses both a read and a write session. Reads made after this request "
                "commits a write go to the primary anyway; reads made before it may come "
                "from a replica that lacks what others just wrote. Read what you are "
                "about to change, or check before writing, through the write session.",
            )
        )
    return tuple(findings)


# -- loading the app ---------------------------------------------------------------------


def load_app(target: str) -> Any:
    """``"package.module:attr"`` (``:app`` when omitted) to the object; raises
    :class:`AuditUsageError` with a message meant for the command line."""
    module_name, _, attr_path = target.partition(":")
    attr_path = attr_path or "app"
    if not module_name or not all(p.isidentifier() for p in module_name.split(".")):
        raise AuditUsageError(f"expected MODULE:APP (e.g. myproject.main:app), got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise AuditUsageError(
                f"cannot import {module_name!r}: no module named {exc.name!r} "
                "(run from the project's directory, or pass --app-dir)"
            ) from None
        raise AuditUsageError(_import_failed(module_name, exc)) from None
    except Exception as exc:
        raise AuditUsageError(_import_failed(module_name, exc)) from None
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AuditUsageError(f"{module_name!r} has no attribute {attr_path!r}") from None
    if not isinstance(getattr(obj, "routes", None), Sequence):
        raise AuditUsageError(
            f"{target!r} is a {type(obj).__name__}, not a FastAPI app or router (no .routes)"
        )
    return obj


def _import_failed(module_name: str, exc: BaseException) -> str:
    return f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"


# -- text output -------------------------------------------------------------------------


def _text_lines(report: AuditReport, width: int) -> Iterator[str]:
    yield (
        f"fastapi-rwdb audit of {report.target}: {_plural(len(report.routes), 'route')}, "
        f"{_plural(report.errors, 'error')}, {_plural(report.notes, 'note')}"
        + (f", {report.ignored} ignored" if report.ignored else "")
    )
    yield ""
    header = ("METHOD", "PATH", "SIDE", "SESSION DEPENDENCIES", "CHECK")
    rows = [header]
    for r in report.routes:
        live = [f for f in r.findings if not f.ignored]
        check = (
            "ERROR"
            if any(f.level == "error" for f in live)
            else "note"
            if live
            else "ignored"
            if r.findings
            else "ok"
        )
        rows.append(
            (
                ",".join(r.methods) or "WS",
                r.path,
                "+".join(r.sides) or "-",
                ", ".join(u.label for u in r.uses) or "-",
                check,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        padded = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        yield "  ".join([*padded, row[-1]])
    kinds = sorted({u.kind for r in report.routes for u in r.uses if u.kind})
    if kinds:
        yield ""
    for kind in kinds:
        yield from textwrap.wrap(
            f"[{kind}]: {KIND_MEANINGS[kind]}", width=width, subsequent_indent="    "
        )
    flagged = [r for r in report.routes if r.findings]
    if flagged:
        yield ""
    for r in flagged:
        for f in r.findings:
            level = f"{f.level} (ignored)" if f.ignored else f.level
            yield f"{level}: {r.label}  [{f.code}]  {r.endpoint}"
            yield from textwrap.wrap(
                f.message, width=width, initial_indent="    ", subsequent_indent="    "
            )
    if report.errors or report.notes:
        yield ""
        yield f"Which session a route needs, and why: {GUIDE}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
