#!/usr/bin/env python3
"""Does onnxruntime on this CPU care whether a kept width is a multiple of 8 or of 16?

    python scripts/bench_widths.py [--rounds 30]

For a stack of two 3×3 convs (C → w → C, the inner width of a ResNet basic block) and a 1×1 expand/project
pair (an inverted-residual block's inner width), every inner width w from C/2 to C is timed against the
full width C, A/B interleaved in one process (2 threads, spinning off). Writes docs/WIDTHS.md: latency ratio
vs MACs ratio per width, so one sees whether non-multiples of 8 / 16 cost more than their MACs.
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


CASES = [("3×3 pair, C=64 @ 32×32 (ResNet-56 stage 3 at CIFAR size ×2)", 64, 3, 32, 8),
         ("3×3 pair, C=128 @ 28×28 (ResNet-18 stage 2)", 128, 3, 28, 1),
         ("1×1 pair, C=96→w @ 56×56 (inverted residual)", 96, 1, 56, 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    lines = ["# Kept widths: multiples of 8 or 16?", "",
             "Measured with `python scripts/bench_widths.py` on this project's shared 2-core x86-64 machine "
             "(onnxruntime CPU, 2 threads, spinning off, A/B interleaved against the full width in one process; "
             "median of per-round ratios, [p10–p90]). `excess` = latency ratio / MACs ratio − 1.", ""]
    for title, channels, kernel, size, batch in CASES:
        full = block(channels, channels, kernel, size)
        feed = {"x": np.random.default_rng(1).standard_normal((batch, channels, size, size)).astype(np.float32)}
        lines += [f"## {title}, batch {batch}", "", "| inner width | multiple of | MACs × | latency × | excess |",
                  "|---|---|---|---|---|"]
        for width in range(channels // 2, channels, 4):
            result = measure(full, block(channels, width, kernel, size), feed, args.rounds, 2)
            macs = width / channels
            multiple = 16 if width % 16 == 0 else 8 if width % 8 == 0 else 4
            lines.append(f"| {width} | {multiple} | {macs:.3f} | {result.ratio_median:.3f} "
                         f"[{result.ratio_p10:.2f}–{result.ratio_p90:.2f}] | {result.ratio_median / macs - 1:+.1%} |")
            print(title, width, f"{result.ratio_median:.3f}", flush=True)
        lines.append("")
    (ROOT / "docs" / "WIDTHS.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
