"""Getting the served model into memory: release the key, unseal in memory, load onnxruntime.

A loader is a zero-argument coroutine function returning the loaded model; the server runs it as
a background task at startup and reports ready only when it succeeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from veil.runtime.key_release import KeyReleaseClient, ReleaseTarget
from veil.runtime.keywrap import load_private_key_pem
from veil.runtime.model import OnnxModel
from veil.runtime.sealed_key import SealedKey, check_sealed_file
from veil.runtime.sealing import read_header_file, unseal_file

log = logging.getLogger("veil.runtime.loader")

ModelLoader = Callable[[], Awaitable[OnnxModel]]
DEFAULT_MAX_SEALED_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class SealedPin:
    """The sealed file the spec pins: its sha256 and the largest size accepted."""

    sha256: str
    max_bytes: int = DEFAULT_MAX_SEALED_BYTES


async def verified_release_target(
    sealed: Path, target: ReleaseTarget, pin: SealedPin | None
) -> ReleaseTarget:
    """Check the sealed file against its pin (before any key is asked for), then name the key
    version its header is wrapped to. `target.kid` gives the key name (a version after the
    name is ignored: the header decides)."""
    if pin is not None:
        await asyncio.to_thread(check_sealed_file, sealed, pin.sha256, pin.max_bytes)
    header = await asyncio.to_thread(read_header_file, sealed)
    key_name = target.kid.split("/", 1)[0]
    kid = SealedKey.from_header(header).release_path(target.akv_endpoint, key_name)
    return dataclasses.replace(target, kid=kid)


async def unseal_and_load(
    sealed: Path,
    private_key: rsa.RSAPrivateKey,
    *,
    name: str,
    version: str = "1",
    max_model_bytes: int | None = None,
) -> OnnxModel:
    """Unseal `sealed` into memory with `private_key` and load it; CPU work runs off the loop."""
    plaintext = await asyncio.to_thread(
        unseal_file, sealed, private_key, max_plaintext_bytes=max_model_bytes
    )
    try:
        model = await asyncio.to_thread(OnnxModel.from_bytes, name, plaintext, version=version)
    finally:
        del plaintext
    log.info(
        "model %r version %s loaded: inputs %s, outputs %s",
        name,
        version,
        [spec.name for spec in model.inputs],
        [spec.name for spec in model.outputs],
    )
    return model


def key_release_loader(
    sealed: Path,
    client: KeyReleaseClient,
    target: ReleaseTarget,
    *,
    name: str,
    version: str = "1",
    max_model_bytes: int | None = None,
    pin: SealedPin | None = None,
) -> ModelLoader:
    """Production path: the SKR sidecar releases the key version the sealed header names, after
    attesting the TEE, and only for the sealed file the spec pins."""

    async def release() -> rsa.RSAPrivateKey:
        return await client.release(await verified_release_target(sealed, target, pin))

    return released_key_loader(
        sealed, release, name=name, version=version, max_model_bytes=max_model_bytes
    )


def released_key_loader(
    sealed: Path,
    release: Callable[[], Awaitable[rsa.RSAPrivateKey]],
    *,
    name: str,
    version: str = "1",
    max_model_bytes: int | None = None,
) -> ModelLoader:
    """Release the key (every path checks the sealed file first), unseal with it in memory and
    load; the key is dropped as soon as the model is in memory."""

    async def load() -> OnnxModel:
        key = await release()
        try:
            return await unseal_and_load(
                sealed, key, name=name, version=version, max_model_bytes=max_model_bytes
            )
        finally:
            del key

    return load


def private_key_file_loader(
    sealed: Path,
    private_key_pem: Path,
    *,
    name: str,
    version: str = "1",
    max_model_bytes: int | None = None,
) -> ModelLoader:
    """Local debugging path: the private key comes from a PEM file (no attestation at all)."""

    async def load() -> OnnxModel:
        log.warning(
            "loading %s with the private key file %s: LOCAL DEBUGGING ONLY, no attestation",
            sealed,
            private_key_pem,
        )
        key = load_private_key_pem(private_key_pem)
        try:
            return await unseal_and_load(
                sealed, key, name=name, version=version, max_model_bytes=max_model_bytes
            )
        finally:
            del key

    return load
