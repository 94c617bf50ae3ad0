"""Operator-wide settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from veil import __version__


@dataclass(frozen=True)
class Images:
    """Container images the operator puts into the pods it builds."""

    runtime: str = f"ghcr.io/veil-dev/veil:{__version__}"
    # Microsoft's Secure Key Release sidecar (confidential-sidecar-containers).
    key_release: str = "mcr.microsoft.com/aci/skr:2.7"


@dataclass(frozen=True)
class PodSettings:
    """What every container of Veil's pods gets, for clusters whose Azure endpoints or trust
    differ from public Azure (sovereign clouds, private CAs, the local stand-ins): both name
    objects that must exist in each workload's namespace, as trust-manager distributes them."""

    # A Secret whose keys become environment variables (envFrom, optional).
    env_secret: str | None = None
    # A ConfigMap with `ca.crt`, the CA bundle TLS clients in the pods trust instead of the
    # image's own.
    trust_bundle: str | None = None


@dataclass(frozen=True)
class OperatorConfig:
    images: Images = Images()
    key_release_port: int = 8080
    pods: PodSettings = PodSettings()

    @classmethod
    def from_env(cls) -> OperatorConfig:
        defaults = Images()
        return cls(
            images=Images(
                runtime=os.environ.get("VEIL_RUNTIME_IMAGE", defaults.runtime),
                key_release=os.environ.get("VEIL_SKR_IMAGE", defaults.key_release),
            ),
            key_release_port=int(os.environ.get("VEIL_SKR_PORT", "8080")),
            pods=PodSettings(
                env_secret=os.environ.get("VEIL_POD_ENV_SECRET") or None,
                trust_bundle=os.environ.get("VEIL_POD_TRUST_BUNDLE") or None,
            ),
        )
