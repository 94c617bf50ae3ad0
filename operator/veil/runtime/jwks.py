"""Signing keys of pinned attestation issuers, discovered via OpenID configuration and cached.

Keys always come from `{issuer}/.well-known/openid-configuration` → `jwks_uri` of an issuer the
relying party pinned, never from a URL the token itself names (`jku`, `x5u`). MAA publishes its
keys as `x5c` certificates without `n`/`e`; both forms are read, and a certificate is used only
while valid, with a key of at least 2048 bits, each certificate of a chain issued by the next.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.runtime.jwk import MIN_RSA_BITS, JwkError, rsa_public_key_from_jwk

log = logging.getLogger("veil.runtime.jwks")

JsonFetcher = Callable[[str], Awaitable[Any]]
"""Fetches a URL and returns its parsed JSON body; raises on any failure."""

MAX_DOCUMENT_BYTES = 1024 * 1024


class SigningKeyError(Exception):
    """The issuer's signing key for a token cannot be found or used."""


def is_loopback_host(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_issuer(issuer: str, *, allow_insecure_loopback: bool = False) -> str:
    """Check an issuer URL (https, or http on loopback when allowed) and drop a trailing slash."""
    parts = urlsplit(issuer)
    insecure_ok = (
        allow_insecure_loopback and parts.scheme == "http" and is_loopback_host(parts.hostname)
    )
    if not (parts.scheme == "https" or insecure_ok) or not parts.netloc:
        raise ValueError(
            f"issuer {issuer!r} must be an https URL"
            + (" (or http on a loopback address)" if allow_insecure_loopback else "")
        )
    if parts.query or parts.fragment:
        raise ValueError(f"issuer {issuer!r} must not carry a query or fragment")
    return issuer.rstrip("/")


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


class AiohttpJsonFetcher:
    """Default fetcher: GET with a timeout and a size cap, JSON body required."""

    def __init__(self, *, timeout_seconds: float = 10.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def __call__(self, url: str) -> Any:
        async with (
            aiohttp.ClientSession(timeout=self._timeout) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise SigningKeyError(f"GET {url} answered HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body.extend(chunk)
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise SigningKeyError(
                        f"GET {url} returned more than {MAX_DOCUMENT_BYTES} bytes"
                    )
        try:
            return json.loads(bytes(body))
        except ValueError as exc:
            raise SigningKeyError(f"GET {url} did not return JSON") from exc


def _certificate(text: Any, index: int) -> x509.Certificate:
    if not isinstance(text, str):
        raise JwkError(f"x5c[{index}] is not a base64 string")
    try:
        return x509.load_der_x509_certificate(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise JwkError(f"x5c[{index}] is not a DER certificate: {exc}") from exc


def _check_validity(certificate: x509.Certificate, index: int, now: datetime) -> None:
    if now < certificate.not_valid_before_utc:
        raise JwkError(
            f"x5c[{index}] is not valid before {certificate.not_valid_before_utc.isoformat()}"
        )
    if now > certificate.not_valid_after_utc:
        raise JwkError(f"x5c[{index}] expired at {certificate.not_valid_after_utc.isoformat()}")


def _key_from_x5c(chain: Any, now: datetime) -> rsa.RSAPublicKey:
    """The RSA key of x5c[0], once every certificate of the chain is valid at `now`, the key is
    at least MIN_RSA_BITS, and each certificate is issued (name and signature) by the next one,
    where the issuer publishes a chain. (A single self-issued certificate, as MAA publishes,
    proves nothing beyond the key: trust comes from the pinned issuer's TLS-served JWKS.)"""
    if not isinstance(chain, list) or not chain:
        raise JwkError("x5c must be a non-empty list of base64 certificates")
    certificates = [_certificate(text, index) for index, text in enumerate(chain)]
    for index, certificate in enumerate(certificates):
        _check_validity(certificate, index, now)
    for index, (child, parent) in enumerate(itertools.pairwise(certificates)):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise JwkError(
                f"x5c[{index}] is not issued by x5c[{index + 1}]: {exc or 'bad signature'}"
            ) from exc
    key = certificates[0].public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise JwkError("the x5c certificate does not hold an RSA key")
    if key.key_size < MIN_RSA_BITS:
        raise JwkError(f"the x5c key of {key.key_size} bits is below the minimum {MIN_RSA_BITS}")
    return key


def _same_key(a: rsa.RSAPublicKey, b: rsa.RSAPublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


def read_jwks(
    document: Any, now: datetime | None = None
) -> tuple[dict[str, rsa.RSAPublicKey], dict[str, str]]:
    """RS256-capable RSA keys of a JWKS document by kid, and why each unusable one was refused
    (by kid). With both n/e and x5c, the certificate is checked and must hold the same key."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise SigningKeyError("the JWKS document has no 'keys' list")
    moment = now or datetime.now(UTC)
    keys: dict[str, rsa.RSAPublicKey] = {}
    refused: dict[str, str] = {}
    for entry in document["keys"]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", "RS256") != "RS256":
            continue
        kid = entry["kid"]
        try:
            key: rsa.RSAPublicKey | None = None
            if "n" in entry and "e" in entry:
                key = rsa_public_key_from_jwk(entry)
            if entry.get("kty") == "RSA" and "x5c" in entry:
                certified = _key_from_x5c(entry["x5c"], moment)
                if key is not None and not _same_key(key, certified):
                    raise JwkError("n/e and the x5c certificate hold different keys")
                key = certified
            if key is not None:
                keys[kid] = key
        except JwkError as exc:
            log.warning("skipping JWKS key %r: %s", kid, exc)
            refused[kid] = str(exc)
    return keys, refused


def parse_jwks(document: Any, now: datetime | None = None) -> dict[str, rsa.RSAPublicKey]:
    """RS256-capable RSA keys of a JWKS document, by kid; unusable entries are skipped."""
    return read_jwks(document, now)[0]


@dataclass
class _CachedKeys:
    keys: dict[str, rsa.RSAPublicKey]
    fetched_at: float
    refused: dict[str, str] = field(default_factory=dict)


class IssuerKeys:
    """Per-issuer JWKS cache.

    Refreshed after `ttl_seconds`, or on an unknown kid at most once every
    `refresh_cooldown_seconds` (so forged kids cannot make us hammer the issuer).
    """

    def __init__(
        self,
        fetcher: JsonFetcher | None = None,
        *,
        ttl_seconds: float = 3600.0,
        refresh_cooldown_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetcher or AiohttpJsonFetcher()
        self._wall_clock = wall_clock
        self._ttl = ttl_seconds
        self._cooldown = refresh_cooldown_seconds
        self._clock = clock
        self._cache: dict[str, _CachedKeys] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _download(self, issuer: str) -> _CachedKeys:
        config_url = f"{issuer}/.well-known/openid-configuration"
        try:
            config = await self._fetch(config_url)
        except SigningKeyError:
            raise
        except Exception as exc:
            raise SigningKeyError(f"cannot fetch {config_url}: {exc!r}") from exc
        if not isinstance(config, Mapping) or not isinstance(config.get("jwks_uri"), str):
            raise SigningKeyError(f"{config_url} names no jwks_uri")
        declared = config.get("issuer")
        if isinstance(declared, str) and declared.rstrip("/") != issuer:
            raise SigningKeyError(f"{config_url} declares issuer {declared!r}, not {issuer!r}")
        jwks_uri = config["jwks_uri"]
        if not _same_origin(jwks_uri, issuer):
            raise SigningKeyError(f"jwks_uri {jwks_uri!r} is not on the issuer's origin {issuer}")
        try:
            document = await self._fetch(jwks_uri)
        except SigningKeyError:
            raise
        except Exception as exc:
            raise SigningKeyError(f"cannot fetch {jwks_uri}: {exc!r}") from exc
        keys, refused = read_jwks(document, datetime.fromtimestamp(self._wall_clock(), UTC))
        return _CachedKeys(keys, self._clock(), refused)

    def _should_refresh(self, cached: _CachedKeys, kid: str, now: float) -> bool:
        age = now - cached.fetched_at
        return age >= self._ttl or (kid not in cached.keys and age >= self._cooldown)

    async def key_for(self, issuer: str, kid: str) -> rsa.RSAPublicKey:
        """The signing key `kid` of the (already pinned and normalized) `issuer`."""
        lock = self._locks.setdefault(issuer, asyncio.Lock())
        async with lock:
            now = self._clock()
            cached = self._cache.get(issuer)
            if cached is None or self._should_refresh(cached, kid, now):
                cached = await self._download(issuer)
                cached.fetched_at = now
                self._cache[issuer] = cached
            key = cached.keys.get(kid)
        if key is None and kid in cached.refused:
            raise SigningKeyError(
                f"issuer {issuer}'s signing key {kid!r} is refused: {cached.refused[kid]}"
            )
        if key is None:
            raise SigningKeyError(
                f"issuer {issuer} publishes no RS256 signing key with kid {kid!r}"
            )
        return key
