"""A float16 (or bfloat16) graph computed in float32, its inputs and outputs keeping their types.

onnxruntime's integer kernels, its quantizer and QuantizeLinear before opset 19 take float32, and on CPU a
16-bit float graph runs as float32 anyway (onnxruntime inserts a Cast around every node without a 16-bit
kernel). So the precision stages widen such a graph first:
  * initializers and tensor attributes (``Constant``, ``ConstantOfShape``) of a 16-bit float type become
    float32 (exact: every 16-bit float is a float32);
  * ``Cast`` and the ``dtype`` of generating ops (``EyeLike``, ``RandomNormal``, …) to a 16-bit float
    type cast to float32 instead, subgraphs included;
  * a 16-bit float graph input is read through ``Cast(to=float32)``, a 16-bit float graph output written
    through ``Cast`` back to its type, so the model's signature is unchanged;
  * declared intermediate shapes are dropped (their types changed; shape inference recovers them).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from . import weights
from .graph import FreshNames, all_graphs

NARROW_FLOATS = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_TYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; the element type of EyeLike, Random*, Multinomial, …


def narrow_float_weights(model: onnx.ModelProto) -> int:
    """How many of the model's initializers hold 16-bit floats."""
    return sum(t.data_type in NARROW_FLOATS for t in model.graph.initializer)


def computes_narrow(model: onnx.ModelProto) -> bool:
    """Whether any initializer, graph input/output, Cast target or constant is a 16-bit float."""
    graph = model.graph
    if narrow_float_weights(model) or any(v.type.tensor_type.elem_type in NARROW_FLOATS
                                          for v in (*graph.input, *graph.output)):
        return True
    return any(_narrow_attribute(a) for g in all_graphs(graph) for n in g.node for a in n.attribute)


def widen(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` that computes in float32 where it computed in a 16-bit float type, with the same
    inputs and outputs (names, types, shapes)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    for graph in all_graphs(wide.graph):
        for tensor in graph.initializer:
            _widen_tensor(tensor)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    _widen_tensor(attribute.t)
                elif attribute.name in _TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT \
                        and attribute.i in NARROW_FLOATS:
                    attribute.i = TensorProto.FLOAT
        if graph is not wide.graph:  # a subgraph's own inputs and outputs follow its parent's widened values
            for value in (*graph.input, *graph.output):
                _widen_type(value)
        del graph.value_info[:]
    _cast_at_boundary(wide.graph)
    return wide


def _cast_at_boundary(graph: onnx.GraphProto) -> None:
    """Read each 16-bit float graph input through a Cast to float32 and write each such output through a Cast
    back to its type, renaming inside the graph only."""
    fresh = FreshNames(graph)
    head, tail = [], []
    for value in graph.input:
        elem = value.type.tensor_type.elem_type
        if elem in NARROW_FLOATS and value.name not in {t.name for t in graph.initializer}:
            wide_name = fresh.name(f"{value.name}__float32")
            _rename_reads(graph, value.name, wide_name)
            head.append(helper.make_node("Cast", [value.name], [wide_name], fresh.name(f"{value.name}__widen"),
                                         to=TensorProto.FLOAT))
    for value in graph.output:
        elem = value.type.tensor_type.elem_type
        if elem in NARROW_FLOATS:
            wide_name = fresh.name(f"{value.name}__float32")
            for node in graph.node:
                node.output[:] = [wide_name if o == value.name else o for o in node.output]
            _rename_reads(graph, value.name, wide_name)
            tail.append(helper.make_node("Cast", [wide_name], [value.name], fresh.name(f"{value.name}__narrow"),
                                         to=elem))
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` in ``graph`` and its subgraphs (which see the outer values) reads ``new``."""
    for g in all_graphs(graph):
        for node in g.node:
            node.input[:] = [new if i == old else i for i in node.input]


def _widen_tensor(tensor: onnx.TensorProto) -> None:
    if tensor.data_type in NARROW_FLOATS:
        tensor.CopyFrom(numpy_helper.from_array(weights.array(tensor).astype("float32"), tensor.name))


def _widen_type(value: onnx.ValueInfoProto) -> None:
    if value.type.tensor_type.elem_type in NARROW_FLOATS:
        value.type.tensor_type.elem_type = TensorProto.FLOAT


def _narrow_attribute(attribute: onnx.AttributeProto) -> bool:
    if attribute.type == onnx.AttributeProto.TENSOR:
        return attribute.t.data_type in NARROW_FLOATS
    return attribute.name in _TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT \
        and attribute.i in NARROW_FLOATS
