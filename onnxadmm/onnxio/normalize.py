"""Normalize a graph so layers can be found and converted, changing nothing else.

Rewrites (each semantics-preserving):
  * declared intermediate shapes (``value_info``) that contradict shape inference are dropped (an input
    that fails onnx.checker's full check for any other reason is refused), and so are declared shapes of
    initializers (the initializer states its own);
  * every node gets a unique, stable name (``{op_type}_{index}`` when missing; ``__k`` on duplicates);
  * ``Constant`` nodes become initializers (so per-channel constants, GELU's scalars and the head counts
    of attention Reshapes are seen as constants), and so do ``Identity(initializer)`` chains that feed a
    Conv/Gemm/MatMul weight or bias, or a Clip bound (torch's legacy exporter puts Identity before Conv
    biases, which onnx2torch cannot convert);
  * ``Clip`` with an omitted min or max gets an explicit -inf / +inf constant (onnx2torch cannot
    convert the omitted form);
  * a Conv/Gemm bias initializer read by several nodes gets one private copy per Conv/Gemm (exporters
    deduplicate equal tensors: the folded BatchNorm biases of a freshly initialized network are all
    equal), so each layer's bias can be refit. Shared *weights* stay shared and their layers are declined;
  * a per-channel affine map right after a Conv or Gemm that only it reads — an inference-mode ``BatchNormalization``
    (s = γ / √(var + ε), t = β − s·mean), or ``Mul``/``Add``/``Sub``/``Div`` by a per-channel constant — is
    folded into that layer, W' = s·W per output channel and b' = s·b + t (what onnxruntime does when it loads
    the model; exporters leave BatchNormalization unfolded without constant folding, converters write biases
    as an ``Add``), so the layer's activation follows it directly and its int8 form fuses;
  * ``Add(MatMul(x, W), b)`` with x a matrix, W and b constants (b per output column) becomes
    ``Gemm(x, W, b)`` (Keras dense layers through tf2onnx; onnxruntime fuses them so at load), so the layer's
    bias is its own: refit with it, and folded with what follows;
  * a zero ``Pad`` of the spatial axes that only a Conv reads becomes that Conv's ``pads`` (TensorFlow's
    converters write "SAME" padding as a Pad; left, the int8 Conv reads it through an extra Q/DQ pair).
Shape inference runs on a copy: the exported model keeps the rest of the original value_info.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UnsupportedModelError
from . import weights
from .graph import FreshNames, GraphView, attribute, drop_attribute, node_inputs, set_attribute
from .load import default_opset, full_check
from .save import weightless

# (op_type -> input slots that hold constants we may need as initializers)
_CONSTANT_SLOTS = {"Conv": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Clip": (1, 2),
                   "BatchNormalization": (1, 2, 3, 4)}


@dataclass
class NormalizedModel:
    """The model to edit and export (``model``) and its shape-inferred twin (``inferred``)."""

    model: onnx.ModelProto
    inferred: onnx.ModelProto
    rewrites: list[str] = field(default_factory=list)

    def view(self) -> GraphView:
        return GraphView(self.model, self.inferred)


def normalize(model: onnx.ModelProto, in_place: bool = False) -> NormalizedModel:
    """The normalized graph: a copy of ``model``, or ``model`` itself rewritten (``in_place``: for a model read
    from a file, whose weights are then held once)."""
    model = model if in_place else copy.deepcopy(model)
    rewrites: list[str] = []
    _passes_full_check(model, rewrites)
    _drop_declared_weight_shapes(model.graph)
    _unique_names(model.graph, rewrites)
    _fold_weight_constants(model.graph, rewrites)
    if default_opset(model) >= 11:
        _explicit_clip_bounds(model.graph, rewrites)
    _unshare_biases(model.graph, rewrites)
    _matmul_add_to_gemm(model, rewrites)
    _fold_into_layers(model.graph, rewrites)
    _fold_pads_into_convs(model.graph, rewrites)
    inferred = infer_types(model)
    return NormalizedModel(model=model, inferred=inferred, rewrites=rewrites)


def _passes_full_check(model: onnx.ModelProto, rewrites: list[str]) -> None:
    """The output must pass onnx.checker's full check, so the input must too. Declared shapes of
    intermediate tensors (``value_info``) that contradict inference are dropped (onnxruntime infers them
    again); any other failure is refused, naming it."""
    problem = full_check(model)
    if problem is None:
        return
    if len(model.graph.value_info):
        declared = list(model.graph.value_info)
        model.graph.ClearField("value_info")
        if full_check(model) is None:
            rewrites.append(f"dropped the declared shapes of {len(declared)} intermediate tensors: they "
                            f"contradict shape inference ({problem})")
            return
        model.graph.value_info.extend(declared)
    raise UnsupportedModelError(f"the model fails onnx.checker's full check (strict shape inference): {problem}. "
                                "onnxadmm promises an output that passes it, so the input must: fix the declared "
                                "input/output shapes or re-export the model")


def _drop_declared_weight_shapes(graph: onnx.GraphProto) -> None:
    """``value_info`` entries that name an initializer (torch's dynamo exporter writes one per weight) repeat
    what the initializer states; dropped, so a weight whose shape a method changes (channels, factors) carries
    no stale declaration into the output."""
    weights = {t.name for t in graph.initializer}
    kept = [v for v in graph.value_info if v.name not in weights]
    if len(kept) < len(graph.value_info):
        graph.ClearField("value_info")
        graph.value_info.extend(kept)


def _unique_names(graph: onnx.GraphProto, rewrites: list[str]) -> None:
    seen: dict[str, int] = {}
    renamed = 0
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if name in seen:
            seen[name] += 1
            name = f"{name}__{seen[name]}"
        if name != node.name:
            renamed += 1
            node.name = name
        seen.setdefault(name, 0)
    if renamed:
        rewrites.append(f"named {renamed} unnamed or duplicate nodes")


def _fold_weight_constants(graph: onnx.GraphProto, rewrites: list[str]) -> None:
    outputs = {v.name for v in graph.output}
    initializers = {t.name for t in graph.initializer}
    wanted: set[str] = {node.output[0] for node in graph.node if node.op_type == "Constant" and node.output}
    for node in graph.node:
        for slot in _CONSTANT_SLOTS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot]:
                wanted.add(node.input[slot])
    producers = {out: node for node in graph.node for out in node.output}
    rename: dict[str, str] = {}
    removed: list[onnx.NodeProto] = []
    changed = True
    while changed:
        changed = False
        for name in sorted(wanted):
            node = producers.get(name)
            if node is None or node in removed or name in outputs:
                continue
            if node.op_type == "Constant" and len(node.output) == 1:
                tensor = _constant_tensor(node)
                if tensor is None:
                    continue
                tensor.name = name
                graph.initializer.append(tensor)
                initializers.add(name)
                removed.append(node)
                changed = True
            elif node.op_type == "Identity":
                source = rename.get(node.input[0], node.input[0])
                if source in initializers:
                    rename[name] = source
                    removed.append(node)
                    changed = True
                elif source in producers:
                    wanted.add(source)  # fold what feeds the Identity first
    if not removed:
        return
    for node in removed:
        graph.node.remove(node)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in rename:
                node.input[slot] = rename[name]
    counts = {op: sum(n.op_type == op for n in removed) for op in ("Constant", "Identity")}
    rewrites.append("folded into initializers: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            return copy.deepcopy(attr.t)
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
        if attr.name == "value_int":
            return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
        if attr.name == "value_ints":
            return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
    return None


def _explicit_clip_bounds(graph: onnx.GraphProto, rewrites: list[str]) -> None:
    """Clip(x, "", max) -> Clip(x, -inf, max); Clip(x, min) -> Clip(x, min, +inf). Opset >= 11 form."""
    if not any(n.op_type == "Clip" for n in graph.node):
        return
    types = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph))
        types = {v.name: v.type.tensor_type.elem_type
                 for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    except Exception:  # noqa: BLE001 - inference is best effort; fall back to float32
        pass
    fixed = 0
    for node in graph.node:
        if node.op_type != "Clip":
            continue
        inputs = list(node.input) + [""] * (3 - len(node.input))
        if inputs[1] and inputs[2]:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(types.get(inputs[0], onnx.TensorProto.FLOAT))
        for slot, value in ((1, -np.inf), (2, np.inf)):
            if not inputs[slot]:
                name = f"{node.name}_onnxadmm_{'min' if slot == 1 else 'max'}"
                graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
                inputs[slot] = name
        del node.input[:]
        node.input.extend(inputs)
        fixed += 1
    if fixed:
        rewrites.append(f"made {fixed} Clip bounds explicit (+-inf)")


def _unshare_biases(graph: onnx.GraphProto, rewrites: list[str]) -> None:
    initializers = {t.name: t for t in graph.initializer}
    overridable = {v.name for v in graph.input}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    copied, sources = 0, set()
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        name = node.input[2]
        if name in initializers and name not in overridable and readers[name] > 1:
            private = numpy_helper.from_array(weights.array(initializers[name]), f"{name}__{node.name}")
            graph.initializer.append(private)
            node.input[2] = private.name
            readers[name] -= 1
            copied += 1
            sources.add(name)
    for tensor in [t for t in graph.initializer if t.name in sources and readers[t.name] == 0]:
        graph.initializer.remove(tensor)
    if copied:
        rewrites.append(f"gave {copied} Conv/Gemm nodes a private copy of a bias they shared")


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers a caller cannot override (not also graph inputs), by name."""
    inputs = {v.name for v in graph.input}
    return {t.name: t for t in graph.initializer if t.name not in inputs}


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes reading it (a subgraph's reads of outer values count as its node's)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node_inputs(node):
            readers.setdefault(name, []).append(node)
    return readers


def _drop_unread(graph: onnx.GraphProto, names) -> None:
    """Remove the initializers among ``names`` that no node reads any more."""
    read = _readers(graph)
    for tensor in [t for t in graph.initializer if t.name in set(names) and t.name not in read]:
        graph.initializer.remove(tensor)


def _matmul_add_to_gemm(model: onnx.ModelProto, rewrites: list[str]) -> None:
    """Add(MatMul(x, W), b) -> Gemm(x, W, b) where x has rank 2, W [K, N] and b ([N], [1, N] or a scalar) are
    constants, and the MatMul's output is read by the Add alone. The Gemm writes the Add's output tensor."""
    graph = model.graph
    constants, readers = _constants(graph), _readers(graph)
    products = {n.output[0]: n for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2
                and n.input[1] in constants and len(constants[n.input[1]].dims) == 2}
    outputs = {v.name for v in graph.output}
    pairs = []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        product = next((n for n in add.input if n in products and len(readers[n]) == 1 and n not in outputs), None)
        other = [n for n in add.input if n != product]
        if product is None or len(other) != 1 or other[0] not in constants:
            continue
        columns = constants[products[product].input[1]].dims[1]
        bias = constants[other[0]]
        if int(np.prod(bias.dims)) not in (1, columns) or any(d != 1 for d in list(bias.dims)[:-1]):
            continue
        pairs.append((products[product], add, other[0]))
    if not pairs:
        return
    types = GraphView(model, infer_types(model)).types
    fresh = FreshNames(graph)
    fused = 0
    for matmul, add, bias_name in pairs:
        x = types.get(matmul.input[0])
        if x is None or x.shape is None or len(x.shape) != 2:
            continue
        bias = constants[bias_name]
        columns = constants[matmul.input[1]].dims[1]
        vector = np.broadcast_to(weights.array(bias).reshape(-1), (columns,)).copy()
        private = numpy_helper.from_array(vector, fresh.name(f"{matmul.name}_bias"))
        graph.initializer.append(private)  # a copy: the bias may be read elsewhere, and the layer refits its own
        gemm = helper.make_node("Gemm", [matmul.input[0], matmul.input[1], private.name], [add.output[0]],
                                matmul.name)
        graph.node.insert(list(graph.node).index(matmul), gemm)
        graph.node.remove(matmul)
        graph.node.remove(add)
        fused += 1
    _drop_unread(graph, [bias for _, _, bias in pairs])
    if fused:
        rewrites.append(f"made {fused} MatMul + Add pairs Gemm nodes (as onnxruntime does when it loads the model)")


def _fold_into_layers(graph: onnx.GraphProto, rewrites: list[str]) -> None:
    """y ↦ s·y + t per output channel right after a Conv or Gemm (an inference-mode BatchNormalization, or Mul /
    Add / Sub / Div by a constant per channel or scalar) folded into it: W' = s·W per output channel,
    b' = s·b + t (a Gemm's C: s·C + t/β). Only where the layer's output is read by that node alone and W and b
    are constants only the layer reads; the layer then writes the folded node's output tensor. Repeated, so a
    chain (Conv → Mul → Add) folds whole."""
    counts: dict[str, int] = {}
    while True:
        folded = _fold_once(graph)
        if folded is None:
            break
        counts[folded] = counts.get(folded, 0) + 1
    if counts:
        parts = ", ".join(f"{n} {op}" for op, n in counts.items())
        rewrites.append(f"folded into the Conv/Gemm before each: {parts} (as onnxruntime does when it loads the "
                        "model)")


def _fold_once(graph: onnx.GraphProto) -> str | None:
    """Fold the first foldable node after a Conv or Gemm (``_fold_into_layers``); its op type, or None."""
    constants, readers = _constants(graph), _readers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {v.name for v in graph.output}

    def private(name: str) -> bool:
        return name in constants and len(readers[name]) == 1

    for node in graph.node:
        data = next((n for n in node.input[:2] if producers.get(n) is not None
                     and producers[n].op_type in ("Conv", "Gemm")), None) if node.op_type in _CHANNEL_AFFINE else None
        layer = producers.get(data) if data else None
        if layer is None or len(readers[data]) != 1 or data in outputs or len(node.output) != 1:
            continue
        bias_name = layer.input[2] if len(layer.input) > 2 and layer.input[2] else None
        if not private(layer.input[1]) or (bias_name and not private(bias_name)):
            continue
        weight = constants[layer.input[1]]
        dims, gemm = list(weight.dims), layer.op_type == "Gemm"
        if gemm and (attribute(layer, "transA", 0) or len(dims) != 2 or
                     (bias_name and attribute(layer, "beta", 1.0) == 0)):
            continue
        axis = 1 if gemm and not attribute(layer, "transB", 0) else 0  # the weight's output-channel axis
        channels = dims[axis]
        affine = _channel_affine(node, data, constants, channels, 2 if gemm else len(dims))
        b = _per_channel(weights.array(constants[bias_name]), channels) if bias_name else np.zeros(channels)
        if affine is None or b is None:
            continue
        scale, shift = affine
        w = weights.array(weight)
        beta = attribute(layer, "beta", 1.0) if gemm and bias_name else 1.0  # Gemm: y = α·A·B + β·C
        shape = [1] * w.ndim
        shape[axis] = channels
        weight.CopyFrom(numpy_helper.from_array(
            (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype), weight.name))
        bias = numpy_helper.from_array((scale * b + shift / beta).astype(w.dtype),
                                       bias_name or FreshNames(graph).name(f"{layer.name}_bias"))
        if bias_name:
            constants[bias_name].CopyFrom(bias)
        else:
            graph.initializer.append(bias)
            del layer.input[2:]
            layer.input.append(bias.name)
            if gemm:
                set_attribute(layer, "beta", 1.0)
        layer.output[0] = node.output[0]
        graph.node.remove(node)
        _drop_unread(graph, node.input)
        return node.op_type
    return None


def _per_channel(c: np.ndarray, channels: int) -> np.ndarray | None:
    """A bias as a float64 vector over the output channels: a scalar, [C] or [1, C]; None for any other shape
    (a Gemm's C may be a whole [N, C] matrix)."""
    if c.size not in (1, channels) or any(d != 1 for d in c.shape[:-1]):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,)).copy()


_CHANNEL_AFFINE = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


def _channel_affine(node: onnx.NodeProto, data: str, constants: dict, channels: int, rank: int
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with node(y) = s·y + t per channel of y's axis 1 (float64, ``channels`` long), or None when the
    node is not such a map of ``data`` (its other operands not constant, or broadcasting beyond a channel)."""
    if node.op_type == "BatchNormalization":
        if attribute(node, "training_mode", 0) or len(node.input) != 5 or node.input[0] != data \
                or not all(n in constants for n in node.input[1:]):
            return None
        gamma, beta, mean, var = (weights.array(constants[n]).astype(np.float64) for n in node.input[1:])
        scale = gamma / np.sqrt(var + attribute(node, "epsilon", 1e-5))
        return scale, beta - scale * mean
    other = [n for n in node.input if n != data]
    if len(node.input) != 2 or len(other) != 1 or other[0] not in constants:
        return None
    if node.op_type in ("Sub", "Div") and node.input[0] != data:
        return None  # c − y and c / y are not maps y ↦ s·y + t
    c = weights.array(constants[other[0]]).astype(np.float64)
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for axis, d in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    c = np.broadcast_to(c.reshape(-1), (channels,)).copy()
    ones, zeros = np.ones(channels), np.zeros(channels)
    return {"Mul": (c, zeros), "Div": (1 / c, zeros), "Add": (ones, c), "Sub": (ones, -c)}[node.op_type]


def _fold_pads_into_convs(graph: onnx.GraphProto, rewrites: list[str]) -> None:
    """Conv(Pad(x, zeros on the spatial axes), pads=q) -> Conv(x, pads=q + those zeros), where the Pad is constant
    mode with value 0, leaves the batch and channel axes alone and is read by that Conv alone."""
    constants, readers = _constants(graph), _readers(graph)
    outputs = {v.name for v in graph.output}
    folded = []
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        convs = readers.get(pad.output[0], [])
        if len(convs) != 1 or convs[0].op_type != "Conv" or convs[0].input[0] != pad.output[0] \
                or pad.output[0] in outputs or _text(attribute(convs[0], "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
            continue
        conv, extra = convs[0], _zero_pads(pad, constants)
        rank = len(constants[conv.input[1]].dims) if conv.input[1] in constants else None
        if extra is None or rank is None or len(extra) != 2 * rank or any(extra[a] or extra[rank + a] for a in (0, 1)):
            continue
        spatial = rank - 2
        own = list(attribute(conv, "pads", [0] * 2 * spatial))  # VALID: no padding of its own
        drop_attribute(conv, "auto_pad")
        begins = [own[a] + int(extra[2 + a]) for a in range(spatial)]
        ends = [own[spatial + a] + int(extra[rank + 2 + a]) for a in range(spatial)]
        set_attribute(conv, "pads", begins + ends)
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    _drop_unread(graph, [n for pad in folded for n in pad.input[1:]])
    if folded:
        rewrites.append(f"folded {len(folded)} zero Pad nodes into the pads of the Conv after each")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _zero_pads(pad: onnx.NodeProto, constants: dict) -> np.ndarray | None:
    """The pads (begins then ends, every axis) of a constant-mode Pad by zero with non-negative constant pads;
    None for any other Pad (reflect/edge, a value or pads computed at run time, an ``axes`` input)."""
    if _text(attribute(pad, "mode", "constant")) != "constant" or len(pad.input) > 3:
        return None
    if len(pad.input) > 1:  # opset >= 11: pads and the value are inputs
        if pad.input[1] not in constants:
            return None
        pads = weights.array(constants[pad.input[1]])
        if len(pad.input) > 2 and pad.input[2]:
            if pad.input[2] not in constants or np.any(weights.array(constants[pad.input[2]]) != 0):
                return None
    else:
        pads = np.array(attribute(pad, "pads", []), np.int64)
        if attribute(pad, "value", 0.0) != 0:
            return None
    return pads if pads.ndim == 1 and np.all(pads >= 0) else None


def infer_types(model: onnx.ModelProto, data_prop: bool = True) -> onnx.ModelProto:
    """The model's graph with inferred value_info and no weights (only its types are read). Inference runs on
    the ``weightless`` proxy: the same types, no copy of the weights, never protobuf's 2 GB limit."""
    proxy = weightless(model)
    try:
        return onnx.shape_inference.infer_shapes(proxy, data_prop=data_prop)
    except Exception:  # noqa: BLE001 - shapes also come from the runtime pass
        return proxy
