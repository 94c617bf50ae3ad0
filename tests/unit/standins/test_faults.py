"""The stand-ins' fault injection, seen through the REAL Azure SDKs: Key Vault's and ARM's
throttling, 503s, AKS's 409 and late answers look as the services' do, azure-core's RetryPolicy
waits what Retry-After says, and Veil neither doubles a key version nor misreads a fault."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import KeyClient

from tests.unit.azure.test_release_policy import spec
from tests.unit.standins.conftest import TOKEN, serve
from veil.api.confidential_model import NodePool
from veil.azure import KeyVaultError, NodePoolError
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import DEFAULT_KEY_SIZE, ensure_release_key, key_client
from veil.azure.node_pools import container_service_client, ensure_confidential_pool
from veil.azure.release_policy import release_policy
from veil.azure.unanswered import Unanswered
from veil_standins.arm import ArmDouble
from veil_standins.faults import FaultPlan, Faults
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.tls import TlsFiles

POLICY = release_policy(spec("confidentialVM", "sevsnp")).canonical
SUB, RG, CLUSTER = "00000000-0000-0000-0000-0000000fa017", "veil-rg", "aks-faults"


@pytest.fixture(scope="module")
def vault(tls: TlsFiles) -> Iterator[KeyVaultDouble]:
    """A vault of this module's own: its faults disturb no other test."""
    double = KeyVaultDouble(token=TOKEN)
    server = serve(double.app(), tls)
    double.url = server.url
    double.pregenerate(6, size=DEFAULT_KEY_SIZE)
    try:
        yield double
    finally:
        server.stop()


@pytest.fixture(scope="module")
def arm(tls: TlsFiles) -> Iterator[ArmDouble]:
    double = ArmDouble(token=TOKEN, steps=0)
    server = serve(double.app(), tls)
    double.url = server.url
    double.add_cluster(SUB, RG, CLUSTER)
    try:
        yield double
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_faults_left(vault: KeyVaultDouble, arm: ArmDouble) -> Iterator[None]:
    yield
    vault.faults.clear()
    arm.faults.clear()


def settings(
    tls: TlsFiles, arm_endpoint: str | None = None, **client_kwargs: object
) -> AzureSettings:
    base = AzureSettings.for_emulator(
        TOKEN, connection_verify=str(tls.ca_file), arm_endpoint=arm_endpoint
    )
    return dataclasses.replace(base, extra_client_kwargs=client_kwargs)


def name() -> str:
    return f"veil-{uuid.uuid4().hex[:12]}"


def versions(vault: KeyVaultDouble, key: str) -> int:
    return len(vault.keys.get(key, []))


# -- the plan itself ----------------------------------------------------------------------------


def test_a_seed_gives_the_same_faults_in_the_same_order() -> None:
    plan = FaultPlan(rate=0.3, kinds=("throttle", "unavailable", "hang"), seed=7)
    first, second = Faults(), Faults()
    first.inject(plan)
    second.inject(plan)
    draws = [first.draw("GET", "/keys/k") for _ in range(200)]
    assert draws == [second.draw("GET", "/keys/k") for _ in range(200)]
    faulted = [d for d in draws if d is not None]
    assert 30 <= len(faulted) <= 90  # about 30% of 200
    assert {kind for kind, _ in faulted} == {"throttle", "unavailable", "hang"}


def test_a_plan_only_touches_what_it_names() -> None:
    faults = Faults()
    faults.inject(FaultPlan(rate=1.0, methods=frozenset({"PUT"}), path_contains="/agentPools/"))
    assert faults.draw("GET", "/x/agentPools/p") is None
    assert faults.draw("PUT", "/x/other") is None
    assert faults.draw("PUT", "/x/agentPools/p") is not None
    faults.clear()
    assert faults.draw("PUT", "/x/agentPools/p") is None


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_a_rate_is_a_probability(rate: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        FaultPlan(rate=rate)


# -- Key Vault ---------------------------------------------------------------------------------


def test_key_vault_throttles_as_key_vault_does(vault: KeyVaultDouble, tls: TlsFiles) -> None:
    vault.faults.inject(FaultPlan(rate=1.0, kinds=("throttle",), retry_after=3))
    client: KeyClient = key_client(vault.url, settings(tls, retry_total=0))
    with pytest.raises(HttpResponseError) as caught:
        client.get_key(name())
    answer = caught.value
    assert answer.status_code == 429
    assert answer.response is not None
    assert answer.response.headers["Retry-After"] == "3"
    assert answer.error is not None
    assert answer.error.code == "Throttled"


def test_the_sdk_waits_what_retry_after_says(vault: KeyVaultDouble, tls: TlsFiles) -> None:
    """azure-core's RetryPolicy (the operator's, defaults kept) sleeps Retry-After between
    tries, and after its status retries Veil's message names the wait."""
    key = name()
    vault.faults.inject(FaultPlan(rate=1.0, kinds=("throttle",), retry_after=1))
    client = key_client(vault.url, settings(tls))
    before = vault.faults.injected().get("throttle", 0)
    started = time.monotonic()
    with pytest.raises(KeyVaultError) as caught:
        ensure_release_key(client, key, POLICY)
    elapsed = time.monotonic() - started
    # One try and azure-core's retry_status=3 retries, each answered 429.
    assert vault.faults.injected()["throttle"] - before == 4
    assert elapsed >= 3.0, "three waits of Retry-After: 1 s"
    error = caught.value
    assert error.retriable
    assert error.status == 429
    assert error.retry_after == 1.0
    assert str(error).startswith("waiting for Key Vault (throttled), retrying in 1 s")
    assert "\n" not in str(error)


def test_a_503_is_waited_out_with_a_one_line_message(vault: KeyVaultDouble, tls: TlsFiles) -> None:
    vault.faults.inject(FaultPlan(rate=1.0, kinds=("unavailable",)))
    with pytest.raises(KeyVaultError) as caught:
        ensure_release_key(key_client(vault.url, settings(tls, retry_total=0)), name(), POLICY)
    message = str(caught.value)
    assert message.startswith("waiting for Key Vault (HTTP 503 ServiceUnavailable), retrying in")
    assert caught.value.retriable
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 0


def test_a_lost_answer_to_a_key_creation_makes_no_second_version(
    vault: KeyVaultDouble, tls: TlsFiles
) -> None:
    """The vault makes the key but its answer comes after the client's timeout: the SDK does not
    resend a POST, Veil says it is waiting, and the next pass finds the key instead of making
    another version."""
    key = name()
    vault.faults.inject(
        FaultPlan(rate=1.0, kinds=("hang",), hang_seconds=3, methods=frozenset({"POST"}))
    )
    impatient = key_client(vault.url, dataclasses.replace(settings(tls), timeout_seconds=1))
    with pytest.raises(KeyVaultError) as caught:
        ensure_release_key(impatient, key, POLICY)
    assert str(caught.value).startswith("waiting for Key Vault (no answer in time), retrying in")
    assert caught.value.retriable
    vault.faults.clear()
    deadline = time.monotonic() + 10
    while versions(vault, key) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert versions(vault, key) == 1, "the vault did make the key"
    again = ensure_release_key(impatient, key, POLICY)
    assert not again.created
    assert versions(vault, key) == 1


def test_no_creation_while_an_unanswered_one_may_land(vault: KeyVaultDouble, tls: TlsFiles) -> None:
    key = name()
    client = key_client(vault.url, settings(tls, retry_total=0))
    unanswered = Unanswered(settle_seconds=30)
    digest = release_policy(spec("confidentialVM", "sevsnp")).digest
    unanswered.lost((client.vault_url, key, digest))
    with pytest.raises(KeyVaultError) as caught:
        ensure_release_key(client, key, POLICY, unanswered=unanswered)
    assert "an earlier creation went unanswered" in str(caught.value)
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 30
    assert versions(vault, key) == 0
    assert ("POST", f"/keys/{key}/create") not in vault.requests


def test_thirty_percent_faults_never_double_a_key_version(
    vault: KeyVaultDouble, tls: TlsFiles
) -> None:
    """Keys ensured under seeded throttling, 503s and late answers, each pass retried until it
    succeeds (as the controller requeues): one version per key, whatever failed where."""
    vault.faults.inject(FaultPlan(rate=0.3, seed=19, retry_after=0, hang_seconds=1.5))
    client = key_client(
        vault.url,
        dataclasses.replace(
            settings(tls, retry_total=1, retry_backoff_factor=0.01), timeout_seconds=0.5
        ),
    )
    keys = [name() for _ in range(8)]
    # Creations the vault is slow to carry out, whose answers come after the timeout.
    unanswered = Unanswered(settle_seconds=5)
    failures: list[KeyVaultError] = []
    for key in keys:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ensure_release_key(client, key, POLICY, unanswered=unanswered)
                break
            except KeyVaultError as waiting:
                failures.append(waiting)
                time.sleep(0.2)  # the controller would wait retry_after; any wait will do
        else:
            pytest.fail(f"key {key} never settled")
    injected = vault.faults.injected()
    assert sum(injected.values()) >= 5, injected
    assert failures, "some faults outlasted the SDK's retries and reached Veil"
    for waiting in failures:
        assert waiting.retriable, str(waiting)
        assert str(waiting).startswith("waiting for Key Vault ("), str(waiting)
    assert [versions(vault, key) for key in keys] == [1] * len(keys)


# -- ARM ---------------------------------------------------------------------------------------


def pool(pool_name: str) -> NodePool:
    return NodePool(
        subscription_id=SUB,
        resource_group=RG,
        cluster_name=CLUSTER,
        name=pool_name,
        vm_size="Standard_DC4as_v5",
        count=1,
    )


def test_aks_refuses_a_pool_write_during_another_operation(arm: ArmDouble, tls: TlsFiles) -> None:
    arm.faults.inject(FaultPlan(rate=1.0, kinds=("busy",)))
    client = container_service_client(SUB, settings(tls, arm.url, retry_total=0))
    with pytest.raises(HttpResponseError) as caught:
        client.agent_pools.begin_create_or_update(RG, CLUSTER, "busy1", {"properties": {}})
    assert caught.value.status_code == 409
    assert caught.value.error is not None
    assert caught.value.error.code == "OperationNotAllowed"
    assert "Another agentpool operation" in str(caught.value.error.message)
    # A read is never answered 409: it goes through (here: not found).
    before = arm.faults.injected().get("busy", 0)
    with pytest.raises(HttpResponseError) as read:
        client.agent_pools.get(RG, CLUSTER, "busy1")
    assert read.value.status_code == 404
    assert arm.faults.injected().get("busy", 0) == before


def test_a_busy_pool_is_retried_and_then_requested_once(arm: ArmDouble, tls: TlsFiles) -> None:
    wanted = pool("busy2")
    arm.faults.inject(FaultPlan(rate=1.0, kinds=("busy",)))
    client = container_service_client(SUB, settings(tls, arm.url, retry_total=0))
    with pytest.raises(NodePoolError) as caught:
        ensure_confidential_pool(client, wanted)
    assert caught.value.retriable
    assert caught.value.status == 409
    assert "\n" not in str(caught.value)
    assert (SUB.lower(), RG.lower(), CLUSTER.lower(), "busy2") not in arm.pools
    arm.faults.clear()
    state = ensure_confidential_pool(client, wanted)
    assert state.changed
    assert len(arm.puts(CLUSTER, "busy2")) == 2  # the refused one and the one that worked


def test_arm_throttling_is_waited_out_by_the_sdk(arm: ArmDouble, tls: TlsFiles) -> None:
    arm.faults.inject(FaultPlan(rate=0.5, kinds=("throttle",), seed=3, retry_after=1))
    client = container_service_client(SUB, settings(tls, arm.url))
    state = ensure_confidential_pool(client, pool("throttled"))
    assert state.provisioning_state == "Creating"
    assert arm.faults.injected().get("throttle", 0) >= 1
    vm_sizes = {body["properties"]["vmSize"] for body in arm.puts(CLUSTER, "throttled")}
    assert vm_sizes == {"Standard_DC4as_v5"}
