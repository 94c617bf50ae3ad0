"""PrivacyBudget handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from veil import API_GROUP, API_VERSION
from veil.api.privacy_budget import PrivacyBudgetSpec
from veil.conditions import Outcome
from veil.controllers.reconcile import Result, forget, reconcile

KIND = "PrivacyBudget"


async def reconcile_budget(spec: PrivacyBudgetSpec, body: Mapping[str, Any], logger: Any) -> Result:
    status = body.get("status") or {}
    spent = float(status.get("epsilonSpent", 0.0))
    remaining = max(spec.epsilon - spent, 0.0)
    return Result(
        Outcome.done(
            "BudgetAvailable", f"ε {remaining:g} of {spec.epsilon:g} left at δ {spec.delta:g}"
        ),
        status={"epsilonSpent": spent, "epsilonRemaining": remaining},
    )


@kopf.on.resume(API_GROUP, API_VERSION, "privacybudgets")
@kopf.on.create(API_GROUP, API_VERSION, "privacybudgets")
@kopf.on.update(API_GROUP, API_VERSION, "privacybudgets")
async def on_budget(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    await reconcile(
        kind=KIND,
        spec_model=PrivacyBudgetSpec,
        body=body,
        patch=patch,
        domain=reconcile_budget,
        logger=logger,
    )


@kopf.on.delete(API_GROUP, API_VERSION, "privacybudgets", optional=True)
async def on_budget_deleted(body: kopf.Body, **_: Any) -> None:
    forget(KIND, body)
