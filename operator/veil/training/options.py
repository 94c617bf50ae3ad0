"""The DP-SGD settings, stated once: spec field ↔ `veil train` flag ↔ `DpSgdSettings` field.

The controller turns `spec.training` into flags for the Job (`flags`) and into the settings its
claim is planned from (`spec_settings`); `veil train` turns the flags back into settings
(`commands.dpsgd_settings`). All three go through `OPTIONS`, so the claim is planned from the
very numbers the trainer runs with. No torch here: the operator imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from veil.training.claim import DpSgdPlan, dpsgd_plan
from veil.training.dpsgd import FAMILIES, DpSgdSettings

Kind = Literal["value", "widths", "switch"]


@dataclass(frozen=True)
class Option:
    """One DP-SGD setting: `name` is the spec's field (snake_case) and `DpSgdSettings`'s."""

    name: str
    kind: Kind = "value"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("dataset_rows"),
    Option("epochs"),
    Option("batch_size"),
    Option("max_grad_norm"),
    Option("noise_multiplier"),
    Option("hidden", "widths"),
    Option("input_shape", "widths"),
    Option("channels", "widths"),
    Option("optimizer"),
    Option("learning_rate"),
    Option("momentum"),
    Option("max_physical_batch_size"),
    Option("grad_sample_mode"),
    Option("secure_rng", "switch"),
)
# Flags of `veil train` with no spec field: where and how the process runs.
RUN_OPTIONS: tuple[Option, ...] = (Option("device"), Option("threads"))


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def flags(source: Any) -> list[str]:
    """The `veil train` flags of the options `source` (e.g. `spec.training`) sets."""
    out: list[str] = []
    for option in OPTIONS:
        value = getattr(source, option.name, None)
        if value is None or (option.kind == "switch" and not value):
            continue
        if option.kind == "switch":
            out.append(option.flag)
        elif option.kind == "widths":
            out += [option.flag, ",".join(str(w) for w in value) or "none"]
        else:
            out += [option.flag, _text(value)]
    return out


def parse_widths(text: str, flag: str) -> tuple[int, ...]:
    """`64,32` (or `1x28x28`; `none`: no layer) as integers."""
    if text == "none":
        return ()
    try:
        return tuple(int(w) for w in text.replace("x", ",").split(",") if w.strip())
    except ValueError:
        raise ValueError(f"{flag} must be integers separated by commas: {text!r}") from None


def updates(source: Any, *, parse: bool = False) -> dict[str, Any]:
    """`DpSgdSettings` fields from the options `source` sets (argparse's namespace with
    `parse`: widths as text; a spec: widths as lists)."""
    out: dict[str, Any] = {}
    for option in (*OPTIONS, *(RUN_OPTIONS if parse else ())):
        value = getattr(source, option.name, None)
        if value is None or (option.kind == "switch" and not value):
            continue
        if option.kind == "widths":
            value = parse_widths(value, option.flag) if parse else tuple(value)
        out[option.name] = value
    return out


def spec_settings(training: Any, base: DpSgdSettings | None = None) -> DpSgdSettings:
    """The settings a DP-SGD `spec.training` trains with: the trainer's defaults, the spec over."""
    return replace(base if base is not None else DpSgdSettings(), **updates(training))


def spec_plan(training: Any) -> DpSgdPlan | None:
    """The DP-SGD event a `spec.training` spends (None for the other families); ValueError
    when it cannot be met (e.g. no σ reaches ε over that many steps)."""
    if training.family not in FAMILIES:
        return None
    return plan_for(training.epsilon, training.delta, spec_settings(training))


def plan_for(epsilon: float, delta: float, settings: DpSgdSettings) -> DpSgdPlan:
    """The DP-SGD event of a run at (ε, δ) with `settings`: the trainer's plan and the claim's."""
    return dpsgd_plan(
        epsilon,
        delta,
        batch_size=settings.batch_size,
        dataset_rows=settings.dataset_rows,
        epochs=settings.epochs,
        noise_multiplier=settings.noise_multiplier,
    )
