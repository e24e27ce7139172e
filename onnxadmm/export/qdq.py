"""QDQ export (static int8 activations) through onnxruntime's own quantizer.

``onnxruntime.quantization.quantize_static`` places QuantizeLinear/DequantizeLinear by onnxruntime's
fusion rules (uint8 activations, int8 per-channel weights, int32 biases at scale s_x·s_w, a Relu folded
into the Q after it); onnxadmm hands it every range and every solved weight scale as a per-tensor override
(``TensorQuantOverrides``), so the integers in the output are exactly the solved ones: the weights are
already on their grid, and ``round(w / s)`` recovers the integers. The ranges also reach it as its calibration
cache, so it does not calibrate (a copy of the model with every tensor as an output, and a session of it).
The dynamic form is ``dynamic.py``; which layers onnxruntime then runs in integers, ``coverage.py``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx

from ..calib.ranges import TensorRange
from ..calib.readers import SampleSet
from ..onnxio.save import exceeds_protobuf_limit, without_initializers, write_with_external_data
from ..onnxio.scratch import scratch_folder
from ..onnxio.weights import any_mapped


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
                 weights: Mapping[str, WeightScales], float_nodes: Sequence[str] = (),
                 reduce_range: bool = False) -> onnx.ModelProto:
    """The QDQ model (uint8 activations, int8 per-channel weights) with the given ranges and scales; the nodes
    named in ``float_nodes`` stay float; ``reduce_range``: weights onnxruntime scales itself on 7 bits."""
    quantized = _ort_quantize(model, next(samples.batches(8)), overrides(ranges, weights), float_nodes, reduce_range,
                              ranges)
    quantized.ir_version = model.ir_version  # the quantizer may stamp its own; the contract keeps the input's
    return quantized


def int8_forms(layers, requested: str) -> list[str]:
    """The int8 activation forms to build: as requested; for auto, static, and dynamic too where MatMuls hold
    at least half of the layer weights (transformers; a CNN's convs would stay float under dynamic)."""
    if requested != "auto":
        return [requested]
    total = sum(layer.num_weights for layer in layers) or 1
    matmul = sum(layer.num_weights for layer in layers if layer.op_type == "MatMul")
    return ["static", "dynamic"] if matmul >= 0.5 * total else ["static"]


def timing_precision(layers, quantize: str, requested: str, smoothing: str = "off") -> str:
    """How planners time graphs: "none" (fp32), "int8" (static QDQ) or "int8-dynamic" (where the dynamic
    form is built: its timing stands for both, as the choice between them is made on accuracy), as
    "int8-dynamic-smoothed" with activation smoothing's Mul nodes (``export/smoothing.py``)."""
    if quantize != "int8":
        return "none"
    if "dynamic" not in int8_forms(layers, requested):
        return "int8"
    return "int8-dynamic-smoothed" if smoothing == "auto" else "int8-dynamic"


def rounded_qdq(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The same QDQ form with onnxruntime's own scales and min-max ranges on ``feed``: a model of the right
    structure for timing (the values do not change the time), made in about a second."""
    return _ort_quantize(model, feed, {})


def integer_chain(quantized: onnx.ModelProto) -> onnx.ModelProto:
    """A QDQ model without the QuantizeLinear of its graph inputs and the DequantizeLinear of its outputs:
    uint8 in and out, what an int8 layer costs between int8 neighbours (which share those conversions)."""
    from onnx import helper

    graph = quantized.graph
    inputs = {value.name: value for value in graph.input}
    outputs = {value.name for value in graph.output}
    kept, new_inputs, new_outputs = [], [], []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inputs:
            dims = [d.dim_value or d.dim_param for d in inputs[node.input[0]].type.tensor_type.shape.dim]
            new_inputs.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.UINT8, dims))
        elif node.op_type == "DequantizeLinear" and node.output[0] in outputs:
            new_outputs.append(helper.make_tensor_value_info(node.input[0], onnx.TensorProto.UINT8, None))
        else:
            kept.append(node)
    chain = onnx.ModelProto()
    chain.CopyFrom(quantized)
    del chain.graph.node[:], chain.graph.input[:], chain.graph.output[:]
    chain.graph.node.extend(kept)
    chain.graph.input.extend(new_inputs)
    chain.graph.output.extend(new_outputs)
    return chain


def _ort_quantize(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], tensor_overrides: dict,
                  float_nodes: Sequence[str] = (), reduce_range: bool = False,
                  ranges: Mapping[str, TensorRange] | None = None) -> onnx.ModelProto:
    """``ranges``: every float tensor's, handed to the quantizer as its calibration cache, so that it does not
    calibrate (an augmented copy of the model and a session of it) for ranges the overrides replace anyway;
    without them, its own min-max calibration on ``feed``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    def run(source, path, large):
        cache = None
        if ranges:
            cache = os.path.join(os.path.dirname(path), "ranges.json")
            _write_calibration_cache(ranges, cache)
        quantize_static(
            source, path, _OneBatch(feed), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=list(float_nodes), reduce_range=reduce_range, use_external_data_format=large,
            extra_options={"TensorQuantOverrides": tensor_overrides}, calibration_cache_path=cache)

    return _through_file(model, run)


def _write_calibration_cache(ranges: Mapping[str, TensorRange], path: str) -> None:
    """The ranges in the calibration-cache file ``quantize_static`` reads instead of calibrating."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    data = {name: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi)) for name, r in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


def _through_file(model: onnx.ModelProto, quantizer) -> onnx.ModelProto:
    """``quantizer(source path, output path, large)`` on ``model`` written to a scratch folder (a path, not the
    ModelProto: given a ModelProto, onnxruntime's quantizers rewrite its initializers in place into references
    to external data in a folder they then delete), with the quantizer's advice to its own users silenced.
    ``large``: the model is over protobuf's 2 GB limit, so the source is written with external data and the
    quantizer must write its own intermediate models (the calibration graph) and output that way too."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with scratch_folder("onnxadmm-quantize-") as folder:
            source, path = folder / "float.onnx", os.path.join(folder, "quantized.onnx")
            large = exceeds_protobuf_limit(model)
            if large or any_mapped(model):
                write_with_external_data(without_initializers(model), model.graph.initializer, source,
                                         "float.onnx.data")
            else:
                source.write_bytes(model.SerializeToString())
            quantizer(str(source), path, large)
            return onnx.load(path)
    finally:
        root.setLevel(level)


class _OneBatch:
    """A CalibrationDataReader over one feed."""

    def __init__(self, feed: Mapping[str, np.ndarray]):
        self.feeds = [dict(feed)]

    def get_next(self):
        return self.feeds.pop() if self.feeds else None
