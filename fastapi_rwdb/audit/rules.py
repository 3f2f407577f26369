"""The route-decision guide's rules, as checks on one route's sessions."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import fastapi

from .report import Finding, RouteAudit
from .routes import callable_name, session_uses, side_of, unwrap

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAFE_METHODS = frozenset({"GET", "HEAD"})


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


#: From FastAPI 0.118 a yield dependency's teardown runs after the response has been
#: sent; the releases before it (0.106 on) ran it just before the response. There is
#: no feature to look for: 0.121 added ``Depends(..., scope="function")`` to get the
#: old order back, three releases later.
TEARDOWN_AFTER_RESPONSE = tuple(int(p) for p in fastapi.__version__.split(".")[:2]) >= (0, 118)
#: ``Depends(..., scope="function")``: the teardown runs before the response.
DEPENDS_SCOPE = "scope" in inspect.signature(fastapi.Depends).parameters


def late_teardowns(dependant: Any) -> Iterator[Finding]:
    """A yield dependency of the app's own that holds a write session: FastAPI runs its
    teardown after the response has been sent (unless ``scope="function"``), so a
    commit there reaches the client without a read-your-writes token."""
    if not TEARDOWN_AFTER_RESPONSE:
        return
    for sub in getattr(dependant, "dependencies", ()):
        call = unwrap(sub.call)
        if side_of(call) is not None:
            continue
        yields = inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call)
        writes = any(use.side == "write" for use in session_uses(sub))
        if yields and writes and getattr(sub, "scope", None) != "function":
            name = callable_name(call)
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
        yield from late_teardowns(sub)
