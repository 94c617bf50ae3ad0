from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from veil.artifacts import ArtifactError, fetch, parse_blob_uri, put, read_bytes
from veil.cli import main


def test_fetch_checks_the_digest(tmp_path: Path) -> None:
    source = tmp_path / "model.sealed"
    source.write_bytes(b"ciphertext" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "out" / "copy"
    assert fetch(source.as_uri(), out, digest) == digest
    assert out.read_bytes() == source.read_bytes()
    with pytest.raises(ArtifactError, match="expected"):
        fetch(source.as_uri(), tmp_path / "bad", "0" * 64)
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []


def test_cli_fetch_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["fetch", "--uri", (tmp_path / "missing").as_uri(), "--output", str(tmp_path / "x")]
    )
    assert code == 1
    assert "could not read" in capsys.readouterr().err


def test_put_and_read_round_trip(tmp_path: Path) -> None:
    uri = (tmp_path / "a" / "b.csv").as_uri()
    put(uri, io.BytesIO(b"x,y\n1,2\n"))
    assert read_bytes(uri) == b"x,y\n1,2\n"


def test_blob_uris() -> None:
    location = parse_blob_uri("az://acct/container/dir/file.csv")
    assert (location.account, location.container, location.blob) == (
        "acct",
        "container",
        "dir/file.csv",
    )
    for bad in ("az://acct/container", "https://x/y", "az:///c/b"):
        with pytest.raises(ArtifactError):
            parse_blob_uri(bad)
    with pytest.raises(ArtifactError, match="unsupported"):
        read_bytes("ftp://host/file")
