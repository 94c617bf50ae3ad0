"""`veil train`: the program a ConfidentialModel's DP training Job runs.

The DP-SGD families (`mlp`, `cnn`) take their settings from the `--epochs`, `--batch-size`,
`--dataset-rows`, `--max-grad-norm`, `--noise-multiplier`, `--hidden`, `--input-shape`,
`--channels`, … flags (`dpsgd_settings`); they need torch and Opacus (the `dpsgd` extra).

`register(subparsers)` adds the subcommand; it sets `func(args) -> exit code`:
0 done (the result JSON on stdout), 1 failed (I/O, fit, an ONNX mismatch, sealing),
2 refused or bad arguments (no public bounds or classes, unknown family, an invalid spec,
a spec that does not match the table's header).

In a PyTorchJob (WORLD_SIZE > 1, RANK), the DP-SGD families train across the replicas
(`veil.training.distributed`); rank 0 alone prints and writes the result, the others exit 0
after training. The other families train on rank 0 alone; its peers exit 0 at once.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil import logs
from veil.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, require

if TYPE_CHECKING:
    from veil.runtime.keywrap import KeyWrapper


def _fail(message: str, code: int) -> int:
    if logs.json_enabled():  # one JSON line, as the operator's, instead of plain stderr text
        logging.getLogger("veil.training").error(message)
        return code
    return fail("veil train", message, code)


def spec_defaults(path: Path) -> dict[str, Any]:
    """`ConfidentialModel.spec.training` fields (or a whole ConfidentialModel) as config kwargs."""
    from pydantic import ValidationError

    from veil.api.confidential_model import Training
    from veil.synthesis.commands import load_document
    from veil.training.options import spec_settings

    document = load_document(path)
    if isinstance(document.get("spec"), dict):
        document = document["spec"]
    if isinstance(document.get("training"), dict):
        document = document["training"]
    try:
        training = Training.model_validate(document)
    except ValidationError as bad:
        raise ValueError(f"{path} is not a valid training spec: {bad}") from bad
    return {
        "dataset_uri": training.dataset_uri,
        "target_column": training.target_column,
        "family": training.family,
        "epsilon": training.epsilon,
        "delta": training.delta,
        "evaluation_epsilon": training.evaluation_epsilon,
        "test_fraction": training.test_fraction,
        "classes": list(training.classes),
        "features": list(training.features) or None,
        "bounds": {b.column: (b.lower, b.upper) for b in training.bounds},
        "output_uri": training.output_uri,
        "dpsgd": spec_settings(training),
    }


def _span(text: str) -> tuple[float, float]:
    from veil.synthesis.domain import DomainError, parse_bounds

    try:
        return parse_bounds([f"x={text}"])["x"]
    except DomainError as bad:
        raise ValueError(str(bad).replace("'x=", "'")) from bad


def key_wrapper(args: argparse.Namespace) -> KeyWrapper:
    from veil.runtime.keywrap import RsaPublicKeyWrapper, key_vault_wrapper, load_public_key_pem

    if args.public_key is not None:
        return RsaPublicKeyWrapper(load_public_key_pem(args.public_key), args.key_id)
    if not args.key_name:
        raise ValueError("--vault-url needs --key-name")
    return key_vault_wrapper(args.vault_url, args.key_name, args.key_version)


def dpsgd_settings(args: argparse.Namespace, base: Any = None) -> Any:
    """The DP-SGD settings: `base` (from --spec) with the flags given over it
    (`veil.training.options`: each flag is mapped there, once)."""
    from dataclasses import replace

    from veil.training.dpsgd import DpSgdSettings
    from veil.training.options import updates

    return replace(base if base is not None else DpSgdSettings(), **updates(args, parse=True))


def config_from_args(args: argparse.Namespace) -> Any:
    from veil.synthesis.domain import DomainError, parse_bounds
    from veil.training.train import TrainingConfig, load_bounds_file

    settings: dict[str, Any] = spec_defaults(args.spec) if args.spec is not None else {}
    flags = {
        "dataset_uri": args.dataset,
        "dataset_format": args.format,
        "target_column": args.target,
        "family": args.family,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "evaluation_epsilon": args.evaluation_epsilon,
        "output_uri": args.output,
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "max_iter": args.max_iter,
        "n_estimators": args.n_estimators,
        "max_depth": args.max_depth,
        "result_uri": args.result,
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    if args.features:
        settings["features"] = [f.strip() for item in args.features for f in item.split(",")]
    if args.classes:
        settings["classes"] = [c.strip() for item in args.classes for c in item.split(",")]
    bounds: dict[str, tuple[float, float]] = dict(settings.get("bounds", {}))
    if args.bounds_file:
        bounds.update(load_bounds_file(args.bounds_file))
    try:
        bounds.update(parse_bounds(args.bounds or []))
    except DomainError as bad:
        raise ValueError(str(bad)) from bad
    settings["bounds"] = bounds
    settings["dpsgd"] = dpsgd_settings(args, settings.get("dpsgd"))
    if args.default_bounds:
        settings["default_bounds"] = _span(args.default_bounds)
    require(
        settings,
        (
            ("--dataset", "dataset_uri"),
            ("--target", "target_column"),
            ("--family", "family"),
            ("--epsilon", "epsilon"),
            ("--classes", "classes"),
            ("--output", "output_uri"),
        ),
    )
    return TrainingConfig(**settings)


def _train(args: argparse.Namespace) -> int:
    from veil.artifacts import ArtifactError
    from veil.runtime.keywrap import KeyMaterialError
    from veil.runtime.sealing import SealedModelError
    from veil.training.distributed import World
    from veil.training.train import (
        DPSGD_FAMILIES,
        TrainingError,
        TrainingRefusedError,
        train,
        train_replica,
    )

    logs.configure_program()  # text, or JSON lines as the operator's (VEIL_LOG_FORMAT)
    log = logging.getLogger("veil.training")
    try:
        world = World.from_env()  # a PyTorchJob's replica: WORLD_SIZE, RANK
        config = config_from_args(args)  # the request only: no row is read here
        together = world.distributed and config.family in DPSGD_FAMILIES
        if world.rank != 0 and not together:
            # The other families train in one process: the master's.
            log.warning("replica of rank %s: %s trains on rank 0 only", world.rank, config.family)
            return EXIT_OK
        wrapper = key_wrapper(args) if world.rank == 0 else None  # only rank 0 seals
    except (ValueError, TrainingRefusedError) as bad:
        return _fail(str(bad), EXIT_USAGE)
    try:
        if together:
            log.info("replica %s of %s: distributed DP-SGD", world.rank, world.size)
            result = train_replica(config, wrapper, world)
        else:
            assert wrapper is not None
            result = train(config, wrapper)
    except TrainingRefusedError as refused:
        return _fail(str(refused), EXIT_USAGE)
    except (TrainingError, ArtifactError, KeyMaterialError, SealedModelError) as failed:
        return _fail(str(failed), EXIT_FAILED)
    if result is None:  # another rank than 0: trained; rank 0 writes
        return EXIT_OK
    print(json.dumps(result, indent=None if logs.json_enabled() else 2, sort_keys=True))
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train` to the `veil` command."""
    parser = subparsers.add_parser(
        "train",
        help="train a differentially-private model (diffprivlib, or DP-SGD with Opacus), "
        "export ONNX and seal it",
        description="Train logistic regression, Gaussian naive Bayes or a random forest with "
        "diffprivlib at epsilon, or an MLP or small CNN by DP-SGD (Opacus) at (epsilon, delta), "
        "on a table (declared classes; features clipped to public bounds), export it to ONNX, "
        "check the export predicts like the trained model on "
        "points of the bounds box, seal it to the model key and write it; prints the result "
        "(mechanisms, sha256, a DP accuracy estimate with --evaluation-epsilon) as JSON. "
        "Flags override the fields of --spec.",
    )
    parser.add_argument(
        "--spec", type=Path, help="JSON/YAML ConfidentialModel, its spec, or its spec.training"
    )
    parser.add_argument("--dataset", help="training table URI or path (CSV, or Parquet)")
    parser.add_argument("--format", choices=("csv", "parquet"), help="table format")
    parser.add_argument("--target", help="the label column")
    parser.add_argument(
        "--features", action="append", metavar="COL[,COL...]", help="feature columns (default: all)"
    )
    parser.add_argument(
        "--family",
        choices=("logisticRegression", "gaussianNB", "randomForest", "mlp", "cnn"),
        help="model (mlp, cnn: DP-SGD, needs the dpsgd extra)",
    )
    parser.add_argument(
        "--epsilon", type=float, help="epsilon of the fit (pure DP; DP-SGD: with --delta)"
    )
    parser.add_argument(
        "--delta", type=float, help="DP-SGD: delta of the fit; others: charged, unused (pure DP)"
    )
    parser.add_argument(
        "--bounds",
        action="append",
        metavar="COL=LOW:HIGH",
        help="public bounds of a feature (every feature needs some)",
    )
    parser.add_argument(
        "--bounds-file", metavar="PATH|URI", help='JSON {"column": [low, high], ...}'
    )
    parser.add_argument(
        "--default-bounds", metavar="LOW:HIGH", help="bounds of every feature not bounded above"
    )
    parser.add_argument(
        "--classes",
        action="append",
        metavar="C[,C...]",
        help="the label set, required: it is public, never read off the data (rows with "
        "another label are dropped)",
    )
    parser.add_argument(
        "--evaluation-epsilon",
        type=float,
        help="epsilon of a DP accuracy estimate on held-out rows, beside --epsilon "
        "(default 0: no held-out rows, no accuracy)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        help="expected held-out share with --evaluation-epsilon (default 0.2)",
    )
    parser.add_argument(
        "--seed", type=int, help="fixes the split's hash key and the noise (tests only)"
    )
    parser.add_argument("--max-iter", type=int, help="logistic regression iterations (100)")
    parser.add_argument("--n-estimators", type=int, help="random forest trees (10)")
    parser.add_argument("--max-depth", type=int, help="random forest depth (5)")
    sgd = parser.add_argument_group("DP-SGD (families mlp, cnn)")
    sgd.add_argument(
        "--dataset-rows",
        type=int,
        help="the dataset's declared row count (public; required): sampling rate = batch / rows",
    )
    sgd.add_argument("--epochs", type=int, help="passes over the declared rows (10)")
    sgd.add_argument("--batch-size", type=int, help="expected logical batch (Poisson) (256)")
    sgd.add_argument("--max-grad-norm", type=float, help="per-sample clipping norm C (1.0)")
    sgd.add_argument(
        "--noise-multiplier",
        type=float,
        help="sigma; default: the smallest sigma whose epsilon at delta is within --epsilon",
    )
    sgd.add_argument("--hidden", metavar="W[,W...]", help="hidden widths, or 'none' (64)")
    sgd.add_argument(
        "--input-shape", metavar="[C,]H,W", help="cnn: input image shape over the features"
    )
    sgd.add_argument("--channels", metavar="C[,C...]", help="cnn: conv channels (16,32)")
    sgd.add_argument("--optimizer", choices=("sgd", "adam"), help="optimizer (adam)")
    sgd.add_argument("--learning-rate", type=float, help="learning rate (0.02)")
    sgd.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    sgd.add_argument(
        "--max-physical-batch-size",
        type=int,
        help="rows per forward/backward; larger logical batches accumulate (1024)",
    )
    sgd.add_argument(
        "--grad-sample-mode",
        choices=("hooks", "functorch", "ew", "ghost"),
        help="Opacus per-sample gradients (ghost: ghost clipping)",
    )
    sgd.add_argument(
        "--secure-rng",
        action="store_true",
        help="batches and noise from os.urandom (slower; for production)",
    )
    sgd.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (auto)")
    sgd.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", help="where to write the sealed model (URI or path)")
    key = parser.add_mutually_exclusive_group(required=True)
    key.add_argument("--public-key", type=Path, help="PEM RSA public key to seal to")
    key.add_argument("--vault-url", help="Azure Key Vault URL (wrap through Key Vault)")
    parser.add_argument("--key-name", help="Key Vault key name (with --vault-url)")
    parser.add_argument("--key-version", help="Key Vault key version (default: latest)")
    parser.add_argument("--key-id", help="key id to record with --public-key")
    parser.add_argument("--result", help="also write the result JSON here (URI or path)")
    parser.set_defaults(func=_train)
