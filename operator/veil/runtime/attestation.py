"""Verification of Microsoft Azure Attestation (MAA) tokens as a relying party.

Checks, in order, each failure naming itself (`AttestationFailure`):
  1. the token is a JWT signed RS256 (never `none`, never HMAC);
  2. its `iss` is one of the pinned issuers (checked before any key is fetched);
  3. the signature verifies with the issuer's key for the header `kid`, from the issuer's own
     OpenID configuration (`jku`/`x5u` headers are ignored);
  4. `exp` (required) and `nbf` hold, with a bounded leeway;
  5. the TEE claims satisfy the `AttestationPolicy` (type, compliance, not debuggable, hostdata);
  6. when a nonce is expected or required, the token's nonce matches and was not seen before.

The nonce has one place, the attester's runtime data (`runtime_data`): `x-ms-runtime.nonce` on
Confidential ACI, `x-ms-runtime.client-payload.nonce` on confidential VMs.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt

from veil.runtime.jwks import IssuerKeys, SigningKeyError, normalize_issuer
from veil.runtime.replay import ReplayCache, ReplayCacheFullError

if TYPE_CHECKING:  # prometheus_client stays out of the client's imports
    from veil.runtime.metrics import RuntimeMetrics

log = logging.getLogger("veil.runtime.attestation")

MAX_TOKEN_CHARS = 256 * 1024
MAX_LEEWAY_SECONDS = 300.0
ALLOWED_ALGORITHM = "RS256"

ISOLATION_TEE = "x-ms-isolation-tee"
ATTESTATION_TYPE = "x-ms-attestation-type"
COMPLIANCE_STATUS = "x-ms-compliance-status"
SEVSNP_DEBUGGABLE = "x-ms-sevsnpvm-is-debuggable"
TDX_DEBUG = "tdx_td_attributes_debug"
SEVSNP_HOSTDATA = "x-ms-sevsnpvm-hostdata"
RUNTIME = "x-ms-runtime"

# Which claim says "this TEE can be debugged" for each attestation type.
_DEBUG_CLAIMS = {"sevsnpvm": SEVSNP_DEBUGGABLE, "tdxvm": TDX_DEBUG}


class AttestationFailure(StrEnum):
    """Which check refused a token; also the `reason` label of the failure metric."""

    MALFORMED = "malformed"
    ALGORITHM = "algorithm"
    ISSUER = "issuer"
    SIGNING_KEY = "signing_key"
    SIGNATURE = "signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    CLAIM = "claim"
    DEBUGGABLE = "debuggable"
    HOSTDATA = "hostdata"
    NONCE = "nonce"
    REPLAY = "replay"


class AttestationError(Exception):
    """An attestation token was refused; `reason` names the check, the message explains it."""

    def __init__(self, reason: AttestationFailure, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Placement(StrEnum):
    """Where the workload runs, which decides where MAA puts the TEE claims."""

    CONFIDENTIAL_VM = "confidentialVM"
    CONFIDENTIAL_ACI = "confidentialACI"


_DEFAULT_TYPES = {
    Placement.CONFIDENTIAL_VM: frozenset({"sevsnpvm", "tdxvm"}),
    Placement.CONFIDENTIAL_ACI: frozenset({"sevsnpvm"}),
}
_DEFAULT_COMPLIANCE = {
    Placement.CONFIDENTIAL_VM: "azure-compliant-cvm",
    Placement.CONFIDENTIAL_ACI: "azure-compliant-uvm",
}
_POLICY_KEYS = frozenset(
    {
        "placement",
        "attestationTypes",
        "complianceStatus",
        "hostdata",
        "allowDebuggable",
        "requireNonce",
    }
)


def _claim_error(message: str) -> AttestationError:
    return AttestationError(AttestationFailure.CLAIM, message)


@dataclass(frozen=True)
class AttestationPolicy:
    """The TEE claims a token must carry.

    CVM tokens carry them under `x-ms-isolation-tee`; confidential containers (ACI) at the top
    level together with `x-ms-sevsnpvm-hostdata`, the sha256 of the container security policy.
    """

    placement: Placement
    attestation_types: frozenset[str] = frozenset()
    compliance_status: str | None = None
    hostdata: str | None = None
    allow_debuggable: bool = False
    require_nonce: bool = False

    def __post_init__(self) -> None:
        if not self.attestation_types:
            object.__setattr__(self, "attestation_types", _DEFAULT_TYPES[self.placement])
        unknown = self.attestation_types - _DEBUG_CLAIMS.keys()
        if unknown:
            raise ValueError(f"unknown attestation types {sorted(unknown)}")
        if self.compliance_status is None:
            object.__setattr__(self, "compliance_status", _DEFAULT_COMPLIANCE[self.placement])
        if self.hostdata is not None:
            if self.placement is not Placement.CONFIDENTIAL_ACI:
                raise ValueError("hostdata only applies to confidentialACI placement")
            value = self.hostdata.lower()
            if len(value) != 64 or value.strip("0123456789abcdef"):
                raise ValueError("hostdata must be 64 hex digits (sha256 of the CCE policy)")
            object.__setattr__(self, "hostdata", value)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AttestationPolicy:
        """Build from the JSON shape `{"placement", "attestationTypes"?, "complianceStatus"?,
        "hostdata"?, "allowDebuggable"?, "requireNonce"?}`."""
        unknown = set(data) - _POLICY_KEYS
        if unknown:
            raise ValueError(f"unknown policy fields: {', '.join(sorted(unknown))}")
        try:
            placement = Placement(data["placement"])
        except KeyError:
            raise ValueError("the policy must name a placement") from None
        except ValueError:
            choices = ", ".join(p.value for p in Placement)
            raise ValueError(f"placement must be one of {choices}") from None
        types = data.get("attestationTypes", [])
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ValueError("attestationTypes must be a list of strings")
        for flag in ("allowDebuggable", "requireNonce"):
            if not isinstance(data.get(flag, False), bool):
                raise ValueError(f"{flag} must be true or false")
        for text in ("complianceStatus", "hostdata"):
            if data.get(text) is not None and not isinstance(data[text], str):
                raise ValueError(f"{text} must be a string")
        return cls(
            placement=placement,
            attestation_types=frozenset(types),
            compliance_status=data.get("complianceStatus"),
            hostdata=data.get("hostdata"),
            allow_debuggable=data.get("allowDebuggable", False),
            require_nonce=data.get("requireNonce", False),
        )

    @classmethod
    def from_file(cls, path: Path) -> AttestationPolicy:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the policy {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"the policy {path} is not a JSON object")
        return cls.from_mapping(data)

    def _tee_claims(self, claims: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
        if self.placement is Placement.CONFIDENTIAL_ACI:
            return claims, ""
        tee = claims.get(ISOLATION_TEE)
        if not isinstance(tee, Mapping):
            raise _claim_error(f"claim {ISOLATION_TEE!r} is missing (required for CVM tokens)")
        return tee, f"{ISOLATION_TEE}."

    def check(self, claims: Mapping[str, Any]) -> str:
        """Raise AttestationError unless the claims satisfy the policy; returns the TEE type."""
        tee, prefix = self._tee_claims(claims)
        tee_type = tee.get(ATTESTATION_TYPE)
        if tee_type is None:
            raise _claim_error(f"claim {prefix}{ATTESTATION_TYPE} is missing")
        if tee_type not in self.attestation_types:
            allowed = ", ".join(sorted(self.attestation_types))
            raise _claim_error(
                f"claim {prefix}{ATTESTATION_TYPE} is {tee_type!r}, not one of: {allowed}"
            )
        compliance = tee.get(COMPLIANCE_STATUS)
        if compliance is None:
            raise _claim_error(f"claim {prefix}{COMPLIANCE_STATUS} is missing")
        if compliance != self.compliance_status:
            raise _claim_error(
                f"claim {prefix}{COMPLIANCE_STATUS} is {compliance!r}, "
                f"expected {self.compliance_status!r}"
            )
        debug_claim = _DEBUG_CLAIMS[tee_type]
        debuggable = tee.get(debug_claim)
        if not isinstance(debuggable, bool):
            raise _claim_error(
                f"claim {prefix}{debug_claim} is missing or not a boolean, so the TEE cannot "
                "be shown to be non-debuggable"
            )
        if debuggable and not self.allow_debuggable:
            raise AttestationError(
                AttestationFailure.DEBUGGABLE,
                f"the TEE is debuggable ({prefix}{debug_claim} is true): "
                "its memory is readable by the host, so it is refused",
            )
        if self.hostdata is not None:
            actual = tee.get(SEVSNP_HOSTDATA)
            if not isinstance(actual, str):
                raise AttestationError(
                    AttestationFailure.HOSTDATA, f"claim {SEVSNP_HOSTDATA} is missing"
                )
            if not hmac.compare_digest(actual.lower(), self.hostdata):
                raise AttestationError(
                    AttestationFailure.HOSTDATA,
                    f"claim {SEVSNP_HOSTDATA} is {actual!r}, expected {self.hostdata!r} "
                    "(the container security policy differs)",
                )
        return str(tee_type)


NONCE = "nonce"
CLIENT_PAYLOAD = "client-payload"


def runtime_data(claims: Mapping[str, Any], placement: Placement) -> Mapping[str, Any]:
    """Where a token carries the attester's own data, the one place the nonce and the channel
    key are read from: on Confidential ACI the SKR sidecar's runtime data (a JSON document MAA
    turns into the `x-ms-runtime` claims); on confidential VMs the guest attestation's client
    payload (`x-ms-runtime.client-payload`). Empty when the token carries none."""
    runtime = claims.get(RUNTIME)
    if not isinstance(runtime, Mapping):
        return {}
    if placement is Placement.CONFIDENTIAL_VM:
        payload = runtime.get(CLIENT_PAYLOAD)
        return payload if isinstance(payload, Mapping) else {}
    return runtime


def runtime_data_claim(placement: Placement, member: str) -> str:
    """The dotted claim name of `member` of the runtime data, for messages and documents."""
    if placement is Placement.CONFIDENTIAL_VM:
        return f"{RUNTIME}.{CLIENT_PAYLOAD}.{member}"
    return f"{RUNTIME}.{member}"


def token_nonce(claims: Mapping[str, Any], placement: Placement) -> str | None:
    """The nonce of a token: `nonce` of its runtime data (see `runtime_data`), nowhere else."""
    candidate = runtime_data(claims, placement).get(NONCE)
    return candidate if isinstance(candidate, str) and candidate else None


@dataclass(frozen=True)
class VerifiedAttestation:
    """A token that passed every check."""

    issuer: str
    attestation_type: str
    expires_at: datetime
    nonce: str | None
    claims: Mapping[str, Any] = field(repr=False)


def _numeric_claim(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise AttestationError(AttestationFailure.MALFORMED, f"the token has no {name!r} claim")
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AttestationError(AttestationFailure.MALFORMED, f"claim {name!r} is not a number")
    return float(value)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


class AttestationVerifier:
    """Verifies MAA tokens against pinned issuers and an `AttestationPolicy`."""

    def __init__(
        self,
        allowed_issuers: Iterable[str],
        policy: AttestationPolicy,
        *,
        keys: IssuerKeys | None = None,
        leeway_seconds: float = 60.0,
        replay_cache: ReplayCache | None = None,
        metrics: RuntimeMetrics | None = None,
        clock: Callable[[], float] = time.time,
        allow_insecure_loopback_issuers: bool = False,
    ) -> None:
        self._issuers = frozenset(
            normalize_issuer(i, allow_insecure_loopback=allow_insecure_loopback_issuers)
            for i in allowed_issuers
        )
        if not self._issuers:
            raise ValueError("at least one allowed issuer must be pinned")
        if not 0 <= leeway_seconds <= MAX_LEEWAY_SECONDS:
            raise ValueError(f"leeway must be between 0 and {MAX_LEEWAY_SECONDS:.0f} seconds")
        self._policy = policy
        self._keys = keys or IssuerKeys()
        self._leeway = leeway_seconds
        # not `or`: an empty cache is falsy (it has a length)
        self._replay = replay_cache if replay_cache is not None else ReplayCache(clock=clock)
        self._metrics = metrics
        self._clock = clock

    async def verify(self, token: str, *, expected_nonce: str | None = None) -> VerifiedAttestation:
        """Verify `token`; raises AttestationError naming the failed check."""
        try:
            return await self._verify(token, expected_nonce)
        except AttestationError as exc:
            if self._metrics is not None:
                self._metrics.attestation_failures.labels(reason=exc.reason.value).inc()
            log.warning("attestation token refused (%s): %s", exc.reason.value, exc)
            raise

    def _header(self, token: str) -> str:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise AttestationError(AttestationFailure.MALFORMED, "the token is empty or too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise AttestationError(
                AttestationFailure.MALFORMED, f"the token is not a JWT: {exc}"
            ) from exc
        algorithm = header.get("alg")
        if algorithm != ALLOWED_ALGORITHM:
            raise AttestationError(
                AttestationFailure.ALGORITHM,
                f"token algorithm {algorithm!r} is not accepted; attestation tokens must be "
                f"signed {ALLOWED_ALGORITHM}",
            )
        for ignored in ("jku", "x5u", "jwk"):
            if ignored in header:
                log.debug(
                    "ignoring the token's %r header: keys come only from the pinned issuer", ignored
                )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AttestationError(AttestationFailure.MALFORMED, "the token header has no 'kid'")
        return kid

    def _issuer(self, token: str) -> str:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.DecodeError as exc:
            raise AttestationError(
                AttestationFailure.MALFORMED, f"the token payload is not JSON: {exc}"
            ) from exc
        issuer = unverified.get("iss")
        if not isinstance(issuer, str):
            raise AttestationError(AttestationFailure.ISSUER, "the token has no 'iss' claim")
        normalized = issuer.rstrip("/")
        if normalized not in self._issuers:
            allowed = ", ".join(sorted(self._issuers))
            raise AttestationError(
                AttestationFailure.ISSUER,
                f"issuer {issuer!r} is not one of the allowed issuers ({allowed})",
            )
        return normalized

    def _check_times(self, claims: Mapping[str, Any]) -> float:
        now = self._clock()
        expires = _numeric_claim(claims, "exp", required=True)
        assert expires is not None
        if now > expires + self._leeway:
            raise AttestationError(
                AttestationFailure.EXPIRED,
                f"the token expired at {_when(expires)} (now {_when(now)}, "
                f"leeway {self._leeway:.0f}s)",
            )
        not_before = _numeric_claim(claims, "nbf", required=False)
        if not_before is not None and now + self._leeway < not_before:
            raise AttestationError(
                AttestationFailure.NOT_YET_VALID,
                f"the token is not valid before {_when(not_before)} (now {_when(now)})",
            )
        return expires

    def _check_nonce(
        self, claims: Mapping[str, Any], expected: str | None, expires: float
    ) -> str | None:
        placement = self._policy.placement
        nonce = token_nonce(claims, placement)
        if expected is None and not self._policy.require_nonce:
            return nonce
        if nonce is None:
            claim = runtime_data_claim(placement, NONCE)
            raise AttestationError(
                AttestationFailure.NONCE,
                f"the token carries no nonce ({claim}), so its freshness is unknown",
            )
        if expected is not None and not hmac.compare_digest(
            nonce.encode("utf-8"), expected.encode("utf-8")
        ):
            raise AttestationError(
                AttestationFailure.NONCE, "the token's nonce is not the nonce this verifier issued"
            )
        try:
            first = self._replay.first_use(nonce, expires + self._leeway)
        except ReplayCacheFullError as exc:
            raise AttestationError(AttestationFailure.REPLAY, str(exc)) from exc
        if not first:
            raise AttestationError(
                AttestationFailure.REPLAY,
                "the token's nonce was already used: this is a replayed token",
            )
        return nonce

    async def _verify(self, token: str, expected_nonce: str | None) -> VerifiedAttestation:
        kid = self._header(token)
        issuer = self._issuer(token)
        try:
            key = await self._keys.key_for(issuer, kid)
        except SigningKeyError as exc:
            raise AttestationError(AttestationFailure.SIGNING_KEY, str(exc)) from exc
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALLOWED_ALGORITHM],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.InvalidSignatureError as exc:
            raise AttestationError(
                AttestationFailure.SIGNATURE,
                f"the signature does not verify with {issuer}'s key {kid!r}: the token is forged "
                "or altered",
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise AttestationError(
                AttestationFailure.MALFORMED, f"the token is invalid: {exc}"
            ) from exc
        expires = self._check_times(claims)
        tee_type = self._policy.check(claims)
        nonce = self._check_nonce(claims, expected_nonce, expires)
        return VerifiedAttestation(
            issuer=issuer,
            attestation_type=tee_type,
            expires_at=datetime.fromtimestamp(expires, UTC),
            nonce=nonce,
            claims=claims,
        )
