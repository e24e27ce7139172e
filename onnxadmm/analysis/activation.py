"""The activation chain that follows a layer: the elementwise nodes the layer-wise loss goes through.

Starting at the layer output, the chain takes nodes that act per output channel and position:
per-channel affine ops with constants (BatchNormalization, Add/Sub/Mul/Div by a per-channel constant),
a residual ``Add`` with a tensor of the same shape that does not depend on the layer (a *side input*,
sampled at the same positions), and stops after the first nonlinearity (Relu, Clip, LeakyRelu, PRelu,
Sigmoid, HardSigmoid, HardSwish, Tanh, Elu, Selu, Celu, Softplus, Softsign, Gelu, Mish,
ThresholdedRelu; and the SiLU / HardSwish patterns ``x * Sigmoid(x)``, ``x * HardSigmoid(x)``).
A tensor read by more than one node ends the chain (its raw value is used elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..onnxio.graph import GraphView

NONLINEAR = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
             "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu"}
AFFINE_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclass(frozen=True)
class ActivationChain:
    """Nodes (ids, in order) from the layer output to ``output_name``; empty = identity."""

    node_ids: tuple[int, ...]
    output_name: str
    side_inputs: tuple[str, ...]
    description: str
    nonlinear: bool

    @property
    def is_identity(self) -> bool:
        return not self.node_ids


def find_chain(view: GraphView, layer_node: int, layer_output: str, channel_axis: int,
               output_rank: int | None) -> ActivationChain:
    """Follow single-consumer elementwise nodes from ``layer_output`` (see module docstring)."""
    ids: list[int] = []
    sides: list[str] = []
    parts: list[str] = []
    current = layer_output
    layer_descendants_guard = {layer_node}
    while True:
        pattern = _gated_pattern(view, current)
        if pattern:
            ids.extend(pattern[0])
            parts.append(pattern[1])
            current = view.nodes[pattern[0][-1]].output[0]
            return ActivationChain(tuple(ids), current, tuple(sides), "+".join(parts), True)
        index = view.sole_consumer(current)
        if index is None:
            break
        node = view.nodes[index]
        others = [name for name in node.input if name and name != current]
        if node.input and node.input[0] != current and node.op_type not in ("Add", "Mul"):
            break  # the layer output must be the data operand
        if node.op_type in NONLINEAR and all(view.is_constant(n) for n in others):
            if node.op_type == "PRelu" and not _per_channel(view, others[0], channel_axis, output_rank):
                break
            ids.append(index)
            parts.append(_describe(view, node))
            current = node.output[0]
            return ActivationChain(tuple(ids), current, tuple(sides), "+".join(parts), True)
        if node.op_type == "BatchNormalization" and len(node.output) == 1 and \
                all(view.is_constant(n) for n in others) and channel_axis == 1:
            ids.append(index)
            parts.append("BatchNormalization")
            current = node.output[0]
            continue
        if node.op_type in AFFINE_BINARY and len(others) == 1 and node.input[0] != node.input[1]:
            other = others[0]
            if view.is_constant(other):
                if not _per_channel(view, other, channel_axis, output_rank):
                    break
                if node.op_type in ("Sub", "Div") and node.input[0] != current:
                    break  # c - x and c / x are fine elementwise but keep the chain simple
                ids.append(index)
                parts.append(f"{node.op_type}(const)")
                current = node.output[0]
                continue
            if node.op_type == "Add" and not (view.ancestors([other]) & layer_descendants_guard) and \
                    _same_shape(view, other, current):
                ids.append(index)
                sides.append(other)
                parts.append("Add(residual)")
                current = node.output[0]
                continue
        break
    return ActivationChain(tuple(ids), current, tuple(sides), "+".join(parts) or "none", False)


def _gated_pattern(view: GraphView, tensor: str):
    """x -> {Sigmoid|HardSigmoid}(x) -> Mul(x, gate): SiLU / HardSwish written out."""
    users = view.consumers.get(tensor, [])
    if len(users) != 2 or tensor in view.output_names:
        return None
    gate = next((u for u in users if view.nodes[u].op_type in ("Sigmoid", "HardSigmoid")), None)
    mul = next((u for u in users if view.nodes[u].op_type == "Mul"), None)
    if gate is None or mul is None:
        return None
    gate_out = view.nodes[gate].output[0]
    if sorted(view.nodes[mul].input) != sorted([tensor, gate_out]):
        return None
    if view.consumers.get(gate_out, []) != [mul] or gate_out in view.output_names:
        return None
    name = "SiLU" if view.nodes[gate].op_type == "Sigmoid" else "HardSwish"
    return [gate, mul], name


def _per_channel(view: GraphView, const: str, channel_axis: int, output_rank: int | None) -> bool:
    """True when the constant varies at most along the channel axis of the layer output."""
    dims = tuple(view.initializers[const].dims)
    if all(d == 1 for d in dims):
        return True
    if output_rank is None or len(dims) > output_rank:
        return False
    aligned = (1,) * (output_rank - len(dims)) + dims
    axis = channel_axis % output_rank
    return all(d == 1 for i, d in enumerate(aligned) if i != axis)


def _same_shape(view: GraphView, a: str, b: str) -> bool:
    ta, tb = view.types.get(a), view.types.get(b)
    if ta is None or tb is None or ta.shape is None or tb.shape is None:
        return True  # checked again on real tensors when sampling
    if len(ta.shape) != len(tb.shape):
        return False
    return all(x == y or not isinstance(x, int) or not isinstance(y, int) for x, y in zip(ta.shape, tb.shape))


def _describe(view: GraphView, node) -> str:
    if node.op_type == "Clip":
        bounds = []
        for slot in (1, 2):
            if slot < len(node.input) and node.input[slot] and view.is_constant(node.input[slot]):
                bounds.append(f"{float(view.constant(node.input[slot])):g}")
        for attr in node.attribute:
            if attr.name in ("min", "max"):
                bounds.append(f"{attr.f:g}")
        return f"Clip[{','.join(bounds)}]" if bounds else "Clip"
    return node.op_type
