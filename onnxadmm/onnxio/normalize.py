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
  * an inference-mode ``BatchNormalization`` right after a Conv that only it reads is folded into that Conv
    (what onnxruntime does when it loads the model; exporters leave it unfolded without constant folding or in
    training-mode exports): with s = γ / √(var + ε), W' = s·W per output channel and b' = s·(b − mean) + β, so
    the layer's activation follows it directly and its int8 form fuses.
Shape inference runs on a copy: the exported model keeps the rest of the original value_info.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import UnsupportedModelError
from .graph import FreshNames, GraphView, attribute, node_inputs
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
    _fold_batch_norms(model.graph, rewrites)
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
            private = numpy_helper.from_array(numpy_helper.to_array(initializers[name]), f"{name}__{node.name}")
            graph.initializer.append(private)
            node.input[2] = private.name
            readers[name] -= 1
            copied += 1
            sources.add(name)
    for tensor in [t for t in graph.initializer if t.name in sources and readers[t.name] == 0]:
        graph.initializer.remove(tensor)
    if copied:
        rewrites.append(f"gave {copied} Conv/Gemm nodes a private copy of a bias they shared")


def _fold_batch_norms(graph: onnx.GraphProto, rewrites: list[str]) -> None:
    """BatchNormalization(Conv(x, W, b)) -> Conv(x, s·W, s·(b − mean) + β), s = γ / √(var + ε) per output channel,
    where the Conv's output is read by the BatchNormalization alone and W and b are constants only the Conv
    reads. The Conv then writes the BatchNormalization's output tensor."""
    constants = {t.name: t for t in graph.initializer if t.name not in {v.name for v in graph.input}}
    outputs = {v.name for v in graph.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node_inputs(node):  # subgraphs' reads of outer values included
            readers[name] = readers.get(name, 0) + 1
    producers = {out: node for node in graph.node for out in node.output}

    def private(name: str) -> bool:
        return name in constants and readers[name] == 1

    def foldable(norm: onnx.NodeProto) -> onnx.NodeProto | None:
        """The Conv ``norm`` folds into, or None."""
        if norm.op_type != "BatchNormalization" or len(norm.output) != 1 or attribute(norm, "training_mode", 0) \
                or len(norm.input) != 5 or not all(n in constants for n in norm.input[1:]):
            return None
        conv = producers.get(norm.input[0])
        if conv is None or conv.op_type != "Conv" or readers[norm.input[0]] != 1 or norm.input[0] in outputs:
            return None
        bias = conv.input[2] if len(conv.input) > 2 else ""
        return conv if private(conv.input[1]) and (not bias or private(bias)) else None

    fresh = FreshNames(graph)
    folded = []
    for norm in graph.node:
        conv = foldable(norm)
        if conv is None:
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(constants[n]).astype(np.float64) for n in norm.input[1:])
        scale = gamma / np.sqrt(var + attribute(norm, "epsilon", 1e-5))
        weight = constants[conv.input[1]]
        w = numpy_helper.to_array(weight)
        weight.CopyFrom(numpy_helper.from_array(
            (w.astype(np.float64) * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype), weight.name))
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        b = numpy_helper.to_array(constants[bias_name]).astype(np.float64) if bias_name else np.zeros_like(mean)
        bias = numpy_helper.from_array((scale * (b - mean) + beta).astype(w.dtype),
                                       bias_name or fresh.name(f"{conv.name}_bias"))
        if bias_name:
            constants[bias_name].CopyFrom(bias)
        else:
            graph.initializer.append(bias)
            del conv.input[2:]
            conv.input.append(bias.name)
        conv.output[0] = norm.output[0]
        folded.append(norm)
    for norm in folded:
        graph.node.remove(norm)
    statistics = {n for norm in folded for n in norm.input[1:]}
    still_read = {n for node in graph.node for n in node_inputs(node)}
    for tensor in [t for t in graph.initializer if t.name in statistics and t.name not in still_read]:
        graph.initializer.remove(tensor)
    if folded:
        rewrites.append(f"folded {len(folded)} BatchNormalization nodes into the Conv before each (as onnxruntime "
                        "does when it loads the model)")


def infer_types(model: onnx.ModelProto, data_prop: bool = True) -> onnx.ModelProto:
    """The model's graph with inferred value_info and no weights (only its types are read). Inference runs on
    the ``weightless`` proxy: the same types, no copy of the weights, never protobuf's 2 GB limit."""
    proxy = weightless(model)
    try:
        return onnx.shape_inference.infer_shapes(proxy, data_prop=data_prop)
    except Exception:  # noqa: BLE001 - shapes also come from the runtime pass
        return proxy
