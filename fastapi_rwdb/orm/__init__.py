"""Layer 4: the sessions, which carry out the routing and track the writes.

The session classes (:mod:`.classes`) mix into the application's own: read
sessions routed per transaction (:mod:`.reads`), write sessions that note which
commits wrote and the WAL position after them (:mod:`.writes`), and the two
retries of a transaction's first statement: a dead pooled connection
(:mod:`.reconnect`) and a replica's replay conflict (:mod:`.replay`).
What the registry tells each session is in :mod:`.session_info`.
"""
