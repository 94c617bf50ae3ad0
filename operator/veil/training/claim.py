"""What one training run spends, stated once for the trainer's result and the controller's claim.

Two mechanisms, composed sequentially:

- the fit. diffprivlib's models are pure ε-DP on the training rows: `epsilonDelta` (ε, δ),
  δ charged as declared although the models use none (charging more is safe). A DP-SGD
  network (`mlp`, `cnn`) is the DP-SGD event itself, `dpsgd` (sampling rate q, noise
  multiplier σ, steps T): what the budget's accountant composes, and exactly the numbers
  Opacus trains with (`dpsgd_plan`);
- the evaluation, when `evaluationEpsilon` > 0: a noisy count of correctly classified test
  rows and a noisy count of test rows, two-sided geometric noise at ε_eval / 2 each
  (sensitivity 1 each under add/remove of one record).

`evaluationEpsilon` is beside ε, not part of it: a run at ε 1 with evaluationEpsilon 0.2
costs the budget ε 1.2 (for DP-SGD: the DP-SGD event, plus a pure ε 0.2).

**DP-SGD's numbers come from the spec alone**, so the controller states the claim before any
row is read and the trainer cannot drift from it: q = batchSize / datasetRows (the declared,
public row count: each row joins each step's batch with probability q, whatever the table
really holds, so the guarantee never depends on the true count), T = ⌈epochs / q⌉, and σ
either as given (ε is then the plan's, refused above the spec's ε) or the smallest σ (to four
significant digits, rounded up) whose RDP ε at δ is within ε. RDP (dp_accounting's orders) is
the calibration: it bounds the budget's `pld` figure and Opacus's own RDP and PRV accountants
from above, so the model is (ε, δ)-DP by every one of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any

from veil.privacy.mechanisms import DpSgdMechanism, EpsilonDeltaMechanism, Mechanism

# σ is searched within these; beyond the upper end, the request cannot be met usefully.
NOISE_MULTIPLIER_RANGE = (0.05, 1000.0)


@dataclass(frozen=True)
class DpSgdPlan:
    """A DP-SGD run's privacy parameters, all public: decided from the spec alone."""

    sampling_rate: float
    noise_multiplier: float
    steps: int
    epsilon: float  # the RDP ε of the run at `delta`
    delta: float
    batch_size: int  # the expected logical batch: q × datasetRows, the gradient's divisor

    def mechanism(self) -> DpSgdMechanism:
        return DpSgdMechanism(
            sampling_rate=self.sampling_rate,
            noise_multiplier=self.noise_multiplier,
            steps=self.steps,
        )


def run_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """The RDP ε (dp_accounting's orders) of a DP-SGD run at δ."""
    from veil.privacy.accounting import rdp_epsilon

    return rdp_epsilon(
        [
            DpSgdMechanism(
                sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, steps=steps
            )
        ],
        delta,
    )


def _round_up(value: float, units: int = 0) -> float:
    """`value` rounded up to four significant digits (a stable, readable σ), plus `units`
    in the last of them."""
    exponent = math.floor(math.log10(value)) - 3
    return float(Decimal(math.ceil(value / 10.0**exponent) + units).scaleb(exponent))


@lru_cache(maxsize=256)
def calibrate_noise(epsilon: float, delta: float, sampling_rate: float, steps: int) -> float:
    """The smallest σ (four significant digits, rounded up) with RDP ε ≤ `epsilon` at δ."""
    low, high = NOISE_MULTIPLIER_RANGE
    if run_epsilon(sampling_rate, high, steps, delta) > epsilon:
        raise ValueError(
            f"no noise multiplier up to {high:g} gives ε {epsilon:g} at δ {delta:g} over "
            f"{steps} steps at sampling rate {sampling_rate:.4g}: raise ε, or train fewer epochs"
        )
    if run_epsilon(sampling_rate, low, steps, delta) <= epsilon:
        return low
    for _ in range(60):  # bisection on log σ, to well under the rounding
        middle = math.sqrt(low * high)
        if run_epsilon(sampling_rate, middle, steps, delta) <= epsilon:
            high = middle
        else:
            low = middle
        if high / low < 1 + 1e-5:
            break
    sigma = _round_up(high)
    # Rounding up only adds noise; checked anyway (float division), as the claim depends on it.
    while run_epsilon(sampling_rate, sigma, steps, delta) > epsilon:
        sigma = _round_up(sigma, units=1)
    return sigma


def dpsgd_plan(
    epsilon: float,
    delta: float,
    *,
    batch_size: int,
    dataset_rows: int,
    epochs: int,
    noise_multiplier: float | None = None,
) -> DpSgdPlan:
    """The DP-SGD event of a run, from the spec (see the module docstring); ValueError if
    the request is inconsistent or cannot be met."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError("epsilon must be a positive number")
    if not 0 < delta < 1:
        raise ValueError("DP-SGD needs a delta in (0, 1)")
    if batch_size < 1 or epochs < 1 or dataset_rows < 1:
        raise ValueError("batch size, epochs and dataset rows must be at least 1")
    if batch_size > dataset_rows:
        raise ValueError("the batch size cannot exceed the declared dataset rows")
    sampling_rate = batch_size / dataset_rows
    steps = math.ceil(epochs * dataset_rows / batch_size)
    if noise_multiplier is None:
        sigma = calibrate_noise(epsilon, delta, sampling_rate, steps)
    else:
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ValueError("the noise multiplier must be a positive number")
        sigma = noise_multiplier
    spent = run_epsilon(sampling_rate, sigma, steps, delta)
    if spent > epsilon:
        raise ValueError(
            f"noise multiplier {sigma:g} over {steps} steps at sampling rate "
            f"{sampling_rate:.4g} spends ε {spent:.4g} at δ {delta:g}, above ε {epsilon:g}"
        )
    return DpSgdPlan(sampling_rate, sigma, steps, spent, delta, batch_size)


def mechanisms(
    epsilon: float,
    evaluation_epsilon: float = 0.0,
    delta: float = 0.0,
    dpsgd: DpSgdPlan | None = None,
) -> tuple[Mechanism, ...]:
    """The mechanisms of a run: the fit (the DP-SGD event when `dpsgd` is given), then the
    evaluation when it is paid for."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError("epsilon must be a positive number")
    if not (evaluation_epsilon >= 0 and math.isfinite(evaluation_epsilon)):
        raise ValueError("evaluation epsilon must be a non-negative number")
    spent: list[Mechanism] = [
        dpsgd.mechanism()
        if dpsgd is not None
        else EpsilonDeltaMechanism(epsilon=epsilon, delta=delta)
    ]
    if evaluation_epsilon > 0:
        spent.append(EpsilonDeltaMechanism(epsilon=evaluation_epsilon, delta=0.0))
    return tuple(spent)


def claim_mechanisms(
    epsilon: float,
    evaluation_epsilon: float = 0.0,
    delta: float = 0.0,
    dpsgd: DpSgdPlan | None = None,
) -> list[dict[str, Any]]:
    """`mechanisms` in the privacy ledger's wire format."""
    return [
        m.model_dump(mode="json", by_alias=True)
        for m in mechanisms(epsilon, evaluation_epsilon, delta, dpsgd)
    ]
