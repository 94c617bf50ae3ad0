"""ONNX export of diffprivlib models, with the training-time clipping and scaling built in.

skl2onnx has no converters for diffprivlib's classes (`MissingShapeCalculator`), so each
fitted model is copied into the plain scikit-learn estimator it extends — the fitted
parameters are all that prediction uses:

- logistic regression: `coef_`, `intercept_`, `classes_` (one-vs-rest, as diffprivlib fits it);
- Gaussian naive Bayes: `theta_`, `var_`, `class_prior_`, `class_count_`, `classes_`;
- random forest: the fitted trees themselves (diffprivlib's trees are scikit-learn
  `DecisionTreeClassifier`s holding a scikit-learn `Tree`), in a scikit-learn forest
  (`forest_of`, which is also how `veil.training.learners` assembles the trained forest).

The exported graph is `MinMaxScaler(clip=True) → classifier`, the scaler set from the public
bounds (never fitted to data), so the ONNX model takes raw features exactly as the training
rows came and clips and scales them the same way. `check_export` compares the export with the
trained model on points drawn from the bounds box (`probe_points`), never on data rows, so
the check itself learns nothing about the data and its figures may be published.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

FEATURE_RANGE = (-0.5, 0.5)
TARGET_OPSET = 17


def bounds_scaler(lower: npt.NDArray[np.float64], upper: npt.NDArray[np.float64]) -> Any:
    """A MinMaxScaler mapping [lower, upper] onto FEATURE_RANGE with clipping; set from the
    bounds alone (it is fitted on the two rows `lower` and `upper`, not on any data)."""
    from sklearn.preprocessing import MinMaxScaler

    scaler = MinMaxScaler(feature_range=FEATURE_RANGE, clip=True)
    scaler.fit(np.vstack([lower, upper]))
    return scaler


def plain_estimator(model: Any, family: str) -> Any:
    """The scikit-learn estimator with the diffprivlib model's fitted parameters."""
    if family == "logisticRegression":
        from sklearn.linear_model import LogisticRegression

        plain = LogisticRegression()
        plain.coef_ = np.array(model.coef_, dtype=np.float64)
        plain.intercept_ = np.array(model.intercept_, dtype=np.float64)
        plain.classes_ = np.array(model.classes_)
        plain.n_features_in_ = int(model.coef_.shape[1])
        plain.n_iter_ = np.array(getattr(model, "n_iter_", [0]))
        # diffprivlib fits one-vs-rest; scikit-learn's default would be softmax on >2 classes.
        plain.multi_class = "ovr"
        return plain
    if family == "gaussianNB":
        from sklearn.naive_bayes import GaussianNB

        plain = GaussianNB()
        plain.theta_ = np.array(model.theta_, dtype=np.float64)
        plain.var_ = np.array(model.var_, dtype=np.float64)
        plain.class_prior_ = np.array(model.class_prior_, dtype=np.float64)
        plain.class_count_ = np.array(model.class_count_, dtype=np.float64)
        plain.classes_ = np.array(model.classes_)
        plain.epsilon_ = float(getattr(model, "epsilon_", 0.0))
        plain.n_features_in_ = int(model.theta_.shape[1])
        return plain
    if family == "randomForest":
        return forest_of(list(model.estimators_), model.classes_, int(model.n_features_in_))
    raise ValueError(f"unknown model family {family!r}")


def forest_of(trees: list[Any], classes: npt.NDArray[Any], n_features: int) -> Any:
    """A scikit-learn forest holding already fitted trees (it predicts by averaging them)."""
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=len(trees))
    forest.estimators_ = trees
    forest.classes_ = np.array(classes)
    forest.n_classes_ = len(classes)
    forest.n_outputs_ = 1
    forest.n_features_in_ = n_features
    forest.estimator_ = trees[0]
    return forest


def export_onnx(
    model: Any,
    family: str,
    lower: npt.NDArray[np.float64],
    upper: npt.NDArray[np.float64],
) -> bytes:
    """Serialized ONNX for `clip+scale → model`; one float32 input `input` of shape [N, d]."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.pipeline import Pipeline

    pipeline = Pipeline(
        [("bounds", bounds_scaler(lower, upper)), ("model", plain_estimator(model, family))]
    )
    options: dict[Any, Any] = {id(pipeline.steps[-1][1]): {"zipmap": False}}
    onnx_model = convert_sklearn(
        pipeline,
        initial_types=[("input", FloatTensorType([None, len(lower)]))],
        options=options,
        target_opset={"": TARGET_OPSET, "ai.onnx.ml": 3},
    )
    payload: bytes = onnx_model.SerializeToString()
    return payload


def onnx_predict(payload: bytes, features: npt.NDArray[Any]) -> tuple[Any, Any]:
    """Labels and class probabilities from the exported model, with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": np.asarray(features, dtype=np.float32)})
    return outputs[0], outputs[1]


PROBE_POINTS = 512
PROBABILITY_TOLERANCE = 1e-4


class ExportMismatchError(Exception):
    """The ONNX export predicts differently from the trained model."""


def probe_points(
    lower: npt.NDArray[np.float64], upper: npt.NDArray[np.float64], seed: int | None
) -> npt.NDArray[np.float64]:
    """Points to check an export on, drawn from the public bounds box alone (never from the
    data): three quarters inside it, a quarter up to one span beyond it (where the export must
    clip). Rounded to float32, the ONNX input type, so both models see the same numbers."""
    rng = np.random.default_rng(seed)
    span = upper - lower
    inside = rng.uniform(lower, upper, size=(PROBE_POINTS * 3 // 4, len(lower)))
    around = rng.uniform(lower - span, upper + span, size=(PROBE_POINTS // 4, len(lower)))
    return np.vstack([inside, around]).astype(np.float32).astype(np.float64)


def check_export(
    payload: bytes, model: Any, scaler: Any, points: npt.NDArray[np.float64]
) -> dict[str, float]:
    """Refuse an export that does not predict like the trained model on `points`.

    Labels must agree wherever the model's top class leads by more than the tolerance (a
    forest's tied vote may break either way); probabilities must agree everywhere."""
    onnx_labels, onnx_proba = onnx_predict(payload, points)
    scaled = scaler.transform(points)
    proba = np.asarray(model.predict_proba(scaled))
    ranked = np.sort(proba, axis=1)
    decided = ranked[:, -1] - ranked[:, -2] > PROBABILITY_TOLERANCE
    agree = np.asarray(onnx_labels) == model.predict(scaled)
    agreement = float(np.mean(agree[decided])) if decided.any() else 1.0
    proba_diff = float(np.max(np.abs(np.asarray(onnx_proba) - proba)))
    if agreement < 1.0 or proba_diff > PROBABILITY_TOLERANCE:
        raise ExportMismatchError(
            f"the ONNX export does not predict like the trained model on {len(points)} points "
            f"of the public bounds box (label agreement {agreement:.4f}, largest probability "
            f"difference {proba_diff:.2e})"
        )
    return {"labelAgreement": agreement, "maxProbabilityDiff": proba_diff}
