"""Choose each layer's rank (and S size) for ``--rank-ratio`` or a global params / MACs / latency target.

Options per layer: dense, or a factorization with rank r of L on a grid (multiples of ``channel_multiple``
under the latency objective, ≤ 32 evenly spaced ranks otherwise). For lowrank-sparse, S gets the share
``sparse_share`` of the layer's parameters: p_L = r·(Cout + d), S = p_L·share/(1 − share) nonzeros
(unstructured) or ⌊that/(d + 1)⌋ whole rows (merged into the pair: inner size r + c); under a global
target it also offers L alone at every rank, and with an unstructured S also S alone (L = 0: the layer kept
as a sparse layer with the parameters of rank r), so each part is used only where its measured damage per
parameter pays — at equal parameters L + S then has the sparse-only and the low-rank-only plans among its
choices.
With ``--lowrank-form tucker2`` a k×k Conv is offered as Tucker-2 (r₁ = r ≤ min(Cin, Cout)) instead, with
``auto`` as both (kind "T" beside "L"), each priced and damaged on its own curve.
Costs of the exported form: nonzero weights; MACs/sample = positions·k·(d + Cout) (+ positions·Cout·d
for a dense-stored S branch; Tucker-2: input positions·Cin·r + positions·r·(r·kh·kw + Cout)); latency = the
pair (triple) timed against the dense layer in onnxruntime.
Damage: the output damage of the model with the layer alone at probe ranks, measured in onnxruntime
(as in ``sensitivity.py``), interpolated in r; below the smallest probe it follows e(r), the share of the
energy of W·diag(√E[x²]) beyond rank r (the whitened SVD curve with the input second moment taken
diagonal). An L+S option counts as the rank with the same parameters. Allocation: ``allocate.py`` (least Σ damage under the budget).
Pair prices in context: a pair timed alone is not the pair in the graph (ResNet-56 here: the 64-channel
layers factorized save 1.44× what their pairs alone predict), so each shape's pair savings are scaled to what
the whole graph measures (``calibrate_in_context``).
Under ``--objective latency`` a factorization measured no faster than its dense layer — alone, or in the
whole graph — is never chosen.
"""

from __future__ import annotations

import dataclasses

from dataclasses import asdict, dataclass, field

import numpy as np

from ..algorithms.factorize import RankSpec
from ..analysis.layers import Layer
from ..calib.readers import SampleSet
from ..config import CompressConfig
from ..cost.footprint import node_macs
from ..errors import ConfigError
from ..export.qdq import timing_precision
from ..onnxio.graph import GraphView
from .allocate import Option, allocate
from .latency import (LatencyTable, context_factor, feed_batch, in_context, latency_unit, meet_measured_latency,
                      node_key, target_of_int8_original, timing_feed)
from .sensitivity import input_second_moments, output_damage

PROBE_RATIOS = (0.125, 0.25, 0.5, 0.75)  # probe ranks (fractions of full rank) whose damage is measured
MAX_GRID = 32
ENERGY_FLOOR = 1e-6  # energy (spans) below this are treated as empty


@dataclass
class RankPlan:
    specs: dict[str, RankSpec | None]  # None: the layer stays dense
    strategy: str
    dense_reasons: dict[str, str] = field(default_factory=dict)
    planned: dict = field(default_factory=dict)  # {"params"|"macs"|"latency_ms": [planned, original]}
    measured_damage: dict[str, float] = field(default_factory=dict)
    latency_ratios: dict[str, float] = field(default_factory=dict)  # chosen pair / dense, measured
    latency_search: list = field(default_factory=list)  # LatencyStep per plan timed (--target-latency)
    latency_ratio_measured: float | None = None  # the chosen plan's graph, A/B against the original
    latency_context: dict[str, float] = field(default_factory=dict)  # layer -> in-context factor on its saving

    def report(self) -> dict:
        return {"strategy": self.strategy, "planned": self.planned,
                "ranks": {n: (None if s is None else {"rank": s.rank, "sparse": s.sparse_structure,
                                                      "sparse_count": s.sparse_count, "input_rank": s.input_rank})
                          for n, s in self.specs.items()},
                "kept_dense": self.dense_reasons, "measured_output_damage": self.measured_damage,
                "pair_latency_ratio": self.latency_ratios, "pair_in_context_factor": self.latency_context,
                "latency_ratio_measured_at_plan": self.latency_ratio_measured,
                "latency_search": [asdict(step) for step in self.latency_search]}


@dataclass(frozen=True)
class _Choice:
    spec: RankSpec
    params: int
    inner: int
    macs: int
    equivalent_rank: float
    kind: str = "L"  # L alone | L+S | S alone (rank 0: a sparse layer, stored dense) | T (Tucker-2)


def rank_grid(full: int, objective: str, multiple: int) -> list[int]:
    if objective == "latency" and full >= 2 * multiple:
        return list(range(multiple, full, multiple))
    count = min(full - 1, MAX_GRID)
    return sorted({max(1, int(round(v))) for v in np.linspace(1, full - 1, count)}) if full > 1 else []


def _ranks(full: int, config: CompressConfig) -> list[int]:
    """The one rank of ``--rank-ratio`` (of full rank ``full``), or the grid the allocation chooses from."""
    if config.rank_ratio is not None:
        return [max(1, min(full, int(round(config.rank_ratio * full))))]
    return rank_grid(full, config.objective, config.channel_multiple)


def choice_for(layer: Layer, rank: int, config: CompressConfig, positions: int, with_sparse: bool = True
               ) -> _Choice:
    """The exported cost of rank ``rank`` (with its S for lowrank-sparse) on ``layer``."""
    rows, d = layer.out_features, layer.in_features
    low = rank * (rows + d)
    spec, inner, params, branch = RankSpec(rank), rank, low, 0
    with_sparse = with_sparse and config.method == "lowrank-sparse"
    if with_sparse:
        extra = low * config.sparse_share / (1 - config.sparse_share)
        if config.sparse_structure == "rows":
            count = min(rows, int(extra // (d + 1)))
            spec, inner, params = RankSpec(rank, "rows", count), rank + count, low + count * (d + 1)
        else:
            count = min(rows * d, int(extra))
            spec, params, branch = RankSpec(rank, "unstructured", count), low + count, rows * d
    return _Choice(spec, params, inner, positions * (inner * (rows + d) + branch), params / (rows + d),
                   "L+S" if with_sparse else "L")


def sparse_choice(layer: Layer, rank: int, positions: int) -> _Choice:
    """S alone with the parameters of rank ``rank``: k = r·(Cout + d) nonzeros in the dense layer."""
    rows, d = layer.out_features, layer.in_features
    count = min(rows * d, rank * (rows + d))
    return _Choice(RankSpec(0, "unstructured", count), count, 0, positions * rows * d, count / (rows + d), "S")


def tucker_able(layer: Layer) -> bool:
    """A single-group Conv with a spatial kernel (a 1×1 conv's Tucker-2 is its pair) and rank ≥ 2."""
    return layer.op_type == "Conv" and layer.groups == 1 and layer.taps > 1 and tucker_full_rank(layer) >= 2


def tucker_full_rank(layer: Layer) -> int:
    return min(layer.out_features, layer.in_features // layer.taps)


def tucker_choice(layer: Layer, rank: int, positions: int, input_positions: int) -> _Choice:
    """Tucker-2 of rank r = r₁: 1×1 Cin→r at the input's positions, k×k r→r and 1×1 r→Cout at the output's."""
    taps, channels = layer.taps, layer.in_features // layer.taps
    params = channels * rank + rank * rank * taps + rank * layer.out_features
    macs = input_positions * channels * rank + positions * rank * (rank * taps + layer.out_features)
    return _Choice(RankSpec(rank, width=taps, input_rank=rank), params, rank, macs, float(rank), "T")


def _sparse_alone(config: CompressConfig) -> bool:
    """S alone is offered for an unstructured S under a global target (it is the sparse method's form)."""
    return (config.method == "lowrank-sparse" and config.sparse_structure == "unstructured"
            and config.rank_ratio is None)


def plan_ranks(view: GraphView, layers: list[Layer], samples: SampleSet, config: CompressConfig) -> RankPlan:
    one = {name: array[:1] for name, array in samples.arrays.items()}
    costs = node_macs(view.model, one, config.threads)
    specs: dict[str, RankSpec | None] = {l.name: None for l in layers}
    reasons: dict[str, str] = {}
    eligible = []
    for layer in layers:
        if layer.groups > 1:
            reasons[layer.name] = f"grouped conv (group={layer.groups}): a factorized split is slower"
        elif min(layer.out_features, layer.in_features) < 2:
            reasons[layer.name] = "rank 1 already"
        else:
            eligible.append(layer)
    positions = {l.name: costs[l.node_index].positions if l.node_index in costs else 1 for l in layers}
    input_positions = {l.name: int(np.prod(costs[l.node_index].input_shape[2:])) for l in layers
                       if tucker_able(l) and l.node_index in costs}
    timing, timed = None, one
    if config.objective == "latency" or config.target_latency is not None:
        timing = LatencyTable(config.threads, precision=timing_precision(layers, config.quantize,
                                                                         config.int8_activations, config.int8_smoothing))
        timed = timing_feed(samples, config.latency_batch, config.latency_seq_len)
        if config.quantize == "int8" and config.target_latency is not None:  # plans are timed against int8's
            config = dataclasses.replace(config, target_latency=target_of_int8_original(
                config, lambda: timing.int8_ratio(view.model, timed)))
    grids = {}
    for layer in eligible:
        grid = _ranks(min(layer.out_features, layer.in_features), config)
        choices = [choice_for(layer, r, config, positions[layer.name]) for r in grid]
        if config.lowrank_form != "pair" and layer.name in input_positions:
            tucker = [tucker_choice(layer, r, positions[layer.name], input_positions[layer.name])
                      for r in _ranks(tucker_full_rank(layer), config)]
            choices = tucker if config.lowrank_form == "tucker2" else choices + tucker
        if config.method == "lowrank-sparse" and config.rank_ratio is None:  # S only where it pays
            choices += [choice_for(layer, r, config, positions[layer.name], with_sparse=False) for r in grid]
        if _sparse_alone(config):
            choices += [sparse_choice(layer, r, positions[layer.name]) for r in grid]
        choices = [c for c in choices if c.params < layer.num_weights]
        if timing is not None:
            node, shape = view.nodes[layer.node_index], costs[layer.node_index].input_shape
            weight = view.constant(layer.weight_name)
            faster = []
            for c in choices:
                dense_ms, ratio = timing.pair_ratio(node, (feed_batch(timed), *shape[1:]), weight, c.inner,
                                                    c.spec.input_rank)
                if config.objective == "size" or ratio < 1.0:
                    faster.append((c, dense_ms, ratio))
            grids[layer.name] = faster
        else:
            grids[layer.name] = [(c, 0.0, 1.0) for c in choices]
        if not grids[layer.name]:
            reasons[layer.name] = ("no rank on the grid is faster than the dense layer in onnxruntime here"
                                   if timing is not None else "no rank with fewer parameters than the dense layer")
    context: dict[str, float] = {}
    if timing is not None:
        context = calibrate_in_context(view, [l for l in eligible if grids[l.name]], grids,
                                       {l.name: costs[l.node_index].input_shape for l in eligible}, timed, timing,
                                       drop_slower=config.objective == "latency", reasons=reasons)
        timing.save()
    eligible = [l for l in eligible if grids[l.name]]
    if config.rank_ratio is not None:
        for layer in eligible:
            specs[layer.name] = grids[layer.name][0][0].spec
        plan = RankPlan(specs, f"rank ratio {config.rank_ratio}", reasons)
        plan.latency_ratios = {l.name: grids[l.name][0][2] for l in eligible if timing is not None}
        plan.latency_context = {l.name: context[l.name] for l in eligible if l.name in context}
        plan.planned = _planned(layers, specs, grids, positions)
        return plan
    if not eligible:
        raise ConfigError("the target cannot be met: no layer can be factorized ("
                          + "; ".join(f"{n}: {r}" for n, r in list(reasons.items())[:4]) + ")")
    curves, damage = _damage_curves(view, eligible, samples, config)
    options, measure, budget, what, fixed, original = _options(view, layers, eligible, grids, curves, positions,
                                                               costs, timed, config, timing, context)
    slow = sum("faster" in r for r in reasons.values())
    forms = "factor pair" if config.lowrank_form == "pair" else "factor pair or Tucker-2 triple"
    why_slow = (f"{slow} layers have no {forms} faster than the dense layer in onnxruntime here (per-call "
                "overhead dominates small layers); " if slow else "")
    search, measured = [], None
    if measure == "latency_ms":
        hint = f"{why_slow}ask for less, or use --method channel instead"
        chosen, measured, search = _meet_latency(view, eligible, grids, options, fixed, original, timed, config,
                                                 timing, hint)
    else:
        cheapest = fixed + sum(min(o.cost for o in opts) for opts in options.values())
        if cheapest > budget + fixed + 1e-9 * original:
            raise ConfigError(f"the {what} cannot be met by factorization: the strongest ranks on the grid bring "
                              f"the model to {cheapest / original:.3f} of the original's {measure}; {why_slow}"
                              "ask for less, or use " + ("--method sparse (any sparsity)" if measure == "params"
                                                         else "--method channel") + " instead")
        chosen = allocate(options, budget, what=what)
    for layer in eligible:
        level = chosen[layer.name].level
        if level >= 0:
            specs[layer.name] = grids[layer.name][int(level)][0].spec
        else:
            reasons.setdefault(layer.name, f"kept dense by the allocation (its {measure} buy more elsewhere)")
    plan = RankPlan(specs, f"allocated under {what}", reasons, measured_damage=damage)
    plan.latency_ratios = {l.name: grids[l.name][int(chosen[l.name].level)][2]
                           for l in eligible if timing is not None and chosen[l.name].level >= 0}
    plan.planned = _planned(layers, specs, grids, positions)
    plan.planned[measure] = [fixed + sum(chosen[l.name].cost for l in eligible), original]
    plan.latency_search, plan.latency_ratio_measured = search, measured
    plan.latency_context = {l.name: context[l.name] for l in eligible if l.name in context}
    return plan


def calibrate_in_context(view: GraphView, layers: list[Layer], grids: dict, input_shapes: dict[str, tuple],
                         timed: dict[str, np.ndarray], timing: LatencyTable, drop_slower: bool,
                         reasons: dict[str, str]) -> dict[str, float]:
    """Each layer's factor to turn its pairs' savings alone into savings in the whole graph.

    Layers of identical shape (op, attributes, input and weight shapes) are pooled; every member is
    factorized at its fastest rank alone and the graph timed against the original. With S_table = Σ t·(1 − r)
    (t the dense layer alone, r its pair ratio alone) and S_graph = T₀·(1 − measured ratio), c = S_graph /
    S_table (``context_factor``); an option's latency is then t·(1 − c·(1 − r)). A pool whose graph saves
    nothing (S_graph ≤ 0) is dropped from ``grids`` when ``drop_slower`` (the latency objective), its
    layers kept dense with the reason. Graph timings are cached like the pairs'."""
    pools: dict[tuple, list[Layer]] = {}
    for layer in layers:
        key = (repr(node_key(view.nodes[layer.node_index])), tuple(input_shapes[layer.name]),
               view.constant(layer.weight_name).shape)
        pools.setdefault(key, []).append(layer)
    total_ms = timing.model_ms(view.model, timed)
    context = {}
    for members in pools.values():
        fastest = {l.name: min(grids[l.name], key=lambda option: option[2]) for l in members}  # (choice, t, r)
        table_saving = sum(ms * (1.0 - ratio) for _, ms, ratio in fastest.values())
        graph = random_factors(view, members, {name: choice for name, (choice, _, _) in fastest.items()})
        graph_saving = total_ms * (1.0 - timing.plan_ratio(view.model, graph, timed))
        if graph_saving <= 0.0 and drop_slower:
            for layer in members:
                grids[layer.name] = []
                reasons[layer.name] = (f"its factor pair is faster alone ({table_saving / total_ms:.3f} of the model's "
                                       "time saved by the pairs of its shape) but no faster in the whole graph "
                                       f"({graph_saving / total_ms:+.3f} measured)")
            continue
        context.update({l.name: context_factor(table_saving, graph_saving) for l in members})
    return context


def random_factors(view: GraphView, layers: list[Layer], chosen: dict[str, _Choice]):
    """The graph with each of ``layers`` in the exported form of ``chosen[name]`` (its pair, or Tucker-2
    triple) holding random values (the time of a graph does not depend on its weight values)."""
    from ..export.lowrank import factorize, random_factored

    rng = np.random.default_rng(0)
    return factorize(view.model, [random_factored(l, chosen[l.name].inner, chosen[l.name].spec.input_rank, rng)
                                  for l in layers])


def _meet_latency(view, eligible, grids, options, fixed, total, timed, config, timing, hint):
    """Per layer the option whose exported graph, as a whole, measures ≤ ``config.target_latency`` of the
    original's latency on ``timed`` (``meet_measured_latency`` searches the table's budget; the factors' values
    do not matter for the time, so each plan is timed with random factors of its inner sizes). Returns the
    options, the measured ratio and the plans timed."""
    def plan_at(budget_ratio):
        try:
            chosen = allocate(options, budget_ratio * total - fixed)
        except ConfigError:  # beyond what the table thinks possible: time the strongest ranks
            chosen = {name: min(opts, key=lambda o: o.cost) for name, opts in options.items()}
        return (tuple(sorted((name, o.level) for name, o in chosen.items())),
                (fixed + sum(o.cost for o in chosen.values())) / total)

    def measured_ratio(plan):
        levels = dict(plan)
        chosen = [l for l in eligible if levels[l.name] >= 0]
        forms = {l.name: grids[l.name][int(levels[l.name])][0] for l in chosen}
        return timing.plan_ratio(view.model, random_factors(view, chosen, forms), timed)

    unit = latency_unit(timed)
    plan, measured, search = meet_measured_latency(plan_at, measured_ratio, config.target_latency, hint,
                                                   unit=unit, measured_unit=unit)
    timing.save()
    levels = dict(plan)
    return ({name: next(o for o in options[name] if o.level == levels[name]) for name in options}, measured,
            search)


def _planned(layers, specs, grids, positions) -> dict:
    params = macs = params0 = macs0 = 0
    for layer in layers:
        dense_params, dense_macs = layer.num_weights, positions[layer.name] * layer.out_features * layer.in_features // layer.groups
        params0, macs0 = params0 + dense_params, macs0 + dense_macs
        spec = specs[layer.name]
        if spec is None:
            params, macs = params + dense_params, macs + dense_macs
        else:
            c = next(c for c, _, _ in grids[layer.name] if c.spec == spec)
            params, macs = params + c.params, macs + c.macs
    return {"params": [params, params0], "layer_macs": [macs, macs0]}


def _damage_curves(view, layers, samples, config):
    """{(layer, kind): curve}: lowrank-sparse measures L+S, L alone (and S alone for an unstructured S),
    lowrank only L."""
    kinds = ("L+S", "L") if config.method == "lowrank-sparse" else ("L",)
    kinds += ("S",) if _sparse_alone(config) else ()
    kinds += ("T",) if config.lowrank_form != "pair" else ()
    subset = samples.spread(config.sensitivity_samples)
    second = input_second_moments(view, layers, subset, config.batch_size, config.threads)
    removed = output_damage(view, {l.name: {l.weight_name: np.zeros_like(view.constant(l.weight_name))}
                                   for l in layers}, subset, config.batch_size, config.threads, logits_kl=True)
    curves, measured = {}, {name: {"0": d} for name, d in removed.items()}
    for kind in kinds:
        if kind == "T":
            of_kind = [l for l in layers if tucker_able(l)]
        elif config.lowrank_form == "tucker2":
            of_kind = [l for l in layers if not tucker_able(l)]
        else:
            of_kind = layers
        if not of_kind:
            continue
        part, damage = _damage_curves_of(view, of_kind, subset, second, removed, config, kind)
        curves.update({(name, kind): c for name, c in part.items()})
        for name, d in damage.items():
            measured.setdefault(f"{name}{'' if kind == 'L' else f' ({kind})'}", {}).update(d)
    return curves, measured


def _damage_curves_of(view, layers, subset, second, removed, config, kind: str):
    """Predicted damage per rank (index r) of each layer, and the measured damage at the probes.

    The model output damage D (as in ``sensitivity.py``) is measured with the layer alone at the probe
    ranks p, each probe the method's structure with the parameters of rank p in the diagonal data metric
    (``_probe_weight``), and with the layer removed (W = 0, ``removed``: D(0)); between probes D is
    interpolated linearly in the equivalent rank (D(full) = 0). Below the smallest probe p₀ it follows
    the energy curve e(r) — the share of the scaled weight's energy beyond rank r (L, L+S) or outside its
    r·(Cout + d) largest entries (S alone): for L alone in proportion, D(r) = D(p₀)·e(r)/e(p₀) (e is the
    truncation's own error in the diagonal metric); with an S part e is only a shape, so D goes from D(p₀)
    to D(0) in it, D(r) = D(p₀) + (D(0) − D(p₀))·(e(r) − e(p₀)) / (1 − e(p₀)) — a layer barely hurt at p₀
    can still be ruined far below it (ResNet-20 at params 0.3: 3.5 pt drop without the anchor, 1.6 with),
    while anchoring L alone too made its plans worse there (18.0 → 22.5 pt)."""
    energy_curves, probes, ranks = {}, {}, {}
    for layer in layers:
        w = layer.canonical(view.constant(layer.weight_name))[0].astype(np.float64)
        scale = np.sqrt(np.maximum(second[layer.name][0], 0)) + 1e-12
        if kind == "T":
            energy_curves[layer.name], ranks[layer.name], approx_at = _tucker_curve(layer, w * scale)
            for p in ranks[layer.name]:
                probes[(layer.name, p)] = {layer.weight_name: layer.stored((approx_at(p) / scale)[None])}
            continue
        u, s, vh = np.linalg.svd(w * scale, full_matrices=False)
        energy = s ** 2
        tail = np.concatenate([[energy.sum()], energy.sum() - np.cumsum(energy)])
        if kind == "S":
            entries = np.sort(np.square(w * scale).reshape(-1))[::-1]
            kept = np.concatenate([[0.0], np.cumsum(entries)])
            counts = np.minimum(np.arange(len(s) + 1) * sum(w.shape), entries.size)
            tail = entries.sum() - kept[counts]
        energy_curves[layer.name] = tail / (energy.sum() or 1.0)
        ranks[layer.name] = sorted({max(1, int(round(f * len(s)))) for f in PROBE_RATIOS} - {len(s)})
        for p in ranks[layer.name]:
            approx = _probe_weight(w * scale, u, s, vh, p, config, kind) / scale
            probes[(layer.name, p)] = {layer.weight_name: layer.stored(approx[None])}
    damage = output_damage(view, probes, subset, config.batch_size, config.threads, logits_kl=True)
    curves, measured = {}, {}
    for layer in layers:
        full = len(energy_curves[layer.name]) - 1
        points = ranks[layer.name]
        values = [damage[(layer.name, p)] for p in points]
        measured[layer.name] = dict(zip(map(str, points), values))
        grid = np.arange(full + 1)
        curve = np.interp(grid, points + [full], values + [0.0])
        low = grid < points[0]
        e = energy_curves[layer.name]
        first, zero = float(e[points[0]]), max(removed[layer.name], values[0])
        if kind in ("L", "T") and first > ENERGY_FLOOR:  # rank alone: damage in proportion to the energy tail
            curve[low] = values[0] * e[low] / first
        elif 1.0 - first > ENERGY_FLOOR:  # with S (or an exact probe): anchored at the removed layer
            curve[low] = values[0] + (zero - values[0]) * (e[low] - first) / (1.0 - first)
        else:  # the probe keeps no energy either: linear in r
            curve[low] = zero + (values[0] - zero) * grid[low] / points[0]
        curves[layer.name] = np.maximum.accumulate(curve[::-1])[::-1]  # never less damage at a lower rank
    return curves, measured


def _tucker_curve(layer: Layer, ws: np.ndarray):
    """Tucker-2 (r = r₁) of the diagonally scaled W = ``ws``: the energy share beyond it for r = 0..full, the
    probe ranks, and the projection at a rank."""
    import torch

    from ..algorithms.projections.lowrank import tucker2

    taps = layer.taps
    full = tucker_full_rank(layer)
    v = torch.from_numpy(ws)[None]

    def approx_at(rank: int) -> np.ndarray:
        return tucker2(v, rank, rank, taps)[0].numpy()

    energy = float((v ** 2).sum()) or 1.0
    tail = np.array([1.0] + [float(((v[0] - torch.from_numpy(approx_at(r))) ** 2).sum()) / energy
                             for r in range(1, full + 1)])
    return tail, sorted({max(1, int(round(f * full))) for f in PROBE_RATIOS} - {full}), approx_at


def _probe_weight(ws: np.ndarray, u, s, vh, p: int, config: CompressConfig, kind: str) -> np.ndarray:
    """The structure at the parameters of rank p, data-free (diagonally scaled W = ``ws``, its SVD u s vh):
    rank p for L alone; for L+S rank r = p·(1 − share) plus S from the residual — the c rows of largest
    norm, or the k largest entries — with the rest of p·(Cout + d) parameters; for S alone the p·(Cout + d)
    largest entries of ``ws``."""
    if kind == "L":
        return (u[:, :p] * s[:p]) @ vh[:p]
    rows, d = ws.shape
    r = 0 if kind == "S" else max(1, int(round(p * (1 - config.sparse_share))))
    low = (u[:, :r] * s[:r]) @ vh[:r]
    residual = ws - low
    budget = max(0, (p - r) * (rows + d))
    keep = np.zeros_like(residual, dtype=bool)
    if config.sparse_structure == "rows":
        count = min(rows, budget // (d + 1))
        keep[np.argsort(-np.square(residual).sum(1), kind="stable")[:count]] = True
    else:
        flat = np.argsort(-np.abs(residual).reshape(-1), kind="stable")[:min(budget, residual.size)]
        keep.reshape(-1)[flat] = True
    return low + residual * keep


def _curve_at(curve: np.ndarray, rank: float) -> float:
    """The curve at a fractional rank (linear between integers)."""
    return float(np.interp(min(rank, len(curve) - 1), np.arange(len(curve)), curve))


def _options(view, layers, eligible, grids, curves, positions, costs, timed, config, timing, context):
    """Options per eligible layer (level = index on its grid, −1 = dense), the measure, the budget for the
    eligible layers, its name, the cost outside them and the original total. Latency options are priced in
    context: t·(1 − c·(1 − r))."""
    fixed_dense = [l for l in layers if l not in eligible]
    if config.target_latency is not None:
        total_ms = timing.model_ms(view.model, timed)
        options = {l.name: [Option(-1, grids[l.name][0][1], 0.0)] +
                   [Option(i, ms * in_context(ratio, context.get(l.name, 1.0)),
                           _curve_at(curves[(l.name, c.kind)], c.equivalent_rank))
                    for i, (c, ms, ratio) in enumerate(grids[l.name])] for l in eligible}
        movable = sum(grids[l.name][0][1] for l in eligible)
        budget = config.target_latency * total_ms - (total_ms - movable)
        return (options, "latency_ms", budget, f"--target-latency {config.target_latency}", total_ms - movable,
                total_ms)
    if config.target_macs is not None:
        dense = {l.name: positions[l.name] * l.out_features * l.in_features for l in eligible}
        total = sum(c.dense for c in costs.values())
        options = {l.name: [Option(-1, dense[l.name], 0.0)] +
                   [Option(i, c.macs, _curve_at(curves[(l.name, c.kind)], c.equivalent_rank))
                    for i, (c, _, _) in enumerate(grids[l.name])] for l in eligible}
        fixed = total - sum(dense.values())
        return options, "macs", config.target_macs * total - fixed, f"--target-macs {config.target_macs}", fixed, total
    options = {l.name: [Option(-1, l.num_weights, 0.0)] +
               [Option(i, c.params, _curve_at(curves[(l.name, c.kind)], c.equivalent_rank))
                for i, (c, _, _) in enumerate(grids[l.name])] for l in eligible}
    total = sum(l.num_weights for l in layers)
    fixed = sum(l.num_weights for l in fixed_dense)
    return options, "params", config.target_params * total - fixed, f"--target-params {config.target_params}", fixed, total
