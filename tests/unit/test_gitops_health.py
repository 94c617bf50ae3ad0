"""GitOps health of Veil's kinds: Argo CD's Lua checks, run through real Lua (lupa's Lua 5.1,
the dialect of Argo CD's gopher-lua), against their own test cases in Argo CD's layout; the
same objects judged by kstatus' rules (what Flux reads); and the Flux/Argo CD manifests'
references checked against the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

lupa = pytest.importorskip("lupa.lua51", reason="pip install lupa (a dev dependency)")

from veil.conditions import Outcome, apply_outcome  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GITOPS = REPO / "examples" / "gitops"
CUSTOMIZATIONS = GITOPS / "argocd" / "resource_customizations" / "veil.dev"
KINDS = ("ConfidentialModel", "PrivacyBudget", "SyntheticDataset")


def lua_health(script: str, obj: dict[str, Any]) -> dict[str, str]:
    """Run an Argo CD health script the way Argo CD does: `obj` global, a table returned."""
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute(script)
    return {"status": result["status"], "message": result["message"]}


def health_cases() -> list[tuple[str, str, dict[str, str]]]:
    cases = []
    for kind in KINDS:
        tests = yaml.safe_load((CUSTOMIZATIONS / kind / "health_test.yaml").read_text())["tests"]
        cases += [(kind, test["inputPath"], test["healthStatus"]) for test in tests]
    return cases


def script(kind: str) -> str:
    return (CUSTOMIZATIONS / kind / "health.lua").read_text()


@pytest.mark.parametrize(("kind", "input_path", "expected"), health_cases(), ids=str)
def test_argocd_health_case(kind: str, input_path: str, expected: dict[str, str]) -> None:
    obj = yaml.safe_load((CUSTOMIZATIONS / kind / input_path).read_text())
    assert obj["kind"] == kind
    assert lua_health(script(kind), obj) == expected


def test_every_testdata_file_is_a_case_and_every_status_is_covered() -> None:
    for kind in KINDS:
        listed = {p for k, p, _ in health_cases() if k == kind}
        on_disk = {
            f"testdata/{p.name}" for p in (CUSTOMIZATIONS / kind / "testdata").glob("*.yaml")
        }
        assert listed == on_disk, kind
        statuses = {h["status"] for k, _, h in health_cases() if k == kind}
        assert {"Healthy", "Progressing", "Degraded"} <= statuses, kind
        assert "Suspended" not in statuses


def test_one_health_logic_for_all_kinds() -> None:
    assert len({script(kind) for kind in KINDS}) == 1


def test_argocd_cm_carries_the_same_lua() -> None:
    config_map = yaml.safe_load((GITOPS / "argocd" / "argocd-cm.yaml").read_text())
    assert config_map["metadata"] == {
        "name": "argocd-cm",
        "namespace": "argocd",
        "labels": {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"},
    }
    expected = {f"resource.customizations.health.veil.dev_{kind}": script(kind) for kind in KINDS}
    assert config_map["data"] == expected


# --- the operator's reasons, judged by the script ------------------------------------------------


def outcome_reasons() -> dict[str, set[str]]:
    """Every reason the operator's code passes to Outcome.done/progressing/failed/stalled_with."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "operator" / "veil").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "Outcome"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.setdefault(node.func.attr, set()).add(node.args[0].value)
    return found


EXPECTED_HEALTH = {
    "done": "Healthy",
    "progressing": "Progressing",
    "failed": "Degraded",
    "stalled_with": "Degraded",
}


def test_operator_reasons_get_the_right_health() -> None:
    """A reason Veil reports as a failure must show Degraded in Argo CD, a step in progress
    Progressing: conditions built by Veil's own apply_outcome, judged by the Lua script."""
    reasons = outcome_reasons()
    assert reasons.get("failed")
    assert reasons.get("stalled_with")
    assert reasons.get("progressing")
    wrong = []
    for constructor, names in reasons.items():
        for reason in sorted(names):
            outcome = getattr(Outcome, constructor)(reason, f"{reason} happened")
            obj = {
                "metadata": {"generation": 4},
                "status": {
                    "observedGeneration": 4,
                    "conditions": apply_outcome([], outcome, 4, "2026-03-02T09:00:00Z"),
                },
            }
            got = lua_health(script(KINDS[0]), obj)["status"]
            if got != EXPECTED_HEALTH[constructor]:
                wrong.append(f"Outcome.{constructor}({reason!r}) -> {got}")
    assert not wrong, (
        "health.lua classifies these reasons wrongly (it reads failure from the reason's "
        "suffix: Error, Failed, Failure, Denied, Conflict, Unavailable, Unreadable, Invalid, "
        "NotReady):\n" + "\n".join(wrong)
    )


# --- kstatus (Flux) on the same objects ---------------------------------------------------------


def kstatus(obj: dict[str, Any]) -> str:
    """cli-utils' kstatus for a custom resource: checkGenericProperties, else Current."""
    meta, status = obj["metadata"], obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    observed = status.get("observedGeneration")
    if "generation" in meta and observed is not None and observed != meta["generation"]:
        return "InProgress"
    for condition in status.get("conditions", []):
        if condition["type"] == "Reconciling" and condition["status"] == "True":
            return "InProgress"
        if condition["type"] == "Stalled" and condition["status"] == "True":
            return "Failed"
    return "Current"


@pytest.mark.parametrize(("kind", "input_path", "expected"), health_cases(), ids=str)
def test_flux_and_argocd_agree(kind: str, input_path: str, expected: dict[str, str]) -> None:
    """Healthy in Argo CD is Current for Flux, and Failed for Flux is Degraded in Argo CD.
    Where they differ by design: a failure Veil retries is Degraded in Argo CD but InProgress
    for Flux (which fails the health check at its timeout); an object not yet reconciled is
    Progressing in Argo CD but Current for kstatus, which has no status to read."""
    obj = yaml.safe_load((CUSTOMIZATIONS / kind / input_path).read_text())
    flux, argo = kstatus(obj), expected["status"]
    if argo == "Healthy":
        assert flux == "Current"
    if flux == "Failed":
        assert argo == "Degraded"
    if flux == "InProgress":
        assert argo in ("Progressing", "Degraded")
    if flux == "Current" and argo != "Healthy":
        assert "observedGeneration" not in (obj.get("status") or {}), (
            "only before the first reconcile"
        )


# --- the Flux and Argo CD manifests -------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def flux_objects() -> list[dict[str, Any]]:
    return [d for p in sorted((GITOPS / "flux").rglob("*.yaml")) for d in documents(p)]


def test_flux_kustomizations_point_at_real_paths_and_objects() -> None:
    objects = flux_objects()
    sources = {d["metadata"]["name"] for d in objects if d["kind"] == "GitRepository"}
    kustomizations = [d for d in objects if d["kind"] == "Kustomization"]
    names = {k["metadata"]["name"] for k in kustomizations}
    checked = set()
    for kustomization in kustomizations:
        spec = kustomization["spec"]
        assert spec["sourceRef"] == {"kind": "GitRepository", "name": next(iter(sources))}
        path = REPO / spec["path"]
        assert path.is_dir(), spec["path"]
        assert {d["name"] for d in spec.get("dependsOn", [])} <= names
        applied = {
            (d["apiVersion"], d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
            for p in sorted(path.glob("*.yaml"))
            for d in documents(p)
        }
        for check in spec.get("healthChecks", []):
            key = (check["apiVersion"], check["kind"], check["name"], check.get("namespace"))
            assert key in applied, f"healthCheck {key} is not applied by {spec['path']}"
            checked.add(check["kind"])
    assert checked >= {"PrivacyBudget", "SyntheticDataset"}
    release = next(d for d in objects if d["kind"] == "HelmRelease")
    chart = release["spec"]["chart"]["spec"]
    assert (REPO / chart["chart"] / "Chart.yaml").exists()
    assert chart["sourceRef"]["name"] in sources


def test_argocd_applications_point_at_real_paths() -> None:
    apps = documents(GITOPS / "argocd" / "applications.yaml")
    assert {a["kind"] for a in apps} == {"Application"}
    paths = {a["spec"]["source"]["path"] for a in apps}
    assert "charts/veil" in paths
    for path in paths:
        assert (REPO / path).is_dir(), path
    waves = {
        a["spec"]["source"]["path"]: int(
            a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]
        )
        for a in apps
    }
    assert all(waves["charts/veil"] < wave for p, wave in waves.items() if p != "charts/veil")


def test_no_registry_credentials_or_hosts_in_gitops_examples() -> None:
    for path in GITOPS.rglob("*"):
        if path.is_file():
            assert not re.search(r"(password|token|secret)\s*:", path.read_text(), re.I), path
