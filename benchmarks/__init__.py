"""Benchmarks of fastapi_rwdb against the local stack (``scripts/stack.sh up``).

Run everything and write ``benchmarks/results.md`` (plus PNG plots)::

    .venv/bin/python -m benchmarks            # the full run, about 12 minutes
    .venv/bin/python -m benchmarks --quick    # a smoke run, under a minute
    .venv/bin/python -m benchmarks --only overhead,micro

Parts:

``offload``
    Read-your-writes under a 200 ms replica delay: stale reads and the share of
    reads served by replicas, per pinning mode (LSN tokens, 2 s and 15 s
    windows, off).
``overhead``
    The hand-written two-engine pattern against fastapi_rwdb, same routes, same
    pools: throughput and latency ratios, the write routes in each pinning mode,
    and the round trips and statements each route costs (counted on the wire).
``micro``
    The middleware's own cost per request, without a database.

Not part of the run: ``python -m benchmarks.profile "METHOD /path"`` profiles
one route on both apps and prints where fastapi_rwdb's extra time and calls go.

Raw figures go to ``benchmarks/out/*.json`` (not committed); the report is
rebuilt from whatever parts are there, so ``--only`` refreshes one section.
"""
