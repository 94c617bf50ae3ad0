"""`veil.kube.apply`: discovery lookups kept once found (a kind not served is asked for again
only after a while: each miss makes the dynamic client fetch all of discovery again), and
children compared with what the watch cache saw instead of a GET per child."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from veil.kube import apply
from veil.kube.cache import ChildCache


class _Resources:
    def __init__(self, served: set[tuple[str, str]]) -> None:
        self.served = served
        self.searches: list[tuple[str, str]] = []

    def get(self, *, api_version: str, kind: str) -> Any:
        self.searches.append((api_version, kind))
        if (api_version, kind) not in self.served:
            raise ResourceNotFoundError(f"No matches found for {kind}")
        return f"resource {kind}"


class _Dynamic:
    def __init__(self, served: set[tuple[str, str]]) -> None:
        self.resources = _Resources(served)


@pytest.fixture(autouse=True)
def _empty_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apply, "_resources", {})
    monkeypatch.setattr(apply, "_missing", {})


def test_a_served_kind_is_searched_once() -> None:
    dyn = _Dynamic({("apps/v1", "Deployment")})
    for _ in range(3):
        assert apply._resource(dyn, "apps/v1", "Deployment") == "resource Deployment"  # type: ignore[arg-type]
    assert dyn.resources.searches == [("apps/v1", "Deployment")]


def test_a_missing_kind_is_searched_again_only_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    kind = ("cilium.io/v2", "CiliumNetworkPolicy")
    dyn = _Dynamic(set())
    for _ in range(3):
        with pytest.raises(apply.KindNotInstalledError, match="not served by this cluster"):
            apply._resource(dyn, *kind)  # type: ignore[arg-type]
    assert dyn.resources.searches == [kind]
    # Cilium is installed; the operator sees it once the wait is over.
    dyn.resources.served.add(kind)
    clock[0] += apply.MISSING_KIND_SECONDS + 1
    assert apply._resource(dyn, *kind) == "resource CiliumNetworkPolicy"  # type: ignore[arg-type]
    assert dyn.resources.searches == [kind, kind]


class _Children:
    """A resource of the dynamic client: GETs answered from `live`, applies recorded."""

    def __init__(self, live: dict[str, dict[str, Any]]) -> None:
        self.live = live
        self.gets: list[str] = []
        self.applies: list[str] = []

    def get(self, *, name: str, namespace: str, serializer: Any) -> dict[str, Any]:
        self.gets.append(name)
        if name not in self.live:
            raise NotFoundError(ApiException(status=404, reason="Not Found"))  # type: ignore[no-untyped-call]
        return self.live[name]

    def server_side_apply(self, *, body: dict[str, Any], name: str, **_: Any) -> dict[str, Any]:
        self.applies.append(name)
        self.live[name] = {**body, "status": {"observed": True}}
        return self.live[name]


def _service(name: str, port: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"ports": [{"port": port}]},
    }


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> _Children:
    resource = _Children({})
    monkeypatch.setattr(apply, "dynamic_client", lambda: None)
    monkeypatch.setattr(apply, "_resource", lambda *_: resource)
    return resource


def test_with_a_cache_a_settled_child_is_neither_read_nor_applied(children: _Children) -> None:
    cache = ChildCache()
    first = apply.ensure([_service("m")], cache=cache)
    assert first.created == ["Service/m"]
    assert children.gets == ["m"]  # never seen: a GET (404), then the apply
    # The apply's answer is cached: the next pass reads nothing and writes nothing.
    second = apply.ensure([_service("m")], cache=cache)
    assert second.unchanged == ["Service/m"]
    assert (children.gets, children.applies) == (["m"], ["m"])


def test_with_a_cache_drift_and_deletion_seen_by_the_watch_are_corrected(
    children: _Children,
) -> None:
    cache = ChildCache()
    apply.ensure([_service("m")], cache=cache)
    # Someone edits the child; the watch delivers it.
    cache.observe(_service("m", port=9999))
    assert apply.ensure([_service("m")], cache=cache).updated == ["Service/m"]
    # Someone deletes it; the watch says so: applied again, without a GET.
    cache.observe(_service("m"), deleted=True)
    assert apply.ensure([_service("m")], cache=cache).created == ["Service/m"]
    assert children.gets == ["m"]
    assert children.applies == ["m", "m", "m"]


def test_without_a_cache_every_pass_reads_the_live_child(children: _Children) -> None:
    apply.ensure([_service("m")])
    assert apply.ensure([_service("m")]).unchanged == ["Service/m"]
    assert children.gets == ["m", "m"]
