"""`veil node-agent`: the DaemonSet process on confidential-VM nodes.

Environment:
    NODE_NAME        this node's name (downward API `spec.nodeName`); required
    VEIL_TPM_TCTI    the TPM (default `device:/dev/tpmrm0`)
    AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE
                     the agent's own workload identity, which Key Vault's release needs
                     (see veil.azure.credentials for the test-only settings)
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
from pathlib import Path

from aiohttp import web

DEFAULT_PORT = 8095
DEFAULT_TCTI = "device:/dev/tpmrm0"


def _pcrs(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(p) for p in text.split(",")}))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of PCR indices") from exc
    if not values or not all(0 <= v < 24 for v in values):
        raise argparse.ArgumentTypeError("PCR indices are 0..23")
    return values


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `node-agent` to the `veil` command."""
    agent = subparsers.add_parser(
        "node-agent",
        help="attest this confidential VM with its vTPM and release model keys to its pods",
        description="Serve POST /v1/release to the ConfidentialModel pods of this node: "
        "guest attestation with the vTPM to MAA, Secure Key Release from Key Vault to the TPM, "
        "and the key re-wrapped to the asking pod's in-memory key.",
    )
    agent.add_argument("--host", default="0.0.0.0", help="address to listen on")
    agent.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    agent.add_argument(
        "--tcti",
        default=os.environ.get("VEIL_TPM_TCTI", DEFAULT_TCTI),
        help=f"the TPM's TCTI (default $VEIL_TPM_TCTI or {DEFAULT_TCTI})",
    )
    agent.add_argument(
        "--node-name", default=os.environ.get("NODE_NAME", ""), help="default $NODE_NAME"
    )
    agent.add_argument("--audience", default="veil-node-agent", help="token audience")
    agent.add_argument(
        "--pcrs", type=_pcrs, default=(0, 1, 2, 3, 4, 5, 6, 7), help="SHA-256 PCRs to quote"
    )
    agent.add_argument(
        "--tcg-log",
        type=Path,
        default=Path("/sys/kernel/security/tpm0/binary_bios_measurements"),
        help="the TCG event log sent to MAA",
    )
    agent.add_argument(
        "--imds-vcek-url",
        default="http://169.254.169.254/metadata/THIM/amd/certification",
        help="where IMDS serves this host's VCEK chain",
    )
    agent.add_argument(
        "--no-peer-check",
        action="store_true",
        help="do not require requests to come from the pod's own IP (tests only)",
    )
    agent.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from veil.azure.credentials import ENV_CA_BUNDLE, AzureSettings
    from veil.node_agent.authz import KubernetesApi, PodAuthorizer
    from veil.node_agent.guest_attestation import GuestAttestor, TokenCache, imds_vcek_chain
    from veil.node_agent.release import KeyVaultReleaser, load_roots
    from veil.node_agent.server import NodeAgent
    from veil.node_agent.tpm import Tpm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The Azure SDK logs every request's headers at INFO: keep the agent's log about releases.
    logging.getLogger("azure").setLevel(logging.WARNING)
    if not args.node_name:
        logging.getLogger("veil.node_agent").error("--node-name or NODE_NAME is required")
        return 2
    settings = AzureSettings.from_env()
    bundle = os.environ.get(ENV_CA_BUNDLE, "")
    context = ssl.create_default_context(cafile=bundle or None)
    tpm = Tpm(args.tcti)
    attestor = GuestAttestor(
        tpm, imds_vcek_chain(args.imds_vcek_url), args.pcrs, args.tcg_log, ssl_context=context
    )
    agent = NodeAgent(
        PodAuthorizer(
            KubernetesApi.from_environment(),
            args.node_name,
            audience=args.audience,
            check_peer=not args.no_peer_check,
        ),
        TokenCache(attestor),
        KeyVaultReleaser(
            tpm,
            settings.credential,
            # Azure's public roots, plus the extra bundle (a proxy's or a test CA).
            load_roots([]) + (load_roots([Path(bundle)]) if bundle else ()),
            settings.client_kwargs(),
            settings.verify_challenge_resource,
        ),
    )
    try:
        web.run_app(agent.app(), host=args.host, port=args.port, access_log=None)
    finally:
        tpm.close()
    return 0
