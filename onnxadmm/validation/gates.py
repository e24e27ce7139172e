"""CI gates on the validation figures. A missed gate makes the command exit 1.

A gate is decided on the measured figure. Where its limit lies inside the figure's 95 % interval — over the
held-out samples (``intervals.py``), or over the A/B rounds for the speed-up (``cost/timing.py``) — the gate says
so (``within_noise``): another draw of the same size could decide it the other way, and more would settle it."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ValidateConfig
from ..cost.timing import LatencyAB
from ..errors import ConfigError
from .compare import Comparison
from .intervals import straddles


@dataclass
class GateResult:
    name: str
    threshold: float
    value: float
    passed: bool
    detail: str
    within_noise: bool = False  # the limit lies inside the figure's 95 % interval over the held-out samples

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_gate_inputs(config: ValidateConfig, has_labels: bool) -> None:
    """Fail before any work when a gate cannot be evaluated with the data given."""
    if config.max_accuracy_drop is not None and not has_labels:
        raise ConfigError("--max-accuracy-drop needs labelled evaluation data: pass --labels KEY naming "
                          "the labels array in the data .npz")


def evaluate(config: ValidateConfig, comparison: Comparison, latencies: list[LatencyAB]) -> list[GateResult]:
    gates = []
    if config.max_accuracy_drop is not None:
        drop = comparison.accuracy_drop_pt
        if drop is None:
            raise ConfigError("--max-accuracy-drop needs a classifier output ([N, C]) and labels")
        interval = comparison.accuracy_drop_interval_pt
        noisy = interval is not None and straddles(interval, config.max_accuracy_drop)
        gates.append(GateResult("max_accuracy_drop", config.max_accuracy_drop, drop,
                                drop <= config.max_accuracy_drop + 1e-9,
                                f"top-1 drop {drop:.2f} pt (limit {config.max_accuracy_drop:.2f} pt)"
                                + _noise_note(interval, noisy, " pt", 2, f"{comparison.samples} samples"), noisy))
    if config.min_agreement is not None:
        if comparison.agreement is None:
            raise ConfigError("--min-agreement needs a classifier output of shape [N, C] as first output")
        interval = comparison.agreement_interval
        noisy = interval is not None and straddles(interval, config.min_agreement)
        gates.append(GateResult("min_agreement", config.min_agreement, comparison.agreement,
                                comparison.agreement >= config.min_agreement,
                                f"top-1 agreement {comparison.agreement:.4f} (min {config.min_agreement})"
                                + _noise_note(interval, noisy, "", 4, f"{comparison.samples} samples"), noisy))
    if config.min_speedup is not None:
        worst = min(latencies, key=lambda l: l.speedup)
        interval = worst.speedup_interval
        noisy = interval is not None and straddles(interval, config.min_speedup)
        gates.append(GateResult("min_speedup", config.min_speedup, worst.speedup,
                                worst.speedup >= config.min_speedup,
                                f"speed-up {worst.speedup:.3f}x at batch {worst.batch_size} "
                                f"(band {1 / worst.ratio_p90:.3f}-{1 / worst.ratio_p10:.3f}x; min "
                                f"{config.min_speedup}x)"
                                + _noise_note(interval, noisy, "x", 3, f"{worst.rounds} A/B rounds", "A/B rounds"),
                                noisy))
    return gates


def _noise_note(interval: tuple[float, float] | None, noisy: bool, suffix: str, digits: int, over: str,
                more: str = "held-out samples") -> str:
    """The 95 % interval (each end followed by ``suffix``, e.g. ' pt') over ``over`` (e.g. '500 samples'), and
    whether the limit lies inside it (then ``more`` of what would decide the gate)."""
    if interval is None:
        return ""
    note = f"; 95 % interval {interval[0]:.{digits}f} to {interval[1]:.{digits}f}{suffix} over {over}"
    return note + (f", which holds the limit: more {more} would decide this gate" if noisy else "")
