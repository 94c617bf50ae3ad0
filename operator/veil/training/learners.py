"""The three DP learners, fitted on features already clipped and scaled onto [-0.5, 0.5].

Each is pure ε-DP under add/remove of one training row, and each knows the declared classes
only (diffprivlib's own `fit` reads the label set off the rows; these do not):

- logistic regression: diffprivlib's objective perturbation, one-vs-rest over the declared
  classes (ε / k per class, or ε for a binary model), with `data_norm` = √d / 2. A class
  with no training row still gets its (noisy) model; diffprivlib would refuse or drop it.
- Gaussian naive Bayes: diffprivlib's noisy means and variances (ε/3 each), and for the
  class counts (ε/3) an independent two-sided geometric count per declared class, kept at
  least 1. diffprivlib's own counts cover only the classes present and are forced to sum to
  the exact number of rows, which the priors would then reveal.
- random forest: diffprivlib's trees (random structure, leaf labels by permute-and-flip at
  ε), each fitted on the rows whose keyed hash falls to it. The shares are disjoint and each
  row's share depends on that row alone, so the forest is ε-DP (parallel composition);
  diffprivlib's forest splits rows by position, so one added row would move many.

Noise comes from numpy's generator seeded by `seed` when one is given (tests); otherwise
diffprivlib's mechanisms draw from `secrets`, and its tree structure from numpy's global one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.training import data, export
from veil.training.errors import TrainingError

MAX_SEED = 2**31 - 1


@contextmanager
def quiet() -> Iterator[None]:
    """While rows are in play: no warning reaches the logs (whether the optimiser converged,
    or a numeric overflow, says something about the rows), and a PrivacyLeakWarning is an
    error (bounds, data_norm and classes are all given: one would be a bug here)."""
    from diffprivlib.utils import PrivacyLeakWarning  # type: ignore[import-untyped,unused-ignore]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", PrivacyLeakWarning)
        yield


def _random_state(seed: int | None) -> Any:
    """A seeded RandomState, or None so that diffprivlib's mechanisms use `secrets`."""
    return None if seed is None else np.random.RandomState(seed)


def logistic_regression(
    epsilon: float,
    classes: npt.NDArray[Any],
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    *,
    max_iter: int,
    seed: int | None,
) -> Any:
    """One-vs-rest objective perturbation over the declared classes."""
    from diffprivlib.models import LogisticRegression  # type: ignore[import-untyped,unused-ignore]
    from diffprivlib.models.logistic_regression import (  # type: ignore[import-untyped,unused-ignore]
        _logistic_regression_path,
    )

    n_features = x.shape[1]
    data_norm = math.sqrt(n_features) * max(abs(v) for v in export.FEATURE_RANGE)
    x = _clip_to_norm(x, data_norm)
    positives = [1] if len(classes) == 2 else list(range(len(classes)))
    model = LogisticRegression(epsilon=epsilon, data_norm=data_norm, max_iter=max_iter)
    random_state = _random_state(seed)
    coefs, iterations = [], []
    for positive in positives:
        coef, _, n_iter = _logistic_regression_path(
            x,
            y,
            epsilon=epsilon / len(positives),
            data_norm=data_norm,
            pos_class=positive,
            Cs=[model.C],
            fit_intercept=True,
            max_iter=max_iter,
            tol=model.tol,
            random_state=random_state,
            check_input=False,
        )
        coefs.append(coef[0])
        iterations.append(int(n_iter[0]))
    weights = np.asarray(coefs, dtype=np.float64)
    model.classes_ = classes
    model.coef_, model.intercept_ = weights[:, :-1], weights[:, -1]
    model.n_features_in_ = n_features
    model.n_iter_ = np.asarray(iterations, dtype=np.int32)
    return model


def _clip_to_norm(x: npt.NDArray[np.float64], norm: float) -> npt.NDArray[np.float64]:
    lengths = np.linalg.norm(x, axis=1)
    scale = np.minimum(1.0, norm / np.where(lengths > 0, lengths, 1.0))
    return x * scale[:, None]


def gaussian_nb(
    epsilon: float,
    classes: npt.NDArray[Any],
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    *,
    seed: int | None,
) -> Any:
    """diffprivlib's Gaussian naive Bayes, with a noisy count for every declared class."""
    from diffprivlib.mechanisms import Geometric  # type: ignore[import-untyped,unused-ignore]
    from diffprivlib.models import GaussianNB  # type: ignore[import-untyped,unused-ignore]

    low, high = export.FEATURE_RANGE
    n_features = x.shape[1]
    model = GaussianNB(
        epsilon=epsilon, bounds=(np.full(n_features, low), np.full(n_features, high))
    )
    model.bounds = model._check_bounds(model.bounds, shape=n_features)
    random_state = _random_state(seed)
    # One record changes one class's count by 1: each count at ε/3 (parallel over classes).
    counter = Geometric(epsilon=epsilon / 3, sensitivity=1, random_state=random_state)
    counts = np.array([max(1, counter.randomise(int(np.sum(y == i)))) for i in range(len(classes))])
    theta, var = np.zeros((len(classes), n_features)), np.zeros((len(classes), n_features))
    for i in range(len(classes)):
        theta[i], var[i] = model._update_mean_variance(
            0,
            theta[i],
            var[i],
            np.clip(x[y == i], low, high),
            random_state=random_state,
            n_noisy=int(counts[i]),
        )
    model.classes_ = classes
    model.theta_, model.var_ = theta, var + model.var_smoothing
    model.epsilon_ = model.var_smoothing
    model.class_count_ = counts.astype(np.float64)
    model.class_prior_ = model.class_count_ / model.class_count_.sum()
    model.n_features_in_ = n_features
    return model


def random_forest(
    epsilon: float,
    classes: npt.NDArray[Any],
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    *,
    trees: npt.NDArray[np.int64],
    n_estimators: int,
    max_depth: int,
    seed: int | None,
) -> Any:
    """diffprivlib trees at ε each, tree i fitted on the rows with `trees == i`."""
    from diffprivlib.accountant import BudgetAccountant  # type: ignore[import-untyped,unused-ignore]
    from diffprivlib.models.forest import (  # type: ignore[import-untyped,unused-ignore]
        DecisionTreeClassifier,
    )

    low, high = export.FEATURE_RANGE
    n_features = x.shape[1]
    bounds = (np.full(n_features, low), np.full(n_features, high))
    seeds = (
        None if seed is None else np.random.RandomState(seed).randint(MAX_SEED, size=n_estimators)
    )
    labels = classes[y]
    fitted = []
    for i in range(n_estimators):
        tree = DecisionTreeClassifier(
            max_depth=max_depth,
            epsilon=epsilon,
            bounds=bounds,
            classes=classes,
            random_state=None if seeds is None else int(seeds[i]),
            # Each tree sees a disjoint share: its spend is not added to the others'.
            accountant=BudgetAccountant(),
        )
        share = trees == i
        fitted.append(tree.fit(x[share], labels[share], check_input=False))
    return export.forest_of(fitted, classes, n_features)


def fit(
    family: str,
    epsilon: float,
    classes: data.ClassSet,
    x: npt.NDArray[np.float64],
    rows: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
    *,
    max_iter: int,
    n_estimators: int,
    max_depth: int,
    seed: int | None,
) -> Any:
    """Fit `family` at ε on scaled rows; `rows` is (class indices, forest shares)."""
    y, trees = rows
    labels = classes.array()
    try:
        with quiet():
            if family == "logisticRegression":
                return logistic_regression(epsilon, labels, x, y, max_iter=max_iter, seed=seed)
            if family == "gaussianNB":
                return gaussian_nb(epsilon, labels, x, y, seed=seed)
            return random_forest(
                epsilon,
                labels,
                x,
                y,
                trees=trees,
                n_estimators=n_estimators,
                max_depth=max_depth,
                seed=seed,
            )
    except Warning as leak:  # a PrivacyLeakWarning, raised by quiet()
        raise TrainingError(f"diffprivlib reported a privacy leak: {leak}") from None
    except Exception as failed:  # the learner's own message could quote the rows
        raise TrainingError(
            f"the {family} fit failed ({type(failed).__name__}); too few usable rows can cause this"
        ) from None
