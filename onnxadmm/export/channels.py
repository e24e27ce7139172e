"""Physically remove channels: slice every member of each pruned group in (a copy of) the graph.

For the removed group channels R, each tensor of the group loses the positions its ``Place`` gives them
(R ∩ [lo, hi) shifted to the tensor's offset), and each member follows its tensors:
  producers   Conv W[K], B[K]; Gemm W[K, :] (transB) or W[:, K]; MatMul W[:, K]; bias[K]
  through     BatchNormalization scale/B/mean/var[K]; a grouped Conv with Cin = Cout (depthwise: blocks of
              one) W[K], B[K] and group = |K| / block, K whole blocks;
              per-channel constants of Add/Sub/Mul/Div/PRelu sliced on their channel axis;
              Reshape to [N, C·H·W] gets |K|·H·W when the size is explicit;
              Split sizes, channel-Slice bounds and channel-Pad widths shrink by the removed positions
              they cover (a removed pad channel is a narrower pad);
              attention heads: the Reshape constants holding the head count (and the merged width) lose
              the removed heads (channels)
  consumers   Conv W[:, K]; Gemm/MatMul the input columns of K (H·W consecutive columns per channel
              after a Flatten)
A constant that other nodes also read is copied before slicing. Value-info of the sliced tensors is
dropped (shape inference recomputes it); graph inputs and outputs are never in a group.
"""

from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import onnx

from ..analysis.channels import ChannelGroup
from ..analysis.movers import MOVERS, channel_pieces
from ..onnxio.graph import FreshNames, GraphView, attribute
from ..onnxio.load import default_opset
from ..onnxio.normalize import infer_types
from .apply import write_initializers


def columns_of(channels: np.ndarray, width: int) -> np.ndarray:
    """Input columns of the given channels: channel c owns [c·width, (c+1)·width)."""
    return (np.asarray(channels)[:, None] * width + np.arange(width)[None, :]).reshape(-1)


class _Slicer:
    """Collects, per (node, input slot), the indices to delete along one axis — from every group, so a
    tensor several groups share (after a Concat) is cut once — then writes the new initializers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.view = GraphView(model, infer_types(model, data_prop=False))
        self.fresh = FreshNames(model.graph)
        self.cuts: dict[tuple[int, int, int], set[int]] = {}  # (node, slot, axis) -> indices
        self.group_cuts: dict[int, int] = {}  # grouped conv -> groups removed
        self.reshape_cuts: dict[int, int] = {}  # Reshape -> features removed
        self.removed: dict[str, set[int]] = {}  # tensor -> removed channel positions (every group)
        self.movers: dict[int, str] = {}  # Split / Slice / Pad node on the channel axis -> group kind
        self.shape_edits: dict[tuple[int, int], dict[int, int]] = {}  # (node, slot) -> {element: decrease}

    def cut(self, node_index: int, slot: int, axis: int, indices) -> None:
        node = self.view.nodes[node_index]
        if slot >= len(node.input) or not node.input[slot]:
            return
        array_shape = self.view.initializers[node.input[slot]].dims
        if int(np.prod(array_shape)) == 1:
            return  # a scalar broadcasts over any width
        key = (node_index, slot, axis % len(array_shape))  # a layer may lose rows and columns
        self.cuts[key] = self.cuts.get(key, set()) | {int(i) for i in indices}

    def write(self) -> None:
        graph, view = self.model.graph, self.view
        values: dict[str, np.ndarray] = {}
        for (node_index, slot, axis), indices in sorted(self.cuts.items()):
            node = view.nodes[node_index]
            name = node.input[slot]
            if name not in values and len(view.consumers.get(name, [])) > 1:
                name = self._new_constant(f"{name}__onnxadmm_{node.name}_{slot}", view.constant(name), values)
                node.input[slot] = name
            array = values[name] if name in values else view.constant(name)
            values[name] = np.delete(array, sorted(indices), axis=axis)
        for node_index, removed in self.group_cuts.items():
            for attr in view.nodes[node_index].attribute:
                if attr.name == "group":
                    attr.i -= removed
        for node_index, removed in self.reshape_cuts.items():
            node = view.nodes[node_index]
            target = view.constant(node.input[1]).copy()
            if target[1] > 0:
                target[1] -= removed
                node.input[1] = self._new_constant(f"{node.input[1]}__onnxadmm_{node.name}", target, values)
        for node_index, kind in self.movers.items():
            node = view.nodes[node_index]
            MOVERS[node.op_type].narrow(view, node, kind, self._removed(node.input[0]), self._removed(node.output[0]),
                                        self.opset, lambda base, value: self._new_constant(base, value, values))
        for (node_index, slot), decreases in self.shape_edits.items():  # always a private copy
            node = view.nodes[node_index]
            target = view.constant(node.input[slot]).copy()
            flat = target.reshape(-1)
            for element, decrease in decreases.items():
                flat[element] -= decrease
            node.input[slot] = self._new_constant(f"{node.input[slot]}__onnxadmm_{node.name}_{slot}", target, values)
        write_initializers(graph, values)

    def _removed(self, tensor: str) -> np.ndarray:
        """The removed positions of ``tensor`` (every group), sorted."""
        return np.array(sorted(self.removed.get(tensor, ())), dtype=np.int64)

    def _new_constant(self, base: str, value: np.ndarray, values: dict[str, np.ndarray]) -> str:
        fresh = self.fresh.name(base)
        values[fresh] = value
        return fresh

    @property
    def opset(self) -> int:
        return default_opset(self.model)


def slice_channels(model: onnx.ModelProto, groups: list[ChannelGroup], keep: Mapping[str, np.ndarray]
                   ) -> onnx.ModelProto:
    """A copy of ``model`` with, for each group, only the channels where ``keep[group.name]`` is True."""
    out = copy.deepcopy(model)
    slicer = _Slicer(out)
    view = slicer.view
    dropped: set[str] = set()
    for group in groups:
        mask = np.asarray(keep[group.name], bool)
        if mask.all():
            continue
        removed = np.flatnonzero(~mask)
        for tensor, place in group.places.items():
            slicer.removed.setdefault(tensor, set()).update(int(p) for p in place.positions(removed))
        for index in group.producers:
            _cut_producer(slicer, index, group.places[view.nodes[index].output[0]].positions(removed))
        for index in group.through:
            _cut_through(slicer, index, group, removed)
        for consumer in group.consumers:
            _cut_consumer(slicer, consumer.node_index, consumer.place.positions(removed), consumer.width)
        for edit in set(group.shape_edits):
            decreases = slicer.shape_edits.setdefault((edit.node, edit.slot), {})
            decreases[edit.element] = decreases.get(edit.element, 0) + len(removed) // edit.per_unit
        dropped |= set(group.places) | set(group.reshaped)
        dropped |= {name for i in group.through for name in view.nodes[i].output}
    slicer.write()
    kept_info = [v for v in out.graph.value_info if v.name not in dropped]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    return out


def _cut_producer(slicer: _Slicer, index: int, removed: np.ndarray) -> None:
    node = slicer.view.nodes[index]
    if node.op_type == "Conv":
        slicer.cut(index, 1, 0, removed)
    elif node.op_type == "Gemm":
        slicer.cut(index, 1, 0 if attribute(node, "transB", 0) else 1, removed)
    else:  # MatMul: x @ W, W (K, N)
        slicer.cut(index, 1, 1, removed)
    slicer.cut(index, 2, -1, removed)


def _cut_consumer(slicer: _Slicer, index: int, removed: np.ndarray, width: int) -> None:
    node = slicer.view.nodes[index]
    if node.op_type == "Conv":  # W (Cout, Cin, kh, kw): the kh·kw columns of a channel are its kernel
        slicer.cut(index, 1, 1, removed)
        return
    cols = columns_of(removed, width)
    if node.op_type == "Gemm":
        slicer.cut(index, 1, 1 if attribute(node, "transB", 0) else 0, cols)
    else:
        slicer.cut(index, 1, 0, cols)


def _cut_through(slicer: _Slicer, index: int, group: ChannelGroup, channels: np.ndarray) -> None:
    view = slicer.view
    node = view.nodes[index]
    op = node.op_type
    kind = group.kind
    place = group.places.get(node.output[0]) or group.places[node.input[0]]
    removed = place.positions(channels)
    if op in MOVERS:  # new sizes / bounds / pad widths, written once every group's cuts are known
        if channel_pieces(view, node, kind) is not None:
            slicer.movers[index] = kind
        return
    if op == "Conv":  # grouped, Cin = Cout: whole blocks of Cout/group filters go, and their groups
        block = view.initializers[node.input[1]].dims[0] // attribute(node, "group", 1)
        slicer.cut(index, 1, 0, removed)
        slicer.cut(index, 2, 0, removed)
        slicer.group_cuts[index] = slicer.group_cuts.get(index, 0) + len(removed) // block
    elif op == "BatchNormalization" or op in ELEMENTWISE:
        for slot, axis in per_channel_constants(view, index, kind):
            slicer.cut(index, slot, axis, removed)
    elif op == "Reshape":  # its output is not a group tensor: ``removed`` are its input's positions
        shape = view.types[node.input[0]].shape
        slicer.reshape_cuts[index] = slicer.reshape_cuts.get(index, 0) + len(removed) * int(np.prod(shape[2:]))


ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "PRelu")  # their constant operands may be per channel


def per_channel_constants(view: GraphView, index: int, kind: str) -> list[tuple[int, int]]:
    """(input slot, channel axis) of every constant a channel-preserving node reads per channel — what
    removing channels cuts and reordering them permutes: BatchNormalization's scale, B, mean and var; an
    elementwise op's non-scalar constant operands."""
    node = view.nodes[index]
    if node.op_type == "BatchNormalization":
        return [(slot, 0) for slot in range(1, 5)]
    if node.op_type not in ELEMENTWISE:
        return []
    found = []
    for slot, name in enumerate(node.input):
        if name and view.is_constant(name):
            axis = channel_axis_of_constant(view.initializers[name], kind, view, node)
            if axis is not None:
                found.append((slot, axis))
    return found


def channel_axis_of_constant(tensor: onnx.TensorProto, kind: str, view: GraphView, node) -> int | None:
    """Axis of a per-channel constant that holds the channels (None for a scalar): the last axis for
    row features; for [N, C, ...] data the axis aligned (right-justified broadcast) with axis 1."""
    ndim = len(tensor.dims)
    if int(np.prod(tensor.dims)) == 1:
        return None
    if kind == "row":
        return ndim - 1
    data = next(n for n in node.input if n and not view.is_constant(n))
    rank = len(view.types[data].shape)
    return ndim - (rank - 1)
