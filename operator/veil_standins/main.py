"""LOCAL STAND-INS for Azure Key Vault, MAA and ARM, for a machine without Azure (`hack/up.sh`).
NOT security boundaries: anyone who can reach them and read azure.env holds every key.

    python -m veil_standins --dir DIR [--cluster SUBSCRIPTION/GROUP/NAME ...]
        [--vault-address HOST:PORT] [--maa-address HOST:PORT] [--arm-address HOST:PORT]
        [--extra-san HOST ...] [--guest-trust DIR]

Serves the same HTTPS stand-ins the tests use, each on its own address (default 127.0.0.1 and a
free port), under one serving certificate (DIR/tls/server.crt, server.key) whose names cover
every address given and each --extra-san, issued by a throwaway CA (DIR/tls/ca.pem). Writes
`DIR/azure.env`: the operator's Azure settings pointing at them (VEIL_AZURE_STATIC_TOKEN,
VEIL_AZURE_CA_BUNDLE, VEIL_AZURE_ARM_ENDPOINT) and, for the examples, VEIL_DEMO_VAULT_URL and
VEIL_DEMO_MAA_URL (port 443 is left out of URLs, as Azure's omit it). Runs until SIGTERM or
SIGINT.

With --guest-trust DIR (or $VEIL_STANDINS_GUEST_TRUST), the MAA stand-in also verifies vTPM
guest evidence (`/attest/AzureGuest`) from the confidential VM whose trust is in DIR: the vTPM
AK CA certificate (ak-ca.pem) and the "hardware" report-signing public key (hardware-key.pem),
as `veil_standins.vtpm` writes them for the software vTPM it provisions. Without it, guest
attestation is refused.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from veil_standins.arm import ArmDouble
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn
from veil_standins.maa_guest import GuestTrust, load_guest_trust
from veil_standins.release_signer import ReleaseSigner
from veil_standins.server import ServerThread, parse_address
from veil_standins.tls import make_tls

DEFAULT_ADDRESS = "127.0.0.1:0"
GUEST_TRUST_ENV = "VEIL_STANDINS_GUEST_TRUST"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m veil_standins",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", type=Path, required=True, help="where azure.env and tls/ go")
    parser.add_argument(
        "--cluster",
        action="append",
        default=[],
        help="an AKS cluster the ARM stand-in knows, as SUBSCRIPTION/GROUP/NAME",
    )
    parser.add_argument(
        "--extra-san",
        action="append",
        default=[],
        metavar="HOST",
        help="another name or address the serving certificate (DIR/tls/server.crt) covers, "
        "for a server that shares it",
    )
    parser.add_argument(
        "--guest-trust",
        type=Path,
        default=os.environ.get(GUEST_TRUST_ENV) or None,
        metavar="DIR",
        help="the vTPM trust (ak-ca.pem, hardware-key.pem) MAA's guest attestation verifies "
        f"evidence against (default ${GUEST_TRUST_ENV}; none: guest attestation is off)",
    )
    for service, name in (("vault", "Key Vault"), ("maa", "MAA"), ("arm", "ARM")):
        parser.add_argument(
            f"--{service}-address",
            type=parse_address,
            default=DEFAULT_ADDRESS,
            metavar="HOST:PORT",
            help=f"where the {name} stand-in listens (default {DEFAULT_ADDRESS})",
        )
    return parser


def _write_env(path: Path, settings: dict[str, str]) -> None:
    # Whole or not at all: hack/up.sh sources the file as soon as it is not empty.
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("".join(f"{k}={v}\n" for k, v in settings.items()))
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    clusters = []
    for cluster in args.cluster:
        parts = cluster.split("/")
        if len(parts) != 3 or not all(parts):
            _parser().error(f"--cluster {cluster!r} is not SUBSCRIPTION/GROUP/NAME")
        clusters.append(parts)
    guest_trust: GuestTrust | None = None
    if args.guest_trust is not None:
        try:
            guest_trust = load_guest_trust(args.guest_trust)
        except (OSError, ValueError) as exc:
            _parser().error(f"--guest-trust {args.guest_trust}: {exc}")
    args.dir.mkdir(parents=True, exist_ok=True)
    addresses = {"vault": args.vault_address, "maa": args.maa_address, "arm": args.arm_address}
    hosts = [host for host, _ in addresses.values()] + args.extra_san
    tls = make_tls(args.dir / "tls", hosts)
    assert tls.ca is not None

    token = secrets.token_urlsafe(24)
    maa = MaaStandIn(guest_trust=guest_trust)
    key_vault = KeyVaultDouble(
        token=token,
        signer=ReleaseSigner.issued_by(tls.ca, [addresses["vault"][0]]),
        authority_trust=tls.client_context(),
    )
    arm = ArmDouble(token=token)
    for subscription, group, name in clusters:
        arm.add_cluster(subscription, group, name)
    servers = {
        service: ServerThread(app, tls.server_context(), host=host, port=port)
        for service, app, (host, port) in (
            ("maa", maa.app(), addresses["maa"]),
            ("vault", key_vault.app(), addresses["vault"]),
            ("arm", arm.app(), addresses["arm"]),
        )
    }
    try:
        try:
            for server in servers.values():
                server.start()
        except RuntimeError as exc:
            print(f"veil_standins: {exc}", file=sys.stderr)
            return 1
        maa.issuer = servers["maa"].url
        key_vault.url = servers["vault"].url
        arm.url = servers["arm"].url
        _write_env(
            args.dir / "azure.env",
            {
                "VEIL_AZURE_STATIC_TOKEN": token,
                "VEIL_AZURE_CA_BUNDLE": str(tls.ca_file.resolve()),
                "VEIL_AZURE_ARM_ENDPOINT": arm.url,
                "VEIL_DEMO_VAULT_URL": key_vault.url,
                "VEIL_DEMO_MAA_URL": maa.issuer,
            },
        )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        print(
            f"LOCAL STAND-INS (not Azure, not a security boundary): Key Vault {key_vault.url}, "
            f"MAA {maa.issuer} (vTPM guest attestation "
            f"{'trusting ' + str(args.guest_trust) if guest_trust else 'off'}), ARM {arm.url}",
            flush=True,
        )
        stop.wait()
    finally:
        for server in servers.values():
            server.stop()
    return 0
