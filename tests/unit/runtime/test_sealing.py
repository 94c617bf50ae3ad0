"""The sealed model format: round trips, and every way a sealed file can be wrong is refused."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from azure.keyvault.keys import JsonWebKey
from azure.keyvault.keys.crypto import CryptographyClient
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.runtime import sealing
from veil.runtime.jwk import b64url_decode, rsa_public_jwk, rsa_thumbprint
from veil.runtime.keywrap import KeyVaultKeyWrapper, RsaPublicKeyWrapper, WrappedKey
from veil.runtime.sealing import (
    FORMAT_VERSION,
    MAGIC,
    TAG_BYTES,
    ModelTooLargeError,
    NotASealedModelError,
    SealedModelError,
    TamperedModelError,
    TruncatedModelError,
    UnsupportedFormatVersionError,
    WrongKeyError,
    read_header,
    seal_bytes,
    seal_file,
    seal_stream,
    unseal_bytes,
    unseal_file,
    unseal_stream,
)

CHUNK = 64


def _header_length(sealed: bytes) -> int:
    (length,) = struct.unpack(">I", sealed[10:14])
    return 14 + int(length)


def _chunks(sealed: bytes, chunk_size: int) -> tuple[bytes, list[bytes]]:
    start = _header_length(sealed)
    record = chunk_size + TAG_BYTES
    body = sealed[start:]
    return sealed[:start], [body[i : i + record] for i in range(0, len(body), record)]


@pytest.fixture
def wrapper(model_key: rsa.RSAPrivateKey) -> RsaPublicKeyWrapper:
    return RsaPublicKeyWrapper(model_key.public_key(), key_id="https://vault.test/keys/m/1")


@pytest.fixture
def sealed_model(breast_cancer_model: Any, wrapper: RsaPublicKeyWrapper) -> bytes:
    return seal_bytes(breast_cancer_model.onnx_bytes, wrapper, chunk_size=CHUNK)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    plaintext=st.binary(min_size=0, max_size=3000),
    chunk_size=st.integers(min_value=16, max_value=700),
)
def test_seal_unseal_round_trip_over_sizes_and_chunk_sizes(
    plaintext: bytes, chunk_size: int, model_key: rsa.RSAPrivateKey, wrapper: RsaPublicKeyWrapper
) -> None:
    sealed = seal_bytes(plaintext, wrapper, chunk_size=chunk_size)
    header, _ = read_header(io.BytesIO(sealed))
    assert header.plaintext_size == len(plaintext)
    assert header.chunk_count == max(1, -(-len(plaintext) // chunk_size))
    # every chunk costs exactly one tag: the format has no slack to hide anything in
    assert len(sealed) == _header_length(sealed) + len(plaintext) + header.chunk_count * TAG_BYTES
    assert unseal_bytes(sealed, model_key) == plaintext


def test_header_records_what_the_runtime_needs(
    sealed_model: bytes, model_key: rsa.RSAPrivateKey, breast_cancer_model: Any
) -> None:
    import hashlib

    assert sealed_model.startswith(MAGIC)
    header, _ = read_header(io.BytesIO(sealed_model))
    assert header.version == FORMAT_VERSION
    assert header.key_id == "https://vault.test/keys/m/1"
    assert header.key_thumbprint == rsa_thumbprint(model_key.public_key())
    assert header.plaintext_sha256 == hashlib.sha256(breast_cancer_model.onnx_bytes).hexdigest()
    assert header.chunk_size == CHUNK
    assert header.wrap_algorithm == "RSA-OAEP-256"
    description = header.describe()
    assert "wrapped_key" not in description
    assert description["chunk_count"] == header.chunk_count


def test_ciphertext_does_not_contain_the_model(
    sealed_model: bytes, breast_cancer_model: Any
) -> None:
    plaintext = breast_cancer_model.onnx_bytes
    for offset in range(0, len(plaintext) - 16, 16):
        assert plaintext[offset : offset + 16] not in sealed_model


def test_two_seals_of_the_same_model_differ(
    breast_cancer_model: Any, wrapper: RsaPublicKeyWrapper
) -> None:
    first = seal_bytes(breast_cancer_model.onnx_bytes, wrapper, chunk_size=CHUNK)
    second = seal_bytes(breast_cancer_model.onnx_bytes, wrapper, chunk_size=CHUNK)
    assert first[_header_length(first) :] != second[_header_length(second) :]


def test_tampered_ciphertext_is_refused(sealed_model: bytes, model_key: rsa.RSAPrivateKey) -> None:
    head, chunks = _chunks(sealed_model, CHUNK)
    altered = bytearray(chunks[3])
    altered[5] ^= 0x01
    chunks[3] = bytes(altered)
    with pytest.raises(TamperedModelError, match=r"chunk 4 of \d+ failed authentication"):
        unseal_bytes(head + b"".join(chunks), model_key)


def test_tampered_tag_is_refused(sealed_model: bytes, model_key: rsa.RSAPrivateKey) -> None:
    altered = bytearray(sealed_model)
    altered[-1] ^= 0x80
    with pytest.raises(TamperedModelError):
        unseal_bytes(bytes(altered), model_key)


def test_tampered_header_is_refused(sealed_model: bytes, model_key: rsa.RSAPrivateKey) -> None:
    # same length, so only authentication can notice
    altered = sealed_model.replace(b"https://vault.test/keys/m/1", b"https://vault.test/keys/m/2")
    assert altered != sealed_model
    with pytest.raises(TamperedModelError, match="the header or chunk 1"):
        unseal_bytes(altered, model_key)


def test_reordered_chunks_are_refused(sealed_model: bytes, model_key: rsa.RSAPrivateKey) -> None:
    head, chunks = _chunks(sealed_model, CHUNK)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(TamperedModelError, match="chunk 2 of"):
        unseal_bytes(head + b"".join(chunks), model_key)


def test_dropped_middle_chunk_is_refused(sealed_model: bytes, model_key: rsa.RSAPrivateKey) -> None:
    head, chunks = _chunks(sealed_model, CHUNK)
    del chunks[2]
    with pytest.raises((TamperedModelError, TruncatedModelError)):
        unseal_bytes(head + b"".join(chunks), model_key)


def test_truncated_at_a_chunk_boundary_is_refused(
    sealed_model: bytes, model_key: rsa.RSAPrivateKey
) -> None:
    head, chunks = _chunks(sealed_model, CHUNK)
    with pytest.raises(TruncatedModelError, match="truncated"):
        unseal_bytes(head + b"".join(chunks[:-1]), model_key)


def test_truncated_inside_a_chunk_is_refused(
    sealed_model: bytes, model_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(TruncatedModelError, match="truncated"):
        unseal_bytes(sealed_model[:-7], model_key)


def test_truncated_inside_the_header_is_refused(
    sealed_model: bytes, model_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(TruncatedModelError, match="inside its header"):
        unseal_bytes(sealed_model[:40], model_key)


def test_the_last_chunk_cannot_be_passed_off_as_a_middle_one(
    model_key: rsa.RSAPrivateKey, wrapper: RsaPublicKeyWrapper
) -> None:
    # two seals under the same header cannot be spliced: every chunk binds the header digest,
    # its index and whether it is final
    sealed = seal_bytes(b"A" * (CHUNK * 3), wrapper, chunk_size=CHUNK)
    head, chunks = _chunks(sealed, CHUNK)
    with pytest.raises(TamperedModelError):
        unseal_bytes(head + b"".join([chunks[0], chunks[2], chunks[1]]), model_key)


def test_appended_data_is_refused(sealed_model: bytes, model_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(TamperedModelError, match="follows the final chunk"):
        unseal_bytes(sealed_model + b"\x00", model_key)


def test_wrong_format_version_is_refused(sealed_model: bytes, model_key: rsa.RSAPrivateKey) -> None:
    altered = sealed_model[:8] + struct.pack(">H", FORMAT_VERSION + 1) + sealed_model[10:]
    with pytest.raises(UnsupportedFormatVersionError, match=r"version 2 is not supported"):
        unseal_bytes(altered, model_key)


def test_not_a_sealed_model_is_refused(model_key: rsa.RSAPrivateKey, mlp_model: bytes) -> None:
    with pytest.raises(NotASealedModelError, match="not a Veil sealed model"):
        unseal_bytes(mlp_model, model_key)


def test_unknown_header_field_is_refused(sealed_model: bytes, model_key: rsa.RSAPrivateKey) -> None:
    end = _header_length(sealed_model)
    fields = json.loads(sealed_model[14:end])
    fields["extra"] = 1
    body = json.dumps(fields).encode()
    altered = sealed_model[:10] + struct.pack(">I", len(body)) + body + sealed_model[end:]
    with pytest.raises(SealedModelError, match="unknown fields extra"):
        unseal_bytes(altered, model_key)


def test_wrong_key_is_named_by_thumbprint(
    sealed_model: bytes, other_key: rsa.RSAPrivateKey, model_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(WrongKeyError, match=rsa_thumbprint(model_key.public_key())):
        unseal_bytes(sealed_model, other_key)


def test_wrong_key_without_thumbprint_fails_at_unwrap(
    model_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    class NoThumbprint:
        def wrap(self, data_key: bytes) -> WrappedKey:
            wrapped = RsaPublicKeyWrapper(model_key.public_key()).wrap(data_key)
            return WrappedKey(wrapped.key_id, wrapped.algorithm, wrapped.ciphertext, None)

    sealed = seal_bytes(b"weights" * 50, NoThumbprint(), chunk_size=CHUNK)
    assert unseal_bytes(sealed, model_key) == b"weights" * 50
    with pytest.raises(WrongKeyError, match="could not be unwrapped"):
        unseal_bytes(sealed, other_key)


def test_size_limit_is_enforced_before_decrypting(
    sealed_model: bytes, model_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(ModelTooLargeError, match="more than the 100 allowed"):
        unseal_bytes(sealed_model, model_key, max_plaintext_bytes=100)


def test_seal_through_the_azure_key_vault_sdk(
    model_key: rsa.RSAPrivateKey, breast_cancer_model: Any
) -> None:
    """The real azure-keyvault-keys CryptographyClient (local-only, from_jwk) wraps the key."""
    public = rsa_public_jwk(model_key.public_key())
    kid = "https://veil-test.vault.azure.net/keys/model/0123456789abcdef"
    client = CryptographyClient.from_jwk(
        JsonWebKey(
            kid=kid,
            kty="RSA-HSM",
            n=b64url_decode(public["n"]),
            e=b64url_decode(public["e"]),
            key_ops=["wrapKey", "encrypt"],
        )
    )
    sealed = seal_bytes(
        breast_cancer_model.onnx_bytes,
        KeyVaultKeyWrapper(client, model_key.public_key()),
        chunk_size=256,
    )
    header, _ = read_header(io.BytesIO(sealed))
    assert header.key_id == kid
    assert unseal_bytes(sealed, model_key) == breast_cancer_model.onnx_bytes


class _ReadRecorder(io.RawIOBase):
    """A file wrapper that remembers the largest single read."""

    def __init__(self, inner: io.BufferedReader) -> None:
        self._inner = inner
        self.largest = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def read(self, size: int = -1) -> bytes:
        assert size >= 0, "the sealer must never read everything at once"
        self.largest = max(self.largest, size)
        return self._inner.read(size)


def test_sealing_and_unsealing_stream_chunk_by_chunk(
    tmp_path: Path, model_key: rsa.RSAPrivateKey, wrapper: RsaPublicKeyWrapper
) -> None:
    model = tmp_path / "big.onnx"
    model.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    sealed = tmp_path / "big.sealed"
    chunk = 4096
    with model.open("rb") as raw, sealed.open("wb") as sink:
        source = _ReadRecorder(raw)
        seal_stream(source, sink, wrapper, chunk_size=chunk)  # type: ignore[arg-type]
    assert source.largest <= chunk
    with sealed.open("rb") as raw:
        reader = _ReadRecorder(raw)
        assert unseal_stream(reader, model_key) == model.read_bytes()  # type: ignore[arg-type]
    assert reader.largest <= chunk + TAG_BYTES


def test_seal_file_and_unseal_file(
    tmp_path: Path,
    model_key: rsa.RSAPrivateKey,
    wrapper: RsaPublicKeyWrapper,
    breast_cancer_model: Any,
) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(breast_cancer_model.onnx_bytes)
    target = tmp_path / "model.sealed"
    header = seal_file(source, target, wrapper, chunk_size=128)
    assert header.plaintext_size == len(breast_cancer_model.onnx_bytes)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert unseal_file(target, model_key) == breast_cancer_model.onnx_bytes
    # unsealing writes nothing next to the sealed file
    assert sorted(p.name for p in tmp_path.iterdir()) == before == ["model.onnx", "model.sealed"]


def test_failed_seal_leaves_no_partial_output(tmp_path: Path) -> None:
    class BrokenWrapper:
        def wrap(self, data_key: bytes) -> WrappedKey:
            raise SealedModelError("vault unreachable")

    source = tmp_path / "model.onnx"
    source.write_bytes(b"x" * 1000)
    with pytest.raises(SealedModelError, match="vault unreachable"):
        seal_file(source, tmp_path / "model.sealed", BrokenWrapper(), chunk_size=64)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_chunk_size_out_of_range_is_refused(wrapper: RsaPublicKeyWrapper) -> None:
    with pytest.raises(SealedModelError, match="chunk size 8 is outside"):
        seal_bytes(b"abc", wrapper, chunk_size=8)


def test_digest_check_catches_a_sealer_that_recorded_the_wrong_digest(
    model_key: rsa.RSAPrivateKey,
    wrapper: RsaPublicKeyWrapper,
    mlp_model: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A faulty sealer: the chunks authenticate, but the recorded identity is not the model's.
    real_header = sealing.SealedHeader
    with monkeypatch.context() as patched:
        patched.setattr(
            sealing,
            "SealedHeader",
            lambda **fields: real_header(**{**fields, "plaintext_sha256": "0" * 64}),
        )
        sealed = seal_bytes(mlp_model, wrapper, chunk_size=CHUNK)
    # The runtime trusts the chunk tags (see the module docstring) ...
    assert unseal_bytes(sealed, model_key) == mlp_model
    # ... and the debugging path, `veil unseal`, recomputes the digest and says so.
    with pytest.raises(TamperedModelError, match="sha256"):
        unseal_bytes(sealed, model_key, verify_digest=True)
