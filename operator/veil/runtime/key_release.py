"""Client of the Secure Key Release sidecar (microsoft/confidential-sidecar-containers `skr`).

The sidecar attests the TEE to Microsoft Azure Attestation, presents the token to Key Vault and
returns the released key as a private JWK:

    POST {sidecar}/key/release  {"maa_endpoint", "akv_endpoint", "kid", "access_token"?}
      200 {"key": <JWK, as a JSON string or object>}
      400/403 {"error": "<why>"}

Transport failures and 5xx/429 answers are retried with bounded exponential backoff (the sidecar
may start after us). A refusal (400/403) is final for this process: it is logged in one clear
line and raised, so the pod restarts with Kubernetes' own backoff and the reason shows in its logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.http_errors import error_reason
from veil.runtime.jwk import JwkError, rsa_private_key_from_jwk
from veil.runtime.metrics import RuntimeMetrics

log = logging.getLogger("veil.runtime.key_release")
T = TypeVar("T")

MAX_RESPONSE_BYTES = 256 * 1024
_RETRIABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class KeyReleaseError(Exception):
    """The key could not be released; the message says why."""


class KeyReleaseRefusedError(KeyReleaseError):
    """The sidecar answered 400/403: attestation or Key Vault's release policy said no."""

    def __init__(self, status: int, reason: str, kid: str) -> None:
        super().__init__(f"key release of {kid!r} was refused (HTTP {status}): {reason}")
        self.status = status
        self.reason = reason


class KeyReleaseUnavailableError(KeyReleaseError):
    """The sidecar could not be reached, or kept failing, for every attempt."""


class KeyReleaseResponseError(KeyReleaseError):
    """The sidecar answered 200 but not with a usable RSA private key."""


@dataclass(frozen=True)
class ReleaseTarget:
    """Which key to release, from which vault, attested by which MAA instance."""

    maa_endpoint: str
    akv_endpoint: str
    kid: str
    access_token: str | None = field(default=None, repr=False)

    def body(self) -> dict[str, str]:
        payload = {
            "maa_endpoint": self.maa_endpoint,
            "akv_endpoint": self.akv_endpoint,
            "kid": self.kid,
        }
        if self.access_token:
            payload["access_token"] = self.access_token
        return payload


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter."""

    attempts: int = 6
    initial_delay: float = 0.5
    max_delay: float = 10.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")
        if self.initial_delay < 0 or self.max_delay < self.initial_delay or self.multiplier < 1:
            raise ValueError("retry delays must be non-negative, capped, and non-shrinking")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The pause before each retry (attempts - 1 values)."""
        chooser = rng or random.Random()
        ceiling = self.initial_delay
        for _ in range(self.attempts - 1):
            yield chooser.uniform(ceiling / 2, ceiling)
            ceiling = min(self.max_delay, ceiling * self.multiplier)


class RetriableError(Exception):
    """A transient failure (unreachable, 5xx, 429): worth another attempt after a pause."""


class RetriesExhaustedError(Exception):
    """Every attempt failed transiently; the message is the last problem."""


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]],
    what: str,
) -> T:
    """Run `attempt` until it returns, raises anything but RetriableError, or the policy's
    attempts are spent (RetriesExhaustedError). The sidecar, node-agent and CDH clients share
    this loop; each turns exhaustion into its own error."""
    delays = policy.delays()
    problem = ""
    for number in range(1, policy.attempts + 1):
        try:
            return await attempt()
        except RetriableError as exc:
            problem = str(exc)
        if number < policy.attempts:
            delay = next(delays)
            log.warning(
                "%s: attempt %d/%d failed, retrying in %.1fs: %s",
                what,
                number,
                policy.attempts,
                delay,
                problem,
            )
            await sleep(delay)
    raise RetriesExhaustedError(problem)


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        total += len(chunk)
        if total > limit:
            raise KeyReleaseResponseError("the sidecar's answer is larger than any JWK")
        chunks.append(chunk)
    return b"".join(chunks)


def _key_from_response(body: bytes) -> rsa.RSAPrivateKey:
    try:
        parsed: Any = json.loads(body)
    except ValueError as exc:
        raise KeyReleaseResponseError("the sidecar's answer is not JSON") from exc
    if not isinstance(parsed, dict) or "key" not in parsed:
        raise KeyReleaseResponseError("the sidecar's answer has no 'key' member")
    jwk = parsed.pop("key")
    del parsed
    if not isinstance(jwk, str | dict):
        raise KeyReleaseResponseError(
            "the released 'key' is neither a JWK object nor a JSON string"
        )
    try:
        return rsa_private_key_from_jwk(jwk)
    except JwkError as exc:
        raise KeyReleaseResponseError(f"the released key is not a usable RSA key: {exc}") from exc
    finally:
        del jwk


class KeyReleaseClient:
    """Releases the model key through the SKR sidecar and returns it as an RSA private key."""

    def __init__(
        self,
        sidecar_url: str,
        *,
        retry: RetryPolicy | None = None,
        timeout_seconds: float = 60.0,
        metrics: RuntimeMetrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        parts = urlsplit(sidecar_url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"sidecar URL {sidecar_url!r} must be an http(s) URL")
        self._url = sidecar_url.rstrip("/") + "/key/release"
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._metrics = metrics
        self._sleep = sleep

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.key_release.labels(outcome=outcome).inc()

    async def _attempt(self, session: aiohttp.ClientSession, target: ReleaseTarget) -> bytes:
        try:
            async with session.post(self._url, json=target.body()) as response:
                body = await _read_limited(response, MAX_RESPONSE_BYTES)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetriableError(f"cannot reach the SKR sidecar at {self._url}: {exc!r}") from exc
        if status == 200:
            return body
        reason = error_reason(body, 500)
        if status in _RETRIABLE_STATUS:
            raise RetriableError(f"the SKR sidecar answered HTTP {status}: {reason}")
        raise KeyReleaseRefusedError(status, reason, target.kid)

    async def release(self, target: ReleaseTarget) -> rsa.RSAPrivateKey:
        """Release the key named by `target`; raises a KeyReleaseError subclass on failure."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            try:
                body = await with_retries(
                    lambda: self._attempt(session, target),
                    self._retry,
                    sleep=self._sleep,
                    what=f"key release of {target.kid!r}",
                )
            except RetriesExhaustedError as exc:
                self._count("error")
                raise KeyReleaseUnavailableError(
                    f"key release of {target.kid!r} failed after {self._retry.attempts} "
                    f"attempts; last problem: {exc}"
                ) from exc
            except KeyReleaseRefusedError as exc:
                self._count("refused")
                log.error(
                    "KEY RELEASE REFUSED for key %r (vault %s, attestation %s), HTTP %d: %s",
                    target.kid,
                    target.akv_endpoint,
                    target.maa_endpoint,
                    exc.status,
                    exc.reason,
                )
                raise
            except KeyReleaseError:
                self._count("error")
                raise
        try:
            key = _key_from_response(body)
        except KeyReleaseError:
            self._count("error")
            raise
        finally:
            del body
        self._count("released")
        log.info("key %r released by the SKR sidecar", target.kid)
        return key
