"""The read-your-writes middleware: pure ASGI, one object per app.

It reads the client's token (cookie or header), shares a fresh
:class:`~fastapi_rwdb.routing.request.RequestState` with the sessions through a
contextvar, and, as the response starts, hands out a new token if the request
committed a write (or, in session consistency, read newer data than its token
says), or clears the old one once every replica has it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..current import get_database
from ..database import Database
from ..observe import metrics
from ..routing.request import RequestState, request_state
from ..routing.tokens import Token, TokenSigner, load_unverified
from ..settings import RWDBSettings

logger = logging.getLogger("fastapi_rwdb")

_REJECTED_LOG_EVERY = 60.0  # seconds
_ERROR_BODY = b"Internal Server Error"


@dataclass
class ReadYourWritesMiddleware:
    app: ASGIApp
    #: The registry to serve; the process-wide one (get_database()) when not given.
    database: Database | None = None
    #: ``database``, resolved once: the hot path neither looks it up nor checks it.
    _database: Database = field(init=False, repr=False)
    _cookie: bytes = field(init=False, repr=False)
    _header: bytes = field(init=False, repr=False)
    _rejected_logged_at: float = field(init=False, repr=False, default=-_REJECTED_LOG_EVERY)

    def __post_init__(self) -> None:
        self.database = self._database = database = self.database or get_database()
        s = database.settings
        self._cookie = s.cookie_name.encode()
        self._header = s.token_header.lower().encode()
        self._keys = database.signing_keys
        self._health = database.health
        self._issue = s.pin_mode != "off"
        self._window = s.pin_mode == "window"
        self._session = s.pin_mode == "lsn" and s.consistency == "session"
        self._pin_seconds = s.pin_seconds
        self._routing_header = s.routing_header
        attrs = f"; Path=/; HttpOnly; SameSite=Lax{'; Secure' if s.cookie_secure else ''}"
        self._set_cookie = f"{s.cookie_name}=%s; Max-Age=%d{attrs}"
        self._cleared = [
            (b"set-cookie", (self._set_cookie % ("", 0)).encode()),
            (self._header, b""),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        database = self._database
        if not database.lifespan_ok:  # setup()'s lifespan never ran
            _warn_lifespan_missing(database, scope.get("root_path", ""))
        token = None
        if self._issue:
            headers = scope["headers"]
            header = self._header
            for name, _ in headers:
                if name == header or name == b"cookie":  # else no token: no call
                    token = self._incoming(headers, await self._signer(issuing=False))
                    break
        state = RequestState(token=token, database=database, scope=scope)
        reset = request_state.set(state)
        # Nothing to add to a response for a request that brought no token and
        # (so far) wrote and read nothing a token would follow: checked first.
        routing_header = self._routing_header

        async def send_with_token(message: Message) -> None:
            if message["type"] == "http.response.start":
                state.response_started = True
                if (
                    state.token is not None
                    or state.commit_lsn is not None
                    or state.seen_lsn is not None
                    or routing_header
                ):
                    extra = self._outgoing(
                        state, await self._signer(issuing=state.commit_lsn is not None)
                    )
                    if extra:
                        message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_token)
        except Exception:
            if state.commit_lsn is not None and not state.response_started:
                # The write is committed, but Starlette's outermost error middleware
                # would send the 500, outside this one, without the token: the client
                # would be told it failed and then not see it. Send that 500 here.
                await send_with_token(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(_ERROR_BODY)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": _ERROR_BODY})
            raise
        finally:
            request_state.reset(reset)

    async def _signer(self, *, issuing: bool) -> TokenSigner | None:
        """The signer once the key is known. While it is not, an attempt to fetch it is
        started (at most one a second); only a response that must carry a new token
        waits for it (bounded, and the write just reached the primary), then ``None``:
        see :mod:`fastapi_rwdb.engine.keystore` for what happens then."""
        signer = self._keys.current()
        if signer is None:
            if issuing:
                return await self._keys.load_async()
            self._keys.load_in_background()
        return signer

    def _incoming(
        self, headers: list[tuple[bytes, bytes]], signer: TokenSigner | None
    ) -> Token | None:
        """The newest valid token among every header and cookie that may carry one.

        A client can hold an old token in one place and a newer one in another
        (an API client that stored a header, a browser with its cookie); the
        newest is the one that protects its latest write. Empty, forged, expired
        and garbled values are ignored, wherever they stand.
        """
        best: Token | None = None
        rejected: str | None = None
        header = self._header
        for name, value in headers:
            if name == header:
                raws = value.split(b",")
            elif name == b"cookie":
                raws = _cookie_values(value, self._cookie)
            else:
                continue
            for raw in raws:
                raw = raw.strip()
                if not raw:
                    continue
                text = raw.decode("latin-1")
                if signer is None:
                    token = load_unverified(text, self._pin_seconds)
                else:
                    token = signer.load(text, max_age=self._pin_seconds)
                if token is None:
                    rejected = text
                elif best is None or (token.lsn, token.expires) > (best.lsn, best.expires):
                    best = token
        if rejected is not None:
            self._reject(rejected, signer)
        return best

    def _reject(self, raw: str, signer: TokenSigner | None) -> None:
        metrics.record_token("rejected")
        if signer is None or signer.load(raw, self._pin_seconds, check_expiry=False) is not None:
            return  # merely expired: routine for API clients that keep a header
        now = time.monotonic()
        if now - self._rejected_logged_at < _REJECTED_LOG_EVERY:
            return
        self._rejected_logged_at = now
        logger.warning(
            "fastapi_rwdb: a read-your-writes token failed its signature check and was ignored "
            "(forged, garbled, or signed with another key). If this repeats for ordinary "
            "clients, the processes serving the app do not share one key: set RWDB_SECRET_KEY "
            "to the same value everywhere (or keep the old one in RWDB_SECRET_KEY_FALLBACKS "
            "while rotating). Logged at most once a minute."
        )

    def _outgoing(
        self, state: RequestState, signer: TokenSigner | None
    ) -> list[tuple[bytes, bytes]]:
        extra: list[tuple[bytes, bytes]] = []
        if self._issue:
            incoming = state.token
            lsn = state.commit_lsn
            if self._session and state.seen_lsn is not None:
                lsn = state.seen_lsn if lsn is None else max(lsn, state.seen_lsn)
            if lsn is not None and (
                state.commit_lsn is not None or incoming is None or lsn > incoming.lsn
            ):
                # A new position to protect; never one older than the client's.
                if incoming is not None and incoming.lsn > lsn:
                    lsn = incoming.lsn
                if signer is None:  # a write is never left without its token
                    signer = self._keys.derived_signer("the database could not be reached")
                value = signer.dump(Token(lsn=lsn, expires=int(time.time() + self._pin_seconds)))
                extra.append(
                    (b"set-cookie", (self._set_cookie % (value, self._pin_seconds)).encode())
                )
                extra.append((self._header, value.encode()))
                metrics.record_token("issued")
            elif (
                incoming is not None
                and not self._window
                and not self._session
                and self._health.all_replayed(incoming.lsn)
                and self._database.stand_in() is None  # a stale replica never catches up
            ):
                # Every replica has the client's last write: back to plain replica reads.
                extra += self._cleared
                metrics.record_token("cleared")
        if self._routing_header and state.read_target is not None:
            value = state.read_target
            if state.read_target == "primary":
                value += f"; reason={state.read_reason}"
            extra.append((b"x-rwdb-read", value.encode()))
        return extra


def _warn_lifespan_missing(database: Database, root_path: str) -> None:
    """Say, once, that requests arrive but setup()'s lifespan never ran, and what to do:
    a mounted app (Starlette sets ``root_path``) needs the outer app to run it; an app
    served directly was started without its lifespan."""
    database.lifespan_ok = True
    logger.warning("fastapi_rwdb: %s", lifespan_missing_message(root_path, database.settings))


def lifespan_missing_message(root_path: str, settings: RWDBSettings) -> str:
    """The warning's text (a function of its own, so that tests render every case)."""
    effects = "its pools will not be disposed of at shutdown"
    if settings.max_replica_lag is not None:
        effects = "no replica-lag watch is running, and " + effects
    if root_path:
        return (
            f"requests are arriving for the app mounted at {root_path}, but the lifespan "
            f"that setup() gave it never ran: {effects}. Starlette runs only the outermost "
            "app's lifespan; run the mounted app's from the outer app's lifespan with "
            "`async with fastapi_rwdb.lifespan(<the mounted app>): yield`."
        )
    return (
        "requests are arriving, but the lifespan that setup() gave this app never ran: "
        f"{effects}. The app is being served without its lifespan (uvicorn's --lifespan "
        "off, or a test transport such as httpx.ASGITransport); serve it with the lifespan "
        "on (in tests: `with TestClient(app):`, or run `app.router.lifespan_context(app)` "
        "around the client)."
    )


def _cookie_values(header: bytes, name: bytes) -> list[bytes]:
    """Every value of cookie ``name`` in a Cookie header; tolerant of any garbage."""
    found = []
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name:
            found.append(value.strip(b'"'))
    return found
