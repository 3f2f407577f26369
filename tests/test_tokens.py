"""Token signing, the middleware's parsing and LSN text: pure logic, no database."""

from __future__ import annotations

import time

import pytest

from fastapi_rwdb.lsn import format_lsn, parse_lsn
from fastapi_rwdb.middleware import _cookie_values
from fastapi_rwdb.tokens import MAX_LENGTH, Token, TokenSigner

from .forgery import wrong_signature

KEY = b"k" * 32
signer = TokenSigner(KEY)
NOW = 1_900_000_000.0


def test_round_trip() -> None:
    token = Token(lsn=0x16B374D848, expires=int(NOW) + 30)
    assert signer.load(signer.dump(token), max_age=30, now=NOW) == token


def good() -> str:
    return signer.dump(Token(lsn=123456, expires=int(NOW) + 30))


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "garbage",
        "....",
        "1.zz.123.sig",
        wrong_signature(good()),  # wrong signature
        good().replace("1e240", "1e241"),  # LSN changed, signature kept
        "1" + good()[1:],  # another version (1: HMAC-SHA256)
        "9" + good()[1:],  # unknown version
        good() + "x" * MAX_LENGTH,  # oversized
        TokenSigner(b"another-apps-key-0123456789").dump(Token(123456, int(NOW) + 30)),
        signer.dump(Token(123456, int(NOW) - 1)),  # expired
        signer.dump(Token(123456, int(NOW) + 3600)),  # further out than we ever issue
        "\x00\xff\u00e9.\x01.\x02.\x03",
    ],
)
def test_anything_not_ours_intact_and_current_is_ignored(raw: str | None) -> None:
    assert signer.load(raw, max_age=30, now=NOW) is None


def test_default_now_is_the_clock() -> None:
    raw = signer.dump(Token(1, int(time.time()) + 10))
    loaded = signer.load(raw, max_age=30)
    assert loaded is not None and loaded.lsn == 1
    assert signer.load(signer.dump(Token(1, int(time.time()) - 5)), max_age=30) is None


def test_keys_longer_than_blake2b_takes_still_sign_and_differ() -> None:
    long_key = b"x" * 64 + b"tail-that-must-count"
    token = Token(lsn=7, expires=int(NOW) + 30)
    raw = TokenSigner(long_key).dump(token)
    assert TokenSigner(long_key).load(raw, max_age=30, now=NOW) == token
    assert TokenSigner(b"x" * 64).load(raw, max_age=30, now=NOW) is None


def test_repr_hides_the_key() -> None:
    assert "k" * 8 not in repr(signer)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (b"rwdb_pin=abc", [b"abc"]),
        (b"a=1; rwdb_pin=abc; b=2", [b"abc"]),
        (b'rwdb_pin="abc"', [b"abc"]),
        (b"rwdb_pinx=abc", []),
        (b";;;=;rwdb_pin", []),
        (b"\xff\xfe; rwdb_pin=\xff", [b"\xff"]),
        (b"rwdb_pin=old; x=1; rwdb_pin=new", [b"old", b"new"]),
    ],
)
def test_cookie_parsing_tolerates_garbage(header: bytes, value: list[bytes]) -> None:
    assert _cookie_values(header, b"rwdb_pin") == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/5031C28", 0x5031C28),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
        (None, None),
    ],
)
def test_lsn_text_parses_as_postgres_orders_it(text: str | None, value: int | None) -> None:
    assert parse_lsn(text) == value
    if value is not None:
        assert format_lsn(value) == text
