"""Block-diagonal connections exported as grouped Convs (Changpinyo et al. 2017), really faster.

A pair P → (per-channel nodes) → Q around one channel group A of C channels becomes two Convs with
``group = G``. Each channel c of A is assigned to a block b(c) (C/G per block); A is permuted so the
channels of block 0 come first, then block 1, ... (perm), which every member of A follows:
  P  (C, Cin, k, k) → (C, Cin/G, k, k):  row i = perm[i] of block b keeps input channels [b·Cin/G, (b+1)·Cin/G)
  per-channel parameters of the nodes between P and Q are permuted by perm
  Q  (Cout, C, k, k) → (Cout, C/G, k, k): output block b (rows [b·Cout/G, ...)) reads perm[b·C/G : (b+1)·C/G]
The solved (masked) weights are zero outside the blocks, so the grouped graph computes exactly what the
masked full graph computes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx

from ..analysis.channels import ChannelGroup
from ..onnxio.graph import FreshNames, GraphView
from ..onnxio.normalize import infer_types
from .apply import write_initializers
from .channels import per_channel_constants


@dataclass(frozen=True)
class BlockPair:
    """One group A made block-diagonal: its producer P, consumer Q, and each channel's block."""

    group: ChannelGroup
    producer: int  # node id of P
    consumer: int  # node id of Q
    blocks: int
    block_of: tuple[int, ...]  # (C,) block of each channel of A

    @property
    def permutation(self) -> np.ndarray:
        """A's new channel order: block 0's channels (ascending), then block 1's, ..."""
        block_of = np.asarray(self.block_of)
        return np.concatenate([np.flatnonzero(block_of == b) for b in range(self.blocks)])


def producer_mask(pair: BlockPair, in_channels: int, taps: int) -> np.ndarray:
    """P's support in its canonical (1, C, Cin·taps) view: row c keeps input block b(c)."""
    in_block = np.arange(in_channels) * pair.blocks // in_channels
    keep = np.asarray(pair.block_of)[:, None] == in_block[None, :]
    return np.repeat(keep, taps, axis=1)[None]


def consumer_mask(pair: BlockPair, out_channels: int, taps: int) -> np.ndarray:
    """Q's support in its canonical (1, Cout, C·taps) view: output block b keeps the channels of block b."""
    out_block = np.arange(out_channels) * pair.blocks // out_channels
    keep = out_block[:, None] == np.asarray(pair.block_of)[None, :]
    return np.repeat(keep, taps, axis=1)[None]


def to_grouped(model: onnx.ModelProto, pairs: list[BlockPair]) -> onnx.ModelProto:
    """A copy of ``model`` (whose P/Q weights are already zero outside the blocks) with every pair
    rewritten as grouped Convs and the channel permutation folded into the group's members."""
    out = copy.deepcopy(model)
    view = GraphView(out, infer_types(out, data_prop=False))
    fresh_names = FreshNames(out.graph)
    values: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        return values[name] if name in values else view.constant(name)

    def private(index: int, slot: int) -> str:
        """The initializer at (node, slot), copied first when other nodes read it too."""
        node = view.nodes[index]
        name = node.input[slot]
        if len(view.consumers.get(name, [])) > 1:
            fresh = fresh_names.name(f"{name}__onnxadmm_{node.name}_{slot}")
            values[fresh] = value(name)
            node.input[slot] = name = fresh
        return name

    for pair in pairs:
        perm, g = pair.permutation, pair.blocks
        channels = len(perm)
        p_node, q_node = view.nodes[pair.producer], view.nodes[pair.consumer]
        w1 = value(p_node.input[1])
        cin = w1.shape[1]
        grouped = np.empty((channels, cin // g, *w1.shape[2:]), w1.dtype)
        for i, c in enumerate(perm):
            b = i // (channels // g)
            grouped[i] = w1[c, b * cin // g:(b + 1) * cin // g]
        values[private(pair.producer, 1)] = grouped
        if len(p_node.input) > 2 and p_node.input[2]:
            values[private(pair.producer, 2)] = value(p_node.input[2])[perm]
        w2 = value(q_node.input[1])
        cout = w2.shape[0]
        grouped = np.empty((cout, channels // g, *w2.shape[2:]), w2.dtype)
        for o in range(cout):
            b = o * g // cout
            grouped[o] = w2[o, perm[b * channels // g:(b + 1) * channels // g]]
        values[private(pair.consumer, 1)] = grouped
        for node in (p_node, q_node):
            for attr in node.attribute:
                if attr.name == "group":
                    node.attribute.remove(attr)
                    break
            node.attribute.append(onnx.helper.make_attribute("group", g))
        for index in pair.group.through:
            _permute_through(view, index, perm, pair.group.kind, value, private, values)
    write_initializers(out.graph, values)
    return out


def _permute_through(view: GraphView, index: int, perm: np.ndarray, kind: str, value, private, values) -> None:
    node = view.nodes[index]
    for slot, axis in per_channel_constants(view, index, kind):
        values[private(index, slot)] = np.take(value(node.input[slot]), perm, axis=axis)
