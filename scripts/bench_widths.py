#!/usr/bin/env python3
"""Does onnxruntime on this CPU care whether a kept width is a multiple of 8 or of 16 — in fp32 and in int8?

    python scripts/bench_widths.py [--rounds 30]

For a stack of two 3×3 convs (C → w → C, the inner width of a ResNet basic block) and a 1×1 expand/project
pair (an inverted-residual block's inner width), every inner width w from C/4 (C/2 for the large cases) to C
is timed against the full width C, A/B interleaved in one process (2 threads, spinning off), in fp32 and in
int8 (the QDQ form onnxruntime fuses into QLinearConv, timed uint8 in, uint8 out as between int8 neighbours:
``export.qdq.integer_chain``). Writes docs/WIDTHS.md: latency ratio vs MACs ratio per width.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxadmm.cost.timing import measure  # noqa: E402
from onnxadmm.export.qdq import integer_chain, rounded_qdq  # noqa: E402


def block(channels: int, width: int, kernel: int, size: int, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(k, C->w) -> Relu -> Conv(k, w->C): the pruned inner width is w."""
    rng = np.random.default_rng(seed)
    pad = kernel // 2
    inits = [numpy_helper.from_array((rng.standard_normal((width, channels, kernel, kernel)) * 0.05)
                                     .astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(width, np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((channels, width, kernel, kernel)) * 0.05)
                                     .astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(channels, np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[pad] * 4),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=[pad] * 4)]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["N", channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


CASES = [("3×3 pair, C=64 @ 8×8 (ResNet-56 stage 3 on CIFAR)", 64, 3, 8, 1, 16),
         ("3×3 pair, C=32 @ 16×16 (ResNet-56 stage 2 on CIFAR)", 32, 3, 16, 1, 8),
         ("3×3 pair, C=64 @ 32×32 (ResNet-56 stage 3 at CIFAR size ×2)", 64, 3, 32, 8, 32),
         ("3×3 pair, C=128 @ 28×28 (ResNet-18 stage 2)", 128, 3, 28, 1, 64),
         ("1×1 pair, C=96→w @ 56×56 (inverted residual)", 96, 1, 56, 1, 48)]


def int8_chain(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict]:
    """The block in int8 between uint8 tensors, and a uint8 feed of the same shape."""
    chain = integer_chain(rounded_qdq(model, feed))
    x = np.random.default_rng(2).integers(0, 256, feed["x"].shape, dtype=np.uint8)
    return chain, {chain.graph.input[0].name: x}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    lines = ["# Kept widths: multiples of 8 or 16, in fp32 and int8?", "",
             "Measured with `python scripts/bench_widths.py` on this project's shared 2-core x86-64 machine "
             "(onnxruntime CPU, 2 threads, spinning off, A/B interleaved against the full width in one process; "
             "median of per-round ratios, [p10–p90]). `excess` = latency ratio / MACs ratio − 1. int8: the "
             "QDQ block onnxruntime fuses into QLinearConv, timed uint8 in, uint8 out, against the int8 block at "
             "full width.", ""]
    for title, channels, kernel, size, batch, smallest in CASES:
        full = block(channels, channels, kernel, size)
        feed = {"x": np.random.default_rng(1).standard_normal((batch, channels, size, size)).astype(np.float32)}
        full_int8, feed_int8 = int8_chain(full, feed)
        lines += [f"## {title}, batch {batch}", "",
                  "| inner width | multiple of | MACs × | fp32 latency × | fp32 excess | int8 latency × | int8 excess |",
                  "|---|---|---|---|---|---|---|"]
        for width in range(smallest, channels, 4):
            narrow = block(channels, width, kernel, size)
            fp32 = measure(full, narrow, feed, args.rounds, 2)
            narrow_int8, _ = int8_chain(narrow, feed)
            int8 = measure(full_int8, narrow_int8, feed_int8, args.rounds, 2,
                           feed_b={narrow_int8.graph.input[0].name: next(iter(feed_int8.values()))})
            macs = width / channels
            multiple = 16 if width % 16 == 0 else 8 if width % 8 == 0 else 4
            cells = [f"{r.ratio_median:.3f} [{r.ratio_p10:.2f}–{r.ratio_p90:.2f}] | {r.ratio_median / macs - 1:+.1%}"
                     for r in (fp32, int8)]
            lines.append(f"| {width} | {multiple} | {macs:.3f} | {cells[0]} | {cells[1]} |")
            print(title, width, f"fp32 {fp32.ratio_median:.3f} int8 {int8.ratio_median:.3f}", flush=True)
        lines.append("")
    (ROOT / "docs" / "WIDTHS.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
