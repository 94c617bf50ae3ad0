"""Stage names, with a tqdm progress bar on a terminal.

The bar shows which stage runs, never a clock or a rate: how long a stage takes grows with
the number of rows, which is not to be published.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def want_progress(setting: bool | None) -> bool:
    """An explicit choice, else a bar only when stderr is a terminal."""
    if setting is not None:
        return setting
    return sys.stderr.isatty()


class Stages:
    """Names the stages of a run; draws one bar over them when `show` is true."""

    def __init__(self, names: Sequence[str], *, show: bool, title: str) -> None:
        self._bar: Any = None
        if not show:
            return
        try:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            return
        self._bar = tqdm(
            total=len(names),
            desc=title,
            unit="stage",
            file=sys.stderr,
            bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}|{postfix}",
        )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=True)
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
