"""The read-your-writes token: a WAL position and an expiry, signed with HMAC-SHA256.

Format: ``1.<lsn in hex>.<expiry, unix seconds>.<signature, base64url>``. The
token is not secret (an LSN says little), but it must not be forgeable: a
client that could mint tokens could pin itself, or everyone, to the primary.
Anything that does not verify is treated as if no token had been sent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

VERSION = "1"
MAX_LENGTH = 128  # a real token is about 70 characters


@dataclass(frozen=True, slots=True)
class Token:
    lsn: int  # 0 in time-window mode
    expires: int  # unix seconds


class TokenSigner:
    def __init__(self, key: bytes) -> None:
        # Keyed once; each signature copies it. (OpenSSL 3 looks the algorithm up
        # again on every one-shot call, which costs more than the MAC itself.)
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "<TokenSigner>"

    def _sign(self, body: str) -> str:
        mac = self._keyed.copy()
        mac.update(body.encode())
        digest = mac.digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def dump(self, token: Token) -> str:
        body = f"{VERSION}.{token.lsn:x}.{token.expires}"
        return f"{body}.{self._sign(body)}"

    def load(self, raw: str | None, max_age: float, now: float | None = None) -> Token | None:
        """The token in ``raw`` if it is ours, intact and unexpired; else ``None``.

        ``max_age`` rejects expiries further out than any token we issue.
        """
        if not raw or len(raw) > MAX_LENGTH:
            return None
        body, _, signature = raw.rpartition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return None
        version, _, rest = body.partition(".")
        lsn_hex, _, expires = rest.partition(".")
        if version != VERSION:
            return None
        try:
            token = Token(lsn=int(lsn_hex, 16), expires=int(expires))
        except ValueError:
            return None
        now = time.time() if now is None else now
        if not now < token.expires <= now + max_age + 1:
            return None
        return token
