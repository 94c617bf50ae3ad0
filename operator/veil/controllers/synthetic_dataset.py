"""SyntheticDataset handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from veil import API_GROUP, API_VERSION
from veil.api.synthetic_dataset import SyntheticDatasetSpec
from veil.conditions import Outcome
from veil.controllers.reconcile import Result, forget, reconcile

KIND = "SyntheticDataset"


async def reconcile_dataset(
    spec: SyntheticDatasetSpec, body: Mapping[str, Any], logger: Any
) -> Result:
    # The budget claim and the synthesis Job arrive with the SyntheticDataset reconciler.
    budget = spec.budget_ref.name if spec.budget_ref else "none (non-private)"
    return Result(
        Outcome.progressing(
            "AwaitingBudgetClaim",
            f"accepted: {spec.synthesizer.method} at ε {spec.synthesizer.epsilon:g}, "
            f"budget {budget}",
        )
    )


@kopf.on.resume(API_GROUP, API_VERSION, "syntheticdatasets")
@kopf.on.create(API_GROUP, API_VERSION, "syntheticdatasets")
@kopf.on.update(API_GROUP, API_VERSION, "syntheticdatasets")
async def on_dataset(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    await reconcile(
        kind=KIND,
        spec_model=SyntheticDatasetSpec,
        body=body,
        patch=patch,
        domain=reconcile_dataset,
        logger=logger,
    )


@kopf.on.delete(API_GROUP, API_VERSION, "syntheticdatasets", optional=True)
async def on_dataset_deleted(body: kopf.Body, **_: Any) -> None:
    forget(KIND, body)
