"""The sessionmakers of one driver: write, read (routed) and primary-read.

Built by the registry (:class:`fastapi_rwdb.Database`) from its engines; the
session classes come from :mod:`.classes`, what each session is told from
:mod:`.session_info`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .classes import read_class, write_class
from .session_info import ReadBinds, read_maker_info

_S = TypeVar("_S", Session, AsyncSession)


@dataclass(frozen=True, slots=True)
class Makers(Generic[_S]):
    """The sessionmakers of one driver."""

    write: Callable[[], _S]
    read: Callable[[], _S]
    primary_read: Callable[[], _S]


def sync_makers(
    base: type[Session], write: Engine, binds: ReadBinds, *, write_info: dict[str, Any]
) -> Makers[Session]:
    """psycopg sessionmakers: ``binds`` holds the replica and the primary-read engines."""
    read_cls, write_cls = read_class(base), write_class(base)
    return Makers(
        write=sessionmaker(write, class_=write_cls, info=write_info),
        read=sessionmaker(binds.replica, class_=read_cls, info=read_maker_info(binds)),
        # A read that must see the primary has a pool of its own, so it can never take
        # a write's connection; it runs READ ONLY, so a write in a read session fails
        # the same way whichever server it reached.
        primary_read=sessionmaker(binds.primary, class_=read_cls),
    )


def async_makers(
    base: type[Session],
    async_class: type[AsyncSession],
    write: AsyncEngine,
    read: AsyncEngine,
    primary: AsyncEngine,
    binds: ReadBinds,
    *,
    write_info: dict[str, Any],
) -> Makers[AsyncSession]:
    """asyncpg sessionmakers; ``binds`` holds ``read``'s and ``primary``'s sync sides."""
    read_cls, write_cls = read_class(base), write_class(base)
    common: dict[str, Any] = {"class_": async_class, "expire_on_commit": False}
    return Makers(
        write=async_sessionmaker(write, sync_session_class=write_cls, info=write_info, **common),
        read=async_sessionmaker(
            read, sync_session_class=read_cls, info=read_maker_info(binds), **common
        ),
        primary_read=async_sessionmaker(primary, sync_session_class=read_cls, **common),
    )


__all__ = ["Makers", "async_makers", "sync_makers"]
