"""Which Key Vault key version a sealed model is wrapped to, read from its header, and the
checks the runtime makes on the sealed file before it asks for any key. Pure, except the file
reads of `check_sealed_file`.

`veil seal --vault-url` records the versioned key id (`https://{vault}/keys/{name}/{version}`)
in the header. The runtime releases exactly that version (a policy change makes a new version,
and the model's data key stays wrapped to the old one until the model is re-sealed), and the
fetch step reports it so the operator can tell whether a re-seal is due and which versions
nothing serves from any more.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from veil.runtime.sealing import SealedHeader, SealedModelError

_VERSIONED_KEY_PATH = re.compile(
    r"/keys/(?P<name>[0-9A-Za-z-]{1,127})/(?P<version>[0-9A-Za-z]{1,64})"
)
READ_CHUNK = 1 << 20


class SealedKeyMismatchError(SealedModelError):
    """The sealed model names a key other than the one this model releases."""


@dataclass(frozen=True)
class SealedKey:
    """The key a sealed model names: a Key Vault key version, or only a thumbprint (sealed to a
    public key file without a key id)."""

    key_id: str
    vault_host: str | None
    key_name: str | None
    version: str | None
    thumbprint: str | None

    @classmethod
    def from_header(cls, header: SealedHeader) -> SealedKey:
        return cls.parse(header.key_id, header.key_thumbprint)

    @classmethod
    def parse(cls, key_id: str, thumbprint: str | None = None) -> SealedKey:
        parts = urlsplit(key_id)
        match = _VERSIONED_KEY_PATH.fullmatch(parts.path.rstrip("/"))
        if parts.scheme == "https" and parts.netloc and match:
            return cls(key_id, parts.netloc.lower(), match["name"], match["version"], thumbprint)
        return cls(key_id, None, None, None, thumbprint)

    def report(self) -> str:
        """What the fetch step writes to its termination message for the operator."""
        return json.dumps(
            {"sealedKeyId": self.key_id, "sealedKeyThumbprint": self.thumbprint},
            sort_keys=True,
        )

    @classmethod
    def from_report(cls, message: str) -> SealedKey | None:
        """The inverse of `report`; None for a message that is not one."""
        try:
            parsed = json.loads(message)
        except ValueError:
            return None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("sealedKeyId"), str):
            return None
        thumbprint = parsed.get("sealedKeyThumbprint")
        return cls.parse(parsed["sealedKeyId"], thumbprint if isinstance(thumbprint, str) else None)

    def release_path(self, akv_endpoint: str, key_name: str) -> str:
        """`name/version` to release for this sealed model, from the vault host and key name
        the model is configured with; only `name` (the latest version) when the header names no
        version. Raises SealedKeyMismatchError when the header names another vault or key."""
        if self.key_name is None:
            return key_name
        if self.vault_host != akv_endpoint.lower() or self.key_name != key_name:
            raise SealedKeyMismatchError(
                f"the model is sealed to {self.key_id}, not to a version of key {key_name!r} "
                f"in {akv_endpoint}: re-seal it to that key (veil seal --vault-url "
                f"https://{akv_endpoint} --key-name {key_name})"
            )
        return f"{key_name}/{self.version}"


def check_sealed_file(path: Path, sha256: str, max_bytes: int) -> None:
    """Refuse a sealed file larger than `max_bytes` or whose sha256 is not the pinned one,
    before any key is released for it: whoever holds the public key can seal a substitute."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SealedModelError(
                f"sealed model {path} is {size} bytes, over the limit of {max_bytes}"
            )
        digest = hashlib.sha256()
        with path.open("rb") as source:
            while chunk := source.read(READ_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise SealedModelError(f"cannot read sealed model {path}: {exc.strerror or exc}") from exc
    if not hmac.compare_digest(digest.hexdigest(), sha256.lower()):
        raise SealedModelError(
            f"sealed model {path} has sha256 {digest.hexdigest()}, not the pinned "
            f"{sha256.lower()}: refusing to release a key for it"
        )
