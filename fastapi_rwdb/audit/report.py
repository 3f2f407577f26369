"""The audit's findings, route by route, and how they are printed."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Side = Literal["read", "write"]
Level = Literal["error", "note"]

GUIDE = "docs/route-decision-guide.md"
KIND_MEANINGS = {
    "fresh": "a read session that sees every write committed anywhere before its first "
    "read (a replica that has replayed the primary's current position, else the primary)",
    "primary": "a read-only session on the primary (its own pool, never a write connection)",
}


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
