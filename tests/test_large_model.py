"""A large model in external data (slow): peak memory stays bounded as the calibration set grows.

The model: ``BRANCHES`` parallel MatMul layers x(N, 256) @ W(256, 65536) → Relu → ReduceSum, 64 MB of
weights each, stored as external data next to the .onnx. Compressed twice in fresh processes, with 64
and with 256 calibration samples (each sample's activations: 256 KB per branch), under
``--max-memory-mb 256``: activation statistics are streamed, so the peak RSS must not grow with the
samples. ``ONNXADMM_LARGE_BRANCHES`` raises the size (34 branches ≈ 2.2 GB; about a minute a branch here).

    python -m pytest -m slow tests/test_large_model.py -s
"""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

BRANCHES = int(os.environ.get("ONNXADMM_LARGE_BRANCHES", "4"))
WIDTH, HIDDEN = 256, 65536


def large_model(folder, branches: int) -> int:
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for b in range(branches):
        w = (rng.standard_normal((WIDTH, HIDDEN), dtype=np.float32) / 16).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{b}"))
        nodes += [helper.make_node("MatMul", ["input", f"W{b}"], [f"h{b}"], name=f"MatMul_{b}"),
                  helper.make_node("Relu", [f"h{b}"], [f"r{b}"], name=f"Relu_{b}"),
                  helper.make_node("ReduceSum", [f"r{b}", "axes"], [f"s{b}"], name=f"Sum_{b}", keepdims=1)]
        outs.append(f"s{b}")
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    nodes.append(helper.make_node("Concat", outs, ["output"], name="Concat", axis=-1))
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", branches])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(folder / "large.onnx"), save_as_external_data=True, location="large.onnx.data")
    return (folder / "large.onnx.data").stat().st_size


def compress_in_subprocess(folder, samples: int) -> dict:
    x = np.random.default_rng(1).standard_normal((samples, WIDTH)).astype(np.float32)
    np.savez(folder / f"calib{samples}.npz", input=x)
    out = folder / f"out{samples}.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxadmm", "compress", str(folder / "large.onnx"), str(out),
                           "--calib", str(folder / f"calib{samples}.npz"), "--sparsity", "0.5", "--uniform",
                           "--loss", "linear", "--admm-iterations", "3", "--max-memory-mb", "256",
                           "--sample-patches", "4096", "--latency-rounds", "2", "--quiet"],
                          capture_output=True, text=True, timeout=7200)
    assert proc.returncode == 0, proc.stderr
    return json.loads((folder / f"out{samples}.onnx.report.json").read_text())


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_calibration_samples(tmp_path):
    data_bytes = large_model(tmp_path, BRANCHES)
    small, big = compress_in_subprocess(tmp_path, 64), compress_in_subprocess(tmp_path, 256)
    rss_small, rss_big = small["timing"]["peak_rss_mb"], big["timing"]["peak_rss_mb"]
    print(f"\nmodel weights {data_bytes / 2**20:.0f} MB in external data; peak RSS {rss_small:.0f} MB with 64 "
          f"samples, {rss_big:.0f} MB with 256 (activations of 256 samples: {256 * BRANCHES * HIDDEN * 4 / 2**20:.0f} MB)")
    assert rss_big <= rss_small * 1.15 + 64
    assert big["totals"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    written = onnx.load(str(tmp_path / "out256.onnx"), load_external_data=False)
    assert [o.name for o in written.graph.output] == ["output"]
