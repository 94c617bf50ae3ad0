"""A LOCAL STAND-IN for the Azure Key Vault keys REST API. NOT a security boundary.

It stands in for what no emulator gives us here (Lowkey Vault implements no Secure Key Release):
RSA-HSM exportable keys with immutable release policies, key versions, soft delete, and
`/release` refusing what Key Vault refuses. Narrow on purpose: only the operations Veil and its
tests use, with the request and response shapes of the Key Vault REST API, so the REAL
azure-keyvault-keys `KeyClient` is what talks to it.

`POST /keys/{name}/{version}/release {"target": <attestation token>, "enc"?, "nonce"?}`:
  1. the key must exist, be enabled, exportable and carry a release policy (else 403);
  2. the token must come from an authority of that policy: its signature, by the authority's
     published key, and its exp/nbf are checked (authority_tokens.py; else 403);
  3. its claims must satisfy the policy (release_policy.py; else 403);
  4. the key's private half is wrapped to the RSA key in the token's `x-ms-runtime.keys`
     (key_transfer.py) and the answer is a JWS (`{"value": ...}`) signed with a certificate
     chain (release_signer.py) whose payload holds `request` {api-version, enc, kid, nonce?}
     and `response.key` (the key bundle with `key.key_hsm`).

What makes it a stand-in: every key's RSA private key is an ordinary key in this process's
memory (nothing is in an HSM; tests may read it with `private_key()`), and authentication is
Key Vault's challenge flow with one expected static bearer token.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from veil_standins.authority_tokens import (
    AuthorityKeys,
    AuthorityUnavailableError,
    MalformedTokenError,
    TokenRefusedError,
)
from veil_standins.faults import FaultKind, FaultPlan, Faults
from veil_standins.jose import b64url, b64url_decode, rsa_public_key_from_jwk
from veil_standins.key_transfer import DEFAULT_ENC, ENCRYPTION_ALGORITHMS, wrap_key_hsm
from veil_standins.release_policy import (
    authorities,
    evaluate_release_policy,
    validate_policy_grammar,
)
from veil_standins.release_signer import ReleaseSigner

CHALLENGE = (
    'Bearer authorization="https://login.veil-test.invalid/00000000-0000-0000-0000-000000000000",'
    ' resource="https://vault.azure.net"'
)
RECOVERY_LEVEL = "Recoverable+Purgeable"
KEY_SIZES = (2048, 3072, 4096)
NOT_VERIFIED = "Target environment attestation statement cannot be verified"
DEFAULT_KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "export")
# Operations that use the private half inside the vault; each is allowed only by key_ops.
PRIVATE_OPERATIONS = {"unwrapKey": "unwrapKey", "decrypt": "decrypt"}
_OAEP_HASHES = {"RSA-OAEP": hashes.SHA1, "RSA-OAEP-256": hashes.SHA256}

__all__ = ["KeyVaultDouble", "b64url", "b64url_decode"]


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _runtime_key(claims: Mapping[str, Any]) -> tuple[rsa.RSAPublicKey, str] | None:
    """The first RSA key in the token's x-ms-runtime.keys (where MAA puts the runtime data's
    keys) that may encrypt, with its kid; None when there is none."""
    runtime = claims.get("x-ms-runtime")
    keys = runtime.get("keys") if isinstance(runtime, Mapping) else None
    for jwk in keys if isinstance(keys, list) else []:
        if not isinstance(jwk, Mapping) or "encrypt" not in jwk.get("key_ops", ["encrypt"]):
            continue
        try:
            return rsa_public_key_from_jwk(jwk), str(jwk.get("kid", ""))
        except ValueError:
            continue
    return None


# -- the stand-in ----------------------------------------------------------------------------


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
    # Each key version its own key, so that what wraps with it and what is released match.
    private_key: rsa.RSAPrivateKey = field(repr=False)


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
    """State and handlers of the stand-in. Tests may call its methods from their own thread.

    `signer` signs release answers (default: one under a CA no one trusts, made on first use);
    `authority_trust` says which CAs an attestation authority's HTTPS may chain to (default:
    the system's, and SSL_CERT_FILE's).
    """

    token: str
    url: str = ""
    signer: ReleaseSigner | None = None
    authority_trust: ssl.SSLContext | None = None
    keys: dict[str, list[_Version]] = field(default_factory=dict)
    deleted: dict[str, tuple[list[_Version], int]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _failures: list[_Failure] = field(default_factory=list)
    # Seeded throttling, 503s and late answers (`faults.inject(FaultPlan(...))`).
    faults: Faults = field(default_factory=Faults)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Keys made ahead by `pregenerate`, by size: Key Vault makes keys in its HSMs, off the
    # machine a benchmark measures.
    _spare_keys: dict[int, list[rsa.RSAPrivateKey]] = field(default_factory=dict)

    # test controls
    def private_key(self, name: str, version: str = "") -> rsa.RSAPrivateKey:
        """The key material of a key version (the latest by default): what Key Vault keeps in
        its HSM, and releases only to an attested TEE."""
        with self._lock:
            found = self._find(name, version)
        if found is None:
            raise KeyError(f"no key {name!r} version {version!r}")
        return found.private_key

    def pregenerate(self, count: int, size: int = 2048) -> None:
        """Make `count` keys of `size` bits now; key creations use them before making more."""
        made = [
            rsa.generate_private_key(public_exponent=65537, key_size=size) for _ in range(count)
        ]
        with self._lock:
            self._spare_keys.setdefault(size, []).extend(made)

    def _key_of_size(self, size: int) -> rsa.RSAPrivateKey:
        with self._lock:
            spare = self._spare_keys.get(size)
            if spare:
                return spare.pop()
        return rsa.generate_private_key(public_exponent=65537, key_size=size)

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
        app = web.Application(
            middlewares=[self._auth_middleware, self.faults.middleware(_fault_answer)]
        )
        app.router.add_post("/keys/{name}/create", self._create)
        app.router.add_get("/keys/{name}/versions", self._versions)
        app.router.add_get("/keys/{name}", self._get)
        app.router.add_get("/keys/{name}/", self._get)
        app.router.add_get("/keys/{name}/{version}", self._get)
        app.router.add_post("/keys/{name}/{version}/release", self._release)
        app.router.add_patch("/keys/{name}/{version}", self._update)
        for operation in PRIVATE_OPERATIONS:
            app.router.add_post(f"/keys/{{name}}/{{version}}/{operation.lower()}", self._private_op)
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
        numbers = v.private_key.public_key().public_numbers()
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
            return _error(400, "BadParameter", f"this stand-in only makes RSA keys, not {kty!r}")
        attributes = body.get("attributes") or {}
        exportable = bool(attributes.get("exportable", False))
        policy = body.get("release_policy")
        if exportable and not kty.endswith("-HSM"):
            return _error(400, "BadParameter", "Exportable keys must be HSM-protected (RSA-HSM).")
        if exportable and policy is None:
            return _error(400, "BadParameter", "Exportable keys require a release policy.")
        size = int(body.get("key_size") or 2048)
        if size not in KEY_SIZES:
            return _error(400, "BadParameter", f"RSA key size {size} is not supported.")
        if policy is not None:
            try:
                document = json.loads(b64url_decode(str(policy.get("data", ""))))
            except ValueError:
                return _error(400, "BadParameter", "release_policy.data is not base64url JSON")
            problem = validate_policy_grammar(document)
            if problem:
                return _error(400, "BadParameter", f"Invalid release policy: {problem}")
        # Generating a key takes a while: off the event loop, so other requests go on.
        private_key = await asyncio.get_running_loop().run_in_executor(
            None, self._key_of_size, size
        )
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
                size=size,
                # Key Vault allows every operation when key_ops is left out.
                key_ops=list(DEFAULT_KEY_OPS if body.get("key_ops") is None else body["key_ops"]),
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
                private_key=private_key,
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

    def _release_signer(self) -> ReleaseSigner:
        with self._lock:
            if self.signer is None:
                self.signer = ReleaseSigner.untrusted([urlsplit(self.url).hostname or "localhost"])
            return self.signer

    def _releasable(
        self, name: str, version: str
    ) -> tuple[_Version, dict[str, Any], dict[str, Any]] | web.Response:
        """The key version, its policy and its bundle; or Key Vault's refusal."""
        with self._lock:
            found = self._find(name, version)
            if found is None:
                return _not_found(name)
            if not found.exportable or found.release_policy is None:
                return _error(403, "Forbidden", "Key is not exportable.")
            if not found.enabled:
                return _error(
                    403, "Forbidden", "Operation release is not allowed on a disabled key."
                )
            policy = json.loads(b64url_decode(found.release_policy["data"]))
            return found, policy, self._bundle(name, found)

    async def _update(self, request: web.Request) -> web.Response:
        """PATCH a version's attributes and tags (enabled is what Veil changes); an immutable
        release policy cannot be changed, as Key Vault refuses."""
        name, version = request.match_info["name"], request.match_info["version"]
        body = await request.json()
        if not isinstance(body, dict):
            return _error(400, "BadParameter", "the request body is not a JSON object")
        with self._lock:
            found = self._find(name, version)
            if found is None:
                return _not_found(name)
            current = found.release_policy or {}
            policy = body.get("release_policy")
            if policy is not None and current.get("immutable") and policy != current:
                return _error(400, "BadParameter", "The release policy of this key is immutable.")
            attributes = body.get("attributes") or {}
            if "enabled" in attributes:
                found.enabled = bool(attributes["enabled"])
            if body.get("tags") is not None:
                found.tags = dict(body["tags"])
            if body.get("key_ops") is not None:
                found.key_ops = list(body["key_ops"])
            return web.json_response(self._bundle(name, found))

    async def _private_op(self, request: web.Request) -> web.Response:
        """unwrapKey / decrypt with the private half: refused unless the version's key_ops
        allow the operation, with Key Vault's KeyOperationForbidden answer."""
        name, version = request.match_info["name"], request.match_info["version"]
        operation = next(op for op in PRIVATE_OPERATIONS if request.path.endswith("/" + op.lower()))
        body = await request.json()
        algorithm = body.get("alg") if isinstance(body, dict) else None
        if algorithm not in _OAEP_HASHES:
            return _error(400, "BadParameter", f"algorithm {algorithm!r} is not supported")
        with self._lock:
            found = self._find(name, version)
            if found is None:
                return _not_found(name)
            if not found.enabled:
                return _error(
                    403, "Forbidden", f"Operation {operation} is not allowed on a disabled key."
                )
            if operation not in found.key_ops:
                return _error(
                    403,
                    "Forbidden",
                    f"Operation {operation} is not permitted on this key.",
                    "KeyOperationForbidden",
                )
            private_key = found.private_key
            kid = self._kid(name, found.version)
        digest = _OAEP_HASHES[algorithm]
        try:
            plaintext = private_key.decrypt(
                b64url_decode(str(body.get("value", ""))),
                padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None),
            )
        except ValueError:
            return _error(400, "BadParameter", "the value could not be decrypted with this key")
        return web.json_response({"kid": kid, "value": b64url(plaintext)})

    async def _release(self, request: web.Request) -> web.Response:  # noqa: PLR0911
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "BadParameter", "the request body is not a JSON object")
        target, enc = body.get("target"), body.get("enc") or DEFAULT_ENC
        if not isinstance(target, str) or not target:
            return _error(400, "BadParameter", "target (the attestation token) is required")
        if enc not in ENCRYPTION_ALGORITHMS:
            return _error(400, "BadParameter", f"enc {enc!r} is not a key export algorithm")
        releasable = self._releasable(
            request.match_info["name"], request.match_info.get("version", "")
        )
        if isinstance(releasable, web.Response):
            return releasable
        found, policy, key = releasable
        try:
            claims = await AuthorityKeys(self.authority_trust).verify(target, authorities(policy))
        except MalformedTokenError as exc:
            return _error(400, "BadParameter", str(exc))
        except TokenRefusedError as exc:
            return _error(403, "Forbidden", f"{NOT_VERIFIED}: {exc}")
        except AuthorityUnavailableError as exc:
            return _error(503, "ServiceUnavailable", f"{NOT_VERIFIED} now: {exc}")
        if not evaluate_release_policy(policy, claims):
            return _error(403, "Forbidden", f"{NOT_VERIFIED}: the release policy is not satisfied.")
        runtime_key = _runtime_key(claims)
        if runtime_key is None:
            return _error(
                400, "BadParameter", "the attestation token holds no RSA key in x-ms-runtime.keys"
            )
        key["key"]["key_hsm"] = wrap_key_hsm(
            found.private_key, runtime_key[0], enc=enc, wrapping_kid=runtime_key[1]
        )
        answered: dict[str, Any] = {
            "api-version": request.query["api-version"],
            "enc": enc,
            "kid": key["key"]["kid"],
        }
        if body.get("nonce"):
            answered["nonce"] = body["nonce"]
        value = self._release_signer().sign({"request": answered, "response": {"key": key}})
        return web.json_response({"value": value})


def _error(status: int, code: str, message: str, inner_code: str | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner_code:
        error["innererror"] = {"code": inner_code}
    return web.json_response({"error": error}, status=status)


def _fault_answer(kind: FaultKind, plan: FaultPlan, request: web.Request) -> web.Response | None:
    """Key Vault's throttling (429, Retry-After in seconds, code Throttled) and its transient
    503. Key Vault has no "operation in progress" answer: `busy` passes through."""
    if kind == "throttle":
        response = _error(
            429,
            "Throttled",
            "Request was not processed because too many requests were received. "
            f"Retry after {plan.retry_after} seconds.",
        )
        response.headers["Retry-After"] = str(plan.retry_after)
        return response
    if kind == "unavailable":
        return _error(
            503, "ServiceUnavailable", "The service is temporarily unavailable. Try again later."
        )
    return None


def _not_found(name: str, *, deleted: bool = False) -> web.Response:
    what = "Deleted Key" if deleted else "A key"
    return _error(
        404,
        "KeyNotFound",
        f"{what} with (name/id) {name} was not found in this key vault.",
    )
