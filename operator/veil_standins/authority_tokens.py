"""How the Key Vault stand-in checks an attestation token before it reads a release policy.

Part of the LOCAL STAND-INS, not a security boundary. Like Key Vault, it only believes a token
that the authority named in the key's release policy signed: the token's `iss` must be one of
the policy's authorities, the signing key (by the header's `kid`) comes from that authority's
own OpenID configuration and JWKS, fetched over verified HTTPS (never from the token's `jku`),
and the signature (RS256 only), `exp` and `nbf` must hold.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from veil_standins.jose import rsa_public_key_from_jwk, rsa_public_key_from_x5c
from veil_standins.release_policy import normalize_authority

LEEWAY_SECONDS = 60
MAX_DOCUMENT_BYTES = 1024 * 1024


class TokenRefusedError(Exception):
    """The token is not one the policy's authority issued, or no longer valid."""


class MalformedTokenError(TokenRefusedError):
    """The token is not a JWT at all."""


class AuthorityUnavailableError(Exception):
    """The authority's signing keys could not be fetched."""


class AuthorityKeys:
    """Fetches an authority's signing keys; `ssl_context` says which CAs to trust."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        self._ssl: ssl.SSLContext | bool = ssl_context or True
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _get_json(self, session: aiohttp.ClientSession, url: str) -> Any:
        try:
            async with session.get(url, ssl=self._ssl, allow_redirects=False) as response:
                if response.status != 200:
                    raise AuthorityUnavailableError(f"GET {url} answered HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body.extend(chunk)
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise AuthorityUnavailableError(f"GET {url} returned too much")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AuthorityUnavailableError(f"cannot GET {url}: {exc}") from exc
        try:
            return json.loads(bytes(body))
        except ValueError as exc:
            raise AuthorityUnavailableError(f"GET {url} did not return JSON") from exc

    async def signing_key(self, authority: str, kid: str) -> rsa.RSAPublicKey:
        """The key `kid` that `authority` publishes through its OpenID configuration."""
        base = authority.rstrip("/")
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            config = await self._get_json(session, f"{base}/.well-known/openid-configuration")
            jwks_uri = config.get("jwks_uri") if isinstance(config, Mapping) else None
            if not isinstance(jwks_uri, str):
                raise AuthorityUnavailableError(f"{base} publishes no jwks_uri")
            # Keys only from the authority's own origin, whatever its configuration says.
            if urlsplit(jwks_uri)[:2] != urlsplit(base)[:2]:
                raise AuthorityUnavailableError(f"{base} names keys on another origin")
            document = await self._get_json(session, jwks_uri)
        keys = document.get("keys") if isinstance(document, Mapping) else None
        for entry in keys if isinstance(keys, list) else []:
            if not isinstance(entry, Mapping) or entry.get("kid") != kid:
                continue
            try:
                if "n" in entry:
                    return rsa_public_key_from_jwk(entry)
                return rsa_public_key_from_x5c(entry.get("x5c"))
            except ValueError as exc:
                raise TokenRefusedError(f"the authority's key {kid!r} is unusable: {exc}") from exc
        raise TokenRefusedError(f"the authority {base} publishes no signing key {kid!r}")

    async def verify(self, token: str, policy_authorities: Sequence[str]) -> dict[str, Any]:
        """The token's claims, once it is shown to come from one of `policy_authorities`."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise MalformedTokenError(f"the attestation token is not a JWT: {exc}") from exc
        if header.get("alg") != "RS256" or not isinstance(header.get("kid"), str):
            raise TokenRefusedError("the attestation token is not RS256-signed with a kid")
        issuer = normalize_authority(str(unverified.get("iss", "")))
        authority = next((a for a in policy_authorities if normalize_authority(a) == issuer), None)
        if authority is None:
            raise TokenRefusedError(
                f"the attestation token was issued by {unverified.get('iss')!r}, "
                "not by an authority of the key's release policy"
            )
        key = await self.signing_key(authority, header["kid"])
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss"], "verify_aud": False},
            )
        except jwt.PyJWTError as exc:
            raise TokenRefusedError(f"the attestation token does not verify: {exc}") from exc
        return claims
