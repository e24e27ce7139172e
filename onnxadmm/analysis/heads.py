"""Attention heads as channel groups: the pattern of scaled dot-product attention on the ONNX graph.

    Q = x·W_q + b_q,  K = x·W_k + b_k,  V = x·W_v + b_v              (layers, [B, S, H·d])
    Q_h = Transpose(Reshape(Q, [B, S, H, d]))                         (same for K, V; K transposed for QKᵀ)
    P_h = Softmax(Q_h K_hᵀ · scale + mask)                            (per head)
    C   = Reshape(Transpose(P_h V_h), [B, S, H·d]);   out = C·W_o     (the consumer)

Head h is channels [h·d, (h + 1)·d) of Q, K, V and of C, and rows [h·d, (h + 1)·d) of W_o: removing it
removes those columns of W_q, W_k, W_v (and their biases) and those rows of W_o, and every other head computes
exactly what it did. So the group is C = H·d channels removed in whole blocks of d, with Q, K, V as its
producers, the bias Adds as per-channel members, W_o as the consumer, and the head counts H (and H·d)
held by the Reshape shape constants rewritten (``ShapeEdit``). The scale constant depends on d only and
stays. Anything else reading a tensor of the pattern (or a shape not given by constants) declines the
attention with the node named; the fused ``Attention`` / ``MultiHeadAttention`` contrib ops are not
recognized, and their Q/K/V projections stay whole.
"""

from __future__ import annotations

import os

import numpy as np

from ..onnxio.graph import GraphView, attribute
from .channels import ChannelGroup, Consumer, ShapeEdit, full_place
from .layers import Layer


FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention",
                   "GroupQueryAttention", "DecoderMaskedMultiHeadAttention"}


class _NoMatch(Exception):
    pass


def with_head_groups(view: GraphView, layers: list[Layer], groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """``groups`` with the groups started by Q, K and V projections (declined at the head Reshape) replaced
    by one group per recognized attention."""
    by_node = {layer.node_index: layer for layer in layers}
    heads = find_head_groups(view, by_node)
    replaced = {by_node[i].name for group in heads for i in group.producers}
    fused = [ChannelGroup(name=node.name, channels=0, kind="row",
                          declined=f"fused attention op {node.op_type} ({node.domain or 'ai.onnx'}): its heads are "
                                   "not pruned (compress the graph as exported, before onnxruntime's transformer "
                                   "optimizer fuses it)")
             for node in view.nodes if node.op_type in FUSED_ATTENTION]
    return [g for g in groups if g.name not in replaced] + heads + fused


def find_head_groups(view: GraphView, by_node: dict[int, Layer]) -> list[ChannelGroup]:
    """One group per recognized attention (a Softmax between two computed MatMuls); an attention that
    matches the pattern but cannot be pruned safely gives a declined group with the reason."""
    groups = []
    for index, node in enumerate(view.nodes):
        if node.op_type != "Softmax":
            continue
        try:
            groups.append(_attention(view, by_node, index))
        except _NoMatch:
            continue
    return groups


def _attention(view: GraphView, by_node: dict[int, Layer], softmax: int) -> ChannelGroup:
    region: set[str] = set()  # tensors whose shape holds the head count (value-info dropped on export)
    qk = _back_to_scores(view, view.nodes[softmax].input[0], region)
    pv = _only_reader(view, view.nodes[softmax].output[0], {"MatMul"}, skip={"Dropout", "Cast"}, region=region)
    if pv is None or view.nodes[pv].input[0] not in region | {view.nodes[softmax].output[0]}:
        raise _NoMatch
    region.add(view.nodes[softmax].output[0])
    q_reshape = _head_split(view, view.nodes[qk].input[0], ((0, 2, 1, 3),), region)
    k_reshape = _head_split(view, view.nodes[qk].input[1], ((0, 2, 3, 1), (0, 2, 1, 3, "T")), region)
    v_reshape = _head_split(view, view.nodes[pv].input[1], ((0, 2, 1, 3),), region)
    merge, consumer = _head_merge(view, by_node, view.nodes[pv].output[0], region)
    reasons: list[str] = []
    splits = [_split_shape(view, i, reasons) for i in (q_reshape, k_reshape, v_reshape)]
    heads_dims = {(h, d) for h, d, _ in splits if h}
    layer_o = by_node[consumer]
    channels = layer_o.in_features
    producers, through, places = [], [], {}
    for reshape in (q_reshape, k_reshape, v_reshape):
        try:
            layer_index, members = _projection(view, by_node, view.nodes[reshape].input[0], channels)
        except _Declined as reason:
            reasons.append(str(reason))
            continue
        producers.append(layer_index)
        through.extend(members)
        places[view.nodes[layer_index].output[0]] = full_place(channels)
        for member in members:
            places[view.nodes[member].output[0]] = full_place(channels)
    places[view.nodes[merge].output[0]] = full_place(channels)
    name = _common_prefix([view.nodes[i].name for i in (q_reshape, k_reshape, v_reshape)]) + "heads"
    group = ChannelGroup(name=name, channels=channels, kind="row")
    group.producers = sorted(producers, key=view.order.index)
    group.through = sorted(through, key=view.order.index)
    group.consumers = [Consumer(layer_o.name, consumer, 1, full_place(channels))]
    group.places = places
    group.members = {**{i: ("out", full_place(channels)) for i in group.producers + group.through},
                     consumer: ("in", full_place(channels))}
    group.reshaped = sorted(region)
    if len(heads_dims) != 1:
        reasons.append(f"the head Reshapes of {name!r} do not give one (heads, head size) from constants")
    else:
        heads, head_dim = heads_dims.pop()
        if heads * head_dim != channels:
            reasons.append(f"{heads} heads of {head_dim} do not make the {channels} inputs of {layer_o.name!r}")
        group.block = head_dim
        group.shape_edits = [edit for _, _, edit in splits if edit] + _merge_edit(view, merge, channels, reasons)
    if reasons:
        group.declined = reasons[0] + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "")
    return group


class _Declined(Exception):
    pass


def _perm(view: GraphView, index: int) -> tuple[int, ...]:
    node = view.nodes[index]
    return tuple(attribute(node, "perm", ()))


def _readers(view: GraphView, tensor: str) -> list[int]:
    """The nodes reading ``tensor``, apart from Shape nodes whose dims are only taken at batch/sequence
    positions (the exporter's way of reading B and S; the head axes are not read)."""
    readers = []
    for index in view.consumers.get(tensor, []):
        node = view.nodes[index]
        if node.op_type == "Shape" and _reads_leading_dims(view, index):
            continue
        readers.append(index)
    return readers


def _reads_leading_dims(view: GraphView, shape_index: int) -> bool:
    node = view.nodes[shape_index]
    if any(a.name in ("start", "end") for a in node.attribute):
        return False
    for index in view.consumers.get(node.output[0], []):
        gather = view.nodes[index]
        if gather.op_type != "Gather" or not view.is_constant(gather.input[1]):
            return False
        if np.any(~np.isin(view.constant(gather.input[1]), (0, 1))):
            return False
    return True


def _only_reader(view: GraphView, tensor: str, ops: set[str], skip: set[str] = frozenset(),
                 region: set[str] | None = None) -> int | None:
    """The single node of ``ops`` reading ``tensor``, through single-reader nodes of ``skip``."""
    while True:
        readers = _readers(view, tensor)
        if len(readers) != 1 or tensor in view.output_names:
            return None
        node = view.nodes[readers[0]]
        if node.op_type in ops:
            return readers[0]
        if node.op_type not in skip:
            return None
        if region is not None:
            region.add(tensor)
        tensor = node.output[0]


def _back_to_scores(view: GraphView, tensor: str, region: set[str]) -> int:
    """From the Softmax input back through the scale (Div/Mul by a scalar) and the mask Add to QKᵀ."""
    for _ in range(4):
        index = view.producer.get(tensor)
        if index is None:
            raise _NoMatch
        node = view.nodes[index]
        region.add(tensor)
        if node.op_type == "MatMul":
            if any(view.is_constant(n) for n in node.input):
                raise _NoMatch
            return index
        if node.op_type in ("Div", "Mul", "Add", "Sub", "Where", "Cast"):
            computed = [n for n in node.input if n and not view.is_constant(n)]
            scores = [n for n in computed if _leads_to_matmul(view, n)]
            if len(scores) != 1:
                raise _NoMatch
            tensor = scores[0]
            continue
        raise _NoMatch
    raise _NoMatch


def _leads_to_matmul(view: GraphView, tensor: str, depth: int = 0) -> bool:
    index = view.producer.get(tensor)
    if index is None or depth > 4:
        return False
    node = view.nodes[index]
    if node.op_type == "MatMul":
        return not any(view.is_constant(n) for n in node.input)
    if node.op_type in ("Div", "Mul", "Add", "Sub", "Cast"):
        return any(_leads_to_matmul(view, n, depth + 1) for n in node.input if n and not view.is_constant(n))
    return False


def _head_split(view: GraphView, tensor: str, perms, region: set[str]) -> int:
    """The Reshape [B, S, H·d] → [B, S, H, d] whose Transpose (``perms``; "T": a second Transpose swapping
    the last two axes) gives ``tensor``; returns the Reshape's index."""
    index = view.producer.get(tensor)
    if index is None or view.nodes[index].op_type != "Transpose":
        raise _NoMatch
    region.add(tensor)
    perm = _perm(view, index)
    if perm == (0, 1, 3, 2):  # K transposed after the head transpose
        if not any(len(p) == 5 for p in perms):
            raise _NoMatch
        inner = view.nodes[index].input[0]
        index = view.producer.get(inner)
        if index is None or view.nodes[index].op_type != "Transpose" or _perm(view, index) != (0, 2, 1, 3):
            raise _NoMatch
        if len(_readers(view, inner)) != 1:
            raise _NoMatch
        region.add(inner)
    elif perm not in [p for p in perms if len(p) == 4]:
        raise _NoMatch
    split = view.nodes[index].input[0]
    reshape = view.producer.get(split)
    if reshape is None or view.nodes[reshape].op_type != "Reshape" or len(_readers(view, split)) != 1:
        raise _NoMatch
    region.add(split)
    return reshape


def _head_merge(view: GraphView, by_node: dict[int, Layer], context: str, region: set[str]) -> tuple[int, int]:
    """Transpose [B, H, S, d] → [B, S, H, d], Reshape to [B, S, H·d], read by one layer as its input."""
    region.add(context)
    transpose = _only_reader(view, context, {"Transpose"})
    if transpose is None or _perm(view, transpose) != (0, 2, 1, 3):
        raise _NoMatch
    region.add(view.nodes[transpose].output[0])
    merge = _only_reader(view, view.nodes[transpose].output[0], {"Reshape"})
    if merge is None:
        raise _NoMatch
    merged = view.nodes[merge].output[0]
    consumer = _only_reader(view, merged, {"MatMul", "Gemm"})
    if consumer is None or consumer not in by_node or view.nodes[consumer].input[0] != merged:
        raise _NoMatch
    return merge, consumer


def _shape_constant(view: GraphView, reshape: int) -> tuple[list, list[tuple[int, int] | None]]:
    """The Reshape's target as values (None where computed) and, per entry, where it is stored:
    (input slot of the Reshape or of the Concat building it, element index)."""
    shape = view.nodes[reshape].input[1]
    if view.is_constant(shape):
        values = view.constant(shape).reshape(-1).tolist()
        return values, [(reshape, 1, i) for i in range(len(values))]
    concat = view.producer.get(shape)
    if concat is None or view.nodes[concat].op_type != "Concat":
        return [], []
    values, where = [], []
    for slot, part in enumerate(view.nodes[concat].input):
        if view.is_constant(part):
            array = view.constant(part).reshape(-1)
            values.extend(array.tolist())
            where.extend((concat, slot, i) for i in range(array.size))
        else:
            values.append(None)
            where.append(None)
    return values, where


def _split_shape(view: GraphView, reshape: int, reasons: list[str]):
    """(heads, head size, the edit of the head count) from a split Reshape's [B, S, H, d] target."""
    values, where = _shape_constant(view, reshape)
    name = view.nodes[reshape].name
    if len(values) != 4 or values[2] is None or values[3] is None or values[2] <= 0 or values[3] <= 0:
        reasons.append(f"Reshape {name!r}: the head count and size are not constants of a [B, S, H, d] shape")
        return 0, 0, None
    node, slot, element = where[2]
    return int(values[2]), int(values[3]), ShapeEdit(node, slot, element, int(values[3]))


def _merge_edit(view: GraphView, merge: int, channels: int, reasons: list[str]) -> list[ShapeEdit]:
    values, where = _shape_constant(view, merge)
    name = view.nodes[merge].name
    if len(values) != 3 or values[2] not in (channels, -1):
        reasons.append(f"Reshape {name!r}: the merged width is not a constant {channels} (or -1)")
        return []
    if values[2] == -1:
        return []
    node, slot, element = where[2]
    return [ShapeEdit(node, slot, element, 1)]


def _projection(view: GraphView, by_node: dict[int, Layer], tensor: str, channels: int) -> tuple[int, list[int]]:
    """Back from a head Reshape's input to the layer producing it, through per-channel constant Add/Mul/Div
    (the bias, a scale): (layer node, member nodes). Every tensor on the way must have one reader."""
    members = []
    for _ in range(4):
        index = view.producer.get(tensor)
        if index is None:
            raise _Declined(f"{tensor!r} does not come from a layer")
        if len(_readers(view, tensor)) != 1 or tensor in view.output_names:
            raise _Declined(f"{tensor!r} (the heads' input) is read by other nodes too")
        node = view.nodes[index]
        layer = by_node.get(index)
        if layer is not None and node.output[0] == tensor:
            if layer.out_features != channels or layer.op_type == "Conv":
                raise _Declined(f"{layer.name!r} gives {layer.out_features} channels, not {channels}")
            return index, members
        if node.op_type in ("Add", "Mul", "Div") and _per_channel_constant(view, node, channels):
            members.append(index)
            tensor = next(n for n in node.input if not view.is_constant(n))
            continue
        raise _Declined(f"node {node.name!r} ({node.op_type}) sits between a projection and its heads")
    raise _Declined(f"{tensor!r}: no projection layer found")


def _per_channel_constant(view: GraphView, node, channels: int) -> bool:
    constants = [n for n in node.input if view.is_constant(n)]
    if len(constants) != 1 or len(node.input) != 2:
        return False
    if node.op_type == "Div" and node.input[1] != constants[0]:
        return False
    dims = list(view.initializers[constants[0]].dims)
    return int(np.prod(dims)) == 1 or (dims[-1] == channels and all(d == 1 for d in dims[:-1]))


def _common_prefix(names: list[str]) -> str:
    prefix = os.path.commonprefix(names)
    return prefix[:prefix.rfind("/") + 1] if "/" in prefix else prefix
