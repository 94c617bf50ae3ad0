"""Release-policy claims for coco pods: the digest the TEE binds, per platform and binding."""

from __future__ import annotations

import base64
import gzip
import hashlib
import tomllib

import pytest

from tests.unit.resources.test_kata_policy import IMAGES, pod_spec
from veil.resources.kata_claims import (
    INIT_DATA_POLICY_KEY,
    KataClaimsError,
    coco_release_claims,
    init_data,
    init_data_annotation,
    init_data_measurement,
    release_claims_for,
)
from veil.resources.kata_policy import KataPolicy, agent_policy


@pytest.fixture(scope="module")
def policy() -> KataPolicy:
    return agent_policy(pod_spec(), images=IMAGES, namespace="ns")


def test_sevsnp_pins_hostdata_to_the_sha256_of_the_policy_text(policy: KataPolicy) -> None:
    claims = coco_release_claims(policy, "sevsnp")
    assert claims == {
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-sevsnpvm-hostdata": hashlib.sha256(policy.rego.encode()).hexdigest(),
        "x-ms-sevsnpvm-is-debuggable": False,
    }


def test_tdx_pins_mrconfigid_to_the_sha384_of_the_policy_text(policy: KataPolicy) -> None:
    claims = coco_release_claims(policy, "tdx")
    assert claims == {
        "x-ms-attestation-type": "tdxvm",
        "tdx_mrconfigid": hashlib.sha384(policy.rego.encode()).hexdigest(),
        "tdx_td_attributes_debug": False,
    }


def test_the_init_data_document_carries_the_policy_byte_for_byte(policy: KataPolicy) -> None:
    document = init_data(policy, extra={"cdh.toml": "[kbc]\nname = 'cc_kbc'\n"})
    parsed = tomllib.loads(document)
    assert parsed["version"] == "0.1.0"
    assert parsed["algorithm"] == "sha384"
    assert parsed["data"][INIT_DATA_POLICY_KEY] == policy.rego
    assert parsed["data"]["cdh.toml"] == "[kbc]\nname = 'cc_kbc'\n"
    assert init_data(policy) == init_data(policy)


def test_the_annotation_is_gzip_base64_and_repeats(policy: KataPolicy) -> None:
    document = init_data(policy)
    annotation = init_data_annotation(document)
    assert gzip.decompress(base64.b64decode(annotation)).decode() == document
    assert init_data_annotation(document) == annotation


def test_init_data_digests_are_cut_or_padded_to_the_field(policy: KataPolicy) -> None:
    document = init_data(policy, algorithm="sha256")
    sha256 = hashlib.sha256(document.encode()).digest()
    assert init_data_measurement(document, "sha256", "sevsnp") == sha256.hex()
    assert init_data_measurement(document, "sha256", "tdx") == (sha256 + bytes(16)).hex()
    sha384 = hashlib.sha384(document.encode()).digest()
    assert init_data_measurement(document, "sha384", "tdx") == sha384.hex()
    assert init_data_measurement(document, "sha384", "sevsnp") == sha384[:32].hex()


def test_a_measurement_of_the_wrong_size_is_refused(policy: KataPolicy) -> None:
    with pytest.raises(KataClaimsError, match="48 bytes"):
        release_claims_for(policy.sha256, "tdx")
    with pytest.raises(KataClaimsError, match="32 bytes"):
        release_claims_for("zz" * 32, "sevsnp")


def test_a_changed_pod_changes_the_pinned_claim(policy: KataPolicy) -> None:
    changed = pod_spec()
    changed["containers"][0]["env"] = [{"name": "VEIL_LOG", "value": "debug"}]
    other = agent_policy(changed, images=IMAGES, namespace="ns")
    key = "x-ms-sevsnpvm-hostdata"
    assert coco_release_claims(other, "sevsnp")[key] != coco_release_claims(policy, "sevsnp")[key]
