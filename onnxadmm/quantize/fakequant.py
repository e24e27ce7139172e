"""Activation rounding inside the layer-wise solve, switched on only for the compressed model.

The layer-wise loop runs one graph twice: with its own initializers (the original model, whose outputs are
the targets) and with overridden ones (the compressed model, whose activations are a layer's inputs x̂).
So the rounding of a layer's input is written into the graph as

    x' = x + m · (DQ(Q(x; s, z)) − x)

with a scalar initializer m = 0 — the original model computes x' = x exactly — and the solve overrides m = 1,
so x̂ is the uint8-rounded input the exported QDQ model will feed the layer (with the range [lo, hi] it will
use). Each layer then absorbs the activation rounding upstream, not only the weight rounding. Embedding
tables the dynamic export quantizes are overridden the same way (``embedding_rounding``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calib.ranges import LEVELS, TensorRange
from ..onnxio.graph import FreshNames, GraphView
from ..onnxio.normalize import infer_types

PREFIX = "__onnxadmm_fq_"


def scale_and_zero_point(r: TensorRange) -> tuple[np.float32, np.uint8]:
    """uint8 scale and zero point of a range, as onnxruntime's quantizer computes them (0 exactly representable)."""
    lo, hi = min(r.lo, 0.0), max(r.hi, 0.0)
    scale = (hi - lo) / LEVELS if hi > lo else 1.0
    zero = int(np.clip(np.round(-lo / scale), 0, LEVELS))
    return np.float32(scale), np.uint8(zero)


def with_input_rounding(model: onnx.ModelProto, ranges: Mapping[str, TensorRange], layer_nodes: Mapping[str, str]
                        ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` where the data input of every node named in ``layer_nodes`` (name -> input tensor)
    goes through the switchable rounding above; returns it and the overrides that switch it on."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    switches: dict[str, np.ndarray] = {}
    rewired: dict[str, str] = {}
    nodes = []
    for node in out.graph.node:
        tensor = layer_nodes.get(node.name)
        if tensor is not None and tensor in ranges:
            if tensor not in rewired:
                index = len(rewired)
                rewired[tensor] = _rounding_nodes(out.graph, nodes, tensor, ranges[tensor], f"{PREFIX}{index}_")
                switches[f"{PREFIX}{index}_on"] = np.array(1.0, np.float32)
            node.input[0] = rewired[tensor]
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, switches


def _rounding_nodes(graph: onnx.GraphProto, nodes: list, tensor: str, r: TensorRange, prefix: str) -> str:
    scale, zero = scale_and_zero_point(r)
    graph.initializer.extend([numpy_helper.from_array(np.array(scale), prefix + "scale"),
                              numpy_helper.from_array(np.array(zero), prefix + "zero"),
                              numpy_helper.from_array(np.array(0.0, np.float32), prefix + "on")])
    nodes.extend([
        helper.make_node("QuantizeLinear", [tensor, prefix + "scale", prefix + "zero"], [prefix + "q"],
                         name=prefix + "quantize"),
        helper.make_node("DequantizeLinear", [prefix + "q", prefix + "scale", prefix + "zero"], [prefix + "dq"],
                         name=prefix + "dequantize"),
        helper.make_node("Sub", [prefix + "dq", tensor], [prefix + "delta"], name=prefix + "delta"),
        helper.make_node("Mul", [prefix + "delta", prefix + "on"], [prefix + "switched"], name=prefix + "switch"),
        helper.make_node("Add", [tensor, prefix + "switched"], [prefix + "out"], name=prefix + "add"),
    ])
    return prefix + "out"


def embedding_rounding(view: GraphView) -> dict[str, np.ndarray]:
    """The embedding tables (float initializers a ``Gather`` reads as its data) as the dynamic int8 export stores
    them — int8 per row, symmetric (``export.dynamic.row_int8``) — dequantized: overrides for the compressed model,
    so the layers after them absorb the rounding."""
    from ..export.dynamic import row_int8

    tables = {}
    for node in view.nodes:
        name = node.input[0] if node.op_type == "Gather" and node.input else None
        if name is None or name not in view.initializers or name in tables:
            continue
        if view.initializers[name].data_type != onnx.TensorProto.FLOAT or len(view.initializers[name].dims) != 2:
            continue
        q, scales = row_int8(view.constant(name))
        tables[name] = (q.astype(np.float32) * scales).astype(np.float32)
    return tables


def with_export_rounding(model: onnx.ModelProto, exported: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of the float ``model`` that rounds every tensor the ``exported`` int8 model quantizes, as it does:
    a ``FakeQuantize`` with the scale and zero point of the export's uint8 ``QuantizeLinear``, or a
    ``DynamicFakeQuantize`` where the export has ``DynamicQuantizeLinear`` (``bridge/fakequant.py``) — the graph
    distillation trains with the grid fixed. Returns it and the number of tensors rounded."""
    from ..bridge.fakequant import DOMAIN

    constants = {t.name: t for t in exported.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    rounding: dict[str, tuple[str, dict]] = {}
    for node in exported.graph.node:
        tensor = node.input[0] if node.input else ""
        if tensor.endswith(OUTPUT_RENAMED) and tensor[:-len(OUTPUT_RENAMED)] in outputs:
            tensor = tensor[:-len(OUTPUT_RENAMED)]  # onnxruntime's quantizer renames a quantized graph output
        if not tensor or tensor in constants or tensor in rounding:
            continue
        if node.op_type == "DynamicQuantizeLinear":
            rounding[tensor] = ("DynamicFakeQuantize", {})
        elif node.op_type == "QuantizeLinear" and len(node.input) == 3 and node.input[1] in constants \
                and node.input[2] in constants:
            scale, zero = (numpy_helper.to_array(constants[n]) for n in node.input[1:])
            if scale.size == 1 and zero.dtype == np.uint8:
                rounding[tensor] = ("FakeQuantize", {"scale": float(scale), "zero_point": int(zero)})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    known = {v.name: v for v in (*infer_types(model).graph.value_info, *model.graph.input, *model.graph.output)}
    out.graph.value_info.extend(_renamed(known[t], t) for t in rounding if t in known and t not in outputs)
    fresh = FreshNames(out.graph)
    inputs = {v.name for v in out.graph.input}
    nodes, done = [], 0
    for tensor in sorted(t for t in rounding if t in inputs):  # graph inputs: their readers read the rounded copy
        op, attrs = rounding[tensor]
        rounded = fresh.name(f"{tensor}__onnxadmm_rounded")
        out.graph.value_info.append(_renamed(known[tensor], rounded))
        nodes.append(helper.make_node(op, [tensor], [rounded], fresh.name(f"{PREFIX}{done}"), domain=DOMAIN, **attrs))
        for node in out.graph.node:
            node.input[:] = [rounded if name == tensor else name for name in node.input]
        done += 1
    for node in out.graph.node:  # a computed tensor: its producer writes a raw copy, the rounding writes the tensor
        nodes.append(node)
        for slot, tensor in enumerate(node.output):
            if tensor in rounding:
                op, attrs = rounding[tensor]
                raw = fresh.name(f"{tensor}__onnxadmm_raw")
                node.output[slot] = raw
                nodes.append(helper.make_node(op, [raw], [tensor], fresh.name(f"{PREFIX}{done}"), domain=DOMAIN,
                                              **attrs))
                done += 1
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out, done


OUTPUT_RENAMED = "_QuantizeLinear_Input"


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    """The type of ``value`` under another name (shape inference does not pass the training-only ops)."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy
