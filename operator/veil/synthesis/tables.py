"""Tables in and out by URI: CSV or Parquet, through `veil.artifacts` (file://, https://, az://).

Sources are downloaded into a private temporary directory that is removed as soon as the
table is parsed: sensitive data never lands in a cache.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from veil.artifacts import ArtifactError, fetch, put

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

TableFormat = Literal["csv", "parquet"]
FORMATS: tuple[str, ...] = ("csv", "parquet")


def as_uri(location: str) -> str:
    """A URI as is; a plain path as a file:// URI of its absolute path."""
    if "://" in location:
        return location
    return "file://" + str(Path(location).expanduser().resolve())


def infer_format(uri: str, default: str = "csv") -> str:
    suffix = Path(urlparse(uri).path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    return default


def _parquet_engine() -> str:
    try:
        import pyarrow  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError as missing:
        raise ArtifactError(
            "Parquet needs pyarrow, which is not installed (pip install pyarrow)"
        ) from missing
    return "pyarrow"


def read_table(uri: str, fmt: str = "csv") -> pd.DataFrame:
    import pandas as pd

    if fmt not in FORMATS:
        raise ArtifactError(f"unknown table format {fmt!r}: use csv or parquet")
    with tempfile.TemporaryDirectory(prefix="veil-table-") as tmp:
        local = Path(tmp) / "table"
        fetch(as_uri(uri), local)
        try:
            if fmt == "parquet":
                return pd.read_parquet(local, engine=_parquet_engine())
            return pd.read_csv(local)
        except (ValueError, OSError) as bad:
            raise ArtifactError(f"{uri} is not a readable {fmt} table: {bad}") from bad


def table_bytes(data: pd.DataFrame, fmt: str = "csv") -> bytes:
    if fmt == "parquet":
        buffer = io.BytesIO()
        data.to_parquet(buffer, engine=_parquet_engine(), index=False)
        return buffer.getvalue()
    if fmt == "csv":
        text: str = data.to_csv(index=False)
        return text.encode("utf-8")
    raise ArtifactError(f"unknown table format {fmt!r}: use csv or parquet")


def write_bytes(location: str, payload: bytes) -> str:
    """Write to a URI (file://, az://) or a plain path; returns the payload's sha256.

    A plain path is written in place (so `/dev/termination-log` works); URIs atomically.
    """
    if "://" in location:
        put(location, io.BytesIO(payload))
    else:
        try:
            Path(location).write_bytes(payload)
        except OSError as failed:
            raise ArtifactError(f"could not write {location}: {failed}") from failed
    return hashlib.sha256(payload).hexdigest()
