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
class OperatorConfig:
    images: Images = Images()
    key_release_port: int = 8080

    @classmethod
    def from_env(cls) -> OperatorConfig:
        defaults = Images()
        return cls(
            images=Images(
                runtime=os.environ.get("VEIL_RUNTIME_IMAGE", defaults.runtime),
                key_release=os.environ.get("VEIL_SKR_IMAGE", defaults.key_release),
            ),
            key_release_port=int(os.environ.get("VEIL_SKR_PORT", "8080")),
        )
