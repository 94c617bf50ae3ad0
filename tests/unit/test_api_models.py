"""The pydantic models reject what the CRDs reject, and accept every example."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import ValidationError

from tests.data.invalid_resources import CASES, Case
from veil.api import KINDS, ConfidentialModel, PrivacyBudget, SyntheticDataset
from veil.api.confidential_model import SealedArtifact
from veil.artifacts import ArtifactError, fetch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BY_KIND = {kind.kind_name: kind for kind in KINDS}


def _veil_documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("apiVersion", "").startswith("veil.dev/"):
                found.append((str(path.relative_to(EXAMPLES)), document))
    return found


def test_examples_cover_every_kind() -> None:
    kinds = {document["kind"] for _, document in _veil_documents()}
    assert kinds == set(BY_KIND)


@pytest.mark.parametrize(("path", "document"), _veil_documents(), ids=lambda v: str(v)[:40])
def test_every_example_is_valid(path: str, document: dict[str, Any]) -> None:
    BY_KIND[document["kind"]].model_validate(document)


@pytest.mark.parametrize("case", [c for c in CASES if not c.transition], ids=lambda c: c.id)
def test_model_rejects_invalid_resource(case: Case) -> None:
    manifest = case.manifest()
    with pytest.raises(ValidationError):
        BY_KIND[manifest["kind"]].model_validate(manifest)


def test_corpus_is_large_and_distinct() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def test_camel_case_on_the_wire() -> None:
    budget = PrivacyBudget.model_validate(
        yaml.safe_load((EXAMPLES / "synthetic-data" / "budget.yaml").read_text())
    )
    wire = budget.to_wire()
    assert wire["spec"]["maxEpsilonPerClaim"] == 4
    assert "max_epsilon_per_claim" not in wire["spec"]
    assert budget.spec.max_epsilon_per_claim == 4


def test_defaults_are_filled() -> None:
    model = ConfidentialModel.model_validate(
        yaml.safe_load((EXAMPLES / "dp-training" / "model.yaml").read_text())
    )
    assert model.spec.serving.port == 8000
    assert model.spec.key_release.deletion_policy == "Retain"
    assert model.spec.network.allow_from == []


def test_cross_field_error_names_the_field() -> None:
    manifest = next(c for c in CASES if c.id == "sd-preprocessor-eps").manifest()
    with pytest.raises(ValidationError, match="preprocessorEpsilon must be smaller"):
        SyntheticDataset.model_validate(manifest)


def _with_model_uri(uri: str) -> dict[str, Any]:
    manifest = next(c for c in CASES if c.id == "cm-uri-scheme").manifest()
    manifest["spec"]["model"]["uri"] = uri
    return manifest


@pytest.mark.parametrize(
    "uri",
    [
        "az://veildemo/models/classifier.onnx.sealed",
        "https://models.example/classifier.onnx.sealed",
        "file:///models/classifier.onnx.sealed",
    ],
)
def test_model_uri_accepts_what_the_fetcher_reads(uri: str) -> None:
    ConfidentialModel.model_validate(_with_model_uri(uri))
    assert f"{urlparse(uri).scheme}://" in str(SealedArtifact.model_fields["uri"].description)


@pytest.mark.parametrize("uri", ["oci://registry.example/models/classifier:1", "ftp://x/y"])
def test_model_uri_refuses_what_the_fetcher_cannot_read(uri: str, tmp_path: Path) -> None:
    """`veil fetch` (the pods' first step) reads file, https and az only: anything else is
    refused at admission, not in a crash-looping pod."""
    with pytest.raises(ArtifactError, match="unsupported URI scheme"):
        fetch(uri, tmp_path / "model")
    with pytest.raises(ValidationError, match=r"spec\.model\.uri"):
        ConfidentialModel.model_validate(_with_model_uri(uri))
    assert f"{urlparse(uri).scheme}://" not in str(SealedArtifact.model_fields["uri"].description)
