"""Fetch, start and stop Lowkey Vault (a Key Vault emulator, a Spring Boot jar) for the tests.

`hack/lowkey-vault.sh` fetches the jar into $VEIL_CACHE; here it is started on a free
127.0.0.1 port (`--server.port`); Lowkey Vault registers a vault for `https://127.0.0.1:<port>`
by default, serves a self-signed certificate (its CA is not at hand, so TLS verification is off
for it, test only) and accepts any bearer token.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
FETCH_SCRIPT = REPO / "hack" / "lowkey-vault.sh"


class LowkeyUnavailableError(Exception):
    """Lowkey Vault could not be fetched or started; the message says exactly why."""


@dataclass
class LowkeyVault:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def fetch_jar(timeout: float = 240) -> Path:
    try:
        done = subprocess.run(
            ["bash", str(FETCH_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LowkeyUnavailableError(
            f"{FETCH_SCRIPT.name} did not finish in {timeout:.0f}s"
        ) from exc
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise LowkeyUnavailableError(reason[0])
    return Path(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(jar: Path, log_dir: Path, timeout: float = 120) -> LowkeyVault:
    java = os.environ.get("LOWKEY_VAULT_JAVA", "java")
    port = _free_port()
    log_path = log_dir / "lowkey-vault.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                java,
                "-Xmx384m",
                "-XX:TieredStopAtLevel=1",
                "-jar",
                str(jar),
                f"--server.port={port}",
                "--server.address=127.0.0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_dir,
        )
    vault = LowkeyVault(f"https://127.0.0.1:{port}", process, log_path)
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-600:]
            hint = (
                " (the jar needs a newer Java: set LOWKEY_VAULT_JAVA)"
                if "UnsupportedClassVersionError" in tail
                else ""
            )
            raise LowkeyUnavailableError(
                f"Lowkey Vault exited with {process.returncode}{hint}: {tail}"
            )
        try:
            urllib.request.urlopen(f"{vault.url}/keys?api-version=7.4", context=insecure, timeout=2)
            return vault
        except urllib.error.HTTPError:
            return vault  # any HTTP answer (401 challenge included) means it is serving
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    vault.stop()
    raise LowkeyUnavailableError(
        f"Lowkey Vault did not answer on {vault.url} within {timeout:.0f}s"
    )
