"""Settings values that may hold a secret (a URL with its password, signing keys),
parsed and checked without ever quoting them: pydantic's own messages would echo
the input, so the settings' errors are described here too.
"""

from __future__ import annotations

import json

from pydantic import ValidationError
from sqlalchemy.engine import URL, make_url

_POSTGRES_SCHEMES = ("postgresql", "postgres")


def parse_url(raw: str) -> URL:
    """Parse a PostgreSQL URL; the error never quotes it (it may hold a password)."""
    try:
        url = make_url(raw)
    except Exception:
        # The exception text would quote the URL, password included.
        raise ValueError("is not a valid database URL") from None
    if url.get_backend_name() not in _POSTGRES_SCHEMES:
        raise ValueError(
            f"must be a PostgreSQL URL (postgresql://...), not {url.get_backend_name()}://"
        )
    if not url.host:
        raise ValueError("has no host")
    if "@" in url.host:
        # An '@' in the password, not percent-encoded: the URL splits at the first
        # one, and the rest of the password becomes part of the host (and would be
        # shown wherever the host is). Nothing of the URL is quoted here.
        raise ValueError(
            "has an '@' that is not percent-encoded in its user name or password; "
            "write it as %40 (percent-encode any reserved character: "
            "urllib.parse.quote(password, safe=''))"
        )
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError("has a port outside 1-65535")
    return url


def split_keys(raw: str) -> list[str]:
    """Keys given as ``a,b`` or as a JSON list (for keys that contain a comma);
    each must be as long as ``RWDB_SECRET_KEY`` has to be. Never quotes a key."""
    text = raw.strip()
    if text.startswith("["):
        try:
            keys = json.loads(text)
        except ValueError:
            raise ValueError("is not a valid JSON list of strings") from None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise ValueError("is not a valid JSON list of strings")
    else:
        keys = [key.strip() for key in text.split(",") if key.strip()]
    for number, key in enumerate(keys, 1):
        if len(key) < 16:
            raise ValueError(f"key {number} must be at least 16 characters")
    return keys


def describe_errors(exc: ValidationError) -> str:
    """pydantic's errors, one a line, named by variable, with no input quoted."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        name = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {message}" if name else message)
    return "invalid fastapi_rwdb settings:\n  " + "\n  ".join(lines)
