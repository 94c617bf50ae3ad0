"""The vTPM guest trust handed from whatever provisions the vTPM to `python -m veil_standins`
(`GuestTrust.to_files`, `load_guest_trust`, `--guest-trust`), as the local cluster does."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil_standins.maa import THIM_PATH, MaaStandIn
from veil_standins.maa_guest import (
    AK_CA_FILE,
    GUEST_ATTEST_PATH,
    HARDWARE_KEY_FILE,
    GuestTrust,
    load_guest_trust,
)
from veil_standins.vtpm import AkCa


def _trust() -> GuestTrust:
    hardware = ec.generate_private_key(ec.SECP384R1())
    return GuestTrust(AkCa.create("veil test vTPM CA").certificate, hardware.public_key())


def test_the_trust_survives_the_files(tmp_path: Path) -> None:
    trust = _trust()
    trust.use_nonce(b"\1" * 32)
    trust.to_files(tmp_path / "trust")

    loaded = load_guest_trust(tmp_path / "trust")

    assert loaded.ak_ca == trust.ak_ca
    assert loaded.hardware_key.public_numbers() == trust.hardware_key.public_numbers()
    loaded.use_nonce(b"\1" * 32)  # a fresh nonce memory: the process's own


def test_a_missing_or_wrong_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_guest_trust(tmp_path)
    _trust().to_files(tmp_path)
    # The AK CA's RSA key where the "hardware" (VCEK-like) EC key belongs.
    ak_ca = x509.load_pem_x509_certificate((tmp_path / AK_CA_FILE).read_bytes())
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    (tmp_path / HARDWARE_KEY_FILE).write_bytes(
        ak_ca.public_key().public_bytes(serialization.Encoding.PEM, spki)
    )
    with pytest.raises(ValueError, match="not an EC public key"):
        load_guest_trust(tmp_path)


def _guest_attest(url: str, ca: Path) -> str:
    """The refusal the MAA stand-in gives a request with no evidence in it."""
    request = urllib.request.Request(
        f"{url}{GUEST_ATTEST_PATH}?api-version=2020-10-01",
        data=json.dumps({"AttestationInfo": "e30"}).encode(),  # base64url("{}")
        headers={"Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cafile=str(ca))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10, context=context)
    assert refused.value.code == 400
    message: str = json.load(refused.value)["error"]["message"]
    return message


@pytest.mark.parametrize("how", ["flag", "env", "none"])
def test_the_standins_process_trusts_the_given_vtpm(tmp_path: Path, how: str) -> None:
    _trust().to_files(tmp_path / "trust")
    args = ["--guest-trust", str(tmp_path / "trust")] if how == "flag" else []
    env = {**os.environ, "VEIL_STANDINS_GUEST_TRUST": str(tmp_path / "trust")}
    if how != "env":
        env.pop("VEIL_STANDINS_GUEST_TRUST")
    state, log = tmp_path / "azure", tmp_path / "standins.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "veil_standins", "--dir", str(state), *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        env_file = state / "azure.env"
        deadline = time.monotonic() + 30
        while not (env_file.exists() and env_file.stat().st_size):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        message = _guest_attest(settings["VEIL_DEMO_MAA_URL"], state / "tls" / "ca.pem")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    if how == "none":
        assert "guest attestation is off" in message
    else:
        # Past the trust check: it looked at the evidence (and found none).
        assert message.startswith("guest attestation failed"), message


def test_an_unreadable_trust_stops_the_standins(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "veil_standins", "--dir", str(tmp_path), "--guest-trust", "/nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert "--guest-trust /nope" in completed.stderr


@pytest.mark.anyio
async def test_the_thim_stand_in_serves_the_hardware_key_only_with_the_metadata_header() -> None:
    """The node agent reads its host's VCEK chain where Azure's IMDS serves it; the stand-in
    answers as IMDS does only with `Metadata: true`, and only when it has guest trust."""
    trust = _trust()
    for maa, expected in ((MaaStandIn(guest_trust=trust), 200), (MaaStandIn(), 404)):
        async with TestClient(TestServer(maa.app())) as client:
            refused = await client.get(THIM_PATH)
            assert refused.status == 400
            answer = await client.get(THIM_PATH, headers={"Metadata": "true"})
            assert answer.status == expected
            if expected == 200:
                served = serialization.load_pem_public_key(
                    (await answer.json())["vcekCert"].encode()
                )
                assert served.public_numbers() == trust.hardware_key.public_numbers()  # type: ignore[union-attr]
