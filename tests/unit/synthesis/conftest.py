"""Fixtures for the synthesis tests: real data that packages ship, Azurite for az:// URIs.

- `randhie`: the RAND Health Insurance Experiment (statsmodels), 20,190 people × 10 columns;
  a 6,000-row sample keeps a fit within seconds.
- `breast_cancer`: scikit-learn's Wisconsin diagnostic set, 569 rows.
- `azurite`: `azurite-blob` from npm (hack/azurite.sh), one per session, its connection string
  in AZURE_STORAGE_CONNECTION_STRING. If it cannot be installed or started the Blob tests are
  skipped with the reason; VEIL_REQUIRE_AZURITE=1 makes that an error.
- JAX keeps compiled programs under $VEIL_CACHE/jax (most of a small fit is compilation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.synthesis.azurite import Azurite, AzuriteUnavailableError, install

RANDHIE_COLUMNS = ["mdvis", "lncoins", "idp", "physlm", "disea", "hlthg", "lpi"]
# The MST test's columns (five: a fit's time is mostly JAX compiling one program per pair).
RANDHIE_MST_COLUMNS = ["mdvis", "lncoins", "idp", "disea", "lpi"]
# Public domains, chosen from what the variables are rather than read off the rows: doctor
# visits per year capped at 20 (a choice: larger counts are clipped), physlm a 0..1
# limitation index, disea a chronic-disease count below 60, lpi a log payment below ln(3000);
# lncoins is ln(1 + coinsurance %) for the experiment's plans (0, 25, 50, 95, 100 %), idp and
# hlthg are 0/1 indicators.
LNCOINS = [0.0, 3.258096, 3.931826, 4.564348, 4.61512]
RANDHIE_DOMAINS: dict[str, dict[str, Any]] = {
    "mdvis": {"type": "numeric", "lower": 0, "upper": 20},
    "lncoins": {"type": "categorical", "values": LNCOINS},
    "idp": {"type": "categorical", "values": [0, 1]},
    "physlm": {"type": "numeric", "lower": 0, "upper": 1},
    "disea": {"type": "numeric", "lower": 0, "upper": 60},
    "hlthg": {"type": "categorical", "values": [0, 1]},
    "lpi": {"type": "numeric", "lower": 0, "upper": 8},
}


def randhie_columns(names: list[str], **overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The declared columns of `names`, in the spec's wire format (`overrides` per column)."""
    return [{"name": n, **(overrides.get(n) or RANDHIE_DOMAINS[n])} for n in names]


@pytest.fixture(scope="session")
def randhie_frame() -> Any:
    from statsmodels.datasets import randhie

    data = randhie.load_pandas().data
    return data[RANDHIE_COLUMNS].sample(6000, random_state=7).reset_index(drop=True)


@pytest.fixture(scope="session")
def randhie_csv(randhie_frame: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("randhie") / "randhie.csv"
    randhie_frame[RANDHIE_MST_COLUMNS].to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def breast_cancer_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    path = tmp_path_factory.mktemp("breast-cancer") / "breast_cancer.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    try:
        server = Azurite.start(install(), tmp_path_factory.mktemp("azurite"))
    except AzuriteUnavailableError as unavailable:
        if os.environ.get("VEIL_REQUIRE_AZURITE") == "1":
            pytest.fail(f"Azurite is required (VEIL_REQUIRE_AZURITE=1): {unavailable}")
        pytest.skip(f"Azurite unavailable: {unavailable}")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AZURE_STORAGE_CONNECTION_STRING", server.connection_string)
            yield server
    finally:
        server.stop()
