"""Token signing, the middleware's parsing and LSN text: pure logic, no database."""

from __future__ import annotations

import time

import pytest

from fastapi_rwdb.routing.lsn import format_lsn, parse_lsn
from fastapi_rwdb.routing.tokens import MAX_LENGTH, Token, TokenSigner, derive_key
from fastapi_rwdb.web.middleware import _cookie_values

from ..forgery import wrong_signature

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


# -- rotation -------------------------------------------------------------------------

OLD, NEW = b"old-key-0123456789abcdef", b"new-key-0123456789abcdef"


def test_the_first_key_signs_and_every_key_verifies() -> None:
    token = Token(lsn=42, expires=int(NOW) + 30)
    rotated = TokenSigner(NEW, OLD)
    from_old = TokenSigner(OLD).dump(token)
    assert rotated.load(from_old, max_age=30, now=NOW) == token  # a fallback verifies
    from_new = rotated.dump(token)
    assert from_new == TokenSigner(NEW).dump(token)  # the first key signs
    assert TokenSigner(OLD).load(from_new, max_age=30, now=NOW) is None
    assert TokenSigner(NEW, OLD, b"third-key-0123456789ab").load(from_new, 30, NOW) == token


def test_a_key_dropped_from_the_fallbacks_no_longer_verifies() -> None:
    token = Token(lsn=42, expires=int(NOW) + 30)
    assert TokenSigner(NEW).load(TokenSigner(OLD).dump(token), max_age=30, now=NOW) is None
    assert (
        TokenSigner(NEW, OLD).load(wrong_signature(TokenSigner(OLD).dump(token)), 30, NOW) is None
    )


def test_repr_hides_every_key() -> None:
    text = repr(TokenSigner(NEW, OLD))
    assert "key-0123" not in text and "2" in text


# -- what a correctly signed token may hold ----------------------------------------------


def signed(body: str) -> str:
    """A body signed with the test key, whatever it holds: what a key holder could mint."""
    return f"{body}.{signer._sign(body)}"


@pytest.mark.parametrize(
    "lsn_text",
    [
        "-1",  # negative
        "-0",
        "10000000000000000",  # 2**64: one past the largest LSN
        "+1",
        " 1",
        "1_0",
        "AB",  # dump() writes lowercase only
        "",
        "0x1",
    ],
)
def test_a_signed_lsn_outside_0_to_2_64_or_not_as_dumped_is_refused(lsn_text: str) -> None:
    assert signer.load(signed(f"2.{lsn_text}.{int(NOW) + 30}"), max_age=30, now=NOW) is None


def test_the_lsn_range_ends_are_accepted() -> None:
    for lsn in (0, 2**64 - 1):
        token = Token(lsn=lsn, expires=int(NOW) + 30)
        assert signer.load(signer.dump(token), max_age=30, now=NOW) == token


@pytest.mark.parametrize("expires", ["-5", "+1900000010", "1_900_000_010", ""])
def test_a_signed_expiry_not_as_dumped_is_refused(expires: str) -> None:
    assert signer.load(signed(f"2.1.{expires}"), max_age=30, now=NOW) is None


# -- check_expiry -----------------------------------------------------------------------


def test_check_expiry_false_returns_an_expired_token() -> None:
    expired = Token(lsn=99, expires=int(NOW) - 3600)
    raw = signer.dump(expired)
    assert signer.load(raw, max_age=30, now=NOW) is None
    assert signer.load(raw, max_age=30, now=NOW, check_expiry=False) == expired


def test_check_expiry_false_still_checks_signature_format_and_upper_bound() -> None:
    expired = signer.dump(Token(lsn=99, expires=int(NOW) - 3600))
    assert signer.load(wrong_signature(expired), 30, NOW, check_expiry=False) is None
    assert signer.load(signed(f"2.-1.{int(NOW) - 5}"), 30, NOW, check_expiry=False) is None
    far = signer.dump(Token(lsn=99, expires=int(NOW) + 3600))
    assert signer.load(far, max_age=30, now=NOW, check_expiry=False) is None


# -- the key derived from the credentials -----------------------------------------------


def test_the_derived_key_depends_on_user_database_and_password_only() -> None:
    base = derive_key("app", "db", "pw")
    assert base == derive_key("app", "db", "pw") and len(base) == 32
    assert (
        len(
            {
                base,
                derive_key("app2", "db", "pw"),
                derive_key("app", "db2", "pw"),
                derive_key("app", "db", "pw2"),
            }
        )
        == 4
    )
    # Length-prefixed: moving characters between the fields changes the key.
    assert derive_key("ab", "c", "pw") != derive_key("a", "bc", "pw")


def test_the_derived_key_is_not_a_plain_hash_of_the_password() -> None:
    import hashlib

    key = derive_key("app", "db", "pw")
    assert key not in (
        hashlib.blake2b(b"pw", digest_size=32).digest(),
        hashlib.sha256(b"pw").digest(),
    )


def test_the_signature_is_keyed_blake2b_in_unpadded_base64url() -> None:
    """The format tokens already handed out carry: they keep verifying."""
    import base64
    import hashlib

    key = b"k" * 32
    body = "2.5a.1900000000"
    digest = hashlib.blake2b(body.encode(), key=key, digest_size=16).digest()
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert TokenSigner(key).dump(Token(lsn=0x5A, expires=1900000000)) == f"{body}.{expected}"


def test_a_token_verified_before_still_expires_and_is_still_bounded() -> None:
    signer = TokenSigner(b"k" * 32)
    now = time.time()
    raw = signer.dump(Token(lsn=7, expires=int(now) + 30))
    assert signer.load(raw, max_age=30, now=now) == Token(lsn=7, expires=int(now) + 30)
    # Seen and verified once; the expiry and the upper bound are checked on every use.
    assert signer.load(raw, max_age=30, now=now + 31) is None
    assert signer.load(raw, max_age=30, now=now + 31, check_expiry=False) is not None
    assert signer.load(raw, max_age=1, now=now - 60) is None


def test_a_forged_token_is_refused_however_often_it_is_sent() -> None:
    signer = TokenSigner(b"k" * 32)
    forged = wrong_signature(signer.dump(Token(lsn=7, expires=int(time.time()) + 30)))
    for _ in range(3):
        assert signer.load(forged, max_age=30) is None
