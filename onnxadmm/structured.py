"""Channel pruning end to end (``--method channel | l0-l21``): coupled groups → kept widths under the
MACs target → layer-wise ADMM on each consumer with an input-channel constraint (through its
activation, sequential) → exact refit on the kept channels → every member of each group sliced.

During the solve a removed channel is a zero input column of its consumers, which computes exactly
what the sliced graph computes; the slicing happens once, at the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch

from .algorithms.projections.groups import ChannelBlock, balanced_assignment, channel_norms
from .algorithms.solve import Structure
from .analysis.channels import ChannelGroup, find_channel_groups
from .analysis.layers import Declined, Layer
from .calib.readers import SampleSet
from .config import CompressConfig
from .export.apply import apply_initializers
from .export.channels import slice_channels
from .onnxio.graph import GraphView
from .plan.channels import ChannelPlan, plan_channels, top_mask
from .refine import refine
from .sequential import Progress, SequentialResult, compress_layers


@dataclass
class ChannelResult:
    model: onnx.ModelProto
    plan: ChannelPlan
    solved: SequentialResult
    groups: list[ChannelGroup]
    kept: dict[str, np.ndarray]
    pairs: list = field(default_factory=list)  # --method grouped: the block-diagonal conv pairs
    pair_latency_ratios: dict[str, float] = field(default_factory=dict)  # group -> grouped/dense time, measured

    def report(self) -> dict:
        rows = []
        for group in self.groups:
            row = {"name": group.name, "channels": group.channels, "kind": group.kind,
                   "producers": len(group.producers), "through": len(group.through),
                   "consumers": [c.layer for c in group.consumers], "declined": group.declined}
            if group.name in self.kept:
                row["kept"] = int(self.kept[group.name].sum())
                row["measured_output_damage"] = self.plan.measured_damage.get(group.name)
                row["latency_in_context_factor"] = self.plan.latency_context.get(group.name)
            rows.append(row)
        return {"strategy": self.plan.strategy, "macs_original": self.plan.macs_original,
                "macs_planned": self.plan.macs_planned,
                "macs_planned_ratio": self.plan.macs_planned / max(self.plan.macs_original, 1),
                "latency_ms_original": self.plan.latency_ms_original,
                "latency_ms_planned": self.plan.latency_ms_planned,
                "latency_ratio_measured_at_plan": self.plan.latency_ratio_measured,
                "int8_latency_ratio": self.plan.int8_ratio,  # int8 / fp32 original; plan ratios are int8 / int8
                "latency_search": [asdict(step) for step in self.plan.latency_search], "groups": rows,
                "block_diagonal": [{"group": p.group.name, "consumer": p.group.consumers[0].layer,
                                    "blocks": p.blocks,
                                    "measured_latency_ratio": self.pair_latency_ratios.get(p.group.name)}
                                   for p in self.pairs]}


def group_declines(groups: list[ChannelGroup], excluded: set[str], layers: dict[int, Layer]) -> None:
    """A group touching an excluded layer stays whole."""
    for group in groups:
        if group.declined:
            continue
        touched = [layers[i].name for i in group.member_nodes if i in layers and layers[i].name in excluded]
        if touched:
            group.declined = f"touches excluded layer {touched[0]!r}"


def channel_groups(view: GraphView, all_layers: list[Layer], layers: list[Layer]) -> list[ChannelGroup]:
    """The groups of ``all_layers`` (before --exclude); a group touching a layer not in ``layers`` stays whole."""
    groups = find_channel_groups(view, all_layers)
    allowed = {l.name for l in layers}
    group_declines(groups, {l.name for l in all_layers} - allowed, {l.node_index: l for l in all_layers})
    return groups


def refit_the_rest(structures: dict[str, Structure], levels: dict[str, float], layers: list[Layer],
                   config: CompressConfig) -> None:
    """With ``refit_dense``, every layer without a structure is refit to the compressed model's inputs
    (sequential error compensation)."""
    if config.refit_dense:
        for layer in layers:
            if layer.name not in structures:
                structures[layer.name], levels[layer.name] = Structure(kind="dense"), 0.0


def compress_channels(view: GraphView, model: onnx.ModelProto, all_layers: list[Layer], layers: list[Layer],
                      samples: SampleSet, config: CompressConfig, progress: Progress) -> ChannelResult:
    """``all_layers`` (before --exclude) define the groups; ``layers`` are the ones allowed to change."""
    groups = channel_groups(view, all_layers, layers)
    active = [g for g in groups if not g.declined]
    progress("plan", 0, 1, f"{len(active)} channel groups; measuring sensitivity")
    plan = plan_channels(view, layers, active, samples, config)
    by_name = {l.name: l for l in layers}
    blocks: dict[str, list[ChannelBlock]] = {}
    widths: dict[str, int] = {}
    for group in active:
        k = plan.keep[group.name]
        if k >= group.channels:
            continue
        fixed = plan.masks.get(group.name)
        for consumer in group.consumers:
            place = consumer.place
            part = None if fixed is None else fixed[place.lo:place.hi]
            blocks.setdefault(consumer.layer, []).append(ChannelBlock(
                place.offset, place.count, k if part is None else int(part.sum()),
                None if part is None else tuple(bool(v) for v in part)))
            widths[consumer.layer] = consumer.width
    kind = "l0-l21" if config.method == "l0-l21" else "channels"
    structures: dict[str, Structure] = {}
    levels: dict[str, float] = {}
    for name, parts in blocks.items():
        parts.sort(key=lambda b: b.offset)
        structures[name] = Structure(kind=kind, sparsity=config.sparsity, blocks=tuple(parts), width=widths[name])
        total = by_name[name].in_features * by_name[name].groups // widths[name]
        levels[name] = sum(b.channels - b.k for b in parts) / total
    refit_the_rest(structures, levels, layers, config)
    solving = [layer for layer in layers if layer.name in structures]
    solved = compress_layers(view, solving, samples, structures, levels, config, progress)
    kept = _kept_channels(active, plan, solved, by_name)
    declined_layers = {d.name for d in solved.declined}
    for group in active:  # a consumer that could not be solved keeps its group whole
        if any(c.layer in declined_layers for c in group.consumers):
            kept[group.name] = np.ones(group.channels, bool)
            group.declined = "a consumer could not be solved: " + next(
                d.reason for d in solved.declined if d.name in {c.layer for c in group.consumers})
    masked, solved.refined = refine(view, apply_initializers(model, solved.initializers), samples, config,
                                    progress, removed_positions(active, kept))
    sliced = slice_channels(masked, active, kept)
    return ChannelResult(sliced, plan, solved, groups, {g.name: kept[g.name] for g in active})


def removed_positions(groups: list[ChannelGroup], kept: dict[str, np.ndarray]) -> dict[str, tuple[int, np.ndarray]]:
    """Per tensor of the groups, (channel axis, positions that slicing will remove)."""
    removed: dict[str, tuple[int, np.ndarray]] = {}
    for group in groups:
        channels = np.flatnonzero(~kept[group.name])
        for tensor, place in group.places.items():
            axis, before = 1 if group.kind == "conv" else -1, removed.get(tensor, (0, np.empty(0, np.int64)))[1]
            removed[tensor] = (axis, np.union1d(before, place.positions(channels)))
    return removed


def _kept_channels(groups, plan, solved, by_name) -> dict[str, np.ndarray]:
    """The channels each group keeps: its pinned mask, or the k largest input-column norms, in the group's
    range, of the solved first consumer (ADMM chose them; a group without a pinned mask is uniform, so that
    consumer reads all of its channels)."""
    kept = {}
    for group in groups:
        k = plan.keep[group.name]
        if k >= group.channels:
            kept[group.name] = np.ones(group.channels, bool)
        elif group.name in plan.masks:
            kept[group.name] = plan.masks[group.name]
        else:
            consumer = group.consumers[0]
            layer = by_name[consumer.layer]
            weight = solved.initializers.get(layer.weight_name)
            if weight is None:
                kept[group.name] = np.ones(group.channels, bool)
                continue
            canonical = torch.from_numpy(layer.canonical(weight))
            norms = channel_norms(canonical, consumer.width).numpy()
            kept[group.name] = top_mask(norms[consumer.place.offset:consumer.place.offset + group.channels], k)
    return kept


def declined_groups(result: ChannelResult) -> list[Declined]:
    return [Declined(g.name, "channel group", g.declined) for g in result.groups if g.declined]


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
    from .plan.latency import LatencyTable

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


def compress_grouped(view: GraphView, model: onnx.ModelProto, all_layers: list[Layer], layers: list[Layer],
                     samples: SampleSet, config: CompressConfig, progress: Progress) -> ChannelResult:
    """``--method grouped``: every eligible Conv pair around a channel group becomes two grouped Convs of
    ``config.conv_groups`` blocks (under ``--objective latency``, only the pairs measured faster that way).
    The channel-to-block assignment maximizes the data-weighted weight energy both convs keep; then P and Q
    (and every other layer) are refit on their supports, in order."""
    from .export.grouped import BlockPair, consumer_mask, producer_mask, to_grouped
    from .plan.sensitivity import input_second_moments
    from .validation.footprint import node_macs

    groups = channel_groups(view, all_layers, layers)
    by_node = {l.node_index: l for l in layers}
    chosen, skipped = grouped_pairs(view, [g for g in groups if not g.declined], by_node, config.conv_groups)
    costs = node_macs(view.model, {name: array[:1] for name, array in samples.arrays.items()}, config.threads)
    ratios = {}
    if config.objective == "latency" and chosen:
        progress("plan", 0, 1, f"timing {len(chosen)} conv pairs dense vs grouped")
        from .plan.latency import latency_batch_size

        batch = latency_batch_size(samples, config.latency_batch)
        chosen, slower, ratios = faster_pairs(view, chosen, {i: c.input_shape for i, c in costs.items()},
                                              config.conv_groups, config.threads, batch)
        skipped += slower
    for group, reason in skipped:
        group.declined = f"not made block-diagonal: {reason}"
    progress("plan", 0, 1, f"{len(chosen)} conv pairs to make block-diagonal")
    subset = samples.spread(config.sensitivity_samples)
    involved = [layer for _, p, q in chosen for layer in (p, q)]
    moments = input_second_moments(view, involved, subset, config.batch_size, config.threads) if involved else {}
    pairs, structures, levels = [], {}, {}
    for group, p, q in chosen:
        g = config.conv_groups
        taps_p, taps_q = p.taps, q.taps
        cin = p.in_features // taps_p
        w1 = p.canonical(view.constant(p.weight_name))[0] ** 2 * moments[p.name][0][None, :]  # (C, Cin·taps)
        w2 = q.canonical(view.constant(q.weight_name))[0] ** 2 * moments[q.name][0][None, :]  # (Cout, C·taps)
        e1 = w1.reshape(group.channels, g, cin // g * taps_p).sum(-1) / (w1.sum() or 1.0)  # (C, G)
        e2 = w2.reshape(g, q.out_features // g, group.channels, taps_q).sum(axis=(1, 3)).T / (w2.sum() or 1.0)
        block_of = balanced_assignment(torch.from_numpy(e1 + e2))
        pair = BlockPair(group, p.node_index, q.node_index, g, tuple(int(b) for b in block_of))
        pairs.append(pair)
        structures[p.name] = Structure(kind="mask", mask=torch.from_numpy(producer_mask(pair, cin, taps_p)))
        structures[q.name] = Structure(kind="mask", mask=torch.from_numpy(
            consumer_mask(pair, q.out_features, taps_q)))
        levels[p.name] = levels[q.name] = 1.0 - 1.0 / g
    refit_the_rest(structures, levels, layers, config)
    solving = [layer for layer in layers if layer.name in structures]
    solved = compress_layers(view, solving, samples, structures, levels, config, progress)
    failed = {d.name for d in solved.declined}
    pairs = [pair for pair, (_, p, q) in zip(pairs, chosen) if p.name not in failed and q.name not in failed]
    masked, solved.refined = refine(view, apply_initializers(model, solved.initializers), samples, config,
                                    progress)
    macs = sum(c.dense for c in costs.values())
    saved = sum(costs[i].dense for pair in pairs for i in (pair.producer, pair.consumer)) * (1 - 1 / config.conv_groups)
    plan = ChannelPlan(keep={}, masks={}, macs_original=macs, macs_planned=int(round(macs - saved)),
                       strategy=f"{config.conv_groups} blocks")
    return ChannelResult(to_grouped(masked, pairs), plan, solved, groups, {}, pairs, ratios)
