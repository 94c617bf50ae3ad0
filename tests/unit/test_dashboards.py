"""The Grafana dashboard, the alerts and the kube-state-metrics config reference only metrics
that exist: the operator's, the inference runtime's and the privacy metrics (collected from
their registries, not from a list), and the kube_veil_* series the kube-state-metrics config
itself generates."""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "charts" / "veil" / "files"
DASHBOARD = FILES / "dashboards" / "veil.json"
RULES = FILES / "prometheus-rules.yaml"
KSM = FILES / "kube-state-metrics" / "customresourcestate.yaml"
CRDS = REPO / "crds"

# The names veil.privacy.metrics.PrivacyMetrics registers. Used only if that module cannot be
# imported (it was written alongside this test); test_privacy_fallback_matches_the_code keeps
# the list honest whenever the module is there.
PRIVACY_FALLBACK = {
    "veil_privacy_budget_epsilon_remaining": "gauge",
    "veil_privacy_budget_epsilon_spent": "gauge",
    "veil_privacy_claims": "counter",
}

# What the issue asks the dashboard to show, by metric family.
DASHBOARD_MUST_SHOW = {
    "veil_privacy_budget_epsilon_remaining",
    "veil_privacy_claims_total",
    "controller_runtime_reconcile_total",
    "controller_runtime_reconcile_errors_total",
    "controller_runtime_reconcile_time_seconds_bucket",
    "controller_runtime_active_workers",
    "workqueue_depth",
    "veil_privacy_budget_claims",
    "veil_model_ready_replicas",
    "veil_key_versions_total",
    "veil_key_release_total",
    "veil_attestation_failures_total",
    "veil_inference_request_duration_seconds_bucket",
}
ALERTS_MUST_HAVE = {
    "VeilPrivacyBudgetNearlyExhausted",
    "VeilReconcileErrors",
    "VeilAttestationFailures",
}

SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def _privacy_families() -> dict[str, str]:
    try:
        from veil.privacy.metrics import PrivacyMetrics
    except ImportError:
        warnings.warn(
            "veil.privacy.metrics is not importable: using PRIVACY_FALLBACK", stacklevel=2
        )
        return PRIVACY_FALLBACK
    registry = CollectorRegistry()
    PrivacyMetrics(registry)
    return {family.name: family.type for family in registry.collect()}


def exported_families() -> dict[str, str]:
    """Family name -> type, for every metric the Veil processes export."""
    from veil.metrics import REGISTRY
    from veil.runtime.metrics import RuntimeMetrics

    runtime = CollectorRegistry()
    RuntimeMetrics(runtime)
    families = {f.name: f.type for registry in (REGISTRY, runtime) for f in registry.collect()}
    families.update(_privacy_families())
    return families


@functools.cache
def exported_series_names() -> frozenset[str]:
    return frozenset(
        name + suffix
        for name, kind in exported_families().items()
        for suffix in SAMPLE_SUFFIXES[kind]
    )


def ksm_series_names() -> set[str]:
    """kube-state-metrics: <metricNamePrefix or kube_customresource>_<metric name>."""
    config = yaml.safe_load(KSM.read_text())
    names = set()
    for resource in config["spec"]["resources"]:
        prefix = resource.get("metricNamePrefix", "kube_customresource")
        for metric in resource["metrics"]:
            names.add(f"{prefix}_{metric['name']}" if prefix else metric["name"])
    return names


# --- PromQL: the metric names an expression reads ------------------------------------------------

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana variables allowed), by regex: strings,
    label matchers, ranges and grouping clauses are dropped; what remains as a bare identifier
    not followed by `(` is a metric name."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', " ", expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # Grafana variables
    text = re.sub(r"\b(?:\d+(?:ms|[smhdwy]))+\b", " ", text)  # durations: 5m, 1h30m
    text = re.sub(r"\b\d+(?:\.\d*)?(?:[eE][-+]?\d+)?\b", " ", text)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        word = match.group(0)
        if following.startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def balanced(expr: str) -> bool:
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"(?:\\.|[^"\\])*"', "", expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


# --- where expressions live ----------------------------------------------------------------------


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    exprs = [n["expr"] for n in _walk(dashboard()["panels"]) if isinstance(n.get("expr"), str)]
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if variable["type"] == "query" and isinstance(text, str):
            found = re.fullmatch(r"label_values\((\w+),\s*\w+\)", text)
            assert found, f"unexpected variable query {text!r}"
            exprs.append(found.group(1))
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def every_expr() -> list[tuple[str, str]]:
    return [("dashboard", e) for e in dashboard_exprs()] + [
        (f"alert {r['alert']}", r["expr"]) for r in alert_rules()
    ]


# --- tests ---------------------------------------------------------------------------------------


def test_extractor_reads_metric_names_and_catches_a_typo() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, kind) "
        '(rate(veil_reconcile_duration_seconds_bucket{kind="x"}[5m])))'
        " / on (kind) group_left() veil_reconcile_totl offset 1h30m > bool 1e-3"
    )
    assert metric_names(expr) == {"veil_reconcile_duration_seconds_bucket", "veil_reconcile_totl"}
    assert "veil_reconcile_totl" not in exported_series_names()
    assert metric_names('min by (namespace) (x{namespace=~"$namespace"}) or y') == {"x", "y"}


@pytest.mark.parametrize(("where", "expr"), every_expr(), ids=lambda v: str(v)[:60])
def test_every_referenced_metric_is_exported(where: str, expr: str) -> None:
    assert balanced(expr), f"{where}: unbalanced brackets in {expr!r}"
    known = exported_series_names() | ksm_series_names()
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - known
    assert not unknown, f"{where} reads metrics nothing exports: {sorted(unknown)}"


def test_dashboard_shows_what_the_issue_asks() -> None:
    shown = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert not DASHBOARD_MUST_SHOW - shown, DASHBOARD_MUST_SHOW - shown
    assert shown & ksm_series_names(), "the dashboard uses the kube-state-metrics conditions"


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "veil-overview"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"


def test_alerts_are_complete() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= ALERTS_MUST_HAVE
    for rule in rules:
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    nearly = next(r for r in rules if r["alert"] == "VeilPrivacyBudgetNearlyExhausted")
    assert "veil_privacy_budget_epsilon_remaining" in metric_names(nearly["expr"])


def test_privacy_fallback_matches_the_code() -> None:
    pytest.importorskip("veil.privacy.metrics")
    assert _privacy_families() == PRIVACY_FALLBACK


# --- the kube-state-metrics config against the CRDs ---------------------------------------------


def _crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"
            schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def _resolves(schema: dict[str, Any], path: list[str]) -> bool:
    node = schema
    for step in path:
        if step == "metadata" and node is schema:
            return True  # ObjectMeta: the API server's, not in the CRD schema
        if node.get("type") == "array":
            node = node["items"]
        properties = node.get("properties", {})
        if step not in properties:
            return False
        node = properties[step]
    return True


def test_kube_state_metrics_paths_exist_in_the_crds() -> None:
    config = yaml.safe_load(KSM.read_text())
    assert config["kind"] == "CustomResourceStateMetrics"
    schemas = _crd_schemas()
    kinds = set()
    for resource in config["spec"]["resources"]:
        gvk = resource["groupVersionKind"]
        schema = schemas[f"{gvk['group']}/{gvk['version']}/{gvk['kind']}"]
        kinds.add(gvk["kind"])
        for label_path in resource["labelsFromPath"].values():
            assert _resolves(schema, label_path), label_path
        metrics = {m["name"]: m for m in resource["metrics"]}
        condition = metrics["status_condition"]["each"]["gauge"]
        assert condition["path"] == ["status", "conditions"]
        assert condition["valueFrom"] == ["status"]
        for metric in resource["metrics"]:
            gauge = metric["each"]["gauge"]
            assert _resolves(schema, gauge["path"]), (gvk["kind"], gauge["path"])
            if "valueFrom" in gauge:
                assert _resolves(schema, [*gauge["path"], *gauge["valueFrom"]]), metric["name"]
    assert kinds == {"ConfidentialModel", "PrivacyBudget", "SyntheticDataset"}
    assert "kube_veil_privacybudget_epsilon_remaining" in ksm_series_names()
