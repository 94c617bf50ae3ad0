"""The Helm chart on a real control plane: its objects are accepted, its pods pass Pod Security
`restricted`, and its RBAC is what the operator needs — checked against the audit log.

The chart is rendered with `helm template` (as Argo CD does) and applied with kubectl
(server-side, strict field validation). kwok's fake nodes run fake pods, so the chart's own
Deployment proves admission, not behaviour; the behaviour comes from the real operator process
run here with the Deployment's own arguments and the chart ServiceAccount's token.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import config

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import PINNED_RUNTIME_IMAGE, OperatorProcess, wait_for
from tests.unit.test_chart import CHART, kube_version, load_all, tools
from veil.controllers.ledger_key import load_ledger_key

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
RELEASE, NAMESPACE = "veil", "veil-system"
EXAMPLE = REPO / "examples" / "synthetic-data" / "budget.yaml"
EXAMPLE_NAMESPACE = "veil-chart-test"
FIELD_MANAGER = "veil-chart-test"

# What reconciling one PrivacyBudget under cluster-wide kopf peering must use: if one of these
# is missing from the audit log, the operator did not run as the chart's ServiceAccount (or
# kopf changed how it works), and the comparison below would prove nothing. Everything else
# the chart grants is for paths this test does not drive (ConfidentialModel children, the
# SyntheticDataset Job, Cilium, namespaced peering, Events on failures): those grants are
# reported, not asserted, because only their own tests can show them used.
MUST_USE = {
    ("veil.dev", "privacybudgets", "list"),
    ("veil.dev", "privacybudgets", "watch"),
    ("veil.dev", "privacybudgets", "patch"),
    ("veil.dev", "privacybudgets/status", "patch"),
    ("veil.dev", "confidentialmodels", "list"),
    ("veil.dev", "confidentialmodels", "watch"),
    ("veil.dev", "syntheticdatasets", "list"),
    ("veil.dev", "syntheticdatasets", "watch"),
    ("kopf.dev", "clusterkopfpeerings", "list"),
    ("kopf.dev", "clusterkopfpeerings", "watch"),
    ("kopf.dev", "clusterkopfpeerings", "patch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    # Binding the budget to its dataset: one budget a dataset, spending records of deleted ones.
    ("veil.dev", "privacybudgets", "list"),
    ("", "configmaps", "list"),
    # The ledger key, read in the release namespace.
    ("", "secrets", "get"),
}


def share_ledger_key(cluster: LocalCluster, namespace: str = NAMESPACE) -> None:
    """The chart's operator works cluster-wide beside the session's operator, so it must seal
    ledgers with the same key, as replicas sharing one release namespace do: the session's
    key (created here if no test made it yet) is copied into the release namespace."""
    key = load_ledger_key(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "veil-ledger-key", "namespace": namespace},
        "immutable": True,
        "data": {"key": base64.b64encode(key).decode()},
    }
    apply(cluster, [secret])


class UnusedGrants(UserWarning):
    """Permissions the chart grants that this test's run did not use (a report, not a failure)."""


def helm_template() -> list[dict[str, Any]]:
    completed = subprocess.run(
        [
            str(tools() / "helm"),
            "template",
            RELEASE,
            str(CHART),
            "-n",
            NAMESPACE,
            "--kube-version",
            kube_version(),
            "--set",
            f"image.digest={PINNED_RUNTIME_IMAGE.split('@')[1]}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return load_all(completed.stdout)


def apply(cluster: LocalCluster, docs: list[dict[str, Any]]) -> None:
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        f"--field-manager={FIELD_MANAGER}",
        "--validate=strict",
        "-f",
        "-",
        input_text="\n---\n".join(json.dumps(d) for d in docs),
    )


def token_kubeconfig(
    cluster: LocalCluster, account: str, path: Path, namespace: str = NAMESPACE
) -> Path:
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").strip()
    admin = json.loads(cluster.kubeconfig.read_text())
    admin["users"] = [{"name": account, "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = account
    path.write_text(json.dumps(admin))
    return path


def used_by(cluster: LocalCluster, user: str) -> tuple[set[tuple[str, str, str]], list[str]]:
    """(group, resource[/subresource], verb) of every resource request; and the refused ones."""
    used: set[tuple[str, str, str]] = set()
    refused: list[str] = []
    for event in cluster.audit_events(user=user):
        ref = event.get("objectRef")
        if not ref or "resource" not in ref:
            continue  # discovery (/api, /apis, /version): open to every authenticated user
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        key = (ref.get("apiGroup", ""), resource, event["verb"])
        used.add(key)
        if event.get("responseStatus", {}).get("code") == 403:
            refused.append(f"{key} {event.get('requestURI')}")
    return used, refused


def granted_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def reconciled(
    cluster: LocalCluster, name: str, namespace: str = EXAMPLE_NAMESPACE
) -> dict[str, Any] | None:
    raw = cluster.kubectl("get", "privacybudget", name, "-n", namespace, "-o", "json", check=False)
    if not raw:
        return None
    status = json.loads(raw).get("status") or {}
    ready = [c for c in status.get("conditions", []) if c.get("type") == "Ready"]
    if status.get("observedGeneration") == 1 and ready:
        return status
    return None


@pytest.fixture
def installed(cluster: LocalCluster) -> Iterator[list[dict[str, Any]]]:
    """The chart's objects applied (CRDs first: a custom resource needs its CRD established)."""
    docs = helm_template()
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": NAMESPACE,
            "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
        },
    }
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    apply(cluster, [namespace, *crds])
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        *(f"crd/{c['metadata']['name']}" for c in crds),
    )
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    apply(cluster, rest)
    try:
        yield docs
    finally:
        # Veil's CRDs stay: other tests of the session use them. The rest goes.
        cluster.kubectl(
            "delete",
            "--ignore-not-found",
            "--wait=false",
            "-f",
            "-",
            input_text="\n---\n".join(json.dumps(d) for d in rest),
            check=False,
        )
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        for crd in crds:
            if crd["spec"]["group"] == "kopf.dev":
                cluster.kubectl(
                    "delete", "crd", crd["metadata"]["name"], "--wait=false", check=False
                )


def test_chart_installs_and_its_rbac_is_what_the_operator_uses(
    cluster: LocalCluster, installed: list[dict[str, Any]], tmp_path: Path
) -> None:
    deployment = next(d for d in installed if d["kind"] == "Deployment")
    selector = ",".join(
        f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items()
    )

    # Pod Security `restricted` is enforced in the namespace: the ReplicaSet's pods exist only
    # if admission accepted the chart's pod template.
    cluster.kubectl(
        "wait",
        "--for=condition=Available",
        f"deployment/{deployment['metadata']['name']}",
        "-n",
        NAMESPACE,
        "--timeout=60s",
    )
    pods = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "name").split()
    assert len(pods) == deployment["spec"]["replicas"]

    account = next(
        d for d in installed if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "veil"
    )["metadata"]["name"]
    kubeconfig = token_kubeconfig(cluster, account, tmp_path / "kubeconfig-sa")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["run", "--peering=veil"]

    budget = yaml.safe_load(EXAMPLE.read_text())
    budget["metadata"]["namespace"] = EXAMPLE_NAMESPACE
    budget["spec"]["spenders"] = [{"namespace": EXAMPLE_NAMESPACE, "kind": "SyntheticDataset"}]
    # One budget protects a dataset: this copy of the example protects a dataset of its own.
    budget["spec"]["dataset"]["uri"] = f"file:///data/{EXAMPLE_NAMESPACE}/diabetes.csv"
    cluster.kubectl("create", "namespace", EXAMPLE_NAMESPACE)
    share_ledger_key(cluster)
    # The Deployment's own arguments and the environment its fieldRefs give, as the chart's
    # ServiceAccount (POD_ID: kopf's peer id; VEIL_NAMESPACE: where the ledger key lives).
    operator = OperatorProcess(
        cluster,
        tmp_path / "operator.log",
        kubeconfig,
        {"POD_ID": "veil-chart-test", "VEIL_NAMESPACE": NAMESPACE},
        args=args,
    )
    try:
        operator.wait_healthy()
        apply(cluster, [budget])
        status = wait_for(
            lambda: reconciled(cluster, budget["metadata"]["name"]),
            timeout=45,
            what=f"PrivacyBudget reconciled as {account}",
        )
        assert status["conditions"][0]["type"] == "Ready"
        # Deleting while the operator runs lets it remove its finalizer.
        cluster.kubectl(
            "delete", "-n", EXAMPLE_NAMESPACE, "privacybudget", budget["metadata"]["name"]
        )
    finally:
        operator.stop()
        cluster.kubectl("delete", "namespace", EXAMPLE_NAMESPACE, "--wait=false", check=False)

    role = next(
        d
        for d in installed
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-operator")
    )
    ledger_key = next(d for d in installed if d["kind"] == "Role")
    granted = granted_set(role["rules"]) | granted_set(ledger_key["rules"])
    user = f"system:serviceaccount:{NAMESPACE}:{account}"
    # A watch is audited when it ends, i.e. as the stopped operator's connections close.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: used_by(cluster, user)[0] >= MUST_USE, timeout=10, what="watches")
    used, refused = used_by(cluster, user)
    assert not refused, "requests the API server refused:\n" + "\n".join(refused)
    not_granted = sorted(used - granted)
    assert not not_granted, f"used but not granted by the chart: {not_granted}"
    missing = sorted(MUST_USE - used)
    assert not missing, (
        f"the exercised path did not use {missing}; log:\n" + operator.log_path.read_text()[-3000:]
    )
    unused = summarize(granted - used)
    (tmp_path / "rbac-report.txt").write_text(
        f"used:\n{summarize(used)}\ngranted but unused here:\n{unused}\n"
    )
    warnings.warn(UnusedGrants(f"granted, unused by this path:\n{unused}"), stacklevel=1)


def summarize(rules: set[tuple[str, str, str]]) -> str:
    """One line per resource: `  group resource: verb verb …`."""
    by_resource: dict[tuple[str, str], list[str]] = {}
    for group, resource, verb in sorted(rules):
        by_resource.setdefault((group or "core", resource), []).append(verb)
    return "\n".join(f"  {g} {r}: {' '.join(v)}" for (g, r), v in by_resource.items())


# What each user-facing ClusterRole may do, asked of the real API server (SubjectAccessReview
# through `kubectl auth can-i --as`). The attacker's question is the first block: can anyone
# but the operator rewrite a ledger, an audit batch or a spending record?
NEVER = [
    ("patch", "privacybudgets.veil.dev", "status"),
    ("update", "privacybudgets.veil.dev", "status"),
    ("patch", "syntheticdatasets.veil.dev", "status"),
    ("patch", "confidentialmodels.veil.dev", "status"),
    ("create", "configmaps", ""),
    ("delete", "configmaps", ""),
    ("patch", "configmaps", ""),
    ("get", "secrets", ""),
]
MAY = {
    "viewer": [("list", "privacybudgets.veil.dev"), ("get", "syntheticdatasets.veil.dev")],
    "editor": [("create", "syntheticdatasets.veil.dev"), ("delete", "confidentialmodels.veil.dev")],
    "budget-owner": [("create", "privacybudgets.veil.dev"), ("delete", "privacybudgets.veil.dev")],
}
MAY_NOT = {
    "viewer": [("create", "syntheticdatasets.veil.dev"), ("patch", "privacybudgets.veil.dev")],
    "editor": [("create", "privacybudgets.veil.dev"), ("patch", "privacybudgets.veil.dev")],
    "budget-owner": [("create", "syntheticdatasets.veil.dev")],
}


def can(cluster: LocalCluster, user: str, verb: str, resource: str, sub: str = "") -> bool:
    args = ["auth", "can-i", verb, resource, "-n", ROLES_NAMESPACE, f"--as={user}"]
    if sub:
        args.append(f"--subresource={sub}")
    answer = cluster.kubectl(*args, check=False).strip()
    assert answer in ("yes", "no"), answer
    return answer == "yes"


ROLES_NAMESPACE = "veil-chart-roles"


def test_user_roles_never_write_status_audit_trail_or_spending_records(
    crds: LocalCluster,
) -> None:
    cluster = crds
    roles = {
        d["metadata"]["name"].removeprefix(f"{RELEASE}-"): d
        for d in helm_template()
        if d["kind"] == "ClusterRole"
        and not d["metadata"]["name"].endswith(("-operator", "-node-agent"))
    }
    assert set(roles) == set(MAY)
    apply(cluster, list(roles.values()))
    cluster.kubectl("create", "namespace", ROLES_NAMESPACE)
    try:
        for role, manifest in roles.items():
            cluster.kubectl(
                "create",
                "rolebinding",
                f"test-{role}",
                f"--clusterrole={manifest['metadata']['name']}",
                f"--user=user-{role}",
                "-n",
                ROLES_NAMESPACE,
            )
        for role in roles:
            user = f"user-{role}"
            for verb, resource, sub in NEVER:
                assert not can(cluster, user, verb, resource, sub), (role, verb, resource, sub)
            for verb, resource in MAY[role]:
                assert can(cluster, user, verb, resource), (role, verb, resource)
            for verb, resource in MAY_NOT[role]:
                assert not can(cluster, user, verb, resource), (role, verb, resource)
    finally:
        cluster.kubectl("delete", "namespace", ROLES_NAMESPACE, "--wait=false", check=False)
        for manifest in roles.values():
            cluster.kubectl("delete", "clusterrole", manifest["metadata"]["name"], check=False)


# --- installed with `helm install`, the CRDs managed outside the chart ---------------------------
#
# What a platform team does when its GitOps tool owns the CRDs: apply Veil's (crds/, the session
# did) and kopf's peering CRDs (crds/kopf/) itself, then `helm install --set crds.enabled=false`.
# A real `helm install`: the chart sees the live cluster's kinds (its peering check), and the
# peering object is created by the post-install hook.

KOPF_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
PLATFORM_TEAM = "platform-team"


def helm_cli(cluster: LocalCluster, *args: str, check: bool = True) -> str:
    completed = subprocess.run(
        [str(tools() / "helm"), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if check and completed.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{completed.stderr}{completed.stdout}")
    return completed.stdout + completed.stderr


@contextlib.contextmanager
def kopf_crds_outside(cluster: LocalCluster) -> Iterator[None]:
    """kopf's peering CRDs applied from crds/kopf/ by the platform team, not by Helm."""
    # Another test's teardown may still be deleting them.
    for name in KOPF_CRDS:
        cluster.kubectl("wait", "--for=delete", f"crd/{name}", "--timeout=60s", check=False)
    cluster.kubectl(
        "apply",
        "--server-side",
        f"--field-manager={PLATFORM_TEAM}",
        "-f",
        str(REPO / "crds" / "kopf"),
    )
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in KOPF_CRDS)
    )
    try:
        yield
    finally:
        for name in KOPF_CRDS:
            cluster.kubectl("delete", "crd", name, "--ignore-not-found", check=False)


@contextlib.contextmanager
def helm_installed(
    cluster: LocalCluster, release: str, namespace: str, *sets: str
) -> Iterator[list[dict[str, Any]]]:
    """`helm install` with the CRDs left out; yields the release's objects (hooks included)."""
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input_text=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": namespace,
                    "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
                },
            }
        ),
    )
    args = ["install", release, str(CHART), "-n", namespace]
    for item in ("crds.enabled=false", f"image.digest={PINNED_RUNTIME_IMAGE.split('@')[1]}", *sets):
        args += ["--set", item]
    try:
        helm_cli(cluster, *args)
        manifest = helm_cli(cluster, "get", "manifest", release, "-n", namespace)
        hooks = helm_cli(cluster, "get", "hooks", release, "-n", namespace)
        yield load_all(manifest) + load_all(hooks)
    finally:
        helm_cli(cluster, "uninstall", release, "-n", namespace, check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def run_chart_operator(
    cluster: LocalCluster,
    docs: list[dict[str, Any]],
    namespace: str,
    budget_namespace: str,
    tmp_path: Path,
    *,
    peering: tuple[str, str, str | None],
) -> tuple[str, dict[str, Any]]:
    """The Deployment's operator, as its ServiceAccount, reconciling (then deleting) a copy of
    the example budget in `budget_namespace` (which must exist), and announcing itself in the
    `peering` object (kind, name, namespace) while it runs: kopf pauses a replica whose
    peering CRD is missing. Returns the user name and the budget's status."""
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    kubeconfig = token_kubeconfig(cluster, account, tmp_path / "kubeconfig-sa", namespace)
    share_ledger_key(cluster, namespace)
    budget = yaml.safe_load(EXAMPLE.read_text())
    budget["metadata"]["namespace"] = budget_namespace
    budget["spec"]["spenders"] = [{"namespace": budget_namespace, "kind": "SyntheticDataset"}]
    budget["spec"]["dataset"]["uri"] = f"file:///data/{budget_namespace}/diabetes.csv"
    operator = OperatorProcess(
        cluster,
        tmp_path / "operator.log",
        kubeconfig,
        {"POD_ID": namespace, "VEIL_NAMESPACE": namespace},
        args=pod["containers"][0]["args"],
    )
    try:
        operator.wait_healthy()
        apply(cluster, [budget])
        status = wait_for(
            lambda: reconciled(cluster, budget["metadata"]["name"], budget_namespace),
            timeout=45,
            what=f"PrivacyBudget reconciled as {account}:\n"
            + operator.log_path.read_text()[-3000:],
        )
        # kopf's keep-alive: the replica's identity (POD_ID) in the peering object's status
        # (kopf removes it again when the replica stops).
        wait_for(
            lambda: namespace in peers(cluster, *peering),
            timeout=20,
            what=f"{namespace} in {peering}",
        )
        cluster.kubectl(
            "delete", "-n", budget_namespace, "privacybudget", budget["metadata"]["name"]
        )
    finally:
        operator.stop()
    return f"system:serviceaccount:{namespace}:{account}", status


def peers(cluster: LocalCluster, kind: str, name: str, namespace: str | None = None) -> set[str]:
    where = ["-n", namespace] if namespace else []
    raw = cluster.kubectl("get", kind, name, *where, "-o", "json")
    return set(json.loads(raw).get("status") or {})


def test_chart_installs_with_crds_managed_outside_the_chart(
    crds: LocalCluster, tmp_path: Path
) -> None:
    cluster = crds
    release, namespace = "veil-outside", "veil-chart-outside"
    with (
        kopf_crds_outside(cluster),
        helm_installed(cluster, release, namespace, f"peering.name={release}") as docs,
    ):
        assert not [d for d in docs if d["kind"] == "CustomResourceDefinition"]
        # The post-install hook created the peering object, on the CRD the platform team owns.
        peering = next(d for d in docs if d["kind"] == "ClusterKopfPeering")
        assert peering["metadata"]["name"] == release
        cluster.kubectl("get", "clusterkopfpeering", release)
        managers = json.loads(
            cluster.kubectl("get", "crd", KOPF_CRDS[0], "-o", "json", "--show-managed-fields")
        )["metadata"]["managedFields"]
        assert PLATFORM_TEAM in {m["manager"] for m in managers}

        budgets = "veil-chart-outside-budgets"
        cluster.kubectl("create", "namespace", budgets)
        try:
            user, status = run_chart_operator(
                cluster,
                docs,
                namespace,
                budgets,
                tmp_path,
                peering=("clusterkopfpeering", release, None),
            )
        finally:
            cluster.kubectl("delete", "namespace", budgets, "--wait=false", check=False)
        assert status["conditions"][0]["type"] == "Ready"
        _, refused = used_by(cluster, user)
        assert not refused, "requests the API server refused:\n" + "\n".join(refused)


def test_chart_watching_namespaces_works_with_roles_in_those_namespaces(
    crds: LocalCluster, tmp_path: Path
) -> None:
    """watchNamespaces: the operator's namespaced permissions are Roles in the watched
    namespace; it reconciles there, under namespaced kopf peering, and the API server refuses
    nothing it asks for."""
    cluster = crds
    release, namespace, team = "veil-scoped", "veil-chart-scoped", "veil-chart-scoped-team"
    cluster.kubectl("create", "namespace", team)  # a watched namespace must exist
    try:
        with (
            kopf_crds_outside(cluster),
            helm_installed(cluster, release, namespace, f"watchNamespaces={{{team}}}") as docs,
        ):
            roles = {
                (d["kind"], d["metadata"].get("namespace")): d
                for d in docs
                if d["kind"] in ("Role", "ClusterRole")
                and d["metadata"]["name"].endswith("-operator")
            }
            assert set(roles) == {("ClusterRole", None), ("Role", team)}
            assert (
                next(d for d in docs if d["kind"] == "KopfPeering")["metadata"]["namespace"] == team
            )

            user, status = run_chart_operator(
                cluster, docs, namespace, team, tmp_path, peering=("kopfpeering", "veil", team)
            )
            assert status["conditions"][0]["type"] == "Ready"

            used, refused = used_by(cluster, user)
            assert not refused, "requests the API server refused:\n" + "\n".join(refused)
            ledger_key = next(
                d
                for d in docs
                if d["kind"] == "Role" and d["metadata"]["name"].endswith("-ledger-key")
            )
            cluster_wide = granted_set(roles[("ClusterRole", None)]["rules"])
            in_team = granted_set(roles[("Role", team)]["rules"])
            assert used <= cluster_wide | in_team | granted_set(ledger_key["rules"])
            # Outside the watched namespace it only lists (budgets and spending records, to
            # keep one budget per dataset) and reads its ledger key.
            elsewhere = {
                (e["objectRef"].get("apiGroup", ""), e["objectRef"]["resource"], e["verb"])
                for e in cluster.audit_events(user=user)
                if e.get("objectRef", {}).get("namespace") not in (None, team)
            }
            assert elsewhere <= {("", "secrets", "get"), ("", "secrets", "create")}, elsewhere
    finally:
        cluster.kubectl("delete", "namespace", team, "--wait=false", check=False)
