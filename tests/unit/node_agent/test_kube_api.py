"""The real `KubernetesApi` (the kubernetes client) against a small HTTP double of the API
server: the TokenReview it sends and the object paths it reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client

from veil.node_agent.authz import KubernetesApi, KubeUnavailableError
from veil_standins.server import ServerThread

SEEN: list[dict[str, Any]] = []


async def _token_review(request: web.Request) -> web.Response:
    body = await request.json()
    SEEN.append(body)
    spec = body["spec"]
    authenticated = spec["token"] == "good" and spec["audiences"] == ["veil-node-agent"]
    status: dict[str, Any] = {"authenticated": authenticated}
    if authenticated:
        status["audiences"] = spec["audiences"]
        status["user"] = {
            "username": "system:serviceaccount:models:fraud",
            "extra": {"authentication.kubernetes.io/pod-name": ["fraud-1"]},
        }
    return web.json_response({**body, "status": status}, status=201)


async def _object(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name == "missing":
        return web.json_response({"kind": "Status", "code": 404}, status=404)
    if name == "broken":
        return web.json_response({"kind": "Status", "code": 500}, status=500)
    return web.json_response({"metadata": {"name": name, "path": request.path}})


@pytest.fixture(scope="module")
def api() -> Iterator[KubernetesApi]:
    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", _token_review)
    app.router.add_get("/api/v1/namespaces/{ns}/{plural}/{name}", _object)
    app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}", _object)
    server = ServerThread(app, None).start()
    configuration = client.Configuration(host=server.url)
    try:
        yield KubernetesApi(client.ApiClient(configuration))
    finally:
        server.stop()


def test_a_token_review_asks_for_the_agents_audience(api: KubernetesApi) -> None:
    status = api.review_token("good", ["veil-node-agent"])
    assert status["authenticated"] is True
    assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["fraud-1"]
    assert SEEN[-1]["spec"] == {"token": "good", "audiences": ["veil-node-agent"]}


@pytest.mark.parametrize(
    ("api_version", "kind", "path"),
    [
        ("v1", "Pod", "/api/v1/namespaces/models/pods/x"),
        ("apps/v1", "ReplicaSet", "/apis/apps/v1/namespaces/models/replicasets/x"),
        ("apps/v1", "Deployment", "/apis/apps/v1/namespaces/models/deployments/x"),
        (
            "veil.dev/v1alpha1",
            "ConfidentialModel",
            "/apis/veil.dev/v1alpha1/namespaces/models/confidentialmodels/x",
        ),
    ],
)
def test_objects_are_read_from_their_paths(
    api: KubernetesApi, api_version: str, kind: str, path: str
) -> None:
    found = api.get(api_version, kind, "models", "x")
    assert found is not None
    assert found["metadata"]["path"] == path


def test_a_missing_object_is_none_and_a_failing_server_is_unavailable(api: KubernetesApi) -> None:
    assert api.get("v1", "Pod", "models", "missing") is None
    with pytest.raises(KubeUnavailableError):
        api.get("v1", "Pod", "models", "broken")
