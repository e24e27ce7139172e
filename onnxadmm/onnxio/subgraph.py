"""Cut a set of nodes out of a graph as a standalone ONNX model (for onnxruntime segments and the
onnx2torch bridge). Initializers can be overridden, so a segment runs with compressed weights.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphView, TensorType, node_inputs
from .weights import stub_for


def value_info(name: str, tensor_type: TensorType | None) -> onnx.ValueInfoProto:
    if tensor_type is None:
        return onnx.ValueInfoProto(name=name)
    shape = None
    if tensor_type.shape is not None:
        shape = [d if isinstance(d, (int, str)) else None for d in tensor_type.shape]
    return helper.make_tensor_value_info(name, tensor_type.elem_type, shape)


def cut(view: GraphView, node_ids: Iterable[int], outputs: list[str],
        input_types: Mapping[str, TensorType] | None = None,
        initializer_values: Mapping[str, np.ndarray] | None = None,
        name: str = "onnxadmm_segment") -> onnx.ModelProto:
    """Model computing ``outputs`` from the nodes ``node_ids`` (in topological order).

    Tensors read by the nodes that are neither produced inside nor initializers become graph inputs;
    their types come from ``input_types`` or the view. ``initializer_values`` replaces constants (a value kept
    in a weight file stays there, ``weights.stub_for``).
    """
    chosen = set(node_ids)
    ordered = [i for i in view.order if i in chosen]
    produced = {out for i in ordered for out in view.nodes[i].output if out}
    input_types = dict(input_types or {})
    initializer_values = initializer_values or {}
    inputs, initializers, seen = [], [], set()
    for index in ordered:
        for tensor in node_inputs(view.nodes[index]):
            if tensor in seen or tensor in produced:
                continue
            seen.add(tensor)
            if tensor in initializer_values:
                value = initializer_values[tensor]
                initializers.append(stub_for(tensor, value) or numpy_helper.from_array(np.asarray(value), tensor))
            elif tensor in view.initializers:
                initializers.append(view.initializers[tensor])
            else:
                inputs.append(value_info(tensor, input_types.get(tensor, view.types.get(tensor))))
    graph = helper.make_graph(
        [view.nodes[i] for i in ordered], name, inputs,
        [value_info(t, view.types.get(t)) for t in outputs], initializers)
    graph.value_info.extend(  # shape inference stops at an op outside the ONNX domain; say what it writes
        value_info(out, view.types[out]) for i in ordered if view.nodes[i].domain not in ("", "ai.onnx")
        for out in view.nodes[i].output if out in view.types and out not in outputs)
    model = helper.make_model(graph, opset_imports=list(view.model.opset_import),
                              ir_version=view.model.ir_version)
    model.functions.extend(view.model.functions)
    return model
