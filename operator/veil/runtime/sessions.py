"""Channel sessions: one HPKE exchange to the attested key, then AES-GCM for each request.

Per-request HPKE (channel.py) costs an X25519 agreement and two HKDF runs on every request,
about as much as a small model's whole inference. A session pays that once: the caller seals a
fresh 32-byte secret to the runtime's attested key (HPKE, as a request is sealed), both sides
derive from it a session id and one AES-256-GCM key per direction, and each request and answer
is then one AES-GCM operation. The secret exists only in the caller and in the TEE, so what a
proxy, ingress or the host sees stays ciphertext, as with per-request HPKE. Unlike per-request
HPKE, requests of one session share a visible session id: an observer can tell they come from
one caller (over one connection it could already).

Opening (`POST /v2/sessions`, Content-Type `application/vnd.veil.hpke-session`):

    body   = seal_to(runtime key, secret (32 bytes), info = "veil session\\0")
    keys   = HKDF-SHA256(secret, salt = runtime key id, info = "veil session keys\\0")
             -> session id (16) || request key (32) || response key (32)
    answer = 201, nonce (12) || AES-GCM(response key, nonce, lifetime s (u32) || max uses (u32),
                                        aad = "veil session opened\\0" || session id)

The answer proves the TEE holds the secret (only it could derive the response key).

Request (`application/vnd.veil.session-request`, to .../infer/encrypted):

    body  = session id (16) || nonce (12) || AES-GCM(request key, nonce,
                 header_length (u32; 0xFFFFFFFF: plain JSON) || OIP v2 body,
                 aad = "veil session request\\0" || session id)

Answer (`application/vnd.veil.session-response`), 200 whenever the request opened:

    body  = nonce (12) || AES-GCM(response key, nonce, status (u16) || header_length (u32) || body,
                                  aad = "veil session response\\0" || session id || request nonce)

Binding the request's nonce into the answer's AAD ties each answer to its one request. Nonces
are random; a session serves at most `MAX_USES` requests and lives `LIFETIME_SECONDS`, far
inside AES-GCM's bound for random nonces, then the caller opens another. An unknown or expired
session is answered 400 with `SESSION_UNKNOWN` in the reason: the caller opens a new one and
sends again. As with per-request HPKE (and OHTTP), a replayed request is answered again,
encrypted for the same caller: it tells an observer nothing it had not seen.
"""

from __future__ import annotations

import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.runtime.channel import (
    NO_HEADER,
    ChannelError,
    ChannelPrivateKey,
    ChannelPublicKey,
    header_field,
    seal_to,
)

SESSIONS_PATH = "/v2/sessions"
OPEN_MEDIA_TYPE = "application/vnd.veil.hpke-session"
REQUEST_MEDIA_TYPE = "application/vnd.veil.session-request"
RESPONSE_MEDIA_TYPE = "application/vnd.veil.session-response"
OPENED_MEDIA_TYPE = "application/vnd.veil.session-opened"
# In the reason of the 400 for a session the runtime does not hold (restarted, expired, used
# up or evicted): the caller opens a new session and sends again.
SESSION_UNKNOWN = "unknown or expired channel session"

SECRET_BYTES = 32
SESSION_ID_BYTES = 16
NONCE_BYTES = 12
KEY_BYTES = 32
TAG_BYTES = 16
LIFETIME_SECONDS = 600
# Random 96-bit nonces: NIST SP 800-38D bounds one key to 2^32 of them; a session stays far below.
MAX_USES = 1 << 20
DEFAULT_CAPACITY = 16384

OPEN_INFO = b"veil session\x00"
KEYS_INFO = b"veil session keys\x00"
OPENED_AAD = b"veil session opened\x00"
REQUEST_AAD = b"veil session request\x00"
RESPONSE_AAD = b"veil session response\x00"
_TERMS = struct.Struct(">II")
_INNER_REQUEST = struct.Struct(">I")
_INNER_RESPONSE = struct.Struct(">HI")


@dataclass(frozen=True, slots=True)
class _Keys:
    session_id: bytes
    request: AESGCM
    response: AESGCM


def _derive(secret: bytes, key_id: bytes) -> _Keys:
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=SESSION_ID_BYTES + 2 * KEY_BYTES,
        salt=key_id,
        info=KEYS_INFO,
    ).derive(secret)
    request_key = material[SESSION_ID_BYTES : SESSION_ID_BYTES + KEY_BYTES]
    return _Keys(
        material[:SESSION_ID_BYTES],
        AESGCM(request_key),
        AESGCM(material[SESSION_ID_BYTES + KEY_BYTES :]),
    )


def _header_length(field: int, payload: bytes) -> int | None:
    if field == NO_HEADER:
        return None
    if field > len(payload):
        raise ChannelError("the binary header length does not fit the body")
    return field


# --- the caller's half ---------------------------------------------------------------------


@dataclass(frozen=True)
class SessionOffer:
    """A session the caller proposed: the body to POST, and the keys once the TEE confirms."""

    body: bytes
    _keys: _Keys

    def confirm(self, answer: bytes) -> CallerSession:
        """The session, once the runtime's answer proves it derived the same keys."""
        if len(answer) != NONCE_BYTES + _TERMS.size + TAG_BYTES:
            raise ChannelError("the session answer has the wrong length")
        try:
            terms = self._keys.response.decrypt(
                answer[:NONCE_BYTES], answer[NONCE_BYTES:], OPENED_AAD + self._keys.session_id
            )
        except InvalidTag:
            raise ChannelError(
                "the session answer does not open: it was not made by the attested key's holder"
            ) from None
        lifetime, max_uses = _TERMS.unpack(terms)
        return CallerSession(self._keys, time.monotonic() + lifetime, max_uses)


def offer_session(public: ChannelPublicKey) -> SessionOffer:
    """A fresh session secret sealed to the runtime's attested key."""
    secret = secrets.token_bytes(SECRET_BYTES)
    return SessionOffer(seal_to(public, secret, OPEN_INFO), _derive(secret, public.key_id))


@dataclass(frozen=True, slots=True)
class SealedSessionRequest:
    body: bytes
    _keys: _Keys
    _nonce: bytes

    def open_response(self, body: bytes) -> tuple[int, int | None, bytes]:
        """(inner status, binary header length or None, OIP v2 body); ChannelError if the
        answer was altered or answers another request."""
        if len(body) < NONCE_BYTES + TAG_BYTES + _INNER_RESPONSE.size:
            raise ChannelError("the encrypted response is too short")
        try:
            inner = self._keys.response.decrypt(
                body[:NONCE_BYTES],
                body[NONCE_BYTES:],
                RESPONSE_AAD + self._keys.session_id + self._nonce,
            )
        except InvalidTag:
            raise ChannelError(
                "the encrypted response does not open: altered, or not the answer to this request"
            ) from None
        status, field = _INNER_RESPONSE.unpack_from(inner)
        payload = inner[_INNER_RESPONSE.size :]
        return status, _header_length(field, payload), payload


class CallerSession:
    """An open session on the caller's side (safe to share between concurrent requests)."""

    def __init__(self, keys: _Keys, expires_at: float, max_uses: int) -> None:
        self._keys = keys
        self._expires_at = expires_at
        self._uses_left = max_uses
        self._lock = threading.Lock()

    @property
    def session_id(self) -> bytes:
        return self._keys.session_id

    def usable(self) -> bool:
        # A margin so a request does not reach the runtime just after the session lapsed.
        return self._uses_left > 0 and time.monotonic() < self._expires_at - 5

    def seal(self, body: bytes, header_length: int | None = None) -> SealedSessionRequest:
        with self._lock:
            self._uses_left -= 1
        nonce = secrets.token_bytes(NONCE_BYTES)
        inner = _INNER_REQUEST.pack(header_field(header_length, body)) + body
        sealed = self._keys.request.encrypt(nonce, inner, REQUEST_AAD + self._keys.session_id)
        return SealedSessionRequest(self._keys.session_id + nonce + sealed, self._keys, nonce)


# --- the runtime's half --------------------------------------------------------------------


@dataclass(slots=True)
class _Held:
    keys: _Keys
    expires_at: float
    uses_left: int
    # The runtime key the session was opened to: a session outlives no key change.
    key_id: bytes


@dataclass(slots=True)
class OpenedSessionRequest:
    """A session request the runtime opened: the plaintext body and how to answer it (the
    same face as channel.OpenedRequest, so the server answers both alike)."""

    body: bytes
    header_length: int | None
    _keys: _Keys
    _nonce: bytes

    def seal_response(self, status: int, body: bytes, header_length: int | None = None) -> bytes:
        inner = _INNER_RESPONSE.pack(status, NO_HEADER if header_length is None else header_length)
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = RESPONSE_AAD + self._keys.session_id + self._nonce
        return nonce + self._keys.response.encrypt(nonce, inner + body, aad)


class SessionTable:
    """The runtime's open sessions, in memory only (they die with the process and its key).

    Bounded: when full, the oldest session goes (its caller opens another; nothing is lost).
    Requests may be opened on the event loop or in worker threads, hence the lock. `key` gives
    the runtime's current channel key.
    """

    def __init__(
        self,
        key: Callable[[], ChannelPrivateKey],
        *,
        capacity: int = DEFAULT_CAPACITY,
        lifetime_seconds: int = LIFETIME_SECONDS,
        max_uses: int = MAX_USES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key = key
        self._capacity = capacity
        self._lifetime = lifetime_seconds
        self._max_uses = max_uses
        self._clock = clock
        self._held: OrderedDict[bytes, _Held] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def clear(self) -> None:
        """Forget every session (their callers open new ones)."""
        with self._lock:
            self._held.clear()

    def open_session(self, body: bytes) -> bytes:
        """Accept a caller's session offer; the confirmation to answer with (201)."""
        key = self._key()
        secret = key.open_sealed(body, OPEN_INFO)
        if len(secret) != SECRET_BYTES:
            raise ChannelError(f"a session secret is {SECRET_BYTES} bytes, not {len(secret)}")
        key_id = key.public.key_id
        keys = _derive(secret, key_id)
        with self._lock:
            self._held[keys.session_id] = _Held(
                keys, self._clock() + self._lifetime, self._max_uses, key_id
            )
            self._held.move_to_end(keys.session_id)
            while len(self._held) > self._capacity:
                self._held.popitem(last=False)
        nonce = secrets.token_bytes(NONCE_BYTES)
        terms = _TERMS.pack(self._lifetime, self._max_uses)
        return nonce + keys.response.encrypt(nonce, terms, OPENED_AAD + keys.session_id)

    def open_request(self, body: bytes) -> OpenedSessionRequest:
        """Decrypt a session request; ChannelError names what is wrong (SESSION_UNKNOWN in it
        when the caller should open a new session)."""
        if len(body) < SESSION_ID_BYTES + NONCE_BYTES + TAG_BYTES + _INNER_REQUEST.size:
            raise ChannelError("the session request is too short")
        session_id = body[:SESSION_ID_BYTES]
        key_id = self._key().public.key_id
        with self._lock:
            held = self._held.get(session_id)
            if held is not None and (
                held.uses_left <= 0 or self._clock() >= held.expires_at or held.key_id != key_id
            ):
                del self._held[session_id]
                held = None
            if held is None:
                raise ChannelError(f"{SESSION_UNKNOWN}: open a new session ({SESSIONS_PATH})")
            held.uses_left -= 1
        nonce = body[SESSION_ID_BYTES : SESSION_ID_BYTES + NONCE_BYTES]
        try:
            inner = held.keys.request.decrypt(
                nonce, body[SESSION_ID_BYTES + NONCE_BYTES :], REQUEST_AAD + session_id
            )
        except InvalidTag:
            raise ChannelError("the encrypted request does not open: it was altered") from None
        (field,) = _INNER_REQUEST.unpack_from(inner)
        payload = inner[_INNER_REQUEST.size :]
        return OpenedSessionRequest(payload, _header_length(field, payload), held.keys, nonce)
