"""Stage timing, with a tqdm progress bar on a terminal (a ticking clock for long fits)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def want_progress(setting: bool | None) -> bool:
    """An explicit choice, else a bar only when stderr is a terminal."""
    if setting is not None:
        return setting
    return sys.stderr.isatty()


class Stages:
    """Times named stages (`seconds`); draws one bar over them when `show` is true."""

    def __init__(self, names: Sequence[str], *, show: bool, title: str) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.monotonic()
        self._bar: Any = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
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
            bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}{postfix}",
        )
        self._ticker = threading.Thread(target=self._tick, name="veil-progress", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            bar = self._bar
            if bar is not None:
                bar.refresh()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=True)
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - started, 3)
            if self._bar is not None:
                self._bar.update(1)

    def total(self) -> float:
        return round(time.monotonic() - self._start, 3)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
