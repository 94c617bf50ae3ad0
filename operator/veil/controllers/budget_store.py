"""PrivacyBudget status as a transactional store: read, decide, write with the
resourceVersion precondition, and on a conflict read again.

Every write of a budget's status goes through `transact`, so the ledger, the figures and
the conditions always change together and no writer can overwrite another's claim: the API
server refuses a write based on a stale read with 409, and the decision is taken again on the
fresh object. Claims are keyed by the consumer's UID, so a decision retried after a crash or
a conflict is the same claim, never a second charge.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from veil import API_GROUP, API_VERSION, labels
from veil.api.privacy_budget import PrivacyBudgetSpec, Spender
from veil.conditions import Outcome, Status, apply_outcome, now_rfc3339, set_condition
from veil.controllers.reconcile import status_patch
from veil.metrics import REGISTRY
from veil.privacy import (
    AuditBatch,
    BudgetSummary,
    BudgetTerms,
    ClaimRequest,
    Decision,
    Ledger,
    PrivacyMetrics,
    compact,
    decide,
    mark_consumed,
    release,
    schedule_pending,
    serialize_audit_batch,
    summarize,
    unlocked_fraction,
)

log = logging.getLogger(__name__)
PLURAL = "privacybudgets"
MAX_ATTEMPTS = 100
# Fold terminal claims into the audit trail once the status holds this many claims.
COMPACT_ABOVE = 400
PRIVACY_METRICS = PrivacyMetrics(REGISTRY)

T = TypeVar("T")
Change = Callable[[Ledger, BudgetTerms, float, datetime], tuple[Ledger, T]]


class BudgetUnavailableError(Exception):
    """The budget does not exist, or the consumer may not spend it; the message says which."""


class BudgetGoneError(BudgetUnavailableError):
    """The budget does not exist (never created, or deleted)."""


@dataclass(frozen=True)
class BudgetRef:
    namespace: str
    name: str


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def may_spend(spenders: list[Spender], budget_namespace: str, kind: str, namespace: str) -> bool:
    """Empty `spenders`: consumers in the budget's namespace; otherwise any matching entry."""
    if not spenders:
        return namespace == budget_namespace
    return any(
        (s.namespace is None or s.namespace == namespace) and (s.kind is None or s.kind == kind)
        for s in spenders
    )


def budget_outcome(summary: BudgetSummary) -> tuple[Outcome, tuple[Status, str, str]]:
    """Ready and Exhausted as a person reads them."""
    if summary.exhausted:
        message = f"ε {summary.epsilon_spent:.4g} of {summary.epsilon_total:g} spent"
        return Outcome.done("Exhausted", message), ("True", "BudgetSpent", message)
    message = (
        f"ε {summary.epsilon_remaining:.4g} of {summary.epsilon_total:g} left at "
        f"δ {summary.delta:g} ({summary.epsilon_unlocked:.4g} unlocked); "
        f"{summary.claims.pending} pending"
    )
    return Outcome.done("BudgetAvailable", message), ("False", "BudgetAvailable", message)


class BudgetStore:
    def __init__(self, api: client.ApiClient) -> None:
        self.objects = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self._lanes: dict[BudgetRef, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, ref: BudgetRef) -> dict[str, Any]:
        try:
            found = self.objects.get_namespaced_custom_object(
                API_GROUP, API_VERSION, ref.namespace, PLURAL, ref.name
            )
        except ApiException as failed:
            if failed.status == 404:
                raise BudgetGoneError(
                    f"PrivacyBudget {ref.namespace}/{ref.name} does not exist"
                ) from failed
            raise
        return cast(dict[str, Any], found)

    def _lane(self, ref: BudgetRef) -> threading.Lock:
        with self._guard:
            return self._lanes.setdefault(ref, threading.Lock())

    def transact(self, ref: BudgetRef, change: Change[T]) -> T:
        """Apply `change` to the ledger and write the whole status atomically.

        Within this process a budget's transactions queue on one lock, so the operator's own
        threads never race; other writers (another replica, a CLI) are caught by the
        resourceVersion precondition and retried with jittered backoff.
        """
        with self._lane(ref):
            return self._transact(ref, change)

    def _transact(self, ref: BudgetRef, change: Change[T]) -> T:
        for attempt in range(MAX_ATTEMPTS):
            budget = self.get(ref)
            spec = PrivacyBudgetSpec.model_validate(budget["spec"])
            terms = BudgetTerms.from_spec(spec)
            now = datetime.now(UTC)
            created = _parse_time(budget["metadata"]["creationTimestamp"])
            unlocked = unlocked_fraction(spec.unlock, created, now)
            current = budget.get("status") or {}
            ledger = Ledger.from_wire(current.get("ledger"))
            after, result = change(ledger, terms, unlocked, now)
            batches: list[AuditBatch] = []
            if len(after.claims) > COMPACT_ABOVE:
                after, batches = compact(after, now)
            summary = summarize(after, terms, unlocked)
            desired = self._desired_status(budget, after, summary)
            patch = status_patch(current, desired)
            if not patch:
                PRIVACY_METRICS.update(ref.namespace, ref.name, summary)
                return result
            self._write_audit(budget, batches)
            try:
                self.objects.patch_namespaced_custom_object_status(
                    API_GROUP,
                    API_VERSION,
                    ref.namespace,
                    PLURAL,
                    ref.name,
                    {
                        "metadata": {"resourceVersion": budget["metadata"]["resourceVersion"]},
                        "status": patch,
                    },
                )
            except ApiException as failed:
                if failed.status == 409:
                    time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))
                    continue
                raise
            PRIVACY_METRICS.update(ref.namespace, ref.name, summary)
            return result
        raise RuntimeError(f"PrivacyBudget {ref.namespace}/{ref.name}: too many write conflicts")

    def _desired_status(
        self, budget: Mapping[str, Any], ledger: Ledger, summary: BudgetSummary
    ) -> dict[str, Any]:
        current = budget.get("status") or {}
        generation = int(budget["metadata"].get("generation", 0))
        now = now_rfc3339()
        ready, (exhausted, reason, message) = budget_outcome(summary)
        conditions = apply_outcome(current.get("conditions", []), ready, generation, now)
        conditions = set_condition(
            conditions,
            "Exhausted",
            status=exhausted,
            reason=reason,
            message=message,
            generation=generation,
            now=now,
        )
        return {
            "ledger": ledger.to_wire(),
            **summary.status_fields(),
            "conditions": conditions,
            "observedGeneration": generation,
        }

    def _write_audit(self, budget: Mapping[str, Any], batches: list[AuditBatch]) -> None:
        """Folded claims go to numbered ConfigMaps before the status forgets them."""
        meta = budget["metadata"]
        for batch in batches:
            name = f"{meta['name']}-audit-{batch.sequence:06d}"
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": name,
                    "namespace": meta["namespace"],
                    "labels": {
                        labels.MANAGED_BY: "veil",
                        labels.OWNER_KIND: "PrivacyBudget",
                        labels.INSTANCE: meta["name"],
                        labels.COMPONENT: "audit",
                    },
                    "ownerReferences": [
                        {
                            "apiVersion": budget["apiVersion"],
                            "kind": budget["kind"],
                            "name": meta["name"],
                            "uid": meta["uid"],
                        }
                    ],
                },
                "immutable": True,
                "data": {"batch.json": serialize_audit_batch(batch)},
            }
            try:
                self.core.create_namespaced_config_map(meta["namespace"], body)  # type: ignore[arg-type]
            except ApiException as failed:
                # A batch written before a conflict or a crash is the same batch: keep it.
                if failed.status != 409:
                    raise

    # --- what consumers and the budget's own handler call ----------------------------

    def claim(self, ref: BudgetRef, request: ClaimRequest) -> Decision:
        budget = self.get(ref)
        spec = PrivacyBudgetSpec.model_validate(budget["spec"])
        consumer = request.consumer
        if not may_spend(spec.spenders, ref.namespace, consumer.kind, consumer.namespace):
            raise BudgetUnavailableError(
                f"{consumer.kind} {consumer.namespace}/{consumer.name} may not spend "
                f"PrivacyBudget {ref.namespace}/{ref.name} (see its spec.spenders)"
            )

        def change(
            ledger: Ledger, terms: BudgetTerms, unlocked: float, now: datetime
        ) -> tuple[Ledger, Decision]:
            return decide(ledger, request, terms, now, unlocked)

        decision = self.transact(ref, change)
        if decision.changed:
            _event(budget, decision)
        return decision

    def consume(self, ref: BudgetRef, key: str) -> None:
        def change(ledger: Ledger, *_: Any) -> tuple[Ledger, None]:
            claim = ledger.claims.get(key)
            if claim is not None and claim.state == "Consumed":
                return ledger, None
            return mark_consumed(ledger, key, datetime.now(UTC)), None

        self.transact(ref, change)

    def release(self, ref: BudgetRef, key: str, reason: str) -> None:
        def change(ledger: Ledger, *_: Any) -> tuple[Ledger, None]:
            claim = ledger.claims.get(key)
            if claim is None or claim.state in ("Released", "Denied"):
                return ledger, None
            return release(ledger, key, datetime.now(UTC), reason=reason), None

        self.transact(ref, change)

    def refresh(self, ref: BudgetRef) -> None:
        """Grant what the unlocked budget now admits; refresh figures and conditions."""

        def change(
            ledger: Ledger, terms: BudgetTerms, unlocked: float, now: datetime
        ) -> tuple[Ledger, None]:
            return schedule_pending(ledger, terms, now, unlocked), None

        self.transact(ref, change)


def _event(budget: Mapping[str, Any], decision: Decision) -> None:
    reason = {"Granted": "ClaimGranted", "Denied": "ClaimDenied", "Pending": "ClaimPending"}.get(
        decision.state, f"Claim{decision.state}"
    )
    message = json.dumps({"claim": decision.key, "epsilon": round(decision.epsilon, 6)})
    message = f"{decision.reason} {message}"
    try:
        kopf.info(cast(kopf.Body, budget), reason=reason, message=message[:1000])
    except LookupError:
        # Outside the operator (tests, CLI) there is no event poster.
        log.info("%s: %s", reason, message)
