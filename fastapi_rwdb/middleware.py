"""The read-your-writes middleware: pure ASGI, one object per app.

It reads the client's token (cookie or header), shares a fresh
:class:`~fastapi_rwdb.state.RequestState` with the sessions through a
contextvar, and, as the response starts, hands out a new token if the request
committed a write, or clears the old one once a replica has caught up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .context import request_state
from .database import Database, get_database
from .state import RequestState
from .tokens import Token

logger = logging.getLogger("fastapi_rwdb")


@dataclass
class ReadYourWritesMiddleware:
    app: ASGIApp
    database: Database | None = None
    _cookie: bytes = field(init=False, repr=False)
    _header: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.database = self.database or get_database()
        s = self.database.settings
        self._cookie = s.cookie_name.encode()
        self._header = s.token_header.lower().encode()
        self._signer = self.database.signer
        self._issue = s.pin_mode != "off"
        self._window = s.pin_mode == "window"
        self._pin_seconds = s.pin_seconds
        self._routing_header = s.routing_header
        attrs = f"; Path=/; HttpOnly; SameSite=Lax{'; Secure' if s.cookie_secure else ''}"
        self._set_cookie = f"{s.cookie_name}=%s; Max-Age=%d{attrs}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.database.lifespan_ok:  # type: ignore[union-attr]  # setup()'s lifespan never ran
            self.database.lifespan_missing(scope.get("root_path", ""))  # type: ignore[union-attr]
        state = RequestState(
            token=self._incoming(scope["headers"]) if self._issue else None,
            database=self.database,
        )
        reset = request_state.set(state)

        async def send_with_token(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = self._outgoing(state)
                if extra:
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_token)
        finally:
            request_state.reset(reset)

    def _incoming(self, headers: list[tuple[bytes, bytes]]) -> Token | None:
        raw: bytes | None = None
        for name, value in headers:
            if name == self._header:
                raw = value  # an explicit header wins over the cookie
                break
            if name == b"cookie" and raw is None:
                raw = _cookie_value(value, self._cookie)
        if not raw:
            return None
        token = self._signer.load(raw.decode("latin-1"), max_age=self._pin_seconds)
        if token is None:
            metrics.record_token("rejected")
        return token

    def _outgoing(self, state: RequestState) -> list[tuple[bytes, bytes]]:
        extra: list[tuple[bytes, bytes]] = []
        if state.commit_lsn is not None and self._issue:
            value = self._signer.dump(
                Token(lsn=state.commit_lsn, expires=int(time.time() + self._pin_seconds))
            )
            extra.append((b"set-cookie", (self._set_cookie % (value, self._pin_seconds)).encode()))
            extra.append((self._header, value.encode()))
            metrics.record_token("issued")
        elif (
            state.token is not None
            and not self._window
            and state.replica_caught_up
            and not state.replica_behind
        ):
            # A replica has the client's last write: back to plain replica reads.
            extra.append((b"set-cookie", (self._set_cookie % ("", 0)).encode()))
            extra.append((self._header, b""))
            metrics.record_token("cleared")
        if self._routing_header and state.read_target is not None:
            value = state.read_target
            if state.read_target == "primary":
                value += f"; reason={state.read_reason}"
            extra.append((b"x-rwdb-read", value.encode()))
        return extra


def _cookie_value(header: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in a Cookie header; tolerant of any garbage."""
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            return value.strip(b'"')
    return None
