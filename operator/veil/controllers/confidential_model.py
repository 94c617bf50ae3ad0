"""ConfidentialModel handlers: key, placement, network lockdown, drift correction.

The handlers are thin: `converge` does the work through three narrow ports (Key Vault keys,
AKS node pools, the Kubernetes API) and reports an outcome; `evaluate` turns it into status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from veil import API_GROUP, API_VERSION, events, labels, logs
from veil.api.confidential_model import ConfidentialModelSpec, NodePool
from veil.azure import KeyVaultError, NodePoolError, PoolState, ReleasePolicyError
from veil.conditions import Outcome
from veil.config import OperatorConfig
from veil.controllers import key_creation, key_lifecycle, model_status
from veil.controllers import training as training_flow
from veil.controllers.reconcile import Evaluation, Result, evaluate_blocking, first_line, forget
from veil.kube import apply
from veil.kube.cache import CHILDREN
from veil.metrics import (
    KEY_VERSIONS,
    MODEL_READY_REPLICAS,
    WORKQUEUE_ADDS,
    WORKQUEUE_DEPTH,
    WORKQUEUE_QUEUE_DURATION,
    WORKQUEUE_RETRIES,
    WORKQUEUE_WORK_DURATION,
    controller_name,
)
from veil.resources import confidential_model as build
from veil.resources import kata_claims
from veil.resources.common import selector_labels
from veil.resources.kata_claims import KataClaimsError
from veil.resources.kata_policy import KataPolicyError

KIND = "ConfidentialModel"
PLURAL = "confidentialmodels"
CONTROLLER = controller_name(KIND)
NODE_POOL_POLL_SECONDS = 30.0
KEY_FAILURE_REASONS = {KeyVaultError: "KeyVaultRefused", ReleasePolicyError: "InvalidReleasePolicy"}
# How often a settled model is checked for drift no watch event reported.
RESYNC_SECONDS = float(os.environ.get("VEIL_RESYNC_SECONDS", "60"))


# (owner, spec, measured claims of a coco pod's agent policy or None, a hook run with the
# policy digest just before a new version is created) -> the key version.
KeyEnsurer = Callable[
    [
        Mapping[str, Any],
        ConfidentialModelSpec,
        Mapping[str, str | bool] | None,
        Callable[[str], None] | None,
    ],
    build.KeyRef,
]
KeyRemover = Callable[[Mapping[str, Any], ConfidentialModelSpec], str]
# Disables every version of the model's key but the given one; returns those it disabled.
KeyRetirer = Callable[[ConfidentialModelSpec, str], list[str]]
PoolEnsurer = Callable[[NodePool, ConfidentialModelSpec], PoolState]


@dataclass
class Ports:
    """The outside world the reconciler talks to; the operator wires real ones at startup."""

    ensure_key: KeyEnsurer
    remove_key: KeyRemover
    ensure_pool: PoolEnsurer
    config: OperatorConfig
    retire_key_versions: KeyRetirer


def _unconfigured(*_: Any) -> Any:
    raise KeyVaultError("the operator started without Azure ports (see veil.operator_main)")


PORTS = Ports(_unconfigured, _unconfigured, _unconfigured, OperatorConfig(), _unconfigured)


def configure(ports: Ports) -> None:
    global PORTS  # noqa: PLW0603 - set once at startup, read by every reconcile
    PORTS = ports


def _rollout_outcome(deployment: Mapping[str, Any] | None, replicas: int) -> tuple[Outcome, int]:
    status = (deployment or {}).get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    current = (deployment or {}).get("metadata", {}).get("generation") == status.get(
        "observedGeneration"
    )
    updated = int(status.get("updatedReplicas") or 0)
    if current and ready >= replicas and updated >= replicas:
        return Outcome.done("ModelServing", f"{ready}/{replicas} replica(s) ready"), ready
    return (
        Outcome.progressing("RollingOut", f"{ready}/{replicas} replica(s) ready; rolling out"),
        ready,
    )


@dataclass
class _Lane:
    """One model's reconciles run one at a time; events arriving meanwhile fold into one rerun.

    Measured as controller-runtime's workqueue (`workqueue_*{name="confidentialmodel"}`): a
    dirty lane not yet being processed is one item of depth, as a workqueue's dirty set is.
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    dirty: bool = False
    # When the lane turned dirty while idle (for workqueue_queue_duration_seconds).
    queued_at: float | None = None


_lanes: dict[tuple[str, str], _Lane] = {}
_lanes_guard = threading.Lock()


def _lane(namespace: str, name: str) -> _Lane:
    with _lanes_guard:
        return _lanes.setdefault((namespace, name), _Lane())


def _reconcile_once(namespace: str, name: str, logger: Any) -> Evaluation | None:
    """Read the model fresh, converge, and write the status change; under the model's lane.

    Reading inside the lane means the status is compared with what the previous pass wrote,
    so a settled model gets an empty patch and no write. The transitions' events follow the
    write.
    """
    with logs.reconciling(KIND, namespace, name):
        owner = apply.get_object(f"{API_GROUP}/{API_VERSION}", KIND, name, namespace)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return None  # gone or going: garbage collection and the finalizer take over
        evaluation = evaluate_blocking(
            kind=KIND,
            spec_model=ConfidentialModelSpec,
            body=owner,
            logger=logger,
            domain=lambda spec, body, _: _converge(body, spec, PORTS),
        )
        if evaluation.status_patch:
            apply.patch_status(
                f"{API_GROUP}/{API_VERSION}", KIND, name, namespace, evaluation.status_patch
            )
        evaluation.record_events(owner)
        return evaluation


def _mark_dirty(lane: _Lane) -> None:
    WORKQUEUE_ADDS.labels(CONTROLLER, CONTROLLER).inc()
    if not lane.dirty:
        lane.dirty = True
        lane.queued_at = time.monotonic()
        WORKQUEUE_DEPTH.labels(CONTROLLER, CONTROLLER).inc()


def _take(lane: _Lane) -> None:
    lane.dirty = False
    WORKQUEUE_DEPTH.labels(CONTROLLER, CONTROLLER).dec()
    if lane.queued_at is not None:
        WORKQUEUE_QUEUE_DURATION.labels(CONTROLLER, CONTROLLER).observe(
            time.monotonic() - lane.queued_at
        )
        lane.queued_at = None


def refresh(namespace: str, name: str, logger: Any, *, wait: bool) -> Evaluation | None:
    """Reconcile one model. With `wait` False (child events) a reconcile already running is
    asked to run once more instead: a rollout sends dozens of child events."""
    lane = _lane(namespace, name)
    with _lanes_guard:
        _mark_dirty(lane)
    evaluation: Evaluation | None = None
    while lane.dirty:
        if not lane.lock.acquire(blocking=wait):
            return evaluation  # the holder sees `dirty` and runs again
        try:
            while lane.dirty:
                with _lanes_guard:
                    _take(lane)
                started = time.monotonic()
                try:
                    evaluation = _reconcile_once(namespace, name, logger)
                finally:
                    WORKQUEUE_WORK_DURATION.labels(CONTROLLER, CONTROLLER).observe(
                        time.monotonic() - started
                    )
        finally:
            lane.lock.release()
    return evaluation


def _converge(owner: Mapping[str, Any], spec: ConfidentialModelSpec, ports: Ports) -> Result:
    meta = owner["metadata"]
    status: dict[str, Any] = {}
    waiting = _await_node_pool(owner, spec, ports, status)
    if waiting is not None:
        return waiting
    ensured = _ensure_key(owner, spec, ports, status)
    if isinstance(ensured, Result):
        return ensured
    key, key_condition = ensured
    conditions: list[model_status.Condition] = [key_condition]

    if spec.model is None:
        # DP training produces the model, sealed to the key above.
        trained = training_flow.train(owner, spec, ports.config, status)
        if isinstance(trained, Result):
            trained.conditions = conditions + trained.conditions
            return trained
        spec = spec.model_copy(update={"model": trained})

    children = build.children(owner, spec, ports.config)
    report = apply.ApplyReport()
    stalled: Outcome | None = None
    for manifest in children.apply:
        try:
            apply.ensure([manifest], report, cache=CHILDREN)
        except apply.KindNotInstalledError as missing:
            stalled = Outcome.stalled_with(
                "CiliumNotInstalled",
                f"network.fqdnEgress needs Cilium: {missing}; the other policies are applied",
            )
    apply.ensure_absent(children.absent, meta["namespace"], meta["uid"], report)
    record_apply(owner, report)

    deployment = apply.get_object(
        "apps/v1", "Deployment", meta["name"], meta["namespace"], cache=CHILDREN
    )
    pods = apply.list_objects("v1", "Pod", meta["namespace"], selector_labels(owner, build.APP))
    conditions += [model_status.placed(pods, spec.tee.isolation), model_status.key_released(pods)]
    outcome, ready = _rollout_outcome(deployment, spec.serving.replicas)
    MODEL_READY_REPLICAS.labels(meta["namespace"], meta["name"]).set(ready)
    if conditions[1][1] == "False" and spec.serving.replicas > 0:
        outcome = Outcome.progressing(conditions[1][2], conditions[1][3])
    if key is not None:
        settled = _settle_key_versions(
            owner,
            spec,
            key,
            pods,
            outcome=outcome,
            status=status,
            conditions=conditions,
            ports=ports,
        )
        if isinstance(settled, Result):
            return settled
        outcome = settled
    status.update(
        readyReplicas=ready,
        serviceName=meta["name"],
        endpoint=f"http://{meta['name']}.{meta['namespace']}.svc:{spec.serving.port}"
        f"/v2/models/{meta['name']}",
    )
    return Result(stalled or outcome, status=status, conditions=conditions)


def _ensure_key(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, ports: Ports, status: dict[str, Any]
) -> tuple[build.KeyRef | None, model_status.Condition] | Result:
    """The Key Vault key version in force (None for a key held by a KBS) and its condition."""
    if spec.key_release.kbs_resource is not None:
        return None, (
            "KeyReady",
            "True",
            "KeyInKbs",
            f"the key is the KBS resource {spec.key_release.kbs_resource}, released to the TEE "
            "by the guest's Confidential Data Hub; Veil manages no Key Vault key",
        )
    try:
        measured = _measured_claims(owner, spec, ports.config)
    except (KataPolicyError, KataClaimsError) as refused:
        message = (
            f"The pods' Kata agent policy cannot pin them: {refused}. The key is not created "
            "until it can (see the README's Confidential Containers section)."
        )
        return Result(Outcome.stalled_with("AgentPolicyRefused", message), status=status)
    try:
        key = ports.ensure_key(owner, spec, measured, functools.partial(key_creation.claim, owner))
    except key_creation.KeyCreationClaimedError as claimed:
        message = str(claimed)
        return Result(
            Outcome.progressing("KeyBeingCreated", message),
            status=status,
            requeue_after=claimed.retry_after,
            conditions=[("KeyReady", "False", "KeyBeingCreated", message)],
        )
    except (KeyVaultError, ReleasePolicyError) as refused:
        message = first_line(str(refused), 600)
        reason = KEY_FAILURE_REASONS[type(refused)]
        # A transient failure waits what the service asked (Retry-After), not a fixed minute.
        wait = getattr(refused, "retry_after", None)
        if isinstance(refused, KeyVaultError) and refused.retriable:
            reason = "KeyVaultUnavailable"
        return Result(
            Outcome.failed("KeyNotReady", message),
            status=status,
            requeue_after=wait or 60,
            conditions=[("KeyReady", "False", reason, message)],
            detail=getattr(refused, "detail", ""),
        )
    status.update(keyId=key.kid, keyVersion=key.version)
    name = spec.key_release.key_vault().key_name
    if key.created:
        meta = owner["metadata"]
        KEY_VERSIONS.labels(meta["namespace"], meta["name"], "created").inc()
        events.normal(
            owner,
            "KeyVersionCreated",
            f"Created version {key.version} of Key Vault key {name} with the release policy "
            "in force (exportable, HSM-protected, immutable policy)",
            action="CreateKeyVersion",
        )
    return key, (
        "KeyReady",
        "True",
        "KeyVersionCurrent",
        f"{name} version {key.version} with the release policy in force",
    )


def _measured_claims(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, config: OperatorConfig
) -> dict[str, str | bool] | None:
    """For coco: the claims binding the pods' agent policy, which the release policy pins.
    A model Veil trains has no pods yet: its policy is pinned once it has a model."""
    if spec.tee.isolation != "coco" or spec.model is None:
        return None
    policy = build.coco_agent_policy(owner, spec, config)
    return kata_claims.coco_release_claims(policy, spec.tee.platform)


def _await_node_pool(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, ports: Ports, status: dict[str, Any]
) -> Result | None:
    """The node pool's state in status; a Result while it is not ready (None once it is)."""
    if spec.tee.node_pool is None:
        return None
    try:
        pool = ports.ensure_pool(spec.tee.node_pool, spec)
    except NodePoolError as refused:
        message = first_line(str(refused), 600)
        if not refused.retriable:
            return Result(Outcome.stalled_with("NodePoolRefused", message), detail=refused.detail)
        return Result(
            Outcome.failed("NodePoolError", message),
            requeue_after=refused.retry_after or 60,
            detail=refused.detail,
        )
    status["nodePoolState"] = pool.provisioning_state
    if pool.changed:
        events.normal(
            owner,
            "NodePoolRequested",
            f"Asked AKS for confidential node pool {pool.name} ({pool.vm_size}, "
            f"{pool.count if pool.count is not None else 'autoscaled'} node(s)); provisioning "
            f"state {pool.provisioning_state}",
            action="EnsureNodePool",
        )
    if pool.ready:
        return None
    return Result(
        Outcome.progressing(
            "NodePoolProvisioning", f"AKS node pool {pool.name} is {pool.provisioning_state}"
        ),
        status=status,
        requeue_after=None if pool.failed else NODE_POOL_POLL_SECONDS,
    )


def _settle_key_versions(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    key: build.KeyRef,
    pods: list[dict[str, Any]],
    *,
    outcome: Outcome,
    status: dict[str, Any],
    conditions: list[model_status.Condition],
    ports: Ports,
) -> Outcome | Result:
    """Say which version the model is sealed to; retire the others once nothing uses them."""
    assert spec.model is not None
    assessment = key_lifecycle.assess(
        spec,
        key.version,
        key_lifecycle.sealed_keys(pods, spec.model.sha256),
        rolled_out=outcome.ready == "True",
    )
    conditions.append(assessment.condition)
    if assessment.sealed_version is not None:
        status["sealedKeyVersion"] = assessment.sealed_version
    retired_for = (owner.get("status") or {}).get("retiredKeyVersionsFor")
    if assessment.retire and retired_for != key.version:
        name = spec.key_release.key_vault().key_name
        try:
            disabled = ports.retire_key_versions(spec, key.version)
        except KeyVaultError as refused:
            message = f"Could not disable the unused versions of key {name}: {refused}"
            return Result(
                Outcome.failed("KeyRetirementFailed", first_line(message, 600)),
                status=status,
                requeue_after=60,
                conditions=conditions,
                detail=refused.detail,
            )
        status["retiredKeyVersionsFor"] = key.version
        if disabled:
            meta = owner["metadata"]
            KEY_VERSIONS.labels(meta["namespace"], meta["name"], "disabled").inc(len(disabled))
            events.normal(
                owner,
                "KeyVersionsDisabled",
                f"Nothing serves from key {name} version(s) {', '.join(disabled)} any more: "
                "disabled them (kept for audit and recovery)",
                action="DisableKeyVersions",
            )
    return assessment.outcome or outcome


def record_apply(owner: Mapping[str, Any], report: apply.ApplyReport) -> None:
    """Events for the writes of an apply pass. Once the children were applied for the current
    generation (status names the Service and observedGeneration is current), every write puts
    back what someone changed: DriftCorrected. Before, they follow the spec: ChildrenCreated,
    ChildrenUpdated, ChildrenDeleted."""
    if not report.writes:
        return
    status = owner.get("status") or {}
    current = status.get("observedGeneration") == owner["metadata"].get("generation")
    if current and status.get("serviceName"):
        done = [
            f"{verb} {', '.join(items)}"
            for verb, items in (
                ("re-created", report.created),
                ("restored", report.updated),
                ("deleted", report.deleted),
            )
            if items
        ]
        events.normal(
            owner,
            "DriftCorrected",
            f"Children were changed outside the spec: {'; '.join(done)}",
            action="Apply",
        )
        return
    for reason, verb, items in (
        ("ChildrenCreated", "Created", report.created),
        ("ChildrenUpdated", "Updated to the spec", report.updated),
        ("ChildrenDeleted", "Deleted, no longer wanted:", report.deleted),
    ):
        if items:
            events.normal(owner, reason, f"{verb} {', '.join(items)}", action="Apply")


async def _handle(body: kopf.Body, logger: Any, *, retry: bool = True) -> None:
    meta = body["metadata"]
    logs.start(KIND, meta["namespace"], meta["name"])
    evaluation = await asyncio.to_thread(
        refresh, meta["namespace"], meta["name"], logger, wait=True
    )
    if retry and evaluation is not None and evaluation.retry_in is not None:
        WORKQUEUE_RETRIES.labels(CONTROLLER, CONTROLLER).inc()
        raise kopf.TemporaryError(evaluation.retry_reason, delay=evaluation.retry_in)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
async def on_model(body: kopf.Body, logger: Any, **_: Any) -> None:
    await _handle(body, logger)


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=RESYNC_SECONDS, idle=RESYNC_SECONDS / 2)
async def resync_model(body: kopf.Body, logger: Any, **_: Any) -> None:
    """A periodic check for drift that no watch event reported; writes nothing when settled.

    It never asks kopf for a retry: a timer's retry would hold the next tick back by the
    retry's delay, and the next tick is the retry.
    """
    await _handle(body, logger, retry=False)


async def _on_child_event(event: Mapping[str, Any], logger: Any) -> None:
    child = event.get("object") or {}
    if child.get("kind") != "Pod":  # pods are listed fresh: they are not applied
        CHILDREN.observe(child, deleted=event.get("type") == "DELETED")
    child_meta = child.get("metadata", {})
    owner_name = (child_meta.get("labels") or {}).get(labels.INSTANCE)
    namespace = child_meta.get("namespace")
    if owner_name and namespace:
        logs.start(KIND, namespace, owner_name)
        await asyncio.to_thread(refresh, namespace, owner_name, logger, wait=False)


_CHILD_FILTER = {labels.OWNER_KIND: KIND}


@kopf.on.event("apps", "v1", "deployments", labels=_CHILD_FILTER)
@kopf.on.event("", "v1", "services", labels=_CHILD_FILTER)
@kopf.on.event("", "v1", "serviceaccounts", labels=_CHILD_FILTER)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=_CHILD_FILTER)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=_CHILD_FILTER)
@kopf.on.event("", "v1", "pods", labels=_CHILD_FILTER)
@kopf.on.event("batch", "v1", "jobs", labels=_CHILD_FILTER)
async def on_child_changed(event: kopf.RawEvent, logger: Any, **_: Any) -> None:
    """A child was edited, deleted or changed status: restore it and refresh the owner."""
    await _on_child_event(event, logger)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
async def on_model_deleted(body: kopf.Body, logger: Any, **_: Any) -> None:
    """Children go by garbage collection; the Key Vault key follows spec.deletionPolicy."""
    forget(KIND, body)
    meta = body["metadata"]
    with _lanes_guard:
        lane = _lanes.pop((meta["namespace"], meta["name"]), None)
        if lane is not None and lane.dirty:
            WORKQUEUE_DEPTH.labels(CONTROLLER, CONTROLLER).dec()
    for gauge in (MODEL_READY_REPLICAS,):
        with contextlib.suppress(KeyError):
            gauge.remove(meta["namespace"], meta["name"])
    try:
        spec = ConfidentialModelSpec.model_validate(dict(body.get("spec") or {}))
    except ValueError:
        logger.warning("spec unreadable at deletion: leaving the Key Vault key in place")
        return
    if spec.key_release.kbs_resource is not None:
        return  # the key is the KBS's, not Veil's
    try:
        outcome = await asyncio.to_thread(PORTS.remove_key, body, spec)
    except KeyVaultError as refused:
        message = f"could not delete the Key Vault key: {refused}"
        logger.warning("%s %s", message, refused.detail)
        await asyncio.to_thread(events.warning, body, "KeyDeletionFailed", message, "DeleteKey")
        raise kopf.TemporaryError(first_line(message, 600), delay=30) from refused
    logger.info(outcome)
    await asyncio.to_thread(events.normal, body, "DeletionPolicyApplied", outcome, "DeleteKey")
