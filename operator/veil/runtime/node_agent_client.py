"""The pod's side of the node agent (veil.node_agent): key release on confidential-VM nodes.

On an AKS confidential-VM node the TEE is the node and only the node agent holds the vTPM, so
the pod needs neither a TPM nor a hostPath (Pod Security "restricted"). It proves who it is with
its projected ServiceAccount token (audience "veil-node-agent") and receives the model key
wrapped to an RSA-3072 key it generated in memory for this one request:

    POST {agent}/v1/release  {"vault_url", "key_name", "key_version", "maa_endpoint",
                              "wrapping_key": <public JWK>}
      200 {"kid", "alg": "RSA-OAEP-256+A256KWP", "wrapping_key_sha256", "ciphertext"}
      ciphertext = RSA-OAEP-256(wrapping key, K) || AES-KWP(K, PKCS#8 DER of the model key)

Transport failures, 502/503 and 429 are retried with bounded backoff (the agent may start after
the pod, MAA or Key Vault may hiccup); 400/401/403 are final and raised as a refusal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

from veil.http_errors import error_reason
from veil.runtime.jwk import JwkError, b64url_decode, rsa_public_jwk
from veil.runtime.key_release import (
    KeyReleaseError,
    KeyReleaseRefusedError,
    KeyReleaseResponseError,
    KeyReleaseUnavailableError,
    ReleaseTarget,
    RetriableError,
    RetriesExhaustedError,
    RetryPolicy,
    with_retries,
)
from veil.runtime.loader import (
    ModelLoader,
    SealedPin,
    released_key_loader,
    verified_release_target,
)
from veil.runtime.sealing import SealedModelError

log = logging.getLogger("veil.runtime.node_agent_client")

WRAPPING_KEY_BITS = 3072
ALGORITHM = "RSA-OAEP-256+A256KWP"
DEFAULT_TOKEN_PATH = Path("/var/run/secrets/veil/node-agent/token")
MAX_RESPONSE_BYTES = 64 * 1024
_RETRIABLE = frozenset({429, 500, 502, 503, 504})

__all__ = ["NodeAgentClient", "NodeAgentTarget", "node_agent_loader"]


@dataclass(frozen=True)
class NodeAgentTarget:
    """Which key version to release, from which vault, attested by which MAA instance
    (`https://host`, the ConfidentialModel's attestationAuthority)."""

    vault_url: str
    key_name: str
    key_version: str
    maa_endpoint: str


def _unwrap(body: bytes, key: rsa.RSAPrivateKey) -> rsa.RSAPrivateKey:
    try:
        envelope: Any = json.loads(body)
        ciphertext = b64url_decode(str(envelope["ciphertext"]))
        algorithm = envelope.get("alg")
    except (ValueError, KeyError, TypeError, JwkError) as exc:
        raise KeyReleaseResponseError(f"the node agent's answer is not an envelope: {exc}") from exc
    if algorithm != ALGORITHM:
        raise KeyReleaseResponseError(f"the node agent wrapped the key with {algorithm!r}")
    split = key.key_size // 8
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    try:
        transfer = key.decrypt(ciphertext[:split], oaep)
        pkcs8 = aes_key_unwrap_with_padding(transfer, ciphertext[split:])
        released = serialization.load_der_private_key(pkcs8, password=None)
    except (ValueError, InvalidUnwrap, TypeError) as exc:
        raise KeyReleaseResponseError("the released key does not open with this pod's key") from exc
    finally:
        transfer = pkcs8 = b""
    if not isinstance(released, rsa.RSAPrivateKey):
        raise KeyReleaseResponseError("the released key is not an RSA private key")
    return released


class NodeAgentClient:
    """Releases model keys through this node's Veil node agent."""

    def __init__(
        self,
        agent_url: str,
        token_path: Path = DEFAULT_TOKEN_PATH,
        *,
        retry: RetryPolicy | None = None,
        timeout_seconds: float = 120.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        parts = urlsplit(agent_url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"node agent URL {agent_url!r} must be an http(s) URL")
        self._url = agent_url.rstrip("/") + "/v1/release"
        self._attest_url = agent_url.rstrip("/") + "/v1/attest"
        self._token_path = token_path
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._sleep = sleep

    def _token(self) -> str:
        # Read on every attempt: the kubelet rotates the projected token.
        try:
            return self._token_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KeyReleaseError(f"cannot read the token {self._token_path}: {exc}") from exc

    async def _attempt(
        self, session: aiohttp.ClientSession, target: NodeAgentTarget, jwk: dict[str, str]
    ) -> bytes:
        body = {
            "vault_url": target.vault_url,
            "key_name": target.key_name,
            "key_version": target.key_version,
            "maa_endpoint": target.maa_endpoint,
            "wrapping_key": jwk,
        }
        headers = {"Authorization": f"Bearer {self._token()}"}
        try:
            async with session.post(self._url, json=body, headers=headers) as response:
                payload = await response.content.read(MAX_RESPONSE_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetriableError(f"cannot reach the node agent at {self._url}: {exc!r}") from exc
        if status == 200:
            return payload
        if status in _RETRIABLE:
            raise RetriableError(f"the node agent answered HTTP {status}: {error_reason(payload)}")
        raise KeyReleaseRefusedError(status, error_reason(payload), target.key_name)

    async def release(self, target: NodeAgentTarget) -> rsa.RSAPrivateKey:
        """The model key; raises a KeyReleaseError subclass on failure."""
        # A fresh wrapping key per release, in memory only (key generation runs off the loop).
        wrapping = await asyncio.to_thread(
            rsa.generate_private_key, public_exponent=65537, key_size=WRAPPING_KEY_BITS
        )
        jwk = rsa_public_jwk(wrapping.public_key())
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            try:
                body = await with_retries(
                    lambda: self._attempt(session, target, jwk),
                    self._retry,
                    sleep=self._sleep,
                    what=f"key release of {target.key_name!r} by the node agent",
                )
            except RetriesExhaustedError as exc:
                raise KeyReleaseUnavailableError(
                    f"key release of {target.key_name!r} failed after {self._retry.attempts} "
                    f"attempts; last problem: {exc}"
                ) from exc
            except KeyReleaseRefusedError as exc:
                log.error(
                    "KEY RELEASE REFUSED by the node agent (HTTP %d): %s", exc.status, exc.reason
                )
                raise
        log.info("key %s released by the node agent", target.key_name)
        return _unwrap(body, wrapping)

    async def _attest_attempt(self, session: aiohttp.ClientSession, body: dict[str, Any]) -> str:
        headers = {"Authorization": f"Bearer {self._token()}"}
        try:
            async with session.post(self._attest_url, json=body, headers=headers) as response:
                payload = await response.content.read(MAX_RESPONSE_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetriableError(
                f"cannot reach the node agent at {self._attest_url}: {exc!r}"
            ) from exc
        if status in _RETRIABLE:
            raise RetriableError(f"the node agent answered HTTP {status}: {error_reason(payload)}")
        if status != 200:
            raise KeyReleaseRefusedError(status, error_reason(payload), "the channel key")
        try:
            token = json.loads(payload)["token"]
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyReleaseResponseError("the node agent's answer holds no token") from exc
        return str(token)

    async def attest(self, target: NodeAgentTarget, runtime_data: dict[str, Any]) -> str:
        """An MAA token of this node carrying `runtime_data` (the channel key, a nonce) in its
        `x-ms-runtime.client-payload`, with the pod and model the agent vouches for."""
        body = {
            "vault_url": target.vault_url,
            "key_name": target.key_name,
            "maa_endpoint": target.maa_endpoint,
            "runtime_data": runtime_data,
        }
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            try:
                return await with_retries(
                    lambda: self._attest_attempt(session, body),
                    self._retry,
                    sleep=self._sleep,
                    what="attestation of the channel key by the node agent",
                )
            except RetriesExhaustedError as exc:
                raise KeyReleaseUnavailableError(
                    f"attestation by the node agent failed after {self._retry.attempts} "
                    f"attempts; last problem: {exc}"
                ) from exc


def node_agent_loader(
    sealed: Path,
    client: NodeAgentClient,
    target: NodeAgentTarget,
    *,
    name: str,
    version: str = "1",
    max_model_bytes: int | None = None,
    pin: SealedPin | None = None,
) -> ModelLoader:
    """Confidential-VM path: the node agent releases the key version the sealed header names
    after attesting the node, and only for the sealed file the spec pins."""

    async def release() -> rsa.RSAPrivateKey:
        vault_host = urlsplit(target.vault_url).netloc
        named = await verified_release_target(
            sealed, ReleaseTarget(target.maa_endpoint, vault_host, target.key_name), pin
        )
        key_name, _, key_version = named.kid.partition("/")
        if not key_version:
            raise SealedModelError(
                f"the sealed header of {sealed} names no version of key {key_name!r}: re-seal "
                f"with veil seal --vault-url {target.vault_url} --key-name {key_name}"
            )
        return await client.release(dataclasses.replace(target, key_version=key_version))

    return released_key_loader(
        sealed, release, name=name, version=version, max_model_bytes=max_model_bytes
    )
