"""A LOCAL STAND-IN for the Secure Key Release sidecar (`skr` of
microsoft/confidential-sidecar-containers). NOT a security boundary: no TEE protects its
ephemeral key or the key it releases, and its attestation is the MAA stand-in's SIMULATED one.

    python -m veil_standins.skr [--host HOST] [--port PORT]

HTTP API, as the real sidecar's (cmd/skr):

    GET  /status        200 {"message": "Status OK"}
    POST /attest/maa    {"maa_endpoint", "runtime_data": standard base64 of a JSON document}
      200 {"token": <the MAA token; the runtime data JSON is its `x-ms-runtime` claims>}
      400 {"error": ...}   a member missing, or runtime_data not standard base64
      403 {"error": ...}   MAA unreachable or refusing (e.g. runtime data that is not JSON)
    POST /key/release   {"maa_endpoint", "akv_endpoint", "kid", "access_token"?}
      200 {"key": <the released private key as a JWK, in a JSON string>}
      400 {"error": ...}   "invalid request format": a required member missing (gin's binding)
      403 {"error": ...}   anything else that failed: a malformed endpoint or kid, MAA or Key
                           Vault unreachable, refusing or answering what does not verify
                           (the real sidecar answers every SecureKeyRelease failure with 403)

A release does what the real sidecar does (pkg/skr/skr.go), against the stand-ins:
  1. an ephemeral RSA-2048 key; its public JWK (kid: RFC 7638 thumbprint, key_ops [encrypt])
     goes as runtime data {"keys": [jwk]} to https://{maa_endpoint}/attest/SimulatedConfidentialVm;
  2. the token goes to https://{akv_endpoint}/keys/{kid}/release?api-version=7.3-preview, the
     URL built by plain string formatting as the sidecar does, with the bearer token
     `access_token`, else env VEIL_AZURE_STATIC_TOKEN;
  3. the answer's JWS must verify (trust.py: x5c chain to a trusted root, for akv_endpoint's
     host); its key_hsm is unwrapped with the ephemeral key (key_transfer.py);
  4. the PKCS#8 private key comes back as a private JWK.
The contract, as the sidecar's source has it (cmd/skr/main.go, pkg/skr, pkg/common/akv.go):
`kid` is a key name or name/version and `akv_endpoint`/`maa_endpoint` are bare hosts; a full key
id or a scheme makes a URL that does not name a key (https://https://... or
/keys/https://.../release), so such requests are refused (403) as the real request would fail.
Every member is required in every request: SkrSideCarArgs configures the sidecar (certificate
cache, managed identity), not the request.

Environment (besides those above):
  Port             the listening port (default 8080), as the real sidecar's skr.sh reads it
  SkrSideCarArgs   base64 JSON of the sidecar's Azure information ({"certcache"?,
                   "identity"?}); checked to be base64 JSON, as the real sidecar refuses to start
                   otherwise
  VEIL_AZURE_CA_BUNDLE, SSL_CERT_FILE   CA PEM files to trust (trust.py)
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from veil_standins.jose import b64url, rsa_private_jwk, rsa_public_jwk
from veil_standins.key_transfer import DEFAULT_ENC, KeyTransferError, unwrap_key_hsm
from veil_standins.maa import SIMULATED_ATTEST_PATH, SIMULATED_CONTAINER_ATTEST_PATH
from veil_standins.trust import Trust, UntrustedChainError

log = logging.getLogger("veil_standins.skr")

MAA_API_VERSION = "2020-10-01"
KEY_VAULT_API_VERSION = "7.3-preview"
REQUIRED = ("maa_endpoint", "akv_endpoint", "kid")
_RELEASE_PATH = re.compile(r"/keys/[0-9A-Za-z-]{1,127}(/[0-9A-Za-z]{1,64})?/release")
_HOST = re.compile(r"[0-9A-Za-z.-]{1,253}(:[0-9]{1,5})?")


class SkrError(Exception):
    """A release failed; `status` is what the sidecar answers, the message why (one line)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(" ".join(reason.split())[:500])
        self.status = status


def sidecar_information(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The Azure information in SkrSideCarArgs (base64 JSON object); raises ValueError if it
    is unreadable, as the real sidecar exits at start."""
    encoded = environ.get("SkrSideCarArgs", "")
    if not encoded:
        return {}
    try:
        parsed = json.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"SkrSideCarArgs is not base64 JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValueError("SkrSideCarArgs is not a JSON object")
    return parsed


def _thumbprint(jwk: Mapping[str, str]) -> str:
    canonical = json.dumps({k: jwk[k] for k in ("e", "kty", "n")}, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode()).digest())


def release_url(akv_endpoint: str, kid: str) -> str:
    """The release URL exactly as the sidecar formats it, refused (403) when it does not name a
    key of a vault: a scheme in the endpoint or a full key id in kid breaks it there too."""
    url = f"https://{akv_endpoint}/keys/{kid}/release?api-version={KEY_VAULT_API_VERSION}"
    parts = urlsplit(url)
    if not _HOST.fullmatch(parts.netloc) or not _RELEASE_PATH.fullmatch(parts.path):
        raise SkrError(
            403,
            f"releasing the key {kid} failed: AKV post request failed: {url} does not name a "
            "key (akv_endpoint must be a bare host, kid a key name or name/version)",
        )
    return url


def attest_url(maa_endpoint: str, path: str = SIMULATED_ATTEST_PATH) -> str:
    url = f"https://{maa_endpoint}{path}?api-version={MAA_API_VERSION}"
    if not _HOST.fullmatch(urlsplit(url).netloc):
        raise SkrError(403, f"attestation failed: {url} is not an MAA endpoint (a bare host)")
    return url


def _upstream_error(service: str, status: int, body: Any) -> SkrError:
    error = body.get("error") if isinstance(body, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else error
    return SkrError(403, f"{service} answered HTTP {status}: {message or 'no reason given'}")


class SkrStandIn:
    """The sidecar: `trust` says which CAs to believe; `attest_path` which simulated TEE the
    MAA stand-in attests (a confidential VM by default, or SIMULATED_CONTAINER_ATTEST_PATH for
    a Confidential ACI group, as the real sidecar runs in)."""

    def __init__(
        self,
        *,
        trust: Trust | None = None,
        static_token: str | None = None,
        timeout_seconds: float = 30.0,
        attest_path: str = SIMULATED_ATTEST_PATH,
    ) -> None:
        self._attest_path = attest_path
        self._trust = trust or Trust.from_env()
        self._static_token = static_token
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def _post(
        self,
        session: aiohttp.ClientSession,
        service: str,
        url: str,
        body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        try:
            async with session.post(
                url, json=body, headers=headers, ssl=self._trust.context, allow_redirects=False
            ) as response:
                status = response.status
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SkrError(403, f"cannot reach {service} at {url}: {exc!r}") from exc
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        if status != 200:
            raise _upstream_error(service, status, parsed)
        if not isinstance(parsed, dict):
            raise SkrError(403, f"{service} answered 200 without a JSON object")
        return parsed

    async def _attest(
        self, session: aiohttp.ClientSession, maa_endpoint: str, key: rsa.RSAPrivateKey
    ) -> str:
        public = rsa_public_jwk(key.public_key())
        jwk: dict[str, Any] = {**public, "kid": _thumbprint(public), "key_ops": ["encrypt"]}
        return await self._maa_token(session, maa_endpoint, json.dumps({"keys": [jwk]}).encode())

    async def _maa_token(
        self, session: aiohttp.ClientSession, maa_endpoint: str, runtime_data: bytes
    ) -> str:
        """MAA's token for this TEE with `runtime_data` (JSON bytes) as its runtime claims, as
        the sidecar's common.MAA.Attest sends it: base64url, dataType JSON."""
        answer = await self._post(
            session,
            "MAA",
            attest_url(maa_endpoint, self._attest_path),
            {"runtimeData": {"data": b64url(runtime_data), "dataType": "JSON"}},
        )
        if not isinstance(answer.get("token"), str):
            raise SkrError(403, "MAA answered without a token")
        return str(answer["token"])

    def _verified_payload(self, value: Any, akv_endpoint: str) -> dict[str, Any]:
        """The payload of Key Vault's JWS, once its signer is shown to be the vault."""
        try:
            header = jwt.get_unverified_header(str(value))
            chain = [
                x509.load_der_x509_certificate(base64.b64decode(c, validate=True))
                for c in header["x5c"]
            ]
            host = urlsplit(f"https://{akv_endpoint}").hostname or ""
            self._trust.verify_chain(chain, host)
            leaf_key = chain[0].public_key()
            if not isinstance(leaf_key, rsa.RSAPublicKey):
                raise SkrError(403, "Key Vault's signer holds no RSA key")
            payload: dict[str, Any] = jwt.decode(str(value), leaf_key, algorithms=["RS256"])
        except UntrustedChainError as exc:
            raise SkrError(403, f"Key Vault's answer is not from the vault: {exc}") from exc
        except (jwt.PyJWTError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise SkrError(403, f"Key Vault's answer does not verify: {exc!r}") from exc
        return payload

    async def release(self, request: Mapping[str, Any]) -> dict[str, str]:
        """The released key as a private JWK, or SkrError."""
        missing = [k for k in REQUIRED if not isinstance(request.get(k), str) or not request[k]]
        if missing:
            raise SkrError(400, f"invalid request format: {', '.join(missing)} required")
        maa, akv, kid = (str(request[k]) for k in REQUIRED)
        url = release_url(akv, kid)
        attest_url(maa)
        bearer = str(request.get("access_token") or "") or self._static_token
        if not bearer:
            raise SkrError(
                403, "no Key Vault access token: none in the request, VEIL_AZURE_STATIC_TOKEN unset"
            )
        ephemeral = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            token = await self._attest(session, maa, ephemeral)
            answer = await self._post(
                session,
                "Key Vault",
                url,
                {"target": token},
                {"Authorization": f"Bearer {bearer}"},
            )
        payload = self._verified_payload(answer.get("value"), akv)
        try:
            released = payload["response"]["key"]["key"]
            enc = str(payload["request"].get("enc") or DEFAULT_ENC)
            pkcs8 = unwrap_key_hsm(str(released["key_hsm"]), enc, ephemeral)
            key = serialization.load_der_private_key(pkcs8, password=None)
        except (KeyError, TypeError, ValueError, KeyTransferError) as exc:
            raise SkrError(403, f"Key Vault's released key does not open: {exc}") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SkrError(403, f"the released {released.get('kty')} key is not an RSA key")
        return rsa_private_jwk(key)

    async def _release_handler(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        try:
            if not isinstance(body, dict):
                raise SkrError(400, "invalid request format: the body is not a JSON object")
            jwk = await self.release(body)
        except SkrError as exc:
            log.warning("key release refused (HTTP %d): %s", exc.status, exc)
            return web.json_response({"error": str(exc)}, status=exc.status)
        except Exception as exc:
            # Kept out of the answer: the trace goes to the log only.
            log.exception("key release failed")
            return web.json_response(
                {"error": f"the SKR stand-in failed: {type(exc).__name__}"}, status=500
            )
        log.info("key %s released", body.get("kid"))
        return web.json_response({"key": json.dumps(jwk)})

    async def attest_maa(self, request: Mapping[str, Any]) -> str:
        """`POST /attest/maa`: a token whose runtime claims are the request's runtime data."""
        missing = [
            k
            for k in ("maa_endpoint", "runtime_data")
            if not isinstance(request.get(k), str) or not request[k]
        ]
        if missing:
            raise SkrError(400, f"invalid request format: {', '.join(missing)} required")
        try:
            runtime_data = base64.b64decode(str(request["runtime_data"]), validate=True)
        except binascii.Error as exc:
            raise SkrError(
                400, f"decoding base64-encoded runtime data of request failed: {exc}"
            ) from exc
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            return await self._maa_token(session, str(request["maa_endpoint"]), runtime_data)

    async def _attest_maa_handler(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        try:
            if not isinstance(body, dict):
                raise SkrError(400, "invalid request format: the body is not a JSON object")
            token = await self.attest_maa(body)
        except SkrError as exc:
            log.warning("attestation refused (HTTP %d): %s", exc.status, exc)
            return web.json_response({"error": str(exc)}, status=exc.status)
        return web.json_response({"token": token})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response({"message": "Status OK"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_post("/key/release", self._release_handler)
        app.router.add_post("/attest/maa", self._attest_maa_handler)
        return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m veil_standins.skr",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="listen address (default 127.0.0.1: the pod only)"
    )
    parser.add_argument(
        "--port",
        type=int,
        # The real sidecar's variable name.
        default=int(os.environ.get("Port") or 8080),  # noqa: SIM112
        help="default: env Port, else 8080",
    )
    parser.add_argument(
        "--tee",
        choices=("cvm", "aci"),
        default="cvm",
        help="which SIMULATED TEE the MAA stand-in attests: a confidential VM (default) or a "
        "Confidential ACI container group (top-level claims with hostdata)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        sidecar_information()
    except ValueError as exc:
        print(f"veil_standins.skr: {exc}", file=sys.stderr)
        return 2
    log.warning("LOCAL STAND-IN of the SKR sidecar: attestation is SIMULATED, keys are not safe")
    sidecar = SkrStandIn(
        static_token=os.environ.get("VEIL_AZURE_STATIC_TOKEN") or None,
        attest_path=SIMULATED_CONTAINER_ATTEST_PATH if args.tee == "aci" else SIMULATED_ATTEST_PATH,
    )
    web.run_app(sidecar.app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
