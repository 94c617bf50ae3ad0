"""Reading and writing artifacts (sealed models, datasets, reports) by URI.

    file:///path                      a local path or a mounted volume
    https://host/path                 a plain HTTPS download (read only)
    az://account/container/blob/path  Azure Blob Storage

Blob access uses `AZURE_STORAGE_CONNECTION_STRING` when set (Azurite in tests), otherwise the
account's endpoint (`VEIL_BLOB_ENDPOINT` overrides it) with DefaultAzureCredential, which is
workload identity in a pod. Downloads stream to disk and are checked against a sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

CHUNK = 1 << 20


class ArtifactError(Exception):
    """An artifact could not be read or written, or its digest did not match."""


@dataclass(frozen=True)
class BlobLocation:
    account: str
    container: str
    blob: str


def parse_blob_uri(uri: str) -> BlobLocation:
    parsed = urlparse(uri)
    parts = parsed.path.lstrip("/").split("/", 1)
    if parsed.scheme != "az" or not parsed.netloc or len(parts) != 2 or not parts[1]:
        raise ArtifactError(f"{uri!r} is not az://account/container/blob")
    return BlobLocation(parsed.netloc, parts[0], parts[1])


def _blob_client(location: BlobLocation) -> Any:
    from azure.storage.blob import BlobServiceClient

    connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection:
        service = BlobServiceClient.from_connection_string(connection)
    else:
        from azure.identity import DefaultAzureCredential

        endpoint = os.environ.get(
            "VEIL_BLOB_ENDPOINT", f"https://{location.account}.blob.core.windows.net"
        )
        service = BlobServiceClient(endpoint, credential=DefaultAzureCredential())
    return service.get_blob_client(location.container, location.blob)


def _chunks(uri: str) -> Iterator[bytes]:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        with open(parsed.path, "rb") as source:
            while chunk := source.read(CHUNK):
                yield chunk
    elif parsed.scheme == "https":
        with urllib.request.urlopen(uri, timeout=60) as response:
            while chunk := response.read(CHUNK):
                yield chunk
    elif parsed.scheme == "az":
        downloader = _blob_client(parse_blob_uri(uri)).download_blob()
        yield from downloader.chunks()
    else:
        raise ArtifactError(f"unsupported URI scheme {parsed.scheme!r} in {uri!r}")


def fetch(uri: str, output: Path, sha256: str | None = None) -> str:
    """Stream `uri` into `output`; return its sha256, refusing a mismatch with `sha256`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=output.parent, delete=False) as partial:
        try:
            for chunk in _chunks(uri):
                digest.update(chunk)
                partial.write(chunk)
        except OSError as failed:
            os.unlink(partial.name)
            raise ArtifactError(f"could not read {uri}: {failed}") from failed
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        os.unlink(partial.name)
        raise ArtifactError(
            f"{uri} has sha256 {digest.hexdigest()}, expected {sha256.lower()}: refusing it"
        )
    os.replace(partial.name, output)
    return digest.hexdigest()


def read_bytes(uri: str) -> bytes:
    return b"".join(_chunks(uri))


def put(uri: str, source: IO[bytes]) -> None:
    """Write a stream to `uri` (file:// or az://), replacing what is there."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        target = Path(parsed.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as partial:
            shutil.copyfileobj(source, partial, CHUNK)
        os.replace(partial.name, target)
    elif parsed.scheme == "az":
        _blob_client(parse_blob_uri(uri)).upload_blob(source, overwrite=True)
    else:
        raise ArtifactError(f"cannot write to {uri!r}: use file:// or az://")
