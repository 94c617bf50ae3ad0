"""What one training run spends, stated once for the trainer's result and the controller's claim.

Two pure-ε mechanisms, composed sequentially (so their ε's add up on the budget):

- the fit: diffprivlib's models are pure ε-DP on the training rows; δ, when the spec gives
  one, is charged as declared although the models use none (charging more is safe);
- the evaluation, when `evaluationEpsilon` > 0: a noisy count of correctly classified test
  rows and a noisy count of test rows, two-sided geometric noise at ε_eval / 2 each
  (sensitivity 1 each under add/remove of one record).

`evaluationEpsilon` is beside ε, not part of it: a run at ε 1 with evaluationEpsilon 0.2
costs the budget ε 1.2.
"""

from __future__ import annotations

import math
from typing import Any

from veil.privacy.mechanisms import EpsilonDeltaMechanism


def mechanisms(
    epsilon: float, evaluation_epsilon: float = 0.0, delta: float = 0.0
) -> tuple[EpsilonDeltaMechanism, ...]:
    """The mechanisms of a run: the fit, then the evaluation when it is paid for."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError("epsilon must be a positive number")
    if not (evaluation_epsilon >= 0 and math.isfinite(evaluation_epsilon)):
        raise ValueError("evaluation epsilon must be a non-negative number")
    spent = [EpsilonDeltaMechanism(epsilon=epsilon, delta=delta)]
    if evaluation_epsilon > 0:
        spent.append(EpsilonDeltaMechanism(epsilon=evaluation_epsilon, delta=0.0))
    return tuple(spent)


def claim_mechanisms(
    epsilon: float, evaluation_epsilon: float = 0.0, delta: float = 0.0
) -> list[dict[str, Any]]:
    """`mechanisms` in the privacy ledger's wire format."""
    return [
        m.model_dump(mode="json", by_alias=True)
        for m in mechanisms(epsilon, evaluation_epsilon, delta)
    ]
