"""Fixtures for every unit test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _jax_cache() -> Iterator[None]:
    """Keep JAX's compiled programs across runs: most of a small MST fit is compiling."""
    cache = Path(os.environ.get("VEIL_CACHE", Path.home() / ".cache" / "veil")) / "jax"
    cache.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VEIL_JAX_CACHE_DIR", str(cache))
        yield
