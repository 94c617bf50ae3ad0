"""`veil synthesize`: the program a SyntheticDataset's Job runs.

`register(subparsers)` adds the subcommand; it sets `func(args) -> exit code`:
0 done (the report JSON on stdout), 1 failed (I/O, fit, a spend check), 2 refused or bad
arguments (a non-private generator without --allow-non-private, a column that cannot be
encoded privately, an invalid spec). Nothing is written unless the run succeeds up to the
output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from veil.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, require
from veil.synthesis.domain import DEFAULT_BINS, DomainError, parse_bounds


def _fail(message: str, code: int) -> int:
    return fail("veil synthesize", message, code)


def load_document(path: Path) -> dict[str, Any]:
    """A JSON or YAML file holding a resource or just its spec."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as bad:
        raise ValueError(f"cannot read {path}: {bad}") from bad
    if not isinstance(document, dict):
        raise ValueError(f"{path} does not hold an object")
    return document


def spec_defaults(path: Path) -> dict[str, Any]:
    """SyntheticDatasetSpec fields (or a whole SyntheticDataset) as config keyword arguments."""
    from pydantic import ValidationError

    from veil.api.synthetic_dataset import SyntheticDatasetSpec

    document = load_document(path)
    if "spec" in document:
        document = document["spec"]
    try:
        spec = SyntheticDatasetSpec.model_validate(document)
    except ValidationError as bad:
        raise ValueError(f"{path} is not a valid SyntheticDataset spec: {bad}") from bad
    synth = spec.synthesizer
    return {
        "source_uri": spec.source.uri,
        "source_format": spec.source.format,
        "output_uri": spec.output.uri,
        "method": synth.method,
        "epsilon": synth.epsilon,
        "delta": synth.delta,
        "rows": synth.rows,
        "preprocessor_epsilon": synth.preprocessor_epsilon,
        "categorical_columns": list(synth.categorical_columns),
        "allow_non_private": spec.allow_non_private,
    }


def _categorical(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def config_from_args(args: argparse.Namespace) -> Any:
    from veil.synthesis.synthesize import SynthesisConfig

    settings: dict[str, Any] = spec_defaults(args.spec) if args.spec is not None else {}
    flags = {
        "source_uri": args.source,
        "source_format": args.format,
        "output_uri": args.output,
        "output_format": args.output_format,
        "method": args.method,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "rows": args.rows,
        "preprocessor_epsilon": args.preprocessor_epsilon,
        "categorical_columns": _categorical(args.categorical),
        "bins": args.bins,
        "holdout_fraction": args.holdout_fraction,
        "seed": args.seed,
        "max_model_size": args.max_model_size,
        "rounds": args.rounds,
        "report_uri": args.report,
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    settings["allow_non_private"] = bool(
        args.allow_non_private or settings.get("allow_non_private")
    )
    settings["bounds"] = parse_bounds(args.bounds or [])
    settings["progress"] = args.progress if args.progress is not None else sys.stderr.isatty()
    require(
        settings,
        (
            ("--source", "source_uri"),
            ("--output", "output_uri"),
            ("--method", "method"),
            ("--rows", "rows"),
        ),
    )
    return SynthesisConfig(**settings)


def _synthesize(args: argparse.Namespace) -> int:
    from veil.artifacts import ArtifactError
    from veil.synthesis.synthesize import RefusedError, SynthesisError, synthesize

    try:
        config = config_from_args(args)
    except (ValueError, DomainError) as bad:
        return _fail(str(bad), EXIT_USAGE)
    try:
        report = synthesize(config)
    except RefusedError as refused:
        return _fail(str(refused), EXIT_USAGE)
    except (SynthesisError, ArtifactError) as failed:
        return _fail(str(failed), EXIT_FAILED)
    print(json.dumps(report, indent=2, sort_keys=True))
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `synthesize` to the `veil` command."""
    parser = subparsers.add_parser(
        "synthesize",
        help="fit a differentially-private synthesizer (MST, AIM) and write synthetic data",
        description="Read a table (CSV/Parquet; file://, https://, az:// or a path), fit "
        "smartnoise-synth's MST or AIM at the given epsilon, sample rows, write them, and "
        "print a quality report (marginal TVD, correlation difference, DCR) as JSON. "
        "Flags override the fields of --spec.",
    )
    parser.add_argument(
        "--spec",
        type=Path,
        help="JSON/YAML SyntheticDataset (or its spec) to take the settings from",
    )
    parser.add_argument("--source", help="source table URI or path")
    parser.add_argument("--format", choices=("csv", "parquet"), help="source format (csv)")
    parser.add_argument("--output", help="where to write the synthetic table (URI or path)")
    parser.add_argument(
        "--output-format",
        choices=("csv", "parquet"),
        help="output format (default: from the output's suffix, else the source's)",
    )
    parser.add_argument(
        "--method",
        choices=("mst", "aim", "marginals"),
        help="mst or aim (DP); marginals = independent exact 1-way marginals, NOT private",
    )
    parser.add_argument("--epsilon", type=float, help="total epsilon, preprocessing included")
    parser.add_argument("--delta", type=float, help="delta (default 1e-6)")
    parser.add_argument("--rows", type=int, help="rows to sample")
    parser.add_argument(
        "--preprocessor-epsilon",
        type=float,
        help="part of epsilon spent inferring bounds of numeric columns without --bounds "
        "(default 0: such columns must be integer-valued, or bounded, or categorical)",
    )
    parser.add_argument(
        "--categorical",
        action="append",
        metavar="COL[,COL...]",
        help="categorical column(s) (repeatable)",
    )
    parser.add_argument(
        "--bounds",
        action="append",
        metavar="COL=LOW:HIGH",
        help="public bounds of a numeric column, binned without spending budget (repeatable)",
    )
    parser.add_argument(
        "--bins", type=int, help=f"bins per numeric column (default {DEFAULT_BINS})"
    )
    parser.add_argument(
        "--allow-non-private",
        action="store_true",
        default=False,
        help="allow a non-private generator or bounds read off the data (no budget is charged)",
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        help="share of rows held out of the fit for the DCR check (default 0.2; 0 disables)",
    )
    parser.add_argument("--seed", type=int, help="seed of the split and report sampling")
    parser.add_argument(
        "--max-model-size", type=float, help="AIM: largest model, in MB (default 80)"
    )
    parser.add_argument("--rounds", type=int, help="AIM: rounds (default 16 x columns)")
    parser.add_argument(
        "--report",
        help="also write the report JSON here (URI, or a path such as /dev/termination-log)",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="progress bar"
    )
    progress.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    parser.set_defaults(func=_synthesize)
