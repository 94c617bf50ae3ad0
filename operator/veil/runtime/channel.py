"""The encrypted channel between a caller and the runtime: HPKE (RFC 9180) requests, in the
style of Oblivious HTTP (RFC 9458), with responses encrypted to a key the request carries.

Only `cryptography` is used (its HPKE and AES-GCM): no primitive is written here, and this
module imports nothing else of Veil's, so the client (`veil.client`) and the runtime share it.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM (KEM 0x0020, KDF 0x0001, AEAD
0x0001), OHTTP's default. The runtime's key pair is generated in memory at start and its public
half is bound into its attestation (see evidence.py).

Encrypted request (`Content-Type: application/vnd.veil.hpke-request`):

    hdr   = key_id (8 bytes: sha256 of the raw public key, truncated) || kem_id (u16)
            || kdf_id (u16) || aead_id (u16)
    body  = hdr || enc (32 bytes) || ct
    ct    = HPKE single-shot seal to the runtime's key, info = "veil oip-v2 request" 0x00 hdr,
            of: response_key (16 bytes) || header_length (u32; 0xFFFFFFFF: plain JSON) || OIP v2
            body (JSON, or the binary tensor data extension's JSON header and tensors)

Encrypted response (`Content-Type: application/vnd.veil.hpke-response`), HTTP 200 whenever the
request opened (the inner status says how it went, as OHTTP does):

    body  = nonce (12 random bytes) || AES-128-GCM(response_key, nonce, inner,
                                                   aad = "veil oip-v2 response" 0x00 enc)
    inner = status (u16) || header_length (u32; 0xFFFFFFFF: plain JSON) || OIP v2 body

The response key is fresh for each request and known only to the caller and the TEE; binding
`enc` into the response's AAD ties an answer to the one request it answers. Requests are not
replay-protected (as in OHTTP): a replayed request is answered again, encrypted to the same
response key, so it tells an observer nothing it did not already see.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Where the evidence is served and what it is called (see evidence.py).
EVIDENCE_PATH = "/v2/evidence"
EVIDENCE_FORMAT = "veil-evidence/v1"
# The runtime data member, hence the claim, that carries the channel key.
CHANNEL_KEY = "veil-channel-key"

REQUEST_MEDIA_TYPE = "application/vnd.veil.hpke-request"
RESPONSE_MEDIA_TYPE = "application/vnd.veil.hpke-response"

KEM_ID = 0x0020  # DHKEM(X25519, HKDF-SHA256)
KDF_ID = 0x0001  # HKDF-SHA256
AEAD_ID = 0x0001  # AES-128-GCM
SUITE_NAME = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM"
KEY_ID_BYTES = 8
ENC_BYTES = 32
RESPONSE_KEY_BYTES = 16
RESPONSE_NONCE_BYTES = 12
NO_HEADER = 0xFFFFFFFF
_HEADER = struct.Struct(f">{KEY_ID_BYTES}sHHH")
_INNER_REQUEST = struct.Struct(f">{RESPONSE_KEY_BYTES}sI")
_INNER_RESPONSE = struct.Struct(">HI")
REQUEST_INFO = b"veil oip-v2 request\x00"
RESPONSE_AAD = b"veil oip-v2 response\x00"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
_OVERHEAD = _HEADER.size + ENC_BYTES + 16


class ChannelError(ValueError):
    """An encrypted message is malformed, for another key, or does not open (altered)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ChannelError(f"not base64url: {exc}") from exc


def key_id_of(public: bytes) -> bytes:
    return hashlib.sha256(public).digest()[:KEY_ID_BYTES]


def header_field(header_length: int | None, body: bytes) -> int:
    """The u32 a sealed message carries for `header_length` (NO_HEADER: plain JSON)."""
    if header_length is None:
        return NO_HEADER
    if not 0 <= header_length <= len(body) or header_length == NO_HEADER:
        raise ChannelError("the binary header length does not fit the body")
    return header_length


@dataclass(frozen=True)
class ChannelPublicKey:
    """The runtime's public key as a caller holds it."""

    key: x25519.X25519PublicKey
    raw: bytes
    # Computed once: the runtime compares it on every session request.
    key_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", key_id_of(self.raw))

    @classmethod
    def from_raw(cls, raw: bytes) -> ChannelPublicKey:
        if len(raw) != ENC_BYTES:
            raise ChannelError(f"an X25519 public key is {ENC_BYTES} bytes, not {len(raw)}")
        return cls(x25519.X25519PublicKey.from_public_bytes(raw), raw)

    @classmethod
    def from_jwk(cls, jwk: Any) -> ChannelPublicKey:
        """From the OKP JWK (RFC 8037) the evidence and the token carry."""
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "X25519":
            raise ChannelError("the channel key is not an X25519 OKP JWK")
        x = jwk.get("x")
        if not isinstance(x, str):
            raise ChannelError("the channel key JWK has no 'x'")
        return cls.from_raw(_b64url_decode(x))

    def jwk(self) -> dict[str, str]:
        """The public JWK, with the key id and suite a caller needs to use it."""
        return {
            "kty": "OKP",
            "crv": "X25519",
            "x": _b64url(self.raw),
            "kid": self.key_id.hex(),
            "use": "enc",
            "alg": "HPKE-Base-X25519-SHA256-A128GCM",
        }

    def same_as(self, other: ChannelPublicKey) -> bool:
        return hmac.compare_digest(self.raw, other.raw)


@dataclass(frozen=True)
class SealedRequest:
    """An encrypted request and what its caller needs to open the answer."""

    body: bytes
    response_key: bytes
    enc: bytes

    def open_response(self, body: bytes) -> tuple[int, int | None, bytes]:
        """(inner status, binary header length or None, OIP v2 body); ChannelError if the
        answer was altered or answers another request."""
        if len(body) < RESPONSE_NONCE_BYTES + 16 + _INNER_RESPONSE.size:
            raise ChannelError("the encrypted response is too short")
        nonce = body[:RESPONSE_NONCE_BYTES]
        try:
            inner = AESGCM(self.response_key).decrypt(
                nonce, body[RESPONSE_NONCE_BYTES:], RESPONSE_AAD + self.enc
            )
        except InvalidTag:
            raise ChannelError(
                "the encrypted response does not open: altered, or not the answer to this request"
            ) from None
        status, header_length = _INNER_RESPONSE.unpack_from(inner)
        payload = inner[_INNER_RESPONSE.size :]
        return status, None if header_length == NO_HEADER else header_length, payload


def seal_to(public: ChannelPublicKey, inner: bytes, info: bytes) -> bytes:
    """hdr || enc || ct: `inner` sealed (HPKE single-shot) to the runtime's key, `info` || hdr
    as HPKE's info (so a message made for one purpose never opens as another)."""
    header = _HEADER.pack(public.key_id, KEM_ID, KDF_ID, AEAD_ID)
    return header + _SUITE.encrypt(inner, public.key, info=info + header)


def enc_of(sealed: bytes) -> bytes:
    """The encapsulated key of a message `seal_to` made."""
    return sealed[_HEADER.size : _HEADER.size + ENC_BYTES]


def seal_request(
    public: ChannelPublicKey, body: bytes, header_length: int | None = None
) -> SealedRequest:
    """Encrypt an OIP v2 request body to the runtime's key."""
    response_key = secrets.token_bytes(RESPONSE_KEY_BYTES)
    inner = _INNER_REQUEST.pack(response_key, header_field(header_length, body)) + body
    sealed = seal_to(public, inner, REQUEST_INFO)
    return SealedRequest(sealed, response_key, enc_of(sealed))


class Opened(Protocol):
    """A request opened by the runtime, whatever sealed it: its body and how to answer it."""

    @property
    def body(self) -> bytes: ...

    @property
    def header_length(self) -> int | None: ...

    def seal_response(
        self, status: int, body: bytes, header_length: int | None = None
    ) -> bytes: ...


@dataclass(slots=True)
class OpenedRequest:
    """A request the runtime opened: the plaintext body and how to answer it."""

    body: bytes
    header_length: int | None
    response_key: bytes
    enc: bytes

    def seal_response(self, status: int, body: bytes, header_length: int | None = None) -> bytes:
        inner = _INNER_RESPONSE.pack(status, NO_HEADER if header_length is None else header_length)
        nonce = secrets.token_bytes(RESPONSE_NONCE_BYTES)
        sealed = AESGCM(self.response_key).encrypt(nonce, inner + body, RESPONSE_AAD + self.enc)
        return nonce + sealed


class ChannelPrivateKey:
    """The runtime's key pair, generated in memory; the private half never leaves the process."""

    def __init__(self, key: x25519.X25519PrivateKey | None = None) -> None:
        self._key = key or x25519.X25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public = ChannelPublicKey(self._key.public_key(), raw)
        self._header = _HEADER.pack(self.public.key_id, KEM_ID, KDF_ID, AEAD_ID)

    def open_sealed(self, body: bytes, info: bytes) -> bytes:
        """Decrypt what `seal_to(..., info)` made; ChannelError names what is wrong with it."""
        if len(body) < _OVERHEAD:
            raise ChannelError("the encrypted message is too short")
        header = body[: _HEADER.size]
        if header != self._header:
            key_id, kem, kdf, aead = _HEADER.unpack(header)
            if (kem, kdf, aead) != (KEM_ID, KDF_ID, AEAD_ID):
                raise ChannelError(
                    f"the request uses suite ({kem:#06x}, {kdf:#06x}, {aead:#06x}); this runtime "
                    f"accepts only {SUITE_NAME}"
                )
            raise ChannelError(
                f"the request is encrypted to key {key_id.hex()}, not to this runtime's key "
                f"{self.public.key_id.hex()}: fetch the evidence again"
            )
        try:
            return _SUITE.decrypt(body[_HEADER.size :], self._key, info=info + header)
        except InvalidTag:
            raise ChannelError("the encrypted request does not open: it was altered") from None
        except ValueError as exc:
            raise ChannelError(f"the encrypted request does not open: {exc}") from None

    def open_request(self, body: bytes) -> OpenedRequest:
        """Decrypt a request; ChannelError names what is wrong with it."""
        inner = self.open_sealed(body, REQUEST_INFO)
        if len(inner) < _INNER_REQUEST.size:
            raise ChannelError("the encrypted request holds no response key")
        response_key, header_length = _INNER_REQUEST.unpack_from(inner)
        payload = inner[_INNER_REQUEST.size :]
        if header_length != NO_HEADER and header_length > len(payload):
            raise ChannelError("the binary header length does not fit the body")
        return OpenedRequest(
            payload,
            None if header_length == NO_HEADER else header_length,
            response_key,
            enc_of(body),
        )
