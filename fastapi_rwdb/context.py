"""Kept for imports written before ``request_state`` moved to :mod:`fastapi_rwdb.state`."""

from .state import request_state

__all__ = ["request_state"]
