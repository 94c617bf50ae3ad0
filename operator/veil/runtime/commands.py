"""`veil seal | unseal | verify | serve`: the runtime's command-line entry points.

`register(subparsers)` adds the four subcommands; each sets `func(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from veil.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from veil.runtime.sealing import DEFAULT_CHUNK_SIZE

if TYPE_CHECKING:
    from veil.runtime.evidence import Attester, EvidenceService
    from veil.runtime.keywrap import KeyWrapper
    from veil.runtime.loader import ModelLoader

log = logging.getLogger("veil.runtime.commands")


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    return fail("veil", message, code)


def _configure_logging() -> None:
    """Text, or JSON lines in the operator's shape when VEIL_LOG_FORMAT=json (the operator
    passes its own format on to the pods it renders)."""
    from veil.logs import configure_program

    configure_program()


# --- seal ---------------------------------------------------------------------------------


def _seal(args: argparse.Namespace) -> int:
    from veil.runtime.keywrap import (
        KeyMaterialError,
        RsaPublicKeyWrapper,
        key_vault_wrapper,
        load_public_key_pem,
    )
    from veil.runtime.sealing import SealedModelError, seal_file

    try:
        wrapper: KeyWrapper
        if args.public_key is not None:
            wrapper = RsaPublicKeyWrapper(load_public_key_pem(args.public_key), args.key_id)
        else:
            if not args.key_name:
                return _fail("--vault-url needs --key-name", EXIT_USAGE)
            wrapper = key_vault_wrapper(args.vault_url, args.key_name, args.key_version)
        header = seal_file(args.model, args.output, wrapper, chunk_size=args.chunk_size)
    except (KeyMaterialError, SealedModelError) as exc:
        return _fail(str(exc))
    print(json.dumps({"sealed": str(args.output), **header.describe()}, indent=2))
    return EXIT_OK


# --- unseal -------------------------------------------------------------------------------


def _unseal(args: argparse.Namespace) -> int:
    from veil.runtime.keywrap import KeyMaterialError, load_private_key_pem
    from veil.runtime.sealing import SealedModelError, unseal_file

    try:
        key = load_private_key_pem(args.private_key)
        plaintext = unseal_file(args.sealed, key, verify_digest=True)
    except (KeyMaterialError, SealedModelError) as exc:
        return _fail(str(exc))
    del key
    print(
        "veil: writing a DECRYPTED model to disk — local debugging only, never inside a TEE",
        file=sys.stderr,
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.output, flags, 0o600)
    except FileExistsError:
        return _fail(f"{args.output} exists; pass --force to overwrite it")
    except OSError as exc:
        return _fail(f"cannot write {args.output}: {exc.strerror}")
    with os.fdopen(fd, "wb") as sink:
        sink.write(plaintext)
    print(json.dumps({"unsealed": str(args.output), "bytes": len(plaintext)}))
    return EXIT_OK


# --- verify -------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    from veil.runtime.attestation import AttestationError, AttestationPolicy, AttestationVerifier

    token = sys.stdin.read().strip() if args.token == "-" else args.token.strip()
    try:
        policy = AttestationPolicy.from_file(args.policy)
        verifier = AttestationVerifier(
            args.issuer,
            policy,
            leeway_seconds=args.leeway,
            allow_insecure_loopback_issuers=args.allow_http_loopback_issuer,
        )
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        result = asyncio.run(verifier.verify(token, expected_nonce=args.nonce))
    except AttestationError as exc:
        return _fail(f"attestation token refused ({exc.reason.value}): {exc}")
    print(
        json.dumps(
            {
                "verified": True,
                "issuer": result.issuer,
                "attestation_type": result.attestation_type,
                "expires_at": result.expires_at.isoformat(),
                "nonce": result.nonce,
            },
            indent=2,
        )
    )
    return EXIT_OK


# --- serve --------------------------------------------------------------------------------


def _model_loader(args: argparse.Namespace) -> ModelLoader | int:
    """How the key comes: the node agent (confidential VMs), the SKR sidecar (Confidential
    ACI), or a PEM file (local debugging); an exit code when the flags do not add up."""
    from veil.runtime.key_release import KeyReleaseClient, ReleaseTarget, RetryPolicy
    from veil.runtime.loader import SealedPin, key_release_loader, private_key_file_loader
    from veil.runtime.node_agent_client import (
        NodeAgentClient,
        NodeAgentTarget,
        node_agent_loader,
    )

    if args.private_key is not None:
        return private_key_file_loader(
            args.sealed, args.private_key, name=args.model_name, version=args.model_version
        )
    pin = SealedPin(args.sha256, args.max_sealed_bytes) if args.sha256 else None
    retry = RetryPolicy(attempts=args.key_release_attempts)
    if args.cdh_resource:
        from veil.runtime.cdh import CdhClient, cdh_loader

        cdh = CdhClient(args.cdh_url, retry=retry)
        return cdh_loader(
            args.sealed,
            cdh,
            args.cdh_resource,
            name=args.model_name,
            version=args.model_version,
            pin=pin,
        )
    source = "--node-agent" if args.node_agent else "--sidecar"
    required = (("--maa-endpoint", args.maa_endpoint), ("--akv-endpoint", args.akv_endpoint))
    missing = [flag for flag, value in (*required, ("--kid", args.kid)) if not value]
    if missing:
        return _fail(f"{source} needs {', '.join(missing)}", EXIT_USAGE)
    key_name = args.kid.split("/", 1)[0]
    if args.node_agent:
        agent = NodeAgentClient(args.node_agent, args.node_agent_token, retry=retry)
        target = NodeAgentTarget(f"https://{args.akv_endpoint}", key_name, "", args.maa_endpoint)
        return node_agent_loader(
            args.sealed, agent, target, name=args.model_name, version=args.model_version, pin=pin
        )
    access_token = None
    if args.access_token_file is not None:
        try:
            access_token = args.access_token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            return _fail(f"cannot read {args.access_token_file}: {exc.strerror}")
    client = KeyReleaseClient(args.sidecar, retry=retry)
    release = ReleaseTarget(args.maa_endpoint, args.akv_endpoint, args.kid, access_token)
    return key_release_loader(
        args.sealed, client, release, name=args.model_name, version=args.model_version, pin=pin
    )


def _attester(args: argparse.Namespace) -> Attester | None:
    """Who binds the channel key into an attestation: the SKR sidecar's `/attest/maa` on
    Confidential ACI, the node agent's `/v1/attest` on confidential VMs; nobody otherwise (a
    key file, or coco for now), so callers that verify the evidence refuse it."""
    from veil.runtime.evidence import NodeAgentAttester, SkrAttester
    from veil.runtime.key_release import RetryPolicy
    from veil.runtime.node_agent_client import NodeAgentClient, NodeAgentTarget

    if args.sidecar and args.maa_endpoint:
        return SkrAttester(args.sidecar, args.maa_endpoint, issuer=args.channel_issuer)
    if args.node_agent and args.maa_endpoint and args.akv_endpoint and args.kid:
        retry = RetryPolicy(attempts=args.key_release_attempts)
        client = NodeAgentClient(args.node_agent, args.node_agent_token, retry=retry)
        key_name = args.kid.split("/", 1)[0]
        target = NodeAgentTarget(f"https://{args.akv_endpoint}", key_name, "", args.maa_endpoint)
        return NodeAgentAttester(client, target)
    return None


def _channel(args: argparse.Namespace) -> EvidenceService | int:
    """The channel key (made here, in memory) and the evidence service that attests it."""
    from veil.runtime.attestation import AttestationPolicy, AttestationVerifier
    from veil.runtime.channel import ChannelPrivateKey
    from veil.runtime.evidence import EvidenceService

    try:
        attester = _attester(args)
        verifier = None
        if attester is not None:
            policy = (
                AttestationPolicy.from_file(args.channel_policy)
                if args.channel_policy is not None
                else AttestationPolicy(attester.placement)
            )
            issuer = args.channel_issuer or attester.issuer
            verifier = AttestationVerifier([issuer], policy)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if attester is None:
        log.warning(
            "the channel key is not attested with this key source: callers that verify the "
            "evidence (veil infer) will refuse it"
        )
    return EvidenceService(
        ChannelPrivateKey(),
        model_name=args.model_name,
        model_version=args.model_version,
        required=args.channel == "encrypted",
        attester=attester,
        verifier=verifier,
    )


def _serve(args: argparse.Namespace) -> int:
    from veil.runtime.server import ServeOptions, ServerLimits, run, serve
    from veil.runtime.state import ModelSlot

    _configure_logging()
    loader = _model_loader(args)
    if isinstance(loader, int):
        return loader
    try:
        slot = ModelSlot(args.model_name, args.model_version)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        limits = ServerLimits(
            max_body_bytes=args.max_body_bytes,
            max_tensor_elements=args.max_tensor_elements,
            max_body_bytes_in_flight=args.max_body_bytes_in_flight,
            read_timeout=args.read_timeout,
        )
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    options = ServeOptions(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        shutdown_timeout=args.shutdown_timeout,
        drain_seconds=args.drain_seconds,
        limits=limits,
    )
    channel = _channel(args)
    if isinstance(channel, int):
        return channel
    return run(serve(slot, loader, options, channel=channel))


# --- registration -------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _add_seal(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    seal = subparsers.add_parser(
        "seal",
        help="encrypt an ONNX model for confidential serving",
        description="Envelope-encrypt a model: AES-256-GCM in authenticated chunks under a "
        "random data key, wrapped with RSA-OAEP-256 to a Key Vault key (or its public half).",
    )
    seal.add_argument("model", type=Path, help="the plaintext model file (e.g. model.onnx)")
    seal.add_argument("output", type=Path, help="where to write the sealed model")
    source = seal.add_mutually_exclusive_group(required=True)
    source.add_argument("--public-key", type=Path, help="PEM file of the RSA public key")
    source.add_argument("--vault-url", help="Azure Key Vault URL (wrap through Key Vault)")
    seal.add_argument("--key-name", help="Key Vault key name (with --vault-url)")
    seal.add_argument("--key-version", help="Key Vault key version (default: latest)")
    seal.add_argument(
        "--key-id",
        help="key id to record with --public-key (default: the key's RFC 7638 thumbprint)",
    )
    seal.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"plaintext bytes per authenticated chunk (default {DEFAULT_CHUNK_SIZE})",
    )
    seal.set_defaults(func=_seal)


def _add_unseal(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    unseal = subparsers.add_parser(
        "unseal",
        help="decrypt a sealed model to a file (LOCAL DEBUGGING ONLY)",
        description="LOCAL DEBUGGING ONLY: decrypts a sealed model with a PEM private key and "
        "writes the plaintext to disk. In production the model is decrypted only in memory, "
        "inside an attested TEE, by `veil serve`.",
    )
    unseal.add_argument("sealed", type=Path, help="the sealed model")
    unseal.add_argument("output", type=Path, help="where to write the decrypted model")
    unseal.add_argument(
        "--private-key", type=Path, required=True, help="PEM file of the RSA private key"
    )
    unseal.add_argument("--force", action="store_true", help="overwrite an existing output")
    unseal.set_defaults(func=_unseal)


def _add_verify(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="verify a Microsoft Azure Attestation token against a policy",
        description="Verify an MAA JWT as a relying party: pinned issuers, keys from the issuer's "
        "OpenID configuration, RS256, expiry, and the TEE claims of the policy file.",
    )
    verify.add_argument("token", help="the attestation JWT, or - to read it from stdin")
    verify.add_argument(
        "--policy",
        type=Path,
        required=True,
        help='JSON policy: {"placement": "confidentialVM"|"confidentialACI", '
        '"attestationTypes"?, "complianceStatus"?, "hostdata"?, "allowDebuggable"?, '
        '"requireNonce"?}',
    )
    verify.add_argument(
        "--issuer",
        action="append",
        required=True,
        help="an allowed attestation issuer URL (repeatable)",
    )
    verify.add_argument("--nonce", help="the nonce the token must carry (checked for replay)")
    verify.add_argument(
        "--leeway", type=float, default=60.0, help="clock skew allowed, seconds (max 300)"
    )
    verify.add_argument(
        "--allow-http-loopback-issuer",
        action="store_true",
        help="accept http:// issuers on loopback addresses (testing only)",
    )
    verify.set_defaults(func=_verify)


def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a sealed model over the Open Inference Protocol v2",
        description="Release the model key through the SKR sidecar, unseal the model in memory "
        "and serve it with onnxruntime (KServe v2 REST). Ready only once the model is loaded.",
    )
    serve.add_argument("--model-name", required=True, help="name the model is served under")
    serve.add_argument("--model-version", default="1", help="version reported (default 1)")
    serve.add_argument("--sealed", type=Path, required=True, help="the sealed model file")
    key = serve.add_mutually_exclusive_group(required=True)
    key.add_argument("--sidecar", help="SKR sidecar URL, e.g. http://localhost:8080")
    key.add_argument(
        "--cdh-resource",
        help="Confidential Containers: the KBS resource (kbs:///repo/type/tag) holding the key, "
        "released by the guest's Confidential Data Hub",
    )
    key.add_argument(
        "--node-agent",
        help="Veil node agent URL on a confidential VM node, e.g. http://$(HOST_IP):8095",
    )
    key.add_argument(
        "--private-key",
        type=Path,
        help="PEM private key instead of key release (LOCAL DEBUGGING ONLY: no attestation)",
    )
    serve.add_argument("--maa-endpoint", help="attestation endpoint for the sidecar")
    serve.add_argument("--akv-endpoint", help="Key Vault endpoint for the sidecar")
    serve.add_argument(
        "--kid",
        help="name of the key to release (the version is the one the sealed header names)",
    )
    serve.add_argument(
        "--sha256",
        help="the sealed file's pinned sha256: checked before any key is released",
    )
    serve.add_argument(
        "--max-sealed-bytes",
        type=_positive_int,
        default=2 * 1024**3,
        help="refuse a sealed file larger than this (default 2 GiB)",
    )
    serve.add_argument(
        "--access-token-file", type=Path, help="file holding an AAD token for the sidecar"
    )
    serve.add_argument(
        "--cdh-url",
        default="http://127.0.0.1:8006",
        help="the Confidential Data Hub's REST API inside the guest (default its loopback port)",
    )
    serve.add_argument(
        "--node-agent-token",
        type=Path,
        default=Path("/var/run/secrets/veil/node-agent/token"),
        help="the projected ServiceAccount token (audience veil-node-agent) the agent checks",
    )
    serve.add_argument(
        "--key-release-attempts",
        type=_positive_int,
        default=6,
        help="attempts to reach the sidecar before giving up",
    )
    serve.add_argument(
        "--channel",
        choices=("encrypted", "plaintext"),
        default="plaintext",
        help="encrypted: refuse plaintext inference, answer only HPKE-encrypted requests "
        "(POST .../infer/encrypted, key and attestation at GET /v2/evidence); plaintext "
        "(default): accept both",
    )
    serve.add_argument(
        "--channel-issuer",
        help="the issuer of the channel key's attestation token, checked by the runtime "
        "before it serves the token (default https://<--maa-endpoint>, or --maa-endpoint "
        "itself when it is a URL)",
    )
    serve.add_argument(
        "--channel-policy",
        type=Path,
        help="JSON attestation policy the runtime checks its own token against (as `veil "
        "verify --policy`; default: the placement's TEE claims)",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on")
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="port of the Prometheus /metrics endpoint (default: none; the inference port "
        "serves only the protocol)",
    )
    serve.add_argument("--max-body-bytes", type=_positive_int, default=32 * 1024 * 1024)
    serve.add_argument(
        "--max-body-bytes-in-flight",
        type=_positive_int,
        help="bytes of request bodies held at once (default: twice --max-body-bytes)",
    )
    serve.add_argument("--max-tensor-elements", type=_positive_int, default=16 * 1024 * 1024)
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        help="seconds a request body may take to arrive (default 10)",
    )
    serve.add_argument(
        "--shutdown-timeout", type=float, default=20.0, help="grace for in-flight requests"
    )
    serve.add_argument(
        "--drain-seconds", type=float, default=3.0, help="time unready before shutting down"
    )
    serve.set_defaults(func=_serve)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `seal`, `unseal`, `verify` and `serve` to the `veil` command."""
    _add_seal(subparsers)
    _add_unseal(subparsers)
    _add_verify(subparsers)
    _add_serve(subparsers)
