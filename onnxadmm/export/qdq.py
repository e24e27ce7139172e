"""QDQ export through onnxruntime's own quantizer, and which layers onnxruntime then runs in integers.

``onnxruntime.quantization.quantize_static`` places QuantizeLinear/DequantizeLinear by onnxruntime's
fusion rules (uint8 activations, int8 per-channel weights, int32 biases at scale s_x·s_w, a Relu folded
into the Q after it); onnxadmm hands it every range and every solved weight scale as a per-tensor override
(``TensorQuantOverrides``), so the integers in the output are exactly the solved ones: the weights are
already on their grid, and ``round(w / s)`` recovers the integers. Its own calibration is then only a
formality, run on one batch.

Fusion coverage: the quantized model is optimized by onnxruntime (the level that runs the QDQ fusions);
a Conv/Gemm/MatMul of the float model is *integer* when its node became an integer kernel (QLinearConv,
QGemm, QLinearMatMul, MatMulIntegerToFloat, ConvInteger, MatMulInteger, DynamicQuantizeMatMul) and
*float* otherwise, with the reason (no DequantizeLinear in front; no QuantizeLinear after it to fuse with).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx

from ..calib.ranges import TensorRange
from ..calib.readers import SampleSet
from ..onnxio.runtime import session_options
from ..onnxio.save import exceeds_protobuf_limit, without_initializers, write_with_external_data
from ..onnxio.scratch import scratch_folder

INTEGER_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                   "DynamicQuantizeMatMul", "NhwcQLinearConv"}
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class WeightScales:
    """A solved weight: its per-output-channel scales and the axis of the stored tensor they run along."""

    scales: np.ndarray
    axis: int


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of the stored weight, as onnxruntime's quantizer takes it."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul: x @ B, B (K, N)


def overrides(ranges: Mapping[str, TensorRange], weights: Mapping[str, WeightScales]) -> dict:
    """``TensorQuantOverrides``: rmin/rmax per activation, scale/zero point per weight channel."""
    out: dict = {name: [{"rmin": np.float32(r.lo), "rmax": np.float32(r.hi)}] for name, r in ranges.items()}
    for name, solved in weights.items():
        out[name] = [{"scale": np.float32(s), "zero_point": 0, "axis": solved.axis} for s in solved.scales]
    return out


def quantize_qdq(model: onnx.ModelProto, samples: SampleSet, ranges: Mapping[str, TensorRange],
                 weights: Mapping[str, WeightScales]) -> onnx.ModelProto:
    """The QDQ model (uint8 activations, int8 per-channel weights) with the given ranges and scales."""
    quantized = _ort_quantize(model, next(samples.batches(8)), overrides(ranges, weights))
    quantized.ir_version = model.ir_version  # the quantizer may stamp its own; the contract keeps the input's
    return quantized


def rounded_qdq(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The same QDQ form with onnxruntime's own scales and min-max ranges on ``feed``: a model of the right
    structure for timing (the values do not change the time), made in about a second."""
    return _ort_quantize(model, feed, {})


def _ort_quantize(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], tensor_overrides: dict) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice meant for its own users ("consider pre-processing")
    try:
        with scratch_folder("onnxadmm-quantize-") as folder:
            source, path = folder / "float.onnx", os.path.join(folder, "quantized.onnx")
            # a path, not the ModelProto: given a ModelProto, quantize_static rewrites its initializers in place
            # into references to external data in a folder it then deletes
            if exceeds_protobuf_limit(model):
                write_with_external_data(without_initializers(model), model.graph.initializer, source,
                                         "float.onnx.data")
            else:
                source.write_bytes(model.SerializeToString())
            quantize_static(str(source), path, _OneBatch(feed), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"TensorQuantOverrides": tensor_overrides})
            return onnx.load(path)
    finally:
        root.setLevel(level)


class _OneBatch:
    """A CalibrationDataReader over one feed."""

    def __init__(self, feed: Mapping[str, np.ndarray]):
        self.feeds = [dict(feed)]

    def get_next(self):
        return self.feeds.pop() if self.feeds else None


@dataclass
class FusionCoverage:
    """Which weight layers onnxruntime runs as integer kernels after its graph optimizations."""

    integer: list[str] = field(default_factory=list)
    float: list[dict] = field(default_factory=list)  # {"name", "op_type", "reason"}

    @property
    def fraction(self) -> float:
        total = len(self.integer) + len(self.float)
        return len(self.integer) / total if total else 1.0

    def as_dict(self) -> dict:
        return {"integer": self.integer, "float": self.float, "fraction_integer": self.fraction}


def fusion_coverage(quantized: onnx.ModelProto, layer_nodes: Mapping[str, str]) -> FusionCoverage:
    """For each weight layer (node name -> op type), whether the optimized quantized graph runs it as an
    integer kernel. onnxruntime gives a fused node the name of the node it replaces."""
    import onnxruntime as ort

    optimized = {node.name: node for node in _optimized(quantized, ort).graph.node}
    by_output = {node.output[0]: node for node in quantized.graph.node if node.output}
    coverage = FusionCoverage()
    for name, op_type in layer_nodes.items():
        node = optimized.get(name)
        if node is not None and node.op_type in INTEGER_KERNELS:
            coverage.integer.append(name)
            continue
        source = next((n for n in quantized.graph.node if n.name == name), None)
        if node is None:
            reason = "not found after optimization (fused into another node)"
        elif source is None or not any(by_output.get(i) is not None and by_output[i].op_type == "DequantizeLinear"
                                       for i in source.input[:1]):
            reason = f"runs as float {node.op_type}: its input is not quantized (no DequantizeLinear in front)"
        else:
            reason = (f"runs as float {node.op_type}: onnxruntime did not fuse its Q/DQ (no Q after it, or an "
                      "activation between without an integer kernel)")
        coverage.float.append({"name": name, "op_type": op_type, "reason": reason})
    return coverage


def _optimized(model: onnx.ModelProto, ort) -> onnx.ModelProto:
    """The graph after onnxruntime's extended optimizations (where the QDQ fusions run)."""
    options = session_options(1, True)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with scratch_folder("onnxadmm-fusion-") as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)
