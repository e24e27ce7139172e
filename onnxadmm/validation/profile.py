"""Where the time goes: per-node kernel times from onnxruntime's profiler, original vs compressed, so a
latency ratio that does not follow the MACs ratio is explained node by node.

Both models are profiled as onnxruntime runs them (graph optimizations on: fused and re-laid-out nodes,
named as onnxruntime names them; the sliced graph keeps the original's node names, so the two profiles
pair up by name; the nodes a factorized layer adds — its first factor, a sparse branch — carry an
``onnxadmm_…`` marker in their names and are counted with the next weight-product node that runs, the
layer's own node, which they feed: onnxruntime names a fused node by its last output, so the names alone
do not tie them). A node's MACs come from the shapes the profiler records: output elements × the
weight's elements per output channel (Cin/group · kh · kw) for a Conv, M·N·K for a product. A node's
time is the median of its per-run kernel times after warm-up (single runs of microsecond kernels are
disturbed by thread wake-ups; the median is not).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..onnxio.runtime import cpu_threads, session, session_options
from ..onnxio.save import exceeds_protobuf_limit
from ..onnxio.scratch import scratch_folder

COMPUTE_OPS = {"Conv", "FusedConv", "NchwcConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm", "ConvTranspose",
               # the integer kernels a quantized model's products run as
               "QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "MatMulNBits"}
# what export/lowrank.py puts in the names of the nodes and tensors a factorized layer adds
ADDED_NODE = re.compile(r"(__|/)onnxadmm_(lowrank_in|tucker_in|sparse)")


@dataclass
class NodeTime:
    name: str
    op: str
    time_ms: float  # median per run
    macs: int  # 0 for ops without a weight product
    output_shape: tuple[int, ...]


def profile_nodes(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], threads: int, runs: int = 30,
                  warmup: int = 3) -> list[dict[str, NodeTime]] | None:
    """Median kernel time per node over ``runs`` runs of each model, the models run in turn (A B A B …, so
    a change in the machine's load touches both alike); None when a model is over the 2 GB protobuf limit."""
    if any(exceeds_protobuf_limit(model) for model in models):
        return None
    with scratch_folder("onnxadmm-profile-") as folder:
        sessions = []
        for index, model in enumerate(models):
            options = session_options(cpu_threads(threads), True)
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(folder, f"profile{index}")
            sess = session(model, options=options)
            sessions.append((sess, [o.name for o in sess.get_outputs()]))
        for _ in range(warmup + runs):
            for sess, names in sessions:
                sess.run(names, feed)
        profiles = []
        for sess, _ in sessions:
            with open(sess.end_profiling()) as handle:
                profiles.append(_node_times(json.load(handle), warmup))
    return profiles


def _node_times(events: list[dict], warmup: int) -> dict[str, NodeTime]:
    """Median kernel time per node of one session's profile events, after ``warmup`` runs."""
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    after = starts[warmup] if len(starts) > warmup else 0
    nodes: dict[str, NodeTime] = {}
    durations: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < after:
            continue
        name = event["name"][: -len("_kernel_time")]
        args = event.get("args", {})
        if name not in nodes:
            out = _shapes(args.get("output_type_shape"))
            nodes[name] = NodeTime(name, args.get("op_name", "?"), 0.0, _macs(args), out[0] if out else ())
        durations.setdefault(name, []).append(event["dur"] / 1e3)
    for name, node in nodes.items():
        node.time_ms = float(np.median(durations[name]))
    return nodes


def _shapes(entries) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in next(iter(entry.values()))) for entry in entries or [] if entry]


def _macs(args: dict) -> int:
    op = args.get("op_name", "")
    inputs, outputs = _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape"))
    if op not in COMPUTE_OPS or len(inputs) < 2 or not outputs:
        return 0
    if "Conv" in op:  # weight (Cout, Cin/group, kh, kw): each output element costs Cin/group · kh · kw
        weight = inputs[1]  # QLinearConv's prepacked weight is not among the recorded inputs: its MACs read 0
        return int(np.prod(outputs[0])) * int(np.prod(weight[1:])) if len(weight) >= 3 else 0
    depth = inputs[0][-1] if inputs[0] else 0  # M·N·K: the first input is (…, M, K) for every product here
    return int(np.prod(outputs[0])) * int(depth)


@dataclass
class TimeSplit:
    """Original vs compressed profiles, paired by node name; ``layers_of`` names, for onnxruntime's nodes that
    it can tie to one, the weight-product node of the input graph they run (``graph_layers``)."""

    original: dict[str, NodeTime]
    compressed: dict[str, NodeTime]
    layers_of: dict[str, str] = field(default_factory=dict)

    def totals(self) -> dict[str, tuple[float, float]]:
        """ms per run of the weight-product nodes ("compute") and of everything else ("other")."""
        out = {"compute": [0.0, 0.0], "other": [0.0, 0.0]}
        for side, nodes in enumerate((self.original, self.compressed)):
            for node in nodes.values():
                out["compute" if node.op in COMPUTE_OPS else "other"][side] += node.time_ms
        return {k: (v[0], v[1]) for k, v in out.items()}

    def by_op(self) -> list[tuple[str, float, float]]:
        """(op, original ms, compressed ms), slowest first."""
        ops: dict[str, list[float]] = {}
        for side, nodes in enumerate((self.original, self.compressed)):
            for node in nodes.values():
                ops.setdefault(node.op, [0.0, 0.0])[side] += node.time_ms
        return sorted(((op, a, b) for op, (a, b) in ops.items()), key=lambda row: -row[1])

    def layers(self) -> list[dict]:
        """Each weight-product node in both profiles: MACs and time, original → compressed (a factorized
        layer's nodes summed: ``nodes`` counts them)."""
        parts: dict[str, list[NodeTime]] = {}
        added: list[NodeTime] = []
        for node in self.compressed.values():  # in the order they ran
            if not node.macs:
                continue
            if ADDED_NODE.search(node.name):
                added.append(node)
            else:
                parts[node.name], added = added + [node], []
        rows = []
        for name, a in self.original.items():
            b = parts.get(name)
            if not a.macs or not b:
                continue
            macs, time_ms = sum(n.macs for n in b), sum(n.time_ms for n in b)
            rows.append({"name": name, "layer": self.layers_of.get(name), "op": a.op, "macs_ratio": macs / a.macs,
                         "nodes": len(b),
                         "time_ms_original": a.time_ms, "time_ms_compressed": time_ms,
                         "time_ratio": time_ms / a.time_ms if a.time_ms else None,
                         "output_shape": [list(a.output_shape), list(b[-1].output_shape)]})
        return sorted(rows, key=lambda r: -r["time_ms_original"])

    def as_dict(self) -> dict:
        totals = self.totals()
        return {"totals_ms": {k: {"original": a, "compressed": b} for k, (a, b) in totals.items()},
                "by_op_ms": [{"op": op, "original": a, "compressed": b} for op, a, b in self.by_op()],
                "layers": self.layers()}


def time_split(original: onnx.ModelProto, compressed: onnx.ModelProto, feed: dict[str, np.ndarray],
               threads: int, runs: int = 30) -> TimeSplit | None:
    profiles = profile_nodes([original, compressed], feed, threads, runs)
    return None if profiles is None else TimeSplit(*profiles, graph_layers(original, list(profiles[0])))


LAYOUT_SUFFIX = "_nchwc"  # what onnxruntime's NCHWc layout transformer appends to the name of a node it rewrites
# what its cast inserter prefixes to the output of a 16-bit float node it computes in float32 and casts back
CAST_PREFIX = "InsertedPrecisionFreeCast_"
WEIGHT_PRODUCTS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TRACE_DEPTH = 6  # ops between a fused node's output and its weight product (activations, a swish's Mul)


def graph_layers(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """onnxruntime's node name -> the weight-product node of ``model`` it runs, where one can be named: the name
    itself when ``model`` has such a node; else the name read as the tensor the fused node writes (onnxruntime
    names a fused node by its last output, ``_nchwc`` appended when it also changed the layout, and
    ``InsertedPrecisionFreeCast_`` prefixed when the graph computes in float16 and the node in float32), traced back
    through the ops that compute it to the one weight product they all start from. A residual ``Add`` (two
    products) or a graph input on the way leaves the name unmapped."""
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    producer = {out: n for n in graph.node for out in n.output}
    constants = {t.name for t in graph.initializer}

    def source(node: onnx.NodeProto | None, depth: int) -> str | None:
        if node is None or depth > TRACE_DEPTH:
            return None
        if node.op_type in WEIGHT_PRODUCTS:
            return node.name
        found = {source(producer.get(t), depth + 1) for t in node.input if t and t not in constants}
        return found.pop() if len(found) == 1 else None

    out = {}
    for name in names:
        node = nodes.get(name)
        if node is None:
            tensor = name[: -len(LAYOUT_SUFFIX)] if name.endswith(LAYOUT_SUFFIX) else name
            tensor = tensor[len(CAST_PREFIX):] if tensor.startswith(CAST_PREFIX) else tensor
            node = producer.get(tensor)
        layer = source(node, 0)
        if layer is not None:
            out[name] = layer
    return out


def explain(split: dict, macs_ratio: float) -> list[str]:
    """Plain sentences: how the compute nodes' time follows their MACs, and how much of the time is in
    nodes whose cost does not scale with the weights."""
    totals = split["totals_ms"]
    compute, other = totals["compute"], totals["other"]
    whole = compute["original"] + other["original"]
    if whole <= 0 or compute["original"] <= 0:
        return []
    compressed_whole = compute["compressed"] + other["compressed"]
    lines = [f"Profiled at batch 1 (per-node kernel times, noisier than the A/B latency ratio, which is the "
             f"figure for the whole model): weight-product nodes (Conv/Gemm/MatMul, integer or float) take "
             f"{100 * compute['original'] / whole:.0f} % "
             f"of the original's kernel time and run at {compute['compressed'] / compute['original']:.3f}x their "
             f"time for {macs_ratio:.3f}x the MACs; the other nodes (elementwise, pooling, layout) take "
             f"{100 * other['original'] / whole:.0f} % and run at "
             f"{other['compressed'] / max(other['original'], 1e-12):.3f}x; kernel time in all "
             f"{compressed_whole / whole:.3f}x."]
    slow = [row for row in split["layers"] if row["time_ratio"] is not None and
            row["time_ratio"] > 1.15 * row["macs_ratio"] and row["macs_ratio"] < 0.999]
    if slow:
        worst = sorted(slow, key=lambda r: -(r["time_ms_compressed"] - r["macs_ratio"] * r["time_ms_original"]))
        named = ", ".join(f"`{r.get('layer') or r['name']}` ({r['macs_ratio']:.2f}x MACs, {r['time_ratio']:.2f}x time)"
                          for r in worst[:3])
        why = "small or odd widths use the CPU kernels less well"
        if any(r.get("nodes", 1) > 1 for r in slow):
            why += "; a factorized layer is two (Tucker-2: three) kernel calls, each with its own fixed cost"
        lines.append(f"{len(slow)} compressed layers run more than 15 % slower than their MACs predict ({why}), "
                     f"most of all {named}.")
    return lines
