"""What the fault scenarios share: their own Azure doubles, ConfidentialModels with a node
pool each, and polling that keeps every condition message seen on the way."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import REPO, TOKEN, OperatorProcess, condition, wait_for
from veil import API_GROUP, API_VERSION
from veil.azure.keyvault import DEFAULT_KEY_SIZE
from veil_standins.arm import ArmDouble
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.server import ServerThread
from veil_standins.tls import TlsFiles, make_tls

PLURAL = "confidentialmodels"
SUB, RG, AKS = "00000000-0000-0000-0000-00000000fa17", "veil-rg", "veil-aks"
CLIENT_TIMEOUT = 2  # seconds (VEIL_AZURE_TIMEOUT_SECONDS); injected hangs last twice that
# What a condition may say while Key Vault fails: one line naming the wait.
WAITING = re.compile(r"^waiting for Key Vault \((.+?)\), retrying in \d+ s")


class Doubles:
    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self.key_vault = KeyVaultDouble(token=TOKEN)
        self.arm = ArmDouble(token=TOKEN, steps=0)
        self._servers = [
            ServerThread(self.key_vault.app(), tls.server_context()).start(),
            ServerThread(self.arm.app(), tls.server_context()).start(),
        ]
        self.key_vault.url, self.arm.url = (server.url for server in self._servers)
        self.arm.add_cluster(SUB, RG, AKS)

    def operator_env(self) -> dict[str, str]:
        return {
            "VEIL_AZURE_STATIC_TOKEN": TOKEN,
            "VEIL_AZURE_CA_BUNDLE": str(self.tls.ca_file),
            "VEIL_AZURE_ARM_ENDPOINT": self.arm.url,
            "VEIL_AZURE_TIMEOUT_SECONDS": str(CLIENT_TIMEOUT),
        }

    def stop(self) -> None:
        for server in self._servers:
            server.stop()


@contextmanager
def doubles_with_keys(tls_directory: Path, keys: int) -> Iterator[Doubles]:
    """The stand-ins, their Key Vault holding `keys` keys made beforehand: Key Vault makes keys
    in its HSMs, not on this machine's two cores, so a burst should not wait for key math."""
    made = Doubles(make_tls(tls_directory))
    made.key_vault.pregenerate(keys, size=DEFAULT_KEY_SIZE)
    try:
        yield made
    finally:
        made.stop()


@contextmanager
def operator_users(
    crds: LocalCluster, namespace: str, users: tuple[str, ...]
) -> Iterator[dict[str, Path]]:
    """A namespace of its own and a kubeconfig for each operator user (so the audit log tells
    their writes apart); the namespace goes afterwards."""
    crds.kubectl("create", "namespace", namespace)
    made = {}
    for user in users:
        made[user] = crds.user_kubeconfig(user, "veil:operators")
        crds.kubectl(
            "create", "clusterrolebinding", user, "--clusterrole=cluster-admin", f"--user={user}"
        )
    try:
        yield made
    finally:
        crds.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@contextmanager
def operator_in(
    crds: LocalCluster, namespace: str, user: str, doubles: Doubles, log: Path
) -> Iterator[OperatorProcess]:
    """`operator_users` for one user, and an operator on the namespace running as it."""
    with operator_users(crds, namespace, (user,)) as kubeconfigs:
        operator = OperatorProcess(
            crds, log, kubeconfigs[user], doubles.operator_env(), namespaces=namespace
        )
        try:
            operator.wait_healthy()
            yield operator
        finally:
            operator.stop()


def model(doubles: Doubles, namespace: str, name: str, pool: str) -> dict[str, Any]:
    document = yaml.safe_load((REPO / "examples/confidential-model-cvm/model.yaml").read_text())
    document["metadata"] = {"name": name, "namespace": namespace}
    spec = document["spec"]
    spec["keyRelease"].update(vaultUrl=doubles.key_vault.url, keyName=name)
    spec["serving"]["replicas"] = 1
    spec["tee"]["nodePool"] = {
        "subscriptionId": SUB,
        "resourceGroup": RG,
        "clusterName": AKS,
        "name": pool,
        "vmSize": "Standard_DC4as_v5",
        "count": 1,
    }
    return document  # type: ignore[no-any-return]


def listed(objects: client.CustomObjectsApi, namespace: str) -> list[dict[str, Any]]:
    found = cast(
        dict[str, Any],
        objects.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL),
    )
    items: list[dict[str, Any]] = found["items"]
    return items


def is_ready(obj: dict[str, Any]) -> bool:
    current = (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
    return current and condition(obj, "Ready").get("status") == "True"


class Messages:
    """Every condition message seen while polling, to judge what status said under faults."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def note(self, items: list[dict[str, Any]]) -> None:
        for obj in items:
            for found in (obj.get("status") or {}).get("conditions", []):
                self.seen.add(str(found.get("message", "")))

    def waiting_for_key_vault(self) -> set[str]:
        return {m for m in self.seen if WAITING.match(m)}


def converge(
    objects: client.CustomObjectsApi,
    namespace: str,
    names: list[str],
    messages: Messages,
    timeout: float,
) -> list[dict[str, Any]]:
    def all_ready() -> list[dict[str, Any]] | None:
        items = [o for o in listed(objects, namespace) if o["metadata"]["name"] in names]
        messages.note(items)
        done = len(items) == len(names) and all(is_ready(o) for o in items)
        return items if done else None

    found: list[dict[str, Any]] = wait_for(
        all_ready, timeout=timeout, interval=0.5, what=f"{len(names)} models Ready"
    )
    return found


def assert_one_line(messages: Messages) -> None:
    for message in messages.seen:
        assert "\n" not in message, message
        assert "Traceback" not in message, message
        assert len(message) <= 600, message


def children_owned_once(
    api: client.ApiClient, objects: client.CustomObjectsApi, namespace: str
) -> dict[str, str]:
    """Each model's Deployment and Service: exactly one each, owned by that model (by uid).
    Returns model name -> Deployment name; fails on a duplicate, an orphan or a stray."""
    uids = {o["metadata"]["uid"]: o["metadata"]["name"] for o in listed(objects, namespace)}
    owned: dict[str, str] = {}
    listings = (
        client.AppsV1Api(api).list_namespaced_deployment(namespace).items,
        client.CoreV1Api(api).list_namespaced_service(namespace).items,
    )
    for items in listings:
        seen: dict[str, str] = {}
        for child in items:
            meta = child.metadata
            assert meta is not None
            owners = [ref.uid for ref in meta.owner_references or [] if ref.controller]
            assert len(owners) == 1, f"{meta.name}: controller owners {owners}"
            assert owners[0] in uids, f"{meta.name} is an orphan"
            model_name = uids[owners[0]]
            assert model_name not in seen, f"{model_name} has two: {meta.name}"
            seen[model_name] = str(meta.name)
        assert sorted(seen) == sorted(uids.values())
        owned = seen
    return owned
