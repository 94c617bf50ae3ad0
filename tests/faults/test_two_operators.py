"""Scenario 5: two operators at once on one namespace, as a peering misconfiguration (both
`--standalone`) or a rolling update's overlap leaves them, during a burst of claims and a burst
of ConfidentialModels.

Checked: no claim is granted twice (one claim per dataset in a ledger whose seal verifies, the
grants within ε: the budget store's resourceVersion-guarded writes make the loser decide again
on the winner's ledger); exactly the paid-for datasets have a Job; one key version per model,
one pool per model; no write fight over the children: every child is applied by Veil's one
field manager, and once everything has converged neither operator rewrites an object on every
resync (the audit log, per operator and object, over three resync periods).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.faults import claims
from tests.faults.models import (
    AKS,
    PLURAL,
    RG,
    SUB,
    Doubles,
    Messages,
    assert_one_line,
    children_owned_once,
    converge,
    doubles_with_keys,
    model,
    operator_users,
)
from tests.faults.results import record
from tests.integration.conftest import REPO, OperatorProcess, run_operator_code, wait_for
from veil import API_GROUP, API_VERSION
from veil.labels import FIELD_MANAGER

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

NAMESPACE = "veil-faults-twins"
USERS = ("veil-faults-twin-a", "veil-faults-twin-b")
MODELS = 6
CLAIMANTS = 32
CONVERGE_TIMEOUT = 180
QUIET = 10  # seconds once converged: three resyncs (VEIL_RESYNC_SECONDS=3)
WRITES = frozenset({"create", "update", "patch", "delete"})
CHILD_RESOURCES = frozenset(
    {"deployments", "services", "jobs", "serviceaccounts", "networkpolicies", "configmaps"}
)


@pytest.fixture(scope="module")
def doubles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doubles]:
    # The models', the peering test's and the key-race test's keys.
    with doubles_with_keys(tmp_path_factory.mktemp("twins-tls"), MODELS + 3) as made:
        yield made


@pytest.fixture(scope="module")
def kubeconfigs(crds: LocalCluster) -> Iterator[dict[str, Path]]:
    with operator_users(crds, NAMESPACE, USERS) as made:
        yield made


def writes(
    events: list[dict[str, Any]], namespace: str = NAMESPACE
) -> Counter[tuple[str, str, str]]:
    """Writes in `namespace` by (user, resource[/subresource], name)."""
    counted: Counter[tuple[str, str, str]] = Counter()
    for event in events:
        ref = event.get("objectRef") or {}
        if event.get("verb") not in WRITES or ref.get("namespace") != namespace:
            continue
        if ref.get("resource") == "events":
            continue
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        user = event.get("user", {}).get("username", "")
        counted[(user, resource, ref.get("name", ""))] += 1
    return counted


def operators_writes(cluster: LocalCluster, offset: int) -> tuple[Counter[Any], int]:
    events, offset = cluster.audit_since(offset)
    counted = writes([e for e in events if e.get("user", {}).get("username") in USERS])
    return counted, offset


def test_two_standalone_operators_neither_double_grant_nor_fight(
    crds: LocalCluster,
    api: client.ApiClient,
    doubles: Doubles,
    kubeconfigs: dict[str, Path],
    tmp_path: Path,
) -> None:
    objects = client.CustomObjectsApi(api)
    _, offset = crds.audit_since(0)
    twins = [
        OperatorProcess(
            crds,
            tmp_path / f"{user}.log",
            kubeconfigs[user],
            doubles.operator_env(),
            namespaces=NAMESPACE,
        )
        for user in USERS
    ]
    try:
        for twin in twins:
            twin.wait_healthy()
        claimants = claims.burst(NAMESPACE, "twins-budget", CLAIMANTS)
        claims.create_budget_of(objects, claimants)
        started = time.monotonic()
        names = [f"twin-{i:02d}" for i in range(MODELS)]
        for i, name in enumerate(names):
            body = model(doubles, NAMESPACE, name, f"twin{i:02d}")
            objects.create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, body)
        claims.create_datasets(objects, claimants, list(claimants.names))
        messages = Messages()
        items = claims.wait_answered(objects, claimants, CONVERGE_TIMEOUT)
        claims_done = time.monotonic() - started
        models = converge(objects, NAMESPACE, names, messages, CONVERGE_TIMEOUT)
        converged = time.monotonic() - started
        during, offset = operators_writes(crds, offset)
        # Settled: a resync of a converged object writes nothing, whichever operator runs it.
        time.sleep(QUIET)
        after, offset = operators_writes(crds, offset)
    finally:
        for twin in twins:
            twin.stop()

    paid = claims.check_claims(api, objects, claimants, items)
    by_user = Counter(user for (user, _, _), n in during.items() for _ in range(n))
    print(
        f"\ntwo standalone operators: {CLAIMANTS} claims answered in {claims_done:.1f} s "
        f"({paid.granted} granted, {paid.denied} denied), {MODELS} models Ready in "
        f"{converged:.1f} s; writes by operator {dict(by_user)}; after convergence {dict(after)}"
    )
    record(
        "two-standalone-operators",
        claimants=CLAIMANTS,
        models=MODELS,
        granted=paid.granted,
        denied=paid.denied,
        claims_answered_seconds=round(claims_done, 1),
        converged_seconds=round(converged, 1),
        writes_by_operator=dict(by_user),
        writes_after_convergence=sum(after.values()),
    )
    assert all(by_user[user] for user in USERS), "both operators worked on the namespace"
    # No fight: a fight rewrites an object on every resync (every 3 s, so 3 or more writes in
    # QUIET s per operator). What remains after convergence is each operator's own last pass.
    assert all(n <= 1 for n in after.values()), f"rewritten after convergence: {dict(after)}"

    kv, arm = doubles.key_vault, doubles.arm
    for obj in models:
        name = obj["metadata"]["name"]
        assert len(kv.keys[name]) == 1, f"{name}: {len(kv.keys[name])} key versions"
        assert obj["status"]["keyVersion"] == kv.keys[name][0].version
    for i in range(MODELS):
        pool = arm.pools[(SUB.lower(), RG.lower(), AKS.lower(), f"twin{i:02d}")]
        assert pool["provisioningState"] == "Succeeded", pool
    children_owned_once(api, objects, NAMESPACE)
    assert_one_line(messages)

    # No field-manager fight: every child is applied by Veil's one manager.
    apps, core, batch = client.AppsV1Api(api), client.CoreV1Api(api), client.BatchV1Api(api)
    metas = [
        *(d.metadata for d in apps.list_namespaced_deployment(NAMESPACE).items),
        *(s.metadata for s in core.list_namespaced_service(NAMESPACE).items),
        *(j.metadata for j in batch.list_namespaced_job(NAMESPACE).items),
    ]
    assert metas
    for meta in metas:
        assert meta is not None
        appliers = {e.manager for e in meta.managed_fields or [] if e.operation == "Apply"}
        assert appliers == {FIELD_MANAGER}, f"{meta.name}: applied by {appliers}"


PEERED = "veil-faults-peered"
PEERING = "veil-twins"
PEERED_MODELS = 3


def test_two_operators_that_both_read_no_key_make_one_key_version(
    crds: LocalCluster, api: client.ApiClient, doubles: Doubles, kubeconfigs: dict[str, Path]
) -> None:
    """The race the scenario above leaves to chance, forced: two operators read the same model
    and the same empty vault, and both decide to create the key. Key Vault would make two
    versions; the claim on the model (a write with the resourceVersion both read) lets one."""
    objects = client.CustomObjectsApi(api)
    body = model(doubles, NAMESPACE, "key-race", "keyrace")
    # No operator runs: nothing but the two claimants below writes the model.
    read = objects.create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, body)
    try:
        outcome = run_operator_code(
            crds.kubeconfig, _KEY_RACE, read, extra_env=doubles.operator_env()
        )
        created = [o for o in outcome if o.startswith("created ")]
        assert len(created) == 1, outcome
        [refused] = [o for o in outcome if not o.startswith("created ")]
        assert refused.startswith("refused: the model changed"), outcome
        versions = doubles.key_vault.keys["key-race"]
        assert [v.version for v in versions] == [created[0].removeprefix("created ")]

        fresh = objects.get_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, PLURAL, "key-race"
        )
        later = run_operator_code(crds.kubeconfig, _CLAIM_AGAIN, fresh)
    finally:
        objects.delete_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, PLURAL, "key-race"
        )

    # The winner's claim stands on the model: a third operator waits instead of creating...
    assert later["within_lease"].startswith("refused: another Veil operator (twin-"), later
    # ...and an operator that died between claiming and creating holds it up one lease at most.
    assert later["after_lease"] == "claimed", later


# Two threads as two operators: each read the model (`owner`) and an empty vault, and each
# reaches the point of creating the key before either claims it.
_KEY_RACE = """
import functools, json, sys, threading
from veil.api.confidential_model import ConfidentialModelSpec
from veil.azure import AzureSettings
from veil.controllers import key_creation
from veil.controllers.azure_ports import AzurePorts

owner = json.load(sys.stdin)
spec = ConfidentialModelSpec.model_validate(owner["spec"])
both_decided = threading.Barrier(2, timeout=60)
outcome = []

def operator(identity):
    def claim(digest):
        both_decided.wait()
        key_creation.claim(owner, digest, identity=identity)
    try:
        key = AzurePorts(AzureSettings.from_env()).ensure_key(owner, spec, None, claim)
        outcome.append(f"created {key.version}" if key.created else "found")
    except key_creation.KeyCreationClaimedError as refused:
        outcome.append(f"refused: {refused}")

threads = [threading.Thread(target=operator, args=(f"twin-{n}",)) for n in "ab"]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(outcome))
"""

_CLAIM_AGAIN = """
import json, sys, time
from veil.controllers import key_creation

owner = json.load(sys.stdin)
held = key_creation.Claim.read(owner)
answers = {}
lease = key_creation.LEASE_SECONDS
for when, now in (("within_lease", held.at + 1), ("after_lease", held.at + lease + 1)):
    try:
        key_creation.claim(owner, held.policy_digest, identity="third", now=lambda: now)
        answers[when] = "claimed"
    except key_creation.KeyCreationClaimedError as refused:
        answers[when] = f"refused: {refused}"
print(json.dumps(answers))
"""


def test_with_peering_the_lower_priority_operator_backs_off(
    crds: LocalCluster,
    api: client.ApiClient,
    doubles: Doubles,
    kubeconfigs: dict[str, Path],
    tmp_path: Path,
) -> None:
    """A rolling update's overlap under kopf peering: both run, only the higher priority works."""
    crds.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "kopf"))
    crds.kubectl(
        "wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s"
    )
    crds.kubectl("create", "namespace", PEERED)
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(
        "kopf.dev",
        "v1",
        PEERED,
        "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}},
    )
    low, high = USERS
    priorities = {low: "10", high: "20"}
    _, offset = crds.audit_since(0)
    twins = {
        user: OperatorProcess(
            crds,
            tmp_path / f"peered-{user}.log",
            kubeconfigs[user],
            {**doubles.operator_env(), "VEIL_PEERING_PRIORITY": priorities[user]},
            args=["run", f"--peering={PEERING}", f"--namespace={PEERED}"],
        )
        for user in USERS
    }
    try:
        for twin in twins.values():
            twin.wait_healthy()
        wait_for(
            lambda: _peers(objects) == len(USERS), timeout=60, what="both operators in the peering"
        )
        wait_for(
            lambda: _peering_state(twins[high].log_path) == "working",
            timeout=60,
            what="the higher-priority operator resuming",
        )
        wait_for(
            lambda: _peering_state(twins[low].log_path) == "paused",
            timeout=60,
            what="the lower-priority operator paused",
        )
        # A watch event queued from before the higher peer's first keep-alive is seen within
        # kopf's batching window; after it, the state holds.
        time.sleep(2)
        assert _peering_state(twins[low].log_path) == "paused"
        names = [f"peered-{i:02d}" for i in range(PEERED_MODELS)]
        for i, name in enumerate(names):
            body = model(doubles, PEERED, name, f"peer{i:02d}")
            objects.create_namespaced_custom_object(API_GROUP, API_VERSION, PEERED, PLURAL, body)
        converge(objects, PEERED, names, Messages(), CONVERGE_TIMEOUT)
        events, offset = crds.audit_since(offset)
    finally:
        for twin in twins.values():
            twin.stop()
        crds.kubectl("delete", "namespace", PEERED, "--wait=false", check=False)
    # Peering's own keep-alives aside, the namespace's writes by (user, resource, name).
    counted = {k: n for k, n in writes(events, PEERED).items() if "kopfpeerings" not in k[1]}
    by_high = [key for key in counted if key[0] == high]
    by_low = [key for key in counted if key[0] == low]
    assert by_high, f"the higher-priority operator did the work: {counted}"
    assert not by_low, f"the paused operator wrote nothing: {by_low}"


def _peers(objects: client.CustomObjectsApi) -> int:
    peering: dict[str, Any] = objects.get_namespaced_custom_object(
        "kopf.dev", "v1", PEERED, "kopfpeerings", PEERING
    )
    return len(peering.get("status") or {})


def _peering_state(log: Path) -> str:
    """What an operator's peering log says of it once every peer is listed.

    kopf starts a peered operator paused and logs only changes: "Resuming" when it sees no
    higher priority, "Pausing" when it later does. An operator that saw the higher-priority
    peer in its first look stays paused and logs nothing."""
    changes = [
        line
        for line in log.read_text().splitlines()
        if "Pausing operations in favour of" in line or "Resuming operations after" in line
    ]
    return "working" if changes and "Resuming" in changes[-1] else "paused"
