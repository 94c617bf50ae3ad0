"""Local stand-ins for Azure Key Vault and ARM, for `hack/up.sh` on a machine without Azure.

    python -m tests.unit.azure.standins --dir DIR [--cluster SUBSCRIPTION/GROUP/NAME ...]

Serves the same HTTPS doubles the tests use (the Lowkey Vault emulator is not available here)
and writes `DIR/azure.env`: the operator's Azure settings pointing at them, plus
`VEIL_DEMO_VAULT_URL` for the examples. Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import threading
from pathlib import Path

from tests.unit.azure.arm_double import ArmDouble
from tests.unit.azure.keyvault_double import KeyVaultDouble
from tests.unit.azure.server import ServerThread
from tests.unit.azure.tls import make_tls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="standins", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument(
        "--cluster",
        action="append",
        default=[],
        help="an AKS cluster the ARM stand-in knows, as SUBSCRIPTION/GROUP/NAME",
    )
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    tls = make_tls(args.dir / "tls")
    key_vault, arm = KeyVaultDouble(token=token), ArmDouble(token=token)
    for cluster in args.cluster:
        subscription, group, name = cluster.split("/")
        arm.add_cluster(subscription, group, name)
    vault_server = ServerThread(key_vault.app(), tls.server_context()).start()
    arm_server = ServerThread(arm.app(), tls.server_context()).start()
    key_vault.url, arm.url = vault_server.url, arm_server.url
    settings = {
        "VEIL_AZURE_STATIC_TOKEN": token,
        "VEIL_AZURE_CA_BUNDLE": str(tls.ca_file.resolve()),
        "VEIL_AZURE_ARM_ENDPOINT": arm.url,
        "VEIL_DEMO_VAULT_URL": key_vault.url,
    }
    env_file = args.dir / "azure.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    env_file.chmod(0o600)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"Key Vault stand-in {key_vault.url}, ARM stand-in {arm.url}", flush=True)
    stop.wait()
    vault_server.stop()
    arm_server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
