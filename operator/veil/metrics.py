"""The operator's Prometheus metrics.

Controller metrics carry controller-runtime's names, labels and buckets
(sigs.k8s.io/controller-runtime pkg/internal/controller/metrics and pkg/metrics/workqueue.go),
so the dashboards and alerts platform teams already run for Go operators work on Veil: the
`controller` label is the kind in lower case (`confidentialmodel`, `privacybudget`,
`syntheticdataset`). The `workqueue_*` family covers the ConfidentialModel controller's queue
(its per-model lanes fold events that arrive during a reconcile into one rerun, as a workqueue's
dirty set does). Veil's own facts are `veil_*`: readiness per resource, key versions created
and disabled. The budget figures (`veil_privacy_*`) are registered here by
`veil.privacy.metrics.PrivacyMetrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# controller-runtime's results: success, error, requeue, requeue_after.
RESULTS = ("success", "error", "requeue", "requeue_after")


def controller_name(kind: str) -> str:
    """controller-runtime names a controller after its kind, in lower case."""
    return kind.lower()


RECONCILE_TOTAL = Counter(
    "controller_runtime_reconcile_total",
    "Total number of reconciliations per controller",
    ["controller", "result"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "controller_runtime_reconcile_errors_total",
    "Total number of reconciliation errors per controller",
    ["controller"],
    registry=REGISTRY,
)
TERMINAL_RECONCILE_ERRORS = Counter(
    "controller_runtime_terminal_reconcile_errors_total",
    "Total number of terminal reconciliation errors per controller",
    ["controller"],
    registry=REGISTRY,
)
RECONCILE_TIME = Histogram(
    "controller_runtime_reconcile_time_seconds",
    "Length of time per reconciliation per controller",
    ["controller"],
    buckets=(
        *(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7),
        *(0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5, 6, 7, 8, 9, 10),
        *(15, 20, 25, 30, 40, 50, 60),
    ),
    registry=REGISTRY,
)
ACTIVE_WORKERS = Gauge(
    "controller_runtime_active_workers",
    "Number of currently used workers per controller",
    ["controller"],
    registry=REGISTRY,
)
MAX_CONCURRENT_RECONCILES = Gauge(
    "controller_runtime_max_concurrent_reconciles",
    "Maximum number of concurrent reconciles per controller",
    ["controller"],
    registry=REGISTRY,
)

# workqueue_*: controller-runtime labels them by queue name and controller (the same here).
_QUEUE_LABELS = ["controller", "name"]
# ExponentialBuckets(10e-9, 10, 12), as controller-runtime's workqueue metrics.
_QUEUE_BUCKETS = tuple(10e-9 * 10**power for power in range(12))
WORKQUEUE_DEPTH = Gauge(
    "workqueue_depth", "Current depth of workqueue", _QUEUE_LABELS, registry=REGISTRY
)
WORKQUEUE_ADDS = Counter(
    "workqueue_adds_total",
    "Total number of adds handled by workqueue",
    _QUEUE_LABELS,
    registry=REGISTRY,
)
WORKQUEUE_QUEUE_DURATION = Histogram(
    "workqueue_queue_duration_seconds",
    "How long in seconds an item stays in workqueue before being requested",
    _QUEUE_LABELS,
    buckets=_QUEUE_BUCKETS,
    registry=REGISTRY,
)
WORKQUEUE_WORK_DURATION = Histogram(
    "workqueue_work_duration_seconds",
    "How long in seconds processing an item from workqueue takes.",
    _QUEUE_LABELS,
    buckets=_QUEUE_BUCKETS,
    registry=REGISTRY,
)
WORKQUEUE_RETRIES = Counter(
    "workqueue_retries_total",
    "Total number of retries handled by workqueue",
    _QUEUE_LABELS,
    registry=REGISTRY,
)

CONTROLLERS = ("confidentialmodel", "privacybudget", "syntheticdataset")


def initialize(workers: int) -> None:
    """Every controller's series from zero, as controller-runtime starts them, so dashboards
    and alerts see a 0 rather than no data before the first error."""
    for controller in CONTROLLERS:
        for result in RESULTS:
            RECONCILE_TOTAL.labels(controller, result)
        RECONCILE_ERRORS.labels(controller)
        TERMINAL_RECONCILE_ERRORS.labels(controller)
        ACTIVE_WORKERS.labels(controller)
        MAX_CONCURRENT_RECONCILES.labels(controller).set(workers)
    queue = controller_name("ConfidentialModel")
    for metric in (WORKQUEUE_DEPTH, WORKQUEUE_ADDS, WORKQUEUE_RETRIES):
        metric.labels(queue, queue)


# --- Veil's own ------------------------------------------------------------------------------

RESOURCE_READY = Gauge(
    "veil_resource_ready",
    "1 when the resource's Ready condition is True, 0 otherwise.",
    ["kind", "namespace", "name"],
    registry=REGISTRY,
)
MODEL_READY_REPLICAS = Gauge(
    "veil_model_ready_replicas",
    "Replicas of a ConfidentialModel that released the key and serve the model.",
    ["namespace", "name"],
    registry=REGISTRY,
)
KEY_VERSIONS = Counter(
    "veil_key_versions",
    "Key Vault key versions Veil created (a new release policy) or disabled (no longer served).",
    ["namespace", "name", "action"],
    registry=REGISTRY,
)
CLAIMS_BY_STATE = Gauge(
    "veil_privacy_budget_claims",
    "Claims in a PrivacyBudget's ledger by state (Pending, Granted, Consumed, Denied, Released).",
    ["namespace", "budget", "state"],
    registry=REGISTRY,
)
CLAIM_STATES = ("Pending", "Granted", "Consumed", "Denied", "Released")


def observe_budget_claims(namespace: str, budget: str, counts: dict[str, int]) -> None:
    """The claims-by-state gauge from a budget's status.claims counts (keys in any case)."""
    lowered = {str(state).lower(): int(count) for state, count in counts.items()}
    for state in CLAIM_STATES:
        CLAIMS_BY_STATE.labels(namespace, budget, state).set(lowered.get(state.lower(), 0))


def forget_budget(namespace: str, budget: str) -> None:
    for state in CLAIM_STATES:
        try:
            CLAIMS_BY_STATE.remove(namespace, budget, state)
        except KeyError:
            continue
