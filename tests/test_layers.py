"""Layer discovery: every Conv/Gemm/MatMul is a layer or declined with a reason; activation chains."""

import numpy as np
import onnx
import pytest

from models import GraphBuilder, mlp, run, samples_for, tiny_cnn, token_mlp
from onnxadmm.analysis.layers import apply_exclude, find_layers
from onnxadmm.errors import ConfigError
from onnxadmm.onnxio.normalize import normalize


def layers_of(model):
    view = normalize(model).view()
    return view, find_layers(view)


def test_tiny_cnn_layers_and_chains():
    view, found = layers_of(tiny_cnn())
    assert [l.op_type for l in found.layers] == ["Conv", "Conv", "Conv", "Conv", "Gemm"]
    assert not found.declined
    first, depthwise, grouped, strided, fc = found.layers
    assert first.chain.description == "Relu"
    assert depthwise.groups == 16 and depthwise.in_features == 9 and depthwise.chain.description == "Clip[0,6]"
    assert grouped.groups == 2 and grouped.in_features == 8
    assert grouped.chain.description == "Add(residual)+Relu"
    assert grouped.chain.side_inputs == (first.chain.output_name,)
    assert fc.chain.is_identity


def test_canonical_view_round_trips_every_layout():
    for model in (tiny_cnn(), mlp(trans_b=True, alpha=0.5), mlp(trans_b=False, alpha=2.0), token_mlp()):
        view, found = layers_of(model)
        for layer in found.layers:
            stored = view.constant(layer.weight_name)
            canonical = layer.canonical(stored)
            assert canonical.shape == (layer.groups, layer.out_features // layer.groups, layer.in_features)
            np.testing.assert_allclose(layer.stored(canonical), stored, rtol=1e-6)


def test_gemm_alpha_and_transpose_in_the_canonical_view():
    view, found = layers_of(mlp(trans_b=False, alpha=2.0))
    layer = found.layers[0]
    stored = view.constant(layer.weight_name)  # (K, N) because transB=0
    np.testing.assert_allclose(layer.canonical(stored)[0], 2.0 * stored.T, rtol=1e-6)


def test_silu_pattern_and_leaky_relu_are_chains():
    b = GraphBuilder()
    y = b.conv("input", 3, 8, act="SiLU")
    y = b.conv(y, 8, 8, act="LeakyRelu")
    model = b.model([("input", ["N", 3, 8, 8])], [y])
    _, found = layers_of(model)
    assert [l.chain.description for l in found.layers] == ["SiLU", "LeakyRelu"]


@pytest.mark.parametrize("bias", [False, True])
def test_batchnorm_after_a_conv_is_folded_into_it_computing_the_same(bias):
    b = GraphBuilder()
    y = b.conv("input", 3, 8, act=None, bias=bias)
    gain, shift, mean, var = (b.rng.uniform(lo, hi, 8).astype(np.float32) for lo, hi in
                              ((0.5, 2), (-0.5, 0.5), (-0.3, 0.3), (0.5, 1.5)))
    # torch's exporter without constant folding reads the statistics through Identity nodes
    statistics = [b.node("Identity", [b.const(v)]) for v in (gain, shift, mean, var)]
    y = b.node("BatchNormalization", [y, *statistics], epsilon=1e-3)
    model = b.model([("input", ["N", 3, 8, 8])], [b.node("Relu", [y])])
    normalized = normalize(model)
    assert [n.op_type for n in normalized.model.graph.node] == ["Conv", "Relu"]
    assert any("folded into the Conv/Gemm before each: 1 BatchNormalization" in r for r in normalized.rewrites)
    onnx.checker.check_model(normalized.model, full_check=True)
    feed = samples_for(model, 4)
    assert np.allclose(run(normalized.model, feed)[0], run(model, feed)[0], atol=1e-5)
    _, found = layers_of(model)
    assert found.layers[0].chain.description == "Relu"  # the layer's activation follows it directly


def _folded(model):
    normalized = normalize(model)
    onnx.checker.check_model(normalized.model, full_check=True)
    feed = samples_for(model, 4)
    assert np.allclose(run(normalized.model, feed)[0], run(model, feed)[0], atol=1e-5)
    return [n.op_type for n in normalized.model.graph.node]


def test_a_chain_of_per_channel_maps_after_a_conv_folds_whole():
    b = GraphBuilder()
    y = b.conv("input", 3, 8, act=None, bias=False)
    y = b.node("Mul", [y, b.const(b.rng.uniform(0.5, 2, (8, 1, 1)).astype(np.float32))])
    y = b.node("Add", [b.const(b.rng.uniform(-1, 1, (1, 8, 1, 1)).astype(np.float32)), y])  # either operand order
    y = b.node("Div", [y, b.const(np.array(2.0, np.float32))])  # a scalar is per channel too
    assert _folded(b.model([("input", ["N", 3, 8, 8])], [b.node("Relu", [y])])) == ["Conv", "Relu"]


@pytest.mark.parametrize("trans_b, bias, beta", [(True, True, 1.0), (False, True, 0.5), (True, False, 1.0)])
def test_batchnorm_and_a_scale_after_a_gemm_fold_into_it(trans_b, bias, beta):
    b = GraphBuilder()
    y = b.gemm("input", 32, 8, trans_b=trans_b, beta=beta, bias=bias, act=None)
    statistics = [b.const(b.rng.uniform(lo, hi, 8).astype(np.float32))
                  for lo, hi in ((0.5, 2), (-0.5, 0.5), (-0.3, 0.3), (0.5, 1.5))]
    y = b.node("BatchNormalization", [y, *statistics])  # torch's BatchNorm1d after a Linear
    y = b.node("Mul", [y, b.const(b.rng.uniform(0.5, 2, 8).astype(np.float32))])
    assert _folded(b.model([("input", ["N", 32])], [b.node("Relu", [y])])) == ["Gemm", "Relu"]


@pytest.mark.parametrize("case", ["spatial constant", "constant minus the output", "output read twice"])
def test_maps_that_are_not_per_channel_maps_of_a_conv_output_stay(case):
    b = GraphBuilder()
    y = b.conv("input", 3, 8, act=None)
    if case == "spatial constant":
        z = b.node("Mul", [y, b.const(b.rng.uniform(0.5, 2, (8, 8)).astype(np.float32))])
    elif case == "constant minus the output":
        z = b.node("Sub", [b.const(np.full((8, 1, 1), 0.5, np.float32)), y])
    else:
        z = b.node("Add", [b.node("Mul", [y, b.const(np.full((8, 1, 1), 2.0, np.float32))]), y])
    ops = _folded(b.model([("input", ["N", 3, 8, 8])], [b.node("Relu", [z])]))
    assert len(ops) == (4 if case == "output read twice" else 3)


def test_shared_weight_and_odd_operands_are_declined():
    b = GraphBuilder()
    w = b.const(b.weight(8, 8), "W")
    h = b.node("Gemm", ["input", w], transB=1)
    h = b.node("Gemm", [h, w], transB=1)  # same initializer twice
    h = b.node("Gemm", [h, b.const(b.weight(4, 8), "W")], transA=1)  # (8,4)x(4,8)
    const_left = b.node("MatMul", [b.const(b.weight(4, 4), "L"), b.node("Reshape", [h, b.const(np.array([4, -1]))])])
    model = b.model([("input", [4, 8])], [const_left])
    _, found = layers_of(model)
    reasons = {d.name: d.reason for d in found.declined}
    assert sum("shared" in r for r in reasons.values()) == 2
    assert any("transA" in r for r in reasons.values())
    assert any("left MatMul operand" in r for r in reasons.values())
    assert not found.layers


def test_exclude_by_name_glob_and_op_type():
    _, found = layers_of(tiny_cnn())
    names = [l.name for l in found.layers]
    assert len(apply_exclude(found, ("Gemm",)).layers) == 4
    assert len(apply_exclude(found, (names[0],)).layers) == 4
    assert len(apply_exclude(found, ("Conv_*",)).layers) == 1
    reasons = [d.reason for d in apply_exclude(found, ("Gemm",)).declined]
    assert reasons == ["excluded by --exclude 'Gemm'"]
    with pytest.raises(ConfigError, match="matches no"):
        apply_exclude(found, ("nothing_like_this",))


@pytest.mark.parametrize("form", ["asymmetric", "valid conv", "value input zero", "opset 10 attribute"])
def test_a_zero_pad_before_a_conv_becomes_its_pads(form):
    b = GraphBuilder()
    pads = [0, 0, 0, 0, 0, 0, 1, 1] if form == "asymmetric" else [0, 0, 1, 2, 0, 0, 1, 2]  # TF "SAME", stride 2
    if form == "opset 10 attribute":
        y = b.node("Pad", ["input"], mode="constant", pads=pads)
    else:
        zero = [b.const(np.array(0, np.float32))] if form == "value input zero" else []
        y = b.node("Pad", ["input", b.const(np.array(pads, np.int64)), *zero], mode="constant")
    y = b.conv(y, 3, 8, stride=2, act="Relu", auto_pad="VALID") if form == "valid conv" else \
        b.conv(y, 3, 8, stride=2, pad=1, act="Relu")
    opset = 10 if form == "opset 10 attribute" else 17
    assert _folded(b.model([("input", ["N", 3, 9, 9])], [y], opset=opset)) == ["Conv", "Relu"]


@pytest.mark.parametrize("case", ["reflect", "nonzero value", "channel pad", "read twice"])
def test_pads_that_are_not_a_conv_s_zero_padding_stay(case):
    b = GraphBuilder()
    pads = [0, 2, 1, 1, 0, 0, 1, 1] if case == "channel pad" else [0, 0, 1, 1, 0, 0, 1, 1]
    inputs = ["input", b.const(np.array(pads, np.int64))]
    if case == "nonzero value":
        inputs.append(b.const(np.array(0.5, np.float32)))
    y = b.node("Pad", inputs, mode="reflect" if case == "reflect" else "constant")
    z = b.conv(y, 5 if case == "channel pad" else 3, 8, pad=0, act="Relu")
    outputs = [z, b.node("ReduceMean", [y], keepdims=0)] if case == "read twice" else [z]
    assert "Pad" in _folded(b.model([("input", ["N", 3, 9, 9])], outputs))


@pytest.mark.parametrize("rank", [2, 3])
def test_a_matrix_matmul_plus_a_constant_bias_becomes_a_gemm(rank):
    b = GraphBuilder()
    bias = b.const((b.rng.standard_normal(8) * 0.1).astype(np.float32))
    y = b.node("Relu", [b.node("Add", [b.matmul("input", 16, 8), bias])])
    y = b.node("Add", [bias, b.matmul(y, 8, 8)])  # the same bias read twice, in either operand order
    shape = ["N", 16] if rank == 2 else ["N", 5, 16]
    ops = _folded(b.model([("input", shape)], [y]))
    assert ops == (["Gemm", "Relu", "Gemm"] if rank == 2 else ["MatMul", "Add", "Relu", "MatMul", "Add"])
