"""Find the compressible layers: every Conv (any group), Gemm, and MatMul with a constant weight.

Each layer is described by a canonical weight view W of shape (G, Cout/G, d) — G groups, d inputs per
output (Cin/G·kh·kw for a conv, K for a product) — so every algorithm sees one layout. Layers that
cannot be handled safely are declined with the reason, never guessed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ..errors import ConfigError
from ..onnxio.graph import GraphView, attributes
from .activation import ActivationChain, find_chain

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    auto_pad: str
    spatial_rank: int  # 1 or 2 (1-D convs are viewed as kh = 1)


@dataclass(frozen=True)
class Layer:
    """One compressible node and how its weight maps to the canonical (G, Cout/G, d) view."""

    name: str
    op_type: str
    node_index: int
    input_name: str
    output_name: str
    weight_name: str
    bias_name: str | None
    weight_shape: tuple[int, ...]
    weight_elem_type: int
    groups: int
    out_features: int
    in_features: int  # d, inputs per output
    layout: str  # "conv" | "gemm_nk" (B is N x K) | "gemm_kn" | "matmul"
    conv: ConvGeometry | None = None
    alpha: float = 1.0
    beta: float = 1.0
    chain: ActivationChain | None = None
    bias_addable: bool = True
    output_rank: int | None = None

    @property
    def channel_axis(self) -> int:
        return 1 if self.op_type == "Conv" else -1

    @property
    def taps(self) -> int:
        """Canonical columns per input channel: kh·kw for a Conv, 1 for Gemm / MatMul."""
        return self.conv.kernel[0] * self.conv.kernel[1] if self.conv else 1

    @property
    def num_weights(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def has_bias_slot(self) -> bool:
        return self.bias_name is not None or self.bias_addable

    def canonical(self, stored: np.ndarray) -> np.ndarray:
        """Stored ONNX weight -> (G, Cout/G, d) float32, including Gemm's alpha."""
        w = np.asarray(stored, dtype=np.float32)
        if self.layout == "conv":
            w = w.reshape(self.out_features, -1)
        elif self.layout == "gemm_nk":
            w = w * self.alpha
        elif self.layout == "gemm_kn":
            w = w.T * self.alpha
        else:  # matmul: x @ B with B (K, N)
            w = w.T
        return np.ascontiguousarray(w.reshape(self.groups, self.out_features // self.groups, self.in_features))

    def stored(self, canonical: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`canonical`, in the weight's own dtype (through float64 only to divide by alpha)."""
        w = np.asarray(canonical).reshape(self.out_features, self.in_features)
        if self.layout in ("gemm_nk", "gemm_kn") and self.alpha != 1.0:
            w = w.astype(np.float64) / self.alpha
        if self.layout in ("gemm_kn", "matmul"):
            w = w.T
        dtype = helper.tensor_dtype_to_np_dtype(self.weight_elem_type)
        return np.array(w.reshape(self.weight_shape), dtype=dtype, order="C")  # (a copy, always)

    def canonical_bias(self, view: GraphView) -> np.ndarray:
        """Bias as a float32 vector of length Cout (zeros when the layer has none); includes beta."""
        if self.bias_name is None:
            return np.zeros(self.out_features, np.float32)
        bias = view.constant(self.bias_name).astype(np.float32) * self.beta
        return np.broadcast_to(bias.reshape(-1), (self.out_features,)).astype(np.float32).copy()


@dataclass(frozen=True)
class Declined:
    name: str
    op_type: str
    reason: str


@dataclass
class LayerSet:
    layers: list[Layer] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)


def find_layers(view: GraphView) -> LayerSet:
    """Every Conv/Gemm/MatMul node, either as a Layer or as Declined with the reason."""
    found = LayerSet()
    for index in view.order:
        node = view.nodes[index]
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        try:
            layer = _describe(view, index)
        except _Decline as reason:
            found.declined.append(Declined(node.name, node.op_type, str(reason)))
            continue
        except (ValueError, TypeError, IndexError, ArithmeticError) as exc:  # malformed attributes or shapes
            found.declined.append(Declined(node.name, node.op_type, f"could not be analysed ({exc})"))
            continue
        found.layers.append(layer)
    return found


def apply_exclude(found: LayerSet, selectors: tuple[str, ...]) -> LayerSet:
    """Move layers matched by a node name, name glob or op type into ``declined``.

    A selector that matches no Conv/Gemm/MatMul node is a ConfigError (a typo would otherwise be silent).
    """
    everything = [(l.name, l.op_type) for l in found.layers] + [(d.name, d.op_type) for d in found.declined]
    for selector in selectors:
        if not any(_matches(selector, name, op) for name, op in everything):
            raise ConfigError(f"--exclude {selector!r} matches no Conv/Gemm/MatMul node; run "
                              "'onnxadmm check MODEL' to list layer names")
    kept, declined = [], list(found.declined)
    for layer in found.layers:
        hit = next((s for s in selectors if _matches(s, layer.name, layer.op_type)), None)
        if hit is None:
            kept.append(layer)
        else:
            declined.append(Declined(layer.name, layer.op_type, f"excluded by --exclude {hit!r}"))
    return LayerSet(kept, declined)


def _matches(selector: str, name: str, op_type: str) -> bool:
    return selector == op_type or selector == name or fnmatch.fnmatchcase(name, selector)


class _Decline(Exception):
    pass


def _describe(view: GraphView, index: int) -> Layer:
    node = view.nodes[index]
    if node.op_type == "Conv":
        return _conv(view, index, node)
    if node.op_type == "Gemm":
        return _gemm(view, index, node)
    return _matmul(view, index, node)


def _weight_checks(view: GraphView, node: onnx.NodeProto, name: str, role: str) -> onnx.TensorProto:
    if name not in view.initializers:
        producer = view.producer.get(name)
        what = f"computed by node {view.nodes[producer].name!r} ({view.nodes[producer].op_type})" \
            if producer is not None else "a graph input"
        raise _Decline(f"{role} {name!r} is {what}, not a constant")
    users = view.initializer_users(name)
    if len(users) > 1:
        others = [view.nodes[u].name for u in users if view.nodes[u] is not node]
        raise _Decline(f"{role} {name!r} is shared with {others[:3]}")
    tensor = view.initializers[name]
    if tensor.data_type not in FLOAT_TYPES:
        raise _Decline(f"{role} {name!r} has type {helper.tensor_dtype_to_string(tensor.data_type)} "
                       "(only float weights are compressed)")
    return tensor


def _output_rank(view: GraphView, tensor: str) -> int | None:
    tensor_type = view.types.get(tensor)
    return None if tensor_type is None or tensor_type.shape is None else len(tensor_type.shape)


def _conv(view: GraphView, index: int, node: onnx.NodeProto) -> Layer:
    weight = _weight_checks(view, node, node.input[1], "weight")
    dims = tuple(weight.dims)
    if len(dims) not in (3, 4):
        raise _Decline(f"{len(dims) - 2}-D convolution is not supported (1-D and 2-D are)")
    attrs = attributes(node)
    groups = int(attrs.get("group", 1))
    if groups < 1 or min(dims) < 1:
        raise _Decline(f"invalid Conv (group={groups}, weight shape {dims})")
    cout = dims[0]
    if cout % groups:
        raise _Decline(f"Cout={cout} is not divisible by group={groups}")
    spatial = len(dims) - 2
    kernel = tuple(dims[2:])
    strides = tuple(attrs.get("strides", [1] * spatial))
    dilations = tuple(attrs.get("dilations", [1] * spatial))
    pads = tuple(attrs.get("pads", [0] * (2 * spatial)))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if spatial == 1:
        kernel, strides, dilations = (1, kernel[0]), (1, strides[0]), (1, dilations[0])
        pads = (0, pads[0], 0, pads[1])
    geometry = ConvGeometry(kernel=kernel, strides=strides, dilations=dilations, pads=pads,
                            auto_pad=auto_pad, spatial_rank=spatial)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = _weight_checks(view, node, node.input[2], "bias").name
    rank = _output_rank(view, node.output[0]) or spatial + 2
    d = int(np.prod(dims[1:]))
    return Layer(name=node.name, op_type="Conv", node_index=index, input_name=node.input[0],
                 output_name=node.output[0], weight_name=weight.name, bias_name=bias, weight_shape=dims,
                 weight_elem_type=weight.data_type, groups=groups, out_features=cout, in_features=d,
                 layout="conv", conv=geometry, output_rank=rank,
                 chain=find_chain(view, index, node.output[0], 1, rank))


def _gemm(view: GraphView, index: int, node: onnx.NodeProto) -> Layer:
    attrs = attributes(node)
    if attrs.get("transA", 0):
        raise _Decline("Gemm with transA=1 is not supported")
    if view.is_constant(node.input[0]) and not view.is_constant(node.input[1]):
        raise _Decline("the constant is the first Gemm operand (A), not B")
    weight = _weight_checks(view, node, node.input[1], "weight")
    dims = tuple(weight.dims)
    trans_b = bool(attrs.get("transB", 0))
    n_out, k = (dims[0], dims[1]) if trans_b else (dims[1], dims[0])
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha == 0:
        raise _Decline("Gemm with alpha=0 ignores its weight")
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias_tensor = _weight_checks(view, node, node.input[2], "bias")
        if int(np.prod(bias_tensor.dims)) not in (1, n_out) or \
                (len(bias_tensor.dims) == 2 and bias_tensor.dims[0] != 1):
            raise _Decline(f"Gemm bias of shape {tuple(bias_tensor.dims)} is not a per-output vector")
        bias = bias_tensor.name
    return Layer(name=node.name, op_type="Gemm", node_index=index, input_name=node.input[0],
                 output_name=node.output[0], weight_name=weight.name, bias_name=bias, weight_shape=dims,
                 weight_elem_type=weight.data_type, groups=1, out_features=n_out, in_features=k,
                 layout="gemm_nk" if trans_b else "gemm_kn", alpha=alpha, beta=beta if bias else 1.0,
                 bias_addable=bias is not None or beta != 0, output_rank=2,
                 chain=find_chain(view, index, node.output[0], -1, 2))


def _matmul(view: GraphView, index: int, node: onnx.NodeProto) -> Layer:
    if view.is_constant(node.input[0]) and not view.is_constant(node.input[1]):
        raise _Decline("the constant is the left MatMul operand (x @ W with W constant is supported)")
    if not view.is_constant(node.input[1]):
        raise _Decline("both MatMul operands are computed (no constant weight)")
    weight = _weight_checks(view, node, node.input[1], "weight")
    dims = tuple(weight.dims)
    if len(dims) != 2:
        raise _Decline(f"MatMul weight of rank {len(dims)} (batched) is not supported")
    k, n_out = dims
    rank = _output_rank(view, node.output[0])
    return Layer(name=node.name, op_type="MatMul", node_index=index, input_name=node.input[0],
                 output_name=node.output[0], weight_name=weight.name, bias_name=None, weight_shape=dims,
                 weight_elem_type=weight.data_type, groups=1, out_features=n_out, in_features=k,
                 layout="matmul", bias_addable=False, output_rank=rank,
                 chain=find_chain(view, index, node.output[0], -1, rank))
