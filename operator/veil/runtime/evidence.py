"""The runtime's evidence: its channel key bound into an attestation token, served to callers.

At start the runtime generates its channel key pair in memory (channel.py) and asks its attester
for a token whose runtime data carries the public key:

    runtime data = {"veil-channel-key": <the key's OKP JWK>, "nonce"?: <a caller's nonce>}

On Confidential ACI the attester is the SKR sidecar:

    POST {sidecar}/attest/maa {"maa_endpoint": <bare host>, "runtime_data": base64(JSON)}
      200 {"token": <MAA JWT>}      400/403 {"error": ...}

The sidecar puts the SHA-256 of the runtime data in the SEV-SNP report's REPORT_DATA and MAA
returns the JSON as the token's `x-ms-runtime` claims, so `x-ms-runtime.veil-channel-key` is the
attested key. On confidential VMs the attester is the Veil node agent (`POST /v1/attest`), whose
guest attestation carries the runtime data as its client payload:
`x-ms-runtime.client-payload.veil-channel-key` (with `veil-pod`/`veil-model`, the pod and model
the agent authorized: CVM attestation is per node).

The runtime verifies its own token with the same verifier callers use (pinned issuer, JWKS,
RS256, exp/nbf, TEE claims) and checks the key in it before serving it, and refreshes it before
it expires (at three quarters of its remaining life; failures retried).

    GET /v2/evidence            the cached evidence (below); 503 until a token is verified
    GET /v2/evidence?nonce=N    fresh evidence whose token also carries `nonce` N (8-128
                                characters of base64url): proves the token is not a replay;
                                costs one attestation, so bounded (429 beyond the rate)

    {"format": "veil-evidence/v1",
     "model": {"name", "version"},
     "channel": {"encryption": "required"|"optional", "suite", "request_media_type",
                 "response_media_type", "infer_path",
                 "sessions": {"path", "offer_media_type", "request_media_type",
                              "response_media_type"}},
     "key": <OKP JWK of the channel key>,
     "attestation": {"format": "maa-jwt", "token", "issuer", "placement", "key_claim",
                     "nonce_claim", "expires_at", "nonce"} | null}

`attestation` is null when the runtime has no attester (a local key file): callers refuse that.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from veil.runtime import sessions
from veil.runtime.attestation import (
    NONCE,
    AttestationError,
    AttestationVerifier,
    Placement,
    VerifiedAttestation,
    runtime_data,
    runtime_data_claim,
)
from veil.runtime.channel import (
    CHANNEL_KEY,
    EVIDENCE_FORMAT,
    REQUEST_MEDIA_TYPE,
    RESPONSE_MEDIA_TYPE,
    SUITE_NAME,
    ChannelError,
    ChannelPrivateKey,
    ChannelPublicKey,
)
from veil.runtime.key_release import KeyReleaseError

if TYPE_CHECKING:
    from veil.runtime.node_agent_client import NodeAgentClient, NodeAgentTarget

log = logging.getLogger("veil.runtime.evidence")

FORMAT = EVIDENCE_FORMAT
NONCE_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,128}")
MAX_TOKEN_BYTES = 256 * 1024


class AttesterError(Exception):
    """No token could be obtained (or it did not verify); the message says why."""


class EvidenceUnavailableError(Exception):
    """No evidence can be served now; `status` is the HTTP answer (429, 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Attester(Protocol):
    """Obtains an attestation token whose runtime data is `data`."""

    @property
    def placement(self) -> Placement: ...

    @property
    def issuer(self) -> str: ...

    async def attest(self, data: Mapping[str, Any]) -> str: ...


def encrypted_infer_path(name: str, version: str | None = None) -> str:
    base = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
    return f"{base}/infer/encrypted"


class SkrAttester:
    """The SKR sidecar's `POST /attest/maa` (Confidential ACI)."""

    placement = Placement.CONFIDENTIAL_ACI

    def __init__(
        self,
        sidecar_url: str,
        maa_endpoint: str,
        *,
        issuer: str | None = None,
        timeout_seconds: float = 30.0,
    ) -> None:
        parts = urlsplit(sidecar_url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"sidecar URL {sidecar_url!r} must be an http(s) URL")
        self._url = sidecar_url.rstrip("/") + "/attest/maa"
        self._maa = maa_endpoint
        # The sidecar attests at https://{maa_endpoint}: that is the token's issuer.
        self.issuer = issuer or f"https://{maa_endpoint}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def attest(self, data: Mapping[str, Any]) -> str:
        encoded = base64.b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()
        body = {"maa_endpoint": self._maa, "runtime_data": encoded}
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.post(self._url, json=body) as response,
            ):
                text = await response.content.read(MAX_TOKEN_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AttesterError(f"cannot reach the SKR sidecar at {self._url}: {exc!r}") from exc
        try:
            answer = json.loads(text) if len(text) <= MAX_TOKEN_BYTES else None
        except ValueError:
            answer = None
        if status != 200:
            reason = answer.get("error") if isinstance(answer, dict) else None
            raise AttesterError(f"the SKR sidecar answered HTTP {status}: {reason or 'no reason'}")
        if not isinstance(answer, dict) or not isinstance(answer.get("token"), str):
            raise AttesterError("the SKR sidecar answered 200 without a token")
        return str(answer["token"])


class NodeAgentAttester:
    """The Veil node agent's `POST /v1/attest` (confidential VMs): a guest attestation of the
    node whose client payload carries the runtime data, plus the pod and model the agent
    authorized (`x-ms-runtime.client-payload.veil-pod` / `veil-model`)."""

    placement = Placement.CONFIDENTIAL_VM

    def __init__(self, client: NodeAgentClient, target: NodeAgentTarget) -> None:
        self._client = client
        self._target = target
        endpoint = target.maa_endpoint.rstrip("/")
        self.issuer = endpoint if "://" in endpoint else f"https://{endpoint}"

    async def attest(self, data: Mapping[str, Any]) -> str:
        try:
            return await self._client.attest(self._target, dict(data))
        except KeyReleaseError as exc:
            raise AttesterError(str(exc)) from exc


@dataclass(frozen=True)
class _Attested:
    token: str
    verified: VerifiedAttestation
    refresh_at: float


class EvidenceService:
    """Holds the channel key and the evidence that binds it; refreshes the token in the
    background (`lifespan`), and mints fresh evidence for a caller's nonce (`fresh`)."""

    def __init__(
        self,
        key: ChannelPrivateKey,
        *,
        model_name: str,
        model_version: str,
        required: bool,
        attester: Attester | None = None,
        verifier: AttestationVerifier | None = None,
        fresh_per_minute: int = 30,
        retry_seconds: tuple[float, float] = (2.0, 60.0),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if attester is not None and verifier is None:
            raise ValueError("an attester needs a verifier: the runtime checks its own token")
        self.key = key
        self.required = required
        self._model = {"name": model_name, "version": model_version}
        self._infer_path = encrypted_infer_path(model_name)
        self._attester = attester
        self._verifier = verifier
        self._fresh_per_minute = fresh_per_minute
        self._fresh_times: deque[float] = deque()
        self._fresh_lock = asyncio.Semaphore(2)
        self._retry = retry_seconds
        self._clock = clock
        self._current: _Attested | None = None
        self.last_failure: str | None = None

    @property
    def attested(self) -> bool:
        return self._attester is not None

    @property
    def serving(self) -> bool:
        """Whether callers can use the channel: not while a required, attested channel has no
        verified token yet (readiness waits for it, so no caller is sent to a runtime whose
        evidence it cannot fetch)."""
        return not (self.required and self._attester is not None and self._current is None)

    def _data(self, nonce: str | None) -> dict[str, Any]:
        data: dict[str, Any] = {CHANNEL_KEY: self.key.public.jwk()}
        if nonce is not None:
            data[NONCE] = nonce
        return data

    async def _obtain(self, nonce: str | None) -> _Attested:
        """A token binding the key (and `nonce`), verified as a caller would verify it."""
        assert self._attester is not None
        assert self._verifier is not None
        token = await self._attester.attest(self._data(nonce))
        try:
            verified = await self._verifier.verify(token)
        except AttestationError as exc:
            raise AttesterError(
                f"the runtime's own attestation token does not verify ({exc.reason.value}): {exc}"
            ) from exc
        data = runtime_data(verified.claims, self._attester.placement)
        try:
            attested = ChannelPublicKey.from_jwk(data.get(CHANNEL_KEY))
        except ChannelError as exc:
            raise AttesterError(f"the token does not carry the channel key: {exc}") from exc
        if not attested.same_as(self.key.public):
            raise AttesterError("the token carries another channel key than this runtime's")
        if nonce is not None and data.get(NONCE) != nonce:
            raise AttesterError("the token does not carry the nonce it was asked for")
        now = self._clock()
        expires = verified.expires_at.timestamp()
        return _Attested(token, verified, now + max(0.0, expires - now) * 0.75)

    async def refresh(self) -> None:
        """Obtain (or renew) the cached token now; raises AttesterError."""
        try:
            self._current = await self._obtain(None)
        except AttesterError as exc:
            self.last_failure = str(exc)
            raise
        self.last_failure = None
        log.info(
            "channel key %s attested by %s until %s",
            self.key.public.key_id.hex(),
            self._current.verified.issuer,
            self._current.verified.expires_at.isoformat(),
        )

    async def _keep_fresh(self) -> None:
        delay = self._retry[0]
        while True:
            try:
                await self.refresh()
            except AttesterError as exc:
                log.error("attesting the channel key failed (retrying in %.0fs): %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(self._retry[1], delay * 2)
                continue
            delay = self._retry[0]
            assert self._current is not None
            await asyncio.sleep(max(1.0, self._current.refresh_at - self._clock()))

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Keep the token fresh while the server runs."""
        task = asyncio.create_task(self._keep_fresh()) if self.attested else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _document(self, attested: _Attested | None, nonce: str | None) -> dict[str, Any]:
        attestation: dict[str, Any] | None = None
        if attested is not None and self._attester is not None:
            placement = self._attester.placement
            attestation = {
                "format": "maa-jwt",
                "token": attested.token,
                "issuer": attested.verified.issuer,
                "placement": placement.value,
                "key_claim": runtime_data_claim(placement, CHANNEL_KEY),
                "nonce_claim": runtime_data_claim(placement, NONCE),
                "expires_at": attested.verified.expires_at.isoformat(),
                "nonce": nonce,
            }
        return {
            "format": FORMAT,
            "model": dict(self._model),
            "channel": {
                "encryption": "required" if self.required else "optional",
                "suite": SUITE_NAME,
                "request_media_type": REQUEST_MEDIA_TYPE,
                "response_media_type": RESPONSE_MEDIA_TYPE,
                "infer_path": self._infer_path,
                "sessions": {
                    "path": sessions.SESSIONS_PATH,
                    "offer_media_type": sessions.OPEN_MEDIA_TYPE,
                    "request_media_type": sessions.REQUEST_MEDIA_TYPE,
                    "response_media_type": sessions.RESPONSE_MEDIA_TYPE,
                },
            },
            "key": self.key.public.jwk(),
            "attestation": attestation,
        }

    def current(self) -> dict[str, Any]:
        """The cached evidence; EvidenceUnavailableError(503) while no unexpired token is held."""
        if not self.attested:
            return self._document(None, None)
        attested = self._current
        if attested is None or attested.verified.expires_at.timestamp() <= self._clock():
            why = self.last_failure or "the channel key is being attested"
            raise EvidenceUnavailableError(503, f"no attestation token yet: {why}")
        return self._document(attested, None)

    def _take_fresh_slot(self) -> None:
        now = time.monotonic()
        while self._fresh_times and self._fresh_times[0] <= now - 60:
            self._fresh_times.popleft()
        if len(self._fresh_times) >= self._fresh_per_minute:
            raise EvidenceUnavailableError(
                429, f"at most {self._fresh_per_minute} fresh attestations a minute; retry later"
            )
        self._fresh_times.append(now)

    async def fresh(self, nonce: str) -> dict[str, Any]:
        """Evidence whose token also carries the caller's `nonce`."""
        if not NONCE_PATTERN.fullmatch(nonce):
            raise ValueError("the nonce must be 8 to 128 characters of base64url")
        if not self.attested:
            return self._document(None, None)
        self._take_fresh_slot()
        async with self._fresh_lock:
            try:
                attested = await self._obtain(nonce)
            except AttesterError as exc:
                log.error("fresh attestation failed: %s", exc)
                raise EvidenceUnavailableError(503, f"attestation failed: {exc}") from exc
        return self._document(attested, nonce)
