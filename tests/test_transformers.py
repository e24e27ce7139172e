"""Transformer encoders: attention heads and FFN neurons as channel groups, sliced exactly, solved end to end."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from encoders import FFN, HEAD_DIM, HEADS, HIDDEN, encoder_inputs, encoder_weights, reference, tiny_encoder
from onnxadmm.analysis.layers import find_layers
from onnxadmm.errors import ConfigError
from onnxadmm.export.channels import slice_channels
from onnxadmm.methods.channels import channel_groups
from onnxadmm.onnxio.normalize import normalize
from onnxadmm.solve.problem import _row_pick, token_mask_input

VARIANTS = [dict(gelu=g, bias=b, shapes=s, ffn_rank=r) for g in ("erf", "tanh", "op") for b in (True, False)
            for s, r in (("concat", 3), ("constant", 2))]


def _model(variant: dict, seed: int = 0):
    weights = encoder_weights(seed, variant["bias"])
    opset = 20 if variant["gelu"] == "op" else 18
    return weights, tiny_encoder(weights, variant["gelu"], variant["bias"], variant["shapes"], variant["ffn_rank"],
                                 opset=opset)


def _groups(model: onnx.ModelProto):
    normalized = normalize(model)
    view = normalized.view()
    layers = find_layers(view).layers
    return normalized, {g.name: g for g in channel_groups(view, layers, layers)}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_sliced_encoder_matches_the_masked_reference(variant):
    """Heads and neurons removed from the graph compute what the numpy model with them zeroed computes."""
    weights, model = _model(variant)
    normalized, groups = _groups(model)
    heads = groups["attn/heads"]
    ffn = groups["ffn/up/MatMul"]
    assert heads.declined is None and ffn.declined is None
    assert (heads.channels, heads.block, len(heads.producers), heads.consumers[0].layer) == \
        (HIDDEN, HEAD_DIM, 3, "attn/out/MatMul")
    assert (ffn.channels, ffn.block, ffn.consumers[0].layer) == (FFN, 1, "ffn/down/MatMul")
    kept_heads, kept_neurons = [0, 3], np.array([1, 2, 5, 8, 9, 13, 20, 23])
    keep = {heads.name: np.repeat(np.isin(np.arange(HEADS), kept_heads), HEAD_DIM),
            ffn.name: np.isin(np.arange(FFN), kept_neurons)}
    sliced = slice_channels(normalized.model, [heads, ffn], keep)
    onnx.checker.check_model(sliced, full_check=True)
    weights_after = {t.name: onnx.numpy_helper.to_array(t) for t in sliced.graph.initializer}
    assert weights_after["wq" if "wq" in weights_after else next(k for k in weights_after if k.startswith("wq"))] \
        .shape == (HIDDEN, len(kept_heads) * HEAD_DIM)
    feed = encoder_inputs()
    got = ort.InferenceSession(sliced.SerializeToString()).run(None, feed)[0]
    expected = reference(weights, feed["x"], feed["attention_mask"], "tanh" if variant["gelu"] == "tanh" else "erf",
                         kept_heads=kept_heads, kept_neurons=kept_neurons)
    assert np.abs(got - expected).max() < 1e-4
    unpruned = reference(weights, feed["x"], feed["attention_mask"], "tanh" if variant["gelu"] == "tanh" else "erf")
    assert np.abs(unpruned - expected).max() > 1e-2  # the removal changed the model: the check has teeth


def test_fused_attention_is_declined_and_its_ffn_still_compresses():
    weights = encoder_weights()
    model = tiny_encoder(weights, fused=True)
    normalized, groups = _groups(model)
    assert "fused attention op Attention" in groups["attn/Attention"].declined
    ffn = groups["ffn/up/MatMul"]
    assert ffn.declined is None
    keep = {ffn.name: np.arange(FFN) % 3 != 0}
    sliced = slice_channels(normalized.model, [ffn], keep)
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    w2 = next(t for t in masked.graph.initializer if t.name == "w2")
    zeroed = onnx.numpy_helper.to_array(w2).copy()
    zeroed[~keep[ffn.name]] = 0
    w2.CopyFrom(onnx.numpy_helper.from_array(zeroed, "w2"))
    feed = encoder_inputs()
    got = ort.InferenceSession(sliced.SerializeToString()).run(None, feed)[0]
    want = ort.InferenceSession(masked.SerializeToString()).run(None, feed)[0]
    assert np.abs(got - want).max() < 1e-4


def test_attention_read_elsewhere_is_declined_with_the_node_named():
    """A second reader of the head-split tensor (here a graph output) makes the heads stay whole."""
    weights, model = _model(VARIANTS[0])
    model.graph.output.append(onnx.helper.make_tensor_value_info("attn/v/Add", onnx.TensorProto.FLOAT,
                                                                      ["batch", "sequence", HIDDEN]))
    _, groups = _groups(model)
    assert "attn/heads" in groups and "attn/v/Add" in groups["attn/heads"].declined


def test_token_mask_keeps_padding_out_of_the_rows():
    rows = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    tokens = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])

    class Layer:
        in_features, out_features, name, op_type = 3, 3, "l", "MatMul"
    pick = _row_pick(Layer, tuple(rows.shape), np.random.default_rng(0), 100, tokens)
    flat = pick.patches(rows)[:, 0, 0].long() // 3
    assert sorted(flat.tolist()) == [0, 1, 5, 6, 7, 8]
    assert pick.ids.tolist() == [0, 0, 1, 1, 1, 1]
    every = _row_pick(Layer, tuple(rows.shape), np.random.default_rng(0), 100, None)
    assert len(every.patches(rows)) == 10


def test_token_mask_input_is_found_or_refused_by_name():
    _, model = _model(VARIANTS[0])
    view = normalize(model).view()
    assert token_mask_input(view, "auto") == "attention_mask"
    assert token_mask_input(view, "none") is None
    with pytest.raises(ConfigError, match="no input of that name"):
        token_mask_input(view, "x")


def test_compress_removes_heads_and_neurons_end_to_end():
    from onnxadmm import CompressConfig, ValidateConfig, compress
    weights, model = _model(VARIANTS[0])
    result = compress(model, encoder_inputs(count=64, seq=8, seed=3),
                      CompressConfig(method="channel", target_macs=0.6, sensitivity_samples=16),
                      ValidateConfig(latency_rounds=3), evaluation=encoder_inputs(count=32, seq=8, seed=4))
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [(i.name, i.type) for i in out.graph.input] == [(i.name, i.type) for i in model.graph.input]
    assert [(o.name, o.type) for o in out.graph.output] == [(o.name, o.type) for o in model.graph.output]
    groups = {g["name"]: g for g in result.report.plan["groups"]} if result.report.plan else None
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    widths = {name: dims[1] for name, dims in shapes.items() if name.startswith(("wq", "w1"))}
    assert any(w < HIDDEN for n, w in widths.items() if n.startswith("wq")) or \
        any(w < FFN for n, w in widths.items() if n.startswith("w1")), widths
    assert all(w % HEAD_DIM == 0 for n, w in widths.items() if n.startswith("wq"))  # whole heads only
    feed = encoder_inputs(count=5, seq=11, seed=9)  # another batch size and sequence length than calibrated
    got = ort.InferenceSession(out.SerializeToString()).run(None, feed)[0]
    assert got.shape == (5, 2) and np.isfinite(got).all()
    assert groups is None or groups


def test_int8_on_an_encoder_probes_both_activation_forms_and_keeps_the_better_one(monkeypatch, capsys):
    """auto: both forms scored with the weights only rounded; the better one solved alone when the probe is
    decisive, both solved (and the solved errors deciding) when it is not — the same form either way here."""
    from onnxadmm import CompressConfig, ValidateConfig, compress
    from onnxadmm.quantize import forms
    from onnxadmm.report.markdown import render
    weights, model = _model(VARIANTS[0])
    calib = encoder_inputs(count=60, seq=8, seed=3)

    def int8(margin):
        monkeypatch.setattr(forms, "PROBE_MARGIN", margin)
        return compress(model, calib, CompressConfig(method="none", quantize="int8"), ValidateConfig(latency_rounds=3),
                        evaluation=encoder_inputs(count=32, seq=8, seed=4))

    both = int8(float("inf"))  # never decisive: both forms solved
    quant = both.report.plan["quantization"]
    errors, probed = quant["held_out_output_error"], quant["form_probe"]["held_out_output_error"]
    assert set(errors) == set(probed) == {"static", "dynamic"} and quant["form_probe"]["decided"] is None
    assert quant["activations"] == min(errors, key=errors.get) == min(probed, key=probed.get)
    time_line = next(line for line in render(both.report).splitlines() if line.startswith("- time: "))
    assert "static: weights" in time_line and "dynamic: smoothing" in time_line, time_line  # both forms' costs
    assert "s, weights" in time_line.split("dynamic: ")[1], time_line

    result = int8(1.0)  # always decisive: only the probe's choice is solved, to the same model
    quant = result.report.plan["quantization"]
    assert quant["form_probe"]["decided"] == quant["activations"] == both.report.plan["quantization"]["activations"]
    assert quant["held_out_output_error"] is None and "form probe" in render(result.report)
    from onnxadmm.cli import _print_summary
    _print_summary(result.report, None)  # the terminal says which form and why, as the Markdown report does
    assert f"activation form {quant['activations']} — held-out output error" in capsys.readouterr().out
    assert all(not key.startswith(("static_", "dynamic_")) for key in quant["seconds"])
    out = result.model
    assert [init.raw_data for init in out.graph.initializer] == [init.raw_data for init in both.model.graph.initializer]
    assert [(i.name, i.type) for i in out.graph.input] == [(i.name, i.type) for i in model.graph.input]
    if quant["activations"] == "dynamic":
        products = [n for n in out.graph.node if n.op_type == "MatMulInteger"]
        assert len(products) == 7  # Q, K, V, output projection, FFN up and down, the classifier Gemm
        assert len(quant["fusion"]["integer"]) == 7 and not quant["fusion"]["float"]
        assert len(quant["layers"]) == 7  # every one solved onto the grid
    got = ort.InferenceSession(out.SerializeToString()).run(None, encoder_inputs(count=4, seq=9, seed=5))[0]
    assert got.shape == (4, 2) and np.isfinite(got).all()


def test_dynamic_export_carries_the_solved_integers():
    """The dynamic form's int8 weights and per-column scales are the solved ones: q·s is the solved weight."""
    from onnxadmm.export.dynamic import quantize_dynamic_int8
    from onnxadmm.export.qdq import WeightScales
    weights, model = _model(VARIANTS[0])
    rng = np.random.default_rng(0)
    scales = rng.uniform(0.001, 0.01, HIDDEN).astype(np.float32)
    ints = rng.integers(-127, 128, (HIDDEN, HIDDEN)).astype(np.float32)
    solved = onnx.ModelProto()
    solved.CopyFrom(model)
    wq = next(t for t in solved.graph.initializer if t.name == "wq")
    wq.CopyFrom(onnx.numpy_helper.from_array(ints * scales[None, :], "wq"))
    quantized = quantize_dynamic_int8(solved, {"wq": WeightScales(scales, 1)})
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    np.testing.assert_array_equal(inits["wq_quantized"], ints.astype(np.int8))
    np.testing.assert_allclose(inits["wq_scale"], scales)
    assert not inits["wq_zero_point"].any()


def test_int8_forms_follow_where_the_weights_are():
    from onnxadmm.export.qdq import int8_forms
    from models import tiny_cnn
    _, model = _model(VARIANTS[0])
    encoder_layers = find_layers(normalize(model).view()).layers
    cnn_layers = find_layers(normalize(tiny_cnn()).view()).layers
    assert int8_forms(encoder_layers, "auto") == ["static", "dynamic"]
    assert int8_forms(cnn_layers, "auto") == ["static"]
    assert int8_forms(cnn_layers, "dynamic") == ["dynamic"]


def test_dynamic_int8_rounds_the_embedding_table_as_the_solve_saw_it():
    """The embedding table is stored int8 with a scale per row; the solve ran on exactly that table dequantized,
    so the layers after it absorbed its rounding."""
    from onnxadmm import CompressConfig, ValidateConfig, compress
    from onnxadmm.quantize.fakequant import embedding_rounding
    model = tiny_encoder(encoder_weights(), vocab=50)
    rng = np.random.default_rng(3)
    calib = {"input_ids": rng.integers(0, 50, (60, 8)), "attention_mask": encoder_inputs(60, 8, 3)["attention_mask"]}
    result = compress(model, calib, CompressConfig(method="none", quantize="int8", int8_activations="dynamic"),
                      ValidateConfig(latency_rounds=3))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert inits["embedding_rows_int8"].dtype == np.int8 and "embedding" not in inits  # the float table is gone
    stored = inits["embedding_rows_int8"].astype(np.float64) * inits["embedding_row_scale"]
    seen = embedding_rounding(normalize(model).view())["embedding"]
    assert np.abs(stored - seen).max() < 1e-6
    table = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "embedding")
    step = np.abs(table).max(axis=1, keepdims=True) / 127
    assert 0 < np.abs(seen - table).max() and np.all(np.abs(seen - table) <= step / 2 + 1e-6)  # per row
    assert result.report.plan["quantization"]["activations"] == "dynamic"
    feed = {"input_ids": rng.integers(0, 50, (3, 5)), "attention_mask": np.ones((3, 5), np.int64)}
    got = ort.InferenceSession(result.model.SerializeToString()).run(None, feed)[0]
    assert np.isfinite(got).all() and got.shape == (3, 2)


def test_samples_at_a_sequence_length_are_cut_or_padded_on_every_sequence_axis():
    from onnxadmm.calib.readers import at_sequence_length, sequence_axes
    from onnxadmm.onnxio.graph import TensorType

    inputs = {"ids": TensorType(onnx.TensorProto.INT64, ("N", "S")),
              "pair_mask": TensorType(onnx.TensorProto.INT64, ("N", "S", "S")),
              "image": TensorType(onnx.TensorProto.FLOAT, ("N", 3, 8, 8))}
    axes = sequence_axes(inputs)
    assert axes == {"ids": (1,), "pair_mask": (1, 2)}
    feed = {"ids": np.arange(1, 13).reshape(2, 6), "pair_mask": np.ones((2, 6, 6), np.int64),
            "image": np.ones((2, 3, 8, 8), np.float32)}
    short, long = at_sequence_length(feed, axes, 4), at_sequence_length(feed, axes, 9)
    np.testing.assert_array_equal(short["ids"], feed["ids"][:, :4])
    assert short["pair_mask"].shape == (2, 4, 4) and long["pair_mask"].shape == (2, 9, 9)
    np.testing.assert_array_equal(long["ids"][:, :6], feed["ids"])
    assert not long["ids"][:, 6:].any() and not long["pair_mask"][:, 6:, :].any()  # padding tokens, mask 0
    assert long["image"] is feed["image"]


def test_latency_is_timed_at_the_sequence_length_served(monkeypatch):
    from onnxadmm import CompressConfig, ValidateConfig, compress
    from onnxadmm.plan.latency import LatencyTable

    node_shapes, graph_shapes = [], []
    node_ratio, plan_ratio = LatencyTable.int8_node_ratio, LatencyTable.plan_ratio

    def spy_node(self, node, input_shape, weight):
        node_shapes.append(tuple(input_shape))
        return node_ratio(self, node, input_shape, weight)

    def spy_plan(self, original, planned, feed, **options):
        graph_shapes.append({name: array.shape for name, array in feed.items()})
        return plan_ratio(self, original, planned, feed, **options)

    monkeypatch.setattr(LatencyTable, "int8_node_ratio", spy_node)
    monkeypatch.setattr(LatencyTable, "plan_ratio", spy_plan)
    _, model = _model(VARIANTS[0])
    config = CompressConfig(method="none", quantize="int8", objective="latency", latency_seq_len=16,
                            admm_iterations=4)
    result = compress(model, encoder_inputs(count=24, seq=8, seed=3), config, ValidateConfig(latency_rounds=2))
    assert node_shapes and {shape[1] for shape in node_shapes if len(shape) == 3} == {16}
    assert graph_shapes and all(s == {"x": (1, 16, HIDDEN), "attention_mask": (1, 16)} for s in graph_shapes)
    assert [row.sequence_length for row in result.report.validation.latency] == [16]
    with pytest.raises(ConfigError, match="no input of the model has a dynamic second"):
        from models import samples_for, tiny_cnn
        cnn = tiny_cnn()
        compress(cnn, samples_for(cnn, 8), CompressConfig(method="sparse", latency_seq_len=16))
