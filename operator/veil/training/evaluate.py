"""The model's accuracy on held-out rows, released only as a DP estimate the claim paid for.

Two counts over the test rows, each with two-sided geometric (discrete Laplace) noise at
ε_eval / 2: the rows the model classifies correctly and all test rows. Adding or removing
one record changes each count by at most 1, so the pair is ε_eval-DP; the accuracy is their
ratio, clipped to [0, 1] (post-processing). Integer noise on integer counts avoids the
floating-point attacks on the continuous Laplace mechanism.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The result's figures that are DP estimates (paths into the result), when evaluated.
DP_ESTIMATES = ("evaluation.accuracy", "evaluation.noisyCorrect", "evaluation.noisyTotal")


def dp_accuracy(correct: int, total: int, epsilon: float, seed: int | None) -> dict[str, Any]:
    """Noisy counts and the accuracy estimate; `accuracy` is None when the noisy total is not
    positive (nothing to divide by)."""
    from diffprivlib.mechanisms import Geometric  # type: ignore[import-untyped,unused-ignore]

    # Seeded (tests) apart from the learners' stream; otherwise diffprivlib uses `secrets`.
    random_state = None if seed is None else np.random.RandomState([seed, 2])
    noise = Geometric(epsilon=epsilon / 2, sensitivity=1, random_state=random_state)
    noisy_correct, noisy_total = int(noise.randomise(correct)), int(noise.randomise(total))
    accuracy = (
        round(min(1.0, max(0.0, noisy_correct / noisy_total)), 6) if noisy_total > 0 else None
    )
    return {
        "epsilon": epsilon,
        "mechanism": "twoSidedGeometric",
        "noisyCorrect": noisy_correct,
        "noisyTotal": noisy_total,
        "accuracy": accuracy,
    }
