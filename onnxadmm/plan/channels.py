"""How many channels each coupled group keeps, for a MACs target (fraction of the model's MACs).

Cost (of the exported graph): a node's MACs scale with the kept fraction of the channels it reads and of
those it writes, MACs_n · f_in · f_out; a member holding a sub-range of its group's channels (the narrow
stream behind an option-A shortcut, one output of a Split) keeps the fraction of *its* range that the
group's kept channels cover. Allocation: the better (less Σ damage) of a convex-hull allocation on the
linear part Σ_g S_g f_g, with the budget tightened until the exact total holds, and a greedy descent on the
exact cost (needed where one group, such as a ResNet's residual streams, shares almost every conv with
another group and the cost is bilinear everywhere).
Damage of keeping k of C channels: channel scores s_c = Σ_consumers ‖W[:, c]‖²·E[x_c²] / energy
(the share of each consumer's output energy carried by channel c); e(k) = share of Σ s removed with
the C − k smallest. Its scale is measured: the group is pruned alone at the probe level and the
relative change of the model outputs in onnxruntime gives α = D / e(probe); damage(k) = α·e(k); the
allocation adds D / (1 − D) (see ``additive_damage``).
Kept widths are multiples of ``channel_multiple`` (what the CPU kernels like; docs/RUNTIME.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..analysis.channels import ChannelGroup, Consumer
from ..analysis.layers import Layer
from ..calib.readers import SampleSet
from ..config import CompressConfig
from ..cost.footprint import node_macs
from ..errors import ConfigError
from ..export.qdq import timing_precision
from ..onnxio.graph import GraphView
from .allocate import Option, allocate
from .sensitivity import input_second_moments, output_damage


@dataclass
class ChannelPlan:
    keep: dict[str, int]  # group name -> channels kept
    masks: dict[str, np.ndarray]  # group name -> (C,) bool, chosen before solving (else ADMM chooses)
    macs_original: int
    macs_planned: int
    strategy: str
    measured_damage: dict[str, float] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    latency_ms_original: float | None = None  # whole model, at the latency batch (latency target only)
    latency_ms_planned: float | None = None  # predicted from the per-layer table
    latency_search: list = field(default_factory=list)  # LatencyStep per plan timed (latency target only)
    latency_ratio_measured: float | None = None  # the chosen plan's graph, A/B against the original
    latency_context: dict[str, float] = field(default_factory=dict)  # group -> in-context factor on its savings
    int8_ratio: float | None = None  # --quantize int8: the int8 original's latency over the fp32 original's


def width_options(channels: int, multiple: int) -> list[int]:
    """Kept widths offered for a group of ``channels``: multiples of ``multiple`` up to C, and C."""
    if channels <= multiple:
        return [channels]
    return sorted({*range(multiple, channels, multiple), channels})


def channel_scores(view: GraphView, group: ChannelGroup, layers: dict[str, Layer],
                   moments: dict[str, np.ndarray]) -> np.ndarray:
    """s_c: each consumer's output energy share carried by channel c, summed over the consumers reading c."""
    total = np.zeros(group.channels)
    for consumer in group.consumers:
        layer = layers[consumer.layer]
        w = layer.canonical(view.constant(layer.weight_name)).astype(np.float64)  # (G, R, d)
        energy = (w ** 2) * moments[layer.name][:, None, :]
        place = consumer.place
        per_channel = energy.reshape(-1, place.space, consumer.width).sum(axis=(0, 2))
        total[place.lo:place.hi] += per_channel[place.offset:place.offset + place.count] / (per_channel.sum() or 1.0)
    return total


def producer_l1_scores(view: GraphView, group: ChannelGroup, layers_by_node: dict[int, Layer]) -> np.ndarray:
    """Li et al. 2017: the ℓ1 norm of each output filter, summed over the group's producers."""
    total = np.zeros(group.channels)
    for index in group.producers:
        layer = layers_by_node[index]
        place = group.members[index][1]
        w = layer.canonical(view.constant(layer.weight_name)).reshape(layer.out_features, -1)
        total[place.lo:place.hi] += np.abs(w).sum(axis=1)
    return total


def top_mask(scores: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")[:k]
    mask = np.zeros(scores.shape[0], bool)
    mask[order] = True
    return mask


def group_mask(group: ChannelGroup, scores: np.ndarray, k: int) -> np.ndarray:
    """The k channels of highest score, plus the best of any member range that would lose all of its
    channels (a tensor of zero channels is not a graph onnxruntime runs). In a group of blocks (a grouped
    conv passes it) whole blocks are kept: the ⌈k / block⌉ of highest summed score."""
    b = group.block
    block_scores = scores.reshape(-1, b).sum(axis=1)
    mask = np.repeat(top_mask(block_scores, -(-k // b)), b)
    if not group.uniform:
        ranges = {(p.lo, p.hi) for p in group.places.values()} | {(p.lo, p.hi) for _, p in group.members.values()}
        for lo, hi in sorted(ranges):
            if hi > lo and not mask[lo:hi].any():
                best = (lo + int(np.argmax(scores[lo:hi]))) // b * b
                mask[best:best + b] = True
    return mask


def removed_channels(group: ChannelGroup, k: int, scores: np.ndarray | None) -> np.ndarray:
    """The group channels removed when k are kept. In a uniform group only their number matters; otherwise
    they are the ones ``group_mask`` drops, which decides how many each member loses."""
    if group.uniform or scores is None:
        return np.arange(max(group.channels - k, 0))
    return np.flatnonzero(~group_mask(group, scores, k))


def removed_share(scores: np.ndarray, k: int) -> float:
    total = scores.sum() or 1.0
    return float(np.sort(scores)[: scores.shape[0] - k].sum() / total)


def removed_sets(groups: list[ChannelGroup], options: dict[str, list[int]], scores: dict[str, np.ndarray]
                 ) -> dict[tuple[str, int], np.ndarray]:
    """``removed_channels`` of every group at every width option, computed once for the cost models."""
    return {(g.name, k): removed_channels(g, k, scores.get(g.name)) for g in groups for k in options[g.name]}


def member_shares(group: ChannelGroup, k: int, costs: dict[int, int],
                  removed_of: dict[tuple[str, int], np.ndarray] | None = None) -> dict[int, tuple[str, float]]:
    """Each costed member of ``group``: (side, share of its channels removed when k are kept). ``removed_of``
    gives each (group, kept width)'s removed channels (default: uniform groups' count)."""
    channels = (removed_of or {}).get((group.name, k))
    if channels is None:
        channels = removed_channels(group, k, None)
    return {index: (side, len(place.positions(channels)) / place.space)
            for index, (side, place) in group.members.items() if index in costs}


def exact_macs(costs: dict[int, int], groups: list[ChannelGroup], keep: dict[str, int],
               removed_of: dict[tuple[str, int], np.ndarray] | None = None,
               shares: dict[tuple[str, int], dict] | None = None) -> int:
    """Σ_n MACs_n · (1 − removed_in(n)) · (1 − removed_out(n)): each side loses the share of its channels
    that are removed group channels, summed over the groups on that side (the exported graph's MACs).
    ``shares`` memoizes ``member_shares`` of each (group, kept width) across calls (allocation calls this
    many times)."""
    removed = {index: {"in": 0.0, "out": 0.0} for index in costs}
    for group in groups:
        key = (group.name, keep[group.name])
        per_member = None if shares is None else shares.get(key)
        if per_member is None:
            per_member = member_shares(group, key[1], costs, removed_of)
            if shares is not None:
                shares[key] = per_member
        for index, (side, share) in per_member.items():
            removed[index][side] += share
    return int(round(sum(costs[i] * (1 - removed[i]["in"]) * (1 - removed[i]["out"]) for i in costs)))


class MacsCost:
    """Cost = MACs of the exported graph (``exact_macs``); linear part per group: each member's MACs times
    the share of its channels that are kept group channels."""

    unit = "MACs"

    def __init__(self, costs: dict[int, int], groups: list[ChannelGroup],
                 removed_of: dict[tuple[str, int], np.ndarray]):
        self.costs, self.groups, self.removed_of = costs, groups, removed_of
        self.total = float(sum(costs.values()))
        self.shares: dict[tuple[str, int], dict[int, tuple[str, float]]] = {}  # memo of ``member_shares``
        self.by_name = {g.name: g for g in groups}
        self.at_node: dict[int, list[ChannelGroup]] = {}  # node -> the groups it is a member of
        for group in groups:
            for index in group.members:
                self.at_node.setdefault(index, []).append(group)

    def option_cost(self, group: ChannelGroup, k: int) -> float:
        channels = self.removed_of[(group.name, k)]
        return sum(self.costs.get(i, 0) * (place.count - len(place.positions(channels))) / place.space
                   for i, (_, place) in group.members.items())

    def exact(self, keep: dict[str, int]) -> float:
        return float(exact_macs(self.costs, self.groups, keep, self.removed_of, self.shares))

    def change(self, keep: dict[str, int], name: str, k: int) -> float:
        """exact(keep with group ``name`` at width k) − exact(keep), over the nodes that group touches."""
        before, after = self._member_shares(self.by_name[name], keep[name]), self._member_shares(self.by_name[name], k)
        delta = 0.0
        for index, (side, share) in before.items():
            removed = {"in": 0.0, "out": 0.0}
            for group in self.at_node[index]:
                other_side, other_share = self._member_shares(group, keep[group.name])[index]
                removed[other_side] += other_share
            kept = (1 - removed["in"]) * (1 - removed["out"])
            removed[side] += after[index][1] - share
            delta += self.costs[index] * ((1 - removed["in"]) * (1 - removed["out"]) - kept)
        return delta

    def _member_shares(self, group: ChannelGroup, k: int) -> dict[int, tuple[str, float]]:
        key = (group.name, k)
        if key not in self.shares:
            self.shares[key] = member_shares(group, k, self.costs, self.removed_of)
        return self.shares[key]


def plan_channels(view: GraphView, layers: list[Layer], groups: list[ChannelGroup], samples: SampleSet,
                  config: CompressConfig) -> ChannelPlan:
    """Kept widths per group meeting ``config.target_macs`` (fraction of the whole model's MACs) or
    ``config.target_latency`` (fraction of its latency at ``--latency-batch``: the per-layer table prices the
    widths, the exported plan is timed against the original until it meets the target; ``plan/latency.py``)."""
    layers_by_name = {l.name: l for l in layers}
    layers_by_node = {l.node_index: l for l in layers}
    one = {name: array[:1] for name, array in samples.arrays.items()}
    node_costs = node_macs(view.model, one, config.threads)
    costs = {i: c.dense for i, c in node_costs.items()}
    options = {g.name: width_options(g.channels, int(np.lcm(config.channel_multiple, g.block))) for g in groups}
    consumers = [layers_by_name[c.layer] for g in groups for c in g.consumers]
    subset = samples.spread(config.sensitivity_samples)
    moments = input_second_moments(view, consumers, subset, config.batch_size, config.threads) if consumers else {}
    scores = {g.name: channel_scores(view, g, layers_by_name, moments) for g in groups}
    removed_of = removed_sets(groups, options, scores)
    timed = one
    if config.target_latency is not None:
        from .latency import LatencyCost, target_of_int8_original, timing_feed

        timed = timing_feed(samples, config.latency_batch, config.latency_seq_len)
        shapes = {view.nodes[i].input[0]: c.input_shape for i, c in node_costs.items()}
        model = LatencyCost(view, groups, shapes, timed, options, config.threads, removed_of,
                            precision=timing_precision(layers, config.quantize, config.int8_activations,
                                                             config.int8_smoothing))
        model.calibrate_in_context(view.model, lambda g, k: _sliced(view, groups, scores, {g.name: k}), timed)
        target, what = config.target_latency, "--target-latency"
        if config.quantize == "int8":  # every plan is timed in int8 against the int8 original
            int8_ratio = model.table.int8_ratio(view.model, timed)
            target = target_of_int8_original(config, lambda: int8_ratio)
            what = "--target-latency-of int8 --target-latency" if config.target_latency_of == "int8" else (
                f"--target-latency {config.target_latency} with --quantize int8 (the int8 original measured "
                f"{int8_ratio:.3f} of the fp32 one, so the int8 graph must reach this ratio of it:)")
    else:
        model = MacsCost(costs, groups, removed_of)
        target, what = (config.target_macs if config.target_macs is not None else 1.0), "--target-macs"
    damage: dict[str, float] = {}
    budget = target * model.total
    search, measured = [], None
    if not groups or target >= 1.0:
        keep = {g.name: g.channels for g in groups}
        strategy = "none (target 1.0)"
    else:
        if config.uniform:
            def choose(budget):
                return _uniform(model, groups, options, budget)
            strategy = "uniform"
        else:
            curves, damage = _sensitivity_curves(view, groups, layers_by_name, scores, options, model, subset,
                                                 config)
            def choose(budget):
                return _allocate(model, groups, curves, budget)
            strategy = f"sensitivity, {model.unit}"
        if config.target_latency is not None:
            keep, measured, search = _meet_latency(view, groups, scores, model, model, choose, target, timed)
            if not config.uniform:
                keep, measured, search, strategy = _better_priced_by_macs(
                    view, groups, scores, model, MacsCost(costs, groups, removed_of), curves, target, timed,
                    (keep, measured, search, strategy))
        else:
            keep = choose(budget)
        if not config.uniform:
            _refuse_destroyed(groups, curves, keep, what, target)
    planned = model.exact(keep)
    if not search and planned > budget * (1 + 1e-9):
        raise ConfigError(f"{what} {target} cannot be met: with every prunable channel group at its smallest "
                          f"width the model keeps {planned / model.total:.3f} of its {model.unit} "
                          f"({sum(g.declined is not None for g in groups)} groups declined; see "
                          "'onnxadmm check')")
    macs_planned = exact_macs(costs, groups, keep, removed_of)
    masks = {}
    for g in groups:
        if config.solver != "admm":
            masks[g.name] = group_mask(g, producer_l1_scores(view, g, layers_by_node), keep[g.name])
        elif len(g.consumers) > 1 or config.method == "l0-l21" or not g.uniform or g.block > 1:
            masks[g.name] = group_mask(g, scores[g.name], keep[g.name])
    plan = ChannelPlan(keep=keep, masks=masks, macs_original=int(sum(costs.values())),
                       macs_planned=macs_planned, strategy=strategy, measured_damage=damage, scores=scores)
    if model.unit != "MACs":
        plan.latency_ms_original, plan.latency_ms_planned = model.total, planned
        if config.quantize == "int8":
            plan.int8_ratio = int8_ratio
        plan.latency_search, plan.latency_ratio_measured = search, measured
        plan.latency_context = model.context
    return plan


def _sensitivity_curves(view, groups, layers_by_name, scores, options, model, subset, config
                        ) -> tuple[dict[str, list[Option]], dict[str, float]]:
    """Per group, (width, cost, additive damage) at every width option — damage measured at a few probe
    widths (the group pruned alone, model outputs in onnxruntime), interpolated along the score share and
    made non-increasing in the width (the removed sets are nested, so a narrower width is taken as at least
    as damaging as a wider one: a dip is noise of an output already destroyed, e.g. ResNet-56's residual
    streams measured D = 1.25 at 24 of 64 channels and 0.97 at 8) — and each group's largest measured
    damage."""
    widths = {g.name: _probe_widths(options[g.name], scores[g.name], config.sensitivity_probes) for g in groups}
    probes = {}
    for g in groups:
        for k in widths[g.name]:
            mask = group_mask(g, scores[g.name], k)
            probes[f"{g.name}@{k}"] = {layers_by_name[c.layer].weight_name:
                                       _masked_weight(view, layers_by_name[c.layer], mask, c) for c in g.consumers}
    measured = output_damage(view, probes, subset, config.batch_size, config.threads)
    curves, damage = {}, {}
    for g in groups:
        points = {g.channels: 0.0, **{k: measured[f"{g.name}@{k}"] for k in widths[g.name]}}
        damage[g.name] = max(points.values())
        curves[g.name] = [Option(float(k), model.option_cost(g, k), additive_damage(d))
                          for k, d in zip(options[g.name], damage_at_widths(points, options[g.name],
                                                                            scores[g.name]))]
    return curves, damage


def damage_at_widths(points: dict[int, float], widths: list[int], scores: np.ndarray) -> list[float]:
    """Damage at each of the ascending ``widths``: interpolated from the measured ``points`` (width -> D),
    then made non-increasing in the width, D(k) = max over k' ≥ k (see ``_sensitivity_curves``)."""
    interpolated = [_interpolate(points, k, scores) for k in widths]
    return [float(d) for d in np.maximum.accumulate(interpolated[::-1])[::-1]]


def _sliced(view, groups, scores, widths: dict[str, int]) -> onnx.ModelProto:
    """The graph with each group narrowed to ``widths`` (default: full), for timing — sliced by the planning
    scores, as the weights' values do not change the time."""
    from ..export.channels import slice_channels

    masks = {g.name: group_mask(g, scores[g.name], widths.get(g.name, g.channels)) for g in groups}
    return slice_channels(view.model, groups, masks)


def _better_priced_by_macs(view, groups, scores, latency, macs, curves, target, timed, found):
    """The latency target met with widths priced by MACs instead: the same damage curves allocated under a
    MACs budget, that budget searched on the measured graph. A plan priced by time buys the least damage
    per *predicted* millisecond, and the prediction is the weak part (per-node times, re-scaled per group);
    MACs are exact. Of the two plans that measure within the target, the one with less Σ damage is kept
    (``found``: the time-priced plan's keep, measured ratio, search and strategy)."""
    by_macs = {g.name: [Option(o.level, macs.option_cost(g, int(o.level)), o.damage) for o in curves[g.name]]
               for g in groups}
    try:
        keep, measured, search = _meet_latency(view, groups, scores, macs, latency,
                                               lambda budget: _allocate(macs, groups, by_macs, budget), target, timed)
    except ConfigError:
        return found

    if summed_damage(curves, keep) < summed_damage(curves, found[0]):
        return keep, measured, found[2] + search, "sensitivity, MACs (latency target measured)"
    return found[0], found[1], found[2] + search, found[3]


def _meet_latency(view, groups, scores, model, latency, choose, target, timed):
    """The plan (kept widths) whose exported graph measures ≤ ``target`` of the original's latency on ``timed``,
    its measured ratio and the plans timed
    (``meet_measured_latency``: the budget of ``model``'s unit is searched on measurements of the sliced
    graph, ``latency`` predicts)."""
    from .latency import meet_measured_latency

    def plan_at(budget_ratio):
        keep = choose(budget_ratio * model.total)
        return tuple(sorted(keep.items())), latency.exact(keep) / latency.total

    def measured_ratio(plan):
        return latency.table.plan_ratio(view.model, _sliced(view, groups, scores, dict(plan)), timed)

    plan, measured, search = meet_measured_latency(plan_at, measured_ratio, target, unit=model.unit,
                                                   measured_unit=latency.unit)
    latency.table.save()
    return dict(plan), measured, search


DESTROYED_DAMAGE = 0.999  # measured output damage D at which a cut has wiped out the output


def _refuse_destroyed(groups: list[ChannelGroup], curves: dict[str, list[Option]], keep: dict[str, int],
                      what: str, target: float) -> None:
    """ConfigError when the plan keeps a group at a width where, pruned alone, it already destroys the
    model's output (measured D ≥ DESTROYED_DAMAGE: the output changed by about its own energy). The budget
    then cannot be met by removing channels; writing such a model would pass a speed target with an output
    that no longer resembles the original's."""
    ruined = []
    for g in groups:
        option = next(o for o in curves[g.name] if int(o.level) == keep[g.name])
        if option.damage >= additive_damage(DESTROYED_DAMAGE):
            ruined.append(f"{g.name} at {keep[g.name]} of {g.channels} channels (D = {option.damage / 1e3:.2f})")
    if ruined:
        raise ConfigError(f"{what} {target} cannot be met without destroying the model's output: the plan needs "
                          f"{'; '.join(ruined[:3])}, where the group pruned alone already changes the output by "
                          "its own energy (D = ‖f − f₀‖²/‖f₀‖² on calibration samples). Ask for less")


def additive_damage(damage: float) -> float:
    """What the allocation adds up: D / (1 − D) for the measured D = ‖f − f₀‖²/‖f₀‖². Small damages add
    (independent output errors add in energy) and D / (1 − D) ≈ D there; but D is bounded — an output that
    is destroyed has changed by about its own energy, D ≈ 1 — so summing raw D would rate wiping out the
    model with one group as no worse than a few moderate steps. Past D = 1 the option is unaffordable."""
    return damage / (1.0 - damage) if damage < DESTROYED_DAMAGE else 1e3 * damage


def _probe_widths(options: list[int], scores: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` widths below full width, spread evenly over the options, always with the narrowest
    (where damage is largest) and the widest that removes a channel carrying some score."""
    below = options[:-1]
    if len(below) <= count:
        chosen = below
    else:
        chosen = sorted({below[round(i * (len(below) - 1) / (count - 1))] for i in range(count)})
    live = [k for k in below if removed_share(scores, k) > 0]
    if live and live[-1] not in chosen:
        chosen = sorted({*chosen, live[-1]})
    return chosen


def _interpolate(points: dict[int, float], k: int, scores: np.ndarray) -> float:
    """Measured damage at width k: exact at probed widths; between two, linear in the removed score share
    (the curve's shape), which tracks damage better than the width does."""
    if k in points:
        return points[k]
    below = max((p for p in points if p < k), default=None)
    above = min(p for p in points if p > k)
    if below is None:  # narrower than every probe: extrapolate from the narrowest along the score share
        narrow = min(points)
        share = removed_share(scores, narrow)
        return points[narrow] * removed_share(scores, k) / share if share > 0 else points[narrow]
    s_lo, s_hi, s_k = (removed_share(scores, x) for x in (above, below, k))  # share grows as k shrinks
    if s_hi - s_lo <= 0:
        return points[below]
    t = (s_k - s_lo) / (s_hi - s_lo)
    return points[above] + t * (points[below] - points[above])


def _nearest(options: list[int], value: float) -> int:
    return min(options, key=lambda k: (abs(k - value), k))


def _masked_weight(view: GraphView, layer: Layer, mask: np.ndarray, consumer: Consumer) -> np.ndarray:
    """The consumer's weight with the input columns of the group's removed channels zeroed."""
    w = layer.canonical(view.constant(layer.weight_name))
    place = consumer.place
    channels = np.ones(place.space, bool)
    channels[place.offset:place.offset + place.count] = mask[place.lo:place.hi]
    return layer.stored(w * np.repeat(channels, consumer.width)[None, None, :])


def _uniform(model, groups, options, budget) -> dict[str, int]:
    """The largest single kept fraction f (each group at its width option nearest f·C) within budget."""
    lo, hi = 0.0, 1.0
    best = {g.name: options[g.name][0] for g in groups}
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        keep = {g.name: _nearest(options[g.name], mid * g.channels) for g in groups}
        if model.exact(keep) <= budget:
            lo, best = mid, keep
        else:
            hi = mid
    return best


def _allocate(model, groups, curves, budget) -> dict[str, int]:
    """Least Σ damage with the exact cost within ``budget``: the better (less Σ damage, within budget) of
    the convex-hull allocation on the linear costs and the greedy descent on the exact costs. The linear
    costs are exact when every node is in one group; a group tied to every layer (a residual stream that
    the option-A shortcuts join across stages) makes the exact cost bilinear in two groups' widths almost
    everywhere, and then only the greedy descent sees the real price of each step."""
    candidates = [keep for keep in (_allocate_linear(model, groups, curves, budget),
                                    _allocate_greedy(model, groups, curves, budget)) if keep is not None]
    if not candidates:
        return {g.name: int(curves[g.name][0].level) for g in groups}

    return min(candidates, key=lambda keep: (summed_damage(curves, keep), -model.exact(keep)))


def summed_damage(curves: dict[str, list[Option]], keep: dict[str, int]) -> float:
    """Σ over groups of the damage curve at the kept width."""
    return sum(next(o.damage for o in curves[name] if int(o.level) == k) for name, k in keep.items())


def _allocate_linear(model, groups, curves, budget) -> dict[str, int] | None:
    """Allocate on the linear costs, then lower the linear budget by the overshoot until the exact total
    fits (None if it never does)."""
    fixed = model.exact({g.name: g.channels for g in groups}) - sum(curve[-1].cost for curve in curves.values())
    linear_budget = budget - fixed
    floor = sum(c[0].cost for c in curves.values())
    for _ in range(30):
        try:
            chosen = allocate(curves, max(linear_budget, floor), what=f"{model.unit} target")
        except ConfigError:
            return None
        keep = {name: int(option.level) for name, option in chosen.items()}
        overshoot = model.exact(keep) - budget
        if overshoot <= 0:
            return keep
        linear_budget -= max(overshoot, 1e-6 * budget)
        if linear_budget < floor - 1e-9:
            return None
    return None


def _allocate_greedy(model, groups, curves, budget) -> dict[str, int] | None:
    """From full width, repeatedly narrow the group whose step (to any narrower width) adds the least damage
    per unit of exact cost saved. Steps that reach the budget are candidate endings (a large step that ends
    far below it is compared by its total damage, never by its rate); the best ending wins (None if none)."""
    index = {g.name: len(curves[g.name]) - 1 for g in groups}

    def keep_of(chosen):
        return {name: int(curves[name][i].level) for name, i in chosen.items()}

    def damage_of(chosen):
        return sum(curves[name][i].damage for name, i in chosen.items())

    current = model.exact(keep_of(index))
    if current <= budget:
        return keep_of(index)
    best_end = None
    while True:
        step = None
        keep = keep_of(index)
        for name, i in index.items():
            for j in range(i):
                trial = {**index, name: j}
                cost = current + model.change(keep, name, int(curves[name][j].level))
                if cost <= budget:
                    total = damage_of(trial)
                    if best_end is None or total < best_end[0]:
                        best_end = (total, trial)
                    continue
                saved = current - cost
                if saved <= 0:
                    continue
                rate = (curves[name][j].damage - curves[name][i].damage) / saved
                if step is None or rate < step[0]:
                    step = (rate, name, j, cost)
        if step is None or (best_end is not None and damage_of(index) >= best_end[0]):
            return None if best_end is None else keep_of(best_end[1])
        _, name, j, _ = step
        index[name] = j
        current = model.exact(keep_of(index))


__all__ = ["ChannelPlan", "plan_channels", "width_options", "exact_macs", "group_mask", "removed_channels",
           "removed_sets"]
