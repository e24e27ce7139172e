"""Low-rank layers exported as two nodes (and, for a separate sparse part, a parallel branch + Add).

W (Cout × d) = left (Cout × k) · right (k × d) [+ S]:
  Conv k×k  → Conv(k×k, Cin→k; the original strides/pads/dilations, no bias)
              then Conv(1×1, k→Cout; the original bias)          — the original node becomes the 1×1
  Tucker-2  → Conv(1×1, Cin→r₁; Q) then Conv(k×k, r₁→k; core, right = core ×₁ Q) then Conv(1×1, k→Cout)
              (a 1×1 conv commutes with zero padding and strides, so the k×k conv keeps the original's)
  Gemm      → MatMul(A, rightᵀ) then the original Gemm with B = left (its transB, alpha, beta, C kept)
  MatMul    → MatMul(X, rightᵀ) then MatMul(·, leftᵀ)            — works on N-D X
  + S       → the original op with weight S on the original input, and Add(pair, S-branch) under the
              original output name (stored dense: smaller when zipped, slower than the dense layer).
Row-sparse S is already inside left/right (``factorize.Factors``). The node keeps its name and output,
so consumers, graph outputs and dynamic axes are untouched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..analysis.layers import Layer
from ..onnxio.graph import FreshNames, attributes
from .apply import write_initializers

SPATIAL_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


@dataclass(frozen=True)
class FactoredLayer:
    """A layer's exported factors, in canonical layout (see ``Layer.canonical``), float arrays."""

    layer: Layer
    left: np.ndarray  # (Cout, k)
    right: np.ndarray  # (k, d)
    sparse: np.ndarray | None  # (Cout, d) or None
    input_basis: np.ndarray | None = None  # Tucker-2: Q (r₁, Cin), orthonormal rows spanning right's inputs


def random_factored(layer: Layer, inner: int, input_rank: int, rng: np.random.Generator) -> FactoredLayer:
    """Factors of the given sizes holding random values, for timing (a graph's time does not depend on them)."""
    right = rng.standard_normal((inner, layer.in_features)) * 0.1
    basis = None
    if input_rank:
        channels = layer.in_features // layer.taps
        basis = np.linalg.qr(rng.standard_normal((channels, input_rank)))[0].T
        right = np.einsum("jct,bc,be->jet", right.reshape(inner, channels, -1), basis, basis).reshape(inner, -1)
    return FactoredLayer(layer, rng.standard_normal((layer.out_features, inner)) * 0.1, right, None, basis)


def export_form(layer: Layer, inner: int, has_branch: bool, input_rank: int = 0) -> str:
    """A short description of the exported nodes, for the report."""
    if layer.op_type == "Conv":
        kh, kw = layer.conv.kernel
        channels = layer.in_features // (kh * kw)
        first = (f"Conv 1x1 {channels}->{input_rank} + Conv {kh}x{kw} {input_rank}->{inner}" if input_rank
                 else f"Conv {kh}x{kw} {channels}->{inner}")
        form = f"{first} + Conv 1x1 {inner}->{layer.out_features}"
    else:
        form = f"MatMul {layer.in_features}->{inner} + {layer.op_type} {inner}->{layer.out_features}"
    return form + (" + sparse branch (dense-stored) + Add" if has_branch else "")


def factorize(model: onnx.ModelProto, factored: list[FactoredLayer]) -> onnx.ModelProto:
    """A copy of ``model`` with every layer in ``factored`` replaced by its factor pair (+ branch)."""
    out = copy.deepcopy(model)
    graph = out.graph
    by_name = {node.name: node for node in graph.node}
    before: dict[str, list[onnx.NodeProto]] = {}
    after: dict[str, list[onnx.NodeProto]] = {}
    values: dict[str, np.ndarray] = {}
    fresh = FreshNames(graph)
    for item in factored:
        layer = item.layer
        node = by_name[layer.name]
        dtype = helper.tensor_dtype_to_np_dtype(layer.weight_elem_type)
        stem = fresh.prefix(f"{layer.weight_name}__onnxadmm_lowrank")  # the factors' names all start with it
        first_out = fresh.name(f"{layer.output_name}__onnxadmm_lowrank_in")
        conv_attrs = attributes(node)
        first, second_weight = _pair(node, layer, item, stem, first_out, dtype, values)
        before[layer.name] = [first]
        if item.input_basis is not None:
            before[layer.name].insert(0, _input_projection(layer, item, stem, first, dtype, values, fresh))
        node.input[0] = first_out
        node.input[1] = second_weight
        if item.sparse is not None:
            branch_out = fresh.name(f"{layer.output_name}__onnxadmm_sparse")
            pair_out = fresh.name(f"{layer.output_name}__onnxadmm_pair")
            branch = _branch(conv_attrs, layer, item.sparse, f"{stem}_sparse", layer.input_name, branch_out, dtype, values)
            before[layer.name].append(branch)
            original_out = node.output[0]
            node.output[0] = pair_out
            after[layer.name] = [helper.make_node("Add", [pair_out, branch_out], [original_out],
                                                  name=f"{layer.name}/onnxadmm_add_sparse")]
    nodes = []
    for node in graph.node:
        nodes.extend(before.get(node.name, []))
        nodes.append(node)
        nodes.extend(after.get(node.name, []))
    graph.ClearField("node")
    graph.node.extend(nodes)
    write_initializers(graph, values)
    return out


def _pair(node, layer: Layer, item: FactoredLayer, stem: str, first_out: str, dtype, values
          ) -> tuple[onnx.NodeProto, str]:
    """The first node (input → k) and the name of the original node's new weight (k → Cout)."""
    k = item.left.shape[1]
    left, right = item.left.astype(np.float64), item.right.astype(np.float64)
    if layer.op_type == "Conv":
        weight_shape = layer.weight_shape
        values[f"{stem}_in"] = right.reshape(k, *weight_shape[1:]).astype(dtype)
        values[f"{stem}_out"] = left.reshape(layer.out_features, k, *([1] * (len(weight_shape) - 2))).astype(dtype)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in SPATIAL_ATTRS}
        first = helper.make_node("Conv", [layer.input_name, f"{stem}_in"], [first_out],
                                 name=f"{layer.name}/onnxadmm_lowrank_in", **attrs)
        spatial = len(weight_shape) - 2
        for attr in [a for a in node.attribute if a.name in SPATIAL_ATTRS]:
            node.attribute.remove(attr)
        node.attribute.extend([helper.make_attribute("kernel_shape", [1] * spatial),
                               helper.make_attribute("strides", [1] * spatial),
                               helper.make_attribute("pads", [0] * (2 * spatial)),
                               helper.make_attribute("dilations", [1] * spatial)])
        return first, f"{stem}_out"
    values[f"{stem}_in"] = np.ascontiguousarray(right.T).astype(dtype)  # (d, k): x @ rightᵀ
    first = helper.make_node("MatMul", [layer.input_name, f"{stem}_in"], [first_out],
                             name=f"{layer.name}/onnxadmm_lowrank_in")
    if layer.layout == "gemm_nk":
        values[f"{stem}_out"] = (left / layer.alpha).astype(dtype)
    elif layer.layout == "gemm_kn":
        values[f"{stem}_out"] = np.ascontiguousarray((left / layer.alpha).T).astype(dtype)
    else:  # matmul: · @ leftᵀ
        values[f"{stem}_out"] = np.ascontiguousarray(left.T).astype(dtype)
    return first, f"{stem}_out"


def _input_projection(layer: Layer, item: FactoredLayer, stem: str, first: onnx.NodeProto, dtype, values,
                      fresh: FreshNames) -> onnx.NodeProto:
    """Tucker-2: the 1×1 Conv Cin→r₁ (weight Q) feeding ``first``, whose weight becomes the core
    core[j, b, ·] = Σ_c right[j, c, ·]·Q[b, c] (exact: right's input channels lie in Q's row span)."""
    basis = item.input_basis.astype(np.float64)
    rank, channels = basis.shape
    spatial = len(layer.weight_shape) - 2
    right = item.right.astype(np.float64).reshape(item.right.shape[0], channels, -1)
    values[f"{stem}_in"] = np.einsum("jct,bc->jbt", right, basis).reshape(
        item.right.shape[0], rank, *layer.weight_shape[2:]).astype(dtype)
    values[f"{stem}_basis"] = basis.reshape(rank, channels, *([1] * spatial)).astype(dtype)
    basis_out = fresh.name(f"{layer.output_name}__onnxadmm_tucker_in")
    first.input[0] = basis_out
    return helper.make_node("Conv", [layer.input_name, f"{stem}_basis"], [basis_out],
                            name=f"{layer.name}/onnxadmm_tucker_in", kernel_shape=[1] * spatial)


def _branch(conv_attrs: dict, layer: Layer, sparse: np.ndarray, name: str, source: str, output: str, dtype, values
            ) -> onnx.NodeProto:
    """The original op (its attributes ``conv_attrs`` for a Conv) with weight S and no bias."""
    values[name] = layer.stored(sparse.reshape(1, layer.out_features, layer.in_features)).astype(dtype)
    if layer.op_type == "Conv":
        return helper.make_node("Conv", [source, name], [output], name=f"{layer.name}/onnxadmm_sparse",
                                **conv_attrs)
    if layer.op_type == "Gemm":
        trans_b = 1 if layer.layout == "gemm_nk" else 0
        return helper.make_node("Gemm", [source, name], [output], name=f"{layer.name}/onnxadmm_sparse",
                                transB=trans_b, alpha=layer.alpha)
    return helper.make_node("MatMul", [source, name], [output], name=f"{layer.name}/onnxadmm_sparse")

