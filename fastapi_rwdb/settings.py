"""Configuration, read from the environment and ``.env``.

The connection variables keep the names teams already use (``POSTGRES_*``);
everything the package adds lives under ``RWDB_``. Attribute names are
snake_case, and each field is bound to exactly one environment variable so
that an error can name it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL

from .errors import SettingsError
from .settings_values import describe_errors, parse_url, split_keys

logger = logging.getLogger("fastapi_rwdb")

Side = Literal["write", "read"]
Driver = Literal["psycopg", "asyncpg"]
Consistency = Literal["read-your-writes", "session"]
PinMode = Literal["lsn", "window", "off"]
SessionKind = Literal["auto", "sqlalchemy", "sqlmodel"]

# Variables whose values must never be echoed back, not even in an error.
SECRET_VARIABLES = frozenset(
    {
        "POSTGRES_PASSWORD",
        "RWDB_WRITE_URL",
        "RWDB_READ_URL",
        "RWDB_SECRET_KEY",
        "RWDB_SECRET_KEY_FALLBACKS",
        "RWDB_DEBUG_TOKEN",
    }
)


class RWDBSettings(BaseSettings):
    """Everything fastapi_rwdb needs to know, with defaults that are safe behind PgBouncer.

    Build it with no arguments to read the environment (and ``.env`` in the
    working directory), or pass values by attribute name in code and tests.
    A bad value raises :class:`SettingsError` naming the environment variable.
    """

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
        hide_input_in_errors=True,
        # each field's docstring is its description: the configuration reference
        # (docs/configuration.md) is generated from them, so it cannot fall behind
        use_attribute_docstrings=True,
    )

    # --- where the database is (names from the implementation guide) -------------
    server: str = Field("localhost", min_length=1, validation_alias="POSTGRES_SERVER")
    """HAProxy host."""
    write_port: int = Field(5432, ge=1, le=65535, validation_alias="POSTGRES_PORT")
    """Write port (primary)."""
    read_port: int = Field(5433, ge=1, le=65535, validation_alias="POSTGRES_READ_PORT")
    """Read port (replicas)."""
    user: str = Field("postgres", min_length=1, validation_alias="POSTGRES_USER")
    """The app role's user name."""
    password: SecretStr | None = Field(None, validation_alias="POSTGRES_PASSWORD")
    """Required unless both URLs are given; may be empty for trust auth."""
    database: str = Field("postgres", min_length=1, validation_alias="POSTGRES_DB")
    """The database name."""

    # Full URLs, for deployments that hand out DSNs; each one wins over the parts.
    write_url: SecretStr | None = Field(None, validation_alias="RWDB_WRITE_URL")
    """Full URL (`postgresql://user:pw@host:port/db?...`) of this side; it wins over the parts; any
    PostgreSQL driver prefix is replaced by the right one. Percent-encode reserved characters in
    the user name and password (`@` as `%40`): a URL with a bare `@` there, or a port outside
    1-65535, is refused.
    """
    read_url: SecretStr | None = Field(None, validation_alias="RWDB_READ_URL")
    """Full URL (`postgresql://user:pw@host:port/db?...`) of this side; it wins over the parts; any
    PostgreSQL driver prefix is replaced by the right one. Percent-encode reserved characters in
    the user name and password (`@` as `%40`): a URL with a bare `@` there, or a port outside
    1-65535, is refused.
    """

    # --- pools -------------------------------------------------------------------
    pool_size: int = Field(5, ge=1, validation_alias="RWDB_POOL_SIZE")
    """Write pool size (each of sync and async)."""
    max_overflow: int = Field(10, ge=0, validation_alias="RWDB_MAX_OVERFLOW")
    """Connections a pool may open above its size under load; kept open after use, not closed on
    return ([sizing the pools](configuration.md#sizing-the-pools)).
    """
    pool_timeout: float = Field(30.0, gt=0, validation_alias="RWDB_POOL_TIMEOUT")
    """Seconds to wait for a pooled connection."""
    pool_recycle: int = Field(1800, ge=-1, validation_alias="RWDB_POOL_RECYCLE")
    """Seconds; `-1` never."""
    pool_pre_ping: bool = Field(True, validation_alias="RWDB_POOL_PRE_PING")
    """Ping a pooled connection at checkout (the package's own ping: one round trip on either
    driver; when a read checks a token, it carries the replica's replay position).
    """
    # No checkout ping for a connection returned this recently (and whose socket is
    # quiet); a dead one is found by the first statement and retried (orm/reconnect.py).
    ping_skip_ms: int = Field(500, ge=0, le=60_000, validation_alias="RWDB_PING_SKIP_MS")
    """No ping for a connection returned to the pool less than this long ago whose socket shows no
    sign of being closed (as HikariCP's `aliveBypassWindowMs`); a dead one is then found by the
    first statement, which runs again on a new connection when it was its transaction's first.
    `0` pings every checkout. A read that checks a token always pings (the ping carries the
    replica's position and, on psycopg, the read's `BEGIN`).
    """
    # A connection opened above pool_size is kept after use until the pool has not
    # needed it for this long (engine/pool.py), instead of being closed on return.
    pool_idle_seconds: float = Field(60.0, gt=0, validation_alias="RWDB_POOL_IDLE_SECONDS")
    """A connection above the pool size is closed once the pool has not needed that many
    connections for this long (one to two times this).
    """
    # Reads usually outnumber writes, so the read pools are this many times larger.
    read_pool_multiplier: int = Field(2, ge=1, validation_alias="RWDB_READ_POOL_MULTIPLIER")
    """Read pools are this many times the write pools."""
    # Reads that must see the primary (a client's recent write, lag, the read side
    # down, read_session(primary=True)) get a pool of their own, kept small: then no
    # number of them can take the connections writes need.
    primary_read_pool_size: int = Field(3, ge=1, validation_alias="RWDB_PRIMARY_READ_POOL_SIZE")
    """Pool of the reads that must see the primary (a client's recent write, lag, the read side
    down, `read_session(primary=True)`), apart from the write pool so that reads never take a
    write's connection (each of sync and async).
    """
    primary_read_max_overflow: int = Field(
        5, ge=0, validation_alias="RWDB_PRIMARY_READ_MAX_OVERFLOW"
    )
    """Connections the primary-read pool may open above its size."""

    # --- connecting ----------------------------------------------------------------
    connect_timeout: float = Field(5.0, gt=0, validation_alias="RWDB_CONNECT_TIMEOUT")
    """Seconds to wait for a new connection to open."""
    connect_retries: int = Field(3, ge=0, le=20, validation_alias="RWDB_CONNECT_RETRIES")
    """Extra attempts when a connection cannot be opened (refused, reset, server starting)."""
    connect_retry_backoff: float = Field(
        0.1, ge=0, le=30, validation_alias="RWDB_CONNECT_RETRY_BACKOFF"
    )
    """First wait in seconds, doubled each attempt."""
    read_timeout: float = Field(5.0, ge=0, le=3600, validation_alias="RWDB_READ_TIMEOUT")
    """Seconds each statement of a read-side transaction has to answer before it is
    abandoned (the connection discarded; a first statement runs again elsewhere, a
    later one is a 503). A busy replica answers sooner, through a server-side
    statement_timeout derived from it. 0 turns the deadline off. See
    [Deadlines](reliability.md#deadlines)."""
    write_timeout: float = Field(10.0, ge=0, le=3600, validation_alias="RWDB_WRITE_TIMEOUT")
    """Seconds each write-side statement or COMMIT has to answer before it is abandoned
    as a write of unknown outcome (a 503 that says so; never run again). 0 turns it
    off. See [Deadlines](reliability.md#deadlines)."""
    # Prepared statements break behind PgBouncer in transaction mode; only turn
    # them on when both ports reach PostgreSQL directly.
    prepared_statements: bool = Field(False, validation_alias="RWDB_PREPARED_STATEMENTS")
    """Only `true` when both ports reach PostgreSQL without PgBouncer in transaction mode."""
    application_name: str = Field("fastapi-rwdb", validation_alias="RWDB_APPLICATION_NAME")
    """`application_name` the connections report to PostgreSQL."""
    session_class: SessionKind = Field("auto", validation_alias="RWDB_SESSION_CLASS")
    """`auto` (SQLModel's session when SQLModel is installed, else SQLAlchemy's),
    `sqlalchemy` or `sqlmodel`."""

    # --- dead peers (TCP) -----------------------------------------------------------
    # Seconds; libpq's names, both drivers (engine/sockets.py).
    tcp_keepalives: bool = Field(True, validation_alias="RWDB_TCP_KEEPALIVES")
    """TCP keepalive probes on every connection, both drivers, so a host that vanished
    without closing its sockets is noticed in seconds. See
    [dead peers](reliability.md#dead-peers-keepalives-and-tcp_user_timeout)."""
    tcp_keepalives_idle: int = Field(
        10, ge=1, le=32767, validation_alias="RWDB_TCP_KEEPALIVES_IDLE"
    )
    """Seconds a connection is quiet before the first keepalive probe."""
    tcp_keepalives_interval: int = Field(
        3, ge=1, le=32767, validation_alias="RWDB_TCP_KEEPALIVES_INTERVAL"
    )
    """Seconds between unanswered keepalive probes."""
    tcp_keepalives_count: int = Field(3, ge=1, le=127, validation_alias="RWDB_TCP_KEEPALIVES_COUNT")
    """Unanswered keepalive probes before the connection is dropped."""
    tcp_user_timeout: float = Field(20.0, ge=0, le=3600, validation_alias="RWDB_TCP_USER_TIMEOUT")
    """Seconds sent data (a statement, a COMMIT) may stay unacknowledged before the
    kernel drops the connection (`TCP_USER_TIMEOUT`); 0: the kernel's default,
    about 15 minutes of retransmissions."""

    # --- read-your-writes ----------------------------------------------------------
    # lsn: after a write, read from a replica once it has replayed the write's WAL
    # position; window: read from the primary for pin_seconds after a write; off.
    pin_mode: PinMode = Field("lsn", validation_alias="RWDB_PIN_MODE")
    """`lsn`, `window` or `off`."""
    pin_seconds: float = Field(30.0, gt=0, le=86400, validation_alias="RWDB_PIN_SECONDS")
    """Token lifetime and cookie Max-Age; the window in `window` mode."""
    pin_wait_ms: int = Field(0, ge=0, le=10000, validation_alias="RWDB_PIN_WAIT_MS")
    """How long a read may wait for a replica to catch up before using the primary."""
    # read-your-writes: a client never reads older than its own writes. session: nor
    # older than anything it has read (monotonic reads); its token then follows its reads.
    consistency: Consistency = Field("read-your-writes", validation_alias="RWDB_CONSISTENCY")
    """`read-your-writes`, or `session`: also monotonic reads (a client never reads older than
    anything it has read; its token follows its reads).
    """
    # How many replicas the read port can reach. A token is dropped before it expires
    # only when this many replicas (unset: the most this process has seen streaming)
    # have replayed it.
    replicas: int | None = Field(None, ge=0, le=1000, validation_alias="RWDB_REPLICAS")
    """How many replicas the read port can reach; a token is cleared before it expires only when
    that many (unset: the most this process has seen streaming) have replayed it.
    """
    # Signs tokens; shared by every worker that serves the app. When unset, a key
    # is kept in the database (see engine/keystore.py).
    secret_key: SecretStr | None = Field(None, validation_alias="RWDB_SECRET_KEY")
    """Signs tokens; at least 16 characters, the same on every process. Unset: a random
    key generated once and kept in the database (`rwdb_token_key`) ([the signing
    key](guarantees.md#the-signing-key)).
    """
    secret_key_fallbacks: SecretStr | None = Field(
        None, validation_alias="RWDB_SECRET_KEY_FALLBACKS"
    )
    """Former keys that still verify tokens, comma-separated or a JSON list."""
    cookie_name: str = Field(
        "rwdb_pin", pattern=r"^[A-Za-z0-9_.-]{1,64}$", validation_alias="RWDB_COOKIE_NAME"
    )
    """The name of the token cookie."""
    cookie_secure: bool = Field(False, validation_alias="RWDB_COOKIE_SECURE")
    """Set `true` behind HTTPS."""
    token_header: str = Field(
        "X-RWDB-Pin", pattern=r"^[A-Za-z0-9-]{1,64}$", validation_alias="RWDB_TOKEN_HEADER"
    )
    """Request and response header for API clients."""
    routing_header: bool = Field(False, validation_alias="RWDB_ROUTING_HEADER")
    """Adds `X-RWDB-Read: replica` or `primary; reason=...` to responses."""

    # --- when the read side is unwell ----------------------------------------------------
    # After this many failed connects in a row, reads go to the primary ...
    read_fallback_after: int = Field(3, ge=1, validation_alias="RWDB_READ_FALLBACK_AFTER")
    """Refused read connects in a row before reads go to the primary."""
    # ... and the read side is tried again after this many seconds.
    read_retry_seconds: float = Field(5.0, gt=0, validation_alias="RWDB_READ_RETRY_SECONDS")
    """After falling back, the read side is tried again after this many seconds."""
    max_replica_lag: float | None = Field(None, gt=0, validation_alias="RWDB_MAX_REPLICA_LAG")
    """Seconds of replay lag above which a replica serves no reads (checked per connection); unset:
    no lag check.
    """
    replica_bench_seconds: float = Field(
        30.0, ge=0, le=3600, validation_alias="RWDB_REPLICA_BENCH_SECONDS"
    )
    """Seconds a replica that gave no answer within the read deadline is passed over
    (its pooled connections discarded, new ones that reach it closed); 0: never. See
    [the bench](reliability.md#the-bench-a-replica-that-froze-is-passed-over)."""
    lag_check_interval: float = Field(1.0, ge=0.05, validation_alias="RWDB_LAG_CHECK_INTERVAL")
    """Seconds between two looks at the primary's `pg_stat_replication` (one query on the write
    side).
    """

    # --- built-in routes ---------------------------------------------------------------
    debug_routes: bool = Field(False, validation_alias="RWDB_DEBUG_ROUTES")
    """Mounts the debug routes ([checking a deployment](deployment.md))."""
    debug_prefix: str = Field(
        "/debug", pattern=r"^/[A-Za-z0-9_/.-]*[A-Za-z0-9_.-]$", validation_alias="RWDB_DEBUG_PREFIX"
    )
    """Where the debug routes are mounted."""
    debug_token: SecretStr | None = Field(None, validation_alias="RWDB_DEBUG_TOKEN")
    """When set, the debug routes want `Authorization: Bearer <token>`."""

    def __init__(self, **values: Any) -> None:
        # pydantic's own message can quote the offending input, and that input may
        # be a DSN with a password in it. Re-raise as our own error, unchained.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(describe_errors(exc)) from None

    @field_validator("write_url", "read_url")
    @classmethod
    def _check_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_url(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _check_complete(self) -> RWDBSettings:
        missing_for = [side for side in ("write", "read") if self._side_url(side) is None]
        if missing_for and self.password is None:
            raise ValueError(
                "POSTGRES_PASSWORD is not set (needed to connect the "
                f"{' and '.join(missing_for)} side); set it, even to an empty value for "
                "trust authentication, or give RWDB_WRITE_URL and RWDB_READ_URL"
            )
        return self

    @field_validator("secret_key")
    @classmethod
    def _check_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (use a long random string)")
        return value

    @field_validator("secret_key_fallbacks")
    @classmethod
    def _check_fallbacks(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            split_keys(value.get_secret_value())
        return value

    def fallback_keys(self) -> list[str]:
        """``RWDB_SECRET_KEY_FALLBACKS`` as a list, in the order given."""
        if self.secret_key_fallbacks is None:
            return []
        return split_keys(self.secret_key_fallbacks.get_secret_value())

    def _side_url(self, side: Side) -> SecretStr | None:
        return self.write_url if side == "write" else self.read_url

    def url(self, side: Side, driver: Driver) -> URL:
        """The SQLAlchemy URL of one side for one driver (contains the password)."""
        given = self._side_url(side)
        if given is not None:
            return parse_url(given.get_secret_value()).set(drivername=f"postgresql+{driver}")
        return URL.create(
            f"postgresql+{driver}",
            username=self.user,
            password=self.password.get_secret_value() if self.password else None,
            host=self.server,
            port=self.write_port if side == "write" else self.read_port,
            database=self.database,
        )

    def pool_limits(self, pool: Side | Literal["primary_read"]) -> tuple[int, int]:
        """(size, max overflow) of one pool: reads usually outnumber writes, so the
        replicas' pools are ``RWDB_READ_POOL_MULTIPLIER`` times the write pool."""
        if pool == "primary_read":
            return self.primary_read_pool_size, self.primary_read_max_overflow
        factor = self.read_pool_multiplier if pool == "read" else 1
        return self.pool_size * factor, self.max_overflow * factor

    def endpoint(self, side: Side) -> str:
        """``host:port/database`` of one side, safe to log or show."""
        url = self.url(side, "psycopg")
        return f"{url.host}:{url.port or 5432}/{url.database or ''}"

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not what was meant."""
        found = []
        if self.endpoint("write") == self.endpoint("read"):
            found.append(
                f"the write and read sides both point at {self.endpoint('write')}: every "
                "read will go to the same server as the writes (check POSTGRES_READ_PORT)"
            )
        return found
