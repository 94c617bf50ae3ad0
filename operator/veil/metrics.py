"""The operator's own Prometheus metrics, named after controller-runtime's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILE_TOTAL = Counter(
    "veil_reconcile_total",
    "Reconciles by kind and result (success, error, requeue, invalid).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "veil_reconcile_duration_seconds",
    "Time one reconcile took, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "veil_reconcile_errors_total",
    "Reconciles that ended in an error, by kind.",
    ["kind"],
    registry=REGISTRY,
)
RESOURCE_READY = Gauge(
    "veil_resource_ready",
    "1 when the resource's Ready condition is True, 0 otherwise.",
    ["kind", "namespace", "name"],
    registry=REGISTRY,
)
