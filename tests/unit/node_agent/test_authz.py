"""Who may have a key released: the authorizer's decisions against a fake Kubernetes API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from veil.node_agent.authz import (
    ForbiddenError,
    PodAuthorizer,
    ReleaseAsk,
    UnauthenticatedError,
)

from .conftest import MODEL, NAMESPACE, NODE, POD_TOKEN, FakeKube, add_model_pod

VAULT = "https://veil.vault.azure.net"
MAA = "https://veilmaa.weu.attest.azure.net"
KEY = "fraud-key"
ASK = ReleaseAsk(VAULT, KEY, MAA)


@pytest.fixture
def kube() -> FakeKube:
    api = FakeKube()
    add_model_pod(
        api, namespace=NAMESPACE, model=MODEL, vault_url=VAULT, key_name=KEY, authority=MAA,
        token=POD_TOKEN,
    )  # fmt: skip
    return api


def _pod(kube: FakeKube) -> dict[str, Any]:
    return next(o for (kind, _, _), o in kube.objects.items() if kind == "Pod")


def _of(kube: FakeKube, kind: str) -> dict[str, Any]:
    return next(o for (k, _, _), o in kube.objects.items() if k == kind)


def test_the_models_own_pod_is_granted(kube: FakeKube) -> None:
    grant = PodAuthorizer(kube, NODE).authorize(POD_TOKEN, ASK, "127.0.0.1")
    assert (grant.namespace, grant.model) == (NAMESPACE, MODEL)


def test_the_maa_endpoint_may_be_a_bare_host(kube: FakeKube) -> None:
    ask = ReleaseAsk(VAULT + "/", KEY, "veilmaa.weu.attest.azure.net")
    assert PodAuthorizer(kube, NODE).authorize(POD_TOKEN, ask, "127.0.0.1").pod


def test_a_token_not_bound_to_a_pod_is_unauthenticated(kube: FakeKube) -> None:
    kube.reviews[POD_TOKEN]["user"]["extra"] = {}
    with pytest.raises(UnauthenticatedError, match="not bound to a pod"):
        PodAuthorizer(kube, NODE).authorize(POD_TOKEN, ASK, "127.0.0.1")


def test_a_user_token_is_unauthenticated(kube: FakeKube) -> None:
    kube.reviews[POD_TOKEN]["user"]["username"] = "alice@example.com"
    with pytest.raises(UnauthenticatedError, match="not a ServiceAccount token"):
        PodAuthorizer(kube, NODE).authorize(POD_TOKEN, ASK, "127.0.0.1")


Mutation = Callable[[FakeKube], None]


HERE = "127.0.0.1"


def _nothing(kube: FakeKube) -> None:
    """The objects as the operator made them: the ask or the peer is what is wrong."""


def _pod_recreated(kube: FakeKube) -> None:
    _pod(kube)["metadata"]["uid"] = "recreated"


def _pod_finished(kube: FakeKube) -> None:
    _pod(kube)["status"]["phase"] = "Succeeded"


def _pod_other_account(kube: FakeKube) -> None:
    _pod(kube)["spec"]["serviceAccountName"] = "other"


def _bare_pod(kube: FakeKube) -> None:
    _pod(kube)["metadata"].pop("ownerReferences")


def _replica_set_replaced(kube: FakeKube) -> None:
    _of(kube, "ReplicaSet")["metadata"]["uid"] = "replaced"


def _deployment_of_a_job(kube: FakeKube) -> None:
    _of(kube, "Deployment")["metadata"]["ownerReferences"][0]["kind"] = "Job"


@pytest.mark.parametrize(
    ("mutate", "ask", "peer", "why"),
    [
        (_pod_recreated, ASK, HERE, "no longer exists"),
        (_pod_finished, ASK, HERE, "not running"),
        (_nothing, ASK, "10.0.0.9", "does not come from pod"),
        (_pod_other_account, ASK, HERE, "does not run as"),
        (_bare_pod, ASK, HERE, "not controlled by"),
        (_replica_set_replaced, ASK, HERE, "no longer exists"),
        (_deployment_of_a_job, ASK, HERE, "not controlled by a veil.dev/v1alpha1"),
        (_nothing, ReleaseAsk(VAULT, "other-key", MAA), HERE, "does not use this key"),
        (_nothing, ReleaseAsk("https://evil.vault.azure.net", KEY, MAA), HERE, "not use this key"),
        (_nothing, ReleaseAsk(VAULT, KEY, "https://rogue.attest.net"), HERE, "another attestation"),
    ],
)
def test_refusals(kube: FakeKube, mutate: Mutation, ask: ReleaseAsk, peer: str, why: str) -> None:
    mutate(kube)
    with pytest.raises(ForbiddenError, match=why):
        PodAuthorizer(kube, NODE).authorize(POD_TOKEN, ask, peer)


def test_a_pod_running_as_another_account_of_the_namespace_is_refused(kube: FakeKube) -> None:
    """Same namespace, same owner chain, but the token is another ServiceAccount's."""
    kube.reviews[POD_TOKEN]["user"]["username"] = f"system:serviceaccount:{NAMESPACE}:default"
    _pod(kube)["spec"]["serviceAccountName"] = "default"
    with pytest.raises(ForbiddenError, match="the model's account"):
        PodAuthorizer(kube, NODE).authorize(POD_TOKEN, ASK, "127.0.0.1")
