"""QDQ export (static int8 activations) through onnxruntime's own quantizer.

``onnxruntime.quantization.quantize_static`` places QuantizeLinear/DequantizeLinear by onnxruntime's
fusion rules (uint8 activations, int8 per-channel weights, int32 biases at scale s_x·s_w, a Relu folded
into the Q after it); onnxadmm hands it every range as a per-tensor override (``TensorQuantOverrides``) and as
its calibration cache, so it does not calibrate (a copy of the model with every tensor as an output, and a
session of it). The layer weights reach it already as integers, in the form it writes them itself:

    W_q = clip(round(W / s), −128, 127) per output channel  →  DequantizeLinear(W_q, s, 0, axis)

with s the solved scales (the weights are already on that grid, so the rounding recovers the integers), else
its own, s = max|W_channel| / Q (Q = 127, or 64 with ``reduce_range``). The quantizer keeps a weight it finds
behind a DequantizeLinear and takes its scale from there for the bias, so the graph it writes is the one it
would have written from the float weights — but it loads the model whole, and now holds each weight once, as
int8, instead of the float model (on a 2.2 GB model that load was the int8 stage's peak). Weights it would
treat otherwise stay float for it to quantize: those an unquantized node also reads, opsets before 13
(per-channel DequantizeLinear), and a bias too large for int32 at s_x·s_w (it raises s there).
The dynamic form is ``dynamic.py``; which layers onnxruntime then runs in integers, ``coverage.py``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calib.ranges import TensorRange
from ..calib.readers import SampleSet
from ..onnxio.load import default_opset
from ..onnxio.save import exceeds_protobuf_limit, without_initializers, write_with_external_data
from ..onnxio.scratch import scratch_folder
from ..onnxio.weights import WeightFile, any_mapped, map_external_data, moved_to
from ..onnxio.weights import array as tensor_values

PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis
Q_MAX, Q_MAX_REDUCED = 127, 64  # onnxruntime's symmetric int8 weight range, and with reduce_range
DQ_OUTPUT = "_DequantizeLinear_Output"  # onnxruntime's name for a weight's dequantized tensor
BIAS_MARGIN = 4.0  # how far from the quantizer's int32 bias limit a weight's scales must stay to be written here


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
    named in ``float_nodes`` stay float; ``reduce_range``: weights without solved scales on 7 bits."""
    integer = integer_weights(model, weights, float_nodes, reduce_range, ranges)
    left = {name: solved for name, solved in weights.items() if name not in integer.scales}
    quantized = _ort_quantize(model, next(samples.batches(8)), overrides(ranges, left), float_nodes, reduce_range,
                              ranges, integer)
    quantized.ir_version = model.ir_version  # the quantizer may stamp its own; the contract keeps the input's
    return quantized


@dataclass
class IntegerWeights:
    """The graph handed to onnxruntime's quantizer: ``skeleton`` (no initializers), each weight in ``scales``
    read through ``{w}_DequantizeLinear`` from ``{w}_quantized``; ``tensors()`` yields the initializers, the
    int8 ones made one weight at a time."""

    model: onnx.ModelProto
    skeleton: onnx.ModelProto
    scales: dict[str, tuple[np.ndarray | None, int]]  # weight -> (per-channel scales, None: max-abs; axis)
    q_max: int

    def tensors(self) -> Iterator[onnx.TensorProto]:
        for tensor in self.model.graph.initializer:
            if tensor.name not in self.scales:
                yield tensor
                continue
            scales, axis = self.scales[tensor.name]
            values = tensor_values(tensor)
            scales = channel_scales(values, axis, self.q_max) if scales is None else scales
            yield numpy_helper.from_array(channel_int8(values, axis, scales), tensor.name + "_quantized")
            del values
            yield numpy_helper.from_array(scales, tensor.name + "_scale")
            yield numpy_helper.from_array(np.zeros(scales.size, np.int8), tensor.name + "_zero_point")


def integer_weights(model: onnx.ModelProto, weights: Mapping[str, WeightScales], float_nodes: Sequence[str],
                    reduce_range: bool, ranges: Mapping[str, TensorRange]) -> IntegerWeights:
    """Which weights reach the quantizer as integers (module docstring), and the graph that reads them so."""
    q_max = Q_MAX_REDUCED if reduce_range else Q_MAX
    chosen = _written_here(model, weights, set(float_nodes), q_max, ranges) \
        if default_opset(model) >= PER_CHANNEL_OPSET else {}
    skeleton = without_initializers(model)
    if chosen:
        nodes = [helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                  [name + DQ_OUTPUT], name=f"{name}_DequantizeLinear", axis=axis)
                 for name, (_, axis) in chosen.items()]
        for node in skeleton.graph.node:
            for index, name in enumerate(node.input):
                if name in chosen:
                    node.input[index] = name + DQ_OUTPUT
        nodes.extend(skeleton.graph.node)
        del skeleton.graph.node[:]
        skeleton.graph.node.extend(nodes)
    return IntegerWeights(model, skeleton, chosen, q_max)


def _written_here(model: onnx.ModelProto, weights: Mapping[str, WeightScales], float_nodes: set[str], q_max: int,
                  ranges: Mapping[str, TensorRange]) -> dict[str, tuple[np.ndarray | None, int]]:
    """weight -> (scales, axis) for each float weight every reader of which the quantizer quantizes per channel
    along one axis, whose solved scales (if any) run along it, and whose bias fits int32 at those scales."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in inits:
                readers.setdefault(name, []).append((node, index))
    taken = {name for node in model.graph.node for name in node.output} | set(inits) | \
        {v.name for v in model.graph.input}
    outside = {v.name for v in model.graph.input} | {v.name for v in model.graph.output} | \
        _read_in_subgraphs(model.graph)
    chosen = {}
    for name, uses in readers.items():
        tensor = inits[name]
        axes = {_quantizer_axis(node, index, len(tensor.dims)) for node, index in uses}
        if tensor.data_type != onnx.TensorProto.FLOAT or name in outside or len(axes) != 1 or None in axes or \
                any(node.name in float_nodes for node, _ in uses) or \
                any(name + suffix in taken for suffix in ("_quantized", "_scale", "_zero_point", DQ_OUTPUT)):
            continue
        axis = axes.pop()
        scales = None  # (onnxruntime's own, computed when the weights are written)
        if name in weights:
            scales = np.asarray(weights[name].scales, np.float32).reshape(-1)
            if weights[name].axis != axis or scales.size != tensor.dims[axis] or not np.all(scales > 0):
                continue
        biased = [node for node, _ in uses if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]]
        if biased:
            scales = channel_scales(tensor_values(tensor), axis, q_max) if scales is None else scales
            if not all(_bias_fits(node, scales, inits, ranges) for node in biased):
                continue
        chosen[name] = (scales, axis)
    return chosen


def channel_scales(weight: np.ndarray, axis: int, q_max: int) -> np.ndarray:
    """onnxruntime's symmetric per-channel scales: s = 2·max|W_channel| / (2·Q) in float64, as float32; a channel
    of zeros gets s = 1."""
    others = tuple(a for a in range(weight.ndim) if a != axis)
    absmax = np.abs(weight.astype(np.float32, copy=False)).max(axis=others) if others else np.abs(weight)
    scales = (2.0 * absmax.astype(np.float64)) / (2.0 * q_max)
    return np.where(scales < np.finfo(np.float32).tiny, 1.0, scales).astype(np.float32)


def channel_int8(weight: np.ndarray, axis: int, scales: np.ndarray) -> np.ndarray:
    """clip(round(W / s), −128, 127) per channel along ``axis``, in float32 as onnxruntime computes it."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.round(weight.astype(np.float32, copy=False) / scales.astype(np.float32).reshape(shape))
    return np.clip(q, -128, 127).astype(np.int8)


def _quantizer_axis(node: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The per-channel axis onnxruntime's quantizer gives this node's weight input ``index``; None where it does
    not quantize it as a per-channel weight (or this export leaves it to it)."""
    if node.op_type in ("Conv", "ConvTranspose") and index == 1 and rank >= 3:
        return 0 if node.op_type == "Conv" else 1
    if node.op_type in ("Gemm", "MatMul") and index == 1 and rank == 2:
        return weight_axis(node)
    return None


def _read_in_subgraphs(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the nodes of ``graph``'s subgraphs (If/Loop/Scan bodies, nested) read."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names.update(name for inner in sub.node for name in inner.input)
                names |= _read_in_subgraphs(sub)
    return names


def _bias_fits(node: onnx.NodeProto, weight_scales: np.ndarray, inits: Mapping[str, onnx.TensorProto],
               ranges: Mapping[str, TensorRange]) -> bool:
    """Whether the int32 bias at scale s_x·s_w·β holds the bias with room to spare, so the quantizer keeps the
    weight scales (below 1.0001·2|b| / (2³² − 2) it raises them)."""
    bias, r = inits.get(node.input[2]), ranges.get(node.input[0])
    if bias is None or r is None:
        return False
    s_x = (max(r.hi, 0.0) - min(r.lo, 0.0)) / 255.0
    beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0) if node.op_type == "Gemm" else 1.0
    values = np.abs(tensor_values(bias).astype(np.float64)).reshape(-1)
    b = values if values.size == weight_scales.size else np.full(weight_scales.size, values.max(initial=0.0))
    return bool(np.all(s_x * weight_scales.astype(np.float64) * abs(beta) >= BIAS_MARGIN * 2.0 * b / (2.0 ** 32 - 2)))


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
                  ranges: Mapping[str, TensorRange] | None = None,
                  integer: IntegerWeights | None = None) -> onnx.ModelProto:
    """``ranges``: every float tensor's, handed to the quantizer as its calibration cache, so that it does not
    calibrate (an augmented copy of the model and a session of it) for ranges the overrides replace anyway;
    without them, its own min-max calibration on ``feed``. ``integer``: the graph with int8 weights to hand it
    instead of ``model``."""
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

    return _through_file(model, run, integer)


def _write_calibration_cache(ranges: Mapping[str, TensorRange], path: str) -> None:
    """The ranges in the calibration-cache file ``quantize_static`` reads instead of calibrating."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    data = {name: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi)) for name, r in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


def _through_file(model: onnx.ModelProto, quantizer, integer: IntegerWeights | None = None) -> onnx.ModelProto:
    """``quantizer(source path, output path, large)`` on ``model`` (or ``integer``'s graph) written to a scratch
    folder (a path, not the ModelProto: given a ModelProto, onnxruntime's quantizers rewrite its initializers in
    place into references to external data in a folder they then delete), with the quantizer's advice to its own
    users silenced. ``large``: the model is over protobuf's 2 GB limit, so the source is written with external
    data and the quantizer must write its own intermediate models (the calibration graph) and output that way
    too. A model whose weights are in files (``onnxio/weights.py``) gets its quantized weights in a file too.
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with scratch_folder("onnxadmm-quantize-") as folder:
            source, path = folder / "float.onnx", os.path.join(folder, "quantized.onnx")
            large, mapped = exceeds_protobuf_limit(model), any_mapped(model)
            if integer is not None and integer.scales:
                write_with_external_data(integer.skeleton, integer.tensors(), source, "float.onnx.data")
            elif large or mapped:
                write_with_external_data(without_initializers(model), model.graph.initializer, source,
                                         "float.onnx.data")
            else:
                source.write_bytes(model.SerializeToString())
            quantizer(str(source), path, large or mapped)
            if not mapped:
                return onnx.load(path)
            quantized = onnx.load(path, load_external_data=False)  # weights kept in files, as the input's are
            map_external_data(quantized, folder)
            return moved_to(quantized, WeightFile(until_exit=True))
    finally:
        root.setLevel(level)


class _OneBatch:
    """A CalibrationDataReader over one feed."""

    def __init__(self, feed: Mapping[str, np.ndarray]):
        self.feeds = [dict(feed)]

    def get_next(self):
        return self.feeds.pop() if self.feeds else None
