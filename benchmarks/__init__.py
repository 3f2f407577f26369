"""Benchmarks of fastapi_rwdb against the local stack (``scripts/stack.sh up``).

Run everything and write ``benchmarks/results.md`` (plus PNG plots)::

    .venv/bin/python -m benchmarks            # the full run, about 6 minutes
    .venv/bin/python -m benchmarks --quick    # a smoke run, well under a minute
    .venv/bin/python -m benchmarks --only overhead,micro

Parts:

``offload``
    Read-your-writes under a 200 ms replica delay: stale reads and the share of
    reads served by replicas, per pinning mode (LSN tokens, 2 s and 15 s
    windows, off).
``overhead``
    The hand-written two-engine pattern against fastapi_rwdb, same routes, same
    pools: throughput and latency ratios, and the database round trips each
    route issues (counted on the wire).
``micro``
    The middleware's own cost per request, without a database.

Raw figures go to ``benchmarks/out/*.json`` (not committed); the report is
rebuilt from whatever parts are there, so ``--only`` refreshes one section.
"""
