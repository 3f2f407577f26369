"""Layer 6: what FastAPI and the client see.

The pure-ASGI middleware that reads and hands out the token (:mod:`.middleware`),
the session dependencies and their ``Annotated`` aliases (:mod:`.dependencies`),
an outage answered with a 503 (:mod:`.unavailable`), and the debug routes
(:mod:`.debug`) with the read-write-split report behind one of them
(:mod:`.split_report`).
"""
