"""AKS node pools of confidential VMs. SYNCHRONOUS (blocking I/O).

Call from the async controller with `await asyncio.to_thread(ensure_confidential_pool, ...)`.
By default (`wait=False`) one call issues at most one write and returns at once with the pool's
provisioning state (`Creating`, `Updating`, `Succeeded`, `Failed`, ...): the controller records
it and requeues until `PoolState.ready`, instead of holding a worker for the 5-10 minutes AKS
takes. `wait=True` follows the long-running operation to its end (tests, CLI).

Choices:

- VM sizes: only the confidential families, checked before any call: AMD SEV-SNP DCasv5,
  DCadsv5, ECasv5, ECadsv5 and their v6 successors; Intel TDX DCesv5, DCedsv5, ECesv5, ECedsv5
  and v6; and the confidential GPU family NCCads H100 v5 (SEV-SNP). AKS then gives the nodes
  `kubernetes.azure.com/security-type: ConfidentialVM` itself. A GPU pool also gets the taint
  `nvidia.com/gpu=present:NoSchedule` (only pods asking for a GPU tolerate it); its GPU driver
  in confidential mode is the cluster's to install (e.g. the NVIDIA GPU operator), as AKS
  documents for these sizes.
- OS: `AzureLinux` by default. `Ubuntu` resolves to Ubuntu 22.04 on Kubernetes 1.25-1.34, which
  confidential VM pools do not support (nor Windows, FIPS or Trusted Launch); AzureLinux is
  supported on every current version. Pass `os_sku` to choose, e.g. "Ubuntu2404". The OS of an
  existing pool is never changed by Veil.
- Veil marks the nodes with its own label `veil.dev/confidential=true` and taint
  `veil.dev/confidential=true:NoSchedule`, which only Veil's workloads tolerate, so nothing else
  lands on (and shares the vTPM trust boundary of) the confidential nodes.
- An existing pool is read first; Veil writes only when count (unless autoscaled), mode, its
  labels or its taints differ, and never while AKS is still busy with the pool. A different VM
  size is an error: AKS cannot resize a pool in place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.mgmt.containerservice import ContainerServiceClient
from azure.mgmt.containerservice.models import (
    AgentPool,
)
from azure.mgmt.containerservice.models import (
    AgentPoolManagedClusterAgentPoolProfileProperties as AgentPoolProperties,
)

from veil.api.confidential_model import NodePool, Platform
from veil.azure.credentials import AzureSettings
from veil.azure.errors import (
    RETRIABLE_STATUS,
    AzureOperationError,
    brief,
    error_code,
    service_message,
    transient_wait,
    waiting,
)

log = logging.getLogger("veil.azure.node_pools")

VEIL_LABEL: Final = "veil.dev/confidential"
VEIL_LABEL_VALUE: Final = "true"
VEIL_TAINT: Final = f"{VEIL_LABEL}={VEIL_LABEL_VALUE}:NoSchedule"
AKS_SECURITY_TYPE_LABEL: Final = "kubernetes.azure.com/security-type"
DEFAULT_OS_SKU: Final = "AzureLinux"

# Standard_DC4as_v5, Standard_EC16ads_v5, Standard_DC8es_v6, ... (family letter after the core
# count: a = AMD SEV-SNP, e = Intel TDX; d = local temp disk), and the confidential GPU sizes
# Standard_NCC40ads_H100_v5 (AMD SEV-SNP, the H100 in confidential-computing mode).
_SIZE = re.compile(
    r"^Standard_(?:(?P<series>[DE]C)(?P<cores>[0-9]+)(?P<kind>as|ads|es|eds)_v(?P<gen>[56])"
    r"|(?P<gpu>NCC)[0-9]+ads_H100_v5)$"
)
_PLATFORM_OF_KIND: Final[Mapping[str, Platform]] = {
    "as": "sevsnp",
    "ads": "sevsnp",
    "es": "tdx",
    "eds": "tdx",
}
SEVSNP_FAMILIES: Final = (
    "DCasv5",
    "DCadsv5",
    "ECasv5",
    "ECadsv5",
    "DCasv6",
    "DCadsv6",
    "ECasv6",
    "ECadsv6",
)
TDX_FAMILIES: Final = (
    "DCesv5",
    "DCedsv5",
    "ECesv5",
    "ECedsv5",
    "DCesv6",
    "DCedsv6",
    "ECesv6",
    "ECedsv6",
)

GPU_FAMILIES: Final = ("NCCadsH100v5",)
# GPU pools Veil creates carry the device plugin's resource name as a taint too, so only pods
# that ask for a GPU (and tolerate it, as the training pods do) take their costly nodes.
GPU_TAINT: Final = "nvidia.com/gpu=present:NoSchedule"

_BUSY_STATES = frozenset(
    {
        "creating",
        "updating",
        "scaling",
        "deleting",
        "upgrading",
        "starting",
        "stopping",
        "migrating",
    }
)


class NodePoolError(AzureOperationError):
    """Ensuring the pool failed; `str(error)` is the plain-words reason."""


@dataclass(frozen=True)
class PoolState:
    """What the pool looks like after this call. `changed` is True when this call wrote."""

    name: str
    provisioning_state: str
    vm_size: str
    count: int | None
    platform: Platform
    changed: bool

    @property
    def ready(self) -> bool:
        return self.provisioning_state.lower() == "succeeded"

    @property
    def failed(self) -> bool:
        return self.provisioning_state.lower() == "failed"


def confidential_platform(vm_size: str) -> Platform:
    """The TEE platform of a confidential VM size, or NodePoolError naming the allowed families."""
    match = _SIZE.match(vm_size)
    if match is None:
        raise NodePoolError(
            f"VM size {vm_size!r} is not a confidential VM size: use an AMD SEV-SNP size "
            f"({', '.join(SEVSNP_FAMILIES)}, e.g. Standard_DC4as_v5) or an Intel TDX size "
            f"({', '.join(TDX_FAMILIES)}, e.g. Standard_DC4es_v5) or a confidential GPU size "
            f"({', '.join(GPU_FAMILIES)}, e.g. Standard_NCC40ads_H100_v5)"
        )
    return _platform_of(match)


def _platform_of(match: re.Match[str]) -> Platform:
    return "sevsnp" if match.group("gpu") else _PLATFORM_OF_KIND[match.group("kind")]


def is_gpu_size(vm_size: str) -> bool:
    """Whether a confidential VM size carries a GPU (NCCads H100 v5)."""
    match = _SIZE.match(vm_size)
    return match is not None and match.group("gpu") is not None


def container_service_client(
    subscription_id: str, settings: AzureSettings
) -> ContainerServiceClient:
    """A ContainerServiceClient with Veil's credential, TLS options and ARM endpoint."""
    return ContainerServiceClient(
        settings.credential,
        subscription_id,
        base_url=settings.arm_endpoint,
        **settings.client_kwargs(),
    )


def _desired_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    return {VEIL_LABEL: VEIL_LABEL_VALUE, **(labels or {})}


def _desired_taints(taints: Sequence[str] | None, vm_size: str = "") -> list[str]:
    out = [VEIL_TAINT, *([GPU_TAINT] if is_gpu_size(vm_size) else [])]
    for taint in taints or ():
        if taint not in out:
            out.append(taint)
    return out


def desired_agent_pool(
    pool: NodePool,
    labels: Mapping[str, str] | None = None,
    taints: Sequence[str] | None = None,
    *,
    os_sku: str = DEFAULT_OS_SKU,
) -> AgentPool:
    """The AgentPool Veil creates for a NodePool spec (pure; validates the VM size)."""
    confidential_platform(pool.vm_size)
    return AgentPool(
        properties=AgentPoolProperties(
            vm_size=pool.vm_size,
            count=pool.count,
            os_type="Linux",
            os_sku=os_sku,
            mode="User",
            node_labels=_desired_labels(labels),
            node_taints=_desired_taints(taints, pool.vm_size),
        )
    )


def _text(value: object) -> str:
    """A model field as plain text (the SDK's str-valued enums print as `Enum.MEMBER`)."""
    if value is None:
        return ""
    return str(value.value) if isinstance(value, Enum) else str(value)


def _properties(agent_pool: AgentPool) -> AgentPoolProperties:
    return agent_pool.properties or AgentPoolProperties()


def _drift(
    have: AgentPoolProperties, pool: NodePool, labels: dict[str, str], taints: list[str]
) -> list[str]:
    """What differs between an existing pool and what Veil wants (empty: nothing to write)."""
    if (have.vm_size or "").lower() != pool.vm_size.lower():
        raise NodePoolError(
            f"node pool {pool.name!r} exists with VM size {have.vm_size!r}, not "
            f"{pool.vm_size!r}; AKS cannot change a pool's VM size: delete the pool or choose "
            "another nodePool.name"
        )
    drift: list[str] = []
    if not have.enable_auto_scaling and have.count != pool.count:
        drift.append(f"count {have.count} -> {pool.count}")
    if _text(have.mode).lower() != "user":
        drift.append(f"mode {have.mode} -> User")
    have_labels = dict(have.node_labels or {})
    drift.extend(
        f"label {key}={value}" for key, value in labels.items() if have_labels.get(key) != value
    )
    have_taints = list(have.node_taints or [])
    drift.extend(f"taint {taint}" for taint in taints if taint not in have_taints)
    return drift


def _is_tdx(pool: NodePool) -> bool:
    match = _SIZE.match(pool.vm_size)
    return match is not None and _platform_of(match) == "tdx"


def _explain(  # noqa: PLR0911
    error: AzureError, pool: NodePool, action: str
) -> NodePoolError:
    """A plain-words NodePoolError with the first line of Azure's answer; its whole text is
    the error's `detail`."""
    where = (
        f"{action} node pool {pool.name!r} of cluster {pool.cluster_name!r} "
        f"in resource group {pool.resource_group!r}"
    )
    if isinstance(error, ClientAuthenticationError) and error.status_code in (None, 401):
        # A DefaultAzureCredential failure lists every credential it tried: detail only.
        text = str(error.message)
        return NodePoolError(
            f"Azure Resource Manager did not accept the operator's credentials ({where}). "
            f"Check the workload identity; cause: {brief(text)}",
            status=error.status_code,
            detail=text,
        )
    if isinstance(error, HttpResponseError) and error.status_code is not None:
        status = error.status_code
        code = error_code(error)
        detail = service_message(error)
        short = brief(detail)
        if status < 400 and _is_tdx(pool):
            return NodePoolError(
                f"AKS could not provision the Intel TDX pool {pool.name!r} ({code or 'Failed'}): "
                "AKS currently fails to create TDX confidential node pools (Azure/AKS#5618). Use "
                "an AMD SEV-SNP size (e.g. Standard_DC4as_v5) until AKS supports TDX pools.",
                status=status,
                code=code,
                detail=detail,
            )
        if status < 400:
            # The long-running operation itself ended Failed (the poll answered 200).
            return NodePoolError(
                f"AKS could not provision the pool ({where}; {code or 'Failed'}): {short}; "
                "Veil will try again",
                status=status,
                code=code,
                retriable=True,
                detail=detail,
            )
        if status == 403:
            return NodePoolError(
                f"Azure refused ({where}): the operator's identity lacks permission to manage "
                "the cluster's agent pools (Microsoft.ContainerService/managedClusters/agentPools/"
                f"write, e.g. the Azure Kubernetes Service Contributor role): {short}",
                status=status,
                code=code,
                detail=detail,
            )
        if status == 404:
            return NodePoolError(
                f"not found ({where}): check nodePool.subscriptionId, resourceGroup and "
                f"clusterName: {short}",
                status=status,
                code=code,
                detail=detail,
            )
        if status == 409 or status in RETRIABLE_STATUS:
            seconds = transient_wait(error)
            return NodePoolError(
                waiting("AKS", _busy_reason(status, code), seconds, where),
                status=status,
                code=code,
                retriable=True,
                detail=detail,
                retry_after=seconds,
            )
        if status == 400 and _is_tdx(pool):
            return NodePoolError(
                f"AKS refused the Intel TDX pool {pool.name!r} ({code or 'HTTP 400'}): AKS "
                "currently fails to create TDX confidential node pools (Azure/AKS#5618). Use an "
                "AMD SEV-SNP size (e.g. Standard_DC4as_v5) until AKS supports TDX pools.",
                status=status,
                code=code,
                detail=detail,
            )
        hint = ""
        if "quota" in f"{code} {detail}".lower():
            hint = " (the subscription's vCPU quota for this confidential VM family is exhausted)"
        return NodePoolError(
            f"AKS rejected the pool{hint} ({where}, HTTP {status} {code or ''}): {short}",
            status=status,
            code=code,
            detail=detail,
        )
    if isinstance(error, ServiceResponseError):
        # The request went out and no (whole) answer came back in time: a write may have been
        # carried out, which is why the next pass reads the pool before writing again.
        seconds = transient_wait(error)
        return NodePoolError(
            waiting("AKS", "no answer in time", seconds, where),
            retriable=True,
            detail=str(error.message),
            retry_after=seconds,
        )
    if isinstance(error, ServiceRequestError):
        return NodePoolError(
            f"Azure Resource Manager not reachable ({where}): {brief(str(error.message))}",
            retriable=True,
            detail=str(error.message),
        )
    return NodePoolError(
        f"Azure call failed ({where}); will retry: {brief(str(error))}",
        retriable=True,
        detail=str(error),
    )


def _busy_reason(status: int, code: str | None) -> str:
    """Why AKS asks Veil to wait, in the words of the condition's parentheses."""
    if status == 429:
        return "throttled"
    if status == 409:
        return "another operation on the pool is in progress"
    return f"HTTP {status} {code}" if code else f"HTTP {status}"


def _state(agent_pool: AgentPool, pool: NodePool, changed: bool) -> PoolState:
    props = _properties(agent_pool)
    return PoolState(
        name=pool.name,
        provisioning_state=_text(props.provisioning_state) or "Unknown",
        vm_size=str(props.vm_size or pool.vm_size),
        count=props.count,
        platform=confidential_platform(pool.vm_size),
        changed=changed,
    )


def ensure_confidential_pool(
    client: ContainerServiceClient,
    pool: NodePool,
    labels: Mapping[str, str] | None = None,
    taints: Sequence[str] | None = None,
    *,
    platform: Platform | None = None,
    os_sku: str = DEFAULT_OS_SKU,
    wait: bool = False,
    polling_interval: float | None = None,
    timeout: float | None = None,
) -> PoolState:
    """Ensure the confidential node pool described by `pool` exists as Veil wants it.

    `labels`/`taints` are added to Veil's own (`veil.dev/confidential`). `platform`, when given,
    must match the VM size's TEE. Blocking; raises NodePoolError.
    """
    size_platform = confidential_platform(pool.vm_size)
    if platform is not None and platform != size_platform:
        raise NodePoolError(
            f"VM size {pool.vm_size} is {size_platform}, but the model asks for {platform}"
        )
    want_labels = _desired_labels(labels)
    want_taints = _desired_taints(taints, pool.vm_size)
    operations = client.agent_pools

    existing: AgentPool | None
    try:
        existing = operations.get(pool.resource_group, pool.cluster_name, pool.name)
    except ResourceNotFoundError:
        existing = None
    except AzureError as exc:
        raise _explain(exc, pool, "reading") from exc

    if existing is None:
        body = desired_agent_pool(pool, labels, taints, os_sku=os_sku)
        action, why = "creating", "absent"
    else:
        have = _properties(existing)
        state = _text(have.provisioning_state)
        if state.lower() in _BUSY_STATES:
            return _state(existing, pool, changed=False)
        drift = _drift(have, pool, want_labels, want_taints)
        if not drift and state.lower() != "failed":
            return _state(existing, pool, changed=False)
        # Update from what AKS has, so settings Veil does not manage are kept as they are.
        if not have.enable_auto_scaling:
            have.count = pool.count
        have.mode = "User"
        have.node_labels = {**(have.node_labels or {}), **want_labels}
        have_taints = list(have.node_taints or [])
        have.node_taints = have_taints + [t for t in want_taints if t not in have_taints]
        body = AgentPool(properties=have)
        action, why = "updating", ", ".join(drift) or f"provisioning state {state}"

    log.info("%s node pool %s of %s (%s)", action, pool.name, pool.cluster_name, why)
    kwargs: dict[str, Any] = {"polling": wait}
    if polling_interval is not None:
        kwargs["polling_interval"] = polling_interval
    try:
        poller = operations.begin_create_or_update(
            pool.resource_group, pool.cluster_name, pool.name, body, **kwargs
        )
        result = poller.result(timeout=timeout) if wait else poller.result()
    except AzureError as exc:
        raise _explain(exc, pool, action) from exc
    if wait and not poller.done():
        raise NodePoolError(
            f"node pool {pool.name!r} still provisioning after {timeout}s", retriable=True
        )
    return _state(result, pool, changed=True)
