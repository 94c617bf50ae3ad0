"""A corpus of invalid Veil resources: each case breaks one rule of one kind.

A case starts from a valid example under examples/, changes one thing, and names the
text the rejection must contain (the offending field, and for CEL rules the message).
The same corpus runs against the API server (integration) and the pydantic models (unit).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DELETE = object()

BASES = {
    "cvm": EXAMPLES / "confidential-model-cvm" / "model.yaml",
    "aci": EXAMPLES / "confidential-model-aci" / "model.yaml",
    "training": EXAMPLES / "dp-training" / "model.yaml",
    "budget": EXAMPLES / "synthetic-data" / "budget.yaml",
    "synth": EXAMPLES / "synthetic-data" / "synthetic.yaml",
}


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    changes: dict[str, Any]
    expect: str  # must appear in the API server's message
    transition: bool = False  # needs an existing object (an update), not a create

    def manifest(self, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
        document = copy.deepcopy(yaml.safe_load(BASES[self.base].read_text()))
        for path, value in self.changes.items():
            _set(document, path.split("."), value)
        if name:
            document["metadata"]["name"] = name
        if namespace:
            document["metadata"]["namespace"] = namespace
        if (
            self.base == "budget"
            and name
            and not any(path.startswith("spec.dataset") for path in self.changes)
        ):
            # One budget protects a dataset: each named copy gets a dataset of its own.
            where = document["metadata"].get("namespace", "default")
            document["spec"]["dataset"]["uri"] = f"file:///data/{where}/{name}.csv"
        return document  # type: ignore[no-any-return]


def _set(document: Any, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        document = document[int(key)] if isinstance(document, list) else document[key]
    last = path[-1]
    if value is DELETE:
        del document[last]
    elif isinstance(document, list):
        document[int(last)] = value
    else:
        document[last] = value


CASES: list[Case] = [
    # --- ConfidentialModel: types, ranges, enums, patterns ---
    Case("cm-isolation-enum", "cvm", {"spec.tee.isolation": "sgx"}, "spec.tee.isolation"),
    Case("cm-platform-enum", "cvm", {"spec.tee.platform": "arm-cca"}, "spec.tee.platform"),
    Case("cm-missing-tee", "cvm", {"spec.tee": DELETE}, "spec.tee"),
    Case("cm-missing-keyrelease", "cvm", {"spec.keyRelease": DELETE}, "spec.keyRelease"),
    Case("cm-sha256-short", "cvm", {"spec.model.sha256": "abc123"}, "spec.model.sha256"),
    Case("cm-sha256-upper", "cvm", {"spec.model.sha256": "A" * 64}, "spec.model.sha256"),
    Case("cm-uri-scheme", "cvm", {"spec.model.uri": "ftp://x/y"}, "spec.model.uri"),
    Case("cm-replicas-negative", "cvm", {"spec.serving.replicas": -1}, "spec.serving.replicas"),
    Case("cm-replicas-string", "cvm", {"spec.serving.replicas": "two"}, "spec.serving.replicas"),
    Case("cm-port-privileged", "cvm", {"spec.serving.port": 80}, "spec.serving.port"),
    Case(
        "cm-vault-http",
        "cvm",
        {"spec.keyRelease.vaultUrl": "http://vault"},
        "spec.keyRelease.vaultUrl",
    ),
    Case(
        "cm-keyname-chars",
        "cvm",
        {"spec.keyRelease.keyName": "bad_name!"},
        "spec.keyRelease.keyName",
    ),
    Case(
        "cm-deletion-policy",
        "cvm",
        {"spec.keyRelease.deletionPolicy": "Orphan"},
        "spec.keyRelease.deletionPolicy",
    ),
    Case("cm-unknown-field", "cvm", {"spec.serving.replcas": 3}, "spec.serving.replcas"),
    Case(
        "cm-cidr",
        "cvm",
        {"spec.network.egressCidrs": ["20.49.97.0"]},
        "spec.network.egressCidrs[0]",
    ),
    Case(
        "cm-resources-quantity",
        "cvm",
        {"spec.serving.resources.limits": {"cpu": "lots"}},
        "spec.serving.resources.limits.cpu",
    ),
    # --- ConfidentialModel: cross-field (CEL) ---
    Case(
        "cm-neither-model-nor-training",
        "cvm",
        {"spec.model": DELETE},
        "set model (a sealed ONNX artifact) or training",
    ),
    Case(
        "cm-coco-needs-runtimeclass",
        "cvm",
        {"spec.tee.isolation": "coco"},
        "spec.tee.runtimeClassName",
    ),
    Case("cm-aci-needs-policy", "aci", {"spec.tee.ccePolicy": DELETE}, "spec.tee.ccePolicy"),
    Case("cm-channel-enum", "cvm", {"spec.serving.channel": "tls"}, "spec.serving.channel"),
    Case(
        "cm-coco-channel-not-encrypted",
        "cvm",
        {
            "spec.tee.isolation": "coco",
            "spec.tee.runtimeClassName": "kata-qemu-snp",
            "spec.serving.channel": "encrypted",
        },
        "serving.channel encrypted needs a channel key bound into an attestation token",
    ),
    Case("cm-aci-not-tdx", "aci", {"spec.tee.platform": "tdx"}, "spec.tee.platform"),
    Case(
        "cm-nodepool-needs-cvm",
        "training",
        {"spec.tee.isolation": "coco", "spec.tee.runtimeClassName": "kata-qemu-tdx"},
        "spec.tee.nodePool",
    ),
    Case(
        "cm-nodepool-size-not-confidential",
        "training",
        {"spec.tee.nodePool.vmSize": "Standard_D4s_v5"},
        "spec.tee.nodePool.vmSize",
    ),
    Case(
        "cm-nodepool-size-wrong-platform",
        "training",
        {"spec.tee.nodePool.vmSize": "Standard_DC4as_v5"},
        "spec.tee.nodePool.vmSize",
    ),
    Case(
        "cm-nodepool-name-long",
        "training",
        {"spec.tee.nodePool.name": "averyverylongpool"},
        "spec.tee.nodePool.name",
    ),
    Case(
        "cm-peer-empty",
        "cvm",
        {"spec.network.allowFrom": [{}]},
        "a peer needs namespaceSelector, podSelector or both",
    ),
    Case(
        "cm-training-epsilon-zero",
        "training",
        {"spec.training.epsilon": 0},
        "spec.training.epsilon",
    ),
    Case(
        "cm-training-family",
        "training",
        {"spec.training.family": "xgboost"},
        "spec.training.family",
    ),
    Case(
        "cm-training-classes-missing",
        "training",
        {"spec.training.classes": DELETE},
        "spec.training.classes",
    ),
    Case(
        "cm-training-one-class",
        "training",
        {"spec.training.classes": ["0"]},
        "spec.training.classes",
    ),
    Case(
        "cm-training-classes-repeat",
        "training",
        {"spec.training.classes": ["0", "0"]},
        "spec.training.classes",
    ),
    Case(
        "cm-training-class-comma",
        "training",
        {"spec.training.classes": ["0", "a,b"]},
        "spec.training.classes",
    ),
    Case(
        "cm-training-evaluation-epsilon-negative",
        "training",
        {"spec.training.evaluationEpsilon": -0.1},
        "spec.training.evaluationEpsilon",
    ),
    Case(
        "cm-training-test-fraction-one",
        "training",
        {"spec.training.testFraction": 1},
        "spec.training.testFraction",
    ),
    # --- PrivacyBudget ---
    Case("pb-epsilon-zero", "budget", {"spec.epsilon": 0}, "spec.epsilon"),
    Case("pb-epsilon-negative", "budget", {"spec.epsilon": -1}, "spec.epsilon"),
    Case("pb-epsilon-string", "budget", {"spec.epsilon": "ten"}, "spec.epsilon"),
    Case("pb-delta-zero", "budget", {"spec.delta": 0}, "spec.delta"),
    Case("pb-delta-one", "budget", {"spec.delta": 1}, "spec.delta"),
    Case("pb-missing-dataset", "budget", {"spec.dataset": DELETE}, "spec.dataset"),
    Case("pb-missing-dataset-uri", "budget", {"spec.dataset.uri": DELETE}, "spec.dataset.uri"),
    Case(
        "pb-dataset-uri-scheme",
        "budget",
        {"spec.dataset.uri": "diabetes.csv"},
        "spec.dataset.uri",
    ),
    Case("pb-accountant-enum", "budget", {"spec.accountant": "moments"}, "spec.accountant"),
    Case(
        "pb-cap-above-total",
        "budget",
        {"spec.maxEpsilonPerClaim": 9},
        "maxEpsilonPerClaim cannot exceed the total epsilon",
    ),
    Case(
        "pb-spender-empty",
        "budget",
        {"spec.spenders": [{}]},
        "a spender names a namespace, a kind or both",
    ),
    Case(
        "pb-spender-kind", "budget", {"spec.spenders": [{"kind": "Pod"}]}, "spec.spenders[0].kind"
    ),
    Case(
        "pb-unlock-steps",
        "budget",
        {"spec.unlock": {"steps": 0, "intervalSeconds": 60}},
        "spec.unlock.steps",
    ),
    Case(
        "pb-dataset-immutable",
        "budget",
        {"spec.dataset.name": "another-dataset"},
        "dataset is immutable",
        transition=True,
    ),
    Case(
        "pb-accountant-immutable",
        "budget",
        {"spec.accountant": "rdp"},
        "accountant is immutable",
        transition=True,
    ),
    Case(
        "pb-epsilon-immutable",
        "budget",
        {"spec.epsilon": 80},
        "epsilon is immutable",
        transition=True,
    ),
    Case(
        "pb-delta-immutable",
        "budget",
        {"spec.delta": 1e-3},
        "delta is immutable",
        transition=True,
    ),
    # --- SyntheticDataset ---
    Case(
        "sd-method-enum", "synth", {"spec.synthesizer.method": "ctgan"}, "spec.synthesizer.method"
    ),
    Case("sd-epsilon-zero", "synth", {"spec.synthesizer.epsilon": 0}, "spec.synthesizer.epsilon"),
    Case("sd-rows-zero", "synth", {"spec.synthesizer.rows": 0}, "spec.synthesizer.rows"),
    Case("sd-rows-float", "synth", {"spec.synthesizer.rows": 10.5}, "spec.synthesizer.rows"),
    Case("sd-format-enum", "synth", {"spec.source.format": "xlsx"}, "spec.source.format"),
    Case("sd-missing-output", "synth", {"spec.output": DELETE}, "spec.output"),
    Case("sd-no-budget", "synth", {"spec.budgetRef": DELETE}, "spec.budgetRef"),
    # allowNonPrivate is gone: every synthesis is paid for.
    Case("sd-allow-non-private", "synth", {"spec.allowNonPrivate": True}, "spec.allowNonPrivate"),
    Case(
        "sd-preprocessor-eps",
        "synth",
        {"spec.synthesizer.preprocessorEpsilon": 1},
        "preprocessorEpsilon must be smaller than epsilon",
    ),
    Case(
        "sd-overwrite-source",
        "synth",
        {"spec.output.uri": "az://veildemo/datasets/diabetes.csv"},
        "output.uri must differ from source.uri",
    ),
    Case("sd-budget-name", "synth", {"spec.budgetRef.name": "Not_A_Name"}, "spec.budgetRef.name"),
    # --- SyntheticDataset: every column's domain is public ---
    Case(
        "sd-no-columns", "synth", {"spec.synthesizer.columns": DELETE}, "spec.synthesizer.columns"
    ),
    Case("sd-empty-columns", "synth", {"spec.synthesizer.columns": []}, "spec.synthesizer.columns"),
    Case(
        "sd-column-type-enum",
        "synth",
        {"spec.synthesizer.columns.0.type": "text"},
        "spec.synthesizer.columns[0].type",
    ),
    Case(
        "sd-categorical-without-values",
        "synth",
        {"spec.synthesizer.columns.5.values": DELETE},
        "a categorical column needs its public values, or discover: true",
    ),
    Case(
        "sd-values-on-numeric",
        "synth",
        {"spec.synthesizer.columns.0.values": ["young"]},
        "values and discover are for categorical columns",
    ),
    Case(
        "sd-bounds-on-categorical",
        "synth",
        {"spec.synthesizer.columns.1.bins": 4},
        "lower, upper and bins are for numeric columns",
    ),
    Case(
        "sd-half-bounds",
        "synth",
        {"spec.synthesizer.columns.0.upper": DELETE},
        "give both lower and upper, or neither",
    ),
    Case(
        "sd-bounds-order",
        "synth",
        {"spec.synthesizer.columns.0.lower": 100},
        "lower must be below upper",
    ),
    Case(
        "sd-max-values-without-discover",
        "synth",
        {"spec.synthesizer.columns.1.maxValues": 5},
        "maxValues is only for discover: true",
    ),
    Case(
        "sd-value-type",
        "synth",
        {"spec.synthesizer.columns.1.values": [{"name": "female"}]},
        "spec.synthesizer.columns[1].values[0]",
    ),
    Case(
        "sd-duplicate-column",
        "synth",
        {"spec.synthesizer.columns.1.name": "age"},
        "Duplicate value",
    ),
    Case(
        "sd-discover-without-epsilon",
        "synth",
        {"spec.synthesizer.discoveryEpsilon": 0},
        "discoveryEpsilon must be above 0 exactly when a column has discover: true",
    ),
    Case(
        "sd-discovery-delta-above-delta",
        "synth",
        {"spec.synthesizer.discoveryDelta": 1e-5},
        "discoveryDelta must be smaller than delta",
    ),
    Case(
        "sd-preprocessor-unused",
        "synth",
        {"spec.synthesizer.columns.3.lower": 50, "spec.synthesizer.columns.3.upper": 300},
        "preprocessorEpsilon must be above 0 exactly when a numeric column has no lower/upper",
    ),
    Case(
        "sd-parts-above-epsilon",
        "synth",
        {"spec.synthesizer.reportEpsilon": 0.95},
        "with discoveryEpsilon and reportEpsilon added",
    ),
]
