"""The reconcile skeleton every kind shares: validate, run the domain, write status once.

Status is written at the end of every reconcile, and only when it differs from what the
object already has, so a no-op resync issues no write.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from veil.conditions import Outcome, Status, apply_outcome, now_rfc3339, set_condition
from veil.metrics import RECONCILE_DURATION, RECONCILE_ERRORS, RECONCILE_TOTAL, RESOURCE_READY

SpecT = TypeVar("SpecT", bound=BaseModel)


@dataclass
class Result:
    """A domain reconcile's answer: the conditions' outcome and the kind's own status fields.

    A status field set to None is removed from the object.
    """

    outcome: Outcome
    status: dict[str, Any] = field(default_factory=dict)
    requeue_after: float | None = None
    # Kind-specific conditions beside Ready/Reconciling/Stalled: (type, status, reason, message).
    conditions: list[tuple[str, Status, str, str]] = field(default_factory=list)


DomainFn = Callable[[SpecT, Mapping[str, Any], Any], Awaitable[Result]]


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field by its wire path."""
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"]) or "spec"
        lines.append(f"spec.{path}: {problem['msg']}")
    return "; ".join(lines)


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `current` status into `desired`; empty when they agree."""
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if value is None:
            if key in current:
                patch[key] = None
        elif current.get(key) != value:
            patch[key] = value
    return patch


class Coalesced(Exception):  # noqa: N818 - a signal, not an error
    """The work was folded into a reconcile already running: nothing to write here."""


@dataclass
class Evaluation:
    """A finished reconcile: the status merge patch to write, and whether to try again."""

    status_patch: dict[str, Any]
    retry_in: float | None = None
    retry_reason: str = ""
    error: Exception | None = None


async def evaluate(
    *,
    kind: str,
    spec_model: type[SpecT],
    body: Mapping[str, Any],
    domain: DomainFn[SpecT],
    logger: Any,
) -> Evaluation:
    """Validate, run the domain, and compute the status patch; never raises for the domain."""
    started = time.monotonic()
    meta = body.get("metadata", {})
    generation = int(meta.get("generation", 0))
    current_status: Mapping[str, Any] = body.get("status") or {}
    result_label = "success"
    error: Exception | None = None
    try:
        spec = spec_model.model_validate(dict(body.get("spec") or {}))
    except ValidationError as invalid:
        # The CRD should have refused this; an older CRD may not have. Nothing to retry.
        result = Result(Outcome.stalled_with("InvalidSpec", describe_validation_error(invalid)))
        result_label = "invalid"
    else:
        try:
            result = await domain(spec, body, logger)
        except Coalesced:
            raise
        except kopf.PermanentError as failure:
            result = Result(Outcome.stalled_with("ReconcileFailed", str(failure)))
            result_label = "error"
        except Exception as failure:  # every other failure is retried, and said in status
            logger.exception("reconcile of %s failed", kind)
            message = f"{type(failure).__name__}: {failure}"
            result = Result(Outcome.failed("ReconcileError", message))
            result_label = "error"
            error = failure

    desired = dict(result.status)
    desired["observedGeneration"] = generation
    # set_condition keeps an unchanged condition's timestamp, so an unchanged outcome
    # yields an empty patch.
    now = now_rfc3339()
    conditions = apply_outcome(
        current_status.get("conditions", []), result.outcome, generation, now
    )
    for type_, status, reason, message in result.conditions:
        conditions = set_condition(
            conditions,
            type_,
            status=status,
            reason=reason,
            message=message,
            generation=generation,
            now=now,
        )
    desired["conditions"] = conditions
    RECONCILE_DURATION.labels(kind).observe(time.monotonic() - started)
    RESOURCE_READY.labels(kind, meta.get("namespace", ""), meta.get("name", "")).set(
        1.0 if result.outcome.ready == "True" else 0.0
    )
    evaluation = Evaluation(status_patch(current_status, desired), error=error)
    if evaluation.status_patch:
        logger.debug("status change of %s %s: %s", kind, meta.get("name"), evaluation.status_patch)
    if error is not None:
        RECONCILE_ERRORS.labels(kind).inc()
        result_label = "error"
        evaluation.retry_in, evaluation.retry_reason = 30, str(error)
    elif result.requeue_after is not None:
        result_label = "requeue"
        evaluation.retry_in = result.requeue_after
        evaluation.retry_reason = result.outcome.message or "requeue"
    RECONCILE_TOTAL.labels(kind, result_label).inc()
    return evaluation


async def reconcile(
    *,
    kind: str,
    spec_model: type[SpecT],
    body: kopf.Body,
    patch: kopf.Patch,
    domain: DomainFn[SpecT],
    logger: Any,
) -> None:
    """The kopf-handler form: status goes into kopf's patch; retries become TemporaryError."""
    evaluation = await evaluate(
        kind=kind, spec_model=spec_model, body=body, domain=domain, logger=logger
    )
    for key, value in evaluation.status_patch.items():
        patch.status[key] = value
    if evaluation.retry_in is not None:
        raise kopf.TemporaryError(evaluation.retry_reason, delay=evaluation.retry_in)


@contextlib.contextmanager
def observed(kind: str) -> Iterator[None]:
    """Count and time a reconcile that does not go through `evaluate`."""
    started = time.monotonic()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.labels(kind).inc()
        RECONCILE_TOTAL.labels(kind, "error").inc()
        raise
    finally:
        RECONCILE_DURATION.labels(kind).observe(time.monotonic() - started)
    RECONCILE_TOTAL.labels(kind, "success").inc()


def forget(kind: str, body: kopf.Body) -> None:
    """Drop a deleted object's per-object series."""
    meta = body.get("metadata", {})
    try:
        RESOURCE_READY.remove(kind, meta.get("namespace", ""), meta.get("name", ""))
    except KeyError:
        return
