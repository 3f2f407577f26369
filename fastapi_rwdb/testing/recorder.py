"""The routing recorder: every read session's routing decision and every token event,
grouped by the request that made it (the ``rwdb_routes`` fixture)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..observe import listeners
from ..routing.request import RequestState, request_state

#: Reasons that mean the client's token (or a fresh read's position) decided the read.
_PINNED_REASONS = frozenset({"lsn-check", "caught-up", "replica-behind", "pinned"})


@dataclass(frozen=True, slots=True)
class ReadDecision:
    """Where one read session went, and why (the reasons of ``X-RWDB-Read``)."""

    target: str  # "replica" or "primary"
    reason: str
    checked_lsn: int | None  # the position the replica had to have replayed, if checked

    @property
    def pinned(self) -> bool:
        """Decided by the client's token (or a fresh read's position), not by default."""
        return self.reason in _PINNED_REASONS


@dataclass(slots=True)
class RecordedRequest:
    """One request's read decisions and token events, in order."""

    method: str
    path: str
    reads: list[ReadDecision] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    @property
    def read_targets(self) -> list[str]:
        return [read.target for read in self.reads]

    @property
    def issued_token(self) -> bool:
        return "issued" in self.tokens

    @property
    def cleared_token(self) -> bool:
        return "cleared" in self.tokens

    @property
    def pinned(self) -> bool:
        return any(read.pinned for read in self.reads)


class RoutingRecorder:
    """Collects routing decisions and token events while installed (the fixture's life).

    Events from code outside a request (scripts, jobs, ``get_read_db_context()``)
    are kept apart, in :attr:`outside`.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.outside = RecordedRequest("", "")
        self._by_state: dict[int, tuple[RequestState, RecordedRequest]] = {}
        self._lock = threading.Lock()

    def _current(self) -> RecordedRequest:
        state = request_state.get()
        scope = state.scope if state is not None else None
        if state is None or not scope:
            return self.outside
        with self._lock:
            found = self._by_state.get(id(state))
            if found is None or found[0] is not state:
                record = RecordedRequest(str(scope.get("method", "")), str(scope.get("path", "")))
                # The state is kept with it, so its id cannot be reused meanwhile.
                self._by_state[id(state)] = (state, record)
                self.requests.append(record)
                return record
            return found[1]

    def on_route(self, target: str, reason: str, checked_lsn: int | None) -> None:
        self._current().reads.append(ReadDecision(target, reason, checked_lsn))

    def on_token(self, event: str) -> None:
        self._current().tokens.append(event)

    def find(self, method: str, path: str) -> list[RecordedRequest]:
        """Every recorded request with this method and path (the path as sent)."""
        return [r for r in self.requests if r.method == method.upper() and r.path == path]

    def last(self, method: str, path: str) -> RecordedRequest:
        """The latest request with this method and path; AssertionError if none was seen."""
        found = self.find(method, path)
        if not found:
            seen = ", ".join(f"{r.method} {r.path}" for r in self.requests) or "none"
            raise AssertionError(
                f"no routing decision or token event recorded for {method.upper()} {path} "
                f"(recorded: {seen}); a request that opens no read session and writes "
                "nothing leaves no record"
            )
        return found[-1]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._by_state.clear()
            self.outside = RecordedRequest("", "")

    @contextmanager
    def installed(self) -> Iterator[RoutingRecorder]:
        remove = listeners.listen(self.on_route, self.on_token)
        try:
            yield self
        finally:
            remove()
