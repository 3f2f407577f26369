"""Layer 2: what the package tells the outside about its decisions.

Prometheus counters and gauges (:mod:`.metrics`, optional), listeners to each
routing decision and token event (:mod:`.listeners`: the test kit's recorder),
and the OpenTelemetry bridge (:mod:`.otel`, optional).
"""
