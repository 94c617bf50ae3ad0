"""A LOCAL STAND-IN for a Microsoft Azure Attestation (MAA) instance. NOT a security boundary:
it vouches for nothing, it only speaks MAA's wire format.

What relying parties read from MAA, served as MAA serves it:

    GET  /.well-known/openid-configuration   {"issuer", "jwks_uri": "{issuer}/certs", ...}
    GET  /certs                              {"keys": [{"kty": "RSA", "kid", "x5c": [cert]}]}

and tokens signed RS256 whose header names the key (`kid`) and where to find it (`jku`).

There is no TEE on the machines this runs on, so nothing can be attested. Instead of MAA's
`/attest/SevSnpVm` (which verifies an SEV-SNP report) it offers, under a name that says so,

    POST /attest/SimulatedConfidentialVm?api-version=2020-10-01
         {"runtimeData": {"data": base64url(JSON), "dataType": "JSON"}}
      -> {"token": JWT}

a token for a SIMULATED confidential VM, and likewise

    POST /attest/SimulatedConfidentialContainer?api-version=2020-10-01   (same body)

a token for a SIMULATED Confidential ACI container group, with the claims MAA's
`/attest/SevSnpVm` gives one at the top level (`simulated_container_tee()`: x-ms-attestation-type
"sevsnpvm", x-ms-compliance-status "azure-compliant-uvm", x-ms-sevsnpvm-is-debuggable false,
x-ms-sevsnpvm-hostdata `container_hostdata`, the sha256 of the group's CCE policy), the runtime
data as `x-ms-runtime` and `x-veil-simulated` (and, when given a `guest_trust`, MAA's own vTPM
guest attestation `POST /attest/AzureGuest`, which checks real TPM evidence: see maa_guest.py).
The simulated VM's claims:

  SIMULATED (no hardware report stands behind them; `simulated_cvm_tee()`):
    x-ms-attestation-type                       "azurevm"
    x-ms-isolation-tee.x-ms-attestation-type    "sevsnpvm"
    x-ms-isolation-tee.x-ms-compliance-status   "azure-compliant-cvm"
    x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable  false
  passed through, as MAA does with runtime data:
    x-ms-runtime    the runtime data JSON: for the SKR sidecar {"keys": [its ephemeral public
                    RSA JWK]}, the key Key Vault wraps a released key to
  added so that no one mistakes such a token for a real one (real MAA never issues it):
    x-veil-simulated  true
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from veil_standins.jose import b64url_decode, rsa_public_key_from_jwk
from veil_standins.maa_guest import GUEST_ATTEST_PATH, GuestTrust, guest_attest_handler

THIM_PATH = "/metadata/THIM/amd/certification"

SIMULATED_ATTEST_PATH = "/attest/SimulatedConfidentialVm"
SIMULATED_CONTAINER_ATTEST_PATH = "/attest/SimulatedConfidentialContainer"
# The stand-in's container group "runs" this CCE policy; its hostdata is the policy's sha256.
STANDIN_CCE_POLICY = b"package policy\n# veil stand-in: a SIMULATED container group\n"
# MAA's own tokens are valid for eight hours.
TOKEN_LIFETIME_SECONDS = 8 * 3600


def simulated_cvm_tee() -> dict[str, Any]:
    """The TEE claims of the simulated VM: an AMD SEV-SNP confidential VM, not debuggable."""
    return {
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-compliance-status": "azure-compliant-cvm",
        "x-ms-sevsnpvm-is-debuggable": False,
    }


def simulated_container_tee(hostdata: str) -> dict[str, Any]:
    """The top-level TEE claims of the simulated Confidential ACI group, not debuggable."""
    return {
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-compliance-status": "azure-compliant-uvm",
        "x-ms-sevsnpvm-is-debuggable": False,
        "x-ms-sevsnpvm-hostdata": hostdata,
    }


def self_signed_certificate(key: rsa.RSAPrivateKey, name: str) -> bytes:
    """A DER certificate for a signing key, as MAA publishes its keys (x5c only)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _runtime_data(body: Any) -> dict[str, Any]:
    """The runtime data JSON of an attest request; raises ValueError saying what is wrong."""
    runtime = body.get("runtimeData") if isinstance(body, Mapping) else None
    if not isinstance(runtime, Mapping) or not isinstance(runtime.get("data"), str):
        raise ValueError("runtimeData.data is required")
    if runtime.get("dataType", "JSON") != "JSON":
        raise ValueError("only runtimeData of dataType JSON becomes claims")
    parsed = json.loads(b64url_decode(runtime["data"]))
    if not isinstance(parsed, dict):
        raise ValueError("runtimeData must be a JSON object")
    for key in parsed.get("keys", []):
        if not isinstance(key, Mapping):
            raise ValueError("runtimeData.keys must hold JWKs")
        rsa_public_key_from_jwk(key)
    return parsed


def _new_signing_key() -> dict[str, rsa.RSAPrivateKey]:
    return {"veil-standin-maa": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


@dataclass
class MaaStandIn:
    """The attestation authority. Set `issuer` to the URL it is served at before use."""

    signing_keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=_new_signing_key)
    issuer: str = ""
    tee_claims: dict[str, Any] = field(default_factory=simulated_cvm_tee)
    container_hostdata: str = field(
        default_factory=lambda: hashlib.sha256(STANDIN_CCE_POLICY).hexdigest()
    )
    # The vTPM AK CA and "hardware" report key guest attestation trusts; None turns it off.
    guest_trust: GuestTrust | None = None
    _certificates: dict[str, bytes] = field(default_factory=dict, repr=False)

    def published_key(self, kid: str, key: rsa.RSAPrivateKey) -> dict[str, Any]:
        """The JWKS entry of one signing key."""
        if kid not in self._certificates:
            self._certificates[kid] = self_signed_certificate(key, "veil stand-in MAA signer")
        return {
            "kty": "RSA",
            "kid": kid,
            "x5c": [base64.b64encode(self._certificates[kid]).decode()],
        }

    def token(
        self,
        claims: Mapping[str, Any],
        *,
        kid: str | None = None,
        signing_key: rsa.RSAPrivateKey | None = None,
        headers: Mapping[str, Any] | None = None,
        lifetime: float = TOKEN_LIFETIME_SECONDS,
    ) -> str:
        """A token with `claims` over the standard ones, signed by `kid` (default: the first
        key), or by `signing_key` under that kid (a forgery)."""
        kid = kid or next(iter(self.signing_keys))
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode(
            payload,
            signing_key or self.signing_keys[kid],
            algorithm="RS256",
            headers={"kid": kid, "jku": f"{self.issuer}/certs", **(headers or {})},
        )

    def simulated_claims(self, runtime: Mapping[str, Any]) -> dict[str, Any]:
        """The claims of a token for the simulated confidential VM (see the module docstring)."""
        return {
            "x-ms-attestation-type": "azurevm",
            "x-ms-isolation-tee": dict(self.tee_claims),
            "x-ms-runtime": dict(runtime),
            "x-ms-ver": "1.0",
            "x-veil-simulated": True,
        }

    def simulated_container_claims(self, runtime: Mapping[str, Any]) -> dict[str, Any]:
        """The claims of a token for the simulated Confidential ACI container group."""
        return {
            **simulated_container_tee(self.container_hostdata),
            "x-ms-runtime": dict(runtime),
            "x-ms-ver": "1.0",
            "x-veil-simulated": True,
        }

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": f"{self.issuer}/certs",
                "id_token_signing_alg_values_supported": ["RS256"],
                "claims_supported": sorted(self.simulated_claims({})),
            }
        )

    async def _certs(self, request: web.Request) -> web.Response:
        keys = [self.published_key(kid, key) for kid, key in self.signing_keys.items()]
        return web.json_response({"keys": keys})

    async def _attest(self, request: web.Request) -> web.Response:
        if "api-version" not in request.query:
            return _error(400, "InvalidParameter", "api-version is required")
        try:
            runtime = _runtime_data(await request.json())
        except (ValueError, binascii.Error) as exc:
            return _error(400, "InvalidParameter", f"bad attest request: {exc}")
        if request.path == SIMULATED_CONTAINER_ATTEST_PATH:
            return web.json_response(
                {"token": self.token(self.simulated_container_claims(runtime))}
            )
        return web.json_response({"token": self.token(self.simulated_claims(runtime))})

    async def _thim_certification(self, request: web.Request) -> web.Response:
        """Where Azure's IMDS (THIM) gives a confidential VM its VCEK chain: the stand-in's
        "hardware" key, for the node agent to send beside its report (no IMDS runs here)."""
        if request.headers.get("Metadata") != "true":
            return _error(400, "BadRequest", "the Metadata: true header is required")
        if self.guest_trust is None:
            return _error(404, "NotFound", "no stand-in hardware: guest attestation is off")
        pem = self.guest_trust.hardware_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return web.json_response({"vcekCert": pem.decode(), "certificateChain": ""})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(THIM_PATH, self._thim_certification)
        app.router.add_get("/.well-known/openid-configuration", self._openid_configuration)
        app.router.add_get("/certs", self._certs)
        app.router.add_post(SIMULATED_ATTEST_PATH, self._attest)
        app.router.add_post(SIMULATED_CONTAINER_ATTEST_PATH, self._attest)
        app.router.add_post(
            GUEST_ATTEST_PATH,
            guest_attest_handler(lambda: self.guest_trust, self.token),
        )

    def app(self) -> web.Application:
        app = web.Application()
        self.add_routes(app)
        return app
