"""`veil synthesize`: the program a SyntheticDataset's Job runs.

`register(subparsers)` adds the subcommand; it sets `func(args) -> exit code`:
0 done (the report JSON on stdout), 1 failed (I/O, fit, a spend check), 2 refused or bad
arguments (an undeclared column, an invalid spec or column list, an inconsistent budget
split). Nothing is written unless the run succeeds up to the output.

Every message this program prints is free of data values: a library's own exception text
(which may quote a row) is replaced by its type.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from veil import logs
from veil.api.synthetic_dataset import DEFAULT_BINS
from veil.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, require
from veil.synthesis.domain import DomainError

SPEC_FIELDS = (
    "method",
    "epsilon",
    "delta",
    "rows",
    "bins",
    "preprocessor_epsilon",
    "discovery_epsilon",
    "discovery_delta",
    "report_epsilon",
)


def _fail(message: str, code: int) -> int:
    if logs.json_enabled():  # one JSON line, as the operator's, instead of plain stderr text
        logging.getLogger("veil.synthesis").error(message)
        return code
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
        "columns": list(synth.columns),
        **{name: getattr(synth, name) for name in SPEC_FIELDS},
    }


def parse_columns(text: str) -> list[Any]:
    """`--columns`: a JSON/YAML list of columns (as in the spec), inline or in a file.

    A file may also hold `{columns: [...]}`, a `synthesizer`, a spec or a whole resource.
    """
    import yaml
    from pydantic import TypeAdapter, ValidationError

    from veil.api.synthetic_dataset import Column

    inline = text.lstrip().startswith(("[", "{"))
    try:
        document = yaml.safe_load(text if inline else Path(text).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as bad:
        raise ValueError(f"--columns is neither a readable file nor JSON/YAML: {bad}") from bad
    for key in ("spec", "synthesizer", "columns"):
        if isinstance(document, dict) and key in document:
            document = document[key]
    try:
        return TypeAdapter(list[Column]).validate_python(document)
    except ValidationError as bad:
        raise ValueError(f"--columns is not a valid list of columns: {bad}") from bad


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
        "bins": args.bins,
        "preprocessor_epsilon": args.preprocessor_epsilon,
        "discovery_epsilon": args.discovery_epsilon,
        "discovery_delta": args.discovery_delta,
        "report_epsilon": args.report_epsilon,
        "seed": args.seed,
        "max_model_size": args.max_model_size,
        "rounds": args.rounds,
        "report_uri": args.report,
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    if args.columns is not None:
        settings["columns"] = parse_columns(args.columns)
    settings["progress"] = args.progress if args.progress is not None else sys.stderr.isatty()
    require(
        settings,
        (
            ("--source", "source_uri"),
            ("--output", "output_uri"),
            ("--method", "method"),
            ("--epsilon", "epsilon"),
            ("--rows", "rows"),
            ("--columns", "columns"),
        ),
    )
    return SynthesisConfig(**settings)


def _synthesize(args: argparse.Namespace) -> int:
    from veil.artifacts import ArtifactError
    from veil.synthesis.synthesize import RefusedError, SynthesisError, synthesize

    logs.configure_program()  # text, or JSON lines as the operator's (VEIL_LOG_FORMAT)
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
    except Exception as unexpected:
        return _fail(
            f"failed with {type(unexpected).__name__} (details withheld: a library's message "
            "may quote the data)",
            EXIT_FAILED,
        )
    print(json.dumps(report, indent=None if logs.json_enabled() else 2, sort_keys=True))
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `synthesize` to the `veil` command."""
    parser = subparsers.add_parser(
        "synthesize",
        help="fit a differentially-private synthesizer (MST, AIM) and write synthetic data",
        description="Read a table (CSV/Parquet; file://, https://, az:// or a path) whose "
        "columns are all declared with their public domains, fit smartnoise-synth's MST or "
        "AIM at the given epsilon, sample rows, write them, and print a report as JSON: public "
        "facts, plus DP quality estimates when --report-epsilon is set. Flags override the "
        "fields of --spec.",
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
    parser.add_argument("--method", choices=("mst", "aim"), help="mst or aim (both DP)")
    parser.add_argument(
        "--epsilon", type=float, help="the run's total epsilon, every part included"
    )
    parser.add_argument("--delta", type=float, help="the run's total delta (default 1e-6)")
    parser.add_argument("--rows", type=int, help="rows to sample")
    parser.add_argument(
        "--columns",
        metavar="JSON|YAML|FILE",
        help="every column of the source with its public domain, as in the spec's "
        "synthesizer.columns: a list of {name, type: categorical|numeric, values, discover, "
        "maxValues, lower, upper, bins, nullable}, inline or in a file",
    )
    parser.add_argument(
        "--bins",
        type=int,
        help=f"bins of a numeric column without its own (default {DEFAULT_BINS})",
    )
    parser.add_argument(
        "--preprocessor-epsilon",
        type=float,
        help="part of epsilon spent inferring the bounds of numeric columns declared without "
        "lower/upper (default 0)",
    )
    parser.add_argument(
        "--discovery-epsilon",
        type=float,
        help="part of epsilon spent discovering the values of discover: true columns",
    )
    parser.add_argument("--discovery-delta", type=float, help="part of delta spent on discovery")
    parser.add_argument(
        "--report-epsilon",
        type=float,
        help="part of epsilon spent on DP quality estimates in the report (default 0: none)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="seed numpy's global generator (tests and benchmarks only: it makes the "
        "synthesizer's selection steps reproducible)",
    )
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
