"""Per-layer latency table measured in onnxruntime on this machine, for a latency target.

Each Conv / Gemm / MatMul that a channel group touches is cut out as a one-node model at its observed
input shape (at ``--latency-batch``, default 1) and timed A/B against itself with the group's side
narrowed to each candidate width (interleaved rounds, median of per-round ratios; ``cost/timing.py``).
Times are cached per (op, attributes, shapes, threads), in memory and in
``$XDG_CACHE_HOME/onnxadmm/latency-<ort>-<cpu>.json``.

Model latency for kept widths k:  T(k) = T₀ − Σ_n t_n + Σ_n t_n · Π_{g ∋ n} r_n,g(k_g)
(T₀ the whole model, t_n a node alone at full width, r the measured ratio; nodes outside every group and
the non-MAC ops are taken as unchanged).

The table prices the options against each other; whether a plan meets the target is decided on the
whole exported graph (``meet_measured_latency``): a node timed alone is not the node in context
(ResNet-56 here: a plan the table put at 0.667 of the original measured 0.552).
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..analysis.channels import ChannelGroup
from ..calib.readers import SampleSet
from ..cost.timing import measure, timed
from ..errors import ConfigError, ExportError
from ..onnxio.graph import GraphView, attributes
from ..onnxio.outputs import OutputSet
from ..onnxio.runtime import cpu_threads, session
from ..onnxio.scratch import cache_root

ROUNDS = 15
PLAN_ROUNDS = 100  # A/B rounds when a whole planned model is timed against the original
SEARCH_STEPS = 6  # plans timed at most per latency target
SEARCH_TOLERANCE = 0.02  # a plan measured within this below the target ends the search


def _cache_path() -> Path:
    import onnxruntime

    return cache_root() / f"latency-{onnxruntime.__version__}-{platform.machine()}.json"


class LatencyTable:
    """Times (ms) of one-node models, measured once per shape and kept on disk."""

    def __init__(self, threads: int, use_disk: bool = True, precision: str = "none", timer=measure):
        """``timer``: the A/B measurement (``cost.timing.measure``'s signature; a test passes synthetic times)."""
        self.threads = cpu_threads(threads)
        self.timer = timer
        self.precision = precision  # "int8" / "int8-dynamic"[-smoothed]: whole graphs are timed in that int8 form
        self.path = _cache_path() if use_disk else None
        self.entries: dict[str, float] = {}
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def ratio(self, node: onnx.NodeProto, input_shape: tuple[int, ...], weight: np.ndarray,
              narrowed: dict[str, int]) -> tuple[float, float]:
        """(full-width ms, narrowed/full ratio) of ``node`` alone; ``narrowed`` gives the new size of
        "out" (output channels/features) and/or "in" (input channels/features)."""
        def run():
            small = x[tuple(slice(0, d) for d in _narrowed_input(node, input_shape, narrowed))]
            return self.timer(_one_node(node, input_shape, weight, {}), _one_node(node, input_shape, weight, narrowed),
                           {"x": x}, ROUNDS, self.threads, feed_b={"x": small})

        x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
        return self._cached((*node_key(node), tuple(input_shape), weight.shape, sorted(narrowed.items()),
                             self.threads), run)

    def pair_ratio(self, node: onnx.NodeProto, input_shape: tuple[int, ...], weight: np.ndarray,
                   inner: int, input_rank: int = 0) -> tuple[float, float]:
        """(dense ms, factor-pair/dense ratio) of ``node`` alone against its low-rank pair of inner size
        ``inner`` (the exported form of ``export/lowrank.py``; with ``input_rank`` its Tucker-2 triple)."""
        def run():
            from ..analysis.layers import find_layers
            from ..export.lowrank import factorize, random_factored

            dense = _one_node(node, input_shape, weight, {})
            layer = find_layers(GraphView(dense)).layers[0]
            pair = factorize(dense, [random_factored(layer, inner, input_rank, np.random.default_rng(2))])
            x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
            return self.timer(dense, pair, {"x": x}, ROUNDS, self.threads)

        key = ("pair", *node_key(node), tuple(input_shape), weight.shape, inner, self.threads)
        return self._cached(key + ((("tucker2", input_rank),) if input_rank else ()), run)

    def grouped_ratio(self, node: onnx.NodeProto, input_shape: tuple[int, ...], weight: np.ndarray,
                      blocks: int) -> tuple[float, float]:
        """(dense ms, grouped/dense ratio in context) of Conv ``node`` against the same conv with ``blocks``
        groups (weight Cout × Cin/G × kh × kw: the exported form of ``export/grouped.py``).

        In context: onnxruntime runs a chain of convs in its blocked NCHWc layout only while every conv
        qualifies; a grouped conv whose channels per group are not a multiple of the block (16 with AVX-512,
        8 with AVX2 / NEON) leaves it, and the model pays a layout reorder on each side — which a node timed
        alone does not show (EfficientNet-Lite0 with every pair grouped: 0.92 of the MACs, 1.04–1.14 of the
        latency; its 40 → 240 1×1 conv at 28×28 measured 0.48 alone, 1.21 in context here). So the
        conv is also timed between two dense 1×1 convs (its neighbours in the model), dense against
        grouped: with t the node alone and Δ the sandwich's grouped − dense time, ratio = (t + Δ) / t."""
        def alone():
            return self.timer(_one_node(node, input_shape, weight, {}),
                           _one_node(node, input_shape, weight, {}, group=blocks), {"x": x}, ROUNDS, self.threads)

        def sandwiched():
            return self.timer(_one_node(node, input_shape, weight, {}, sandwich=True),
                           _one_node(node, input_shape, weight, {}, group=blocks, sandwich=True), {"x": x}, ROUNDS,
                           self.threads)

        x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
        key = (*node_key(node), tuple(input_shape), weight.shape, blocks, self.threads)
        dense_ms, _ = self._cached(("grouped", *key), alone)
        sandwich_ms, sandwich_ratio = self._cached(("grouped-sandwich", *key), sandwiched)
        return dense_ms, max(0.0, 1.0 + sandwich_ms * (sandwich_ratio - 1.0) / dense_ms)

    def int8_node_ratio(self, node: onnx.NodeProto, input_shape: tuple[int, ...], weight: np.ndarray
                        ) -> tuple[float, float]:
        """(fp32 ms, int8/fp32 ratio) of ``node`` alone in the int8 form ``precision`` names. Static QDQ is timed
        in the chain: uint8 in, uint8 out (``integer_chain``), as between int8 neighbours; dynamic with its run-time
        quantization of the input, which every dynamic layer pays."""
        from ..export.dynamic import quantize_dynamic_int8
        from ..export.qdq import integer_chain, rounded_qdq

        def run():
            dense = _one_node(node, input_shape, weight, {})
            if self.precision.startswith("int8-dynamic"):  # (one node: smoothing's Mul is timed with the graph)
                return self.timer(dense, quantize_dynamic_int8(dense, {}), {"x": x}, ROUNDS, self.threads)
            chain = integer_chain(rounded_qdq(dense, {"x": x}))
            x_u8 = np.random.default_rng(0).integers(0, 256, input_shape, dtype=np.uint8)
            return self.timer(dense, chain, {"x": x}, ROUNDS, self.threads, feed_b={chain.graph.input[0].name: x_u8})

        x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
        return self._cached((self.precision, *node_key(node), tuple(input_shape), weight.shape, self.threads), run)

    def plan_ratio(self, original: onnx.ModelProto, planned: onnx.ModelProto, feed: dict[str, np.ndarray],
                   precision: str | None = None) -> float:
        """Measured latency ratio of the graph ``planned`` against ``original`` (A/B, ``PLAN_ROUNDS`` rounds
        on ``feed``), cached like the per-node times under both graphs' structure (nodes, shapes; not the
        weight values, which do not change the time) — so a run repeated on this machine times nothing
        again and chooses the same plan. With precision int8 both graphs are timed as the int8 models the
        stage will make of them (QDQ, rounded weights: the values do not change the time), so savings are
        those of the integer kernels (see ``int8_ratio`` for the step from fp32 to int8). ``precision`` overrides
        the table's ("none": the two graphs timed as they are)."""
        precision = precision or self.precision

        def run():
            if precision != "none":
                return self.timer(rounded_int8(original, feed, precision),
                               rounded_int8(planned, feed, precision), feed, PLAN_ROUNDS, self.threads)
            return self.timer(original, planned, feed, PLAN_ROUNDS, self.threads)

        parts = ("plan", structure_digest(original), structure_digest(planned), _shapes(feed), self.threads)
        return self._cached(parts + ((precision,) if precision != "none" else ()), run)[1]

    def int8_ratio(self, original: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
        """Measured latency of the int8 form of ``original`` over its fp32 latency (cached like a plan): a
        target T of the fp32 original's latency is T / this of the int8 original's."""

        def run():
            return self.timer(original, rounded_int8(original, feed, self.precision), feed, PLAN_ROUNDS, self.threads)

        kind = "int8" if self.precision == "int8" else self.precision
        return self._cached((kind, structure_digest(original), _shapes(feed), self.threads), run)[1]

    def model_ms(self, model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
        """Median latency (ms) of the whole model on ``feed``, cached under its structure."""
        key = _key(("model", structure_digest(model), _shapes(feed), self.threads))
        if key not in self.entries:
            self.entries[key] = [model_latency_ms(model, feed, self.threads), 1.0]
        return float(self.entries[key][0])

    def _cached(self, parts: tuple, run) -> tuple[float, float]:
        """(A ms, B/A ratio) for the measurement named by ``parts``; ``run()`` measures it when not cached."""
        key = _key(parts)
        if key not in self.entries:
            result = run()
            self.entries[key] = [result.original_ms_median, result.ratio_median]
        full_ms, ratio = self.entries[key]
        return float(full_ms), float(ratio)

    def save(self) -> None:
        """Write the table to the disk cache (once, after a batch of measurements)."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with OutputSet() as cache:
                cache.write_text(self.path, "latency cache", json.dumps(self.entries))
                cache.commit()
        except (OSError, ExportError):
            self.path = None  # a read-only home: keep the table in memory only


def _key(parts: tuple) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _shapes(feed: dict[str, np.ndarray]) -> list:
    return sorted((name, array.shape) for name, array in feed.items())


def structure_digest(model: onnx.ModelProto) -> str:
    """sha256 of what a graph's speed depends on: its nodes (op, inputs, outputs, attributes), the
    initializers' names, types and shapes, and the graph inputs' types — not the weight values."""
    digest = hashlib.sha256()
    graph = model.graph
    for node in graph.node:
        digest.update(repr((node.op_type, node.domain, list(node.input), list(node.output),
                            node_key(node)[1])).encode())
    for tensor in graph.initializer:
        digest.update(repr((tensor.name, tensor.data_type, list(tensor.dims))).encode())
    for value in graph.input:
        digest.update(value.SerializeToString())
    return digest.hexdigest()


def node_key(node: onnx.NodeProto) -> tuple:
    """The node's op type and attributes, as they enter the cache key."""
    return node.op_type, sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)


def _narrowed_input(node: onnx.NodeProto, input_shape, narrowed: dict[str, int]) -> tuple[int, ...]:
    """The node's input shape once its input (or, for a grouped conv with Cin = Cout, its channels) is
    narrowed."""
    shape = list(input_shape)
    grouped = node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
    if "in" in narrowed:
        shape[1 if node.op_type == "Conv" else -1] = narrowed["in"]
    elif grouped and "out" in narrowed:
        shape[1] = narrowed["out"]
    return tuple(shape)


def _one_node(node: onnx.NodeProto, input_shape: tuple[int, ...], weight: np.ndarray,
              narrowed: dict[str, int], group: int | None = None, sandwich: bool = False) -> onnx.ModelProto:
    """``node`` alone on an input of ``input_shape``, its weight cut to the narrowed sizes (values random:
    dense kernels do not care); ``group`` makes a plain Conv a grouped one (Cin/group weight columns);
    ``sandwich`` puts a dense 1×1 Conv before (Cin → Cin) and after (Cout → Cout) a Conv."""
    shape = list(_narrowed_input(node, input_shape, narrowed))
    w_shape = list(weight.shape)
    attrs = attributes(node)
    out_axis, in_axis = _weight_axes(node, attrs)
    if "out" in narrowed:
        w_shape[out_axis] = narrowed["out"]
        if node.op_type == "Conv" and attrs.get("group", 1) > 1:  # grouped, Cin = Cout: fewer blocks
            attrs["group"] = attrs["group"] * narrowed["out"] // weight.shape[out_axis]
    if "in" in narrowed:
        w_shape[in_axis] = narrowed["in"]
    if group is not None:
        attrs["group"] = group
        w_shape[1] //= group
    rng = np.random.default_rng(1)
    inputs = ["x", "w"]
    inits = [numpy_helper.from_array((rng.standard_normal(w_shape) * 0.05).astype(np.float32), "w")]
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        inits.append(numpy_helper.from_array(np.zeros(w_shape[out_axis], np.float32), "b"))
        inputs.append("b")
    nodes = [helper.make_node(node.op_type, inputs, ["y"], **attrs)]
    if sandwich:
        cin, cout = shape[1], w_shape[out_axis]
        inits += [numpy_helper.from_array((rng.standard_normal((c, c, 1, 1)) * 0.05).astype(np.float32), name)
                  for c, name in ((cin, "w_before"), (cout, "w_after"))]
        nodes[0].input[0], nodes[0].output[0] = "x_inner", "y_inner"
        nodes = [helper.make_node("Conv", ["x", "w_before"], ["x_inner"]), nodes[0],
                 helper.make_node("Conv", ["y_inner", "w_after"], ["y"])]
    graph = helper.make_graph(nodes, "one_node", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _weight_axes(node: onnx.NodeProto, attrs: dict) -> tuple[int, int]:
    """(output axis, input axis) of the node's weight."""
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "Gemm" and attrs.get("transB", 0):
        return 0, 1
    return 1, 0


def latency_batch_size(samples: SampleSet, batch: int | None) -> int:
    """The batch a latency target is timed at: ``batch`` (--latency-batch), by default 1, or the model's
    fixed batch. ConfigError when the model's batch is fixed to another size."""
    fixed = samples.fixed_batch
    if batch is not None and fixed and batch != fixed:
        raise ConfigError(f"--latency-batch {batch}: the model's inputs have a fixed batch of {fixed}; "
                          f"use --latency-batch {fixed} or leave it out")
    return batch or fixed or 1


def target_of_int8_original(config, int8_ratio: Callable[[], float]) -> float:
    """``--target-latency`` with ``--quantize int8`` as a fraction of the int8 original's latency, what every plan
    is timed against: T itself with ``--target-latency-of int8``, else T / r₀ with r₀ = ``int8_ratio()`` (the int8
    original over the fp32 one), at most 1."""
    if config.target_latency_of == "int8":
        return config.target_latency
    return round(min(1.0, config.target_latency / int8_ratio()), 4)


def timing_feed(samples: SampleSet, batch: int | None, sequence_length: int | None = None) -> dict[str, np.ndarray]:
    """What a latency target is timed on: calibration samples at ``latency_batch_size`` (and, for a transformer,
    at ``sequence_length`` tokens: --latency-seq-len)."""
    return samples.feed(latency_batch_size(samples, batch), sequence_length)


def feed_batch(feed: dict[str, np.ndarray]) -> int:
    return len(next(iter(feed.values())))


def latency_unit(feed: dict[str, np.ndarray]) -> str:
    """'batch-B latency' for a timing feed of batch B."""
    return f"batch-{feed_batch(feed)} latency"


CONTEXT_CLIP = (0.25, 4.0)  # bounds of an in-context factor: a measured saving is a small difference of noisy times


def context_factor(table_saving: float, graph_saving: float) -> float:
    """c = S_graph / S_table clipped to ``CONTEXT_CLIP``: how much of what the table says a change saves the
    whole graph measures it to save (1 when the table sees no saving)."""
    return float(np.clip(graph_saving / table_saving, *CONTEXT_CLIP)) if table_saving > 0 else 1.0


def in_context(ratio: float, factor: float) -> float:
    """A ratio measured alone with its saving scaled by the in-context factor: r' = max(0, 1 − c·(1 − r))."""
    return max(0.0, 1.0 - factor * (1.0 - ratio))


class LatencyCost:
    """The latency model T(k) above, for the groups of one model (ms), at the batch of ``feed``."""

    def __init__(self, view: GraphView, groups: list[ChannelGroup], shapes: dict[str, tuple[int, ...]],
                 feed: dict[str, np.ndarray], options: dict[str, list[int]], threads: int,
                 removed_of: dict[tuple[str, int], np.ndarray], use_disk: bool = True, precision: str = "none"):
        self.unit = latency_unit(feed)
        batch = feed_batch(feed)
        self.table = LatencyTable(threads, use_disk, precision)
        self.total = self.table.model_ms(view.model, feed)
        self.node_ms: dict[int, float] = {}
        self.ratios: dict[tuple[str, int], dict[int, float]] = {}  # (group, node) -> {k: ratio}
        self.groups, self.options = groups, options
        self.shapes_of: dict[int, tuple] = {}  # node -> (op and attributes, input shape, weight shape)
        self.context: dict[str, float] = {}  # group -> in-context factor c (``calibrate_in_context``)
        for group in groups:
            for index, (side, place) in group.members.items():
                node = view.nodes[index]
                if node.op_type not in ("Conv", "Gemm", "MatMul"):
                    continue
                weight = view.constant(node.input[1])
                in_shape = (batch, *shapes[node.input[0]][1:])
                self.shapes_of[index] = (node_key(node), in_shape, weight.shape)
                out_axis, in_axis = _weight_axes(node, attributes(node))
                per = {}
                for k in options[group.name]:
                    removed = len(place.positions(removed_of[(group.name, k)]))
                    if removed == 0:
                        per[k] = 1.0
                        continue
                    if side == "out":
                        narrowed = {"out": weight.shape[out_axis] - removed}
                    else:
                        width = next(c.width for c in group.consumers if c.node_index == index)
                        cut = removed * (width if node.op_type != "Conv" else 1)
                        narrowed = {"in": weight.shape[in_axis] - cut}
                    full_ms, per[k] = self.table.ratio(node, in_shape, weight, narrowed)
                    self.node_ms[index] = full_ms
                self.ratios[(group.name, index)] = per
        self.table.save()
        self.at_node: dict[int, list[tuple[str, dict[int, float]]]] = {}  # timed node -> (group, its ratios)
        self.nodes_of: dict[str, list[int]] = {}  # group -> the timed nodes it narrows
        for (name, index), per in self.ratios.items():
            if index in self.node_ms:
                self.at_node.setdefault(index, []).append((name, per))
                self.nodes_of.setdefault(name, []).append(index)

    def calibrate_in_context(self, original: onnx.ModelProto,
                             narrowed: Callable[[ChannelGroup, int], onnx.ModelProto],
                             feed: dict[str, np.ndarray]) -> None:
        """Make each group's savings those of the whole graph. A node timed alone is not the node in context
        (ResNet-56 here: halving a stage-3 block's inner channels saves 0.010 of the model's time by the
        table, 0.017–0.034 measured in the graph; the first stage's 0.007 by both). Each group is narrowed
        alone to its narrowest width (``narrowed(group, k)`` exports it) and the graph timed against the
        original; with S_table and S_graph that saving by the table and measured, pooled over groups of
        identical node shapes (a measured saving is a small difference of noisy times), c = S_graph /
        S_table clipped to [0.25, 4], and every node saving of the group is scaled by c:
        r' = max(0, 1 − c·(1 − r)). Graph timings are cached like the table."""
        full = {g.name: g.channels for g in self.groups}
        pooled: dict[tuple, list[tuple[str, float, float]]] = {}
        for group in self.groups:
            k = min(self.options[group.name])
            table_saving = self.total - self.exact({**full, group.name: k})
            if k >= group.channels or table_saving <= 0:
                continue
            graph_saving = self.total * (1.0 - self.table.plan_ratio(original, narrowed(group, k), feed))
            shapes = tuple(sorted((side, repr(self.shapes_of[index])) for index, (side, _) in group.members.items()
                                  if index in self.shapes_of))
            pooled.setdefault((group.channels, k, shapes), []).append((group.name, table_saving, graph_saving))
        self.table.save()
        for members in pooled.values():
            factor = context_factor(sum(m[1] for m in members), sum(m[2] for m in members))
            for name, _, _ in members:
                self.context[name] = factor
        for (name, _), per in self.ratios.items():
            factor = self.context.get(name, 1.0)
            for k, ratio in per.items():
                per[k] = in_context(ratio, factor)

    def option_cost(self, group: ChannelGroup, k: int) -> float:
        return sum(self.node_ms.get(index, 0.0) * per[k] for (name, index), per in self.ratios.items()
                   if name == group.name)

    def change(self, keep: dict[str, int], name: str, k: int) -> float:
        """exact(keep with group ``name`` at width k) − exact(keep), over the nodes that group touches."""
        delta = 0.0
        for index in self.nodes_of.get(name, []):
            others, mine = 1.0, None
            for group, per in self.at_node[index]:
                if group == name:
                    mine = per
                else:
                    others *= per[keep[group]]
            delta += self.node_ms[index] * others * (mine[k] - mine[keep[name]])
        return delta

    def exact(self, keep: dict[str, int]) -> float:
        factor = {index: 1.0 for index in self.node_ms}
        for (name, index), per in self.ratios.items():
            if index in factor:
                factor[index] *= per[keep[name]]
        return self.total - sum(self.node_ms.values()) + sum(self.node_ms[i] * factor[i] for i in factor)


def model_latency_ms(model: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int, runs: int = 30) -> float:
    """Median latency of the whole model on ``feed``."""
    sess = session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    for _ in range(3):
        timed(sess, names, feed, 1)
    return float(np.median([timed(sess, names, feed, 1) for _ in range(runs)]) * 1e3)


@dataclass
class LatencyStep:
    """One plan of the search: its budget and the table's prediction (fractions of the original's
    latency) and its measured latency ratio (exported graph, A/B against the original, at ``measured``)."""

    budget_ratio: float
    predicted_ratio: float
    measured_ratio: float
    budget_unit: str = "batch-1 latency"  # what the budget prices: the latency table, or MACs
    measured: str = "batch-1 latency"  # what the measured ratio is of


def meet_measured_latency(plan_at: Callable[[float], tuple[Hashable, float]],
                          measured_ratio: Callable[[Hashable], float], target: float,
                          hint: str = "ask for less", unit: str = "batch-1 latency", steps: int = SEARCH_STEPS,
                          tolerance: float = SEARCH_TOLERANCE, measured_unit: str = "batch-1 latency"
                          ) -> tuple[Hashable, float, list[LatencyStep]]:
    """The least aggressive plan whose *measured* latency ratio is ≤ ``target``, its measured ratio, and
    every plan timed.

    ``plan_at(b)`` plans for a budget of b × the original's ``unit`` (returns the plan and the table's
    predicted latency ratio); ``measured_ratio(plan)`` times it (a fraction of the original's
    ``measured_unit``). Starting at b = target, the next budget assumes the measured saving is proportional
    to the planned one and aims at the middle of the accepted band [target − tolerance, target],
    a = target − tolerance/2: b' = 1 − (1 − a)·(1 − b)/(1 − m),
    kept inside the bracket (largest b that met, smallest that missed; bisection when it falls outside). Stops
    at a plan measured within ``tolerance`` below the target, a bracket narrower than 0.005, or after
    ``steps`` plans. When none of them met the target, the strongest plan (budget 0) is timed: returned if
    it meets the target, else ConfigError stating its measured ratio (ending with ``hint``)."""
    history: list[LatencyStep] = []
    timed_plans: dict[Hashable, float] = {}
    met: tuple[float, Hashable] | None = None
    missed = 1.0
    budget = target
    aim = target - 0.5 * tolerance  # the middle of the accepted band: aiming at its edge misses half the time
    for _ in range(steps):
        plan, predicted = plan_at(budget)
        if plan not in timed_plans:
            timed_plans[plan] = measured_ratio(plan)
        measured = timed_plans[plan]
        history.append(LatencyStep(budget, predicted, measured, unit, measured_unit))
        if measured <= target:
            if met is None or budget > met[0]:
                met = (budget, plan)
            if measured >= target - tolerance:
                break
        else:
            missed = min(missed, budget)
        low = met[0] if met else 0.0
        if missed - low < 0.005:
            break
        guess = 1.0 - (1.0 - aim) * (1.0 - budget) / max(1.0 - measured, 1e-3)
        budget = guess if low < guess < missed else 0.5 * (low + missed)
    if met is None:
        best = min(step.measured_ratio for step in history)
        strongest = _strongest_plan(plan_at, measured_ratio, timed_plans)
        floor = None if strongest is None else strongest[2]
        if floor is not None and floor <= target:  # the search's steps missed, the strongest plan meets it
            history.append(LatencyStep(0.0, strongest[1], floor, unit, measured_unit))
            return strongest[0], floor, history
        floor_text = "" if floor is None else (
            f"; with every layer at its most aggressive option the graph measures {floor:.3f}")
        raise ConfigError(f"--target-latency {target} cannot be met: the fastest plan tried measured "
                          f"{best:.3f} of the original's {measured_unit} in onnxruntime here "
                          f"({len(history)} plans timed){floor_text}; {hint}")
    return met[1], timed_plans[met[1]], history


def _strongest_plan(plan_at, measured_ratio, timed_plans: dict) -> tuple[Hashable, float, float] | None:
    """The plan at budget 0 (every layer at its most aggressive option), its predicted and its measured
    ratio: what the method can reach at all — the plan to fall back on when the search's steps all missed,
    and otherwise the measured floor a refusal states. None when the planner cannot form that plan."""
    try:
        plan, predicted = plan_at(0.0)
    except ConfigError:
        return None
    if plan not in timed_plans:
        timed_plans[plan] = measured_ratio(plan)
    return plan, predicted, timed_plans[plan]


def rounded_int8(model: onnx.ModelProto, feed: dict[str, np.ndarray], precision: str) -> onnx.ModelProto:
    """``model`` in the int8 form ``precision`` names, with max-abs weight scales (for timing: the values do not
    change the time); a 16-bit float graph widened to float32 first, as the int8 stage does."""
    from ..export.dynamic import quantize_dynamic_int8
    from ..export.qdq import rounded_qdq
    from ..onnxio.widen import computes_narrow, widen

    model = widen(model) if computes_narrow(model) else model
    if not precision.startswith("int8-dynamic"):
        return rounded_qdq(model, feed)
    quantized = quantize_dynamic_int8(model, {})
    if precision == "int8-dynamic-smoothed":
        from ..export.smoothing import mul_node_inputs, with_timing_muls
        quantized = with_timing_muls(quantized, mul_node_inputs(model))
    return quantized
