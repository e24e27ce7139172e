"""Physically remove channels: slice every member of each pruned group in (a copy of) the graph.

For kept channels K of a group:
  producers   Conv W[K], B[K]; Gemm W[K, :] (transB) or W[:, K]; MatMul W[:, K]; bias[K]
  through     BatchNormalization scale/B/mean/var[K]; depthwise Conv W[K], B[K] and group = |K|;
              per-channel constants of Add/Sub/Mul/Div/PRelu sliced on their channel axis;
              Reshape to [N, C·H·W] gets |K|·H·W when the size is explicit
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
from onnx import helper, numpy_helper

from ..analysis.channels import ChannelGroup
from ..onnxio.graph import GraphView


def columns(keep: np.ndarray, width: int) -> np.ndarray:
    """Indices of the kept input columns: channel c owns [c·width, (c+1)·width)."""
    kept = np.flatnonzero(keep)
    return (kept[:, None] * width + np.arange(width)[None, :]).reshape(-1)


class _Slicer:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.view = GraphView(model, _inferred(model))
        self.values: dict[str, np.ndarray] = {}
        self.renamed: dict[tuple[int, int], str] = {}

    def value(self, name: str) -> np.ndarray:
        if name not in self.values:
            self.values[name] = self.view.constant(name)
        return self.values[name]

    def slice_input(self, node_index: int, slot: int, axis: int, index: np.ndarray) -> None:
        node = self.view.nodes[node_index]
        name = node.input[slot]
        if len(self.view.consumers.get(name, [])) > 1 and (node_index, slot) not in self.renamed:
            fresh = f"{name}__onnxadmm_{node.name}_{slot}"
            self.values[fresh] = self.value(name).copy()
            self.renamed[(node_index, slot)] = fresh
            node.input[slot] = fresh
            name = fresh
        array = self.value(name)
        if array.ndim == 0 or array.size == 1:
            return
        self.values[name] = np.take(array, index, axis=axis % array.ndim)

    def write(self) -> None:
        graph = self.model.graph
        existing = {t.name: i for i, t in enumerate(graph.initializer)}
        for name, array in self.values.items():
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
            if name in existing:
                graph.initializer[existing[name]].CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
        used = {n for node in graph.node for n in node.input}
        dead = [t for t in graph.initializer if t.name not in used and t.name not in
                {v.name for v in graph.output}]
        for tensor in dead:
            graph.initializer.remove(tensor)


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
        kept = np.flatnonzero(mask)
        for index in group.producers:
            _slice_producer(slicer, index, kept)
        for index in group.through:
            _slice_through(slicer, index, kept, group)
        for consumer in group.consumers:
            _slice_consumer(slicer, consumer.node_index, mask, consumer.width)
        dropped |= group.tensors
        dropped |= {view.nodes[i].output[0] for i in group.through}
    slicer.write()
    kept_info = [v for v in out.graph.value_info if v.name not in dropped]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    return out


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Shape inference for the ranks of per-channel operands (best effort)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the analysis already required the ranks it needs
        return None


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _slice_producer(slicer: _Slicer, index: int, kept: np.ndarray) -> None:
    node = slicer.view.nodes[index]
    if node.op_type == "Conv":
        slicer.slice_input(index, 1, 0, kept)
    elif node.op_type == "Gemm":
        slicer.slice_input(index, 1, 0 if _attr(node, "transB", 0) else 1, kept)
    else:  # MatMul: x @ W, W (K, N)
        slicer.slice_input(index, 1, 1, kept)
    if len(node.input) > 2 and node.input[2]:
        slicer.slice_input(index, 2, -1, kept)


def _slice_consumer(slicer: _Slicer, index: int, mask: np.ndarray, width: int) -> None:
    node = slicer.view.nodes[index]
    if node.op_type == "Conv":  # W (Cout, Cin, kh, kw): the kh·kw columns of a channel are its kernel
        slicer.slice_input(index, 1, 1, np.flatnonzero(mask))
        return
    cols = columns(mask, width)
    if node.op_type == "Gemm":
        slicer.slice_input(index, 1, 1 if _attr(node, "transB", 0) else 0, cols)
    else:
        slicer.slice_input(index, 1, 0, cols)


def _slice_through(slicer: _Slicer, index: int, kept: np.ndarray, group: ChannelGroup) -> None:
    channels = group.channels
    view = slicer.view
    node = view.nodes[index]
    op = node.op_type
    if op == "Conv":  # depthwise: one filter per channel
        slicer.slice_input(index, 1, 0, kept)
        if len(node.input) > 2 and node.input[2]:
            slicer.slice_input(index, 2, 0, kept)
        for attr in node.attribute:
            if attr.name == "group":
                attr.i = int(len(kept))
    elif op == "BatchNormalization":
        for slot in range(1, 5):
            slicer.slice_input(index, slot, 0, kept)
    elif op in ("Add", "Sub", "Mul", "Div", "PRelu"):
        for slot, name in enumerate(node.input):
            if name and view.is_constant(name):
                array = slicer.value(name)
                axis = _channel_axis_of_constant(array, group.kind, view, node)
                if axis is not None:
                    slicer.slice_input(index, slot, axis, kept)
    elif op == "Reshape":
        target = slicer.value(node.input[1]).copy()
        if target[1] > 0:
            width = int(target[1]) // channels
            target[1] = len(kept) * width
            fresh = f"{node.input[1]}__onnxadmm_{node.name}"
            slicer.values[fresh] = target
            node.input[1] = fresh


def _channel_axis_of_constant(array: np.ndarray, kind: str, view: GraphView, node) -> int | None:
    """Axis of a per-channel constant that holds the channels (None for a scalar): the last axis for
    row features; for [N, C, ...] data the axis aligned (right-justified broadcast) with axis 1."""
    if array.size == 1:
        return None
    if kind == "row":
        return array.ndim - 1
    data = next(n for n in node.input if n and not view.is_constant(n))
    rank = len(view.types[data].shape)
    return array.ndim - (rank - 1)
