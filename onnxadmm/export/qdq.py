"""QDQ export through onnxruntime's own quantizer, and which layers onnxruntime then runs in integers.

``onnxruntime.quantization.quantize_static`` places QuantizeLinear/DequantizeLinear by onnxruntime's
fusion rules (uint8 activations, int8 per-channel weights, int32 biases at scale s_x·s_w, a Relu folded
into the Q after it); onnxadmm hands it every range and every solved weight scale as a per-tensor override
(``TensorQuantOverrides``), so the integers in the output are exactly the solved ones: the weights are
already on their grid, and ``round(w / s)`` recovers the integers. The ranges also reach it as its calibration
cache, so it does not calibrate (a copy of the model with every tensor as an output, and a session of it).

Dynamic activations (``quantize_dynamic_int8``): onnxruntime's ``quantize_dynamic`` turns each MatMul (and
Gemm, as MatMul + Add) with a constant weight into DynamicQuantizeLinear(x) → MatMulInteger with per-column
int8 weights (fused into DynamicQuantizeMatMul when the session is optimized): the activation's uint8 range is
taken from each input tensor at run time, so no calibrated range can clip an outlier (what transformers'
LayerNorm outputs and residual streams have). The solved integers and scales replace the quantizer's own;
embedding tables become int8 with one scale per row.

Fusion coverage: the quantized model is optimized by onnxruntime (the level that runs the QDQ fusions);
a Conv/Gemm/MatMul of the float model is *integer* when its node became an integer kernel (QLinearConv,
QGemm, QLinearMatMul, MatMulIntegerToFloat, ConvInteger, MatMulInteger, DynamicQuantizeMatMul) and
*float* otherwise, with the reason (no DequantizeLinear in front; no QuantizeLinear after it to fuse with).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx

from ..calib.ranges import TensorRange
from ..calib.readers import SampleSet
from ..onnxio.runtime import session_options
from ..onnxio.save import exceeds_protobuf_limit, without_initializers, write_with_external_data
from ..onnxio.scratch import scratch_folder
from ..onnxio.widen import computes_narrow, widen

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
                 weights: Mapping[str, WeightScales], float_nodes: Sequence[str] = (),
                 reduce_range: bool = False) -> onnx.ModelProto:
    """The QDQ model (uint8 activations, int8 per-channel weights) with the given ranges and scales; the nodes
    named in ``float_nodes`` stay float; ``reduce_range``: weights onnxruntime scales itself on 7 bits."""
    quantized = _ort_quantize(model, next(samples.batches(8)), overrides(ranges, weights), float_nodes, reduce_range,
                              ranges)
    quantized.ir_version = model.ir_version  # the quantizer may stamp its own; the contract keeps the input's
    return quantized


def quantize_dynamic_int8(model: onnx.ModelProto, weights: Mapping[str, WeightScales],
                          float_nodes: Sequence[str] = (), reduce_range: bool = False) -> onnx.ModelProto:
    """int8 weights (per column, the solved integers where ``weights`` has them) with dynamically quantized
    uint8 activations, for the MatMuls and Gemms with a constant weight (except ``float_nodes``); embedding
    tables (Gather) stored as int8 with one scale per row; every other op stays float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = _through_file(model, lambda source, path, large: quantize_dynamic(
        source, path, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
        reduce_range=reduce_range, use_external_data_format=large,
        nodes_to_exclude=[n for name in float_nodes for n in (name, f"{name}_MatMul")]))  # a Gemm: MatMul + Add
    _put_solved_integers(quantized, model, weights)
    _embeddings_by_row(quantized)
    quantized.ir_version = model.ir_version
    return quantized


def row_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: q = round(t / s) with s = max|row| / 127 (rows of zeros: s = 1). Returns q (int8)
    and s as a column (rows, 1)."""
    scales = np.abs(table).max(axis=1, keepdims=True).astype(np.float64) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    return np.clip(np.round(table / scales), -127, 127).astype(np.int8), scales


def _embeddings_by_row(model: onnx.ModelProto) -> None:
    """Every Gather of a 2-D float table becomes Gather(q int8) → Cast → Mul(Gather(s, ids)): int8 rows with
    one scale each (an embedding table's rows differ in range by orders of magnitude, which one scale per
    table — onnxruntime's form for a Gather — spends its levels on)."""
    from onnx import helper, numpy_helper

    from ..onnxio.graph import FreshNames

    fresh = FreshNames(model.graph)
    inits = {t.name: t for t in model.graph.initializer}
    nodes, done = [], {}
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or \
                next((a.i for a in node.attribute if a.name == "axis"), 0) != 0:
            nodes.append(node)
            continue
        if table.name not in done:
            q, scales = row_int8(numpy_helper.to_array(table))
            names = (fresh.name(f"{table.name}_rows_int8"), fresh.name(f"{table.name}_row_scale"))
            model.graph.initializer.extend([numpy_helper.from_array(q, names[0]),
                                            numpy_helper.from_array(scales, names[1])])
            done[table.name] = names
        q_name, scale_name = done[table.name]
        prefix = fresh.name(f"{node.name}_int8")
        rows, cast, scale = (fresh.name(f"{prefix}_{part}") for part in ("rows", "float", "scale"))
        nodes.extend([helper.make_node("Gather", [q_name, node.input[1]], [rows], name=f"{prefix}_gather"),
                      helper.make_node("Cast", [rows], [cast], name=f"{prefix}_cast", to=onnx.TensorProto.FLOAT),
                      helper.make_node("Gather", [scale_name, node.input[1]], [scale], name=f"{prefix}_scales"),
                      helper.make_node("Mul", [cast, scale], [node.output[0]], name=node.name)])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _put_solved_integers(quantized: onnx.ModelProto, model: onnx.ModelProto,
                         weights: Mapping[str, WeightScales]) -> None:
    """Replace ``{w}_quantized`` / ``{w}_scale`` / ``{w}_zero_point`` of every solved weight w by q = round(w / s)
    with the solved per-column scales s (symmetric: zero point 0)."""
    from onnx import numpy_helper

    originals = {t.name: t for t in model.graph.initializer}
    inits = {t.name: t for t in quantized.graph.initializer}
    for name, solved in weights.items():
        names = (f"{name}_quantized", f"{name}_scale", f"{name}_zero_point")
        if not all(n in inits for n in names) or name not in originals:
            continue
        w = numpy_helper.to_array(originals[name]).astype(np.float64)
        scales = np.asarray(solved.scales, np.float64).reshape(-1)
        if inits[names[1]].dims != [scales.size] or w.ndim != 2 or w.shape[solved.axis] != scales.size:
            continue  # not the per-column form this replacement writes
        shape = [1, 1]
        shape[solved.axis] = -1
        q = np.clip(np.round(w / np.where(scales > 0, scales, 1.0).reshape(shape)), -127, 127).astype(np.int8)
        if solved.axis == 0:  # a Gemm with transB: the quantizer stores B as (K, N), one column per output
            q = q.T
        if list(q.shape) != list(inits[names[0]].dims):
            continue
        for target, value in zip(names, (q, scales.astype(np.float32), np.zeros(scales.size, np.int8))):
            inits[target].CopyFrom(numpy_helper.from_array(value, target))


def int8_forms(layers, requested: str) -> list[str]:
    """The int8 activation forms to build: as requested; for auto, static, and dynamic too where MatMuls hold
    at least half of the layer weights (transformers; a CNN's convs would stay float under dynamic)."""
    if requested != "auto":
        return [requested]
    total = sum(layer.num_weights for layer in layers) or 1
    matmul = sum(layer.num_weights for layer in layers if layer.op_type == "MatMul")
    return ["static", "dynamic"] if matmul >= 0.5 * total else ["static"]


def timing_precision(layers, quantize: str, requested: str) -> str:
    """How planners time graphs: "none" (fp32), "int8" (static QDQ) or "int8-dynamic" (where the dynamic
    form is built: its timing stands for both, as the choice between them is made on accuracy)."""
    if quantize != "int8":
        return "none"
    return "int8-dynamic" if "dynamic" in int8_forms(layers, requested) else "int8"


def rounded_int8(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], precision: str) -> onnx.ModelProto:
    """``model`` in the int8 form ``precision`` names, with onnxruntime's own scales (for timing); a 16-bit float
    graph widened to float32 first, as the int8 stage does."""
    model = widen(model) if computes_narrow(model) else model
    return quantize_dynamic_int8(model, {}) if precision == "int8-dynamic" else rounded_qdq(model, feed)


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
            if large:
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
    dynamic = _dynamic_products(quantized)
    coverage = FusionCoverage()
    for name, op_type in layer_nodes.items():
        node = optimized.get(dynamic.get(name, name))
        if node is not None and node.op_type in INTEGER_KERNELS:
            coverage.integer.append(name)
            continue
        source = next((n for n in quantized.graph.node if n.name == name), None)
        if dynamic and name not in dynamic:
            reason = f"stays float {op_type}: dynamic int8 covers MatMul/Gemm with a constant weight only"
        elif node is None:
            reason = "not found after optimization (fused into another node)"
        elif source is None or not any(by_output.get(i) is not None and by_output[i].op_type == "DequantizeLinear"
                                       for i in source.input[:1]):
            reason = f"runs as float {node.op_type}: its input is not quantized (no DequantizeLinear in front)"
        else:
            reason = (f"runs as float {node.op_type}: onnxruntime did not fuse its Q/DQ (no Q after it, or an "
                      "activation between without an integer kernel)")
        coverage.float.append({"name": name, "op_type": op_type, "reason": reason})
    return coverage


def _dynamic_products(quantized: onnx.ModelProto) -> dict[str, str]:
    """Float MatMul/Gemm name -> the MatMulInteger node the dynamic quantizer replaced it with (it names that
    node ``{name}_quant``; onnxruntime fuses it into DynamicQuantizeMatMul under the same name)."""
    products = {}
    for node in quantized.graph.node:  # a Gemm becomes MatMul + Add first: "{name}_MatMul_quant"
        if node.op_type == "MatMulInteger" and node.name.endswith("_quant"):
            products[node.name.removesuffix("_quant")] = node.name
            if node.name.endswith("_MatMul_quant"):
                products[node.name.removesuffix("_MatMul_quant")] = node.name
    return products


def _optimized(model: onnx.ModelProto, ort) -> onnx.ModelProto:
    """The graph after onnxruntime's extended optimizations (where the QDQ fusions run)."""
    options = session_options(1, True)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with scratch_folder("onnxadmm-fusion-") as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)
