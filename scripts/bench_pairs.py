#!/usr/bin/env python3
"""How fast can a low-rank factor pair be, per layer shape, in onnxruntime on this CPU?

    python scripts/bench_pairs.py [--models resnet56_cifar10,...] [--batches 1,8]

For every distinct (op, kernel, Cin, Cout, input size) among a test-bed model's factorizable layers, the
exported pair (Conv k×k Cin→r, then Conv 1×1 r→Cout; Gemm/MatMul → two products) is timed against the dense
layer, A/B interleaved in one process (``LatencyTable.pair_ratio``, 2 threads), at ranks r from 1 to the
full rank. The best ratio over r is the most a factorization can save on that layer, whatever its accuracy;
weighted by each layer's share of the dense layers' time it bounds what low-rank can do to the whole model.
Writes docs/PAIRS.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxadmm.analysis.layers import find_layers  # noqa: E402
from onnxadmm.onnxio.normalize import normalize  # noqa: E402
from onnxadmm.plan.latency import LatencyTable  # noqa: E402
from onnxadmm.cost.footprint import node_macs  # noqa: E402

TESTBED = ROOT.parent / "shared" / "testbed"


def ranks_for(full: int) -> list[int]:
    """1, 2, 4, then up to 10 multiples of 8 evenly spread below the full rank."""
    eights = list(range(8, full, 8))
    picked = {eights[int(i)] for i in np.linspace(0, len(eights) - 1, min(10, len(eights)))} if eights else set()
    return sorted(r for r in {1, 2, 4, *picked} if r < full)


def layer_shapes(model: onnx.ModelProto, batch: int):
    """(shape key, node, input shape, weight, full rank) per factorizable layer, with its count."""
    view = normalize(model).view()
    feed = {}
    for value in view.model.graph.input:
        if value.name in {i.name for i in view.model.graph.initializer}:
            continue
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feed[value.name] = np.zeros(dims, np.float32)
    costs = node_macs(view.model, feed, 2)
    found, counts = {}, Counter()
    for layer in find_layers(view).layers:
        if layer.groups > 1 or layer.node_index not in costs:
            continue
        node, shape = view.nodes[layer.node_index], costs[layer.node_index].input_shape
        weight = view.constant(layer.weight_name)
        key = (node.op_type, weight.shape, tuple(shape[1:]))
        counts[key] += 1
        found.setdefault(key, (node, (batch, *shape[1:]), weight, min(layer.out_features, layer.in_features)))
    return found, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--models", default="resnet56_cifar10")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    if not TESTBED.exists():
        print(f"test-bed not found at {TESTBED}", file=sys.stderr)
        return 2
    table = LatencyTable(threads=2, use_disk=False)
    lines = ["# Factor-pair latency per layer shape (onnxruntime, this machine)", "",
             "Pair / dense latency ratio of each distinct layer shape at ranks r, A/B interleaved in one process, "
             "2 threads (`python scripts/bench_pairs.py`). *best* is the lowest ratio over r; *bound* weights "
             "each shape's best by its share of the factorizable layers' dense time: the least latency "
             "low-rank can leave on those layers, before accuracy is considered.", ""]
    for name in args.models.split(","):
        model = onnx.load(str(TESTBED / "models" / f"{name}.onnx"))
        for batch in (int(b) for b in args.batches.split(",")):
            found, counts = layer_shapes(model, batch)
            lines += [f"## {name}, batch {batch}", "",
                      "| op | weight | input | layers | dense µs | ratio by rank | best |", "|---|---|---|---|---|---|---|"]
            dense_total = best_total = 0.0
            for key, (node, shape, weight, full) in found.items():
                ratios = {r: table.pair_ratio(node, shape, weight, r) for r in ranks_for(full)}
                dense_ms = next(iter(ratios.values()))[0]
                best = min(min(ratio for _, ratio in ratios.values()), 1.0)  # a slower pair stays dense
                dense_total += counts[key] * dense_ms
                best_total += counts[key] * dense_ms * best
                cells = " ".join(f"r{r}:{ratio:.2f}" for r, (_, ratio) in ratios.items())
                lines.append(f"| {key[0]} | {'×'.join(map(str, weight.shape))} | {'×'.join(map(str, key[2]))} | "
                             f"{counts[key]} | {1000 * dense_ms:.0f} | {cells} | {best:.2f} |")
                print(lines[-1], flush=True)
            lines += ["", f"bound on the factorizable layers: **{best_total / dense_total:.2f}** of their dense "
                          f"time ({1000 * dense_total:.0f} µs summed, layers timed alone)", ""]
            print(lines[-2], flush=True)
    out = ROOT / "docs" / "PAIRS.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
