"""The read-your-writes token: a WAL position and an expiry, signed.

Format: ``2.<lsn in hex>.<expiry, unix seconds>.<signature, base64url>``. The
token is not secret (an LSN says little), but it must not be forgeable: a
client that could mint tokens could pin itself, or everyone, to the primary.
Anything that does not verify is treated as if no token had been sent.

Several keys may verify while only the first signs, so a key can be rotated
without a moment in which the tokens already handed out stop working (as
Django's ``SECRET_KEY_FALLBACKS``).

The signature is keyed BLAKE2b with a 128-bit tag, a MAC by design and cheaper
than HMAC-SHA256 through OpenSSL. A token that verified is remembered (a client
sends the same one until it is cleared), so its next uses cost a dictionary
lookup and the expiry check.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any

VERSION = "2"
MAX_LENGTH = 128  # a real token is about 50 characters
# Exactly what dump() writes: an LSN of at most 16 lowercase hex digits (so
# 0 <= lsn < 2**64, no sign, no underscores, no spaces) and a plain expiry.
_BODY = re.compile(r"2\.([0-9a-f]{1,16})\.([0-9]{1,12})")
# Domain separation: a key derived for tokens is good for nothing else.
_DERIVATION_LABEL = b"fastapi-rwdb read-your-writes token key v1"
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_TAG_BYTES = 16  # 128 bits
_VERIFIED_KEPT = 4096  # tokens remembered as verified, per signer


@dataclass(frozen=True, slots=True)
class Token:
    lsn: int  # 0 in time-window mode
    expires: int  # unix seconds


class TokenSigner:
    """Signs with ``key``; verifies with ``key`` and every one of ``fallbacks``."""

    def __init__(self, key: bytes, *fallbacks: bytes) -> None:
        # BLAKE2b takes keys of up to 64 bytes; a longer secret is hashed down to that.
        self._keys = tuple(
            k if len(k) <= 64 else hashlib.blake2b(k).digest() for k in (key, *fallbacks)
        )
        self._key = self._keys[0]
        # Keyed once: copying a keyed hasher costs half of keying a new one.
        self._verified: dict[str, Token] = {}
        self._hashers = tuple(hashlib.blake2b(key=k, digest_size=_TAG_BYTES) for k in self._keys)

    def __repr__(self) -> str:
        return f"<TokenSigner keys={len(self._keys)}>"

    @staticmethod
    def _mac(body: bytes, keyed: Any) -> bytes:
        """base64url of the 16-byte tag, unpadded (22 characters), from a copy of a
        keyed hasher; base64 straight from binascii, as the base64 module's
        wrappers cost more than the hash."""
        hasher = keyed.copy()
        hasher.update(body)
        return binascii.b2a_base64(hasher.digest(), newline=False)[:22].translate(_URLSAFE)

    def _sign(self, body: str) -> str:
        return self._mac(body.encode(), self._hashers[0]).decode()

    def dump(self, token: Token) -> str:
        body = f"{VERSION}.{token.lsn:x}.{token.expires}"
        return f"{body}.{self._sign(body)}"

    def load(
        self,
        raw: str | None,
        max_age: float,
        now: float | None = None,
        *,
        check_expiry: bool = True,
    ) -> Token | None:
        """The token in ``raw`` if it is ours, intact and unexpired; else ``None``.

        ``max_age`` rejects expiries further out than any token we issue.
        ``check_expiry=False`` returns an expired token all the same (a job run
        after the request may still want the position it holds); the signature,
        the format and the upper bound on the expiry are checked either way.
        """
        token = self._verified.get(raw) if raw else None
        if token is None:
            token = self._verify(raw)
            if token is None:
                return None
        now = time.time() if now is None else now
        if token.expires > now + max_age + 1:
            return None
        if check_expiry and token.expires <= now:
            return None
        return token

    def _verify(self, raw: str | None) -> Token | None:
        if not raw or len(raw) > MAX_LENGTH:
            return None
        body, _, signature = raw.rpartition(".")
        # The format first: it is public, and garbage is turned away without hashing.
        parts = _BODY.fullmatch(body)
        if parts is None:
            return None
        given = signature.encode()
        body_bytes = body.encode()
        # Every key is tried, even after a match: no timing tells which key signed.
        matched = False
        for keyed in self._hashers:
            matched |= hmac.compare_digest(given, self._mac(body_bytes, keyed))
        if not matched:
            return None
        token = Token(lsn=int(parts[1], 16), expires=int(parts[2]))
        # A client sends its token again with every request until it is cleared:
        # remembered, it is not hashed again. Only tokens that verified are kept,
        # their expiry is checked on every use, and the memory is bounded.
        if len(self._verified) >= _VERIFIED_KEPT:
            self._verified.clear()
        self._verified[raw] = token
        return token


def derive_key(user: str, database: str, password: str) -> bytes:
    """A token key every process of a deployment computes alike with no setting,
    the last resort when the key kept in the database cannot be had
    (:mod:`fastapi_rwdb.engine.keystore`).

    Made from what they all share already: the database credentials. The hosts
    are left out, as pods may reach the same database through different
    addresses. scrypt, not a fast hash, because a token is public and its
    signature could otherwise serve to guess a weak password offline; it runs
    once per process. The label keeps the key from equalling any other use of
    the same inputs.
    """
    salt = _DERIVATION_LABEL + b"".join(
        len(part).to_bytes(4, "big") + part for part in (user.encode(), database.encode())
    )
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)


def load_unverified(
    raw: str | None, max_age: float, now: float | None = None, *, check_expiry: bool = True
) -> Token | None:
    """A token taken at its word, for the moments when the key is not known yet
    (see :mod:`fastapi_rwdb.engine.keystore` for why that is safe): the format and
    the bounds on the expiry are checked, the signature cannot be."""
    if not raw or len(raw) > MAX_LENGTH:
        return None
    body, _, signature = raw.rpartition(".")
    parts = _BODY.fullmatch(body)
    if parts is None or len(signature) != 22:
        return None
    token = Token(lsn=int(parts[1], 16), expires=int(parts[2]))
    now = time.time() if now is None else now
    if token.expires > now + max_age + 1 or (check_expiry and token.expires <= now):
        return None
    return token
