"""Command line: ``python -m fastapi_rwdb`` or ``fastapi-rwdb``.

``audit MODULE:APP`` lists every route of an application with the database
sessions it uses and checks them against the route-decision guide. Exit
status: 0 when nothing must change (notes allowed), 1 when a route is wrong,
2 when the audit could not run (bad arguments, the app cannot be imported), so
a CI job can run it as is.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .audit import AuditUsageError, audit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastapi-rwdb",
        description="Tools for applications that use fastapi_rwdb.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    audit_cmd = commands.add_parser(
        "audit",
        help="check which database session each route uses",
        description=(
            "List every route of a FastAPI app with the read/write sessions it uses "
            "(following nested dependencies, Annotated aliases, router and app "
            "dependencies) and flag the ones that go against the route-decision guide. "
            "Importing the app runs its module-level code: set the variables its "
            "settings need (POSTGRES_*), nothing connects to the database. "
            "Exit status: 0 clean or notes only, 1 errors (with --strict: also notes), "
            "2 usage error."
        ),
    )
    audit_cmd.add_argument("target", metavar="MODULE:APP", help="e.g. myproject.main:app")
    audit_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    audit_cmd.add_argument(
        "--strict", action="store_true", help="notes fail the audit too (exit status 1)"
    )
    audit_cmd.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="'METHOD /path'",
        help=(
            "accept the findings of matching routes (shell-style pattern, e.g. "
            "'POST /reports/search' or 'GET /admin/*'); repeatable"
        ),
    )
    audit_cmd.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="directory to import MODULE from (default: the current directory)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    app_dir = os.path.abspath(args.app_dir)
    if app_dir not in sys.path:
        # A console script does not put the current directory on sys.path; python -m does.
        sys.path.insert(0, app_dir)
    try:
        report = audit(args.target, ignore=args.ignore)
    except AuditUsageError as exc:
        print(f"fastapi-rwdb audit: error: {exc}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.to_text())
    return report.exit_code(strict=args.strict)


if __name__ == "__main__":
    raise SystemExit(main())
