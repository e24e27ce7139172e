"""Dynamic int8: int8 weights per output column, activations quantized at run time, written into the graph.

Each MatMul whose weight B is a constant 2-D float initializer (and each Gemm with alpha = beta = 1, transA = 0,
whose B, read as Bᵀ under transB, is one) becomes

    (x_q, s_x, z_x) = DynamicQuantizeLinear(x)              one per input tensor, shared by its consumers
    y = Cast(MatMulInteger(x_q, B_q, z_x, 0)) · (s_x · s_B)  [+ C, a Gemm's bias]

with B_q = clip(round(B / s_B), −Q, Q) per column: the solved scales where given (the weight is already on that
grid, so the rounding recovers its integers), else s_B = max|B_col| / Q; Q = 127, or 64 with ``reduce_range``
(7-bit weights). x's uint8 range is taken from each input tensor at run time, so no calibrated range can clip
an outlier (what transformers' LayerNorm outputs and residual streams have). onnxruntime fuses each chain into
DynamicQuantizeMatMul (or MatMulIntegerToFloat where the quantized input is shared) under the MatMulInteger's
name, ``{layer}_quant``, which fusion coverage reads. It is the graph onnxruntime's ``quantize_dynamic`` writes
(``docs/INT8.md``), built here so that the output holds each weight once, as int8: the float model is not
written out, reloaded and copied beside its int8 form, which on a 2 GB model had cost three times the weights.
Where the input's weights are in files (``onnxio/weights.py``), the int8 ones are written to a scratch file too.

Embedding tables (Gather of a 2-D float table) become int8 with one scale per row.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import UnsupportedModelError
from ..onnxio.weights import WeightFile, any_mapped, tensor_in
from ..onnxio.weights import array as tensor_values
from ..onnxio.graph import FreshNames
from ..onnxio.load import default_opset
from ..onnxio.save import without_initializers
from .qdq import Q_MAX, Q_MAX_REDUCED, WeightScales

DYNAMIC_OPSET = 11  # DynamicQuantizeLinear


def quantize_dynamic_int8(model: onnx.ModelProto, weights: Mapping[str, WeightScales],
                          float_nodes: Sequence[str] = (), reduce_range: bool = False) -> onnx.ModelProto:
    """``model`` (not modified) in the dynamic int8 form, except the nodes named in ``float_nodes``; ``weights``:
    the solved per-column scales of weight initializers, by name."""
    if default_opset(model) < DYNAMIC_OPSET:
        model = _at_opset(model)
    out = without_initializers(model)
    graph = out.graph
    del graph.node[:]
    fresh = FreshNames(model.graph)
    inits = {t.name: t for t in model.graph.initializer}
    declared = {v.name for v in model.graph.input}
    q_max = Q_MAX_REDUCED if reduce_range else Q_MAX
    activations: dict[str, tuple[str, str, str]] = {}  # x -> its (x_q, s_x, z_x)
    integers: dict[tuple[str, bool], tuple[str, str, str]] = {}  # (B, transposed) -> its (B_q, s_B, 0)
    added: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    skip = set(float_nodes)
    file = WeightFile(until_exit=True) if any_mapped(model) else None  # weights in files: the int8 ones too
    for node in model.graph.node:
        transposed = _constant_weight(node, inits, declared)
        if transposed is None or node.name in skip:
            nodes.append(node)
            continue
        x, b = node.input[0], node.input[1]
        if x not in activations:
            activations[x] = (fresh.name(f"{x}_quantized"), fresh.name(f"{x}_scale"), fresh.name(f"{x}_zero_point"))
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(activations[x]),
                                          name=fresh.name(f"{x}_QuantizeLinear")))
        if (b, transposed) not in integers:
            integers[b, transposed] = names = (fresh.name(f"{b}_quantized"), fresh.name(f"{b}_scale"),
                                               fresh.name(f"{b}_zero_point"))
            q, scales = column_int8(tensor_values(inits[b]), transposed, weights.get(b), q_max)
            added.extend(tensor_in(value, name, file) for value, name in
                         zip((q, scales, np.zeros(scales.size, np.int8)), names))
        nodes.extend(_integer_product(node, activations[x], integers[b, transposed], fresh))
    nodes = _embeddings_by_row(nodes, inits, fresh, added, file)
    graph.node.extend(nodes)
    used = _consumed(nodes) | {v.name for v in model.graph.output}
    graph.initializer.extend(t for t in model.graph.initializer if t.name in used)  # each float tensor once
    graph.initializer.extend(added)
    return out


def column_int8(weight: np.ndarray, transposed: bool, solved: WeightScales | None, q_max: int = Q_MAX
                ) -> tuple[np.ndarray, np.ndarray]:
    """(B_q int8 of shape (K, N), s_B float32 (N,)) for the stored ``weight`` (N, K) when ``transposed`` (a Gemm's
    B under transB), else (K, N). The solved scales when they run along the output axis; else max-abs ones."""
    b = (weight.T if transposed else weight).astype(np.float64)
    scales = None
    if solved is not None and solved.axis == (0 if transposed else 1):
        scales = np.asarray(solved.scales, np.float64).reshape(-1)
        scales = scales if scales.size == b.shape[1] else None
    if scales is None:
        scales = np.abs(b).max(axis=0) / q_max
    scales = np.where(scales > 0, scales, 1.0)
    q = np.clip(np.round(b / scales), -q_max, q_max).astype(np.int8)
    return q, scales.astype(np.float32)


def dynamic_products(quantized: onnx.ModelProto) -> dict[str, str]:
    """Float MatMul/Gemm name -> the MatMulInteger node that replaced it (``{name}_quant``; onnxruntime fuses it
    into DynamicQuantizeMatMul under the same name)."""
    return {node.name.removesuffix("_quant"): node.name for node in quantized.graph.node
            if node.op_type == "MatMulInteger" and node.name.endswith("_quant")}


def _constant_weight(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], declared: set[str]
                     ) -> bool | None:
    """Whether the node's B is stored transposed (a Gemm with transB), or None when the node is not a product of
    an activation with a constant 2-D float weight that this form covers."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    weight = inits.get(node.input[1])
    if weight is None or node.input[1] in declared or node.input[0] in inits or len(weight.dims) != 2 or \
            weight.data_type != onnx.TensorProto.FLOAT:
        return None
    if node.op_type == "MatMul":
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
        return None
    return bool(attrs.get("transB", 0))


def _integer_product(node: onnx.NodeProto, x: tuple[str, str, str], b: tuple[str, str, str], fresh: FreshNames
                     ) -> list[onnx.NodeProto]:
    """MatMulInteger → Cast → · (s_x · s_B) [→ + C] into the node's output."""
    name = node.name or node.output[0]
    y = node.output[0]
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
    product, as_float, scale = (fresh.name(f"{y}_{part}") for part in ("output_quantized", "cast_output", "scales"))
    scaled = fresh.name(f"{y}_MatMul") if has_bias else y
    out = [helper.make_node("MatMulInteger", [x[0], b[0], x[2], b[2]], [product], name=fresh.name(f"{name}_quant")),
           helper.make_node("Cast", [product], [as_float], name=fresh.name(f"{name}_quant_cast"),
                            to=onnx.TensorProto.FLOAT),
           helper.make_node("Mul", [x[1], b[1]], [scale], name=fresh.name(f"{name}_quant_scales_mul")),
           helper.make_node("Mul", [as_float, scale], [scaled], name=fresh.name(f"{name}_quant_output_scale_mul"))]
    if has_bias:
        out.append(helper.make_node("Add", [scaled, node.input[2]], [y], name=fresh.name(f"{name}_Add")))
    return out


def _at_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` converted to opset ``DYNAMIC_OPSET`` by ONNX's version converter."""
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, DYNAMIC_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors naming the op it cannot adapt
        raise UnsupportedModelError(
            f"dynamic int8 activations need DynamicQuantizeLinear (opset {DYNAMIC_OPSET}); ONNX's version converter "
            f"could not bring this opset-{default_opset(model)} model there: {exc}. Export the model at opset "
            f"{DYNAMIC_OPSET} or later, or use --int8-activations static") from exc


def row_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: q = round(t / s) with s = max|row| / 127 (rows of zeros: s = 1). Returns q (int8)
    and s as a column (rows, 1)."""
    scales = np.abs(table).max(axis=1, keepdims=True).astype(np.float64) / Q_MAX
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    return np.clip(np.round(table / scales), -Q_MAX, Q_MAX).astype(np.int8), scales


def _embeddings_by_row(nodes: list[onnx.NodeProto], inits: Mapping[str, onnx.TensorProto], fresh: FreshNames,
                       added: list[onnx.TensorProto], file: WeightFile | None) -> list[onnx.NodeProto]:
    """``nodes`` with every Gather of a 2-D float table as Gather(q int8) → Cast → Mul(Gather(s, ids)): int8 rows
    with one scale each (an embedding table's rows differ in range by orders of magnitude, which one scale per
    table — onnxruntime's form for a Gather — spends its levels on); the new tables go to ``added``."""
    out, done = [], {}
    for node in nodes:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or \
                next((a.i for a in node.attribute if a.name == "axis"), 0) != 0:
            out.append(node)
            continue
        if table.name not in done:
            q, scales = row_int8(tensor_values(table))
            done[table.name] = names = (fresh.name(f"{table.name}_rows_int8"), fresh.name(f"{table.name}_row_scale"))
            added.extend([tensor_in(q, names[0], file), tensor_in(scales, names[1], file)])
        q_name, scale_name = done[table.name]
        prefix = fresh.name(f"{node.name}_int8")
        rows, cast, scale = (fresh.name(f"{prefix}_{part}") for part in ("rows", "float", "scale"))
        out.extend([helper.make_node("Gather", [q_name, node.input[1]], [rows], name=f"{prefix}_gather"),
                    helper.make_node("Cast", [rows], [cast], name=f"{prefix}_cast", to=onnx.TensorProto.FLOAT),
                    helper.make_node("Gather", [scale_name, node.input[1]], [scale], name=f"{prefix}_scales"),
                    helper.make_node("Mul", [cast, scale], [node.output[0]], name=node.name)])
    return out


def _consumed(nodes) -> set[str]:
    """Every tensor name the nodes read, including inside their subgraphs (which may read outer initializers)."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= _consumed(sub.node)
    return names
