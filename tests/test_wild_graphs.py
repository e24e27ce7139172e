"""Graph forms seen in the wild: control flow, custom domains, fp16 weights behind a Cast, BatchNormalization
not folded. Each compresses what it can and names what it leaves, or stops with a clear error."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import GraphBuilder, run, samples_for
from onnxadmm import CompressConfig, compress
from onnxadmm.errors import BadInputError

FAST = CompressConfig(sparsity=0.5, uniform=True, admm_iterations=5)


def _with_if(b: GraphBuilder, x: str) -> str:
    """If (ReduceSum(x) > 0) then x else -x: a subgraph onnxadmm does not enter."""
    cond = b.node("Greater", [b.node("ReduceSum", [x], keepdims=0), b.const(np.array(0, np.float32))])
    then_out, else_out = "if_then", "if_else"
    then_graph = helper.make_graph([helper.make_node("Identity", [x], [then_out])], "then", [],
                                   [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Neg", [x], [else_out])], "else", [],
                                   [helper.make_tensor_value_info(else_out, TensorProto.FLOAT, None)])
    return b.node("If", [cond], then_branch=then_graph, else_branch=else_graph)


def test_if_subgraph_is_left_alone_and_the_rest_compresses():
    b = GraphBuilder(1)
    y = b.conv("input", 3, 8)
    y = _with_if(b, y)
    y = b.conv(y, 8, 8, act=None)
    model = b.model([("input", ["N", 3, 6, 6])], [y])
    result = compress(model, samples_for(model, 16), FAST)
    assert result.report.totals.layers_compressed == 2
    assert any(n.op_type == "If" for n in result.model.graph.node)
    feed = samples_for(model, 3, seed=5)
    assert run(result.model, feed)[0].shape == run(model, feed)[0].shape


def test_custom_domain_node_onnxruntime_cannot_run_is_a_clear_error():
    b = GraphBuilder(3)
    y = b.conv("input", 3, 8)
    b.nodes.append(helper.make_node("FancyNorm", [y], ["fancy"], name="my_fancy_norm", domain="com.example"))
    graph = helper.make_graph(b.nodes, "custom", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("fancy", TensorProto.FLOAT, ["N", 8, 6, 6])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)], ir_version=8)
    with pytest.raises(BadInputError, match="FancyNorm|com.example"):
        compress(model, samples_for(model, 8), FAST)


def test_fp16_weights_behind_a_cast_are_declined_with_the_reason():
    b = GraphBuilder(4)
    w16 = numpy_helper.from_array(b.weight(8, 3, 3, 3).astype(np.float16), "W16")
    b.inits.append(w16)
    w = b.node("Cast", ["W16"], to=TensorProto.FLOAT)
    y = b.node("Conv", ["input", w], kernel_shape=[3, 3], pads=[1] * 4)
    y = b.conv(b.node("Relu", [y]), 8, 4, act=None)
    model = b.model([("input", ["N", 3, 6, 6])], [y])
    result = compress(model, samples_for(model, 16), FAST)
    declined = {d.name: d.reason for d in result.report.declined}
    assert any("Cast" in reason for reason in declined.values())
    assert result.report.totals.layers_compressed == 1
    onnx.checker.check_model(result.model, full_check=True)


def test_fp16_model_end_to_end_keeps_its_dtype():
    b = GraphBuilder(5)
    x = b.node("Cast", ["input"], to=TensorProto.FLOAT16)
    w = numpy_helper.from_array(b.weight(8, 3, 3, 3).astype(np.float16), "W")
    bias = numpy_helper.from_array(np.zeros(8, np.float16), "B")
    b.inits += [w, bias]
    y = b.node("Relu", [b.node("Conv", [x, "W", "B"], kernel_shape=[3, 3], pads=[1] * 4)])
    out = b.node("Cast", [y], to=TensorProto.FLOAT)
    model = b.model([("input", ["N", 3, 6, 6])], [out])
    result = compress(model, samples_for(model, 16), FAST)
    weights = {t.name: t for t in result.model.graph.initializer}
    assert weights["W"].data_type == TensorProto.FLOAT16
    assert result.report.totals.layers_compressed + len(result.report.declined) == 1


def test_loop_body_reading_an_outer_weight_is_left_alone_and_the_rest_compresses():
    """Loop x2: v ← Relu(v · s), with s an outer-scope initializer read inside the body. The body is not
    entered; the convolutions around the Loop compress and the Loop's captured weight is untouched."""
    b = GraphBuilder(6)
    y = b.conv("input", 3, 8)
    scale = b.const(np.full((1, 8, 1, 1), 0.9, np.float32))
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Mul", ["v_in", scale], ["scaled"]),
         helper.make_node("Relu", ["scaled"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 8, 6, 6])])
    trips, keep_going = b.const(np.array(2, np.int64)), b.const(np.array(True))
    y = b.node("Loop", [trips, keep_going, y], body=body)
    y = b.conv(y, 8, 4, act=None)
    graph = helper.make_graph(b.nodes, "loop", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 4, 6, 6])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = compress(model, samples_for(model, 16), FAST)
    assert result.report.totals.layers_compressed == 2
    loop = next(n for n in result.model.graph.node if n.op_type == "Loop")
    assert loop.attribute[0].g.node[1].input[1] == scale
    captured = next(t for t in result.model.graph.initializer if t.name == scale)
    np.testing.assert_array_equal(numpy_helper.to_array(captured), np.float32(0.9))
    onnx.checker.check_model(result.model, full_check=True)
    feed = samples_for(model, 3, seed=5)
    assert run(result.model, feed)[0].shape == run(model, feed)[0].shape


def test_a_resize_to_the_input_s_size_computed_early_compresses_by_channels():
    """Segmentation heads resize to the image's size, read by Shape at the start: a segment that begins after
    it reads that size as an input, whose length the Resize needs when the segment is loaded (LR-ASPP)."""
    b = GraphBuilder(7)
    axes = b.const(np.array([0], np.int64))
    size = b.node("Cast", [b.node("Slice", [b.node("Shape", ["input"]), b.const(np.array([2], np.int64)),
                                            b.const(np.array([4], np.int64)), axes])], to=TensorProto.INT64)
    y = b.conv(b.conv("input", 3, 16, stride=2), 16, 16)
    y = b.node("Add", [b.conv(y, 16, 8, k=1, act=None), b.conv(y, 16, 8, k=1, act=None)])  # two classifiers
    head = b.node("Slice", [b.node("Shape", [y]), b.const(np.array([0], np.int64)), b.const(np.array([2], np.int64)),
                            axes])
    y = b.node("Resize", [y, "", "", b.node("Concat", [head, size], axis=0)], mode="linear")
    model = b.model([("input", ["N", 3, 12, 12])], [b.conv(y, 8, 4, act=None)])
    result = compress(model, samples_for(model, 24), CompressConfig(method="channel", target_macs=0.85,
                                                                  sensitivity_samples=8, admm_iterations=4))
    onnx.checker.check_model(result.model, full_check=True)
    feed = samples_for(model, 3, seed=5)
    assert run(result.model, feed)[0].shape == run(model, feed)[0].shape == (3, 4, 12, 12)


@pytest.mark.parametrize("scale", [1e-20, 1e18])
def test_layers_whose_inputs_leave_float32_s_range_are_declined_with_the_reason(scale):
    """Untrained networks can vanish or explode; the solver's float32 sums of squares cannot follow, so such
    layers are declined (the int8 stage quantizes them with onnxruntime's own scales) instead of crashing."""
    from models import tiny_cnn

    model = tiny_cnn()
    feed = {k: v * np.float32(scale) for k, v in samples_for(model, 16).items()}
    result = compress(model, feed, CompressConfig(method="none", quantize="int8", admm_iterations=4,
                                                  sensitivity_samples=8))
    reasons = {d["name"]: d["reason"] for d in result.report.plan["quantization"]["declined"]}
    first = next(n.name for n in model.graph.node if n.op_type == "Conv")
    assert "outside 1e-15..1e+15" in reasons[first], reasons
    onnx.checker.check_model(result.model, full_check=True)
