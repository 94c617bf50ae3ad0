"""Tables in and out by URI: CSV or Parquet, through `veil.artifacts` (file://, https://, az://).

Sources are downloaded into a private temporary directory that is removed as soon as the
table is parsed: sensitive data never lands in a cache. The header can be read (and checked)
before any row is parsed. Errors never quote the data: a parser's own message may.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
import warnings
from collections.abc import Iterator, Sequence
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


@contextlib.contextmanager
def fetched(uri: str) -> Iterator[Path]:
    """The table's bytes in a private temporary file, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="veil-table-") as tmp:
        local = Path(tmp) / "table"
        fetch(as_uri(uri), local)
        yield local


def _unreadable(fmt: str, bad: Exception) -> ArtifactError:
    # A parser's message may quote the data (a line, a value): only its type leaves.
    return ArtifactError(f"the source is not a readable {fmt} table ({type(bad).__name__})")


def read_header(local: Path, fmt: str = "csv") -> list[str]:
    """The column names only: no row is parsed."""
    import pandas as pd

    _check_format(fmt)
    try:
        if fmt == "parquet":
            from pyarrow import parquet  # type: ignore[import-untyped,unused-ignore]

            _parquet_engine()
            return [str(name) for name in parquet.read_schema(local).names]
        return [str(name) for name in pd.read_csv(local, nrows=0).columns]
    except (ValueError, OSError) as bad:
        raise _unreadable(fmt, bad) from None


def read_rows(local: Path, fmt: str, columns: Sequence[str]) -> pd.DataFrame:
    """The named columns of every row."""
    import pandas as pd

    _check_format(fmt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DtypeWarning says which columns mix types
            if fmt == "parquet":
                return pd.read_parquet(local, engine=_parquet_engine(), columns=list(columns))
            return pd.read_csv(local, usecols=list(columns))
    except (ValueError, OSError) as bad:
        raise _unreadable(fmt, bad) from None


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ArtifactError(f"unknown table format {fmt!r}: use csv or parquet")


def read_table(uri: str, fmt: str = "csv") -> pd.DataFrame:
    """The whole table (header and rows at once)."""
    with fetched(uri) as local:
        header = read_header(local, fmt)
        return read_rows(local, fmt, header)


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
