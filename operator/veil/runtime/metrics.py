"""Prometheus metrics of the inference runtime, registered on a registry the caller owns."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Request latency buckets: sub-millisecond small models up to multi-second large batches.
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("success", "bad_request", "not_ready", "too_large", "timeout", "busy", "error")
_LE = [*(repr(bound) for bound in _DURATION_BUCKETS), "+Inf"]  # as prometheus_client writes them


class ModelStats:
    """One model's request counts and durations as plain numbers.

    Updated on the event loop only (no locks): a prometheus_client Counter plus Histogram take
    three locks per request. They become metric families when scraped.
    """

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)  # exported once non-zero
        self.buckets = [0] * (len(_DURATION_BUCKETS) + 1)  # per bucket, the last is +Inf
        self.total_seconds = 0.0

    def record(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] += 1
        self.buckets[bisect_left(_DURATION_BUCKETS, seconds)] += 1
        self.total_seconds += seconds


class InferenceCollector(Collector):
    """`veil_inference_requests_total` and `veil_inference_request_duration_seconds`."""

    def __init__(self) -> None:
        self._models: dict[str, ModelStats] = {}

    def for_model(self, model: str) -> ModelStats:
        return self._models.setdefault(model, ModelStats())

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "veil_inference_requests",
            f"Inference requests by model and outcome ({', '.join(OUTCOMES)}).",
            labels=["model", "outcome"],
        )
        duration = HistogramMetricFamily(
            "veil_inference_request_duration_seconds",
            "Time to answer an inference request, validation included.",
            labels=["model"],
        )
        for model, stats in list(self._models.items()):
            for outcome, count in list(stats.outcomes.items()):
                if count:
                    requests.add_metric([model, outcome], count)
            cumulative, buckets = 0, []
            for le, count in zip(_LE, list(stats.buckets), strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            duration.add_metric([model], buckets, stats.total_seconds)
        yield requests
        yield duration


class RuntimeMetrics:
    """The runtime's four metric families. Label values come from small fixed sets."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.inference = InferenceCollector()
        registry.register(self.inference)
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
