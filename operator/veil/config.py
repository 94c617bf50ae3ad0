"""Operator-wide settings, read once from the environment (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from veil import __version__
from veil.resources.kata_policy import ImageConfig


@dataclass(frozen=True)
class Images:
    """Container images the operator puts into the pods it builds."""

    # The chart passes the operator's own image, pinned by digest, as VEIL_RUNTIME_IMAGE.
    runtime: str = f"ghcr.io/veil-dev/veil:{__version__}"
    # Microsoft's Secure Key Release sidecar (confidential-sidecar-containers), by digest: on
    # ACI the CCE policy measures exactly this image.
    key_release: str = (
        "mcr.microsoft.com/aci/skr@sha256:"
        "baa6acf093c011cb26799187b6a535e32bd8248f52dd2cd9c606732b8a23c112"
    )
    # The DP-SGD trainer (the Dockerfile's `trainer` target: the runtime plus torch and
    # Opacus, kept out of the runtime image). None: DP-SGD training stalls saying to set it.
    trainer: str | None = None

    def by_tag(self) -> list[str]:
        """The images not pinned by digest (a tag can be moved to other content)."""
        images = (self.runtime, self.key_release, self.trainer)
        return [image for image in images if image is not None and not pinned(image)]


def pinned(image: str) -> bool:
    """Whether an image reference names its content: `name@sha256:<64 hex>`."""
    _, _, digest = image.partition("@sha256:")
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


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
    # text or json: the log format of the runtime, synthesizer and trainer (VEIL_LOG_FORMAT).
    log_format: str = "text"


@dataclass(frozen=True)
class NodeAgentSettings:
    """Where confidential-VM model pods ask for their key: the node agent's Service (the chart's
    DaemonSet; internalTrafficPolicy Local, so a pod reaches the agent of its own node)."""

    url: str = "http://veil-node-agent.veil-system.svc:8095"
    namespace: str = "veil-system"
    # The agent pods' labels, for the model pods' egress allowance.
    pod_labels: tuple[tuple[str, str], ...] = (
        ("app.kubernetes.io/name", "veil"),
        ("app.kubernetes.io/component", "node-agent"),
    )

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80


@dataclass(frozen=True)
class OperatorConfig:
    images: Images = Images()
    key_release_port: int = 8080
    pods: PodSettings = PodSettings()
    node_agent: NodeAgentSettings = NodeAgentSettings()
    # The config (entrypoint, cmd, env, working dir) of each image Veil runs: on Confidential
    # Containers the agent policy pins what the image contributes (VEIL_IMAGE_CONFIGS).
    image_configs: Mapping[str, ImageConfig] = field(default_factory=dict)
    # The namespace whose Prometheus may scrape the model pods' metrics port
    # (VEIL_METRICS_SCRAPER_NAMESPACE).
    metrics_scraper_namespace: str | None = None
    # Development only: accept images by tag (VEIL_ALLOW_IMAGE_TAGS).
    allow_image_tags: bool = False

    def image_problem(self) -> str | None:
        """Why the operator must not start with these images, or None."""
        unpinned = self.images.by_tag()
        if not unpinned or self.allow_image_tags:
            return None
        return (
            f"images must be pinned by digest (name@sha256:...), not by tag: {', '.join(unpinned)}"
            "; set the chart's image.digest (or VEIL_ALLOW_IMAGE_TAGS=true in development)"
        )

    @classmethod
    def from_env(cls) -> OperatorConfig:
        defaults = Images()
        return cls(
            images=Images(
                runtime=os.environ.get("VEIL_RUNTIME_IMAGE", defaults.runtime),
                key_release=os.environ.get("VEIL_SKR_IMAGE", defaults.key_release),
                trainer=os.environ.get("VEIL_TRAINER_IMAGE") or None,
            ),
            key_release_port=int(os.environ.get("VEIL_SKR_PORT", "8080")),
            allow_image_tags=os.environ.get("VEIL_ALLOW_IMAGE_TAGS", "").lower() == "true",
            image_configs=image_configs(os.environ.get("VEIL_IMAGE_CONFIGS", "")),
            metrics_scraper_namespace=os.environ.get("VEIL_METRICS_SCRAPER_NAMESPACE") or None,
            node_agent=NodeAgentSettings(
                url=os.environ.get("VEIL_NODE_AGENT_URL", NodeAgentSettings.url),
                namespace=os.environ.get("VEIL_NODE_AGENT_NAMESPACE", NodeAgentSettings.namespace),
            ),
            pods=PodSettings(
                env_secret=os.environ.get("VEIL_POD_ENV_SECRET") or None,
                trust_bundle=os.environ.get("VEIL_POD_TRUST_BUNDLE") or None,
                log_format=os.environ.get("VEIL_LOG_FORMAT", "").strip().lower() or "text",
            ),
        )


def image_configs(text: str) -> dict[str, ImageConfig]:
    """`{"image@sha256:...": {"entrypoint": [...], "cmd": [...], "env": [...], "workingDir": ""}}`
    (the OCI image config's fields, as `buildah inspect` or `crane config` print them); raises
    ValueError naming what is wrong."""
    if not text.strip():
        return {}
    try:
        parsed: Any = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"VEIL_IMAGE_CONFIGS is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValueError("VEIL_IMAGE_CONFIGS must map image references to their configs")
    configs = {}
    for image, config in parsed.items():
        if not isinstance(config, dict):
            raise ValueError(f"VEIL_IMAGE_CONFIGS[{image!r}] is not an object")
        fields = {}
        for key, attribute in (("entrypoint", "entrypoint"), ("cmd", "cmd"), ("env", "env")):
            value = config.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"VEIL_IMAGE_CONFIGS[{image!r}].{key} must be a list of strings")
            fields[attribute] = tuple(value)
        working_dir = config.get("workingDir") or ""
        if not isinstance(working_dir, str):
            raise ValueError(f"VEIL_IMAGE_CONFIGS[{image!r}].workingDir must be a string")
        configs[str(image)] = ImageConfig(
            entrypoint=fields["entrypoint"],
            cmd=fields["cmd"],
            env=fields["env"],
            working_dir=working_dir,
        )
    return configs
