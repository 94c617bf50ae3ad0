"""`veil infer`: verify a runtime's attestation, then send one encrypted inference request."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from veil.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail

if TYPE_CHECKING:
    from veil.client.expectations import Expectations


def _expectations(args: argparse.Namespace) -> Expectations:
    from veil.client.expectations import Expectations

    if args.expect is not None:
        expectations = Expectations.from_file(args.expect)
    else:
        if not args.issuer or not args.placement:
            raise ValueError("give --expect FILE, or --issuer and --placement")
        data: dict[str, object] = {"issuers": args.issuer, "placement": args.placement}
        if args.hostdata:
            data["hostdata"] = args.hostdata
        claims = []
        for text in args.claim:
            name, sep, value = text.partition("=")
            if not sep or not name:
                raise ValueError(f"--claim {text!r} is not NAME=VALUE")
            claims.append(
                {
                    "claim": name,
                    "equals": json.loads(value) if value in {"true", "false"} else value,
                }
            )
        data["requiredClaims"] = claims
        expectations = Expectations.from_mapping(data)
    return expectations.with_issuer_loopback(args.allow_http_loopback_issuer)


def _infer(args: argparse.Namespace) -> int:
    from veil.client.session import Client, InferenceError, RefusedError

    try:
        expectations = _expectations(args)
        text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text("utf-8")
        request = json.loads(text)
        if not isinstance(request, dict):
            raise ValueError("the input is not a JSON object (an OIP v2 infer request)")
    except (OSError, ValueError) as exc:
        return fail("veil infer", str(exc), EXIT_USAGE)
    client = Client(
        args.url, args.model, expectations, version=args.model_version, fresh=not args.cached
    )
    try:
        verified = client.verify()
        print(
            f"veil infer: verified {verified.attestation.issuer} "
            f"({verified.attestation.attestation_type}), key {verified.key.key_id.hex()}",
            file=sys.stderr,
        )
        answer = client.infer(request)
    except RefusedError as exc:
        return fail("veil infer", str(exc))
    except InferenceError as exc:
        return fail("veil infer", f"the runtime answered {exc}", EXIT_FAILED)
    finally:
        client.close()
    print(json.dumps(answer))
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    infer = subparsers.add_parser(
        "infer",
        help="verify a model's TEE, then send it an encrypted inference request",
        description="Fetch the runtime's evidence, verify its MAA token (pinned issuer, JWKS, "
        "RS256, exp/nbf, TEE claims, a fresh nonce), check the attested key is the served key, "
        "then send the OIP v2 request encrypted to it (HPKE) and print the decrypted answer. "
        "Any failed check refuses, naming it, and nothing is sent.",
    )
    infer.add_argument("url", help="the runtime's base URL, e.g. http://fraud-scorer:8080")
    infer.add_argument("--model", required=True, help="the served model's name")
    infer.add_argument("--model-version", help="the model version (default: the served one)")
    infer.add_argument(
        "--input", default="-", help="file holding the OIP v2 JSON request (default: stdin)"
    )
    infer.add_argument(
        "--expect",
        type=Path,
        help="expectations file (JSON/YAML: issuers, placement, hostdata, requiredClaims) or "
        "the ConfidentialModel manifest",
    )
    infer.add_argument("--issuer", action="append", help="an allowed MAA issuer (repeatable)")
    infer.add_argument("--placement", choices=("confidentialACI", "confidentialVM"))
    infer.add_argument("--hostdata", help="expected x-ms-sevsnpvm-hostdata (64 hex digits)")
    infer.add_argument(
        "--claim", action="append", default=[], help="a required claim NAME=VALUE (repeatable)"
    )
    infer.add_argument(
        "--cached",
        action="store_true",
        help="accept the runtime's cached token instead of asking for one with a fresh nonce",
    )
    infer.add_argument(
        "--allow-http-loopback-issuer",
        action="store_true",
        help="accept http:// issuers on loopback addresses (testing only)",
    )
    infer.set_defaults(func=_infer)
