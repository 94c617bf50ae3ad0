"""The node agent's HTTP API, served on the node's address to the model pods of this node.

    POST /v1/release
      Authorization: Bearer <projected ServiceAccount token, audience "veil-node-agent">
      {"vault_url", "key_name", "key_version", "maa_endpoint",
       "wrapping_key": <RSA public JWK, at least 3072 bits, made by the pod in memory>}
      200 {"kid", "alg": "RSA-OAEP-256+A256KWP", "wrapping_key_sha256", "ciphertext"}
      400 bad body | 401 no or invalid token | 403 not allowed (one line why)
      502 MAA or Key Vault refused | 503 MAA, Key Vault, the TPM or the API server unavailable
    POST /v1/attest
      Authorization: Bearer <the same projected ServiceAccount token>
      {"vault_url", "key_name", "maa_endpoint",
       "runtime_data": {"veil-channel-key": <X25519 OKP JWK made by the pod>, "nonce"?}}
      200 {"token": <an MAA token of this node whose x-ms-runtime.client-payload is the runtime
                     data plus "veil-pod": "<namespace>/<pod>" and "veil-model":
                     "<namespace>/<model>", as this agent authorized them>}
      the same refusals as /v1/release. The pod's channel key is thereby bound to the node's
      attestation (and to the pod and model the agent vouches for).
    GET  /healthz   200 "ok"

Every error is `{"error": "<why>"}`. The released key exists in this process only between the
TPM's unwrap and the re-wrap to the pod's key; it is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.node_agent.authz import (
    ForbiddenError,
    KubeUnavailableError,
    PodAuthorizer,
    ReleaseAsk,
    UnauthenticatedError,
)
from veil.node_agent.guest_attestation import AttestationError, TokenCache, maa_base_url
from veil.node_agent.release import KeyVaultReleaser, ReleaseError, wrap_for_pod
from veil.runtime.channel import ChannelError, ChannelPublicKey
from veil.runtime.jwk import JwkError, rsa_public_key_from_jwk

log = logging.getLogger("veil.node_agent")

MIN_WRAPPING_KEY_BITS = 3072
MAX_BODY_BYTES = 64 * 1024
_KEY_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_KEY_VERSION = re.compile(r"^[0-9a-fA-F]{32}$")
_NONCE = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
CHANNEL_KEY = "veil-channel-key"


class BadRequestError(ValueError):
    pass


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@dataclass(frozen=True)
class ParsedRequest:
    ask: ReleaseAsk
    key_version: str
    wrapping_key: rsa.RSAPublicKey


def parse_request(body: Any) -> ParsedRequest:
    if not isinstance(body, dict):
        raise BadRequestError("the body is not a JSON object")
    fields = {k: body.get(k) for k in ("vault_url", "key_name", "key_version", "maa_endpoint")}
    missing = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if missing:
        raise BadRequestError(f"missing {', '.join(missing)}")
    vault_url, key_name, version, maa = (str(v) for v in fields.values())
    if not vault_url.startswith("https://"):
        raise BadRequestError("vault_url must be an https URL")
    if not _KEY_NAME.fullmatch(key_name) or not _KEY_VERSION.fullmatch(version):
        raise BadRequestError("key_name or key_version is not a Key Vault name / version")
    try:
        maa_base_url(maa)
        wrapping_key = rsa_public_key_from_jwk(body.get("wrapping_key") or {})
    except (ValueError, JwkError) as exc:
        raise BadRequestError(str(exc)) from exc
    if wrapping_key.key_size < MIN_WRAPPING_KEY_BITS:
        raise BadRequestError(f"wrapping_key must be at least {MIN_WRAPPING_KEY_BITS} bits")
    return ParsedRequest(ReleaseAsk(vault_url, key_name, maa), version, wrapping_key)


def parse_attest_request(body: Any) -> tuple[ReleaseAsk, dict[str, Any]]:
    """The authorization ask and the pod's runtime data (its channel key, and a nonce)."""
    if not isinstance(body, dict):
        raise BadRequestError("the body is not a JSON object")
    fields = {k: body.get(k) for k in ("vault_url", "key_name", "maa_endpoint")}
    missing = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if missing:
        raise BadRequestError(f"missing {', '.join(missing)}")
    vault_url, key_name, maa = (str(v) for v in fields.values())
    if not vault_url.startswith("https://") or not _KEY_NAME.fullmatch(key_name):
        raise BadRequestError("vault_url or key_name is not a Key Vault URL / name")
    data = body.get("runtime_data")
    if not isinstance(data, dict) or set(data) - {CHANNEL_KEY, "nonce"}:
        raise BadRequestError(f"runtime_data holds only {CHANNEL_KEY!r} and 'nonce'")
    try:
        maa_base_url(maa)
        key = ChannelPublicKey.from_jwk(data.get(CHANNEL_KEY))
    except (ValueError, ChannelError) as exc:
        raise BadRequestError(str(exc)) from exc
    nonce = data.get("nonce")
    if nonce is not None and (not isinstance(nonce, str) or not _NONCE.fullmatch(nonce)):
        raise BadRequestError("the nonce must be 8 to 128 characters of base64url")
    runtime_data: dict[str, Any] = {CHANNEL_KEY: key.jwk()}
    if nonce is not None:
        runtime_data["nonce"] = nonce
    return ReleaseAsk(vault_url, key_name, maa), runtime_data


@dataclass
class NodeAgent:
    authorizer: PodAuthorizer
    tokens: TokenCache
    releaser: KeyVaultReleaser

    async def _release(self, request: web.Request) -> web.Response:  # noqa: PLR0911
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            return _error(401, "a bearer ServiceAccount token is required")
        try:
            parsed = parse_request(await request.json())
        except (ValueError, BadRequestError) as exc:
            return _error(400, f"bad request: {exc}")
        try:
            grant = await asyncio.to_thread(
                self.authorizer.authorize, header[7:].strip(), parsed.ask, request.remote
            )
        except UnauthenticatedError as exc:
            log.warning("release refused (401): %s", exc)
            return _error(401, f"not authenticated: {exc}")
        except ForbiddenError as exc:
            log.warning("release refused (403): %s", exc)
            return _error(403, str(exc))
        except KubeUnavailableError as exc:
            log.error("release failed (503): %s", exc)
            return _error(503, str(exc))
        where = f"pod {grant.namespace}/{grant.pod} (model {grant.model})"
        try:
            attested = await self.tokens.token(parsed.ask.maa_endpoint)
            released = await self.releaser.release(
                parsed.ask.vault_url, parsed.ask.key_name, parsed.key_version, attested
            )
        except (AttestationError, ReleaseError) as exc:
            status = 503 if exc.retriable else 502
            log.error(
                "release of key %s for %s failed (%d): %s", parsed.ask.key_name, where, status, exc
            )
            return _error(status, str(exc))
        try:
            envelope = wrap_for_pod(released, parsed.wrapping_key)
        finally:
            del released
        log.info("key %s/%s released to %s", parsed.ask.key_name, parsed.key_version, where)
        return web.json_response(envelope)

    async def _attest(self, request: web.Request) -> web.Response:  # noqa: PLR0911
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            return _error(401, "a bearer ServiceAccount token is required")
        try:
            ask, runtime_data = parse_attest_request(await request.json())
        except (ValueError, BadRequestError) as exc:
            return _error(400, f"bad request: {exc}")
        try:
            grant = await asyncio.to_thread(
                self.authorizer.authorize, header[7:].strip(), ask, request.remote
            )
        except UnauthenticatedError as exc:
            return _error(401, f"not authenticated: {exc}")
        except ForbiddenError as exc:
            log.warning("attestation refused (403): %s", exc)
            return _error(403, str(exc))
        except KubeUnavailableError as exc:
            return _error(503, str(exc))
        payload = {
            **runtime_data,
            "veil-pod": f"{grant.namespace}/{grant.pod}",
            "veil-model": f"{grant.namespace}/{grant.model}",
        }
        try:
            token = await self.tokens.fresh(ask.maa_endpoint, payload)
        except AttestationError as exc:
            status = 503 if exc.retriable else 502
            log.error("attesting the channel key of pod %s failed: %s", payload["veil-pod"], exc)
            return _error(status, str(exc))
        log.info("channel key of pod %s attested", payload["veil-pod"])
        return web.json_response({"token": token})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/release", self._release)
        app.router.add_post("/v1/attest", self._attest)
        app.router.add_get("/healthz", self._healthz)
        return app
