"""The per-request routing state, shared between the middleware and the sessions."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import RequestState

request_state: ContextVar[RequestState | None] = ContextVar("rwdb_request_state", default=None)
