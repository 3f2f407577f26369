"""Which database session each route of an application uses, checked against the
route-decision guide (``docs/route-decision-guide.md``).

Nothing is called and nothing connects: the audit reads the dependency tree
FastAPI built for every route (``route.dependant``), down through
sub-dependencies, ``Annotated[..., Depends(...)]`` aliases and the dependencies
of routers and of the app, and recognises this package's session dependencies
by identity. A dependency of your own that wraps ``get_read_db`` is seen through;
one that opens a session by itself (``get_read_db_context()`` inside an
endpoint) is not, since that is ordinary code and not a declared dependency.

Every route is found, included routers and mounted apps too (:mod:`.routes`);
the rules are in :mod:`.rules`, the report in :mod:`.report`. Use it from the
command line (``python -m fastapi_rwdb audit MODULE:APP``) or call
:func:`audit_app`.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .report import GUIDE, AuditReport, Finding, RouteAudit, SessionUse
from .routes import dedupe, iter_routes, qualified_name, session_uses
from .rules import DEPENDS_SCOPE, TEARDOWN_AFTER_RESPONSE, check_route, late_teardowns

__all__ = [
    "DEPENDS_SCOPE",
    "GUIDE",
    "TEARDOWN_AFTER_RESPONSE",
    "AuditReport",
    "AuditUsageError",
    "Finding",
    "RouteAudit",
    "SessionUse",
    "audit",
    "audit_app",
    "check_route",
    "load_app",
]


class AuditUsageError(Exception):
    """The audit could not start: the target cannot be imported or is not an app."""


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
    for route in iter_routes(getattr(app, "routes", ())):
        dependant = getattr(route, "dependant", None)
        if dependant is None and not include_plain:
            continue
        uses = tuple(dedupe(session_uses(dependant))) if dependant is not None else ()
        endpoint = getattr(route, "endpoint", None)
        audited = RouteAudit(
            path=str(route.path),
            methods=tuple(sorted(getattr(route, "methods", None) or ())),
            name=str(getattr(route, "name", "") or ""),
            endpoint=qualified_name(endpoint) if endpoint is not None else "",
            uses=uses,
        )
        findings = check_route(audited)
        if dependant is not None:
            findings += tuple(late_teardowns(dependant))
        if findings and _ignored(audited, ignore):
            findings = tuple(replace(f, ignored=True) for f in findings)
        routes.append(replace(audited, findings=findings))
    return AuditReport(target=target, routes=tuple(routes))


def audit(target: str, *, ignore: Sequence[str] = ()) -> AuditReport:
    """Import ``MODULE:ATTR`` and audit it; raises :class:`AuditUsageError`."""
    return audit_app(load_app(target), target=target, ignore=ignore)


def _ignored(route: RouteAudit, patterns: Sequence[str]) -> bool:
    names = [f"{m} {route.path}" for m in route.methods] or [f"WEBSOCKET {route.path}"]
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


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
