"""A local HTTPS double of the Azure Key Vault keys REST API (TEST ONLY).

It stands in for what no emulator gives us here (see conftest.py for when it replaces Lowkey
Vault entirely): RSA-HSM exportable keys with immutable Secure Key Release policies, key
versions, soft delete, and `/release` with the release policy actually evaluated against the
claims of the presented attestation token. Narrow on purpose: only the operations Veil and its
tests use, with the request and response shapes of the Key Vault REST API, so the REAL
azure-keyvault-keys `KeyClient` is what talks to it. Not a security boundary:

- the key material is one RSA key per size, reused by every key (nothing is really in an HSM);
- `/release` decodes the attestation token WITHOUT verifying its signature (Key Vault verifies
  MAA's signature; Veil's own token verification lives in veil.runtime.attestation) and returns
  a JWS whose `key_hsm` is a placeholder, not a wrapped key;
- authentication is Key Vault's challenge flow with one expected static bearer token.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

CHALLENGE = (
    'Bearer authorization="https://login.veil-test.invalid/00000000-0000-0000-0000-000000000000",'
    ' resource="https://vault.azure.net"'
)
RECOVERY_LEVEL = "Recoverable+Purgeable"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


# -- release policy evaluation (the Secure Key Release grammar, version 1.0.0) ---------------


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _condition_holds(condition: Mapping[str, Any], claims: Mapping[str, Any]) -> bool:
    if "allOf" in condition:
        return all(_condition_holds(c, claims) for c in condition["allOf"])
    if "anyOf" in condition:
        return any(_condition_holds(c, claims) for c in condition["anyOf"])
    value = _claim(claims, str(condition["claim"]))
    if value is _MISSING:
        return False
    expected = condition["equals"]
    return bool(type(value) is type(expected) and value == expected)


def evaluate_release_policy(policy: Mapping[str, Any], claims: Mapping[str, Any]) -> bool:
    """Whether an attestation token's claims satisfy a release policy: some anyOf branch whose
    authority equals the token's issuer (trailing slashes aside) has all its conditions hold."""
    issuer = str(claims.get("iss", "")).rstrip("/").lower()
    for branch in policy.get("anyOf", []):
        if str(branch.get("authority", "")).rstrip("/").lower() != issuer:
            continue
        if _condition_holds(branch, claims):
            return True
    return False


def validate_policy_grammar(policy: Any) -> str | None:
    """None when `policy` follows the grammar, else what is wrong (Key Vault answers 400)."""
    if not isinstance(policy, dict):
        return "the policy must be a JSON object"
    if policy.get("version", "1.0.0") not in ("1.0.0", "0.2"):
        return f"unsupported policy version {policy.get('version')!r}"
    branches = policy.get("anyOf")
    if not isinstance(branches, list) or not branches:
        return "anyOf must be a non-empty list"
    for branch in branches:
        if not isinstance(branch, dict) or not str(branch.get("authority", "")).startswith(
            "https://"
        ):
            return "each anyOf entry needs an https authority"
        problem = _validate_conditions(branch)
        if problem:
            return problem
    return None


def _validate_conditions(node: dict[str, Any]) -> str | None:
    lists = [k for k in ("allOf", "anyOf") if k in node]
    if len(lists) != 1 or not isinstance(node[lists[0]], list) or not node[lists[0]]:
        return "each condition set needs exactly one non-empty allOf or anyOf"
    for condition in node[lists[0]]:
        if not isinstance(condition, dict):
            return "conditions must be objects"
        if "allOf" in condition or "anyOf" in condition:
            problem = _validate_conditions(condition)
            if problem:
                return problem
            continue
        if set(condition) != {"claim", "equals"}:
            return f"a condition needs exactly claim and equals, got {sorted(condition)}"
        if not isinstance(condition["equals"], str | bool):
            return "equals must be a string or a boolean"
    return None


# -- the double -------------------------------------------------------------------------------


@dataclass
class _Version:
    version: str
    kty: str
    size: int
    key_ops: list[str]
    enabled: bool
    exportable: bool
    tags: dict[str, str]
    release_policy: dict[str, Any] | None
    created: int


@dataclass
class _Failure:
    status: int
    code: str
    message: str
    method: str | None
    path_contains: str | None
    remaining: int | None
    inner_code: str | None = None


@dataclass
class KeyVaultDouble:
    """State and handlers of the double. Tests may call its methods from their own thread."""

    token: str
    url: str = ""
    keys: dict[str, list[_Version]] = field(default_factory=dict)
    deleted: dict[str, tuple[list[_Version], int]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _failures: list[_Failure] = field(default_factory=list)
    _rsa: dict[int, rsa.RSAPrivateKey] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _signer: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    # test controls
    def fail(
        self,
        status: int,
        code: str,
        message: str,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        times: int | None = None,
        inner_code: str | None = None,
    ) -> None:
        """Answer matching requests with an error in Key Vault's shape (after authentication)."""
        with self._lock:
            self._failures.append(
                _Failure(status, code, message, method, path_contains, times, inner_code)
            )

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth_middleware])
        app.router.add_post("/keys/{name}/create", self._create)
        app.router.add_get("/keys/{name}/versions", self._versions)
        app.router.add_get("/keys/{name}", self._get)
        app.router.add_get("/keys/{name}/", self._get)
        app.router.add_get("/keys/{name}/{version}", self._get)
        app.router.add_post("/keys/{name}/{version}/release", self._release)
        app.router.add_post("/keys/{name}//release", self._release)
        app.router.add_delete("/keys/{name}", self._delete)
        app.router.add_get("/deletedkeys/{name}", self._get_deleted)
        return app

    # plumbing
    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        with self._lock:
            self.requests.append((request.method, request.path))
        if "api-version" not in request.query:
            return _error(400, "BadParameter", "api-version is required")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            await request.read()
            return web.Response(
                status=401,
                headers={"WWW-Authenticate": CHALLENGE},
                content_type="application/json",
                text=json.dumps(
                    {"error": {"code": "Unauthorized", "message": "AKV10000: bearer token needed"}}
                ),
            )
        with self._lock:
            for failure in self._failures:
                if failure.method not in (None, request.method):
                    continue
                if failure.path_contains and failure.path_contains not in request.path:
                    continue
                if failure.remaining is not None:
                    if failure.remaining <= 0:
                        continue
                    failure.remaining -= 1
                return _error(failure.status, failure.code, failure.message, failure.inner_code)
        response: web.StreamResponse = await handler(request)
        return response

    def _public(self, size: int) -> rsa.RSAPublicNumbers:
        if size not in self._rsa:
            self._rsa[size] = rsa.generate_private_key(public_exponent=65537, key_size=size)
        return self._rsa[size].public_key().public_numbers()

    def _kid(self, name: str, version: str) -> str:
        return f"{self.url}/keys/{name}/{version}"

    def _attributes(self, v: _Version) -> dict[str, Any]:
        return {
            "enabled": v.enabled,
            "created": v.created,
            "updated": v.created,
            "recoveryLevel": RECOVERY_LEVEL,
            "recoverableDays": 90,
            "exportable": v.exportable,
        }

    def _bundle(self, name: str, v: _Version) -> dict[str, Any]:
        numbers = self._public(v.size)
        bundle: dict[str, Any] = {
            "key": {
                "kid": self._kid(name, v.version),
                "kty": v.kty,
                "key_ops": v.key_ops,
                "n": b64url(_int_bytes(numbers.n)),
                "e": b64url(_int_bytes(numbers.e)),
            },
            "attributes": self._attributes(v),
            "tags": v.tags,
        }
        if v.release_policy is not None:
            bundle["release_policy"] = v.release_policy
        return bundle

    # handlers
    async def _create(self, request: web.Request) -> web.Response:  # noqa: PLR0911
        name = request.match_info["name"]
        body = await request.json()
        kty = str(body.get("kty", ""))
        if kty not in ("RSA", "RSA-HSM"):
            return _error(400, "BadParameter", f"this double only makes RSA keys, not {kty!r}")
        attributes = body.get("attributes") or {}
        exportable = bool(attributes.get("exportable", False))
        policy = body.get("release_policy")
        if exportable and not kty.endswith("-HSM"):
            return _error(400, "BadParameter", "Exportable keys must be HSM-protected (RSA-HSM).")
        if exportable and policy is None:
            return _error(400, "BadParameter", "Exportable keys require a release policy.")
        if policy is not None:
            try:
                document = json.loads(b64url_decode(str(policy.get("data", ""))))
            except ValueError:
                return _error(400, "BadParameter", "release_policy.data is not base64url JSON")
            problem = validate_policy_grammar(document)
            if problem:
                return _error(400, "BadParameter", f"Invalid release policy: {problem}")
        with self._lock:
            if name in self.deleted:
                return _error(
                    409,
                    "Conflict",
                    f"Key {name} is currently in a deleted but recoverable state, and its name "
                    "cannot be reused; in this state, the key can only be recovered or purged.",
                )
            version = _Version(
                version=uuid.uuid4().hex,
                kty=kty,
                size=int(body.get("key_size") or 2048),
                key_ops=list(
                    body.get("key_ops")
                    or ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
                ),
                enabled=bool(attributes.get("enabled", True)),
                exportable=exportable,
                tags=dict(body.get("tags") or {}),
                release_policy=None
                if policy is None
                else {
                    "contentType": policy.get("contentType", "application/json; charset=utf-8"),
                    "immutable": bool(policy.get("immutable", False)),
                    "data": policy["data"],
                },
                created=int(time.time()),
            )
            self.keys.setdefault(name, []).append(version)
            bundle = self._bundle(name, version)
        return web.json_response(bundle)

    def _find(self, name: str, version: str) -> _Version | None:
        versions = self.keys.get(name) or []
        if not versions:
            return None
        if not version:
            return versions[-1]
        return next((v for v in versions if v.version == version), None)

    async def _get(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        with self._lock:
            found = self._find(name, request.match_info.get("version", ""))
            if found is None:
                return _not_found(name)
            return web.json_response(self._bundle(name, found))

    async def _versions(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        with self._lock:
            versions = self.keys.get(name) or []
            items = [
                {
                    "kid": self._kid(name, v.version),
                    "attributes": self._attributes(v),
                    "tags": v.tags,
                }
                for v in versions
            ]
        return web.json_response({"value": items, "nextLink": None})

    async def _delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        with self._lock:
            versions = self.keys.pop(name, None)
            if not versions:
                return _not_found(name)
            now = int(time.time())
            self.deleted[name] = (versions, now)
            return web.json_response(self._deleted_bundle(name, versions, now))

    def _deleted_bundle(self, name: str, versions: list[_Version], when: int) -> dict[str, Any]:
        bundle = self._bundle(name, versions[-1])
        bundle.update(
            recoveryId=f"{self.url}/deletedkeys/{name}",
            deletedDate=when,
            scheduledPurgeDate=when + 90 * 86400,
        )
        return bundle

    async def _get_deleted(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        with self._lock:
            if name not in self.deleted:
                return _not_found(name, deleted=True)
            versions, when = self.deleted[name]
            return web.json_response(self._deleted_bundle(name, versions, when))

    async def _release(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.json()
        target = str(body.get("target", ""))
        try:
            claims = jwt.decode(target, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            return _error(400, "BadParameter", f"target is not a JWT: {exc}")
        with self._lock:
            found = self._find(name, request.match_info.get("version", ""))
            if found is None:
                return _not_found(name)
            if not found.exportable or found.release_policy is None:
                return _error(403, "Forbidden", "Key is not exportable.")
            policy = json.loads(b64url_decode(found.release_policy["data"]))
            if not evaluate_release_policy(policy, claims):
                return _error(
                    403,
                    "Forbidden",
                    "Target environment attestation statement cannot be verified: the "
                    "release policy is not satisfied.",
                )
            key = self._bundle(name, found)
        key["key"]["key_hsm"] = b64url(b"veil-test-double: not a wrapped key")
        value = jwt.encode(
            {"request": {"api-version": request.query["api-version"]}, "response": {"key": key}},
            self._signer,
            algorithm="RS256",
            headers={"x5t#S256": b64url(b"veil-test-double")},
        )
        return web.json_response({"value": value})


def _error(status: int, code: str, message: str, inner_code: str | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner_code:
        error["innererror"] = {"code": inner_code}
    return web.json_response({"error": error}, status=status)


def _not_found(name: str, *, deleted: bool = False) -> web.Response:
    what = "Deleted Key" if deleted else "A key"
    return _error(
        404,
        "KeyNotFound",
        f"{what} with (name/id) {name} was not found in this key vault.",
    )
