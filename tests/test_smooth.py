"""Activation smoothing for dynamic int8: the float model unchanged, the rounded error lower, 1/s placed exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from encoders import encoder_inputs, encoder_weights, tiny_encoder
from onnxadmm.analysis.layers import find_layers
from onnxadmm.calib.readers import SampleSet
from onnxadmm.errors import ConfigError
from onnxadmm.onnxio.normalize import normalize
from onnxadmm.quantize.smooth import _round_run, smooth_activations


def _outputs(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString()).run(None, feed)


def _outlier_encoder(gelu: str, bias: bool, shapes: str, ffn_rank: int) -> onnx.ModelProto:
    """The tiny encoder with outlier channels where transformers have them: a LayerNorm gain, an FFN neuron, a
    value channel."""
    weights = encoder_weights(0, bias)
    weights["ln1_g"][5] = 12.0
    weights["w1"][:, 7] *= 8.0
    weights["wv"][:, 2] *= 10.0
    return tiny_encoder(weights, gelu, bias, shapes, ffn_rank, opset=20 if gelu == "op" else 18)


def _inputs(count: int, seed: int) -> dict[str, np.ndarray]:
    feed = encoder_inputs(count, 8, seed)
    feed["x"][..., 3] *= 20.0  # an outlier channel of the input too
    return feed


def _smooth(model: onnx.ModelProto, calib: dict) -> tuple[onnx.ModelProto, object]:
    normalized = normalize(model)
    view = normalized.view()
    layers = [l for l in find_layers(view).layers if l.op_type == "MatMul" or (l.alpha == 1.0 and l.beta == 1.0)]
    smoothing = smooth_activations(normalized.model, view, layers, SampleSet(calib, "mem"), 8, 16, 0, 1 << 26)
    return normalized.model, smoothing


@pytest.mark.parametrize("gelu, bias, shapes, ffn_rank", [("erf", True, "concat", 3), ("tanh", False, "constant", 2),
                                                          ("op", True, "constant", 3)])
def test_smoothing_keeps_what_the_float_model_computes_and_lowers_the_rounded_error(gelu, bias, shapes, ffn_rank):
    model = _outlier_encoder(gelu, bias, shapes, ffn_rank)
    smoothed, smoothing = _smooth(model, _inputs(40, 3))
    onnx.checker.check_model(smoothed, full_check=True)
    feed = _inputs(6, 9)
    for got, want in zip(_outputs(smoothed, feed), _outputs(model, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    rows = {r.tensor: r for r in smoothing.inputs}
    assert len(smoothing.smoothed) >= 3
    for row in smoothing.inputs:  # smoothed only where its MatMuls' rounded error falls
        assert (row.error_after < row.error_before) if row.alpha is not None else row.error_after == row.error_before
    by_consumer = {c: r for r in smoothing.inputs for c in r.consumers}
    assert by_consumer["attn/out/MatMul"].placed.startswith("value projection")  # folded into W_v's columns
    down = next(r for c, r in by_consumer.items() if c.startswith("ffn/down"))
    assert down.alpha is not None and down.placed.startswith("Mul node")  # the GELU stays one onnxruntime fuses
    if gelu != "op":
        half = next(t for t in smoothed.graph.initializer if t.name == "half")
        assert numpy_helper.to_array(half).shape == ()
    assert rows["x"].placed.startswith("Mul node")  # a graph input, read by the residual too


def test_smoothing_folds_into_a_layer_norm_and_a_per_channel_mul_without_new_nodes():
    """Pre-LN: the LayerNorm output feeds only MatMuls, so 1/s goes into its gain and bias; a Mul by a
    per-channel constant takes it into that constant."""
    rng = np.random.default_rng(0)
    gain = np.ones(8, np.float32)
    gain[2] = 15.0
    scale = np.ones(8, np.float32)
    scale[6] = 30.0
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("g", gain), ("b", rng.standard_normal(8) * 0.1), ("c", scale), ("w1", rng.standard_normal((8, 5))),
              ("w2", rng.standard_normal((8, 4))), ("w3", rng.standard_normal((8, 3))))]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["t1"], name="ln", axis=-1),
             helper.make_node("MatMul", ["t1", "w1"], ["y1"], name="mm1"),
             helper.make_node("MatMul", ["t1", "w2"], ["y2"], name="mm2"),
             helper.make_node("Mul", ["x", "c"], ["t2"], name="scale"),
             helper.make_node("MatMul", ["t2", "w3"], ["y3"], name="mm3")]
    graph = helper.make_graph(nodes, "pre_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", k])
                               for y, k in (("y1", 5), ("y2", 4), ("y3", 3))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    calib = {"x": rng.standard_normal((64, 8)).astype(np.float32)}
    smoothed, smoothing = _smooth(model, calib)
    placed = {r.tensor: r.placed for r in smoothing.smoothed}
    assert placed == {"t1": "LayerNormalization 'ln'", "t2": "Mul 'scale' (its constant)"}
    assert [n.op_type for n in smoothed.graph.node] == [n.op_type for n in model.graph.node]
    feed = {"x": rng.standard_normal((5, 8)).astype(np.float32)}
    for got, want in zip(_outputs(smoothed, feed), _outputs(model, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_an_input_without_outlier_channels_gets_no_mul_node():
    """Smoothing an input with even channels gains little, and where it would take a Mul node (a graph input) that
    pass over the tensor at run time is not worth it: the graph stays as it was."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                              [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    smoothed, smoothing = _smooth(model, {"x": rng.standard_normal((64, 16)).astype(np.float32)})
    (row,) = smoothing.inputs
    assert row.alpha is None and row.placed == "" and not smoothing.smoothed
    assert smoothed.graph.node[0] == model.graph.node[0] and len(smoothed.graph.node) == 1
    outlier = {"x": rng.standard_normal((64, 16)).astype(np.float32) * np.where(np.arange(16) == 4, 30, 1)}
    assert _smooth(model, outlier)[1].smoothed[0].placed.startswith("Mul node")  # worth it with an outlier channel


def test_the_error_model_rounds_as_onnxruntimes_dynamic_quantize_linear():
    x = np.random.default_rng(1).standard_normal((4, 7, 16)).astype(np.float32)
    x[..., 3] *= 40.0
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 7, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 7, 16])])
    want = _outputs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), {"x": x})[0]
    got = _round_run(x)
    step = (x.max() - min(x.min(), 0)) / 255
    assert np.mean(got == want) > 0.999 and np.abs(got - want).max() <= step * 1.001


def test_int8_with_smoothing_is_closer_to_the_original_than_without(capsys):
    from onnxadmm import CompressConfig, ValidateConfig, compress
    from onnxadmm.cli import _print_summary
    from onnxadmm.report.markdown import render
    model = _outlier_encoder("erf", True, "concat", 3)
    calib, held_out = _inputs(60, 3), _inputs(40, 11)
    want = _outputs(model, held_out)[0]
    errors, results = {}, {}
    for mode in ("auto", "off"):
        config = CompressConfig(method="none", quantize="int8", int8_activations="dynamic", int8_smoothing=mode)
        results[mode] = compress(model, calib, config, ValidateConfig(latency_rounds=3))
        got = _outputs(results[mode].model, held_out)[0]
        errors[mode] = float(np.sum((got - want) ** 2) / np.sum(want ** 2))
    assert errors["auto"] < 0.7 * errors["off"], errors
    assert results["off"].report.plan["quantization"]["smoothing"] is None
    assert not any(n.name.endswith("_smooth") for n in results["off"].model.graph.node)
    record = results["auto"].report.plan["quantization"]["smoothing"]
    assert any(r["alpha"] is not None for r in record["inputs"])
    assert "| smoothed input |" in render(results["auto"].report)
    _print_summary(results["auto"].report, None)
    assert "activation smoothing: " in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--int8-smoothing applies to --quantize int8"):
        CompressConfig(int8_smoothing="off")


def test_latency_plans_time_the_mul_nodes_smoothing_adds():
    """With smoothing, the planner times the dynamic int8 graph with a Mul before each input that cannot fold it
    (here the graph input, the post-LN residual stream, the GELU output and the pooled features), none before the
    attention's output projection (folded into the value projection)."""
    from onnxadmm.export.qdq import timing_precision
    from onnxadmm.export.smoothing import mul_node_inputs
    from onnxadmm.plan.latency import rounded_int8
    model = normalize(_outlier_encoder("erf", True, "concat", 3)).model
    layers = find_layers(normalize(model).view()).layers
    assert timing_precision(layers, "int8", "auto", "auto") == "int8-dynamic-smoothed"
    assert timing_precision(layers, "int8", "auto", "off") == "int8-dynamic"
    assert mul_node_inputs(model) == {"x": 16, "ln1": 16, "ffn/Mul_half": 24, "pooled": 16}
    feed = _inputs(2, 5)
    plain = rounded_int8(model, feed, "int8-dynamic")
    timed = rounded_int8(model, feed, "int8-dynamic-smoothed")
    muls = [n for n in timed.graph.node if n.op_type == "Mul"]
    assert len(muls) == len([n for n in plain.graph.node if n.op_type == "Mul"]) + 4
    quantized_inputs = {n.input[0] for n in timed.graph.node if n.op_type == "DynamicQuantizeLinear"}
    assert {f"{t}_smoothed" for t in ("x", "ln1", "ffn/Mul_half", "pooled")} <= quantized_inputs
    for got, want in zip(_outputs(timed, feed), _outputs(plain, feed)):  # a Mul by ones changes nothing
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
