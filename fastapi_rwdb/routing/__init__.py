"""Layer 1: where a read may go, decided from positions, tokens and the replicas' health.

Pure logic and the state it works on, with no engine and no session: WAL
positions (:mod:`.lsn`), the signed token that carries a client's position
(:mod:`.tokens`), what one request has done (:mod:`.request`), the read side's
breaker and replica view (:mod:`.replicas`), and the decision itself
(:mod:`.rules`: :func:`choose_read_route` and :func:`next_replica_step`).
"""

from .rules import Route, choose_read_route, next_replica_step

__all__ = ["Route", "choose_read_route", "next_replica_step"]
