"""Prometheus metrics of the inference runtime, registered on a registry the caller owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Request latency buckets: sub-millisecond small models up to multi-second large batches.
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RuntimeMetrics:
    """The runtime's four metric families. Label values come from small fixed sets."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.inference_requests = Counter(
            "veil_inference_requests",
            "Inference requests by model and outcome "
            "(success, bad_request, not_ready, too_large, error).",
            ["model", "outcome"],
            registry=registry,
        )
        self.inference_duration = Histogram(
            "veil_inference_request_duration_seconds",
            "Time to answer an inference request, validation included.",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.key_release = Counter(
            "veil_key_release",
            "Key release calls to the SKR sidecar by outcome (released, refused, error).",
            ["outcome"],
            registry=registry,
        )
        self.attestation_failures = Counter(
            "veil_attestation_failures",
            "Attestation tokens refused, by the check that failed.",
            ["reason"],
            registry=registry,
        )
