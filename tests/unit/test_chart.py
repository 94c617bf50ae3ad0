"""The Helm chart (charts/veil): lint, render, validate every object, and keep it honest.

Tools: helm and kubeconform built from their Go modules by hack/build-tools.sh (cached).

What kubeconform validates against (strict: unknown fields and duplicate keys are errors):
- Kubernetes' own kinds: JSON schemas converted here from the OpenAPI v2 document of the real
  kube-apiserver that the test suite runs (hack/build-control-plane.sh's version). Kubernetes'
  published schemas cannot be downloaded here, and need not be: the converter does what
  kubeconform's openapi2jsonschema does. The document is fetched once from a control plane
  started for a few seconds, then cached under $VEIL_CACHE.
- Veil's and kopf's CRDs: JSON schemas converted from the CRDs the chart itself renders.
- ServiceMonitor and PrometheusRule (Prometheus Operator): no schema is available offline, so
  kubeconform skips exactly these two kinds; the test checks nothing else is skipped.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "veil"
CRDS = REPO / "crds"
ALL_FEATURES = REPO / "tests" / "data" / "chart" / "all-features.yaml"
RELEASE, NAMESPACE = "veil", "veil-system"
# Kinds kubeconform cannot validate offline (Prometheus Operator CRDs are not installed here).
UNVALIDATED_KINDS = ("ServiceMonitor", "PrometheusRule")
# Bump when the converter changes, so cached schemas are regenerated.
CONVERTER_VERSION = "2"

VALUES_FILES = {"default": None, "all-features": ALL_FEATURES}


# --- tools ------------------------------------------------------------------------------------


@functools.cache
def tools() -> Path:
    """The bin directory with helm and kubeconform (built once, then cached)."""
    completed = subprocess.run(
        ["bash", str(REPO / "hack" / "build-tools.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        pytest.fail(f"hack/build-tools.sh failed:\n{completed.stderr[-3000:]}")
    return Path(completed.stdout.strip().splitlines()[-1])


@functools.cache
def control_plane_bin() -> Path:
    from tests.cluster.localcluster import build_binaries

    return build_binaries()


def kube_version() -> str:
    """The Kubernetes version of the local control plane, e.g. 1.35.4."""
    found = re.search(r"k8s-v(\d+\.\d+\.\d+)", str(control_plane_bin()))
    return found.group(1) if found else "1.35.4"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [str(tools() / "helm"), *args], capture_output=True, text=True, check=False
    )
    if check and completed.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{completed.stderr}{completed.stdout}")
    return completed


# The chart requires images by digest; this stands for the one a release pins.
TEST_DIGEST = "sha256:" + "5" * 64


def template(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with the test digest, plus `args` (--set, -f, ...)."""
    base = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", kube_version()]
    return helm(*base, "--set", f"image.digest={TEST_DIGEST}", *args, check=check)


@functools.cache
def render_text(values: Path | None = None, *sets: str) -> str:
    args: list[str] = []
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    return template(*args).stdout


class KubeYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML as Kubernetes reads it (YAML 1.2 floats): helm's toYaml writes 1e-06, which
    PyYAML's YAML 1.1 rules would take for a string."""


KubeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=KubeYamlLoader) if doc]


@functools.cache
def _rendered(values: Path | None, *sets: str) -> list[dict[str, Any]]:
    return load_all(render_text(values, *sets))


def render(values: Path | None = None, *sets: str) -> list[dict[str, Any]]:
    """The chart's objects (a fresh copy: tests may change them)."""
    return copy.deepcopy(_rendered(values, *sets))


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


# --- OpenAPI → JSON schema (what kubeconform's openapi2jsonschema does) --------------------------


_SCHEMA_MAPS = ("properties", "definitions", "patternProperties")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SCHEMA_ONE = ("items", "additionalProperties", "not")


def strict(schema: Any) -> Any:
    """additionalProperties: false wherever properties are declared (kubectl's rule), except
    where the schema keeps unknown fields; int-or-string and nullable in JSON Schema draft 4
    terms. Walks schema positions only, so a property *named* `nullable` stays a property."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    if out.get("format") == "int-or-string" or out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.pop("format", None)
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    keeps_unknown = out.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not keeps_unknown:
        out["additionalProperties"] = False
    return out


def kind_suffix(group: str, version: str) -> str:
    """kubeconform's {{ .KindSuffix }}: -<first part of the group>-<version>, or -<version>."""
    return f"-{group.split('.', maxsplit=1)[0].lower()}-{version}" if group else f"-{version}"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            yield ref.removeprefix("#/definitions/")
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def openapi_v2_to_schemas(document: Mapping[str, Any], out: Path) -> int:
    """One standalone schema file per group/version/kind, carrying the definitions it uses."""
    definitions = dict(document["definitions"])
    quantity = "io.k8s.apimachinery.pkg.api.resource.Quantity"
    if quantity in definitions:
        definitions[quantity] = {"oneOf": [{"type": "string"}, {"type": "number"}]}
    written = 0
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            reachable: dict[str, Any] = {}
            pending = [name]
            while pending:
                current = pending.pop()
                if current in reachable or current not in definitions:
                    continue
                reachable[current] = strict(definitions[current])
                pending.extend(_refs(definitions[current]))
            schema = copy.deepcopy(reachable[name])
            schema["definitions"] = reachable
            file_name = f"{gvk['kind'].lower()}{kind_suffix(gvk['group'], gvk['version'])}.json"
            (out / file_name).write_text(json.dumps(schema))
            written += 1
    return written


def crd_to_schemas(crd: Mapping[str, Any], out: Path) -> list[str]:
    spec = crd["spec"]
    written = []
    for version in spec["versions"]:
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        # The API server adds these to every custom resource's schema.
        for field, kind in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
            schema.setdefault("properties", {}).setdefault(field, {"type": kind})
        schema = strict(schema)
        file_name = f"{spec['names']['kind'].lower()}{kind_suffix(spec['group'], version['name'])}"
        (out / f"{file_name}.json").write_text(json.dumps(schema))
        written.append(file_name)
    return written


@functools.cache
def kubernetes_schemas() -> Path:
    """Schemas of the local kube-apiserver's built-in kinds, cached per control-plane build."""
    cache = Path(os.environ.get("VEIL_CACHE", Path.home() / ".cache" / "veil"))
    target = (
        cache
        / "tools"
        / "kubernetes-json-schema"
        / f"{control_plane_bin().parent.name}-c{CONVERTER_VERSION}"
    )
    if (target / "deployment-apps-v1.json").exists():
        return target
    from tests.cluster.localcluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="veil-openapi-") as scratch:
        cluster = LocalCluster(directory=Path(scratch) / "cluster", bin_dir=control_plane_bin())
        try:
            cluster.start()
            document = json.loads(cluster.kubectl("get", "--raw", "/openapi/v2"))
        finally:
            cluster.stop()
        staging = Path(scratch) / "schemas"
        staging.mkdir()
        assert openapi_v2_to_schemas(document, staging) > 100
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(staging, target)
    return target


def kubeconform(manifests: str, crd_docs: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    """Validate a multi-document stream; return kubeconform's per-resource results."""
    crd_dir = tmp / "crd-schemas"
    crd_dir.mkdir(exist_ok=True)
    for crd in crd_docs:
        crd_to_schemas(crd, crd_dir)
    stream = tmp / "manifests.yaml"
    stream.write_text(manifests)
    template = "{{ .ResourceKind }}{{ .KindSuffix }}.json"
    completed = subprocess.run(
        [
            str(tools() / "kubeconform"),
            "-strict",
            "-output=json",
            "-verbose",
            f"-schema-location={kubernetes_schemas()}/{template}",
            f"-schema-location={crd_dir}/{template}",
            f"-skip={','.join(UNVALIDATED_KINDS)}",
            str(stream),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(completed.stdout)
    results: list[dict[str, Any]] = report["resources"]
    return results


def chart_crds() -> list[dict[str, Any]]:
    return find(render(), "CustomResourceDefinition")


# --- CRDs -----------------------------------------------------------------------------------------


def test_chart_crd_files_are_the_generated_crds() -> None:
    """charts/veil/files/crds/ must be a byte-for-byte copy of crds/ (`veil crds` writes it)."""
    ours = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    generated = {p.name: p.read_bytes() for p in CRDS.glob("*.yaml")}
    stale = sorted(set(ours) ^ set(generated) | {n for n in ours if generated.get(n) != ours[n]})
    assert not stale, (
        f"charts/veil/files/crds differs from crds/ ({', '.join(stale)}); refresh it with:\n"
        "  rm -f charts/veil/files/crds/*.yaml && cp crds/*.yaml charts/veil/files/crds/"
    )


def _without_chart_metadata(crd: dict[str, Any]) -> dict[str, Any]:
    crd = copy.deepcopy(crd)
    meta = crd["metadata"]
    meta.pop("annotations", None)
    meta["labels"] = {
        k: v for k, v in meta.get("labels", {}).items() if k == "app.kubernetes.io/part-of"
    }
    if not meta["labels"]:
        meta.pop("labels")
    return crd


def test_rendered_crds_equal_generated_crds_plus_keep() -> None:
    rendered = {c["metadata"]["name"]: c for c in chart_crds()}
    generated = [yaml.safe_load(p.read_text()) for p in sorted(CRDS.glob("*.yaml"))]
    for crd in generated:
        name = crd["metadata"]["name"]
        assert _without_chart_metadata(rendered[name]) == crd, name
        assert rendered[name]["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert rendered[name]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "veil"
    kopf = {n for n in rendered if n.endswith(".kopf.dev")}
    assert kopf == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for name in kopf:
        # Not part-of veil: `kubectl get crd -l app.kubernetes.io/part-of=veil` lists Veil's only.
        assert "app.kubernetes.io/part-of" not in rendered[name]["metadata"]["labels"]
        schema = rendered[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    assert rendered["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert rendered["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"


def test_chart_kopf_crd_files_are_the_repository_kopf_crds() -> None:
    """charts/veil/files/kopf/ is a copy of crds/kopf/, which is what a platform team applies
    when it manages the CRDs outside the chart."""
    ours = {p.name: p.read_bytes() for p in (CHART / "files" / "kopf").glob("*.yaml")}
    repository = {p.name: p.read_bytes() for p in (CRDS / "kopf").glob("*.yaml")}
    assert ours == repository, "refresh it: cp crds/kopf/*.yaml charts/veil/files/kopf/"
    names = {yaml.safe_load(text)["metadata"]["name"] for text in repository.values()}
    assert names == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def test_crd_switches() -> None:
    unkept = find(render(None, "crds.keep=false"), "CustomResourceDefinition")
    assert len(unkept) == 5
    assert all("annotations" not in c["metadata"] for c in unkept)


CLUSTER_PEERING_API = "kopf.dev/v1/ClusterKopfPeering"
NAMESPACED_PEERING_API = "kopf.dev/v1/KopfPeering"


def test_crds_managed_outside_render_the_peering_hook_only_where_kopf_crds_are_served(
    tmp_path: Path,
) -> None:
    """crds.enabled=false: no CRD is rendered, and the peering hook only if the cluster serves
    kopf's peering kind (as helm install sees it, or Argo CD's --api-versions); otherwise the
    chart fails saying what to apply, instead of a hook that fails or replicas that pause."""
    outside = ("--set", "crds.enabled=false")
    refused = template(*outside, check=False)
    assert refused.returncode != 0
    assert "does not serve kopf.dev/v1 ClusterKopfPeering" in refused.stderr
    assert "kubectl apply --server-side -f crds/ -f crds/kopf/" in refused.stderr

    served = template(*outside, "--api-versions", CLUSTER_PEERING_API).stdout
    docs = load_all(served)
    assert not find(docs, "CustomResourceDefinition")
    peering = one(docs, "ClusterKopfPeering")
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=veil" in args
    # Every object is valid against the CRDs the platform team applies (crds/, crds/kopf/).
    applied = [yaml.safe_load(p.read_text()) for p in [*CRDS.glob("*.yaml"), *CRDS.glob("kopf/*")]]
    results = kubeconform(served, applied, tmp_path)
    assert {r["status"] for r in results if r["kind"] not in UNVALIDATED_KINDS} == {"statusValid"}

    # Namespaced peering asks for its own kind.
    team = ("--set", "watchNamespaces={team-a}")
    refused = template(*outside, *team, "--api-versions", CLUSTER_PEERING_API, check=False)
    assert "does not serve kopf.dev/v1 KopfPeering" in refused.stderr
    namespaced = load_all(
        template(*outside, *team, "--api-versions", NAMESPACED_PEERING_API).stdout
    )
    assert one(namespaced, "KopfPeering")["metadata"]["namespace"] == "team-a"

    # Without the hook (the peering object created elsewhere) or without peering: no check.
    for sets in (("peering.create=false",), ("peering.enabled=false", "replicaCount=1")):
        docs = render(None, "crds.enabled=false", *sets)
        assert not find(docs, "CustomResourceDefinition")
        assert not find(docs, "ClusterKopfPeering")


# --- lint and schema validation ----------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES_FILES, ids=str)
def test_helm_lint(values: str) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", kube_version()]
    if VALUES_FILES[values] is not None:
        args += ["-f", str(VALUES_FILES[values])]
    assert "0 chart(s) failed" in helm(*args).stdout


@pytest.mark.parametrize("values", VALUES_FILES, ids=str)
def test_every_rendered_object_is_valid(values: str, tmp_path: Path) -> None:
    manifests = render_text(VALUES_FILES[values])
    results = kubeconform(manifests, chart_crds(), tmp_path)
    assert len(results) == len(load_all(manifests))
    problems = [
        f"{r['kind']}/{r['name']}: {r['status']} {r.get('msg', '')}"
        for r in results
        if r["status"] != "statusValid"
        and not (r["status"] == "statusSkipped" and r["kind"] in UNVALIDATED_KINDS)
    ]
    assert not problems, "\n".join(problems)


def test_validation_catches_an_unknown_field(tmp_path: Path) -> None:
    """The schemas are strict: a misspelt field in a Deployment is an error, not a pass."""
    deployment = one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    results = kubeconform(yaml.safe_dump(deployment), [], tmp_path)
    assert results[0]["status"] == "statusInvalid", results
    assert "httpGett" in results[0]["msg"]


def test_examples_match_the_chart_crds(tmp_path: Path) -> None:
    """Every example object (and the Argo CD health test data) fits the CRD schemas."""
    paths = [
        p
        for p in sorted((REPO / "examples").rglob("*.yaml"))
        if "gitops" not in p.parts or "testdata" in p.parts
    ]
    stream = "\n---\n".join(p.read_text() for p in paths)
    results = kubeconform(stream, chart_crds(), tmp_path)
    problems = [f"{r['filename']} {r['kind']}/{r['name']}: {r.get('msg')}" for r in results]
    problems = [p for p, r in zip(problems, results, strict=True) if r["status"] != "statusValid"]
    assert not problems, "\n".join(problems)
    kinds = {r["kind"] for r in results}
    assert {"ConfidentialModel", "PrivacyBudget", "SyntheticDataset"} <= kinds


# --- the operator Deployment ------------------------------------------------------------------


def test_operator_deployment() -> None:
    docs = render()
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["run", "--peering=veil"]
    assert "--metrics-port=8080" in container["args"]
    assert "--health-port=8081" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount", "veil")["metadata"]["name"]
    service = one(docs, "Service", "veil-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("values", VALUES_FILES, ids=str)
def test_pod_security_restricted(values: str) -> None:
    """Pod Security Standards `restricted`, field by field."""
    pod = one(render(VALUES_FILES[values]), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")
    assert not pod.get("hostIPC")
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "projected"}
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["runAsNonRoot"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context.get("privileged") in (None, False)
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_images_are_pinned_by_digest_and_runtime_image_defaults_to_operator_image() -> None:
    container = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/veil-dev/veil@{TEST_DIGEST}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VEIL_RUNTIME_IMAGE"] == container["image"]
    assert "VEIL_ALLOW_IMAGE_TAGS" not in env
    featured = one(render(ALL_FEATURES), "Deployment")["spec"]["template"]["spec"]
    image = featured["containers"][0]["image"]
    assert image.startswith("registry.example/veil@sha256:")


# --- RBAC ---------------------------------------------------------------------------------------

# What the operator needs, as the issue states it: (group, resource) -> verbs that must be granted.
REQUIRED = {
    **{
        ("veil.dev", r): {"get", "list", "watch", "patch", "update"}
        for r in ("confidentialmodels", "privacybudgets", "syntheticdatasets")
    },
    **{
        ("veil.dev", f"{r}/status"): {"patch"}
        for r in ("confidentialmodels", "privacybudgets", "syntheticdatasets")
    },
    ("", "events"): {"create", "patch"},
    **{
        (g, r): {"get", "list", "watch", "create", "patch", "delete"}
        for g, r in (
            ("apps", "deployments"),
            ("", "services"),
            ("", "serviceaccounts"),
            ("", "configmaps"),
            ("networking.k8s.io", "networkpolicies"),
            ("policy", "poddisruptionbudgets"),
            ("batch", "jobs"),
            ("cilium.io", "ciliumnetworkpolicies"),
        )
    },
    # A DP-SGD run of workers > 1 (made, resumed and removed like a Job; not watched).
    ("kubeflow.org", "pytorchjobs"): {"get", "list", "create", "patch", "delete"},
    # Not in the issue's list: the ConfidentialModel controller watches its pods for status
    # (found by tests/integration/test_chart_install.py in the audit log).
    ("", "pods"): {"get", "list", "watch"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}


def granted(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


RULE_LISTS = ("rules", "clusterPeering", "cluster", "crossNamespace")


def rules_lists() -> dict[str, list[dict[str, Any]]]:
    """files/rbac-rules.yaml: namespaced rules, and the cluster-wide lists beside them."""
    lists: dict[str, list[dict[str, Any]]] = yaml.safe_load(
        (CHART / "files" / "rbac-rules.yaml").read_text()
    )
    assert set(lists) == set(RULE_LISTS)
    return lists


def rules_file() -> list[dict[str, Any]]:
    """Every rule of the file, whichever setting grants it."""
    lists = rules_lists()
    return [rule for name in RULE_LISTS for rule in lists[name]]


def test_cluster_role_is_the_rules_file_without_wildcards() -> None:
    docs = render()
    operator_roles = [
        d
        for d in docs
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-operator")
    ]
    assert len(operator_roles) == 1
    role = operator_roles[0]
    lists = rules_lists()
    assert role["rules"] == lists["rules"] + lists["clusterPeering"] + lists["cluster"]
    assert not find(docs, "Role", "veil-operator")
    for rule in rules_file():
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in item for item in rule[field]), rule
    binding = one(docs, "ClusterRoleBinding", "veil-operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    service_account = one(docs, "ServiceAccount", "veil")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": service_account["name"], "namespace": NAMESPACE}
    ]


def test_rbac_grants_what_the_operator_needs_and_nothing_more() -> None:
    have = granted(rules_file())
    missing = {k: v - have.get(k, set()) for k, v in REQUIRED.items() if v - have.get(k, set())}
    assert not missing, missing
    extra = set(have) - set(REQUIRED)
    assert not extra, f"granted but not needed: {extra}"
    assert not any({"escalate", "bind", "impersonate", "*"} & verbs for verbs in have.values())
    assert ("", "secrets") not in have


SECRETS_GET = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}


def test_extra_rules_are_appended(tmp_path: Path) -> None:
    values = tmp_path / "extra-rules.yaml"
    values.write_text(yaml.safe_dump({"rbac": {"extraRules": [SECRETS_GET]}}))
    cluster_role = one(load_all(template("-f", str(values)).stdout), "ClusterRole", "veil-operator")
    assert cluster_role["rules"][-1] == SECRETS_GET
    # With watchNamespaces they go to each watched namespace's Role.
    featured = render(ALL_FEATURES)
    for role in find(featured, "Role", "veil-operator"):
        assert role["rules"][-1] == SECRETS_GET
    assert SECRETS_GET not in one(featured, "ClusterRole", "veil-operator")["rules"]


def resources_of(rules: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}


def test_watch_namespaces_grant_roles_per_namespace_not_cluster_wide() -> None:
    """With watchNamespaces the operator may touch namespaced resources only in the watched
    namespaces; cluster-wide it keeps cluster-scoped kinds and the two cross-namespace lists
    that binding a budget to its dataset needs."""
    docs = render(ALL_FEATURES)
    lists = rules_lists()
    account = {"kind": "ServiceAccount", "name": "veil-controller", "namespace": NAMESPACE}

    cluster_role = one(docs, "ClusterRole", "veil-operator")
    assert cluster_role["rules"] == lists["cluster"] + lists["crossNamespace"]
    cluster_wide = granted(cluster_role["rules"])
    assert cluster_wide == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
        ("", "namespaces"): {"list", "watch"},
        ("veil.dev", "privacybudgets"): {"list"},
        ("", "configmaps"): {"list"},
    }
    assert one(docs, "ClusterRoleBinding", "veil-operator")["subjects"] == [account]

    roles = find(docs, "Role", "veil-operator")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert role["rules"] == [*lists["rules"], SECRETS_GET]
        binding = next(
            b
            for b in find(docs, "RoleBinding", "veil-operator")
            if b["metadata"]["namespace"] == role["metadata"]["namespace"]
        )
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "veil-operator",
        }
        assert binding["subjects"] == [account]
        in_namespace = granted(role["rules"])
        # Namespaced peering: the KopfPeering, never the ClusterKopfPeering.
        assert ("kopf.dev", "kopfpeerings") in in_namespace
        assert ("kopf.dev", "clusterkopfpeerings") not in in_namespace | cluster_wide
        # Together they grant what the operator needs, bar the cluster-wide peering.
        together = {**in_namespace}
        for key, verbs in cluster_wide.items():
            together[key] = together.get(key, set()) | verbs
        needed = {k: v for k, v in REQUIRED.items() if k[1] != "clusterkopfpeerings"}
        assert not {
            k: v - together.get(k, set()) for k, v in needed.items() if v - together.get(k, set())
        }

    # The node agent: TokenReview cluster-wide, what it reads about model pods per namespace.
    agent = one(docs, "ClusterRole", "veil-node-agent")["rules"]
    assert resources_of(agent) == {("authentication.k8s.io", "tokenreviews")}
    agent_roles = find(docs, "Role", "veil-node-agent")
    assert sorted(r["metadata"]["namespace"] for r in agent_roles) == ["team-a", "team-b"]
    for role in agent_roles:
        assert resources_of(role["rules"]) == {
            ("", "pods"),
            ("apps", "replicasets"),
            ("apps", "deployments"),
            ("veil.dev", "confidentialmodels"),
        }
        assert {v for rule in role["rules"] for v in rule["verbs"]} == {"get"}
    assert len(find(docs, "RoleBinding", "veil-node-agent")) == 2


# --- peering, PDB, monitoring ---------------------------------------------------------------------


def test_cluster_peering_object_is_a_hook() -> None:
    peering = one(render(), "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "veil"
    assert peering["apiVersion"] == "kopf.dev/v1"
    annotations = peering["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"


def test_namespaced_peering_per_watched_namespace() -> None:
    docs = render(ALL_FEATURES)
    assert not find(docs, "ClusterKopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in find(docs, "KopfPeering")) == [
        "team-a",
        "team-b",
    ]
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args
    assert "--namespace=team-b" in args


def test_replicas_need_peering() -> None:
    failed = helm(
        "template",
        RELEASE,
        str(CHART),
        "--kube-version",
        kube_version(),
        "--set",
        f"image.digest={TEST_DIGEST}",
        "--set",
        "peering.enabled=false",
        check=False,
    )
    assert failed.returncode != 0
    assert "needs peering.enabled" in failed.stderr
    args = one(render(None, "peering.enabled=false", "replicaCount=1"), "Deployment")
    assert "--standalone" in args["spec"]["template"]["spec"]["containers"][0]["args"]


def test_pod_disruption_budget() -> None:
    pdb = one(render(), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    deployment = one(render(), "Deployment")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert not find(render(None, "replicaCount=1"), "PodDisruptionBudget")


def test_monitoring_is_off_by_default_and_complete_when_on() -> None:
    default = render()
    for kind in ("ServiceMonitor", "PrometheusRule", "ConfigMap"):
        assert not find(default, kind)
    docs = render(ALL_FEATURES)
    operator_monitor = one(docs, "ServiceMonitor", "veil-operator")
    assert operator_monitor["metadata"]["namespace"] == "monitoring"
    assert operator_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert operator_monitor["spec"]["endpoints"][0]["honorLabels"] is True
    inference = one(docs, "ServiceMonitor", "veil-inference")
    # The runtime's metrics port: its inference port serves only the protocol.
    assert inference["spec"]["endpoints"][0]["port"] == "metrics"
    rule = one(docs, "PrometheusRule")
    shipped = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())["groups"]
    assert rule["spec"]["groups"][: len(shipped)] == shipped
    assert rule["spec"]["groups"][-1]["name"] == "site.veil"
    dashboard = one(docs, "ConfigMap", "veil-dashboard")
    assert json.loads(dashboard["data"]["veil.json"])["uid"] == "veil-overview"
    ksm = one(docs, "ConfigMap", "veil-kube-state-metrics")
    config = yaml.safe_load(ksm["data"]["customresourcestate.yaml"])
    assert config["kind"] == "CustomResourceStateMetrics"


def _model_children(scraper_namespace: str | None) -> dict[str, list[dict[str, Any]]]:
    """The children the operator builds for the example confidential-VM model, as it would with
    the chart's VEIL_METRICS_SCRAPER_NAMESPACE."""
    from veil.api.confidential_model import ConfidentialModel
    from veil.config import OperatorConfig
    from veil.resources import confidential_model as build

    owner = yaml.safe_load(
        (REPO / "examples" / "confidential-model-cvm" / "model.yaml").read_text()
    )
    owner["metadata"]["uid"] = "00000000-1111-2222-3333-444444444444"
    spec = ConfidentialModel.model_validate(owner).spec
    config = OperatorConfig(metrics_scraper_namespace=scraper_namespace)
    out: dict[str, list[dict[str, Any]]] = {}
    for manifest in build.children(owner, spec, config).apply:
        out.setdefault(manifest["kind"], []).append(manifest)
    return out


def _scrapeable_from(children: dict[str, list[dict[str, Any]]], port_name: str) -> set[str]:
    """Namespaces whose pods the model's NetworkPolicies admit to the container port behind the
    Service port `port_name` (NetworkPolicies match the pod's port, not the Service's)."""
    (service,) = children["Service"]
    target = next(p for p in service["spec"]["ports"] if p["name"] == port_name)["targetPort"]
    pod = children["Deployment"][0]["spec"]["template"]["spec"]
    number = next(
        p["containerPort"] for c in pod["containers"] for p in c["ports"] if p["name"] == target
    )
    admitted: set[str] = set()
    for policy in children["NetworkPolicy"]:
        for rule in policy["spec"].get("ingress", []):
            if any(p.get("port") in (number, target) for p in rule.get("ports", [])):
                for peer in rule.get("from") or [{}]:  # no `from`: every source
                    labels = peer.get("namespaceSelector", {}).get("matchLabels", {})
                    admitted.add(labels.get("kubernetes.io/metadata.name", "*"))
    return admitted


def test_inference_monitor_scrapes_only_what_the_model_network_policy_admits() -> None:
    """The inference ServiceMonitor's targets sit behind each model's default-deny
    NetworkPolicy: the chart refuses to scrape them unless it names Prometheus's namespace,
    which it passes to the operator, whose allow policy then admits exactly that namespace to
    the port the ServiceMonitor scrapes."""
    refused = template("--set", "serviceMonitor.enabled=true", check=False)
    assert refused.returncode != 0
    assert "serviceMonitor.prometheusNamespace" in refused.stderr
    # Nothing is scraped behind the policy: no namespace needed.
    operator_only = render(None, "serviceMonitor.enabled=true", "serviceMonitor.inference=false")
    assert [m["metadata"]["name"] for m in find(operator_only, "ServiceMonitor")] == [
        "veil-operator"
    ]

    docs = render(
        None, "serviceMonitor.enabled=true", "serviceMonitor.prometheusNamespace=monitoring"
    )
    monitor = one(docs, "ServiceMonitor", "veil-inference")
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["endpoints"]
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    scraper = env["VEIL_METRICS_SCRAPER_NAMESPACE"]
    assert scraper == "monitoring"
    assert _scrapeable_from(_model_children(scraper), endpoint["port"]) == {"monitoring"}
    # What the ServiceMonitor would hit without the value: a port nothing may reach.
    assert _scrapeable_from(_model_children(None), endpoint["port"]) == set()

    # Watching namespaces, the monitor looks in those only.
    featured = one(render(ALL_FEATURES), "ServiceMonitor", "veil-inference")
    assert featured["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_log_format_reaches_the_operator() -> None:
    for values, expected in ((None, "text"), (ALL_FEATURES, "json")):
        container = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VEIL_LOG_FORMAT"] == expected


# --- values: schema and README ------------------------------------------------------------------


def leaf_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of values.yaml; maps that default to {} or lists count as leaves."""
    if isinstance(node, dict) and node:
        return [p for key, value in node.items() for p in leaf_paths(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_readme_lists_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text().split("## Values", 1)[1]
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    paths = set(leaf_paths(values))
    # A documented prefix (e.g. `resources`) covers the keys under it.
    undocumented = {
        p for p in paths if not any(p == d or p.startswith(f"{d}.") for d in documented)
    }
    assert not undocumented, f"values missing from charts/veil/README.md: {sorted(undocumented)}"
    unknown = {d for d in documented if not any(p == d or p.startswith(f"{d}.") for p in paths)}
    assert not unknown, f"README documents values that do not exist: {sorted(unknown)}"


def test_schema_refuses_unknown_and_mistyped_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
    for bad in (
        "bogus=1",
        "replicaCount=two",
        "image.pullPolicy=Sometimes",
        "metrics.port=0",
        "logging.format=xml",
        "serviceMonitor.prometheusNamespace=Not_A_Namespace",
    ):
        failed = helm(
            "template",
            RELEASE,
            str(CHART),
            "--kube-version",
            kube_version(),
            "--set",
            bad,
            check=False,
        )
        assert failed.returncode != 0, bad
        assert "values don't meet the specifications of the schema" in failed.stderr, bad


def test_user_roles_never_grant_status_configmaps_or_secrets() -> None:
    """Viewer, editor and budget owner: none may write a status (the ledger lives there), the
    audit trail and spending records (ConfigMaps), or read the ledger key (a Secret)."""
    docs = render()
    roles = {
        d["metadata"]["name"]: d["rules"]
        for d in docs
        if d["kind"] == "ClusterRole"
        and not d["metadata"]["name"].endswith(("-operator", "-node-agent"))
    }
    assert {name.rsplit("-", 1)[-1] for name in roles} >= {"viewer", "editor", "owner"}
    for name, rules in roles.items():
        for rule in rules:
            assert rule["apiGroups"] == ["veil.dev"], (name, rule)
            assert not any("/" in r or "*" in r for r in rule["resources"]), (name, rule)
            assert "*" not in rule["verbs"], (name, rule)
    without = render(None, "userRoles.create=false")
    assert [d["metadata"]["name"] for d in without if d["kind"] == "ClusterRole"] == [
        "veil-node-agent",
        "veil-operator",
    ]


def test_ledger_key_role_is_namespaced_and_named() -> None:
    docs = render()
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    get = next(r for r in role["rules"] if "get" in r["verbs"])
    assert get["resources"] == ["secrets"]
    assert get["resourceNames"] == ["veil-ledger-key"]
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["VEIL_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["VEIL_LEDGER_KEY_SECRET"]["value"] == "veil-ledger-key"


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        (("image.digest=",), "image.digest is required"),
        (("runtime.image=ghcr.io/veil-dev/veil:1.0",), "runtime.image must be pinned"),
        (("runtime.keyReleaseImage=mcr.microsoft.com/aci/skr:2.7",), "runtime.keyReleaseImage"),
        (("runtime.trainerImage=ghcr.io/veil-dev/veil-trainer:1.0",), "runtime.trainerImage"),
    ],
)
def test_an_image_by_tag_is_refused_naming_the_value(sets: tuple[str, ...], named: str) -> None:
    args = ["template", RELEASE, str(CHART), "--kube-version", kube_version()]
    args += ["--set", f"image.digest={TEST_DIGEST}"]
    for item in sets:
        args += ["--set", item]
    refused = helm(*args, check=False)
    assert refused.returncode != 0
    assert named in refused.stderr


def test_the_trainer_image_reaches_the_operator_only_when_set() -> None:
    version = ("--kube-version", kube_version())
    digest = ("--set", f"image.digest={TEST_DIGEST}")
    trainer = f"ghcr.io/veil-dev/veil-trainer@{TEST_DIGEST}"

    def env(*sets: str) -> dict[str, Any]:
        docs = load_all(helm("template", RELEASE, str(CHART), *version, *digest, *sets).stdout)
        container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in container["env"]}

    assert "VEIL_TRAINER_IMAGE" not in env()
    assert env("--set", f"runtime.trainerImage={trainer}")["VEIL_TRAINER_IMAGE"] == trainer


def test_development_may_allow_tags_and_says_so_to_the_operator() -> None:
    version = ("--kube-version", kube_version())
    allow = ("--set", "development.allowImageTags=true")
    docs = load_all(helm("template", RELEASE, str(CHART), *version, *allow).stdout)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/veil-dev/veil:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VEIL_ALLOW_IMAGE_TAGS"] == "true"


def test_the_node_agent_runs_on_confidential_vm_nodes_and_serves_its_own_node_only() -> None:
    docs = render()
    agent = one(docs, "DaemonSet", "veil-node-agent")["spec"]["template"]
    assert agent["spec"]["nodeSelector"] == {"kubernetes.azure.com/security-type": "ConfidentialVM"}
    container = agent["spec"]["containers"][0]
    assert container["args"][:1] == ["node-agent"]
    assert "--tcti=device:/dev/tpmrm0" in container["args"]
    assert container["securityContext"] == {"privileged": True}  # the host's TPM device
    assert {
        v["name"]: v["hostPath"]["path"] for v in agent["spec"]["volumes"] if "hostPath" in v
    } == {
        "tpm": "/dev/tpmrm0",
        "tcg-log": "/sys/kernel/security/tpm0/binary_bios_measurements",
    }
    service = one(docs, "Service", "veil-node-agent")["spec"]
    assert service["internalTrafficPolicy"] == "Local"
    assert service["selector"]["app.kubernetes.io/component"] == "node-agent"
    operator = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    assert env["VEIL_NODE_AGENT_URL"] == "http://veil-node-agent.veil-system.svc:8095"
    assert env["VEIL_NODE_AGENT_NAMESPACE"] == "veil-system"
    rules = one(docs, "ClusterRole", "veil-node-agent")["rules"]
    verbs = {
        (g, r): tuple(rule["verbs"])
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert verbs == {
        ("authentication.k8s.io", "tokenreviews"): ("create",),
        ("", "pods"): ("get",),
        ("apps", "replicasets"): ("get",),
        ("apps", "deployments"): ("get",),
        ("veil.dev", "confidentialmodels"): ("get",),
    }


def test_a_node_agent_with_a_tpm_over_tcp_runs_restricted() -> None:
    docs = render(
        None, "nodeAgent.privileged=false", r"nodeAgent.tcti=swtpm:host=10.0.0.1\,port=2321"
    )
    agent = one(docs, "DaemonSet", "veil-node-agent")["spec"]["template"]["spec"]
    context = agent["containers"][0]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert agent["securityContext"]["runAsNonRoot"] is True
    assert not [v for v in agent["volumes"] if "hostPath" in v]
    assert "--tcti=swtpm:host=10.0.0.1,port=2321" in agent["containers"][0]["args"]
    without = render(None, "nodeAgent.enabled=false")
    assert not [d for d in without if d["kind"] == "DaemonSet"]
    operator = one(without, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "VEIL_NODE_AGENT_URL" not in {e["name"] for e in operator["env"]}


def test_image_configs_reach_the_operator_as_json() -> None:
    image = "registry.example/veil@sha256:" + "1" * 64
    docs = render(
        None,
        f"runtime.image={image}",
        f"runtime.imageConfigs.registry\\.example/veil@sha256:{'1' * 64}.entrypoint={{veil}}",
    )
    operator = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    assert json.loads(env["VEIL_IMAGE_CONFIGS"]) == {image: {"entrypoint": ["veil"]}}
