"""ConfidentialModel handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from veil import API_GROUP, API_VERSION
from veil.api.confidential_model import ConfidentialModelSpec
from veil.conditions import Outcome
from veil.controllers.reconcile import Result, forget, reconcile

KIND = "ConfidentialModel"


async def reconcile_model(
    spec: ConfidentialModelSpec, body: Mapping[str, Any], logger: Any
) -> Result:
    # Key Vault, placement and network children arrive with the ConfidentialModel reconciler;
    # until then the object is accepted and honestly reported as not serving.
    return Result(
        Outcome.progressing(
            "AwaitingRollout",
            f"accepted: {spec.tee.isolation} model, {spec.serving.replicas} replica(s); "
            "children not yet rolled out",
        )
    )


@kopf.on.resume(API_GROUP, API_VERSION, "confidentialmodels")
@kopf.on.create(API_GROUP, API_VERSION, "confidentialmodels")
@kopf.on.update(API_GROUP, API_VERSION, "confidentialmodels")
async def on_model(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    await reconcile(
        kind=KIND,
        spec_model=ConfidentialModelSpec,
        body=body,
        patch=patch,
        domain=reconcile_model,
        logger=logger,
    )


@kopf.on.delete(API_GROUP, API_VERSION, "confidentialmodels", optional=True)
async def on_model_deleted(body: kopf.Body, **_: Any) -> None:
    forget(KIND, body)
