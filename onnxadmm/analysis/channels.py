"""Coupled channel groups: the sets of channels that must be removed together (Torch-Pruning's
dependency groups, on ONNX nodes).

A group starts at a layer's output channels and is closed under the graph's couplings:
  * per-channel nodes pass the channel through (activations, BatchNormalization, pooling, per-channel
    constant Add/Sub/Mul/Div, PRelu, Dropout/Identity, depthwise Conv with one filter per channel);
  * an elementwise op of two computed tensors (a residual ``Add``, a gate ``Mul``) ties both operands,
    so every producer of every operand loses the same channel indices;
  * a Conv (group = 1), Gemm or MatMul reading the channels is a *consumer*: it loses the matching input
    columns (kh·kw per channel for a Conv; a contiguous range of H·W features per channel when a
    Flatten/Reshape to [N, C·H·W] sits in between);
  * a Concat on the channel axis places the group at an offset of a wider tensor (other groups fill the
    rest); per-channel nodes and consumers past it touch only that range.
Every tensor of a group has a *place* (offset, space): its channels are [offset, offset + C) of the
tensor's ``space`` channels. Anything else touching the channels (Split, Slice, Pad, Gather, Transpose,
Reshape to other shapes, grouped Conv, an elementwise op of two concatenated tensors, a graph output, ...)
declines the whole group with the node named: its channels stay, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import helper

from ..onnxio.graph import GraphView
from .layers import Layer

CHANNELWISE_UNARY = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
                     "Celu", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Identity", "Dropout",
                     "Neg", "Abs", "Erf", "Sqrt", "Exp", "Log", "Reciprocal", "Cast"}
SPATIAL_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclass(frozen=True)
class Consumer:
    """A layer reading the group's channels: group channel c is its input channel offset + c, i.e. the
    canonical columns [(offset + c)·width, (offset + c + 1)·width) of its ``space`` channels."""

    layer: str
    node_index: int
    width: int  # canonical input columns per channel (kh·kw, or H·W after a Flatten, or 1)
    offset: int = 0
    space: int | None = None  # channels of the tensor it reads (None: the group's own count)


@dataclass
class ChannelGroup:
    """Channels tied together; ``declined`` holds the reason when they must stay."""

    name: str
    channels: int
    kind: str = "conv"  # "conv": channels on axis 1 of [N, C, ...]; "row": on the last axis
    producers: list[int] = field(default_factory=list)  # node ids whose output rows are the channels
    through: list[int] = field(default_factory=list)  # per-channel nodes (sliced along the channel)
    consumers: list[Consumer] = field(default_factory=list)
    tensors: set[str] = field(default_factory=set)  # tensors whose channel axis holds this group
    places: dict[int, tuple[int, int]] = field(default_factory=dict)  # through node -> (offset, space)
    declined: str | None = None

    def member_shares(self) -> dict[int, tuple[str, float]]:
        """For each member that computes: which side the group is on ("in" / "out"; a depthwise conv
        counts as "out": its MACs follow its channel count once) and the group's share of that side's
        channels (C / space after a Concat)."""
        shares = {index: ("out", 1.0) for index in self.producers}
        for index, (_, space) in self.places.items():
            shares.setdefault(index, ("out", self.channels / space))
        for consumer in self.consumers:
            shares[consumer.node_index] = ("in", self.channels / (consumer.space or self.channels))
        return shares

    @property
    def member_nodes(self) -> list[int]:
        return sorted({*self.producers, *self.through, *(c.node_index for c in self.consumers)})


class _Decline(Exception):
    pass


def find_channel_groups(view: GraphView, layers: list[Layer]) -> list[ChannelGroup]:
    """Every group started by a layer's output (each layer's output channels belong to one group)."""
    by_node = {layer.node_index: layer for layer in layers}
    groups: list[ChannelGroup] = []
    claimed: set[str] = set()
    for layer in sorted(layers, key=lambda l: view.order.index(l.node_index)):
        if layer.output_name in claimed:
            continue
        group = ChannelGroup(name=layer.name, channels=layer.out_features)
        try:
            _close(view, by_node, group, layer)
        except _Decline as reason:
            group.declined = str(reason)
        claimed |= group.tensors | {layer.output_name}
        claimed |= {view.nodes[i].output[0] for i in group.producers}
        if not group.declined and not group.consumers:
            group.declined = "no layer reads these channels (nothing to refit)"
        groups.append(group)
    return groups


def _axis_kind(layer: Layer) -> str:
    return "conv" if layer.op_type == "Conv" else "row"


def _close(view: GraphView, by_node: dict[int, Layer], group: ChannelGroup, start: Layer) -> None:
    """Grow ``group`` from ``start``'s output until every tensor's producer and readers are explained."""
    if start.op_type == "Conv" and start.groups != 1:
        raise _Decline(f"grouped Conv {start.name!r} (group={start.groups}) cannot lose output channels alone")
    group.kind = _axis_kind(start)
    walk = _Walk(view, by_node, group)
    walk.producers.add(start.node_index)
    walk.visit(start.output_name, (0, group.channels))
    while walk.pending:
        tensor, place = walk.pending.pop()
        if tensor in walk.places:
            if walk.places[tensor] != place:
                walk.reasons.append(f"tensor {tensor!r} holds the channels at two different offsets")
            continue
        walk.places[tensor] = place
        if tensor in view.output_names:
            walk.reasons.append(f"channels reach the graph output {tensor!r} (its shape must stay)")
        walk.attempt(walk.explain_producer, tensor, place)
        for index in view.consumers.get(tensor, []):
            if index not in walk.producers and index not in walk.through and index not in walk.consumers:
                walk.attempt(walk.explain_reader, tensor, place, index)
    group.producers = sorted(walk.producers, key=view.order.index)
    group.through = sorted(walk.through, key=view.order.index)
    group.places = dict(walk.through)
    group.consumers = sorted(walk.consumers.values(), key=lambda c: view.order.index(c.node_index))
    group.tensors = set(walk.places)
    if walk.reasons:
        reasons = walk.reasons
        raise _Decline(reasons[0] + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""))


class _Walk:
    """The state of one group's closure: members found so far, tensors to explain, and reasons to decline
    (exploration goes on past a decline, so a group is reported once, whole)."""

    def __init__(self, view: GraphView, by_node: dict[int, Layer], group: ChannelGroup):
        self.view, self.by_node, self.group, self.kind = view, by_node, group, group.kind
        self.producers: set[int] = set()
        self.through: dict[int, tuple[int, int]] = {}
        self.consumers: dict[int, Consumer] = {}
        self.places: dict[str, tuple[int, int]] = {}
        self.pending: list[tuple[str, tuple[int, int]]] = []
        self.reasons: list[str] = []

    def visit(self, tensor: str, place: tuple[int, int]) -> None:
        self.pending.append((tensor, place))

    def attempt(self, explain, *args) -> None:
        try:
            explain(*args)
        except _Decline as reason:
            self.reasons.append(str(reason))

    def pass_through(self, node, index: int, place: tuple[int, int]) -> bool:
        """A per-channel node joins the group with every computed operand (two computed operands only when
        the group fills the whole tensor: after a Concat the other operand's layout is unknown)."""
        operands = _channel_operands(self.view, node)
        if not _per_channel_node(self.view, node, self.kind, place[1]) or \
                (place[1] != self.group.channels and len(operands) != 1):
            return False
        self.through[index] = place
        for operand in operands:
            self.visit(operand, place)
        return True

    def explain_producer(self, tensor: str, place: tuple[int, int]) -> None:
        view, channels = self.view, self.group.channels
        index = view.producer.get(tensor)
        if index is None:
            raise _Decline(f"channels of {tensor!r} come from a graph input or constant")
        if index in self.producers or index in self.through:
            return
        node = view.nodes[index]
        layer = self.by_node.get(index)
        space = place[1]
        if layer is not None and _axis_kind(layer) == self.kind and node.output[0] == tensor:
            if layer.op_type == "Conv" and layer.groups != 1:
                if _is_depthwise(layer, space):
                    self.through[index] = place
                    self.visit(node.input[0], place)
                    return
                raise _Decline(f"grouped Conv {node.name!r} (group={layer.groups}) produces the channels")
            if place != (0, channels) or layer.out_features != channels:
                raise _Decline(f"{node.name!r} produces {layer.out_features} channels, the group has {channels} "
                               f"at offset {place[0]}")
            self.producers.add(index)
            return
        if self.pass_through(node, index, place):
            return
        raise _Decline(f"node {node.name!r} ({node.op_type}) produces the channels and is not understood for "
                       "channel pruning")

    def explain_reader(self, tensor: str, place: tuple[int, int], index: int) -> None:
        view = self.view
        node = view.nodes[index]
        layer = self.by_node.get(index)
        offset, space = place
        if layer is not None and node.input[0] == tensor and tensor not in node.input[1:]:
            if layer.op_type == "Conv":
                if self.kind != "conv":
                    raise _Decline(f"Conv {node.name!r} reads row features")
                if layer.groups == 1:
                    taps = layer.conv.kernel[0] * layer.conv.kernel[1]
                    self.consumers[index] = Consumer(layer.name, index, taps, offset, space)
                    return
                if _is_depthwise(layer, space):
                    self.through[index] = place
                    self.visit(node.output[0], place)
                    return
                raise _Decline(f"grouped Conv {node.name!r} (group={layer.groups}) reads the channels")
            if self.kind != "row" or layer.in_features != space:
                raise _Decline(f"{node.op_type} {node.name!r} reads the channels on an axis that is not its K")
            self.consumers[index] = Consumer(layer.name, index, 1, offset, space)
            return
        if node.op_type in ("Flatten", "Reshape") and self.kind == "conv":
            consumer = _flatten_into_layer(view, self.by_node, node, tensor, place)
            self.consumers[consumer.node_index] = consumer
            self.through[index] = place
            return
        if node.op_type == "Concat":
            self.through[index] = place
            self.visit(node.output[0], _concat_place(view, node, tensor, place, self.kind))
            return
        if self.pass_through(node, index, place):
            self.visit(node.output[0], place)
            return
        raise _Decline(f"node {node.name!r} ({node.op_type}) reads the channels and is not understood for "
                       "channel pruning")


def _concat_place(view: GraphView, node, tensor: str, place: tuple[int, int], kind: str) -> tuple[int, int]:
    """Where the group lands in a Concat's output: after the channels of the inputs before it."""
    axis = _attrs(node).get("axis")
    sizes = []
    for name in node.input:
        tensor_type = view.types.get(name)
        if tensor_type is None or tensor_type.shape is None:
            raise _Decline(f"Concat {node.name!r}: the shape of input {name!r} is unknown")
        rank = len(tensor_type.shape)
        channel_axis = 1 if kind == "conv" else rank - 1
        if axis is None or axis % rank != channel_axis:
            raise _Decline(f"Concat {node.name!r} joins on axis {axis}, not the channel axis")
        size = tensor_type.shape[channel_axis]
        if not isinstance(size, int):
            raise _Decline(f"Concat {node.name!r}: input {name!r} has a dynamic channel count")
        sizes.append(size)
    if list(node.input).count(tensor) != 1:
        raise _Decline(f"Concat {node.name!r} reads the channels twice")
    position = list(node.input).index(tensor)
    if sizes[position] != place[1]:
        raise _Decline(f"Concat {node.name!r}: input {tensor!r} has {sizes[position]} channels, expected {place[1]}")
    return sum(sizes[:position]) + place[0], sum(sizes)


def _is_depthwise(layer: Layer, channels: int) -> bool:
    """One filter per channel: group = Cin = Cout."""
    return layer.op_type == "Conv" and layer.groups == layer.out_features == channels and \
        layer.in_features == layer.conv.kernel[0] * layer.conv.kernel[1]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _per_channel_node(view: GraphView, node, kind: str, channels: int) -> bool:
    """True when ``node`` maps channel c of its data operands (``channels`` wide) to channel c of its output."""
    op = node.op_type
    if len(node.output) != 1 and op not in ("Dropout", "BatchNormalization"):
        return False
    if op == "Dropout" and len([o for o in node.output if o]) > 1:
        return False
    others = [n for n in node.input[1:] if n]
    if op in CHANNELWISE_UNARY:
        return all(view.is_constant(n) and int(np.prod(view.initializers[n].dims)) == 1 for n in others)
    if op in SPATIAL_POOLS:
        return kind == "conv"
    if op == "BatchNormalization":
        return kind == "conv" and all(view.is_constant(n) for n in others) and \
            len([o for o in node.output if o]) == 1
    if op == "PRelu":
        return view.is_constant(node.input[1]) and _broadcasts(view, node.input[1], kind, channels,
                                                               node.input[0])
    if op in ELEMENTWISE_BINARY and len(node.input) == 2:
        a, b = node.input
        constants = [n for n in (a, b) if view.is_constant(n)]
        if len(constants) == 1:
            data = a if b in constants else b
            return _broadcasts(view, constants[0], kind, channels, data) and (op in ("Add", "Mul") or
                                                                                b in constants)
        if not constants:
            return _same_channels(view, a, b, kind)
    return False


def _channel_operands(view: GraphView, node) -> list[str]:
    """The computed operands of a per-channel node (they carry the same channels)."""
    if node.op_type in ELEMENTWISE_BINARY:
        return [n for n in node.input if n and not view.is_constant(n)]
    return [node.input[0]]


def _broadcasts(view: GraphView, const: str, kind: str, channels: int, data: str) -> bool:
    """A constant that is a scalar or varies only along the channel axis of ``data``."""
    dims = list(view.initializers[const].dims)
    if int(np.prod(dims)) == 1:
        return True
    if kind == "row":
        return len(dims) >= 1 and dims[-1] == channels and all(d == 1 for d in dims[:-1])
    data_type = view.types.get(data)
    if data_type is None or data_type.shape is None:
        return False
    from_end = len(data_type.shape) - 1  # axis 1 of the data, counted from the end (right-aligned)
    if len(dims) < from_end:
        return False  # a short constant broadcasts on the trailing (spatial) axes, not the channels
    axis = len(dims) - from_end
    return dims[axis] == channels and all(d == 1 for i, d in enumerate(dims) if i != axis)


def _same_channels(view: GraphView, a: str, b: str, kind: str) -> bool:
    """Two computed operands with the same channel count at the channel axis (no channel broadcast)."""
    ta, tb = view.types.get(a), view.types.get(b)
    if ta is None or tb is None or ta.shape is None or tb.shape is None or len(ta.shape) != len(tb.shape):
        return False
    axis = 1 if kind == "conv" else len(ta.shape) - 1
    ca, cb = ta.shape[axis], tb.shape[axis]
    return isinstance(ca, int) and ca == cb and ca > 1


def _flatten_into_layer(view: GraphView, by_node, node, tensor: str, place: tuple[int, int]) -> Consumer:
    """Flatten(axis=1) or Reshape to [N, -1] of an [N, C, H, W] tensor feeding one Gemm/MatMul."""
    shape = view.types.get(tensor).shape if view.types.get(tensor) else None
    if shape is None or len(shape) < 2 or any(not isinstance(d, int) for d in shape[1:]):
        raise _Decline(f"{node.op_type} {node.name!r}: the shape of {tensor!r} is not static")
    if node.op_type == "Flatten" and _attrs(node).get("axis", 1) != 1:
        raise _Decline(f"Flatten {node.name!r} with axis != 1")
    if node.op_type == "Reshape":
        if not view.is_constant(node.input[1]):
            raise _Decline(f"Reshape {node.name!r} has a computed shape")
        target = [int(v) for v in view.constant(node.input[1]).reshape(-1)]
        features = int(np.prod(shape[1:]))
        if len(target) != 2 or target[1] not in (-1, features) or target == [-1, -1] or \
                (target[0] not in (0, -1) and target[1] == -1):
            raise _Decline(f"Reshape {node.name!r} to {target} is not a flatten to [N, C·H·W]")
        if _attrs(node).get("allowzero", 0):
            raise _Decline(f"Reshape {node.name!r} with allowzero=1")
    users = view.consumers.get(node.output[0], [])
    if len(users) != 1 or node.output[0] in view.output_names:
        raise _Decline(f"the output of {node.op_type} {node.name!r} has several readers")
    layer = by_node.get(users[0])
    width = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    offset, space = place
    if layer is None or layer.op_type == "Conv" or view.nodes[users[0]].input[0] != node.output[0] or \
            layer.in_features != space * width:
        raise _Decline(f"{node.op_type} {node.name!r} does not feed a Gemm/MatMul layer with K = C·H·W")
    return Consumer(layer.name, users[0], width, offset, space)
