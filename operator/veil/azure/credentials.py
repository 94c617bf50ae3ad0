"""How Veil authenticates to Azure, and the transport options its Azure clients share.

Production: `DefaultAzureCredential`, which in an AKS pod with workload identity picks up
`AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and `AZURE_FEDERATED_TOKEN_FILE` (injected by the workload
identity webhook into pods whose ServiceAccount carries `azure.workload.identity/client-id`) and
exchanges the projected service-account token for Entra ID tokens. TLS is verified against the
system trust store.

Environment (read by `AzureSettings.from_env`):

    VEIL_AZURE_CA_BUNDLE               PEM file of extra trusted CAs (a proxy or an emulator).
    VEIL_AZURE_ARM_ENDPOINT            Resource Manager base URL (default: the public cloud's).
    VEIL_AZURE_TIMEOUT_SECONDS         How long one Azure request may wait to connect and for
                                       each read of its answer (default 30 s, not azure-core's
                                       300 s: a reconcile worker waits that long for a hung
                                       service, and Key Vault and ARM answer in well under 30 s).
    VEIL_AZURE_STATIC_TOKEN            TEST ONLY. A fixed bearer token instead of Entra ID, for
                                       local emulators (Lowkey Vault, the test doubles). Also
                                       turns off Key Vault's challenge-resource check, which an
                                       emulator on 127.0.0.1 can never pass. Never set it in a
                                       real cluster: Azure rejects such tokens anyway, and the
                                       operator logs a warning at start.
    VEIL_AZURE_INSECURE_SKIP_TLS_VERIFY TEST ONLY, and only together with VEIL_AZURE_STATIC_TOKEN:
                                       "true" skips TLS verification (an emulator's self-signed
                                       certificate whose CA you do not have).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from azure.core.credentials import (
    AccessToken,
    AccessTokenInfo,
    TokenCredential,
    TokenRequestOptions,
)

log = logging.getLogger("veil.azure")

ENV_STATIC_TOKEN: Final = "VEIL_AZURE_STATIC_TOKEN"
ENV_CA_BUNDLE: Final = "VEIL_AZURE_CA_BUNDLE"
ENV_INSECURE: Final = "VEIL_AZURE_INSECURE_SKIP_TLS_VERIFY"
ENV_ARM_ENDPOINT: Final = "VEIL_AZURE_ARM_ENDPOINT"
ENV_TIMEOUT: Final = "VEIL_AZURE_TIMEOUT_SECONDS"
# Connect and per-read timeout of every Azure request unless VEIL_AZURE_TIMEOUT_SECONDS says.
DEFAULT_TIMEOUT_SECONDS: Final = 30.0

_TRUE = frozenset({"1", "true", "yes", "on"})


class StaticTokenCredential:
    """TEST ONLY: hands out one fixed bearer token for every scope.

    Implements both `TokenCredential.get_token` and `SupportsTokenInfo.get_token_info`, so the
    SDKs' bearer-token policies accept it. Local emulators check that a token is present, not
    what it says; Azure itself would reject it.
    """

    def __init__(self, token: str, lifetime_seconds: int = 3600) -> None:
        if not token:
            raise ValueError("a static token must not be empty")
        self._token = token
        self._lifetime = lifetime_seconds

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + self._lifetime)

    def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        return AccessTokenInfo(self._token, int(time.time()) + self._lifetime)

    def close(self) -> None:
        """Nothing to release; present for parity with azure-identity credentials."""

    def __enter__(self) -> StaticTokenCredential:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def default_credential() -> TokenCredential:
    """Production credential: DefaultAzureCredential (workload identity in AKS), with the
    interactive and developer-tool sources that make no sense in a pod left out."""
    from azure.identity import DefaultAzureCredential

    credential: TokenCredential = DefaultAzureCredential(
        exclude_interactive_browser_credential=True,
        exclude_visual_studio_code_credential=True,
        exclude_powershell_credential=True,
        exclude_developer_cli_credential=True,
    )
    return credential


@dataclass(frozen=True)
class AzureSettings:
    """What every Veil Azure client is built with.

    `connection_verify` is True (system trust store), a path to a PEM CA bundle, or False
    (test only). `verify_challenge_resource` is Key Vault's check that the vault's auth challenge
    names a resource matching the vault's host; only emulators turn it off. `arm_endpoint` None
    means the public cloud's Resource Manager. `timeout_seconds` is every request's connection
    and read timeout (None keeps azure-core's, 300 s).
    """

    credential: TokenCredential
    connection_verify: bool | str = True
    verify_challenge_resource: bool = True
    arm_endpoint: str | None = None
    emulator: bool = False
    extra_client_kwargs: Mapping[str, Any] = field(default_factory=dict)
    timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any azure-core based client constructor."""
        timeouts: dict[str, Any] = {}
        if self.timeout_seconds is not None:
            timeouts = {
                "connection_timeout": self.timeout_seconds,
                "read_timeout": self.timeout_seconds,
            }
        return {"connection_verify": self.connection_verify, **timeouts, **self.extra_client_kwargs}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AzureSettings:
        """Settings from the environment (see the module docstring). Raises ValueError for an
        unsafe or inconsistent combination."""
        env = os.environ if env is None else env
        static_token = env.get(ENV_STATIC_TOKEN, "")
        ca_bundle = env.get(ENV_CA_BUNDLE, "")
        insecure = env.get(ENV_INSECURE, "").strip().lower() in _TRUE
        arm_endpoint = env.get(ENV_ARM_ENDPOINT, "") or None
        timeout = _timeout(env.get(ENV_TIMEOUT, ""))

        if insecure and not static_token:
            raise ValueError(
                f"{ENV_INSECURE} is for local emulators only and needs {ENV_STATIC_TOKEN}; "
                "against Azure, trust a CA bundle with "
                f"{ENV_CA_BUNDLE} instead of turning verification off"
            )
        if ca_bundle and not os.path.isfile(ca_bundle):
            raise ValueError(f"{ENV_CA_BUNDLE}={ca_bundle!r} is not a readable file")
        if arm_endpoint is not None and not arm_endpoint.startswith("https://"):
            raise ValueError(f"{ENV_ARM_ENDPOINT} must be an https URL, got {arm_endpoint!r}")

        verify: bool | str = ca_bundle or True
        if insecure:
            verify = False
        if static_token:
            log.warning(
                "%s is set: using a static bearer token (TEST ONLY, for local emulators); "
                "Key Vault challenge-resource verification is off",
                ENV_STATIC_TOKEN,
            )
            return cls(
                credential=StaticTokenCredential(static_token),
                connection_verify=verify,
                verify_challenge_resource=False,
                arm_endpoint=arm_endpoint,
                emulator=True,
                timeout_seconds=timeout,
            )
        return cls(
            credential=default_credential(),
            connection_verify=verify,
            arm_endpoint=arm_endpoint,
            timeout_seconds=timeout,
        )

    @classmethod
    def for_emulator(
        cls,
        token: str = "veil-emulator-token",
        *,
        connection_verify: bool | str = True,
        arm_endpoint: str | None = None,
    ) -> AzureSettings:
        """TEST ONLY: settings for local emulators and doubles, built in code."""
        return cls(
            credential=StaticTokenCredential(token),
            connection_verify=connection_verify,
            verify_challenge_resource=False,
            arm_endpoint=arm_endpoint,
            emulator=True,
        )


def _timeout(text: str) -> float:
    """VEIL_AZURE_TIMEOUT_SECONDS as seconds (the default when unset); ValueError when not
    positive."""
    if not text.strip():
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:  # also refuses nan
        raise ValueError(f"{ENV_TIMEOUT} must be a positive number of seconds, got {text!r}")
    return seconds
