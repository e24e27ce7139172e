"""Which int8 activation form to solve: a rounding-only probe before the solve.

``--int8-activations auto`` on a model whose MatMuls hold most of the weights has two forms, static
(calibrated uint8 ranges per tensor, QDQ) and dynamic (each MatMul input's range taken at run time). Both store
the weights as int8 per channel; they differ in how the activations are rounded. So each form is first built
from the float weights rounded to nearest (onnxruntime's own max-abs scales) — static with the ranges
``--activation-range`` estimates on the float model — and scored by the held-out output error
Σ ‖y − ŷ‖² / ‖y‖² (``held_out_errors``, which also compares solved forms). When one form's error is at least
``PROBE_MARGIN`` times the other's, only the better form is solved; otherwise both are, and their solved errors
decide. The probe costs one range pass, two exports and two held-out runs; a solve costs a layer problem per
layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..calib.ranges import TensorRange, activation_ranges, float_tensors
from ..calib.readers import SampleSet, held_out_rows, run_all
from ..config import CompressConfig
from ..export.dynamic import quantize_dynamic_int8
from ..export.qdq import quantize_qdq
from ..onnxio.runtime import session

PROBE_MARGIN = 4.0  # rounding-only errors this far apart decide the form without solving the other


@dataclass
class FormProbe:
    """The rounding-only builds' held-out output errors, and the form they decide (None: too close to call)."""

    errors: dict[str, float]
    chosen: str | None
    seconds: float
    ranges: dict[str, TensorRange] = field(default_factory=dict, repr=False)  # the float model's, for reuse

    def as_dict(self) -> dict:
        return {"held_out_output_error": self.errors, "decided": self.chosen, "margin": PROBE_MARGIN,
                "seconds": self.seconds}


def probe_forms(model: onnx.ModelProto, inferred: onnx.ModelProto, samples: SampleSet, config: CompressConfig,
                memory_bytes: int, progress: Callable | None = None) -> FormProbe:
    """``memory_bytes``: what one batch of the range pass may hold."""
    started = time.perf_counter()
    ranges = activation_ranges(model, float_tensors(model, inferred), samples, config.activation_range,
                               config.batch_size, config.threads, progress, memory_bytes, "float model's ranges")
    if progress:
        progress("quantize", 0, 1, "activation form: rounding-only probe")
    rounded = {"static": quantize_qdq(model, samples, ranges, {}, (), config.int8_reduce_range),
               "dynamic": quantize_dynamic_int8(model, {}, (), config.int8_reduce_range)}
    errors = held_out_errors(model, rounded, samples, config)
    best, worst = sorted(errors, key=errors.get), max(errors.values())
    decisive = worst >= PROBE_MARGIN * max(errors[best[0]], 1e-12)
    return FormProbe(errors, best[0] if decisive else None, time.perf_counter() - started, ranges)


def held_out_errors(original: onnx.ModelProto, candidates: dict[str, onnx.ModelProto],
                    samples: SampleSet, config: CompressConfig) -> dict[str, float]:
    """Σ over outputs of ‖y − ŷ‖² / ‖y‖² on the held-out calibration samples (``held_out_rows``; all of them
    when there are too few to hold any out)."""
    held = held_out_rows(samples.num_samples, samples.fixed_batch)
    subset = samples.subset(np.flatnonzero(held)) if held.any() else samples
    reference = run_all(session(original, config.threads), subset, config.batch_size)
    errors = {}
    for mode, model in candidates.items():
        outputs = run_all(session(model, config.threads), subset, config.batch_size)
        errors[mode] = float(sum(_relative_sq(outputs[n], y) for n, y in reference.items()))
    return errors


def _relative_sq(estimate: np.ndarray, reference: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(np.sum((estimate.astype(np.float64) - reference) ** 2) / max(np.sum(reference ** 2), 1e-30))
