"""The runtime releases the key version the sealed header names, and only for the sealed file
the spec pins: a substitute sealed to the same public key gets no key released at all."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.runtime.jwk import rsa_private_jwk
from veil.runtime.key_release import KeyReleaseClient, ReleaseTarget, RetryPolicy
from veil.runtime.keywrap import RsaPublicKeyWrapper
from veil.runtime.loader import SealedPin, key_release_loader
from veil.runtime.sealed_key import SealedKey, SealedKeyMismatchError
from veil.runtime.sealing import SealedModelError, read_header, seal_stream

from .doubles import SidecarDouble, TrainedModel, running

pytestmark = pytest.mark.anyio

VAULT = "veil-models.vault.azure.net"
KID_V1 = f"https://{VAULT}/keys/model-cancer/0a1b2c3d"
TARGET = ReleaseTarget(
    maa_endpoint="sharedweu.weu.attest.azure.net", akv_endpoint=VAULT, kid="model-cancer"
)


def _seal(path: Path, plaintext: bytes, key: rsa.RSAPrivateKey, key_id: str | None) -> str:
    with path.open("wb") as sink:
        seal_stream(io.BytesIO(plaintext), sink, RsaPublicKeyWrapper(key.public_key(), key_id))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_versioned_key_id_names_the_version_to_release() -> None:
    sealed = SealedKey.parse(KID_V1, "thumb")
    assert (sealed.vault_host, sealed.key_name, sealed.version) == (
        VAULT,
        "model-cancer",
        "0a1b2c3d",
    )
    assert sealed.release_path(VAULT, "model-cancer") == "model-cancer/0a1b2c3d"
    assert SealedKey.from_report(sealed.report()) == sealed


def test_a_header_without_a_version_releases_the_named_key() -> None:
    assert (
        SealedKey.parse("thumbprint:abc", "abc").release_path(VAULT, "model-cancer")
        == "model-cancer"
    )


@pytest.mark.parametrize(
    "key_id",
    [
        "https://other.vault.azure.net/keys/model-cancer/0a1b",
        f"https://{VAULT}/keys/other-key/0a1b",
    ],
)
def test_a_header_naming_another_key_is_refused(key_id: str) -> None:
    with pytest.raises(SealedKeyMismatchError, match="re-seal"):
        SealedKey.parse(key_id).release_path(VAULT, "model-cancer")


@pytest.mark.parametrize("message", ["", "not json", "[]", '{"sealedKeyId": 3}'])
def test_a_message_that_is_not_a_report_reads_as_none(message: str) -> None:
    assert SealedKey.from_report(message) is None


async def test_the_sidecar_is_asked_for_the_headers_version(
    tmp_path: Path, model_key: rsa.RSAPrivateKey, breast_cancer_model: TrainedModel
) -> None:
    sealed = tmp_path / "model.sealed"
    pin = _seal(sealed, breast_cancer_model.onnx_bytes, model_key, KID_V1)
    sidecar = SidecarDouble(rsa_private_jwk(model_key))
    async with running(sidecar.app()) as url:
        loader = key_release_loader(
            sealed,
            KeyReleaseClient(url, retry=RetryPolicy(attempts=1)),
            TARGET,
            name="m",
            pin=SealedPin(pin),
        )
        model = await loader()
    assert model.name == "m"
    assert [r["kid"] for r in sidecar.requests] == ["model-cancer/0a1b2c3d"]


async def test_a_substitute_sealed_to_the_same_public_key_gets_no_key(
    tmp_path: Path, model_key: rsa.RSAPrivateKey, breast_cancer_model: TrainedModel
) -> None:
    """Anyone with the public key can seal a model; the pin makes the runtime refuse it before
    it asks the sidecar for anything."""
    genuine = tmp_path / "genuine.sealed"
    pin = _seal(genuine, breast_cancer_model.onnx_bytes, model_key, KID_V1)
    substitute = tmp_path / "model.sealed"
    _seal(substitute, b"a model that leaks its inputs" * 50, model_key, KID_V1)
    sidecar = SidecarDouble(rsa_private_jwk(model_key))
    async with running(sidecar.app()) as url:
        client = KeyReleaseClient(url, retry=RetryPolicy(attempts=1))
        with pytest.raises(SealedModelError, match="not the pinned"):
            await key_release_loader(substitute, client, TARGET, name="m", pin=SealedPin(pin))()
        too_small = SealedPin(pin, max_bytes=genuine.stat().st_size - 1)
        with pytest.raises(SealedModelError, match="over the limit"):
            await key_release_loader(genuine, client, TARGET, name="m", pin=too_small)()
    assert sidecar.requests == []


async def test_a_model_sealed_to_another_key_gets_no_key(
    tmp_path: Path, model_key: rsa.RSAPrivateKey, breast_cancer_model: TrainedModel
) -> None:
    sealed = tmp_path / "model.sealed"
    pin = _seal(
        sealed, breast_cancer_model.onnx_bytes, model_key, f"https://{VAULT}/keys/other/0a1b"
    )
    header, _ = read_header(io.BytesIO(sealed.read_bytes()))
    assert header.key_id.endswith("/other/0a1b")
    sidecar = SidecarDouble(rsa_private_jwk(model_key))
    async with running(sidecar.app()) as url:
        client = KeyReleaseClient(url, retry=RetryPolicy(attempts=1))
        with pytest.raises(SealedKeyMismatchError):
            await key_release_loader(sealed, client, TARGET, name="m", pin=SealedPin(pin))()
    assert sidecar.requests == []
