"""The route audit: over example_app (clean) and over apps that get it wrong on purpose.

No database is needed: the audit only reads FastAPI's dependency trees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import fastapi.routing
import pytest
from fastapi import APIRouter, Depends, FastAPI, WebSocket
from sqlalchemy.orm import Session

from fastapi_rwdb import (
    AsyncFreshReadSession,
    AsyncPrimaryReadSession,
    AsyncReadSession,
    AsyncWriteSession,
    DBSession,
    FreshReadSession,
    PrimaryReadSession,
    ReadSession,
    WriteSession,
    get_read_db,
)
from fastapi_rwdb.__main__ import main
from fastapi_rwdb.audit import (
    DEPENDS_SCOPE,
    TEARDOWN_AFTER_RESPONSE,
    AuditReport,
    RouteAudit,
    audit,
    audit_app,
)

ROOT = Path(__file__).resolve().parents[2]

# -- deliberately wrong apps ------------------------------------------------------------


def current_user(db: ReadSession) -> str:
    """A typical sub-dependency: looks the caller up, on a replica."""
    return "someone"


def require_admin(user: Annotated[str, Depends(current_user)]) -> str:
    return user


# An alias of the application's own, two levels deep.
Reader = Annotated[Session, Depends(get_read_db)]
Admin = Annotated[str, Depends(require_admin)]

bad_app = FastAPI()


@bad_app.post("/orders")
def create_order(db: ReadSession) -> None: ...


@bad_app.get("/balance")
def balance(db: WriteSession) -> None: ...


@bad_app.post("/comments")
def create_comment(user: Annotated[str, Depends(current_user)]) -> None: ...


@bad_app.delete("/users/{uid}")
def delete_user(uid: int, admin: Admin) -> None: ...


@bad_app.patch("/aliased")
def patch_aliased(db: Reader) -> None: ...


@bad_app.put("/mixed")
def put_mixed(r: ReadSession, w: WriteSession) -> None: ...


@bad_app.post("/async/orders")
async def create_order_async(db: AsyncReadSession) -> None: ...


@bad_app.post("/async/fine")
async def create_fine_async(db: AsyncWriteSession, user: Admin) -> None: ...


@bad_app.get("/legacy")
def legacy(db: DBSession) -> None: ...


@bad_app.post("/no-db")
def no_db() -> None: ...


@bad_app.websocket("/ws")
async def ws(websocket: WebSocket, db: ReadSession) -> None: ...


# Included routers: in FastAPI >= 0.165 these routes are not in bad_app.routes at all.
inner = APIRouter(prefix="/things")


@inner.post("")
def create_thing(db: ReadSession) -> None: ...


@inner.get("/{tid}")
def get_thing(tid: int, db: ReadSession) -> None: ...


locked = APIRouter(prefix="/locked", dependencies=[Depends(current_user)])


@locked.post("/rename")
def rename() -> None: ...


v1 = APIRouter()
v1.include_router(inner)
v1.include_router(locked)
bad_app.include_router(v1, prefix="/api/v1")

# A mounted sub-application.
sub_app = FastAPI()


@sub_app.post("/import")
def import_rows(db: ReadSession) -> None: ...


bad_app.mount("/sub", sub_app)

# Application-wide dependencies reach every route.
app_level = FastAPI(dependencies=[Depends(current_user)])


@app_level.post("/save")
def save(db: WriteSession) -> None: ...


@app_level.put("/only-read")
def only_read() -> None: ...


not_an_app = 42


def by_route(report: AuditReport) -> dict[str, RouteAudit]:
    return {r.label: r for r in report.routes}


def codes(route: RouteAudit) -> list[tuple[str, str]]:
    return [(f.level, f.code) for f in route.findings]


# -- example_app -------------------------------------------------------------------------

EXAMPLE_ROUTES = {
    "GET /trackers": ("read", "get_read_db"),
    "GET /trackers/search": ("read", "get_read_db"),
    "GET /trackers/{tracker_id}": ("read", "get_read_db"),
    "GET /trackers/{tracker_id}/locations": ("read", "get_read_db"),
    "POST /trackers": ("write", "get_write_db"),
    "PATCH /trackers/{tracker_id}": ("write", "get_write_db"),
    "DELETE /trackers/{tracker_id}": ("write", "get_write_db"),
    "POST /trackers/{tracker_id}/locations": ("write", "get_write_db"),
    "GET /async/trackers": ("read", "get_async_read_db"),
    "GET /async/trackers/{tracker_id}": ("read", "get_async_read_db"),
    "POST /async/trackers": ("write", "get_async_write_db"),
    "POST /async/trackers/{tracker_id}/locations": ("write", "get_async_write_db"),
    "GET /health/database": ("read", "get_read_db"),
}


def test_example_app_is_clean() -> None:
    report = audit("example_app.main:app")
    assert report.errors == 0
    assert report.exit_code() == 0
    routes = by_route(report)
    for label, (side, dependency) in EXAMPLE_ROUTES.items():
        assert label in routes, f"{label} not found by the audit"
        route = routes[label]
        assert route.sides == (side,), label
        assert [u.label for u in route.uses] == [dependency], label
        assert route.findings == (), label
    assert routes["GET /trackers"].endpoint == "example_app.trackers.list_trackers"


def test_cli_in_a_subprocess_on_example_app() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastapi_rwdb", "audit", "example_app.main:app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("fastapi-rwdb audit of example_app.main:app:")
    assert "0 errors" in lines[0]
    header = next(line for line in lines if line.startswith("METHOD"))
    assert header.split() == ["METHOD", "PATH", "SIDE", "SESSION", "DEPENDENCIES", "CHECK"]
    assert any(line.split()[:3] == ["POST", "/trackers", "write"] for line in lines)
    assert any(line.split()[:3] == ["GET", "/health/database", "read"] for line in lines)


# -- the rules ---------------------------------------------------------------------------


def test_unsafe_method_with_only_a_read_session_is_an_error() -> None:
    routes = by_route(audit_app(bad_app))
    assert codes(routes["POST /orders"]) == [("error", "write-method-read-session")]
    assert codes(routes["POST /async/orders"]) == [("error", "write-method-read-session")]
    message = routes["POST /orders"].findings[0].message
    assert "WriteSession" in message and "--ignore 'POST /orders'" in message


def test_get_with_a_write_session_is_a_note() -> None:
    routes = by_route(audit_app(bad_app))
    assert codes(routes["GET /balance"]) == [("note", "read-method-write-session")]
    assert "absolutely current" in routes["GET /balance"].findings[0].message
    # get_db is the write side too, as it always was.
    assert routes["GET /legacy"].sides == ("write",)
    assert codes(routes["GET /legacy"]) == [("note", "read-method-write-session")]


def test_nested_dependency_with_a_read_session_inside_a_post() -> None:
    routes = by_route(audit_app(bad_app))
    comment = routes["POST /comments"]
    assert [(u.dependency, u.via) for u in comment.uses] == [("get_read_db", ("current_user",))]
    assert codes(comment) == [("error", "write-method-read-session")]
    deep = routes["DELETE /users/{uid}"]
    assert [u.label for u in deep.uses] == ["require_admin > current_user > get_read_db"]
    assert codes(deep) == [("error", "write-method-read-session")]


def test_annotated_alias_of_your_own() -> None:
    aliased = by_route(audit_app(bad_app))["PATCH /aliased"]
    assert [u.label for u in aliased.uses] == ["get_read_db"]
    assert codes(aliased) == [("error", "write-method-read-session")]


def test_both_sides_is_a_note_and_a_write_with_a_nested_read_too() -> None:
    routes = by_route(audit_app(bad_app))
    assert codes(routes["PUT /mixed"]) == [("note", "read-and-write-sessions")]
    fine = routes["POST /async/fine"]
    assert fine.sides == ("read", "write")
    assert codes(fine) == [("note", "read-and-write-sessions")]


def test_routes_without_sessions_and_websockets_are_listed_not_flagged() -> None:
    routes = by_route(audit_app(bad_app))
    assert routes["POST /no-db"].uses == () and routes["POST /no-db"].findings == ()
    assert routes["WEBSOCKET /ws"].sides == ("read",) and routes["WEBSOCKET /ws"].findings == ()
    assert not any(label.startswith("GET /docs") for label in routes)


def test_included_router_with_prefix_is_found_and_flagged() -> None:
    if hasattr(fastapi.routing, "iter_route_contexts"):
        # Why this test exists: walking app.routes naively finds none of these.
        naive = {getattr(r, "path", None) for r in bad_app.routes}
        assert "/api/v1/things" not in naive
    routes = by_route(audit_app(bad_app))
    assert codes(routes["POST /api/v1/things"]) == [("error", "write-method-read-session")]
    assert routes["POST /api/v1/things"].endpoint == f"{__name__}.create_thing"
    assert routes["GET /api/v1/things/{tid}"].findings == ()


def test_router_level_and_app_level_dependencies_count() -> None:
    routes = by_route(audit_app(bad_app))
    rename = routes["POST /api/v1/locked/rename"]
    assert [u.label for u in rename.uses] == ["current_user > get_read_db"]
    assert codes(rename) == [("error", "write-method-read-session")]

    app_routes = by_route(audit_app(app_level))
    assert codes(app_routes["PUT /only-read"]) == [("error", "write-method-read-session")]
    assert app_routes["POST /save"].sides == ("read", "write")


def test_mounted_sub_application() -> None:
    routes = by_route(audit_app(bad_app))
    assert codes(routes["POST /sub/import"]) == [("error", "write-method-read-session")]


def test_error_count_and_exit_status() -> None:
    report = audit_app(bad_app)
    errors = sorted(r.label for r in report.routes if any(f.level == "error" for f in r.findings))
    assert errors == [
        "DELETE /users/{uid}",
        "PATCH /aliased",
        "POST /api/v1/locked/rename",
        "POST /api/v1/things",
        "POST /async/orders",
        "POST /comments",
        "POST /orders",
        "POST /sub/import",
    ]
    assert report.errors == 8 and report.notes == 4
    assert report.exit_code() == 1


# -- command line ------------------------------------------------------------------------


def test_cli_text_output_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "tests.unit.test_audit:bad_app"]) == 1
    out = capsys.readouterr().out
    assert "8 errors, 4 notes" in out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("POST    /orders "))
    assert row.split() == ["POST", "/orders", "read", "get_read_db", "ERROR"]
    assert "error: POST /orders  [write-method-read-session]" in out
    assert "docs/route-decision-guide.md" in out


def test_cli_json_output_parses_and_matches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--json", "tests.unit.test_audit:bad_app"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data == audit_app(bad_app, target="tests.unit.test_audit:bad_app").to_dict()
    assert data["summary"] == {"routes": 15, "errors": 8, "notes": 4, "ignored": 0}
    orders = next(r for r in data["routes"] if r["path"] == "/orders")
    assert orders["methods"] == ["POST"] and orders["sides"] == ["read"]
    assert orders["sessions"] == [{"dependency": "get_read_db", "side": "read", "via": []}]
    assert orders["findings"][0]["level"] == "error"


def test_cli_json_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastapi_rwdb", "audit", "--json", "tests.unit.test_audit:bad_app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["summary"]["errors"] == 8


def test_ignore_and_strict(capsys: pytest.CaptureFixture[str]) -> None:
    ignore = ["--ignore", "POST /*orders", "--ignore", "* /api/*", "--ignore", "POST /sub/*"]
    ignore += ["--ignore", "POST /comments", "--ignore", "DELETE *", "--ignore", "PATCH *"]
    assert main(["audit", *ignore, "tests.unit.test_audit:bad_app"]) == 0
    assert "8 ignored" in capsys.readouterr().out
    assert main(["audit", "--strict", *ignore, "tests.unit.test_audit:bad_app"]) == 1


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_anywhere:app", "no module named 'no_such_module_anywhere'"),
        ("tests.unit.test_audit:missing", "has no attribute 'missing'"),
        ("tests.unit.test_audit:not_an_app", "not a FastAPI app or router"),
        ("not a module", "expected MODULE:APP"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], target: str, message: str) -> None:
    assert main(["audit", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastapi-rwdb audit: error:") and message in err


def test_no_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "audit" in capsys.readouterr().err


def test_a_yield_dependency_that_may_commit_after_the_response_is_a_note() -> None:
    app = FastAPI()

    def audit_trail(db: WriteSession) -> Iterator[None]:
        yield
        db.commit()  # after the response: no token for the client

    @app.post("/late", dependencies=[Depends(audit_trail)])
    def late() -> None: ...

    routes = by_route(audit_app(app))
    if not TEARDOWN_AFTER_RESPONSE:  # FastAPI before 0.118: the teardown came first
        assert ("note", "teardown-after-response") not in codes(routes["POST /late"])
        return
    assert ("note", "teardown-after-response") in codes(routes["POST /late"])
    advice = routes["POST /late"].findings[-1].message
    if not DEPENDS_SCOPE:  # FastAPI 0.118 to 0.120: nothing to declare instead
        assert "Commit before returning." in advice and "scope=" not in advice
        return
    assert "scope='function'" in advice

    @app.post("/early", dependencies=[Depends(audit_trail, scope="function")])  # type: ignore[call-arg,unused-ignore]
    def early() -> None: ...

    routes = by_route(audit_app(app))
    assert ("note", "teardown-after-response") not in codes(routes["POST /early"])


# -- fresh and primary reads ------------------------------------------------------------------

kinds_app = FastAPI()


@kinds_app.get("/report")
def report(db: FreshReadSession) -> None: ...


@kinds_app.get("/async/report")
async def report_async(db: AsyncFreshReadSession) -> None: ...


@kinds_app.get("/balance")
def primary_balance(db: PrimaryReadSession) -> None: ...


@kinds_app.get("/async/balance")
async def primary_balance_async(db: AsyncPrimaryReadSession) -> None: ...


@kinds_app.post("/reports")
def post_with_a_fresh_read(db: FreshReadSession) -> None: ...


def test_fresh_and_primary_reads_are_reads_and_say_what_they_are() -> None:
    report = audit_app(kinds_app, target="kinds")
    routes = by_route(report)
    for label, kind in [
        ("GET /report", "fresh"),
        ("GET /async/report", "fresh"),
        ("GET /balance", "primary"),
        ("GET /async/balance", "primary"),
    ]:
        assert routes[label].sides == ("read",), label
        assert codes(routes[label]) == [], label  # a GET on a read session: fine
        assert [u.kind for u in routes[label].uses] == [kind], label
    # A POST with only a fresh read still cannot write.
    assert codes(routes["POST /reports"]) == [("error", "write-method-read-session")]
    text_out = report.to_text()
    assert "get_fresh_read_db [fresh]" in text_out
    assert "get_primary_read_db [primary]" in text_out
    assert "[fresh]: a read session that sees every write committed anywhere" in text_out
    assert "[primary]: a read-only session on the primary" in text_out
    sessions = report.to_dict()["routes"][0]["sessions"]
    assert sessions == [
        {"dependency": "get_fresh_read_db", "side": "read", "via": [], "kind": "fresh"}
    ]
