"""PrivacyBudget handlers: keep the ledger, figures and conditions current.

Claims arrive from consumers' handlers through `BudgetStore.claim`; this handler binds a new
budget to its dataset, grants waiting claims as an unlock schedule releases budget, and
refreshes the status. Deletion waits behind the finalizer until the budget's spending is
recorded where the next budget for the same dataset will find it.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import kopf
from pydantic import ValidationError

from veil import API_GROUP, API_VERSION, logs
from veil.api.privacy_budget import PrivacyBudgetSpec
from veil.conditions import Outcome
from veil.controllers.budget_store import (
    PRIVACY_METRICS,
    BindingRefusedError,
    BudgetGoneError,
    BudgetRef,
    BudgetStore,
)
from veil.controllers.reconcile import Result, forget, observed, reconcile
from veil.kube.apply import api_client
from veil.privacy.seal import LedgerTamperedError

KIND = "PrivacyBudget"
PLURAL = "privacybudgets"


@functools.cache
def store() -> BudgetStore:
    return BudgetStore(api_client())


def _ref(body: kopf.Body) -> BudgetRef:
    return BudgetRef(body["metadata"]["namespace"], body["metadata"]["name"])


async def _refresh(body: kopf.Body, patch: kopf.Patch, logger: Any) -> None:
    logs.start(KIND, body["metadata"]["namespace"], body["metadata"]["name"])
    try:
        PrivacyBudgetSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError:
        # Only an outdated CRD lets this through: say so in status, through the common path.
        async def invalid(*_: Any) -> Result:
            return Result(Outcome.stalled_with("InvalidSpec", "unreachable"))

        await reconcile(
            kind=KIND,
            spec_model=PrivacyBudgetSpec,
            body=body,
            patch=patch,
            domain=invalid,
            logger=logger,
        )
        return
    with observed(KIND):
        try:
            await asyncio.to_thread(store().refresh, _ref(body))
        except BudgetGoneError:
            # Deleted between the event and the read: nothing is left to refresh.
            logger.debug("PrivacyBudget %s is gone; nothing to refresh", _ref(body))
        except (LedgerTamperedError, BindingRefusedError) as refused:
            # Already in status (Stalled, with the reason); the timer retries a binding.
            logger.warning("PrivacyBudget %s: %s", _ref(body), refused)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
async def on_budget(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    await _refresh(body, patch, logger)


def _waiting(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    current = dict(status or {})
    counts = current.get("claims") or {}
    unbound = not (current.get("ledger") or {}).get("binding")
    return bool(spec.get("unlock")) or int(counts.get("pending", 0)) > 0 or unbound


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=30, idle=5, when=_waiting)
async def unlock_tick(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    """As the schedule unlocks budget, waiting claims are granted in DPF order."""
    await _refresh(body, patch, logger)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
async def on_budget_deleted(body: kopf.Body, logger: Any, **_: Any) -> None:
    """Record what the budget spent before it goes (the finalizer holds it until then)."""
    try:
        record = await asyncio.to_thread(store().record_spending, body)
    except ValidationError as invalid:
        # A spec only an outdated CRD let through never bound, so it never charged anything.
        logger.warning("PrivacyBudget %s has an invalid spec: %s", _ref(body), invalid)
        record = None
    if record is not None:
        logger.info(
            "PrivacyBudget %s deleted; its spending stays recorded for dataset %s",
            _ref(body),
            record["dataset"],
        )
    forget(KIND, body)
    PRIVACY_METRICS.forget(body["metadata"]["namespace"], body["metadata"]["name"])
