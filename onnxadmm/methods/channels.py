"""Channel pruning (``--method channel | l0-l21``): coupled groups → kept widths under the MACs or latency
target (``plan/channels.py``) → layer-wise ADMM on each consumer with an input-channel constraint (through
its activation, sequential) → exact refit on the kept channels → every member of each group sliced.

During the solve and the refinement a removed channel is a zero input column of its consumers, which
computes exactly what the sliced graph computes; the slicing is the export.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from ..algorithms.projections.groups import ChannelBlock, channel_norms
from ..algorithms.solve import Structure
from ..analysis.channels import ChannelGroup, find_channel_groups
from ..analysis.heads import with_head_groups
from ..analysis.layers import Declined, Layer
from ..config import CompressConfig
from ..errors import ConfigError
from ..export.apply import apply_initializers
from ..export.channels import slice_channels
from ..onnxio.graph import GraphView
from ..plan.channels import ChannelPlan, plan_channels, top_mask
from ..solve.layerwise import compress_layers
from .base import CompressionMethod, Context, Solved, refit_the_rest, register


@dataclass
class GroupPlan:
    """The channel groups of the model and, for the active ones, the widths to keep."""

    groups: list[ChannelGroup]
    plan: ChannelPlan
    pairs: list = field(default_factory=list)  # --method grouped: the block-diagonal conv pairs
    pair_latency_ratios: dict[str, float] = field(default_factory=dict)  # group -> grouped/dense time, measured
    node_macs: dict[int, int] = field(default_factory=dict)  # --method grouped: node -> dense MACs per sample

    @property
    def active(self) -> list[ChannelGroup]:
        return [g for g in self.groups if not g.declined]

    def report(self, kept: dict[str, np.ndarray] | None = None) -> dict:
        kept = kept or {}
        rows = []
        for group in self.groups:
            row = {"name": group.name, "channels": group.channels, "kind": group.kind,
                   "producers": len(group.producers), "through": len(group.through),
                   "consumers": [c.layer for c in group.consumers], "declined": group.declined}
            if group.name in kept:
                row["kept"] = int(kept[group.name].sum())
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
                "latency_search": [dataclasses.asdict(step) for step in self.plan.latency_search],
                "groups": rows,
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
    groups = with_head_groups(view, all_layers, find_channel_groups(view, all_layers))
    allowed = {l.name for l in layers}
    group_declines(groups, {l.name for l in all_layers} - allowed, {l.node_index: l for l in all_layers})
    return groups


def declined_groups(groups: list[ChannelGroup]) -> list[Declined]:
    return [Declined(g.name, "channel group", g.declined) for g in groups if g.declined]


@register("channel", "l0-l21")
class Channels(CompressionMethod):
    def preview(self, view, all_layers, layers, config) -> list[str]:
        groups = channel_groups(view, all_layers, layers)
        active = [g for g in groups if not g.declined]
        return [f"{len(active)} of {len(groups)} channel groups can lose channels "
                f"({sum(g.channels for g in active)} channels)",
                *(f"  + {g.name} ({_width(g)})" for g in active),
                *(f"  = {g.name} ({g.channels} channels) stays whole: {g.declined}" for g in groups if g.declined)]

    def plan(self, ctx: Context) -> GroupPlan:
        groups = channel_groups(ctx.view, ctx.all_layers, ctx.layers)
        active = [g for g in groups if not g.declined]
        if not active:
            reasons = "; ".join(f"{g.name}: {g.declined}" for g in groups[:3]) + ("; …" if len(groups) > 3 else "")
            raise ConfigError(f"--method {ctx.config.method}: no channel group can lose channels "
                              + (f"(all {len(groups)} stay whole — {reasons}); 'onnxadmm check' lists each and why"
                                 if groups else "(no layer's output channels are read by another layer)"))
        ctx.progress("plan", 0, 1, f"{len(active)} channel groups; measuring sensitivity")
        return GroupPlan(groups, plan_channels(ctx.view, ctx.layers, active, ctx.samples, ctx.config))

    def solve(self, ctx: Context, plan: GroupPlan) -> Solved:
        config, active = ctx.config, plan.active
        by_name = {l.name: l for l in ctx.layers}
        blocks: dict[str, list[ChannelBlock]] = {}
        widths: dict[str, int] = {}
        for group in active:
            k = plan.plan.keep[group.name]
            if k >= group.channels:
                continue
            fixed = plan.plan.masks.get(group.name)
            for consumer in group.consumers:
                place = consumer.place
                part = None if fixed is None else fixed[place.lo:place.hi]
                blocks.setdefault(consumer.layer, []).append(ChannelBlock(
                    place.offset, place.count, k if part is None else int(part.sum()),
                    None if part is None else tuple(bool(v) for v in part)))
                widths[consumer.layer] = consumer.width
        kind = "l0-l21" if self.name == "l0-l21" else "channels"
        structures: dict[str, Structure] = {}
        levels: dict[str, float] = {}
        for name, parts in blocks.items():
            parts.sort(key=lambda b: b.offset)
            structures[name] = Structure(kind=kind, sparsity=config.sparsity, blocks=tuple(parts),
                                         width=widths[name])
            total = by_name[name].in_features * by_name[name].groups // widths[name]
            levels[name] = sum(b.channels - b.k for b in parts) / total
        refit_the_rest(structures, levels, ctx.layers, config)
        solving = [layer for layer in ctx.layers if layer.name in structures]
        result = compress_layers(ctx.view, solving, ctx.samples, structures, levels, config, ctx.progress)
        kept = _kept_channels(active, plan.plan, result, by_name)
        declined_layers = {d.name for d in result.declined}
        for group in active:  # a consumer that could not be solved keeps its group whole
            if any(c.layer in declined_layers for c in group.consumers):
                kept[group.name] = np.ones(group.channels, bool)
                group.declined = "a consumer could not be solved: " + next(
                    d.reason for d in result.declined if d.name in {c.layer for c in group.consumers})
        return Solved(apply_initializers(ctx.model, result.initializers), result,
                      removed_positions(active, kept), declined_groups(plan.groups),
                      {g.name: kept[g.name] for g in active})

    def export(self, ctx: Context, plan: GroupPlan, solved: Solved) -> onnx.ModelProto:
        return slice_channels(solved.model, list(_groups_kept(plan, solved)), solved.details)

    def report(self, plan: GroupPlan, solved: Solved) -> dict:
        return plan.report(solved.details)

    def target(self, config: CompressConfig) -> dict:
        return {"target_macs": round(config.target_macs, 6)} if config.target_macs is not None else {}

    def relax(self, config: CompressConfig) -> CompressConfig | None:
        """Give-back: the MACs target raised by ``give_back_step``, up to ``max_macs``."""
        if config.max_macs is None or config.target_macs is None or config.target_macs >= config.max_macs - 1e-9:
            return None
        return dataclasses.replace(config, target_macs=min(config.max_macs,
                                                           config.target_macs + config.give_back_step))


def _width(group: ChannelGroup) -> str:
    if group.shape_edits:  # attention heads
        return f"{group.channels // group.block} heads of {group.block}, removed whole"
    return f"{group.channels} channels" + (f", removed in blocks of {group.block}" if group.block > 1 else "")


def _groups_kept(plan: GroupPlan, solved: Solved):
    """The groups the solve decided widths for (a group declined during the solve keeps all its channels)."""
    return (g for g in plan.groups if g.name in solved.details)


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
