"""Settings parsing: pure logic, no database."""

from __future__ import annotations

import logging
import os

import pytest

from fastapi_rwdb import RWDBSettings, SettingsError
from fastapi_rwdb.engine.factory import connect_args

PASSWORD = "s3cret-Pa55"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    """No inherited variables and no .env file: each test states what it sets."""
    for name in list(os.environ):
        if name.startswith(("POSTGRES_", "RWDB_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_guide_variables_build_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "POSTGRES_SERVER": "haproxy.internal",
        "POSTGRES_PORT": "6000",
        "POSTGRES_READ_PORT": "6001",
        "POSTGRES_USER": "tracker",
        "POSTGRES_PASSWORD": PASSWORD,
        "POSTGRES_DB": "trackerdb",
    }.items():
        monkeypatch.setenv(name, value)
    s = RWDBSettings()
    write, read = s.url("write", "psycopg"), s.url("read", "asyncpg")
    assert (write.drivername, write.host, write.port) == (
        "postgresql+psycopg",
        "haproxy.internal",
        6000,
    )
    assert (read.drivername, read.port, read.database) == ("postgresql+asyncpg", 6001, "trackerdb")
    assert write.username == "tracker" and write.password == PASSWORD
    assert s.endpoint("read") == "haproxy.internal:6001/trackerdb"


def test_dotenv_file_is_read(tmp_path: os.PathLike[str]) -> None:
    with open(os.path.join(tmp_path, ".env"), "w") as f:
        f.write(f"POSTGRES_PASSWORD={PASSWORD}\nPOSTGRES_READ_PORT=7433\nRWDB_POOL_SIZE=9\n")
    s = RWDBSettings()
    assert s.read_port == 7433 and s.pool_size == 9
    assert s.password is not None and s.password.get_secret_value() == PASSWORD


def test_full_urls_win_over_parts_and_get_the_right_driver() -> None:
    s = RWDBSettings(
        write_url=f"postgres://app:{PASSWORD}@primary.db:5432/app?sslmode=require",
        read_url=f"postgresql+psycopg2://app:{PASSWORD}@replicas.db:5433/app",
    )
    w = s.url("write", "asyncpg")
    r = s.url("read", "psycopg")
    assert (w.drivername, w.host, w.query["sslmode"]) == (
        "postgresql+asyncpg",
        "primary.db",
        "require",
    )
    assert (r.drivername, r.host, r.port) == ("postgresql+psycopg", "replicas.db", 5433)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"POSTGRES_PORT": "not-a-port"}, "POSTGRES_PORT"),
        ({"POSTGRES_READ_PORT": "70000"}, "POSTGRES_READ_PORT"),
        ({"POSTGRES_PORT": "0"}, "POSTGRES_PORT"),
        ({"RWDB_POOL_SIZE": "0"}, "RWDB_POOL_SIZE"),
        ({"RWDB_READ_POOL_MULTIPLIER": "half"}, "RWDB_READ_POOL_MULTIPLIER"),
        ({"RWDB_POOL_PRE_PING": "maybe"}, "RWDB_POOL_PRE_PING"),
        ({"RWDB_SESSION_CLASS": "django"}, "RWDB_SESSION_CLASS"),
        ({"RWDB_WRITE_URL": f"mysql://u:{PASSWORD}@h/db"}, "RWDB_WRITE_URL"),
        ({"RWDB_READ_URL": f"::{PASSWORD}::not a url"}, "RWDB_READ_URL"),
    ],
)
def test_bad_value_names_the_variable_and_hides_secrets(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", PASSWORD)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        RWDBSettings()
    message = str(info.value)
    assert named in message
    assert PASSWORD not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_password_is_an_error_naming_it() -> None:
    with pytest.raises(SettingsError, match="POSTGRES_PASSWORD is not set"):
        RWDBSettings()


def test_empty_password_is_allowed_for_trust_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "")
    assert not RWDBSettings().url("write", "psycopg").password


def test_urls_alone_need_no_password() -> None:
    s = RWDBSettings(write_url="postgresql://a:b@h1/db", read_url="postgresql://a:b@h2/db")
    assert s.url("read", "psycopg").host == "h2"


def test_password_never_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", PASSWORD)
    monkeypatch.setenv("RWDB_READ_URL", f"postgresql://u:{PASSWORD}@h:1/d")
    s = RWDBSettings()
    for text in (repr(s), str(s), s.endpoint("read"), str(s.model_dump())):
        assert PASSWORD not in text


def test_same_port_for_both_sides_is_warned_about() -> None:
    s = RWDBSettings(password="x", write_port=5432, read_port=5432)
    assert any("POSTGRES_READ_PORT" in w for w in s.warnings())
    assert RWDBSettings(password="x").warnings() == []


def test_pgbouncer_safe_connect_args_by_default() -> None:
    s = RWDBSettings(password="x")
    assert connect_args("psycopg", s)["prepare_threshold"] is None
    aio = connect_args("asyncpg", s)
    assert aio["statement_cache_size"] == 0 and aio["prepared_statement_cache_size"] == 0
    direct = RWDBSettings(password="x", prepared_statements=True)
    assert "prepare_threshold" not in connect_args("psycopg", direct)
    assert "statement_cache_size" not in connect_args("asyncpg", direct)


def test_engine_repr_and_logs_hide_password(caplog: pytest.LogCaptureFixture) -> None:
    from fastapi_rwdb import Database

    caplog.set_level(logging.DEBUG, logger="fastapi_rwdb")
    db = Database(RWDBSettings(password=PASSWORD))
    engines = db.engines  # built lazily, nothing connects
    assert PASSWORD not in repr(engines.write) + repr(engines.read) + repr(db)
    assert PASSWORD not in caplog.text
    assert engines.read.pool.size() == 2 * engines.write.pool.size()  # type: ignore[attr-defined]
    db.dispose_sync()


def test_suspicious_settings_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    from fastapi_rwdb import Database, configure

    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    db = configure(Database(RWDBSettings(password="x", read_port=5432, pin_mode="off")))
    db.check()
    db.engines  # noqa: B018 - building the engines must not repeat it
    assert caplog.text.count("both point at") == 1
    db.dispose_sync()


# -- token keys -----------------------------------------------------------------------------

OLD_KEY, NEW_KEY = "old-key-0123456789abcdef", "new-key-0123456789abcdef"


def _token_from(settings: RWDBSettings) -> str:
    from fastapi_rwdb import Database
    from fastapi_rwdb.routing.tokens import Token

    return Database(settings).signer.dump(Token(lsn=7, expires=2_000_000_000))


def _accepts(settings: RWDBSettings, raw: str) -> bool:
    from fastapi_rwdb import Database

    signer = Database(settings).signer
    return signer.load(raw, max_age=30, now=2_000_000_000 - 10) is not None


def test_without_a_key_processes_sharing_credentials_share_a_derived_key() -> None:
    # Two pods may reach the same database through different addresses.
    a = RWDBSettings(password=PASSWORD, user="app", database="db", server="10.0.0.1")
    b = RWDBSettings(
        write_url=f"postgresql://app:{PASSWORD}@haproxy-b.internal:6432/db",
        read_url=f"postgresql://app:{PASSWORD}@haproxy-b.internal:6433/db",
    )
    assert _accepts(b, _token_from(a)) and _accepts(a, _token_from(b))


@pytest.mark.parametrize(
    "other",
    [
        {"password": "another-password"},
        {"user": "another_user"},
        {"database": "another_db"},
    ],
)
def test_the_derived_key_changes_with_the_credentials(other: dict[str, str]) -> None:
    base = {"password": PASSWORD, "user": "app", "database": "db"}
    raw = _token_from(RWDBSettings(**base))  # type: ignore[arg-type]
    assert not _accepts(RWDBSettings(**{**base, **other}), raw)  # type: ignore[arg-type]


def test_a_set_key_wins_over_the_derived_one() -> None:
    derived = _token_from(RWDBSettings(password=PASSWORD))
    assert not _accepts(RWDBSettings(password=PASSWORD, secret_key=NEW_KEY), derived)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fallbacks",
    [OLD_KEY, f" {OLD_KEY} ,", f"another-old-key-0123,{OLD_KEY}", f'["{OLD_KEY}"]'],
)
def test_rotation_the_fallbacks_verify_and_the_new_key_signs(
    monkeypatch: pytest.MonkeyPatch, fallbacks: str
) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", PASSWORD)
    monkeypatch.setenv("RWDB_SECRET_KEY", OLD_KEY)
    before = RWDBSettings()
    old_token = _token_from(before)
    monkeypatch.setenv("RWDB_SECRET_KEY", NEW_KEY)
    monkeypatch.setenv("RWDB_SECRET_KEY_FALLBACKS", fallbacks)
    rotated = RWDBSettings()
    assert _accepts(rotated, old_token)
    new_token = _token_from(rotated)
    assert not _accepts(before, new_token)  # signed with the new key, not a fallback
    monkeypatch.delenv("RWDB_SECRET_KEY_FALLBACKS")
    assert not _accepts(RWDBSettings(), old_token)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (f"{OLD_KEY},short", "key 2 must be at least 16"),
        (f'["{OLD_KEY}", 3]', "JSON list of strings"),
        (f'["{PASSWORD}"', "JSON list of strings"),
    ],
)
def test_bad_fallbacks_name_the_variable_and_hide_the_keys(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "x")
    monkeypatch.setenv("RWDB_SECRET_KEY_FALLBACKS", value)
    with pytest.raises(SettingsError) as info:
        RWDBSettings()
    message = str(info.value)
    assert "RWDB_SECRET_KEY_FALLBACKS" in message and says in message
    assert OLD_KEY not in message and PASSWORD not in message


def test_fallback_keys_never_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "x")
    monkeypatch.setenv("RWDB_SECRET_KEY_FALLBACKS", OLD_KEY)
    s = RWDBSettings()
    assert OLD_KEY not in repr(s) + str(s) + str(s.model_dump())
    from fastapi_rwdb import Database

    assert OLD_KEY not in repr(Database(s).signer)


def test_trust_auth_without_a_key_warns_what_a_forged_token_can_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The derived key is a last resort (the database's key out of reach); with an
    empty password it can be guessed, and the warning says what that allows."""
    from fastapi_rwdb import Database

    caplog.set_level(logging.WARNING, logger="fastapi_rwdb")
    Database(RWDBSettings(password="")).signing_keys.derived_signer("test")
    assert "RWDB_SECRET_KEY" in caplog.text and "password guesses" in caplog.text
    assert "can be guessed" in caplog.text and "own reads" in caplog.text
    caplog.clear()
    Database(RWDBSettings(password=PASSWORD)).signing_keys.derived_signer("test")
    assert "RWDB_SECRET_KEY" in caplog.text and "can be guessed" not in caplog.text
    caplog.clear()
    Database(RWDBSettings(password="", secret_key=NEW_KEY)).signer  # type: ignore[arg-type]  # noqa: B018
    assert caplog.text == ""


# -- URLs that would be misread -------------------------------------------------------------


@pytest.mark.parametrize("variable", ["RWDB_WRITE_URL", "RWDB_READ_URL"])
def test_an_unencoded_at_in_the_password_is_refused_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # Parsed as-is, the password's tail would become part of the host, shown everywhere.
    monkeypatch.setenv("POSTGRES_PASSWORD", "x")
    monkeypatch.setenv(variable, "postgresql://rwdb_app:S3cr@3tPW@127.0.0.1:5432/rwdb")
    with pytest.raises(SettingsError) as info:
        RWDBSettings()
    message = str(info.value)
    assert variable in message and "%40" in message and "percent-encode" in message
    assert "S3cr" not in message and "3tPW" not in message


def test_a_percent_encoded_at_is_the_password() -> None:
    s = RWDBSettings(
        write_url="postgresql://rwdb_app:S3cr%403tPW@127.0.0.1:5432/rwdb", password="x"
    )  # type: ignore[arg-type]
    url = s.url("write", "psycopg")
    assert (url.password, url.host) == ("S3cr@3tPW", "127.0.0.1")
    assert "3tPW" not in s.endpoint("write")


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
@pytest.mark.parametrize("variable", ["RWDB_WRITE_URL", "RWDB_READ_URL"])
def test_url_ports_are_range_checked_like_postgres_port(
    monkeypatch: pytest.MonkeyPatch, variable: str, port: str
) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "x")
    monkeypatch.setenv(variable, f"postgresql://u:{PASSWORD}@h:{port}/db")
    with pytest.raises(SettingsError) as info:
        RWDBSettings()
    assert variable in str(info.value) and "1-65535" in str(info.value)
    assert PASSWORD not in str(info.value)
    monkeypatch.setenv("POSTGRES_PORT", port)
    monkeypatch.delenv(variable)
    with pytest.raises(SettingsError, match="POSTGRES_PORT"):
        RWDBSettings()


def test_url_port_ends_are_accepted() -> None:
    for port in (1, 65535):
        s = RWDBSettings(write_url=f"postgresql://u:p@h:{port}/db", password="x")  # type: ignore[arg-type]
        assert s.url("write", "psycopg").port == port


@pytest.mark.parametrize("factory", ["make_engine", "make_async_engine"])
def test_an_engine_from_a_url_needs_no_postgres_password(
    monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    """The URL carries the password: POSTGRES_PASSWORD is for building URLs from parts.
    The package's own settings (pools, timeouts) still come from the environment."""
    import fastapi_rwdb

    monkeypatch.setenv("RWDB_POOL_SIZE", "7")
    engine = getattr(fastapi_rwdb, factory)(f"postgresql://app:{PASSWORD}@db.internal:6000/app")
    sync_engine = getattr(engine, "sync_engine", engine)
    assert sync_engine.pool.size() == 7
    assert sync_engine.url.password == PASSWORD and sync_engine.url.port == 6000
    sync_engine.dispose(close=False)
    monkeypatch.setenv("RWDB_POOL_SIZE", "none")
    with pytest.raises(SettingsError, match="RWDB_POOL_SIZE"):
        getattr(fastapi_rwdb, factory)(f"postgresql://app:{PASSWORD}@db.internal:6000/app")
