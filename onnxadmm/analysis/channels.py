"""Coupled channel groups: the sets of channels that must be removed together (Torch-Pruning's
dependency groups, on ONNX nodes).

A group has C *group channels*. Every tensor that holds some of them has a ``Place``: group channels
[lo, hi) sit at positions [offset, offset + hi − lo) of the tensor's ``space`` channels. A group starts at
a layer's output channels and is closed under the graph's couplings:
  * per-channel nodes pass the channels through (activations, BatchNormalization, pooling, per-channel
    constant Add/Sub/Mul/Div, PRelu, Dropout/Identity, a Slice or Pad on spatial axes only, a depthwise
    Conv with one filter per channel);
  * a grouped Conv with as many output as input channels ties them block by block: its output block g is
    computed from its input block g alone, so a block (Cin/group channels) passes through it whole, and
    the group's channels are removed in whole aligned blocks (``ChannelGroup.block``) — the conv then
    keeps fewer groups of the same size;
  * an elementwise op of two computed tensors (a residual ``Add``, a gate ``Mul``) ties both operands,
    so every producer of every operand loses the same channels;
  * a Conv (group = 1), Gemm or MatMul reading the channels is a *consumer*: it loses the matching input
    columns (kh·kw per channel for a Conv; a contiguous range of H·W features per channel when a
    Flatten/Reshape to [N, C·H·W] sits in between);
  * Concat, Split, a Slice on the channel axis (step 1) and a zero Pad on the channel axis move channels
    to other positions of a wider or narrower tensor: their places follow the offsets.
When a tensor holding only part of a group meets a wider tensor it must stay aligned with (the CIFAR
ResNets' option-A shortcut: ``Slice`` + channel ``Pad`` into a residual ``Add`` with a wider conv; a
``Split`` of one conv's output), the group is restarted from the wider tensor's producer, so the narrow
stream's channels become a sub-range [lo, hi) of the wide one's: removing wide channel c removes narrow
channel c − lo with it, and a removed pad channel shrinks the pad.
Anything else touching the channels (Gather, Transpose, Reshape to other shapes, a grouped Conv whose
output and input channel counts differ, a graph output, ...) declines the whole group with the node named:
its channels stay, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..onnxio.graph import GraphView, attributes
from .layers import Layer
from .movers import MOVERS, Decline, Piece, channel_pieces

CHANNELWISE_UNARY = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
                     "Celu", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Identity", "Dropout",
                     "Neg", "Abs", "Erf", "Sqrt", "Exp", "Log", "Reciprocal", "Cast"}
SPATIAL_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclass(frozen=True)
class Place:
    """Group channels [lo, hi) sit at positions [offset, offset + hi − lo) of a tensor of ``space`` channels."""

    lo: int
    hi: int
    offset: int
    space: int

    @property
    def count(self) -> int:
        return self.hi - self.lo

    @property
    def whole(self) -> bool:
        """The tensor holds group channels only."""
        return self.count == self.space

    def positions(self, channels) -> np.ndarray:
        """Tensor positions of those of the given group channels that this tensor holds."""
        channels = np.asarray(channels, dtype=np.int64)
        return self.offset + channels[(channels >= self.lo) & (channels < self.hi)] - self.lo

    def narrowed(self, start: int, stop: int) -> Place | None:
        """The part at positions [start, stop), as a place in a tensor of stop − start channels (None: no
        group channel there)."""
        first, last = max(start, self.offset), min(stop, self.offset + self.count)
        if first >= last:
            return None
        return Place(self.lo + first - self.offset, self.lo + last - self.offset, first - start, stop - start)

    def widened(self, start: int, space: int) -> Place:
        """This tensor seen at positions [start, start + self.space) of a tensor of ``space`` channels."""
        return Place(self.lo, self.hi, self.offset + start, space)


def full_place(channels: int) -> Place:
    return Place(0, channels, 0, channels)


@dataclass(frozen=True)
class Consumer:
    """A layer reading group channels: group channel c of ``place`` is its input channel
    place.offset + c − place.lo, i.e. the canonical columns [j·width, (j + 1)·width) of that channel j."""

    layer: str
    node_index: int
    width: int  # canonical input columns per channel (kh·kw, or H·W after a Flatten, or 1)
    place: Place


@dataclass(frozen=True)
class ShapeEdit:
    """A shape constant that counts the group's channels in units: element ``element`` of the initializer at
    input ``slot`` of node ``node`` loses removed / ``per_unit`` (attention heads: a Reshape's head count,
    one per ``head_dim`` channels removed; the merged width, one per channel)."""

    node: int
    slot: int
    element: int
    per_unit: int


@dataclass
class ChannelGroup:
    """Channels tied together; ``declined`` holds the reason when they must stay."""

    name: str
    channels: int
    kind: str = "conv"  # "conv": channels on axis 1 of [N, C, ...]; "row": on the last axis
    producers: list[int] = field(default_factory=list)  # node ids whose output rows are group channels
    through: list[int] = field(default_factory=list)  # per-channel nodes and channel movers
    consumers: list[Consumer] = field(default_factory=list)
    places: dict[str, Place] = field(default_factory=dict)  # every tensor holding group channels
    members: dict[int, tuple[str, Place]] = field(default_factory=dict)  # node -> (side, place of that side)
    declined: str | None = None
    block: int = 1  # channels are removed in whole aligned blocks of this many (grouped convs they pass)
    shape_edits: list[ShapeEdit] = field(default_factory=list)  # shape constants counting the channels
    reshaped: list[str] = field(default_factory=list)  # other tensors whose shape changes (attention heads)

    @property
    def uniform(self) -> bool:
        """Every member holds all C channels: how many are removed decides every member's width, not which."""
        return all(place.count == self.channels for _, place in self.members.values())

    @property
    def member_nodes(self) -> list[int]:
        return sorted(self.members)


def find_channel_groups(view: GraphView, layers: list[Layer]) -> list[ChannelGroup]:
    """Every group started by a layer's output (each layer's output channels belong to one group)."""
    by_node = {layer.node_index: layer for layer in layers}
    groups: list[ChannelGroup] = []
    claimed: set[str] = set()
    for layer in sorted(layers, key=lambda l: view.order.index(l.node_index)):
        if layer.output_name in claimed:
            continue
        group = _grown_group(view, by_node, layer, claimed)
        claimed |= set(group.places) | {layer.output_name}
        if not group.declined and not group.consumers:
            group.declined = "no layer reads these channels (nothing to refit)"
        groups.append(group)
    return groups


def _grown_group(view: GraphView, by_node: dict[int, Layer], start: Layer, claimed: set[str]) -> ChannelGroup:
    """The closed group of ``start``'s channels; when they turn out to be part of a wider tensor, the group
    of that tensor's producer instead (it contains them)."""
    tried = {start.node_index}
    while True:
        group = ChannelGroup(name=start.name, channels=start.out_features)
        wider = _close(view, by_node, group, start)
        if wider is None:
            return group
        tensor, space = wider
        seed = _seed_layer(view, by_node, tensor, space, group.kind)
        if seed is None or seed.node_index in tried or seed.output_name in claimed:
            group.declined = (f"channels join the wider tensor {tensor!r}, and no layer producing all of its "
                              f"{space} channels was found")
            return group
        tried.add(seed.node_index)
        start = seed


def _seed_layer(view: GraphView, by_node: dict[int, Layer], tensor: str, space: int, kind: str,
                depth: int = 0) -> Layer | None:
    """A layer whose output carries all ``space`` channels of ``tensor`` unchanged (back through per-channel
    nodes and both operands of elementwise ones)."""
    index = view.producer.get(tensor)
    if index is None or depth > 64:
        return None
    node, layer = view.nodes[index], by_node.get(index)
    if layer is not None and node.output[0] == tensor:
        if layer.op_type == "Conv" and layer.groups != 1:
            return _seed_layer(view, by_node, node.input[0], space, kind, depth + 1) \
                if _block_of(layer, space) else None
        return layer if layer.out_features == space else None
    try:
        if not _per_channel_node(view, node, kind, space):
            return None
    except Decline:
        return None
    for operand in _channel_operands(view, node):
        found = _seed_layer(view, by_node, operand, space, kind, depth + 1)
        if found is not None:
            return found
    return None


def _axis_kind(layer: Layer) -> str:
    return "conv" if layer.op_type == "Conv" else "row"


def _close(view: GraphView, by_node: dict[int, Layer], group: ChannelGroup, start: Layer
           ) -> tuple[str, int] | None:
    """Grow ``group`` from ``start``'s output until every tensor's producer and readers are explained.
    Returns (tensor, channels) instead when the group is part of that wider tensor (restart from there)."""
    if start.op_type == "Conv" and start.groups != 1:
        group.declined = f"grouped Conv {start.name!r} (group={start.groups}) cannot lose output channels alone"
        return None
    group.kind = _axis_kind(start)
    walk = _Walk(view, by_node, group)
    walk.producers[start.node_index] = full_place(group.channels)
    walk.visit(start.output_name, full_place(group.channels))
    while walk.pending and walk.wider is None:
        tensor, place = walk.pending.pop()
        if tensor in walk.places:
            if walk.places[tensor] != place:
                walk.reasons.append(f"tensor {tensor!r} holds the channels at two different places")
            continue
        walk.places[tensor] = place
        if tensor in view.output_names:
            walk.reasons.append(f"channels reach the graph output {tensor!r} (its shape must stay)")
        walk.attempt(walk.explain_producer, tensor, place)
        for index in view.consumers.get(tensor, []):
            if index in walk.through and view.nodes[index].op_type in MOVERS:
                walk.attempt(walk.check_mover, tensor, place, index)
            elif index not in walk.producers and index not in walk.through and index not in walk.consumers:
                walk.attempt(walk.explain_reader, tensor, place, index)
    if walk.wider is not None:
        return walk.wider
    order = view.order.index
    group.producers = sorted(walk.producers, key=order)
    group.through = sorted(walk.through, key=order)
    group.consumers = sorted(walk.consumers.values(), key=lambda c: order(c.node_index))
    group.places = dict(walk.places)
    group.members = {**{i: ("out", p) for i, p in walk.producers.items()},
                     **{i: ("out", p) for i, p in walk.through.items()},
                     **{c.node_index: ("in", c.place) for c in group.consumers}}
    if walk.reasons:
        reasons = walk.reasons
        group.declined = reasons[0] + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "")
    return None


class _Walk:
    """The state of one group's closure: members found so far, tensors to explain, and reasons to decline
    (exploration goes on past a decline, so a group is reported once, whole)."""

    def __init__(self, view: GraphView, by_node: dict[int, Layer], group: ChannelGroup):
        self.view, self.by_node, self.group, self.kind = view, by_node, group, group.kind
        self.producers: dict[int, Place] = {}
        self.through: dict[int, Place] = {}
        self.consumers: dict[int, Consumer] = {}
        self.places: dict[str, Place] = {}
        self.pending: list[tuple[str, Place]] = []
        self.reasons: list[str] = []
        self.wider: tuple[str, int] | None = None  # a wider tensor the group turned out to be part of

    def visit(self, tensor: str, place: Place) -> None:
        self.pending.append((tensor, place))

    def attempt(self, explain, *args) -> None:
        try:
            explain(*args)
        except Decline as reason:
            self.reasons.append(str(reason))

    def pass_through(self, node, index: int, place: Place) -> bool:
        """A per-channel node joins the group with its computed operands and its output. Two computed
        operands (a residual Add) must hold the same channels: if the group fills only part of them, the
        group is the wider tensor's."""
        if not _per_channel_node(self.view, node, self.kind, place.space):
            return False
        operands = _channel_operands(self.view, node)
        if len(operands) > 1 and not place.whole:
            self.wider = (node.output[0], place.space)
            return True
        self.through[index] = place
        for operand in operands:
            self.visit(operand, place)
        self.visit(node.output[0], place)
        return True

    def block_through(self, index: int, layer: Layer, place: Place, role: str) -> None:
        """A grouped Conv (depthwise included) passes whole blocks of Cin/group channels: the group fills
        its input and output, aligned to its blocks, and is removed in blocks of (a multiple of) that size."""
        block = _block_of(layer, place.space)
        if not block:
            raise Decline(f"grouped Conv {layer.name!r} (group={layer.groups}) {role} the channels and has "
                           f"{layer.out_features} outputs for its inputs (its groups tie input and output channels "
                           "block by block, and only equal counts pass whole blocks through)")
        if (block > 1 or role == "reads") and (not place.whole or place.lo % block):
            raise Decline(f"grouped Conv {layer.name!r} (group={layer.groups}) {role} channels that do not fill "
                           f"its {'input' if role == 'reads' else 'output'} in whole blocks")
        group_block = int(np.lcm(self.group.block, block))
        if self.group.channels % group_block:
            raise Decline(f"grouped Conv {layer.name!r} (group={layer.groups}): the {self.group.channels} "
                           f"channels of the group are not whole blocks of {group_block}")
        self.group.block = group_block
        self.through[index] = place

    def move(self, node, index: int, tensor: str, place: Place) -> bool:
        """Concat / Split / channel Slice / channel Pad: each narrow tensor is positions [start, start + n)
        of the wide one; the place of every tensor of the node follows from the one known."""
        pieces = channel_pieces(self.view, node, self.kind)
        if pieces is None:
            return False
        wide, parts = _mover_places(pieces, tensor, place)
        self.through[index] = wide
        self.visit(pieces[0][1], wide)
        for narrow, part in parts.items():
            if part is not None:
                self.visit(narrow, part)
        return True

    def check_mover(self, tensor: str, place: Place, index: int) -> None:
        """A mover met again from another of its tensors (Concat(x, Relu(x))): that tensor's place must be
        the one the mover gives it, or the group's channels sit at two places of the wide tensor."""
        node = self.view.nodes[index]
        pieces = channel_pieces(self.view, node, self.kind)
        if pieces is None:  # a spatial Slice / Pad: per-channel, its tensors share one place
            return
        wide, parts = _mover_places(pieces, pieces[0][1], self.through[index])
        if (wide if tensor == pieces[0][1] else parts[tensor]) != place:
            raise Decline(f"{node.op_type} {node.name!r} holds the group's channels at two places")

    def explain_producer(self, tensor: str, place: Place) -> None:
        view = self.view
        index = view.producer.get(tensor)
        if index is None:
            raise Decline(f"channels of {tensor!r} come from a graph input or constant")
        if index in self.producers or index in self.through:
            return
        node = view.nodes[index]
        layer = self.by_node.get(index)
        if layer is not None and _axis_kind(layer) == self.kind and node.output[0] == tensor:
            if layer.op_type == "Conv" and layer.groups != 1:
                self.block_through(index, layer, place, "produces")
                self.visit(node.input[0], place)
                return
            if not place.whole:
                self.wider = (tensor, place.space)
                return
            self.producers[index] = place
            return
        if self.pass_through(node, index, place) or self.move(node, index, tensor, place):
            return
        raise Decline(f"node {node.name!r} ({node.op_type}) produces the channels and is not understood for "
                       "channel pruning")

    def explain_reader(self, tensor: str, place: Place, index: int) -> None:
        view = self.view
        node = view.nodes[index]
        layer = self.by_node.get(index)
        if layer is not None and node.input[0] == tensor and tensor not in node.input[1:]:
            if layer.op_type == "Conv":
                if self.kind != "conv":
                    raise Decline(f"Conv {node.name!r} reads row features")
                if layer.groups == 1:
                    self.consumers[index] = Consumer(layer.name, index, layer.taps, place)
                    return
                self.block_through(index, layer, place, "reads")
                self.visit(node.output[0], place)
                return
            if self.kind != "row" or layer.in_features != place.space:
                raise Decline(f"{node.op_type} {node.name!r} reads the channels on an axis that is not its K")
            self.consumers[index] = Consumer(layer.name, index, 1, place)
            return
        if node.op_type in ("Flatten", "Reshape") and self.kind == "conv":
            consumer = _flatten_into_layer(view, self.by_node, node, tensor, place)
            self.consumers[consumer.node_index] = consumer
            self.through[index] = place
            return
        if self.pass_through(node, index, place) or self.move(node, index, tensor, place):
            return
        raise Decline(f"node {node.name!r} ({node.op_type}) reads the channels and is not understood for "
                       "channel pruning")


def _mover_places(pieces: list[Piece], tensor: str, place: Place
                  ) -> tuple[Place, dict[str, Place | None]]:
    """Given ``tensor``'s place, the wide tensor's place and each narrow tensor's (None: none of the group)."""
    wide = next((place.widened(start, wide_space) for narrow, _, start, _, wide_space in pieces
                 if narrow == tensor), place)
    return wide, {narrow: wide.narrowed(start, start + count) for narrow, _, start, count, _ in pieces}


def _block_of(layer: Layer, channels: int) -> int:
    """Cin/group for a grouped Conv with Cin = Cout = ``channels`` (1: depthwise, one filter per channel),
    whose output block g depends on its input block g only; 0 for any other layer."""
    if layer.op_type != "Conv" or layer.groups < 2 or layer.out_features != channels or channels % layer.groups:
        return 0
    block = channels // layer.groups
    return block if layer.in_features == block * layer.taps else 0


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
    if op in ("Slice", "Pad"):
        return channel_pieces(view, node, kind) is None
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
    """Two computed operands with the same channel count at the channel axis (no channel broadcast). When
    shape inference knows neither shape (after an op it cannot infer, such as a contrib op), the operands
    are taken as the same channels: the walk then explains each operand's producer as a group member, back
    to the group's layers, or declines."""
    ta, tb = view.types.get(a), view.types.get(b)
    unknown = [t is None or t.shape is None for t in (ta, tb)]
    if all(unknown):
        return True
    if any(unknown) or len(ta.shape) != len(tb.shape):
        return False
    axis = 1 if kind == "conv" else len(ta.shape) - 1
    ca, cb = ta.shape[axis], tb.shape[axis]
    return isinstance(ca, int) and ca == cb and ca > 1


def _flatten_into_layer(view: GraphView, by_node, node, tensor: str, place: Place) -> Consumer:
    """Flatten(axis=1) or Reshape to [N, -1] of an [N, C, H, W] tensor feeding one Gemm/MatMul."""
    shape = view.types.get(tensor).shape if view.types.get(tensor) else None
    if shape is None or len(shape) < 2 or any(not isinstance(d, int) for d in shape[1:]):
        raise Decline(f"{node.op_type} {node.name!r}: the shape of {tensor!r} is not static")
    if node.op_type == "Flatten" and attributes(node).get("axis", 1) != 1:
        raise Decline(f"Flatten {node.name!r} with axis != 1")
    if node.op_type == "Reshape":
        if not view.is_constant(node.input[1]):
            raise Decline(f"Reshape {node.name!r} has a computed shape")
        target = [int(v) for v in view.constant(node.input[1]).reshape(-1)]
        features = int(np.prod(shape[1:]))
        if len(target) != 2 or target[1] not in (-1, features) or target == [-1, -1] or \
                (target[0] not in (0, -1) and target[1] == -1):
            raise Decline(f"Reshape {node.name!r} to {target} is not a flatten to [N, C·H·W]")
        if attributes(node).get("allowzero", 0):
            raise Decline(f"Reshape {node.name!r} with allowzero=1")
    users = view.consumers.get(node.output[0], [])
    if len(users) != 1 or node.output[0] in view.output_names:
        raise Decline(f"the output of {node.op_type} {node.name!r} has several readers")
    layer = by_node.get(users[0])
    width = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if layer is None or layer.op_type == "Conv" or view.nodes[users[0]].input[0] != node.output[0] or \
            layer.in_features != place.space * width:
        raise Decline(f"{node.op_type} {node.name!r} does not feed a Gemm/MatMul layer with K = C·H·W")
    return Consumer(layer.name, users[0], width, place)
