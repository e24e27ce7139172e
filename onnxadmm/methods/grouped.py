"""Block-diagonal connections (``--method grouped``, Changpinyo et al. 2017): every eligible Conv pair
around a channel group becomes two grouped Convs of ``conv_groups`` blocks (under ``--objective latency``,
only the pairs measured faster that way). The channel-to-block assignment maximizes the data-weighted
weight energy both convs keep; then P and Q (and every other layer) are refit on their supports, in order.
During the solve and the refinement a pair is its two dense convs with the off-block weights zero; the
grouped convs are the export."""

from __future__ import annotations

import dataclasses

import onnx
import torch

from ..algorithms.projections.groups import balanced_assignment
from ..algorithms.solve import Structure
from ..analysis.channels import ChannelGroup
from ..analysis.layers import Layer
from ..cost.footprint import node_macs
from ..export.apply import apply_initializers
from ..export.grouped import BlockPair, consumer_mask, producer_mask, to_grouped
from ..onnxio.graph import GraphView
from ..plan.channels import ChannelPlan
from ..plan.latency import LatencyTable, latency_batch_size
from ..plan.sensitivity import input_second_moments
from ..solve.layerwise import compress_layers
from .base import CompressionMethod, Context, Solved, refit_the_rest, register
from .channels import GroupPlan, channel_groups, declined_groups
from .lowrank import timed_in_fp32


def grouped_pairs(view: GraphView, groups: list[ChannelGroup], by_node: dict[int, Layer], blocks: int
                  ) -> tuple[list[tuple[ChannelGroup, Layer, Layer]], list[tuple[ChannelGroup, str]]]:
    """Groups that can become block-diagonal: one producer P and one consumer Q, both plain Convs whose
    channel counts divide by ``blocks``, and only per-channel parameter nodes between them."""
    chosen, skipped = [], []
    for group in groups:
        producer = by_node.get(group.producers[0]) if len(group.producers) == 1 else None
        consumer = by_node.get(group.consumers[0].node_index) if len(group.consumers) == 1 else None
        through_ops = {view.nodes[i].op_type for i in group.through}
        if producer is None or consumer is None or producer.op_type != "Conv" or consumer.op_type != "Conv":
            skipped.append((group, "not a single Conv -> Conv pair"))
        elif through_ops & {"Conv", "Concat", "Flatten", "Reshape", "Split", "Slice", "Pad"} or \
                not group.uniform or not group.consumers[0].place.whole:
            skipped.append((group, f"between the convs: {sorted(through_ops)}"))
        elif any(n % blocks for n in (group.channels, producer.in_features // (producer.conv.kernel[0] *
                                                                              producer.conv.kernel[1]),
                                      consumer.out_features)):
            skipped.append((group, f"channel counts not divisible by {blocks} blocks"))
        else:
            chosen.append((group, producer, consumer))
    return chosen, skipped


def faster_pairs(view: GraphView, chosen: list[tuple[ChannelGroup, Layer, Layer]], input_shapes: dict[int, tuple],
                 blocks: int, threads: int, batch: int = 1
                 ) -> tuple[list, list[tuple[ChannelGroup, str]], dict[str, float]]:
    """The pairs whose grouped form is faster: P and Q, each timed in onnxruntime (at ``batch``) against its
    grouped form, in context (``LatencyTable.grouped_ratio``: the layout reorders a grouped conv can cost
    its neighbours are counted), kept when Σ t_n·r_n < Σ t_n over the two convs. Returns (kept, skipped
    with the reason, group -> measured ratio)."""
    table = LatencyTable(threads)
    kept, skipped, ratios = [], [], {}
    for group, p, q in chosen:
        dense_ms = grouped_ms = 0.0
        for layer in (p, q):
            ms, ratio = table.grouped_ratio(view.nodes[layer.node_index],
                                            (batch, *input_shapes[layer.node_index][1:]),
                                            view.constant(layer.weight_name), blocks)
            dense_ms, grouped_ms = dense_ms + ms, grouped_ms + ms * ratio
        ratios[group.name] = grouped_ms / dense_ms
        if ratios[group.name] < 1.0:
            kept.append((group, p, q))
        else:
            skipped.append((group, f"its grouped convs measured {ratios[group.name]:.2f}x the dense pair's time "
                                   "here (--objective size keeps it)"))
    table.save()
    return kept, skipped, ratios


@register("grouped")
class Grouped(CompressionMethod):
    def preview(self, view, all_layers, layers, config) -> list[str]:
        groups = [g for g in channel_groups(view, all_layers, layers) if not g.declined]
        chosen, skipped = grouped_pairs(view, groups, {l.node_index: l for l in layers}, config.conv_groups)
        return [f"{len(chosen)} Conv pairs can become block-diagonal with {config.conv_groups} blocks "
                "(under --objective latency only those measured faster)",
                *(f"  + {p.name} -> {q.name} ({group.channels} channels)" for group, p, q in chosen),
                *(f"  = {group.name}: {reason}" for group, reason in skipped)]

    def plan(self, ctx: Context) -> GroupPlan:
        view, config, samples = ctx.view, ctx.config, ctx.samples
        groups = channel_groups(view, ctx.all_layers, ctx.layers)
        by_node = {l.node_index: l for l in ctx.layers}
        chosen, skipped = grouped_pairs(view, [g for g in groups if not g.declined], by_node, config.conv_groups)
        costs = node_macs(view.model, {name: array[:1] for name, array in samples.arrays.items()}, config.threads)
        ratios = {}
        if config.objective == "latency" and chosen:
            ctx.progress("plan", 0, 1, f"timing {len(chosen)} conv pairs dense vs grouped")
            batch = latency_batch_size(samples, config.latency_batch)
            chosen, slower, ratios = faster_pairs(view, chosen, {i: c.input_shape for i, c in costs.items()},
                                                  config.conv_groups, config.threads, batch)
            skipped += slower
        for group, reason in skipped:
            group.declined = f"not made block-diagonal: {reason}"
        ctx.progress("plan", 0, 1, f"{len(chosen)} conv pairs to make block-diagonal")
        subset = samples.spread(config.sensitivity_samples)
        involved = [layer for _, p, q in chosen for layer in (p, q)]
        moments = input_second_moments(view, involved, subset, config.batch_size, config.threads) \
            if involved else {}
        pairs = []
        for group, p, q in chosen:
            g = config.conv_groups
            cin = p.in_features // p.taps
            w1 = p.canonical(view.constant(p.weight_name))[0] ** 2 * moments[p.name][0][None, :]  # (C, Cin·taps)
            w2 = q.canonical(view.constant(q.weight_name))[0] ** 2 * moments[q.name][0][None, :]  # (Cout, C·taps)
            e1 = w1.reshape(group.channels, g, cin // g * p.taps).sum(-1) / (w1.sum() or 1.0)  # (C, G)
            e2 = w2.reshape(g, q.out_features // g, group.channels, q.taps).sum(axis=(1, 3)).T / (w2.sum() or 1.0)
            block_of = balanced_assignment(torch.from_numpy(e1 + e2))
            pairs.append(BlockPair(group, p.node_index, q.node_index, g, tuple(int(b) for b in block_of)))
        macs = sum(c.dense for c in costs.values())
        plan = ChannelPlan(keep={}, masks={}, macs_original=macs, macs_planned=macs,
                           strategy=f"{config.conv_groups} blocks")
        return GroupPlan(groups, plan, pairs, ratios, {i: c.dense for i, c in costs.items()})

    def solve(self, ctx: Context, plan: GroupPlan) -> Solved:
        by_node = {l.node_index: l for l in ctx.layers}
        structures, levels = {}, {}
        for pair in plan.pairs:
            g, p, q = pair.blocks, by_node[pair.producer], by_node[pair.consumer]
            structures[p.name] = Structure(kind="mask", mask=torch.from_numpy(
                producer_mask(pair, p.in_features // p.taps, p.taps)))
            structures[q.name] = Structure(kind="mask", mask=torch.from_numpy(
                consumer_mask(pair, q.out_features, q.taps)))
            levels[p.name] = levels[q.name] = 1.0 - 1.0 / g
        refit_the_rest(structures, levels, ctx.layers, ctx.config)
        solving = [layer for layer in ctx.layers if layer.name in structures]
        result = compress_layers(ctx.view, solving, ctx.samples, structures, levels, ctx.config, ctx.progress)
        failed = {d.name for d in result.declined}
        pairs = [pair for pair in plan.pairs
                 if by_node[pair.producer].name not in failed and by_node[pair.consumer].name not in failed]
        return Solved(apply_initializers(ctx.model, result.initializers, consume=True), result,
                      declined=declined_groups(plan.groups), details=pairs)

    def export(self, ctx: Context, plan: GroupPlan, solved: Solved) -> onnx.ModelProto:
        return to_grouped(solved.model, solved.details)

    def report(self, plan: GroupPlan, solved: Solved) -> dict:
        pairs = solved.details
        saved = sum(plan.node_macs[i] for pair in pairs for i in (pair.producer, pair.consumer))
        saved *= 1 - 1 / pairs[0].blocks if pairs else 0
        done = dataclasses.replace(plan.plan, macs_planned=int(round(plan.plan.macs_original - saved)))
        return dataclasses.replace(plan, plan=done, pairs=pairs).report()

    def notes(self, config) -> list[str]:
        return timed_in_fp32(config)
