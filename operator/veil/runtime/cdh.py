"""Client of the guest's Confidential Data Hub (confidential-containers/guest-components), for pods
on a Confidential Containers runtime class.

The CDH's REST front end (api-server-rest) listens inside the TEE on 127.0.0.1:8006:

    GET /cdh/resource/<repository>/<type>/<tag>
      200  the resource bytes, which Trustee's KBS released after attesting this guest
      500  any failure of the CDH or the KBS behind it (attestation refused, resource policy
           said no, unknown resource, KBS unreachable): the body says which, in free text
      403  the caller is not on loopback; 404 an unknown API; 405 a method other than GET

Because the CDH folds refusals and outages into one 500, this client retries 500 (and transport
errors, 502-504, 429) with bounded backoff and then raises CdhUnavailableError carrying the
CDH's last reason; 403/404/405 are final (the pod is misconfigured). The released resource must
be the model's RSA private key, as PEM or as a private JWK.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlsplit

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.runtime.jwk import MIN_RSA_BITS, JwkError, rsa_private_key_from_jwk
from veil.runtime.key_release import (
    RetriableError,
    RetriesExhaustedError,
    RetryPolicy,
    with_retries,
)
from veil.runtime.loader import ModelLoader, SealedPin, released_key_loader
from veil.runtime.sealed_key import check_sealed_file

log = logging.getLogger("veil.runtime.cdh")

DEFAULT_CDH_URL: Final = "http://127.0.0.1:8006"
MAX_RESOURCE_BYTES: Final = 256 * 1024
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_RETRIABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class CdhError(Exception):
    """The resource could not be had from the CDH; the message says why."""


class CdhRefusedError(CdhError):
    """The CDH's front end refused the request itself (403, 404, 405): a configuration error."""

    def __init__(self, status: int, reason: str, resource: str) -> None:
        super().__init__(f"the CDH refused {resource!r} (HTTP {status}): {reason}")
        self.status = status


class CdhUnavailableError(CdhError):
    """Every attempt failed: the CDH, attestation or the KBS said no or could not be reached."""


class CdhResponseError(CdhError):
    """The CDH answered 200 but not with a usable RSA private key."""


def resource_path(resource: str) -> str:
    """`repo/type/tag` from `kbs:///repo/type/tag` or `repo/type/tag`; raises ValueError."""
    path = resource
    if resource.startswith("kbs:"):
        parts = urlsplit(resource)
        if parts.scheme != "kbs" or parts.netloc or parts.query or parts.fragment:
            raise ValueError(
                f"resource {resource!r}: use kbs:///<repo>/<type>/<tag> (the CDH picks the KBS)"
            )
        path = parts.path.removeprefix("/")
    segments = path.split("/")
    if len(segments) != 3 or not all(
        _SEGMENT.fullmatch(s) and s not in {".", ".."} for s in segments
    ):
        raise ValueError(f"resource {resource!r} is not <repo>/<type>/<tag>")
    return path


def private_key_from_resource(data: bytes) -> rsa.RSAPrivateKey:
    """The RSA private key a released resource holds, as PEM or as a private JWK."""
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(stripped, password=None)
        except (ValueError, TypeError) as exc:
            raise CdhResponseError(f"the released PEM is not a private key: {exc}") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CdhResponseError(f"the released key is a {type(key).__name__}, not RSA")
        if key.key_size < MIN_RSA_BITS:
            raise CdhResponseError(f"the released RSA key has only {key.key_size} bits")
        return key
    try:
        return rsa_private_key_from_jwk(stripped)
    except JwkError as exc:
        raise CdhResponseError(f"the released resource is no RSA private key: {exc}") from exc


class CdhClient:
    """Fetches KBS resources through the CDH's REST API."""

    def __init__(
        self,
        url: str = DEFAULT_CDH_URL,
        *,
        retry: RetryPolicy | None = None,
        timeout_seconds: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"CDH URL {url!r} must be http://<loopback>:<port>")
        self._base = url.rstrip("/") + "/cdh/resource/"
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._sleep = sleep

    async def _attempt(self, session: aiohttp.ClientSession, url: str, resource: str) -> bytes:
        try:
            async with session.get(url, allow_redirects=False) as response:
                body = await response.content.read(MAX_RESOURCE_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetriableError(f"cannot reach the CDH at {url}: {exc!r}") from exc
        if status == 200:
            if len(body) > MAX_RESOURCE_BYTES:
                raise CdhResponseError("the released resource is larger than any key")
            return body
        reason = body[:500].decode("utf-8", errors="replace").strip() or "no reason given"
        if status in _RETRIABLE_STATUS:
            raise RetriableError(f"the CDH answered HTTP {status}: {reason}")
        raise CdhRefusedError(status, reason, resource)

    async def resource(self, resource: str) -> bytes:
        """The bytes of `resource`; raises a CdhError subclass (ValueError for a bad name)."""
        path = resource_path(resource)
        url = self._base + "/".join(quote(s, safe="") for s in path.split("/"))
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            try:
                return await with_retries(
                    lambda: self._attempt(session, url, path),
                    self._retry,
                    sleep=self._sleep,
                    what=f"CDH resource {path}",
                )
            except RetriesExhaustedError as exc:
                raise CdhUnavailableError(
                    f"resource {path!r} not released after {self._retry.attempts} attempts; "
                    f"last problem: {exc}"
                ) from exc

    async def private_key(self, resource: str) -> rsa.RSAPrivateKey:
        """The RSA private key `resource` holds."""
        data = await self.resource(resource)
        try:
            key = private_key_from_resource(data)
        finally:
            del data
        log.info("model key released by the CDH from %s", resource_path(resource))
        return key


def cdh_loader(
    sealed: Path,
    client: CdhClient,
    resource: str,
    *,
    name: str,
    version: str = "1",
    max_model_bytes: int | None = None,
    pin: SealedPin | None = None,
) -> ModelLoader:
    """Confidential Containers path: the CDH releases the key after the guest attests to KBS;
    with `pin`, only once the sealed file is the one the spec names (checked first)."""
    resource_path(resource)  # a bad name fails at start-up, not in the background task

    async def release() -> rsa.RSAPrivateKey:
        if pin is not None:
            await asyncio.to_thread(check_sealed_file, sealed, pin.sha256, pin.max_bytes)
        return await client.private_key(resource)

    return released_key_loader(
        sealed, release, name=name, version=version, max_model_bytes=max_model_bytes
    )
