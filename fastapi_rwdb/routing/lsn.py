"""WAL positions (LSNs): PostgreSQL's ``16/B374D848`` text and the integers compared here.

LSNs travel as text and are parsed in Python: cheaper for the server than
``pg_lsn`` arithmetic, and the same on both drivers.
"""

from __future__ import annotations

#: The highest pg_lsn: no server ever reports having replayed it.
MAX_LSN = 2**64 - 1


def parse_lsn(text: str | None) -> int | None:
    """``'16/B374D848'`` as an int; ``None`` (e.g. a primary's replay position) stays None."""
    if text is None:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int | None) -> str | None:
    """An LSN as PostgreSQL prints it (``0/5031C28``)."""
    if lsn is None:
        return None
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
