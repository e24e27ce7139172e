"""The int8 stage: runs on the float model any method produced (or the input itself), so it composes with
every method — sparse, N:M, channels, grouped, low-rank factors (each factor a layer on its own grid).

1. Weights onto the integer grid, layer by layer in dependency order (``compress_layers`` with the
   ``grid`` structure): per-output-channel symmetric int8 with scales chosen by the layer's output error,
   ADMM with the grid as its Z-step on ‖σ(Ŵ x̂ + b) − σ(W x + b)‖², x̂ the inputs in the model whose earlier
   layers are already on the grid and whose layer inputs are rounded to uint8 as exported (ranges from a
   first pass, ``fakequant.py``), then bias correction. Zeros stay zero (the grid ∩ a sparse support).
2. Activation ranges per tensor from two streamed passes (``ranges.py``), on the model with the solved
   weights.
3. QDQ through onnxruntime's quantizer with every range and weight scale as an override (``qdq.py``), and
   the fusion coverage: which layers onnxruntime then runs as integer kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import onnx

from ..algorithms.solve import Structure
from ..analysis.layers import apply_exclude, find_layers
from ..calib.ranges import TensorRange, activation_ranges, float_tensors
from ..calib.readers import SampleSet
from ..config import CompressConfig
from ..export.apply import apply_initializers
from ..export.qdq import WEIGHT_OPS, FusionCoverage, WeightScales, fusion_coverage, quantize_qdq, weight_axis
from ..onnxio.graph import GraphView
from ..onnxio.normalize import infer_types, normalize
from ..report.schema import layer_row
from ..solve.layerwise import compress_layers
from .fakequant import with_input_rounding

Progress = Callable[[str, int, int, str], None]


@dataclass
class QuantizedModel:
    model: onnx.ModelProto
    layers: list[dict]  # report rows of the grid solve (error_projected: rounding; error_final: solved)
    declined: list[dict]  # layers whose weights onnxruntime quantizes with its own max-abs scales
    ranges: dict[str, TensorRange]
    coverage: FusionCoverage
    seconds: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict:
        estimators: dict[str, int] = {}
        for r in self.ranges.values():
            estimators[r.estimator] = estimators.get(r.estimator, 0) + 1
        return {"format": "QDQ: uint8 activations (per tensor), int8 weights (per output channel, symmetric), "
                          "int32 biases",
                "layers": self.layers, "declined": self.declined,
                "activation_ranges": {name: r.as_dict() for name, r in self.ranges.items()},
                "estimators_chosen": estimators, "fusion": self.coverage.as_dict(), "seconds": self.seconds}


def quantize_int8(model: onnx.ModelProto, samples: SampleSet, config: CompressConfig,
                  progress: Progress | None = None) -> QuantizedModel:
    progress = progress or (lambda *args: None)
    seconds = {}
    started = time.perf_counter()
    normalized = normalize(model)
    view = normalized.view()
    found = apply_exclude(find_layers(view), config.exclude)
    inputs = {layer.name: layer.input_name for layer in found.layers}
    input_ranges = activation_ranges(normalized.model, sorted(set(inputs.values())), samples,
                                     config.activation_range, config.batch_size, config.threads, progress)
    rounding, switches = with_input_rounding(normalized.model, input_ranges, inputs)
    rounded_view = GraphView(rounding, infer_types(rounding))
    layers = [layer for layer in apply_exclude(find_layers(rounded_view), config.exclude).layers
              if layer.name in inputs]
    structures = {layer.name: Structure("grid", bits=8, keep_zeros=True) for layer in layers}
    solved = compress_layers(rounded_view, layers, samples, structures, {l.name: 1.0 for l in layers}, config,
                             progress, switches)
    solved_model = apply_initializers(normalized.model, solved.initializers)
    seconds["weights_s"] = time.perf_counter() - started
    started = time.perf_counter()
    names = float_tensors(solved_model, normalized.inferred)
    ranges = activation_ranges(solved_model, names, samples, config.activation_range, config.batch_size,
                               config.threads, progress)
    seconds["ranges_s"] = time.perf_counter() - started
    started = time.perf_counter()
    nodes = {node.name: node for node in solved_model.graph.node}
    weights = {o.layer.weight_name: WeightScales(o.scales, weight_axis(nodes[o.layer.name]))
               for o in solved.outcomes if o.scales is not None}
    progress("quantize", 0, 1, "QDQ export")
    quantized = quantize_qdq(solved_model, samples, ranges, weights)
    coverage = fusion_coverage(quantized, {n.name: n.op_type for n in solved_model.graph.node
                                           if n.op_type in WEIGHT_OPS and len(n.input) > 1
                                           and n.input[1] in view.initializers})
    seconds["export_s"] = time.perf_counter() - started
    declined = [{"name": d.name, "op_type": d.op_type, "reason": d.reason} for d in found.declined + solved.declined]
    rows = [{**layer_row(o), "scale_min": float(o.scales.min()), "scale_max": float(o.scales.max())}
            for o in solved.outcomes if o.scales is not None]
    return QuantizedModel(quantized, rows, declined, ranges, coverage, seconds)
