"""`python -m veil_standins` and `python -m veil_standins.skr` as processes, wired as a pod on a
local node would use them: the sidecar, configured only through its environment, releases a key
that the operator's code created in the vault stand-in."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509

from tests.unit.standins.conftest import release_key
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import key_client
from veil.runtime.key_release import KeyReleaseClient, ReleaseTarget, RetryPolicy

pytestmark = pytest.mark.anyio

ENV_KEYS = {
    "VEIL_AZURE_STATIC_TOKEN",
    "VEIL_AZURE_CA_BUNDLE",
    "VEIL_AZURE_ARM_ENDPOINT",
    "VEIL_DEMO_VAULT_URL",
    "VEIL_DEMO_MAA_URL",
}


@contextmanager
def _process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait(ready: object, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited {process.returncode}: {log.read_text()[-2000:]}")
        if callable(ready) and ready():
            return
        time.sleep(0.1)
    pytest.fail(f"{process.args} did not get ready: {log.read_text()[-2000:]}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _sidecar_status(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=1) as response:
            return bool(json.load(response) == {"message": "Status OK"})
    except OSError:
        return False


async def test_the_sidecar_process_releases_through_the_standins_process(tmp_path: Path) -> None:
    state = tmp_path / "azure"
    standins = [
        "veil_standins",
        "--dir",
        str(state),
        "--cluster",
        "sub/rg/aks",
        "--vault-address",
        "127.0.0.2:0",
        "--maa-address",
        "127.0.0.1:0",
        "--arm-address",
        "127.0.0.3:0",
        "--extra-san",
        "blob.veil.invalid",
    ]
    env_file = state / "azure.env"
    with _process(standins, tmp_path / "standins.log") as azure:
        _wait(
            lambda: env_file.exists() and env_file.stat().st_size, azure, tmp_path / "standins.log"
        )
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert set(env) == ENV_KEYS
        assert env_file.stat().st_mode & 0o077 == 0
        assert urlsplit(env["VEIL_DEMO_VAULT_URL"]).hostname == "127.0.0.2"
        assert urlsplit(env["VEIL_AZURE_ARM_ENDPOINT"]).hostname == "127.0.0.3"
        certificate = x509.load_pem_x509_certificate((state / "tls" / "server.crt").read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert {ip_address(h) for h in ("127.0.0.1", "127.0.0.2", "127.0.0.3")} <= set(
            names.value.get_values_for_type(x509.IPAddress)
        )
        assert {"localhost", "blob.veil.invalid"} <= set(
            names.value.get_values_for_type(x509.DNSName)
        )

        settings = AzureSettings.from_env(env)
        vault = env["VEIL_DEMO_VAULT_URL"]
        state = release_key(key_client(vault, settings), "served-model", env["VEIL_DEMO_MAA_URL"])
        target = ReleaseTarget(
            urlsplit(env["VEIL_DEMO_MAA_URL"]).netloc,
            urlsplit(vault).netloc,
            f"served-model/{state.version}",
        )
        port = _free_port()
        sidecar_env = {
            "Port": str(port),
            "VEIL_AZURE_STATIC_TOKEN": env["VEIL_AZURE_STATIC_TOKEN"],
            "SSL_CERT_FILE": env["VEIL_AZURE_CA_BUNDLE"],
        }
        sidecar_url = f"http://127.0.0.1:{port}"
        with _process(["veil_standins.skr"], tmp_path / "skr.log", sidecar_env) as skr:
            _wait(lambda: _sidecar_status(sidecar_url), skr, tmp_path / "skr.log")
            key = await KeyReleaseClient(sidecar_url, retry=RetryPolicy(attempts=1)).release(target)
            public = key_client(vault, settings).get_key("served-model").key
            assert key.public_key().public_numbers().n == int.from_bytes(bytes(public.n or b""))
            skr.send_signal(signal.SIGTERM)
            assert skr.wait(10) == 0
        azure.send_signal(signal.SIGTERM)
        assert azure.wait(10) == 0
    assert "SIMULATED" in (tmp_path / "skr.log").read_text()
