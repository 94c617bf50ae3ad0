"""Azurite's Blob service as a local process on 127.0.0.1, for the az:// tests.

`hack/azurite.sh` installs the npm package into $VEIL_CACHE (once); `Azurite.start` runs
`azurite-blob` on a free port with a temporary workspace, telemetry off, and waits until it
answers. The well-known development account `devstoreaccount1` is the one it serves.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the same in every installation; not a secret).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class AzuriteUnavailableError(RuntimeError):
    """Azurite could not be installed or started here."""


def install() -> Path:
    """Run hack/azurite.sh; the path of `azurite-blob`."""
    try:
        done = subprocess.run(
            ["bash", str(REPO / "hack" / "azurite.sh")],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as failed:
        raise AzuriteUnavailableError(f"hack/azurite.sh did not finish: {failed}") from failed
    if done.returncode != 0:
        raise AzuriteUnavailableError(
            done.stderr.strip() or f"hack/azurite.sh exited {done.returncode}"
        )
    return Path(done.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Azurite:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"
        )

    @classmethod
    def start(cls, binary: Path, workspace: Path, timeout: float = 30.0) -> Azurite:
        port = _free_port()
        log = workspace / "azurite.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [
                    str(binary),
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    str(port),
                    "--location",
                    str(workspace / "data"),
                    "--silent",
                    "--skipApiVersionCheck",
                    "--disableTelemetry",
                    "--loose",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AzuriteUnavailableError(
                    f"azurite-blob exited {process.returncode}: {log.read_text(errors='replace')}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return cls(process, port, log)
            time.sleep(0.1)
        process.kill()
        process.wait()
        raise AzuriteUnavailableError(f"azurite-blob did not listen on {port} within {timeout}s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
