"""The benchmark's paired comparison (scripts/bench_testbed.py): per-sample correctness and McNemar's test."""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_testbed  # noqa: E402


def _hex(correct: np.ndarray) -> str:
    return np.packbits(correct).tobytes().hex()


def test_mcnemar_counts_discordant_samples_and_gives_the_exact_binomial_p():
    a = np.zeros(21, bool)
    b = np.zeros(21, bool)
    a[:10] = True        # only A right on 10 samples
    b[10:13] = True      # only B right on 3
    a[20] = b[20] = True  # both right: not discordant
    only_a, only_b, p = bench_testbed.mcnemar(_hex(a), _hex(b), 21)
    assert (only_a, only_b) == (10, 3)
    assert p == 2 * (1 + 13 + 78 + 286) / 2 ** 13  # 2·P[Bin(13, ½) ≤ 3]
    assert bench_testbed.mcnemar(_hex(a), _hex(a), 21)[2] == 1.0


def test_correct_bits_marks_the_samples_whose_top1_is_the_label():
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input"], ["scores"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    scores = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    bits = bench_testbed.correct_bits(model, {"input": scores, "labels": labels}, batch_size=3)
    got = np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8))[:7].astype(bool)
    np.testing.assert_array_equal(got, scores.argmax(1) == labels)


def test_paired_lines_compare_rows_of_the_same_group_only():
    a, b = np.ones(8, bool), np.zeros(8, bool)
    rows = [{"label": "channel admm", "group": "MACs 0.5", "top1": 1.0, "evaluated": 8, "correct_bits": _hex(a)},
            {"label": "l1-norm + LS refit", "group": "MACs 0.5", "top1": 0.0, "evaluated": 8, "correct_bits": _hex(b)},
            {"label": "l1-norm + LS refit", "group": "MACs 0.75", "top1": 0.0, "evaluated": 8,
             "correct_bits": _hex(b)}]
    lines = bench_testbed.paired_lines("channel", rows)
    table = [line for line in lines if line.startswith("| MACs")]
    assert table == ["| MACs 0.5 | channel admm | l1-norm + LS refit | +100.00 | 8 | 0 | 0.00781 |"]
