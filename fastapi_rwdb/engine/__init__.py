"""Layer 3: engines, their pools, and everything below SQLAlchemy's public API.

The factories (:mod:`.factory`), the pool that keeps connections opened under
load (:mod:`.pool`), the event hooks every engine gets (:mod:`.events`), the
checkout ping that also reads a replica's position (:mod:`.checkout`), the
COMMIT sent in SQLAlchemy's stead (:mod:`.commit`), queries on the driver's own
connection (:mod:`.wire`), what each SQLSTATE means (:mod:`.sqlstates`), and
every use of SQLAlchemy's private API, fenced with its fallback
(:mod:`.sqlalchemy_internals`), the token key kept in the database
(:mod:`.keystore`), and the TCP options that notice a vanished peer, with
asyncpg's private transport fenced the same way (:mod:`.sockets`).
"""
