"""Discovery lookups of `veil.kube.apply`: kept once found; a kind not served is asked for again
only after a while (each miss makes the dynamic client fetch all of discovery again)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from veil.kube import apply


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
