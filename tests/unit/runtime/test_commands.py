"""`veil seal | unseal | verify | serve` as registered by `veil.runtime.commands.register`."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.runtime.commands import register

from .doubles import HOSTDATA, TestAuthority, TrainedModel, aci_claims, write_pem

# The lead wires `register` into veil/cli.py; until then a subprocess builds the same parser.
_CLI = (
    "import argparse, sys\n"
    "from veil.runtime.commands import register\n"
    "parser = argparse.ArgumentParser(prog='veil')\n"
    "register(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    code = args.func(args)
    assert isinstance(code, int)
    return code


@pytest.fixture
def keys(tmp_path: Path, model_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> Path:
    write_pem(tmp_path / "model.pub.pem", model_key, public=True)
    write_pem(tmp_path / "model.key.pem", model_key)
    write_pem(tmp_path / "other.key.pem", other_key)
    return tmp_path


def test_seal_then_unseal(
    keys: Path, breast_cancer_model: TrainedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    model = keys / "model.onnx"
    model.write_bytes(breast_cancer_model.onnx_bytes)
    sealed = keys / "model.sealed"
    code = _run(
        "seal", str(model), str(sealed), "--public-key", str(keys / "model.pub.pem"),
        "--key-id", "https://vault.test/keys/cancer/1", "--chunk-size", "512",
    )  # fmt: skip
    assert code == 0
    described = json.loads(capsys.readouterr().out)
    assert described["key_id"] == "https://vault.test/keys/cancer/1"
    assert described["chunk_size"] == 512
    assert described["plaintext_size"] == len(breast_cancer_model.onnx_bytes)

    out = keys / "decrypted.onnx"
    assert _run("unseal", str(sealed), str(out), "--private-key", str(keys / "model.key.pem")) == 0
    assert out.read_bytes() == breast_cancer_model.onnx_bytes
    assert out.stat().st_mode & 0o077 == 0
    assert "LOCAL DEBUGGING ONLY" in capsys.readouterr().err.upper()
    # refuses to clobber without --force
    assert _run("unseal", str(sealed), str(out), "--private-key", str(keys / "model.key.pem")) == 1
    assert "pass --force" in capsys.readouterr().err


def test_unseal_with_the_wrong_key_fails_cleanly(
    keys: Path, mlp_model: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    model = keys / "mlp.onnx"
    model.write_bytes(mlp_model)
    sealed = keys / "mlp.sealed"
    assert _run("seal", str(model), str(sealed), "--public-key", str(keys / "model.pub.pem")) == 0
    out = keys / "never.onnx"
    code = _run("unseal", str(sealed), str(out), "--private-key", str(keys / "other.key.pem"))
    assert code == 1
    assert "thumbprint" in capsys.readouterr().err
    assert not out.exists()


def test_help_marks_local_debugging_paths() -> None:
    parser = _parser()
    subcommands = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    assert set(subcommands) >= {"seal", "unseal", "verify", "serve"}
    for name in ("unseal", "serve"):
        assert "LOCAL DEBUGGING ONLY" in " ".join(subcommands[name].format_help().split())


@pytest.mark.anyio
async def test_verify_command(
    authority: TestAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"placement": "confidentialACI", "hostdata": HOSTDATA}))
    common = ["--policy", str(policy), "--issuer", "https://sharedeus.eus.attest.azure.net"]
    common += ["--issuer", authority.issuer, "--allow-http-loopback-issuer"]

    good = authority.token(aci_claims("n-1"))
    args = _parser().parse_args(["verify", good, *common, "--nonce", "n-1"])
    assert await asyncio.to_thread(args.func, args) == 0
    verified = json.loads(capsys.readouterr().out)
    assert verified["verified"] is True
    assert verified["attestation_type"] == "sevsnpvm"

    bad = authority.token(aci_claims(**{"x-ms-sevsnpvm-is-debuggable": True}))
    args = _parser().parse_args(["verify", bad, *common])
    assert await asyncio.to_thread(args.func, args) == 1
    assert "refused (debuggable)" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1].decode()
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server never became ready")


def test_serve_command_serves_and_stops_on_sigterm(keys: Path, mlp_model: bytes) -> None:
    model = keys / "mlp.onnx"
    model.write_bytes(mlp_model)
    sealed = keys / "mlp.sealed"
    assert _run("seal", str(model), str(sealed), "--public-key", str(keys / "model.pub.pem")) == 0
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-c", _CLI, "serve", "--model-name", "mlp", "--sealed", str(sealed),
            "--private-key", str(keys / "model.key.pem"), "--host", "127.0.0.1",
            "--port", str(port), "--drain-seconds", "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        response = httpx.post(
            f"{url}/v2/models/mlp/infer",
            json={
                "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
            },
        )
        assert response.status_code == 200
        assert response.json()["outputs"][0]["shape"] == [1, 3]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    logs = process.communicate()[1].decode()
    assert "LOCAL DEBUGGING ONLY" in logs
    assert "server stopped (exit code 0)" in logs


def test_serve_command_exits_nonzero_when_the_model_cannot_be_unsealed(
    keys: Path, mlp_model: bytes
) -> None:
    model = keys / "mlp.onnx"
    model.write_bytes(mlp_model)
    sealed = keys / "mlp.sealed"
    assert _run("seal", str(model), str(sealed), "--public-key", str(keys / "model.pub.pem")) == 0
    result = subprocess.run(
        [
            sys.executable, "-c", _CLI, "serve", "--model-name", "mlp", "--sealed", str(sealed),
            "--private-key", str(keys / "other.key.pem"), "--host", "127.0.0.1",
            "--port", str(_free_port()),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "could not be loaded" in result.stderr.decode()
