"""Who may have a model key released by this node's agent.

A caller proves who it is with its projected ServiceAccount token (audience "veil-node-agent").
A TokenReview names the pod it was issued for (user extra `authentication.kubernetes.io/pod-name`
and `pod-uid`, present for projected tokens since Kubernetes 1.21); the key goes only to a live
pod with that uid that runs on this node, is the address the request came from, and belongs to a
ConfidentialModel (controller chain Pod -> ReplicaSet -> Deployment -> ConfidentialModel, uids
checked at each step) of the pod's own namespace whose `spec.keyRelease` names exactly the
requested vault, key and attestation authority, and whose ServiceAccount the pod runs as.

Everything the Kubernetes API is asked goes through `KubeApi`, a narrow protocol, so tests drive
the decision with a fake API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from veil import API_GROUP, API_VERSION

AUDIENCE = "veil-node-agent"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
MODEL_API_VERSION = f"{API_GROUP}/{API_VERSION}"
MODEL_KIND = "ConfidentialModel"
_SA_PREFIX = "system:serviceaccount:"


class UnauthenticatedError(Exception):
    """The caller's token is missing, invalid, or not a pod-bound token for this agent."""


class ForbiddenError(Exception):
    """The caller is known but may not have this key; the message says why in one line."""


class KubeUnavailableError(Exception):
    """The Kubernetes API could not be asked (retriable)."""


class KubeApi(Protocol):
    """What the authorizer asks the Kubernetes API. Objects come back as plain JSON dicts;
    a missing object is None; an unreachable API raises KubeUnavailableError."""

    def review_token(self, token: str, audiences: list[str]) -> Mapping[str, Any]:
        """The `status` of a TokenReview of `token` for `audiences`."""
        ...

    def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> Mapping[str, Any] | None:
        """A namespaced object: Pod (v1), ReplicaSet / Deployment (apps/v1), ConfidentialModel."""
        ...


@dataclass(frozen=True)
class ReleaseAsk:
    """What a pod asks for (the wrapping key is not part of the decision)."""

    vault_url: str
    key_name: str
    maa_endpoint: str


@dataclass(frozen=True)
class Grant:
    namespace: str
    pod: str
    model: str


def _normalize_url(url: str) -> str:
    text = url.strip().rstrip("/").lower()
    return text if "://" in text else f"https://{text}"


def _controller(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return next((r for r in refs if isinstance(r, Mapping) and r.get("controller")), None)


@dataclass
class PodAuthorizer:
    api: KubeApi
    node_name: str
    audience: str = AUDIENCE
    check_peer: bool = True

    def _identity(self, token: str) -> tuple[str, str, str, str]:
        """(namespace, service account, pod name, pod uid) of a valid pod-bound token."""
        status = self.api.review_token(token, [self.audience])
        if not status.get("authenticated"):
            raise UnauthenticatedError(str(status.get("error") or "the token is not valid"))
        if self.audience not in (status.get("audiences") or []):
            raise UnauthenticatedError(f"the token is not for audience {self.audience!r}")
        user = status.get("user") or {}
        username = str(user.get("username", ""))
        parts = username.removeprefix(_SA_PREFIX).split(":")
        if not username.startswith(_SA_PREFIX) or len(parts) != 2:
            raise UnauthenticatedError("the token is not a ServiceAccount token")
        extra = user.get("extra") or {}
        pod_name, pod_uid = (extra.get(k) or [""] for k in (POD_NAME_EXTRA, POD_UID_EXTRA))
        if not pod_name[0] or not pod_uid[0]:
            raise UnauthenticatedError("the token is not bound to a pod")
        return parts[0], parts[1], str(pod_name[0]), str(pod_uid[0])

    def _owner(
        self, namespace: str, child: Mapping[str, Any], api_version: str, kind: str
    ) -> Mapping[str, Any]:
        """The controller of `child`, which must be a `kind` with the uid the reference names."""
        ref = _controller(child)
        what = f"{child.get('kind', 'object')} {child.get('metadata', {}).get('name')}"
        if ref is None or (ref.get("apiVersion"), ref.get("kind")) != (api_version, kind):
            raise ForbiddenError(f"{what} is not controlled by a {api_version} {kind}")
        owner = self.api.get(api_version, kind, namespace, str(ref.get("name")))
        if owner is None or owner.get("metadata", {}).get("uid") != ref.get("uid"):
            raise ForbiddenError(f"the {kind} controlling {what} no longer exists")
        return owner

    def authorize(self, token: str, ask: ReleaseAsk, peer: str | None) -> Grant:
        namespace, account, pod_name, pod_uid = self._identity(token)
        pod = self.api.get("v1", "Pod", namespace, pod_name)
        if pod is None or pod.get("metadata", {}).get("uid") != pod_uid:
            raise ForbiddenError(f"pod {namespace}/{pod_name} of the token no longer exists")
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        if spec.get("nodeName") != self.node_name:
            raise ForbiddenError(f"pod {namespace}/{pod_name} runs on another node")
        if status.get("phase") not in ("Pending", "Running"):
            raise ForbiddenError(f"pod {namespace}/{pod_name} is not running")
        if self.check_peer and peer != status.get("podIP"):
            raise ForbiddenError(f"the request does not come from pod {namespace}/{pod_name}")
        if spec.get("serviceAccountName", "default") != account:
            raise ForbiddenError(f"pod {namespace}/{pod_name} does not run as {account}")
        replica_set = self._owner(namespace, {"kind": "Pod", **pod}, "apps/v1", "ReplicaSet")
        deployment = self._owner(namespace, replica_set, "apps/v1", "Deployment")
        model = self._owner(namespace, deployment, MODEL_API_VERSION, MODEL_KIND)
        model_name = str(model.get("metadata", {}).get("name"))
        release = (model.get("spec") or {}).get("keyRelease") or {}
        if (
            _normalize_url(str(release.get("vaultUrl", ""))) != _normalize_url(ask.vault_url)
            or release.get("keyName") != ask.key_name
        ):
            raise ForbiddenError(f"model {namespace}/{model_name} does not use this key")
        authority = _normalize_url(str(release.get("attestationAuthority", "")))
        if authority != _normalize_url(ask.maa_endpoint):
            raise ForbiddenError(
                f"model {namespace}/{model_name} names another attestation authority"
            )
        if account != model_name:
            raise ForbiddenError(f"pod {namespace}/{pod_name} does not run as the model's account")
        return Grant(namespace, pod_name, model_name)


# -- the real API -----------------------------------------------------------------------------


class KubernetesApi:
    """`KubeApi` through the kubernetes client (in-cluster or kubeconfig configuration)."""

    def __init__(self, api_client: Any) -> None:
        self._client = api_client

    @classmethod
    def from_environment(cls) -> KubernetesApi:
        from kubernetes import client, config

        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        return cls(client.ApiClient())

    def review_token(self, token: str, audiences: list[str]) -> Mapping[str, Any]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        review = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=audiences)
        )
        try:
            answer = client.AuthenticationV1Api(self._client).create_token_review(review)
        except (ApiException, OSError) as exc:
            raise KubeUnavailableError(f"TokenReview failed: {exc}") from exc
        status: dict[str, Any] = self._client.sanitize_for_serialization(answer).get("status", {})
        return status

    def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> Mapping[str, Any] | None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        readers: dict[tuple[str, str], Any] = {
            ("v1", "Pod"): client.CoreV1Api(self._client).read_namespaced_pod,
            ("apps/v1", "ReplicaSet"): client.AppsV1Api(self._client).read_namespaced_replica_set,
            ("apps/v1", "Deployment"): client.AppsV1Api(self._client).read_namespaced_deployment,
        }
        custom = client.CustomObjectsApi(self._client).get_namespaced_custom_object
        try:
            if (api_version, kind) in readers:
                answer = readers[(api_version, kind)](
                    name, namespace, _request_timeout=10, _preload_content=False
                )
            elif (api_version, kind) == (MODEL_API_VERSION, MODEL_KIND):
                answer = custom(
                    API_GROUP, API_VERSION, namespace, "confidentialmodels", name,
                    _request_timeout=10, _preload_content=False,
                )  # fmt: skip
            else:
                raise ForbiddenError(f"unexpected owner {api_version} {kind}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeUnavailableError(
                f"cannot read {kind} {namespace}/{name}: {exc.reason}"
            ) from exc
        except OSError as exc:
            raise KubeUnavailableError(f"cannot read {kind} {namespace}/{name}: {exc}") from exc
        # Raw JSON: the generated models would drop what they do not know, or refuse partial
        # objects; the authorizer reads plain fields.
        try:
            found = json.loads(answer.data)
        except (ValueError, AttributeError) as exc:
            raise KubeUnavailableError(f"{kind} {namespace}/{name} is not JSON") from exc
        return found if isinstance(found, dict) else None
