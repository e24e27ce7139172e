"""A read-only index over a model's top-level graph: who produces and consumes each tensor, constants,
inferred types, and a topological order (cycles and dangling inputs are reported by name).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import UnsupportedModelError
from . import weights


@dataclass(frozen=True)
class TensorType:
    elem_type: int
    shape: tuple[int | str | None, ...] | None  # int = static, str = symbolic, None = unknown

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))


def subgraph_outer_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names a (control-flow) subgraph reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                used.add(name)
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                used |= {n for n in subgraph_outer_inputs(sub) if n not in defined}
        defined |= set(node.output)
    return used - defined


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph inside it (If branches, Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield from all_graphs(sub)


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope names read by its subgraphs (If/Loop/Scan)."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            names.extend(sorted(subgraph_outer_inputs(sub)))
    return names


class GraphView:
    """Index of ``model.graph`` (top level). Node ids are positions in ``graph.node``."""

    def __init__(self, model: onnx.ModelProto, inferred: onnx.ModelProto | None = None):
        self.model = model
        graph = model.graph
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.input_names: list[str] = [v.name for v in graph.input if v.name not in self.initializers]
        self.output_names: list[str] = [v.name for v in graph.output]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.node_by_name: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            self.node_by_name.setdefault(node.name, index)
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in node_inputs(node):
                self.consumers[name].append(index)
        self.types: dict[str, TensorType] = {}
        source = inferred if inferred is not None else model
        for value in list(source.graph.input) + list(source.graph.value_info) + list(source.graph.output):
            parsed = _tensor_type(value)
            if parsed is not None:
                self.types[value.name] = parsed
        for name, tensor in self.initializers.items():
            self.types[name] = TensorType(tensor.data_type, tuple(tensor.dims))
        self.order = self._topological_order()

    # -- constants ---------------------------------------------------------------------------
    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def constant(self, name: str) -> np.ndarray:
        return weights.array(self.initializers[name])

    # -- structure ---------------------------------------------------------------------------
    def _topological_order(self) -> list[int]:
        available = set(self.input_names) | set(self.initializers) | {""}
        pending = {}
        waiting: dict[str, list[int]] = defaultdict(list)
        ready = deque()
        for index, node in enumerate(self.nodes):
            missing = {n for n in node_inputs(node) if n not in available}
            for name in missing:
                if name not in self.producer:
                    raise UnsupportedModelError(
                        f"node {node.name!r} ({node.op_type}) reads tensor {name!r}, which no node, "
                        "graph input or initializer provides (dangling input); fix the exporter output")
                waiting[name].append(index)
            pending[index] = len(missing)
            if not missing:
                ready.append(index)
        order = []
        while ready:
            index = ready.popleft()
            order.append(index)
            for name in self.nodes[index].output:
                for consumer in waiting.pop(name, []):
                    pending[consumer] -= 1
                    if pending[consumer] == 0:
                        ready.append(consumer)
        if len(order) != len(self.nodes):
            stuck = next(i for i, count in pending.items() if count > 0)
            raise UnsupportedModelError(
                f"the graph has a cycle through node {self.nodes[stuck].name!r} "
                f"({self.nodes[stuck].op_type}); ONNX graphs must be acyclic")
        return order

    def ancestors(self, tensors, stop: set[int] | None = None) -> set[int]:
        """Node ids needed to compute ``tensors`` (not crossing nodes in ``stop``)."""
        stop = stop or set()
        seen: set[int] = set()
        stack = [self.producer[t] for t in tensors if t in self.producer]
        while stack:
            index = stack.pop()
            if index in seen or index in stop:
                continue
            seen.add(index)
            stack.extend(self.producer[n] for n in node_inputs(self.nodes[index]) if n in self.producer)
        return seen

    def sole_consumer(self, tensor: str) -> int | None:
        """The only node reading ``tensor``, if exactly one does and it is not a graph output."""
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and tensor not in self.output_names:
            return users[0]
        return None

    def initializer_users(self, name: str) -> list[int]:
        return list(self.consumers.get(name, []))


def _tensor_type(value: onnx.ValueInfoProto) -> TensorType | None:
    if not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type == 0:
        return None
    if not tensor_type.HasField("shape"):
        return TensorType(tensor_type.elem_type, None)
    dims = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorType(tensor_type.elem_type, tuple(dims))


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attribute(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def drop_attribute(node: onnx.NodeProto, name: str) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    drop_attribute(node, name)
    node.attribute.append(helper.make_attribute(name, value))


class FreshNames:
    """Names an export may add to a graph without meeting one it has (values, initializers, nodes).

    ``name(base)``: ``base`` when free, else ``base_2``, ``base_3``, …; ``prefix(base)``: the same, free also as
    the start of every name in the graph, so ``prefix + suffix`` is free for any suffix. Each one handed out
    is taken."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = {n.name for n in graph.node} | {t.name for t in graph.initializer} | \
            {v.name for v in (*graph.input, *graph.output, *graph.value_info)} | \
            {name for n in graph.node for name in (*n.input, *n.output)}

    def name(self, base: str) -> str:
        return self._first(base, lambda candidate: candidate not in self.taken)

    def prefix(self, base: str) -> str:
        return self._first(base, lambda candidate: not any(t.startswith(candidate) for t in self.taken))

    def _first(self, base: str, free) -> str:
        candidate, k = base, 1
        while not free(candidate):
            k += 1
            candidate = f"{base}_{k}"
        self.taken.add(candidate)
        return candidate


QUANTIZED_OPS = {"DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}


def is_quantized(model: onnx.ModelProto) -> bool:
    """True for an int8 model: QDQ (DequantizeLinear nodes) or dynamic (DynamicQuantizeLinear → MatMulInteger)."""
    return any(node.op_type in QUANTIZED_OPS for node in model.graph.node)


def quantized_form(model: onnx.ModelProto) -> str | None:
    """"w4" when weights are stored as int4, "int8" for another quantized model (``is_quantized``), else None."""
    if any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer):
        return "w4"
    return "int8" if is_quantized(model) else None


def model_inputs(view: GraphView) -> dict[str, TensorType]:
    inputs = {}
    for name in view.input_names:
        tensor_type = view.types.get(name)
        if tensor_type is None:
            raise UnsupportedModelError(f"model input {name!r} has no tensor type; onnxadmm needs typed inputs")
        inputs[name] = tensor_type
    return inputs


def signature_differences(a: GraphView, b: GraphView) -> list[str]:
    """How the inputs and outputs of two models differ: names, dtypes, ranks and dimensions (a static size
    differs from another size and from a dynamic axis; two dynamic axes match whatever their names)."""
    if a.input_names != b.input_names or a.output_names != b.output_names:
        return [f"inputs {a.input_names} vs {b.input_names}, outputs {a.output_names} vs {b.output_names}"]
    found = []
    for kind, names in (("input", a.input_names), ("output", a.output_names)):
        for name in names:
            ta, tb = a.types.get(name), b.types.get(name)
            if ta is None or tb is None:
                continue
            if ta.elem_type != tb.elem_type:
                found.append(f"{kind} {name!r} is {ta.dtype} vs {tb.dtype}")
            elif ta.shape is not None and tb.shape is not None and (
                    len(ta.shape) != len(tb.shape) or any(_static(x) != _static(y) for x, y in zip(ta.shape, tb.shape))):
                found.append(f"{kind} {name!r} has shape {list(ta.shape)} vs {list(tb.shape)}")
    return found


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None
