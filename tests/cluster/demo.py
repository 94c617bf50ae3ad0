"""The main job's real inputs: the breast-cancer classifier (scikit-learn → ONNX) and a
diabetes study table, both from scikit-learn's bundled datasets (no download).

The study table is scikit-learn's diabetes data (442 patients, raw units) in the columns the
SyntheticDataset example declares: age, sex, bmi, glucose (the serum glucose measurement s6),
outcome (disease progression above the median) and clinic. The bundled data names no clinic:
each patient is assigned one of four clinics by a keyed hash of the row number, so the column
has something for DP value discovery to find.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLINICS = ("north", "south", "east", "west")


@dataclass(frozen=True)
class Classifier:
    onnx: bytes
    # A few rows of the test split and the classifier's own probabilities for them.
    sample: np.ndarray


def breast_cancer_classifier() -> Classifier:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = load_breast_cancer(return_X_y=True)
    features = features.astype(np.float32)
    train_x, test_x, train_y, _ = train_test_split(features, labels, test_size=0.2, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(train_x, train_y)
    onnx = to_onnx(model, train_x[:1], options={"zipmap": False}, target_opset=17)
    return Classifier(onnx=onnx.SerializeToString(), sample=test_x[:4])


def diabetes_study_csv(path: Path) -> Path:
    from sklearn.datasets import load_diabetes

    data = load_diabetes(as_frame=True, scaled=False).frame
    rows = ["age,sex,bmi,glucose,clinic,outcome"]
    median = float(data["target"].median())
    for index, row in data.iterrows():
        sex = "female" if row["sex"] == 1 else "male"
        digest = hashlib.sha256(f"veil-demo-clinic:{index}".encode()).digest()
        clinic = CLINICS[digest[0] % len(CLINICS)]
        outcome = "1" if row["target"] > median else "0"
        rows.append(f"{int(row['age'])},{sex},{row['bmi']:.1f},{int(row['s6'])},{clinic},{outcome}")
    path.write_text("\n".join(rows) + "\n")
    return path


def oncology_csv(path: Path) -> Path:
    """The DP training example's table: three tumour measurements and the diagnosis."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame = frame[["mean radius", "mean texture", "mean smoothness", "target"]]
    frame.columns = ["radius", "texture", "smoothness", "malignant"]
    frame.to_csv(path, index=False)
    return path
