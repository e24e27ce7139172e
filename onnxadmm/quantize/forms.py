"""Which int8 activation form to solve: a rounding-only probe before the solve.

``--int8-activations auto`` on a model whose MatMuls hold most of the weights has two forms, static
(calibrated uint8 ranges per tensor, QDQ) and dynamic (each MatMul input's range taken at run time). Both store
the weights as int8 per channel; they differ in how the activations are rounded. So each form is first built
from the float weights rounded to nearest (onnxruntime's own max-abs scales) — static with the ranges
``--activation-range`` estimates on the float model — and scored by the held-out output error
Σ ‖y − ŷ‖² / ‖y‖². When one form's error is at least ``PROBE_MARGIN`` times the other's, only the better form is
solved; otherwise both are, and their solved errors decide. The probe costs one range pass, two exports and two
held-out runs; a solve costs a layer problem per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from ..calib.ranges import TensorRange, activation_ranges, float_tensors
from ..calib.readers import SampleSet
from ..config import CompressConfig
from ..export.qdq import quantize_dynamic_int8, quantize_qdq

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
                errors_of: Callable[[dict[str, onnx.ModelProto]], dict[str, float]], memory_bytes: int,
                progress: Callable | None = None) -> FormProbe:
    """``errors_of(models by form) -> held-out output error by form`` (``stage.held_out_errors``);
    ``memory_bytes``: what one batch of the range pass may hold."""
    started = time.perf_counter()
    ranges = activation_ranges(model, float_tensors(model, inferred), samples, config.activation_range,
                               config.batch_size, config.threads, progress, memory_bytes)
    if progress:
        progress("quantize", 0, 1, "activation form: rounding-only probe")
    rounded = {"static": quantize_qdq(model, samples, ranges, {}, (), config.int8_reduce_range),
               "dynamic": quantize_dynamic_int8(model, {}, (), config.int8_reduce_range)}
    errors = errors_of(rounded)
    best, worst = sorted(errors, key=errors.get), max(errors.values())
    decisive = worst >= PROBE_MARGIN * max(errors[best[0]], 1e-12)
    return FormProbe(errors, best[0] if decisive else None, time.perf_counter() - started, ranges)
