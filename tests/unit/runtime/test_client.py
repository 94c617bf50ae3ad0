"""The caller's library and command: three lines from a notebook, `veil infer`, expectations
from a file or the ConfidentialModel itself, and no operator dependencies on import."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from veil.cli import main as veil
from veil.client import Expectations, RefusedError, connect
from veil.runtime.attestation import AttestationPolicy, AttestationVerifier, Placement
from veil.runtime.channel import ChannelPrivateKey
from veil.runtime.evidence import EvidenceService, NodeAgentAttester
from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import OnnxModel
from veil.runtime.server import build_app
from veil.runtime.state import ModelSlot

from .doubles import HOSTDATA, AuthorityAttester, TestAuthority, TrainedModel
from .threaded import serve_in_thread

ACI = Placement.CONFIDENTIAL_ACI


@pytest.fixture
def served(
    authority_keys: dict[str, rsa.RSAPrivateKey], breast_cancer_model: TrainedModel
) -> Iterator[tuple[str, str]]:
    """(runtime URL, issuer): the authority and the runtime in threads of their own, as a
    synchronous caller meets them."""
    authority = TestAuthority(signing_keys=authority_keys, container_hostdata=HOSTDATA)
    with serve_in_thread(authority.app()) as issuer:
        authority.issuer = issuer
        verifier = AttestationVerifier(
            [issuer], AttestationPolicy(ACI), allow_insecure_loopback_issuers=True
        )
        channel = EvidenceService(
            ChannelPrivateKey(),
            model_name="cancer",
            model_version="1",
            required=True,
            attester=AuthorityAttester(authority),
            verifier=verifier,
        )
        slot = ModelSlot("cancer")
        slot.set_ready(OnnxModel.from_bytes("cancer", breast_cancer_model.onnx_bytes))
        app = build_app(slot, RuntimeMetrics(CollectorRegistry()), channel=channel)
        with serve_in_thread(app) as url:
            yield url, issuer


def _expect_file(tmp_path: Path, issuer: str, hostdata: str = HOSTDATA) -> Path:
    path = tmp_path / "cancer.expect.json"
    document = {"issuers": [issuer], "placement": "confidentialACI", "hostdata": hostdata}
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_three_lines_from_a_notebook(
    served: tuple[str, str], tmp_path: Path, breast_cancer_model: TrainedModel
) -> None:
    url, issuer = served
    expect = _expect_file(tmp_path, issuer)
    rows = breast_cancer_model.samples[:5]

    model = connect(url, "cancer", expect, allow_http_loopback_issuer=True)
    answer = model.infer({"input": rows})

    model.close()
    labels = next(o for o in answer["outputs"] if o["datatype"] == "INT64")["data"]
    np.testing.assert_array_equal(labels, breast_cancer_model.sklearn_predictions[:5])


def test_connect_refuses_before_returning(served: tuple[str, str], tmp_path: Path) -> None:
    url, issuer = served
    with pytest.raises(RefusedError, match=r"refused \(hostdata\)"):
        connect(
            url,
            "cancer",
            _expect_file(tmp_path, issuer, "00" * 32),
            allow_http_loopback_issuer=True,
        )


def test_veil_infer_verifies_then_prints_the_answer(
    served: tuple[str, str],
    tmp_path: Path,
    breast_cancer_model: TrainedModel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, issuer = served
    rows = breast_cancer_model.samples[:2]
    request = tmp_path / "request.json"
    tensor = {"name": "input", "shape": [2, 30], "datatype": "FP32"}
    request.write_text(json.dumps({"inputs": [{**tensor, "data": rows.ravel().tolist()}]}))
    common = [url, "--model", "cancer", "--input", str(request), "--allow-http-loopback-issuer"]
    code = veil(["infer", *common, "--expect", str(_expect_file(tmp_path, issuer))])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "verified" in err
    labels = next(o for o in json.loads(out)["outputs"] if o["datatype"] == "INT64")["data"]
    np.testing.assert_array_equal(labels, breast_cancer_model.sklearn_predictions[:2])

    flags = ["--issuer", issuer, "--placement", "confidentialACI", "--hostdata", "11" * 32]
    assert veil(["infer", *common, *flags]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "refused (hostdata)" in err
    flags = ["--issuer", issuer, "--placement", "confidentialACI", "--claim", "x-ms-ver=9"]
    assert veil(["infer", *common, *flags]) == 1
    assert (
        "refused (required-claim): claim x-ms-ver is '1.0', expected '9'" in capsys.readouterr().err
    )


def test_expectations_from_the_confidential_model() -> None:
    policy = b"package policy\nallow := true\n"
    manifest = {
        "apiVersion": "veil.dev/v1alpha1",
        "kind": "ConfidentialModel",
        "spec": {
            "tee": {"isolation": "confidentialACI", "ccePolicy": base64.b64encode(policy).decode()},
            "keyRelease": {
                "attestationAuthority": "https://veil.weu.attest.azure.net",
                "requiredClaims": [{"claim": "x-ms-sevsnpvm-launchmeasurement", "equals": "ab"}],
            },
        },
    }
    expectations = Expectations.from_mapping(manifest)
    assert expectations.issuers == ("https://veil.weu.attest.azure.net",)
    assert expectations.policy.placement is ACI
    assert expectations.policy.hostdata == hashlib.sha256(policy).hexdigest()
    assert expectations.required_claims == (("x-ms-sevsnpvm-launchmeasurement", "ab"),)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"placement": "confidentialACI"}, "at least one issuer"),
        ({"issuers": ["https://a"], "placement": "confidentialACI", "extra": 1}, "unknown"),
        ({"issuers": ["https://a"], "placement": "coco"}, "placement must be one of"),
        (
            {"issuers": ["https://a"], "placement": "confidentialVM", "requiredClaims": [{}]},
            "needs a 'claim'",
        ),
    ],
)
def test_bad_expectations_are_refused(document: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Expectations.from_mapping(document)


def test_the_client_imports_none_of_the_operators_dependencies() -> None:
    code = (
        "import sys, veil.client, veil.client.commands\n"
        "heavy = ('kopf', 'kubernetes', 'kubernetes_asyncio', 'azure', 'onnxruntime', "
        "'prometheus_client', 'pydantic')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_serve_flags_build_the_channel(tmp_path: Path) -> None:
    from veil.cli import build_parser
    from veil.runtime.commands import _channel

    base = ["serve", "--model-name", "cancer", "--sealed", str(tmp_path / "m.sealed")]
    sidecar = [
        "--sidecar", "http://localhost:8080", "--maa-endpoint", "veil.weu.attest.azure.net",
        "--akv-endpoint", "veil-kv.vault.azure.net", "--kid", "model-key",
    ]  # fmt: skip
    channel = _channel(build_parser().parse_args([*base, *sidecar, "--channel", "encrypted"]))
    assert isinstance(channel, EvidenceService)
    assert channel.required
    assert channel.attested
    document = channel._document(None, None)
    assert document["channel"]["infer_path"] == "/v2/models/cancer/infer/encrypted"
    plain = _channel(build_parser().parse_args([*base, *sidecar]))
    assert isinstance(plain, EvidenceService)
    assert not plain.required  # the default until the operator renders --channel
    agent = [
        "--node-agent", "http://10.0.0.4:8095", "--maa-endpoint", "https://veil.weu.attest.azure.net",
        "--akv-endpoint", "veil-kv.vault.azure.net", "--kid", "model-key",
    ]  # fmt: skip
    cvm = _channel(build_parser().parse_args([*base, *agent, "--channel", "encrypted"]))
    assert isinstance(cvm, EvidenceService)
    assert cvm.attested
    assert isinstance(cvm._attester, NodeAgentAttester)
    assert cvm._attester.issuer == "https://veil.weu.attest.azure.net"
    local = _channel(build_parser().parse_args([*base, "--private-key", str(tmp_path / "k")]))
    assert isinstance(local, EvidenceService)
    assert not local.attested
    assert local.current()["attestation"] is None
