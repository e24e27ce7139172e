"""Channel movers: the ops that put a tensor's channels at other positions of a wider or narrower tensor
(Concat, Split, a step-1 Slice of the channel axis, a zero Pad of the channel axis), one handler per op type.

Each handler answers both questions the channel pipeline asks of such a node:
  ``pieces``  (analysis) how it places channels: [(narrow tensor, wide tensor, start, narrow channels, wide
              channels)] — the narrow tensor is positions [start, start + n) of the wide one; None when the
              node leaves the channel axis alone (then it is a per-channel node);
  ``narrow``  (export) its new sizes / bounds / pad widths once positions of its input (``removed_in``) and
              output (``removed_out``) are gone: each loses the removed positions it covers.
A new mover is one ``ChannelMover`` subclass registered with ``@mover("OpType")``. Anything the handler does
not understand with certainty raises ``Decline`` with the node named; the group's channels then stay.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import onnx

from ..onnxio.graph import GraphView, attribute, attributes, drop_attribute, set_attribute


class Decline(Exception):
    """A channel group cannot pass this node; the message names the node and why."""


class Piece(NamedTuple):
    narrow: str
    wide: str
    start: int
    count: int
    space: int


NewConstant = Callable[[str, np.ndarray], str]  # (base name, value) -> the fresh initializer's name


class ChannelMover:
    op_type = ""

    def pieces(self, view: GraphView, node: onnx.NodeProto, kind: str) -> list[Piece] | None:
        raise NotImplementedError

    def narrow(self, view: GraphView, node: onnx.NodeProto, kind: str, removed_in: np.ndarray,
               removed_out: np.ndarray, opset: int, new_constant: NewConstant) -> None:
        """Rewrite ``node`` in place for the removed positions (sorted arrays)."""
        raise NotImplementedError


MOVERS: dict[str, ChannelMover] = {}


def mover(op_type: str):
    def register(cls: type[ChannelMover]) -> type[ChannelMover]:
        handler = cls()
        handler.op_type = op_type
        MOVERS[op_type] = handler
        return cls
    return register


def channel_pieces(view: GraphView, node: onnx.NodeProto, kind: str) -> list[Piece] | None:
    """How ``node`` places channels (``ChannelMover.pieces``); None for a node that is not a mover."""
    handler = MOVERS.get(node.op_type)
    return None if handler is None else handler.pieces(view, node, kind)


def channel_axis(view: GraphView, tensor: str, kind: str) -> tuple[int, int]:
    """(channel axis, rank) of ``tensor``: axis 1 for [N, C, ...] data (``kind`` "conv"), the last for rows."""
    tensor_type = view.types.get(tensor)
    if tensor_type is None or tensor_type.shape is None:
        raise Decline(f"the rank of {tensor!r} is unknown")
    rank = len(tensor_type.shape)
    return (1 if kind == "conv" else rank - 1), rank


def channels_of(view: GraphView, tensor: str, kind: str, what: str) -> int:
    tensor_type = view.types.get(tensor)
    if tensor_type is None or tensor_type.shape is None:
        raise Decline(f"{what}the shape of {tensor!r} is unknown")
    size = tensor_type.shape[1 if kind == "conv" else len(tensor_type.shape) - 1]
    if not isinstance(size, int):
        raise Decline(f"{what}{tensor!r} has a dynamic channel count")
    return size


def _tiling(view: GraphView, node: onnx.NodeProto, kind: str, whole: str, parts: list[str], verb: str
            ) -> list[Piece]:
    """The parts, in order, tile the whole tensor along the channel axis."""
    what = f"{node.op_type} {node.name!r}: "
    axis, rank = channel_axis(view, whole, kind)
    if attributes(node).get("axis", 0) % rank != axis:
        raise Decline(f"{what}{verb} on axis {attributes(node).get('axis', 0)}, not the channel axis")
    if len(set(parts)) != len(parts):
        raise Decline(f"{what}reads the same tensor twice")
    total = channels_of(view, whole, kind, what)
    pieces, start = [], 0
    for name in parts:
        count = channels_of(view, name, kind, what)
        pieces.append(Piece(name, whole, start, count, total))
        start += count
    return pieces


def _positions_before(removed: np.ndarray) -> Callable[[int], int]:
    return lambda position: int(np.searchsorted(removed, position))


@mover("Concat")
class Concat(ChannelMover):
    def pieces(self, view, node, kind):
        return _tiling(view, node, kind, node.output[0], list(node.input), "joins")

    def narrow(self, view, node, kind, removed_in, removed_out, opset, new_constant):
        pass  # its output's size follows its inputs


@mover("Split")
class Split(ChannelMover):
    def pieces(self, view, node, kind):
        return _tiling(view, node, kind, node.input[0], list(node.output), "splits")

    def narrow(self, view, node, kind, removed_in, removed_out, opset, new_constant):
        axis, _ = channel_axis(view, node.input[0], kind)
        before = _positions_before(removed_in)
        sizes = [view.types[o].shape[axis] for o in node.output]
        starts = np.cumsum([0, *sizes])
        new = np.array([size - (before(starts[i + 1]) - before(starts[i])) for i, size in enumerate(sizes)],
                       dtype=np.int64)
        if opset >= 13:  # sizes as an input
            while len(node.input) < 2:
                node.input.append("")
            node.input[1] = new_constant(f"{node.name}__onnxadmm_split", new)
            drop_attribute(node, "num_outputs")
        else:
            set_attribute(node, "split", [int(v) for v in new])


@mover("Slice")
class Slice(ChannelMover):
    def pieces(self, view, node, kind):
        bounds = self._bounds(view, node, kind)
        if bounds is None:
            return None
        start, total = bounds
        what = f"Slice {node.name!r}: "
        return [Piece(node.output[0], node.input[0], start, channels_of(view, node.output[0], kind, what), total)]

    @staticmethod
    def _ranges(view: GraphView, node: onnx.NodeProto) -> tuple[list, list, list, list]:
        """starts, ends, axes, steps — from the inputs (opset ≥ 10) or the attributes."""
        if len(node.input) > 1:
            names = list(node.input[1:]) + [""] * (5 - len(node.input))
            if not all(view.is_constant(n) for n in names if n):
                raise Decline(f"Slice {node.name!r}: computed bounds")
            starts, ends = (view.constant(n).reshape(-1).tolist() for n in names[:2])
            axes = view.constant(names[2]).reshape(-1).tolist() if names[2] else list(range(len(starts)))
            steps = view.constant(names[3]).reshape(-1).tolist() if names[3] else [1] * len(starts)
            return starts, ends, axes, steps
        starts, ends = list(attribute(node, "starts", [])), list(attribute(node, "ends", []))
        return starts, ends, list(attribute(node, "axes", range(len(starts)))), [1] * len(starts)

    def _bounds(self, view, node, kind) -> tuple[int, int] | None:
        """(start, input channels) of a step-1 range of channels; None when the channel axis stays whole."""
        what = f"Slice {node.name!r}: "
        axis, rank = channel_axis(view, node.input[0], kind)
        starts, ends, axes, steps = self._ranges(view, node)
        axes = [int(a) % rank for a in axes]
        if axis not in axes:
            return None
        i = axes.index(axis)
        total = channels_of(view, node.input[0], kind, what)
        start, end, step = int(starts[i]), int(ends[i]), int(steps[i])
        start, end = (min(max(v + total if v < 0 else v, 0), total) for v in (start, end))
        if step == 1 and start == 0 and end >= total:
            return None
        if step != 1:
            raise Decline(f"{what}takes every {step}th channel")
        return start, total

    def narrow(self, view, node, kind, removed_in, removed_out, opset, new_constant):
        axis, rank = channel_axis(view, node.input[0], kind)
        total = view.types[node.input[0]].shape[axis]
        before = _positions_before(removed_in)
        starts, ends, axes, _ = (np.array(v) for v in self._ranges(view, node))
        i = int(np.flatnonzero(axes % rank == axis)[0])
        lo, hi = (min(max(int(v) + total if v < 0 else int(v), 0), total) for v in (starts[i], ends[i]))
        starts[i], ends[i] = lo - before(lo), hi - before(hi)
        if len(node.input) > 1:
            for slot, array in ((1, starts), (2, ends)):
                dtype = view.constant(node.input[slot]).dtype
                node.input[slot] = new_constant(f"{node.name}__onnxadmm_{slot}", array.astype(dtype))
        else:
            set_attribute(node, "starts", [int(v) for v in starts])
            set_attribute(node, "ends", [int(v) for v in ends])


@mover("Pad")
class Pad(ChannelMover):
    def pieces(self, view, node, kind):
        pads = self._channel_pads(view, node, kind)
        if pads is None:
            return None
        what = f"Pad {node.name!r}: "
        return [Piece(node.input[0], node.output[0], pads[0], channels_of(view, node.input[0], kind, what),
                      channels_of(view, node.output[0], kind, what))]

    @staticmethod
    def _pads(view: GraphView, node: onnx.NodeProto) -> np.ndarray:
        if len(node.input) > 1:
            return view.constant(node.input[1]).reshape(-1)
        return np.array(attribute(node, "pads", []), np.int64)

    def _channel_pads(self, view, node, kind) -> tuple[int, int] | None:
        """(before, after) zero channels added on the channel axis; None when only other axes are padded."""
        what = f"Pad {node.name!r}: "
        axis, rank = channel_axis(view, node.input[0], kind)
        if len(node.input) > 1:
            if not view.is_constant(node.input[1]):
                raise Decline(f"{what}computed pads")
            if len(node.input) > 3 and node.input[3]:
                raise Decline(f"{what}pads selected axes (the 'axes' input)")
            value = view.constant(node.input[2]).reshape(-1) if len(node.input) > 2 and node.input[2] else None
        else:
            value = np.array([attribute(node, "value", 0.0)])
        pads = self._pads(view, node).tolist()
        if len(pads) != 2 * rank:
            raise Decline(f"{what}{len(pads)} pads for a rank-{rank} tensor")
        before, after = int(pads[axis]), int(pads[axis + rank])
        if before == after == 0:
            return None
        mode = attribute(node, "mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or before < 0 or after < 0 or \
                (value is not None and value.size and np.any(value != 0)):
            raise Decline(f"{what}only zero padding of the channel axis is understood")
        return before, after

    def narrow(self, view, node, kind, removed_in, removed_out, opset, new_constant):
        """Removed output positions left of / right of the input are pad channels: a narrower pad."""
        axis, rank = channel_axis(view, node.input[0], kind)
        pads = self._pads(view, node).astype(np.int64).copy()
        first, width = int(pads[axis]), int(view.types[node.input[0]].shape[axis])
        pads[axis] -= int(np.sum(removed_out < first))
        pads[axis + rank] -= int(np.sum(removed_out >= first + width))
        if len(node.input) > 1:
            node.input[1] = new_constant(f"{node.name}__onnxadmm_pads", pads)
        else:
            set_attribute(node, "pads", [int(v) for v in pads])
