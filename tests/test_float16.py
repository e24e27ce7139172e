"""16-bit float models: the precision stages widen them to float32 (``onnxio/widen.py``) and keep their
signature; onnxruntime's float32 stand-ins for their nodes are named by the layer in the time split."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import run, samples_for, tiny_cnn, to_float16
from onnxadmm import CompressConfig, ValidateConfig, compress
from onnxadmm.onnxio.widen import computes_narrow, widen
from onnxadmm.validation.profile import graph_layers

FAST = dict(sensitivity_samples=8, admm_iterations=6, sample_patches=1024, seed=0)


def _signature(model):
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (*model.graph.input, *model.graph.output)]


def _branchy_half() -> onnx.ModelProto:
    """float16 in and out, with a float16 Constant, ConstantOfShape, a Cast to float16 and an If whose branches
    compute in float16 on the outer values."""
    half = TensorProto.FLOAT16
    c = numpy_helper.from_array(np.array([0.5, -1.25, 2.0, 3.5], np.float16), "c")
    then = helper.make_graph([helper.make_node("Mul", ["y", "s"], ["b"])], "then", [],
                             [helper.make_tensor_value_info("b", half, None)])
    other = helper.make_graph([helper.make_node("Add", ["y", "x"], ["b2"])], "else", [],
                              [helper.make_tensor_value_info("b2", half, None)])
    nodes = [
        helper.make_node("Constant", [], ["k"], value=c),
        helper.make_node("Add", ["x", "k"], ["y0"]),
        helper.make_node("Cast", ["y0"], ["y32"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["y32"], ["y"], to=half),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["s"],
                         value=numpy_helper.from_array(np.array([0.75], np.float16))),
        helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", half, ["N", 4])],
                              [helper.make_tensor_value_info("z", half, ["N", 4])],
                              [numpy_helper.from_array(np.array(True), "cond")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_widening_computes_in_float32_with_the_same_signature_and_values():
    model = _branchy_half()
    wide = widen(model)
    onnx.checker.check_model(wide, full_check=True)
    assert computes_narrow(model) and not any(t.data_type == TensorProto.FLOAT16 for t in wide.graph.initializer)
    assert _signature(wide) == _signature(model)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float16)
    expected, got = run(model, {"x": x})[0], run(wide, {"x": x})[0]
    assert got.dtype == np.float16 and np.allclose(got, expected, rtol=2e-3, atol=2e-3)
    assert model.graph.initializer[0].data_type == TensorProto.BOOL  # the input model untouched
    assert not computes_narrow(tiny_cnn())


@pytest.mark.parametrize("keep_io_types", [False, True])
@pytest.mark.parametrize("precision", ["int8", "w4"])
def test_a_float16_model_quantizes_keeping_its_signature_as_accurately_as_its_float32_twin(keep_io_types, precision):
    config = CompressConfig(method="none", quantize=precision, **FAST)
    model, feed = tiny_cnn(), samples_for(tiny_cnn(), 48)
    reference = compress(model, feed, config, ValidateConfig(latency_rounds=2)).model
    half = to_float16(model, keep_io_types)
    half_feed = feed if keep_io_types else {k: v.astype(np.float16) for k, v in feed.items()}
    result = compress(half, half_feed, config, ValidateConfig(latency_rounds=2))
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    assert _signature(q) == _signature(half)
    assert any("16-bit floats" in note for note in result.report.notes)
    if precision == "int8":
        assert result.report.plan["quantization"]["fusion"]["integer"]

    def error(original, feed_, quantized):
        expected, got = run(original, feed_)[0].astype(np.float32), run(quantized, feed_)[0].astype(np.float32)
        return np.linalg.norm(got - expected) / np.linalg.norm(expected)

    assert error(half, half_feed, q) <= 1.25 * error(model, feed, reference)


def test_onnxruntime_float32_stand_ins_for_float16_nodes_are_named_by_their_layer():
    half = to_float16(tiny_cnn(), keep_io_types=True)
    conv = next(n for n in half.graph.node if n.op_type == "Conv")
    name = f"InsertedPrecisionFreeCast_{conv.output[0]}_nchwc"
    assert graph_layers(half, [name]) == {name: conv.name}


def test_a_float16_encoder_loses_heads_and_neurons_and_goes_int8_as_its_float32_twin_does():
    from encoders import encoder_inputs, encoder_weights, tiny_encoder

    model, feed = tiny_encoder(encoder_weights()), encoder_inputs(48)
    half = to_float16(model, keep_io_types=True)
    config = CompressConfig(method="channel", target_macs=0.7, quantize="int8", **FAST)
    results = [compress(m, feed, config, ValidateConfig(latency_rounds=2)) for m in (model, half)]
    onnx.checker.check_model(results[1].model, full_check=True)
    assert _signature(results[1].model) == _signature(half)
    twin, ours = (r.report.plan["quantization"] for r in results)
    assert ours["activations"] == twin["activations"]
    assert len(ours["fusion"]["integer"]) == len(twin["fusion"]["integer"]) > 0

    def matrix_weights(m):
        return sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) == 2)

    assert matrix_weights(results[1].model) < 0.9 * matrix_weights(half)  # heads or neurons removed
