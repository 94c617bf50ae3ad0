"""Idempotent server-side apply of children, with Veil as the field manager."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from veil.kube.cache import ABSENT, ChildCache, key_of
from veil.kube.drift import contains, first_difference
from veil.labels import FIELD_MANAGER

log = logging.getLogger(__name__)


def api_client() -> client.ApiClient:
    """In a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = client.Configuration.get_default_copy()
    # One connection per worker thread (VEIL_WORKER_THREADS), not urllib3's default of 10.
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


# The dynamic client's discovery cache is not thread-safe; reconciles run in threads.
_discovery_lock = threading.Lock()


@functools.cache
def _dynamic_client() -> DynamicClient:
    return DynamicClient(api_client())  # type: ignore[no-untyped-call]


def dynamic_client() -> DynamicClient:
    """One discovery-caching client per process."""
    with _discovery_lock:
        return _dynamic_client()


class KindNotInstalledError(Exception):
    """The cluster does not serve this kind (e.g. Cilium's CRDs are absent)."""


@dataclass
class ApplyReport:
    """What one apply pass did, so callers can count writes and explain them."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def writes(self) -> int:
        return len(self.created) + len(self.updated) + len(self.deleted)


# Kinds found by discovery. A search of the dynamic client's discovery (and the rewrite of its
# cache file that may follow) cost a quarter of the operator's CPU when done per child per
# reconcile; a kind it does not find makes it fetch the whole discovery again. So found kinds
# are kept, and a kind not served (e.g. Cilium's, before Cilium is installed) is searched for
# again only after MISSING_KIND_SECONDS.
MISSING_KIND_SECONDS = 30.0
_resources: dict[tuple[str, str], Any] = {}
_missing: dict[tuple[str, str], float] = {}


def _resource(dyn: DynamicClient, api_version: str, kind: str) -> Any:
    key = (api_version, kind)
    found = _resources.get(key)
    if found is not None:
        return found
    problem = f"{kind}.{api_version} is not served by this cluster"
    if time.monotonic() < _missing.get(key, 0.0):
        raise KindNotInstalledError(problem)
    try:
        with _discovery_lock:
            found = dyn.resources.get(api_version=api_version, kind=kind)
    except ResourceNotFoundError as missing:
        _missing[key] = time.monotonic() + MISSING_KIND_SECONDS
        raise KindNotInstalledError(problem) from missing
    _resources[key] = found
    _missing.pop(key, None)
    return found


def _plain(_: DynamicClient, document: dict[str, Any]) -> dict[str, Any]:
    """The decoded JSON as it is (the dynamic client's ResourceInstance costs a deep copy into
    attribute objects and another back into dicts)."""
    return document


def _get(resource: Any, name: str, namespace: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = resource.get(name=name, namespace=namespace, serializer=_plain)
    except NotFoundError:
        return None
    return found


def _live(
    resource: Any, manifest: dict[str, Any], cache: ChildCache | None
) -> dict[str, Any] | None:
    """The live child as the cache last saw it, else as a GET answers (None: absent)."""
    meta = manifest["metadata"]
    seen = cache.lookup(key_of(manifest)) if cache is not None else None
    if seen is None:
        return _get(resource, meta["name"], meta["namespace"])
    return None if seen is ABSENT else seen


def ensure(
    manifests: Iterable[dict[str, Any]],
    report: ApplyReport | None = None,
    cache: ChildCache | None = None,
) -> ApplyReport:
    """Apply each manifest that is missing or differs from the live object; skip the rest.
    With a `cache` of the children's watches, the live object is read from it when known."""
    dyn = dynamic_client()
    report = report or ApplyReport()
    for manifest in manifests:
        meta = manifest["metadata"]
        label = f"{manifest['kind']}/{meta['name']}"
        resource = _resource(dyn, manifest["apiVersion"], manifest["kind"])
        live = _live(resource, manifest, cache)
        if live is not None and contains(live, manifest):
            report.unchanged.append(label)
            continue
        if live is not None:
            log.info("correcting %s at %s", label, first_difference(live, manifest))
        applied = resource.server_side_apply(
            body=manifest,
            name=meta["name"],
            namespace=meta["namespace"],
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
            serializer=_plain,
        )
        if cache is not None and isinstance(applied, dict):
            cache.observe(applied)  # fresher than the watch event still on its way
        (report.created if live is None else report.updated).append(label)
    return report


def ensure_absent(
    children: Iterable[tuple[str, str, str]],
    namespace: str,
    owner_uid: str,
    report: ApplyReport | None = None,
    propagation: str | None = None,
) -> ApplyReport:
    """Delete children that should no longer exist, but only ones this owner controls."""
    dyn = dynamic_client()
    report = report or ApplyReport()
    for api_version, kind, name in children:
        try:
            resource = _resource(dyn, api_version, kind)
        except KindNotInstalledError:
            continue
        live = _get(resource, name, namespace)
        if live is None:
            continue
        owners = live.get("metadata", {}).get("ownerReferences") or []
        if not any(ref.get("uid") == owner_uid for ref in owners):
            continue
        body = {"propagationPolicy": propagation} if propagation else None
        resource.delete(name=name, namespace=namespace, body=body)
        report.deleted.append(f"{kind}/{name}")
    return report


def get_object(
    api_version: str, kind: str, name: str, namespace: str, cache: ChildCache | None = None
) -> dict[str, Any] | None:
    """The object, or None when it does not exist; from `cache` when it saw the object."""
    seen = cache.lookup((api_version, kind, namespace, name)) if cache is not None else None
    if seen is not None:
        return None if seen is ABSENT else seen
    return _get(_resource(dynamic_client(), api_version, kind), name, namespace)


def create_object(api_version: str, kind: str, namespace: str, body: dict[str, Any]) -> None:
    """Create an object (its answer is not read)."""
    resource = _resource(dynamic_client(), api_version, kind)
    resource.create(body=body, namespace=namespace, serializer=_plain)


def patch_object(
    api_version: str, kind: str, name: str, namespace: str, patch: dict[str, Any]
) -> bool:
    """Merge-patch an existing object; False when it does not exist (never creates it)."""
    resource = _resource(dynamic_client(), api_version, kind)
    try:
        resource.patch(
            body=patch,
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
            serializer=_plain,
        )
    except NotFoundError:
        return False
    return True


def patch_status(
    api_version: str, kind: str, name: str, namespace: str, status: dict[str, Any]
) -> None:
    resource = _resource(dynamic_client(), api_version, kind)
    resource.status.patch(
        body={"status": status},
        name=name,
        namespace=namespace,
        content_type="application/merge-patch+json",
    )


def list_objects(
    api_version: str, kind: str, namespace: str, selector: dict[str, str]
) -> list[dict[str, Any]]:
    resource = _resource(dynamic_client(), api_version, kind)
    label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    found = resource.get(namespace=namespace, label_selector=label_selector, serializer=_plain)
    return list(found.get("items") or [])
