"""The ONNX -> torch bridge (the only module that imports onnx2torch).

A layer's activation chain is cut out of the graph as a small ONNX model and converted with onnx2torch,
giving σ as a torch function for the loss taken through the nonlinearity. The layer together with its
chain is converted too and run on real calibration inputs, to check that the canonical patch view
(W x̂ + b, then σ) reproduces what the graph computes. Any failure is a BridgeError naming the node;
the caller leaves that layer dense and reports why.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..analysis.layers import Layer
from ..onnxio.graph import GraphView
from ..onnxio.load import default_opset
from ..onnxio.weights import array as tensor_values, inlined


class BridgeError(Exception):
    """onnx2torch cannot convert, or the converted layer disagrees with the patch view."""


def converter_missing(node: onnx.NodeProto, opset: int) -> bool:
    """True when onnx2torch has no converter for this node's (domain, op_type) at ``opset``."""
    from onnx2torch.node_converters.registry import get_converter

    from . import fakequant

    if node.domain == fakequant.DOMAIN:
        return node.op_type not in fakequant.OPS
    try:
        get_converter(node.op_type, opset, node.domain or "")
        return False
    except NotImplementedError:
        return True


def _convert(view: GraphView, node_ids: list[int], inputs: list[str], output: str,
             input_ranks: dict[str, int | None]) -> torch.nn.Module:
    """onnx2torch's module of the nodes ``node_ids``, reading ``inputs`` (in that order; an initializer among them
    is an input of the module, not a constant in it) and returning ``output``."""
    check_convertible(view, node_ids, "; the layer stays dense")
    needed = {t for i in node_ids for t in view.nodes[i].input if t in view.initializers} - set(inputs)
    graph = helper.make_graph(
        [view.nodes[i] for i in node_ids], "onnxadmm_bridge",
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                       None if input_ranks.get(name) is None else [None] * input_ranks[name])
         for name in inputs],
        [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)],
        [_as_float32(view.initializers[t]) for t in sorted(needed)])
    model = helper.make_model(graph, opset_imports=list(view.model.opset_import),
                              ir_version=view.model.ir_version)
    return onnx_to_torch(model, view.nodes[node_ids[0]])


def check_convertible(view: GraphView, node_ids: list[int], consequence: str = "") -> None:
    """BridgeError naming the first node onnx2torch has no converter for."""
    opset = default_opset(view.model)
    for index in node_ids:
        node = view.nodes[index]
        if converter_missing(node, opset):
            raise BridgeError(f"onnx2torch cannot convert node {node.name!r} ({node.op_type}, opset "
                              f"{opset}){consequence}")


def onnx_to_torch(model: onnx.ModelProto, first: onnx.NodeProto) -> torch.nn.Module:
    """onnx2torch's module for ``model`` in eval mode; any failure is a BridgeError naming ``first``."""
    from onnx2torch import convert

    from .fakequant import register

    register()  # onnxadmm's training-only ops

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = convert(model)
    except Exception as exc:  # noqa: BLE001 - onnx2torch raises many kinds
        raise BridgeError(f"onnx2torch failed on the subgraph starting at node {first.name!r}: "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return module.eval()


def _as_float32(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The solver works in float32: cast fp16/fp64 constants of the cut-out subgraph (values kept in a file are
    read in: onnx2torch reads only the message)."""
    if tensor.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return numpy_helper.from_array(tensor_values(tensor).astype(np.float32), tensor.name)
    return inlined(tensor)


def _patch_shape(layer: Layer) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reshape (P, Cout) to a tensor of the layer output's rank with the channel on its own axis."""
    rank = layer.output_rank or 2
    if layer.op_type == "Conv":
        return lambda t: t.reshape(t.shape[0], t.shape[1], *([1] * (rank - 2)))
    return lambda t: t.reshape(t.shape[0], *([1] * (rank - 2)), t.shape[1])


def activation_function(view: GraphView, layer: Layer):
    """σ(z, sides) on (P, Cout) tensors, converted from the layer's chain; None for the identity."""
    chain = layer.chain
    if chain is None or chain.is_identity:
        return None
    rank = layer.output_rank or 2
    inputs = [layer.output_name, *chain.side_inputs]
    module = _convert(view, list(chain.node_ids), inputs, chain.output_name, {n: rank for n in inputs})
    to_rank = _patch_shape(layer)

    def sigma(z: torch.Tensor, sides: tuple) -> torch.Tensor:
        out = module(to_rank(z), *(to_rank(s) for s in sides))
        return out.reshape(z.shape[0], -1)

    return sigma


FED_WEIGHT_OPS = ("MatMul", "Gemm")  # layers whose weight the conversion check feeds as an input (``verify_layer``)


def _float32_tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 tensor of ``array``, sharing its memory where it is float32 already (read-only: a mapped file)."""
    array = np.asarray(array)
    if array.dtype != np.float32:
        return torch.from_numpy(array.astype(np.float32))
    with warnings.catch_warnings():  # (torch warns that it cannot protect a read-only array; it is only read)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def verify_layer(view: GraphView, layer: Layer, x_batch: np.ndarray, side_batches: list[np.ndarray],
                 positions: Callable[[torch.Tensor], torch.Tensor], expected: torch.Tensor) -> None:
    """Run the converted layer + chain on one real batch; its values at the sampled positions must
    match ``expected`` (σ(W₀x̂ + b₀) from the patch view). ``positions`` gathers (P, Cout) from the
    full output tensor."""
    chain = layer.chain
    ids = [layer.node_index, *(chain.node_ids if chain else ())]
    inputs = [layer.input_name, *(chain.side_inputs if chain else ())]
    output = chain.output_name if chain and not chain.is_identity else layer.output_name
    ranks = {layer.input_name: np.asarray(x_batch).ndim}
    ranks.update({name: np.asarray(s).ndim for name, s in zip(inputs[1:], side_batches)})
    fed = []  # a MatMul's or Gemm's weight is fed to the module (onnx2torch multiplies by it as given), not copied
    if layer.op_type in FED_WEIGHT_OPS:  # into the converted model and module: a multi-GB weight is read in place
        weight = view.constant(layer.weight_name)
        inputs.append(layer.weight_name)
        ranks[layer.weight_name] = weight.ndim
        fed = [_float32_tensor(weight)]
    module = _convert(view, ids, inputs, output, ranks)
    with torch.no_grad():
        full = module(torch.from_numpy(np.array(x_batch, dtype=np.float32)),
                      *(torch.from_numpy(np.array(s, dtype=np.float32)) for s in side_batches), *fed)
    got = positions(full)
    scale = float(expected.abs().max()) or 1.0
    error = float((got - expected).abs().max())
    if not error <= 1e-3 * scale + 1e-5:
        raise BridgeError(f"layer {layer.name!r}: the patch view disagrees with the converted graph "
                          f"(max abs difference {error:.3g}, scale {scale:.3g}); left dense")
