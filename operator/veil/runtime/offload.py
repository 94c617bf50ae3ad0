"""Where a model runs: inline on the event loop or in a worker thread.

Handing a request to a thread costs a few tens of microseconds (executor queue, wake-up of the
loop through its self-pipe, GIL hand-offs): more than a small model's whole inference. The model
therefore runs inline (with the encoding of its answer) when requests of the same size class
(the bit length of the body's length) recently took less than `inline_seconds` to run and
encode; anything slower, or of a size not seen yet, runs in a thread (onnxruntime releases the
GIL) so that it cannot stall the other connections.
"""

from __future__ import annotations

# Above this body size, run in a thread whatever the estimate.
_MAX_INLINE_BITS = 20  # 1 MiB
_SMOOTHING = 0.2


class CostModel:
    """A moving average of run-and-encode seconds per body size class."""

    def __init__(self, inline_seconds: float = 0.001) -> None:
        self.inline_seconds = inline_seconds
        # Samples are clipped here: one request stretched by a preemption or a GC pass must not
        # send its whole size class to threads; a model that is really slow still converges
        # above the limit. A class not seen yet starts there too (to a thread, then measured).
        self._clip = 2 * inline_seconds
        self._estimates = [self._clip] * (_MAX_INLINE_BITS + 1)

    def inline(self, body_bytes: int) -> bool:
        size_class = body_bytes.bit_length()
        return size_class <= _MAX_INLINE_BITS and self._estimates[size_class] <= self.inline_seconds

    def record(self, body_bytes: int, seconds: float) -> None:
        size_class = body_bytes.bit_length()
        if size_class <= _MAX_INLINE_BITS:
            old = self._estimates[size_class]
            self._estimates[size_class] = old + (min(seconds, self._clip) - old) * _SMOOTHING
