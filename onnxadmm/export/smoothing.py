"""Where a per-channel factor on a MatMul input goes in the graph (activation smoothing, ``quantize/smooth.py``).

For x read by MatMuls with weights W, x·W = (x·diag(1/s))·(diag(s)·W): the weights' rows take s, and x·diag(1/s) is
computed by what produces x where that is exact and nothing else reads x — a LayerNormalization over the last axis
(its scale and bias), a Mul by a per-channel constant (a scalar stays one: onnxruntime matches GELU's ·0.5 as a
scalar when it fuses the Gelu), or, for an attention's output projection, the value projection's columns and bias
(the heads analysis maps channel c of the context to column c of V) — else by a Mul node right after the producer.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..analysis.channels import ChannelGroup
from ..analysis.heads import find_head_groups
from ..analysis.layers import Layer, find_layers
from ..onnxio.graph import FreshNames, GraphView, attribute


def dynamic_layers(layers: Sequence[Layer]) -> list[Layer]:
    """The layers the dynamic int8 form quantizes: MatMuls, and Gemms with alpha = beta = 1."""
    return [layer for layer in layers if layer.op_type == "MatMul" or
            (layer.op_type == "Gemm" and layer.alpha == 1.0 and layer.beta == 1.0)]


def attention_heads(view: GraphView) -> dict[int, tuple[ChannelGroup, dict[int, Layer]]]:
    """Output projection node -> its recognized attention (``analysis/heads.py``) and the layers by node."""
    by_node = {layer.node_index: layer for layer in find_layers(view).layers}
    return {group.consumers[0].node_index: (group, by_node) for group in find_head_groups(view, by_node)
            if not group.declined}


def smoothable_inputs(view: GraphView, layers: Sequence[Layer]) -> dict[str, list[Layer]]:
    """Input tensor -> the layers reading it whose weights may be rescaled (a float initializer that no other
    node reads and the user cannot override as a graph input)."""
    groups: dict[str, list[Layer]] = {}
    declared = {v.name for v in view.graph.input}
    for layer in layers:
        if layer.op_type not in ("MatMul", "Gemm"):
            continue
        weight = view.initializers.get(layer.weight_name)
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT or \
                layer.weight_name in declared or len(view.initializer_users(layer.weight_name)) != 1 or \
                layer.input_name in view.initializers:
            continue
        groups.setdefault(layer.input_name, []).append(layer)
    return groups


def folding(view: GraphView, tensor: str, consumers: Sequence[Layer], fresh: FreshNames,
            heads: dict[int, tuple[ChannelGroup, dict[int, Layer]]]) -> Callable[[np.ndarray], str] | None:
    """How ``tensor`` · diag(1/s) can be computed by what produces it: a function of 1/s that does it and says
    what it did; None when other nodes read ``tensor`` too or its producer cannot take the factor (a Mul node)."""
    readers = set(view.consumers.get(tensor, []))
    if readers != {layer.node_index for layer in consumers} or tensor in view.output_names or \
            tensor not in view.producer:
        return None
    producer = view.nodes[view.producer[tensor]]
    return _into_producer(view, producer, consumers[0].in_features, fresh) or \
        _into_values(view, consumers[0], fresh, heads)


def _into_producer(view: GraphView, producer: onnx.NodeProto, channels: int, fresh: FreshNames
                   ) -> Callable[[np.ndarray], str] | None:
    """A producer per-channel linear on the last axis: a LayerNormalization over the last axis (its scale and
    bias), or a Mul by a constant of one value per channel (a scalar stays one: GELU's ·0.5 is matched as a scalar
    when onnxruntime fuses the Gelu)."""
    if producer.op_type == "LayerNormalization" and attribute(producer, "axis", -1) == -1:
        params = [(position, name) for position, name in enumerate(producer.input[1:3], start=1) if name]
        if not all(_fixed(view, n) and view.constant(n).shape == (channels,) for _, n in params):
            return None

        def fold(inverse: np.ndarray) -> str:
            for position, name in params:
                _replace_constant(view, producer, position, view.constant(name) * inverse, fresh)
            return f"LayerNormalization {producer.name!r}"
        return fold
    if producer.op_type == "Mul":
        for position in (0, 1):
            name = producer.input[position]
            if _fixed(view, name) and view.constant(name).shape[-1:] == (channels,) and \
                    view.constant(name).size == channels:
                def fold(inverse: np.ndarray, position=position, name=name) -> str:
                    value = view.constant(name)
                    _replace_constant(view, producer, position, value * inverse.reshape(value.shape), fresh)
                    return f"Mul {producer.name!r} (its constant)"
                return fold
    return None


def _into_values(view: GraphView, consumer: Layer, fresh: FreshNames,
                 heads: dict[int, tuple[ChannelGroup, dict[int, Layer]]]) -> Callable[[np.ndarray], str] | None:
    """``consumer`` the output projection of an attention whose heads are recognized (``heads.py``: its input
    channel c is channel c of the value projection, through the head split and merge): the factor goes into the
    value projection's output columns and its bias."""
    if consumer.node_index not in heads:
        return None
    group, by_node = heads[consumer.node_index]
    merged = view.nodes[view.producer[consumer.input_name]]  # Reshape(Transpose(P · V_h))
    transposed = view.nodes[view.producer[merged.input[0]]] if merged.input[0] in view.producer else None
    product = view.nodes[view.producer[transposed.input[0]]] if transposed and transposed.input[0] in view.producer \
        else None
    if merged.op_type != "Reshape" or transposed is None or transposed.op_type != "Transpose" or product is None \
            or product.op_type != "MatMul":
        return None
    tensor, path = product.input[1], []
    for _ in range(6):  # back through the head split (Transpose, Reshape) and the per-channel members
        index = view.producer.get(tensor)
        if index is None:
            return None
        if index in group.producers:
            break
        path.append(index)
        tensor = next((n for n in view.nodes[index].input if n and not view.is_constant(n)), "")
    else:
        return None
    values = by_node.get(index)
    if values is None:
        return None
    biases = [(i, next(p for p, n in enumerate(view.nodes[i].input) if view.is_constant(n)))
              for i in path if i in group.through and view.nodes[i].op_type == "Add"]
    if values.bias_name:  # a Gemm's own bias (input 2)
        biases.append((index, 2))
    if view.initializer_users(values.weight_name) != [index] or \
            not all(_fixed(view, view.nodes[i].input[p]) for i, p in biases):
        return None

    def fold(inverse: np.ndarray) -> str:
        write_weight(view, values, weight_kn(view, values) * inverse[None, :])
        for member, position in biases:
            node = view.nodes[member]
            bias = view.constant(node.input[position])
            _replace_constant(view, node, position, np.broadcast_to(bias.reshape(-1), inverse.shape) * inverse,
                              fresh)
        return f"value projection {values.name!r}"
    return fold


def add_mul(model: onnx.ModelProto, view: GraphView, tensor: str, consumers: Sequence[Layer], inverse: np.ndarray,
            fresh: FreshNames, added: dict[int, list[onnx.NodeProto]]) -> str:
    """``consumers`` read ``tensor`` · diag(``inverse``) from a Mul node, to go right after the producer."""
    name = fresh.name(f"{tensor}_smooth")
    smoothed, factor = fresh.name(f"{tensor}_smoothed"), fresh.name(f"{tensor}_smooth_scale")
    model.graph.initializer.append(numpy_helper.from_array(inverse.astype(np.float32), factor))
    for layer in consumers:
        view.nodes[layer.node_index].input[0] = smoothed
    added.setdefault(view.producer.get(tensor, -1), []).append(
        helper.make_node("Mul", [tensor, factor], [smoothed], name=name))
    return f"Mul node {name!r}"


def insert_nodes(model: onnx.ModelProto, view: GraphView, added: dict[int, list[onnx.NodeProto]]) -> None:
    """The nodes in ``added`` (producer node id, -1 for a graph input -> nodes) placed right after their producer."""
    if added:
        nodes = added.get(-1, []) + [n for i, node in enumerate(view.nodes) for n in [node] + added.get(i, [])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def weight_kn(view: GraphView, layer: Layer) -> np.ndarray:
    """The weight as K×N (input channels on rows)."""
    weight = view.constant(layer.weight_name)
    return np.ascontiguousarray(weight.T) if layer.layout == "gemm_nk" else weight


def write_weight(view: GraphView, layer: Layer, weight_kn: np.ndarray) -> None:
    array = weight_kn.T if layer.layout == "gemm_nk" else weight_kn
    view.initializers[layer.weight_name].CopyFrom(
        numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), layer.weight_name))


def _fixed(view: GraphView, name: str) -> bool:
    """A constant the user cannot override (an initializer not declared as a graph input)."""
    return view.is_constant(name) and all(v.name != name for v in view.graph.input)


def _replace_constant(view: GraphView, node: onnx.NodeProto, position: int, value: np.ndarray,
                      fresh: FreshNames) -> None:
    """Input ``position`` of ``node`` holds ``value`` from now on: its initializer rewritten where only this node
    reads it, else a new initializer (the old one stays for its other readers)."""
    name = node.input[position]
    old = view.initializers[name]
    tensor = numpy_helper.from_array(value.astype(onnx.helper.tensor_dtype_to_np_dtype(old.data_type)), name)
    readers = [view.nodes[i] for i in view.initializer_users(name)]
    if all(reader is node for reader in readers) and list(node.input).count(name) == 1:
        old.CopyFrom(tensor)
        return
    tensor.name = fresh.name(f"{name}_smoothed")
    view.graph.initializer.append(tensor)
    node.input[position] = tensor.name


def mul_node_inputs(model: onnx.ModelProto) -> dict[str, int]:
    """The MatMul inputs of ``model`` (not changed) that smoothing would reach through a Mul node, where 1/s cannot
    go into what produces them, with their channel counts: what the dynamic int8 form runs more with smoothing,
    for latency planning. An upper bound: smoothing adds a node only where it lowers the error enough."""
    view = GraphView(model)
    layers = find_layers(view).layers
    heads, fresh = attention_heads(view), FreshNames(model.graph)
    return {tensor: consumers[0].in_features for tensor, consumers in
            smoothable_inputs(view, dynamic_layers(layers)).items()
            if folding(view, tensor, consumers, fresh, heads) is None}


def with_timing_muls(quantized: onnx.ModelProto, channels: dict[str, int]) -> onnx.ModelProto:
    """``quantized`` (a dynamic int8 graph, changed in place) with a Mul by ones before the run-time quantization
    of each tensor in ``channels`` (``mul_node_inputs``): the nodes smoothing adds, for timing (the values do not
    change the time)."""
    view = GraphView(quantized)
    fresh = FreshNames(quantized.graph)
    added: dict[int, list[onnx.NodeProto]] = {}
    for node in view.nodes:
        tensor = node.input[0] if node.op_type == "DynamicQuantizeLinear" else None
        if tensor in channels:
            ones, smoothed = fresh.name(f"{tensor}_smooth_scale"), fresh.name(f"{tensor}_smoothed")
            quantized.graph.initializer.append(numpy_helper.from_array(np.ones(channels[tensor], np.float32), ones))
            added.setdefault(view.producer.get(tensor, -1), []).append(
                helper.make_node("Mul", [tensor, ones], [smoothed], name=fresh.name(f"{tensor}_smooth")))
            node.input[0] = smoothed
    insert_nodes(quantized, view, added)
    return quantized
