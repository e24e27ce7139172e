"""Choose each layer's sparsity for a global target: uniform, fixed by the pattern (N:M), or allocated
by measured sensitivity (see ``sensitivity.py``) under the budget Σ kept weights ≤ (1 − F)·Σ weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..analysis.layers import Layer
from ..calib.readers import SampleSet
from ..config import CompressConfig
from ..onnxio.graph import GraphView
from .allocate import Option, allocate
from .sensitivity import entry_scores, error_curve, input_second_moments, output_damage, prune_by_score

LEVELS = np.round(np.arange(0.0, 0.9901, 0.01), 2)


@dataclass
class Plan:
    """Per-layer target level (sparsity), how it was chosen, and the evidence."""

    levels: dict[str, float]
    strategy: str
    measured_damage: dict[str, float] = field(default_factory=dict)
    probe_level: float | None = None

    def report(self) -> dict:
        return {"strategy": self.strategy, "probe_level": self.probe_level,
                "measured_output_damage": self.measured_damage}


def plan_sparsity(view: GraphView, layers: list[Layer], samples: SampleSet, config: CompressConfig
                  ) -> Plan:
    if config.method == "nm":
        n, m = config.nm_pattern
        return Plan({l.name: 1.0 - n / m for l in layers}, f"fixed by the {n}:{m} pattern")
    if config.uniform or not layers or config.sparsity == 0:
        return Plan({l.name: config.sparsity for l in layers}, "uniform")
    subset = samples.spread(config.sensitivity_samples)
    moments = input_second_moments(view, layers, subset, config.batch_size, config.threads)
    probe = float(np.clip(config.sparsity, 0.3, 0.95))
    weights = {l.name: l.canonical(view.constant(l.weight_name)) for l in layers}
    scores = {l.name: entry_scores(weights[l.name], moments[l.name]) for l in layers}
    probes = {l.name: {l.weight_name: l.stored(prune_by_score(weights[l.name], scores[l.name], probe))}
              for l in layers}
    damage = output_damage(view, probes, subset, config.batch_size, config.threads)
    options = {}
    for layer in layers:
        curve = error_curve(scores[layer.name], LEVELS)
        at_probe = float(error_curve(scores[layer.name], np.array([probe]))[0])
        alpha = damage[layer.name] / max(at_probe, 1e-12)
        options[layer.name] = [Option(float(s), layer.num_weights * (1 - s), alpha * float(e))
                               for s, e in zip(LEVELS, curve)]
    budget = (1.0 - config.sparsity) * sum(l.num_weights for l in layers)
    chosen = allocate(options, budget, what=f"sparsity target {config.sparsity}")
    return Plan({name: o.level for name, o in chosen.items()}, "sensitivity", damage, probe)
