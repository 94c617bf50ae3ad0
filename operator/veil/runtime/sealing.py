"""The sealed model format: envelope encryption of a model with AES-256-GCM in authenticated chunks.

Layout of a sealed file (all integers big-endian):

    preamble   magic b"VEILSEAL" (8) | format version u16 | header length u32
    header     UTF-8 JSON object (see `SealedHeader`), at most 64 KiB
    chunks     chunk_count records of AES-256-GCM ciphertext followed by its 16-byte tag

Each chunk i is encrypted under the model's random 256-bit data key with

    nonce = nonce_prefix (7 random bytes) | i (u32) | final flag (u8)
    AAD   = SHA-256(preamble | header) | i (u32) | final flag (u8)

so altering the header, altering, dropping, reordering or appending chunks, or cutting the file
at a chunk boundary all fail authentication (the STREAM construction of Hoang, Reyhanitabar,
Rogaway and Vizár). The data key itself is wrapped with RSA-OAEP-256 to the Key Vault key and
stored in the header; the header also records the plaintext's SHA-256: the model's identity.

The chunk tags already authenticate every byte, their order and the end, and the header (digest
included) through the AAD, so recomputing the digest at unseal adds no security (whoever seals
to the public key picks the data key and could write any digest; the sealed file's own sha256,
pinned in the ConfidentialModel, is what rules out a substituted model). The runtime therefore
skips it, which halves unseal time; `veil unseal` (debugging) and `verify_digest=True` check it.

Sealing reads its input twice (once to hash, once to encrypt) and never holds more than one chunk,
so it works on models larger than memory. Unsealing decrypts into memory only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.runtime.jwk import rsa_thumbprint
from veil.runtime.keywrap import WRAP_ALGORITHM, KeyWrapper, UnwrapError, unwrap_data_key

MAGIC = b"VEILSEAL"
FORMAT_VERSION = 1
CIPHER = "AES-256-GCM"
TAG_BYTES = 16
NONCE_PREFIX_BYTES = 7
MAX_HEADER_BYTES = 64 * 1024
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_CHUNKS = 2**32 - 1

_PREAMBLE = struct.Struct(">8sHI")
_CHUNK_BINDING = struct.Struct(">IB")
_HEADER_FIELDS = frozenset(
    {
        "cipher",
        "chunk_size",
        "key_id",
        "key_thumbprint",
        "nonce_prefix",
        "plaintext_sha256",
        "plaintext_size",
        "wrap_algorithm",
        "wrapped_key",
    }
)


class SealedModelError(Exception):
    """A sealed model cannot be sealed or unsealed; the message says why in plain words."""


class NotASealedModelError(SealedModelError):
    """The input does not start with the sealed model magic bytes."""


class UnsupportedFormatVersionError(SealedModelError):
    """The sealed model was written in a format version this runtime does not read."""


class MalformedHeaderError(SealedModelError):
    """The header is not a well-formed sealed model header."""


class WrongKeyError(SealedModelError):
    """The private key offered is not the key the model was sealed to."""


class TruncatedModelError(SealedModelError):
    """The sealed model ends before its last chunk."""


class TamperedModelError(SealedModelError):
    """A chunk or the header failed authentication, or data follows the final chunk."""


class ModelTooLargeError(SealedModelError):
    """The sealed model declares a plaintext larger than the caller accepts."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedHeaderError(f"header field {field!r} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise MalformedHeaderError(f"header field {field!r} is not valid base64") from exc


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise SealedModelError(
            f"chunk size {chunk_size} is outside the allowed range "
            f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes"
        )


@dataclass(frozen=True)
class SealedHeader:
    """What a sealed model says about itself. Authenticated by every chunk's tag."""

    key_id: str
    wrapped_key: bytes
    key_thumbprint: str | None
    plaintext_sha256: str
    plaintext_size: int
    chunk_size: int
    nonce_prefix: bytes
    wrap_algorithm: str = WRAP_ALGORITHM
    cipher: str = CIPHER
    version: int = FORMAT_VERSION

    @property
    def chunk_count(self) -> int:
        """Number of chunk records; an empty model still has one (empty, final) chunk."""
        return max(1, -(-self.plaintext_size // self.chunk_size))

    def chunk_length(self, index: int) -> int:
        """Plaintext length of chunk `index`."""
        if index < self.chunk_count - 1:
            return self.chunk_size
        return self.plaintext_size - self.chunk_size * (self.chunk_count - 1)

    def encode(self) -> bytes:
        """The preamble and JSON header exactly as written to the file."""
        body = json.dumps(
            {
                "cipher": self.cipher,
                "chunk_size": self.chunk_size,
                "key_id": self.key_id,
                "key_thumbprint": self.key_thumbprint,
                "nonce_prefix": _b64(self.nonce_prefix),
                "plaintext_sha256": self.plaintext_sha256,
                "plaintext_size": self.plaintext_size,
                "wrap_algorithm": self.wrap_algorithm,
                "wrapped_key": _b64(self.wrapped_key),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode("utf-8")
        return _PREAMBLE.pack(MAGIC, self.version, len(body)) + body

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary without the wrapped key (for `veil` CLI output and logs)."""
        return {
            "format_version": self.version,
            "cipher": self.cipher,
            "key_id": self.key_id,
            "key_thumbprint": self.key_thumbprint,
            "wrap_algorithm": self.wrap_algorithm,
            "plaintext_sha256": self.plaintext_sha256,
            "plaintext_size": self.plaintext_size,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
        }


def _load_header_fields(body: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedHeaderError(f"the header is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise MalformedHeaderError("the header is not a JSON object")
    missing = _HEADER_FIELDS - fields.keys()
    unknown = fields.keys() - _HEADER_FIELDS
    if missing:
        raise MalformedHeaderError(f"the header lacks {', '.join(sorted(missing))}")
    if unknown:
        raise MalformedHeaderError(f"the header has unknown fields {', '.join(sorted(unknown))}")
    return fields


def _parse_header_body(version: int, body: bytes) -> SealedHeader:
    fields = _load_header_fields(body)
    if fields["cipher"] != CIPHER:
        raise MalformedHeaderError(f"cipher {fields['cipher']!r} is not supported (only {CIPHER})")
    if fields["wrap_algorithm"] != WRAP_ALGORITHM:
        raise MalformedHeaderError(
            f"key wrap algorithm {fields['wrap_algorithm']!r} is not supported "
            f"(only {WRAP_ALGORITHM})"
        )
    for name in ("chunk_size", "plaintext_size"):
        value = fields[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MalformedHeaderError(f"header field {name!r} must be a non-negative integer")
    if not MIN_CHUNK_SIZE <= fields["chunk_size"] <= MAX_CHUNK_SIZE:
        raise MalformedHeaderError(f"chunk size {fields['chunk_size']} is out of range")
    if not isinstance(fields["key_id"], str) or not fields["key_id"]:
        raise MalformedHeaderError("header field 'key_id' must be a non-empty string")
    thumbprint = fields["key_thumbprint"]
    if thumbprint is not None and not isinstance(thumbprint, str):
        raise MalformedHeaderError("header field 'key_thumbprint' must be a string or null")
    digest = fields["plaintext_sha256"]
    if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise MalformedHeaderError(
            "header field 'plaintext_sha256' must be 64 lowercase hex digits"
        )
    nonce_prefix = _unb64(fields["nonce_prefix"], "nonce_prefix")
    if len(nonce_prefix) != NONCE_PREFIX_BYTES:
        raise MalformedHeaderError(f"the nonce prefix must be {NONCE_PREFIX_BYTES} bytes")
    header = SealedHeader(
        key_id=fields["key_id"],
        wrapped_key=_unb64(fields["wrapped_key"], "wrapped_key"),
        key_thumbprint=thumbprint,
        plaintext_sha256=digest,
        plaintext_size=fields["plaintext_size"],
        chunk_size=fields["chunk_size"],
        nonce_prefix=nonce_prefix,
        version=version,
    )
    if header.chunk_count > MAX_CHUNKS:
        raise MalformedHeaderError("the header declares more chunks than the format allows")
    return header


def _read_exact(src: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, or fewer only at end of stream."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        part = src.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def read_header(src: BinaryIO) -> tuple[SealedHeader, bytes]:
    """Read and check the preamble and header; returns the header and its exact encoded bytes.

    The header is only *authenticated* once the first chunk decrypts: until then it is a claim.
    """
    preamble = _read_exact(src, _PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size or not preamble.startswith(MAGIC):
        raise NotASealedModelError("this is not a Veil sealed model (the magic bytes are missing)")
    _, version, length = _PREAMBLE.unpack(preamble)
    if version != FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"sealed model format version {version} is not supported "
            f"(this runtime reads version {FORMAT_VERSION})"
        )
    if not 0 < length <= MAX_HEADER_BYTES:
        raise MalformedHeaderError(
            f"header length {length} is out of range (1..{MAX_HEADER_BYTES})"
        )
    body = _read_exact(src, length)
    if len(body) < length:
        raise TruncatedModelError("the sealed model is truncated inside its header")
    return _parse_header_body(version, body), preamble + body


def _binding(index: int, final: bool) -> bytes:
    return _CHUNK_BINDING.pack(index, 1 if final else 0)


def _hash_stream(src: BinaryIO, chunk_size: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while block := src.read(chunk_size):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def seal_stream(
    src: BinaryIO, dst: BinaryIO, wrapper: KeyWrapper, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> SealedHeader:
    """Seal the rest of the seekable stream `src` into `dst`; returns the header written.

    Reads `src` twice (hash, then encrypt) and holds at most one chunk in memory.
    """
    _check_chunk_size(chunk_size)
    if not src.seekable():
        raise SealedModelError(
            "sealing needs a seekable input (it is read twice: hash, then encrypt)"
        )
    start = src.tell()
    expected_digest, size = _hash_stream(src, chunk_size)
    src.seek(start)

    data_key = AESGCM.generate_key(bit_length=256)
    wrapped = wrapper.wrap(data_key)
    if wrapped.algorithm != WRAP_ALGORITHM:
        raise SealedModelError(
            f"the key wrapper used {wrapped.algorithm}, expected {WRAP_ALGORITHM}"
        )
    header = SealedHeader(
        key_id=wrapped.key_id,
        wrapped_key=wrapped.ciphertext,
        key_thumbprint=wrapped.thumbprint,
        plaintext_sha256=expected_digest,
        plaintext_size=size,
        chunk_size=chunk_size,
        nonce_prefix=secrets.token_bytes(NONCE_PREFIX_BYTES),
    )
    if header.chunk_count > MAX_CHUNKS:
        raise SealedModelError("the model is too large for this chunk size; use larger chunks")
    encoded = header.encode()
    header_digest = hashlib.sha256(encoded).digest()
    dst.write(encoded)

    aead = AESGCM(data_key)
    del data_key
    digest = hashlib.sha256()
    last = header.chunk_count - 1
    for index in range(header.chunk_count):
        length = header.chunk_length(index)
        plaintext = _read_exact(src, length)
        if len(plaintext) != length:
            raise SealedModelError("the input changed while it was being sealed (it got shorter)")
        digest.update(plaintext)
        binding = _binding(index, index == last)
        dst.write(aead.encrypt(header.nonce_prefix + binding, plaintext, header_digest + binding))
    if src.read(1) or digest.hexdigest() != expected_digest:
        raise SealedModelError("the input changed while it was being sealed")
    return header


def seal_bytes(
    plaintext: bytes, wrapper: KeyWrapper, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> bytes:
    """Seal an in-memory model (e.g. straight from a trainer) and return the sealed bytes."""
    out = BytesIO()
    seal_stream(BytesIO(plaintext), out, wrapper, chunk_size=chunk_size)
    return out.getvalue()


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[BinaryIO]:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
    try:
        with tmp.open("xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def seal_file(
    src: Path, dst: Path, wrapper: KeyWrapper, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> SealedHeader:
    """Seal the model file `src` into `dst`, atomically: no partial file ever appears at `dst`."""
    try:
        with src.open("rb") as source, _atomic_output(dst) as sink:
            return seal_stream(source, sink, wrapper, chunk_size=chunk_size)
    except OSError as exc:
        raise SealedModelError(f"cannot seal {src} into {dst}: {exc.strerror or exc}") from exc


def _check_key(header: SealedHeader, private_key: rsa.RSAPrivateKey) -> None:
    if header.key_thumbprint is None:
        return
    offered = rsa_thumbprint(private_key.public_key())
    if not hmac.compare_digest(offered, header.key_thumbprint):
        raise WrongKeyError(
            f"the model was sealed to key {header.key_id} (thumbprint {header.key_thumbprint}), "
            f"but the key offered has thumbprint {offered}"
        )


def unseal_stream(
    src: BinaryIO,
    private_key: rsa.RSAPrivateKey,
    *,
    max_plaintext_bytes: int | None = None,
    verify_digest: bool = False,
) -> bytes:
    """Authenticate and decrypt a sealed model from `src` into memory; nothing goes to disk.

    With `verify_digest`, the plaintext's SHA-256 is also recomputed and compared with the
    header's (redundant with the chunk tags; see the module docstring).
    """
    header, encoded = read_header(src)
    if max_plaintext_bytes is not None and header.plaintext_size > max_plaintext_bytes:
        raise ModelTooLargeError(
            f"the sealed model declares {header.plaintext_size} bytes, "
            f"more than the {max_plaintext_bytes} allowed"
        )
    _check_key(header, private_key)
    try:
        data_key = unwrap_data_key(private_key, header.wrapped_key)
    except UnwrapError as exc:
        raise WrongKeyError(f"{exc} (model key id {header.key_id})") from exc
    aead = AESGCM(data_key)
    del data_key

    header_digest = hashlib.sha256(encoded).digest()
    digest = hashlib.sha256() if verify_digest else None
    parts: list[bytes] = []
    count = header.chunk_count
    for index in range(count):
        record_length = header.chunk_length(index) + TAG_BYTES
        record = _read_exact(src, record_length)
        if len(record) < record_length:
            raise TruncatedModelError(
                f"the sealed model is truncated: chunk {index + 1} of {count} has "
                f"{len(record)} of its {record_length} bytes"
            )
        binding = _binding(index, index == count - 1)
        try:
            plaintext = aead.decrypt(header.nonce_prefix + binding, record, header_digest + binding)
        except InvalidTag:
            where = "the header or chunk 1" if index == 0 else f"chunk {index + 1}"
            raise TamperedModelError(
                f"{where} of {count} failed authentication: the sealed model was altered, "
                "its chunks were reordered, or it was cut short"
            ) from None
        if digest is not None:
            digest.update(plaintext)
        parts.append(plaintext)
    del aead
    if src.read(1):
        raise TamperedModelError(
            "data follows the final chunk: the sealed model was altered or had data appended"
        )
    if digest is not None and not hmac.compare_digest(digest.hexdigest(), header.plaintext_sha256):
        raise TamperedModelError(
            f"the decrypted model's sha256 {digest.hexdigest()} does not match "
            f"the sealed header's {header.plaintext_sha256}"
        )
    model = b"".join(parts)
    parts.clear()
    return model


def unseal_bytes(
    sealed: bytes,
    private_key: rsa.RSAPrivateKey,
    *,
    max_plaintext_bytes: int | None = None,
    verify_digest: bool = False,
) -> bytes:
    """Unseal an in-memory sealed model."""
    return unseal_stream(
        BytesIO(sealed),
        private_key,
        max_plaintext_bytes=max_plaintext_bytes,
        verify_digest=verify_digest,
    )


def unseal_file(
    path: Path,
    private_key: rsa.RSAPrivateKey,
    *,
    max_plaintext_bytes: int | None = None,
    verify_digest: bool = False,
) -> bytes:
    """Unseal the sealed model at `path` into memory (the plaintext never touches disk)."""
    try:
        with path.open("rb") as source:
            return unseal_stream(
                source,
                private_key,
                max_plaintext_bytes=max_plaintext_bytes,
                verify_digest=verify_digest,
            )
    except OSError as exc:
        raise SealedModelError(f"cannot read sealed model {path}: {exc.strerror or exc}") from exc


def read_header_file(path: Path) -> SealedHeader:
    """Read (without authenticating) the header of the sealed model at `path`."""
    try:
        with path.open("rb") as source:
            return read_header(source)[0]
    except OSError as exc:
        raise SealedModelError(f"cannot read sealed model {path}: {exc.strerror or exc}") from exc
