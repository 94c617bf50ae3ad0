"""A LOCAL STAND-IN for the Azure Resource Manager agentPools endpoints of AKS. NOT a security
boundary: nothing is provisioned, and any caller holding the one static token may change it.

    GET|PUT /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.ContainerService/
            managedClusters/{c}/agentPools/{p}?api-version=...
    GET     /subscriptions/{s}/providers/Microsoft.ContainerService/locations/{l}/operations/{id}

PUT answers like AKS: 201 (new pool, provisioningState Creating) or 200 (existing, Updating)
with an `Azure-AsyncOperation` header and `Retry-After: 0`; the operation reports InProgress
for `steps` polls and then Succeeded (or Failed, when a test asks). Every GET of the pool or of
the operation advances it one step, standing in for the time AKS takes. The REAL
azure-mgmt-containerservice client and azure-mgmt-core's ARM poller talk to it; every request
body is recorded so tests can assert what went over the wire. Authentication: one expected
static bearer token.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from veil_standins.faults import FaultKind, FaultPlan, Faults

PROVIDER = "Microsoft.ContainerService"
LOCATION = "westeurope"


@dataclass
class _Operation:
    pool_key: tuple[str, str, str, str]
    steps: int
    fail_with: tuple[str, str] | None
    status: str = "InProgress"


@dataclass
class ArmDouble:
    token: str
    url: str = ""
    steps: int = 1
    clusters: set[tuple[str, str, str]] = field(default_factory=set)
    pools: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, _Operation] = field(default_factory=dict)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    _fail_next_put: list[tuple[int, str, str]] = field(default_factory=list)
    _fail_provisioning: set[str] = field(default_factory=set)
    # Seeded throttling, 409s, 503s and late answers (`faults.inject(FaultPlan(...))`).
    faults: Faults = field(default_factory=Faults)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # test controls
    def add_cluster(self, subscription: str, resource_group: str, cluster: str) -> None:
        with self._lock:
            self.clusters.add((subscription.lower(), resource_group.lower(), cluster.lower()))

    def fail_next_put(self, status: int, code: str, message: str) -> None:
        with self._lock:
            self._fail_next_put.append((status, code, message))

    def fail_provisioning(self, pool_name: str) -> None:
        """The next operation on this pool ends Failed (e.g. no capacity for the VM size)."""
        with self._lock:
            self._fail_provisioning.add(pool_name)

    def puts(self, cluster: str, pool_name: str) -> list[Any]:
        """Bodies of the PUTs received for one pool of one cluster."""
        suffix = f"/managedClusters/{cluster}/agentPools/{pool_name}".lower()
        with self._lock:
            return [
                body
                for method, path, body in self.requests
                if method == "PUT" and path.lower().endswith(suffix)
            ]

    def set_pool(
        self, subscription: str, resource_group: str, cluster: str, name: str, **props: Any
    ) -> None:
        """Put a pool in place as if created outside Veil (or by an earlier run)."""
        with self._lock:
            key = self._key(subscription, resource_group, cluster, name)
            self.pools[key] = {"provisioningState": "Succeeded", **props}

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._auth_middleware, self.faults.middleware(_fault_answer)]
        )
        base = (
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/"
            f"{PROVIDER}/managedClusters/{{cluster}}/agentPools/{{pool}}"
        )
        app.router.add_get(base, self._get_pool)
        app.router.add_put(base, self._put_pool)
        app.router.add_get(
            f"/subscriptions/{{sub}}/providers/{PROVIDER}/locations/{{loc}}/operations/{{op}}",
            self._get_operation,
        )
        return app

    @staticmethod
    def _key(sub: str, rg: str, cluster: str, name: str) -> tuple[str, str, str, str]:
        return (sub.lower(), rg.lower(), cluster.lower(), name.lower())

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append((request.method, request.path, body))
        if "api-version" not in request.query:
            return _error(400, "MissingApiVersionParameter", "api-version is required")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "InvalidAuthenticationToken", "The access token is invalid.")
        response: web.StreamResponse = await handler(request)
        return response

    def _resource(self, request: web.Request, props: dict[str, Any]) -> dict[str, Any]:
        m = request.match_info
        return {
            "id": (
                f"/subscriptions/{m['sub']}/resourceGroups/{m['rg']}/providers/{PROVIDER}/"
                f"managedClusters/{m['cluster']}/agentPools/{m['pool']}"
            ),
            "name": m["pool"],
            "type": f"{PROVIDER}/managedClusters/agentPools",
            "properties": copy.deepcopy(props),
        }

    def _advance(self, op: _Operation) -> None:
        """One step of time for an operation (caller holds the lock)."""
        if op.status != "InProgress":
            return
        if op.steps > 0:
            op.steps -= 1
            return
        pool = self.pools.get(op.pool_key)
        if op.fail_with is not None:
            op.status = "Failed"
            if pool is not None:
                pool["provisioningState"] = "Failed"
        else:
            op.status = "Succeeded"
            if pool is not None:
                pool["provisioningState"] = "Succeeded"

    async def _get_pool(self, request: web.Request) -> web.Response:
        m = request.match_info
        key = self._key(m["sub"], m["rg"], m["cluster"], m["pool"])
        with self._lock:
            for op in self.operations.values():
                if op.pool_key == key:
                    self._advance(op)
            pool = self.pools.get(key)
            if pool is None:
                return _error(
                    404, "NotFound", f"Agent pool {m['pool']} not found in cluster {m['cluster']}."
                )
            return web.json_response(self._resource(request, pool))

    async def _put_pool(self, request: web.Request) -> web.Response:
        m = request.match_info
        key = self._key(m["sub"], m["rg"], m["cluster"], m["pool"])
        body = await request.json()
        with self._lock:
            if self._fail_next_put:
                status, code, message = self._fail_next_put.pop(0)
                return _error(status, code, message)
            if key[:3] not in self.clusters:
                return _error(
                    404,
                    "ResourceNotFound",
                    f"The Resource '{PROVIDER}/managedClusters/{m['cluster']}' under resource "
                    f"group '{m['rg']}' was not found.",
                )
            props = dict(body.get("properties") or {})
            if not props.get("vmSize") and key not in self.pools:
                return _error(400, "InvalidParameter", "properties.vmSize is required.")
            for readonly in ("provisioningState", "currentOrchestratorVersion", "powerState"):
                props.pop(readonly, None)
            existed = key in self.pools
            state = "Updating" if existed else "Creating"
            props.update(
                provisioningState=state,
                currentOrchestratorVersion="1.33.2",
                powerState={"code": "Running"},
            )
            props.setdefault("osType", "Linux")
            self.pools[key] = props
            op_id = uuid.uuid4().hex
            fail = m["pool"] in self._fail_provisioning
            self._fail_provisioning.discard(m["pool"])
            self.operations[op_id] = _Operation(
                pool_key=key,
                steps=self.steps,
                fail_with=("OverconstrainedAllocationRequest", "No capacity") if fail else None,
            )
            resource = self._resource(request, props)
        headers = {
            "Azure-AsyncOperation": (
                f"{self.url}/subscriptions/{m['sub']}/providers/{PROVIDER}/locations/"
                f"{LOCATION}/operations/{op_id}?api-version=2016-03-30"
            ),
            "Retry-After": "0",
        }
        return web.json_response(resource, status=200 if existed else 201, headers=headers)

    async def _get_operation(self, request: web.Request) -> web.Response:
        op_id = request.match_info["op"]
        with self._lock:
            op = self.operations.get(op_id)
            if op is None:
                return _error(404, "NotFound", f"operation {op_id} not found")
            self._advance(op)
            body: dict[str, Any] = {"name": op_id, "status": op.status}
            if op.status == "Failed" and op.fail_with is not None:
                body["error"] = {"code": op.fail_with[0], "message": op.fail_with[1]}
        return web.json_response(body, headers={"Retry-After": "0"})


def _fault_answer(kind: FaultKind, plan: FaultPlan, request: web.Request) -> web.Response | None:
    """ARM's throttling (429 with Retry-After in seconds), AKS's refusal of a pool write while
    another operation runs (409 OperationNotAllowed, no Retry-After: only to writes) and a
    transient 503."""
    if kind == "throttle":
        access = "read" if request.method == "GET" else "write"
        response = _error(
            429,
            "SubscriptionRequestsThrottled",
            f"Number of '{access}' requests for subscription "
            f"'{request.match_info.get('sub', '')}' exceeded. Please try again after "
            f"'{plan.retry_after}' seconds.",
        )
        response.headers["Retry-After"] = str(plan.retry_after)
        return response
    if kind == "busy":
        if request.method == "GET":
            return None
        pool = request.match_info.get("pool", "")
        return _error(
            409,
            "OperationNotAllowed",
            f"Operation is not allowed: Another agentpool operation ({pool} - Updating) is in "
            "progress, please wait for it to finish before starting a new operation. See "
            "https://aka.ms/aks-pending-operation for more details",
        )
    if kind == "unavailable":
        return _error(
            503, "ServiceUnavailable", "The service is temporarily unavailable; retry later."
        )
    return None


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)
