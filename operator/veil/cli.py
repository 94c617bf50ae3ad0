"""The one `veil` command: every role Veil plays is a subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _write_crds(args: argparse.Namespace) -> int:
    from veil.api.crd import all_crds

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file_name, crd in all_crds().items():
        (out_dir / file_name).write_text(render_yaml(crd))
        print(f"wrote {out_dir / file_name}")
    return 0


def render_yaml(document: object) -> str:
    """YAML as committed under crds/: stable key order, readable unicode."""
    import yaml

    return "---\n" + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def _run_operator(args: argparse.Namespace) -> int:
    from veil.operator_main import run

    return run(
        namespaces=args.namespace,
        all_namespaces=args.all_namespaces,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        peering=args.peering,
        standalone=args.standalone,
        log_format=args.log_format,
    )


def _fetch(args: argparse.Namespace) -> int:
    from veil.artifacts import ArtifactError, fetch

    try:
        digest = fetch(args.uri, Path(args.output), args.sha256)
    except ArtifactError as failed:
        print(f"veil fetch: {failed}", file=sys.stderr)
        return 1
    print(f"fetched {args.uri} → {args.output} (sha256 {digest})")
    if args.report_sealed_key is not None:
        from veil.runtime.sealed_key import SealedKey
        from veil.runtime.sealing import SealedModelError, read_header_file

        try:
            sealed = SealedKey.from_header(read_header_file(Path(args.output)))
        except SealedModelError as failed:
            print(f"veil fetch: {args.uri} is not a sealed model: {failed}", file=sys.stderr)
            return 1
        # Kubernetes shows this file as the container's termination message: the operator
        # reads which key version the model is sealed to from the pod's status.
        Path(args.report_sealed_key).write_text(sealed.report(), encoding="utf-8")
    return 0


def _render(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from veil.config import OperatorConfig
    from veil.render import render

    try:
        with open(args.file) as source:
            documents = list(yaml.safe_load_all(source))
        manifests = render(documents, OperatorConfig.from_env())
    except (OSError, yaml.YAMLError, ValidationError, ValueError) as failed:
        print(f"veil render: {args.file}: {failed}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False, explicit_start=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="write the CustomResourceDefinitions from the API models")
    crds.add_argument("--output", "-o", default="crds", help="directory to write (default: crds)")
    crds.set_defaults(func=_write_crds)

    render = sub.add_parser(
        "render", help="print what a resource reconciles into (no cluster needed)"
    )
    render.add_argument("file", help="a YAML file of Veil resources")
    render.set_defaults(func=_render)

    fetch = sub.add_parser("fetch", help="download an artifact and check its sha256")
    fetch.add_argument(
        "--uri", required=True, help="file://, https:// or az://account/container/blob"
    )
    fetch.add_argument("--sha256", help="refuse the download unless it has this digest")
    fetch.add_argument("--output", required=True, help="where to write it")
    fetch.add_argument(
        "--report-sealed-key",
        metavar="PATH",
        help="write the sealed model's key id (from its header) as JSON to PATH, e.g. "
        "/dev/termination-log",
    )
    fetch.set_defaults(func=_fetch)

    from veil.client.commands import register as register_client
    from veil.node_agent.main import register as register_node_agent
    from veil.runtime.commands import register as register_runtime
    from veil.synthesis.commands import register as register_synthesis
    from veil.training.commands import register as register_training

    # seal, unseal, verify, serve: the programs that run inside the TEE.
    register_runtime(sub)
    # node-agent: attestation and key release on confidential VM nodes (a DaemonSet).
    register_node_agent(sub)
    # synthesize, train: the programs the budget-gated Jobs run.
    register_synthesis(sub)
    register_training(sub)
    # infer: the caller's side, verify the TEE then send encrypted.
    register_client(sub)

    run = sub.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable; glob patterns allowed)",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        default=True,
        help="watch every namespace (default)",
    )
    run.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port")
    run.add_argument("--health-port", type=int, default=8081, help="liveness /healthz port")
    run.add_argument(
        "--peering",
        default=None,
        help="kopf peering object for HA (needs the peering CRDs); default: standalone",
    )
    run.add_argument(
        "--standalone",
        action="store_true",
        help="no peering even if --peering is given (local development)",
    )
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="text or json lines, for the operator and the pods it runs "
        "(default: $VEIL_LOG_FORMAT, else text)",
    )
    run.set_defaults(func=_run_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
