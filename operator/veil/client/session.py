"""A caller's side of the encrypted channel: verify the runtime's evidence, then send.

Before any input leaves the caller, `AsyncClient.verify()`:
  1. fetches `GET /v2/evidence?nonce=<fresh random>` (or the cached evidence with fresh=False);
  2. verifies the MAA token with Veil's verifier (runtime/attestation.py): one of the expected
     issuers, its keys from that issuer's OpenID configuration, RS256, exp/nbf, the TEE claims
     (type, compliance, not debuggable, hostdata), and the nonce (not a replayed token);
  3. checks the exact claims the caller requires (measurements etc.);
  4. checks that the key attested in the token's runtime data is the key the runtime serves;
  5. checks the evidence is for the model asked for.
Each failed check raises `RefusedError` whose `check` names it. Only then are requests encrypted
to the attested key and sent: by default in a channel session (sessions.py: one HPKE exchange to
the attested key, then AES-GCM per request; reopened when the runtime no longer holds it), or
with `sessions=False` each request sealed on its own with HPKE (channel.py), which keeps a
caller's requests unlinkable to an observer at the cost of an X25519 agreement per request.
The evidence is verified again when its token nears expiry, or when the runtime says the key
changed (it restarted).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from veil.client.expectations import Expectations, claim_value
from veil.http_errors import error_reason
from veil.runtime import sessions as channel_sessions
from veil.runtime.attestation import (
    AttestationError,
    AttestationVerifier,
    VerifiedAttestation,
    runtime_data,
    runtime_data_claim,
)
from veil.runtime.channel import (
    CHANNEL_KEY,
    EVIDENCE_FORMAT,
    EVIDENCE_PATH,
    REQUEST_MEDIA_TYPE,
    RESPONSE_MEDIA_TYPE,
    ChannelError,
    ChannelPublicKey,
    SealedRequest,
    seal_request,
)
from veil.runtime.jwks import IssuerKeys
from veil.runtime.replay import ReplayCache

T = TypeVar("T")
MAX_EVIDENCE_BYTES = 512 * 1024
_STALE_KEY = "not to this runtime's key"
_NUMPY_TO_V2 = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}


class RefusedError(Exception):
    """A check failed: nothing was sent. `check` names it (issuer, signature, expired, nonce,
    replay, claim, hostdata, debuggable, required-claim, key-binding, model, evidence...)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"refused ({check}): {message}")
        self.check = check


class InferenceError(Exception):
    """The runtime answered the (verified, encrypted) request with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Verified:
    """Evidence that passed every check: the key to encrypt to and where to send."""

    key: ChannelPublicKey
    attestation: VerifiedAttestation
    infer_path: str
    encryption_required: bool
    # Where the runtime opens channel sessions; None when it offers none.
    sessions_path: str | None = None


def _encode_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """An OIP v2 request from {name: array-like}; a mapping with "inputs" is taken as is."""
    if "inputs" in inputs:
        return dict(inputs)
    import numpy as np

    tensors = []
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = _NUMPY_TO_V2.get(array.dtype.name)
        if datatype is None:
            raise ValueError(f"input {name!r}: dtype {array.dtype} has no OIP v2 datatype")
        tensors.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "data": array.ravel().tolist(),
            }
        )
    return {"inputs": tensors}


class AsyncClient:
    """Verified, encrypted inference against one model of a Veil runtime."""

    def __init__(
        self,
        url: str,
        model: str,
        expectations: Expectations,
        *,
        version: str | None = None,
        fresh: bool = True,
        timeout_seconds: float = 30.0,
        leeway_seconds: float = 60.0,
        issuer_keys: IssuerKeys | None = None,
        sessions: bool = True,
    ) -> None:
        """`issuer_keys`: how the issuers' signing keys are fetched (default: their OpenID
        configuration over HTTPS with the system's CAs). `sessions`: encrypt in a channel
        session where the runtime offers them (else each request with HPKE)."""
        self.url = url.rstrip("/")
        self.model = model
        self.version = version
        self._expect = expectations
        self._fresh = fresh
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._verifier = AttestationVerifier(
            expectations.issuers,
            expectations.policy,
            leeway_seconds=leeway_seconds,
            keys=issuer_keys,
            replay_cache=ReplayCache(),
            allow_insecure_loopback_issuers=expectations.allow_insecure_loopback_issuers,
        )
        self._session: aiohttp.ClientSession | None = None
        self.verified: Verified | None = None
        self._use_sessions = sessions
        self._channel: tuple[Verified, channel_sessions.CallerSession] | None = None
        self._opening = asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _evidence(self, nonce: str | None) -> dict[str, Any]:
        url = self.url + EVIDENCE_PATH
        try:
            async with self._http().get(
                url, params={"nonce": nonce} if nonce else None, allow_redirects=False
            ) as response:
                body = await response.content.read(MAX_EVIDENCE_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RefusedError("evidence", f"cannot fetch {url}: {exc!r}") from exc
        if len(body) > MAX_EVIDENCE_BYTES:
            raise RefusedError("evidence", f"{url} answered more than {MAX_EVIDENCE_BYTES} bytes")
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if status != 200:
            reason = document.get("error") if isinstance(document, dict) else None
            raise RefusedError("evidence", f"{url} answered HTTP {status}: {reason or 'no reason'}")
        if not isinstance(document, dict) or document.get("format") != EVIDENCE_FORMAT:
            raise RefusedError("evidence", f"{url} did not answer {EVIDENCE_FORMAT} evidence")
        return document

    async def verify(self) -> Verified:
        """Fetch and check the evidence; RefusedError names the first check that failed."""
        nonce = secrets.token_urlsafe(24) if self._fresh else None
        document = await self._evidence(nonce)
        attestation = document.get("attestation")
        if not isinstance(attestation, Mapping) or not isinstance(attestation.get("token"), str):
            raise RefusedError(
                "attestation", "the runtime serves no attestation token: its key is not attested"
            )
        try:
            verified = await self._verifier.verify(attestation["token"], expected_nonce=nonce)
        except AttestationError as exc:
            raise RefusedError(exc.reason.value, str(exc)) from exc
        for name, expected in self._expect.required_claims:
            found, actual = claim_value(verified.claims, name)
            if not found:
                raise RefusedError("required-claim", f"claim {name} is missing")
            if actual != expected:
                raise RefusedError(
                    "required-claim", f"claim {name} is {actual!r}, expected {expected!r}"
                )
        placement = self._expect.policy.placement
        claim = runtime_data_claim(placement, CHANNEL_KEY)
        try:
            attested = ChannelPublicKey.from_jwk(
                runtime_data(verified.claims, placement).get(CHANNEL_KEY)
            )
        except ChannelError as exc:
            raise RefusedError("key-binding", f"claim {claim} holds no channel key: {exc}") from exc
        try:
            served = ChannelPublicKey.from_jwk(document.get("key"))
        except ChannelError as exc:
            raise RefusedError("key-binding", f"the served key is unusable: {exc}") from exc
        if not attested.same_as(served):
            raise RefusedError(
                "key-binding",
                f"the served key {served.key_id.hex()} is not the attested key "
                f"{attested.key_id.hex()} ({claim}): the evidence was not produced by this TEE",
            )
        model = document.get("model")
        if not isinstance(model, Mapping) or model.get("name") != self.model:
            served_name = model.get("name") if isinstance(model, Mapping) else None
            raise RefusedError("model", f"the evidence is for model {served_name!r}, not ours")
        channel = document.get("channel")
        required = isinstance(channel, Mapping) and channel.get("encryption") == "required"
        offered = channel.get("sessions") if isinstance(channel, Mapping) else None
        sessions_path = offered.get("path") if isinstance(offered, Mapping) else None
        base = f"/v2/models/{self.model}" + (f"/versions/{self.version}" if self.version else "")
        self.verified = Verified(
            attested,
            verified,
            f"{base}/infer/encrypted",
            required,
            sessions_path if sessions_path == channel_sessions.SESSIONS_PATH else None,
        )
        return self.verified

    async def _key(self) -> Verified:
        current = self.verified
        if current is None or current.attestation.expires_at.timestamp() - time.time() < 60:
            current = await self.verify()
        return current

    async def _post(self, url: str, body: bytes, media_type: str) -> tuple[int, str, bytes]:
        try:
            async with self._http().post(
                url,
                data=body,
                headers={"Content-Type": media_type},
                allow_redirects=False,
            ) as response:
                return response.status, response.content_type, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise InferenceError(0, f"cannot reach {url}: {exc!r}") from exc

    async def _channel_session(
        self, verified: Verified, path: str
    ) -> channel_sessions.CallerSession:
        """The open session to the attested key, opening one when there is none usable."""
        async with self._opening:  # concurrent requests share the one being opened
            current = self._channel
            if current is not None and current[0] is verified and current[1].usable():
                return current[1]
            offer = channel_sessions.offer_session(verified.key)
            url = self.url + path
            status, media_type, answer = await self._post(
                url, offer.body, channel_sessions.OPEN_MEDIA_TYPE
            )
            if status != 201 or media_type != channel_sessions.OPENED_MEDIA_TYPE:
                raise InferenceError(status, error_reason(answer))
            try:
                session = offer.confirm(answer)
            except ChannelError as exc:
                raise InferenceError(status, str(exc)) from exc
            self._channel = (verified, session)
            return session

    async def send(
        self, body: bytes, header_length: int | None = None
    ) -> tuple[int, int | None, bytes]:
        """Encrypt an OIP v2 body to the attested key, send it, open the answer:
        (inner status, binary header length or None, body)."""
        for attempt in (1, 2):
            verified = await self._key()
            sealed: channel_sessions.SealedSessionRequest | SealedRequest
            try:
                if self._use_sessions and verified.sessions_path is not None:
                    session = await self._channel_session(verified, verified.sessions_path)
                    sealed = session.seal(body, header_length)
                    media_type = channel_sessions.REQUEST_MEDIA_TYPE
                    expected = channel_sessions.RESPONSE_MEDIA_TYPE
                else:
                    sealed = seal_request(verified.key, body, header_length)
                    media_type, expected = REQUEST_MEDIA_TYPE, RESPONSE_MEDIA_TYPE
                url = self.url + verified.infer_path
                status, answered_as, answer = await self._post(url, sealed.body, media_type)
            except InferenceError as refused:
                if attempt == 1 and self._forget_stale(refused.status, str(refused)):
                    continue
                raise
            if status == 200 and answered_as == expected:
                try:
                    return sealed.open_response(answer)
                except ChannelError as exc:
                    raise InferenceError(status, str(exc)) from exc
            message = error_reason(answer)
            if attempt == 1 and self._forget_stale(status, message):
                continue
            raise InferenceError(status, message)
        raise AssertionError("unreachable")

    def _forget_stale(self, status: int, message: str) -> bool:
        """Whether a refusal says what this client holds is stale (then forgotten, so that
        the one retry starts afresh)."""
        if status != 400:
            return False
        if _STALE_KEY in message:
            self.verified = None  # the runtime restarted with a new key: verify again
            return True
        if channel_sessions.SESSION_UNKNOWN in message:
            self._channel = None  # expired, evicted, or the runtime restarted: reopen
            return True
        return False

    async def infer(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Infer: `inputs` is {input name: array-like} or an OIP v2 request document; returns
        the OIP v2 response document."""
        body = json.dumps(_encode_inputs(inputs), separators=(",", ":")).encode()
        status, header_length, answer = await self.send(body)
        if header_length is not None:
            raise InferenceError(status, "the answer uses binary tensors; use send() for those")
        if status != 200:
            raise InferenceError(status, error_reason(answer))
        document: dict[str, Any] = json.loads(answer)
        return document


class _Loop:
    """One event loop in a daemon thread: the synchronous client runs its coroutines there, so
    it works the same in a script and in a notebook (whose own loop is already running)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class Client:
    """The synchronous face of AsyncClient (scripts, notebooks)."""

    def __init__(self, url: str, model: str, expectations: Expectations, **options: Any) -> None:
        self._loop = _Loop()
        self._client = AsyncClient(url, model, expectations, **options)

    @property
    def verified(self) -> Verified | None:
        return self._client.verified

    def verify(self) -> Verified:
        return self._loop.run(self._client.verify())

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return self._loop.run(self._client.infer(inputs))

    def send(self, body: bytes, header_length: int | None = None) -> tuple[int, int | None, bytes]:
        return self._loop.run(self._client.send(body, header_length))

    def close(self) -> None:
        self._loop.run(self._client.close())
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
