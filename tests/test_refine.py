"""Block-wise refinement: blocks between cut tensors, training with fixed supports, held-out guard,
blocks onnx2torch cannot convert, determinism."""

import numpy as np
import onnx
import pytest
import torch

from models import GraphBuilder, run, samples_for
from onnxadmm import CompressConfig, compress
from onnxadmm.analysis.blocks import find_blocks
from onnxadmm.analysis.layers import find_layers
from onnxadmm.onnxio.graph import GraphView
from onnxadmm.onnxio.normalize import normalize
from onnxadmm.onnxio.subgraph import cut


def residual_net(seed: int = 0) -> onnx.ModelProto:
    """stem conv -> two residual blocks -> GAP -> Flatten (via a Shape/Reshape subexpression) -> Gemm."""
    b = GraphBuilder(seed)
    stream = b.conv("input", 3, 16)
    for _ in range(2):
        inner = b.conv(b.conv(stream, 16, 16), 16, 16, act=None)
        stream = b.node("Relu", [b.node("Add", [inner, stream])])
    pooled = b.node("GlobalAveragePool", [stream])
    shape = b.node("Concat", [b.node("Slice", [b.node("Shape", [pooled]), b.const(np.array([0])),
                                              b.const(np.array([1]))]), b.const(np.array([-1]))], axis=0)
    logits = b.gemm(b.node("Reshape", [pooled, shape]), 16, 10, act=None)
    return b.model([("input", ["N", 3, 8, 8])], [logits])


def deep_mlp(seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder(seed)
    h = "input"
    for k, n in ((24, 48), (48, 48), (48, 48), (48, 32)):
        h = b.gemm(h, k, n, act="Relu")
    return b.model([("input", ["N", 24])], [b.gemm(h, 32, 10, act=None)])


def test_blocks_cut_at_the_residual_stream_and_compose_to_the_model():
    model = residual_net()
    view = normalize(model).view()
    layers = {l.node_index for l in find_layers(view).layers}
    blocks = find_blocks(view, layers, min_nodes=2)
    assert [len(b.counted) for b in blocks] == [3, 2, 1]  # stem + block 1, block 2, the Gemm
    assert blocks[0].inputs == ["input"] and blocks[-1].outputs == view.output_names
    for before, after in zip(blocks, blocks[1:]):
        assert before.outputs == after.inputs and len(before.outputs) == 1
    ends = [view.nodes[view.producer[b.outputs[0]]].op_type for b in blocks[:-1]]
    assert ends == ["Relu", "Reshape"]  # after the activation that follows the Add; the Gemm's input
    assert sorted(i for b in blocks for i in b.node_ids) == list(range(len(view.nodes)))
    feed = samples_for(model, 4)
    values = dict(feed)
    for block in blocks:  # run block after block in onnxruntime: the model's output
        segment = cut(view, block.node_ids, block.outputs)
        names = [v.name for v in segment.graph.input]
        values = dict(zip(block.outputs, run(segment, {n: values[n] for n in names})))
    np.testing.assert_allclose(values[view.output_names[0]], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_min_layers_merges_stretches():
    view = GraphView(deep_mlp())
    layers = {l.node_index for l in find_layers(view).layers}
    assert [len(b.counted) for b in find_blocks(view, layers, 1)] == [1, 1, 1, 1, 1]
    assert [len(b.counted) for b in find_blocks(view, layers, 2)] == [2, 2, 1]
    assert [len(b.counted) for b in find_blocks(view, layers, 5)] == [5]


def test_blocks_end_only_at_allowed_cuts():
    """Refinement cuts only at tensors the original model has: never between a factorized layer's nodes."""
    view = GraphView(deep_mlp())
    layers = {l.node_index for l in find_layers(view).layers}
    free = find_blocks(view, layers, 1)
    allowed = set(free[1].outputs)  # only the second block's end may be cut
    blocks = find_blocks(view, layers, 1, cuts=allowed)
    assert [len(b.counted) for b in blocks] == [2, 3]
    assert blocks[0].outputs == free[1].outputs


def _relative_error(model, reference, feed):
    got, want = run(model, feed)[0], run(reference, feed)[0]
    return float(np.sum((got - want) ** 2) / np.sum(want ** 2))


@pytest.fixture(scope="module")
def mlp_runs():
    model = deep_mlp(3)
    calib = samples_for(model, 400, seed=1)
    base = dict(method="sparse", sparsity=0.85, uniform=True, admm_iterations=15)
    plain = compress(model, calib, CompressConfig(**base))
    refined = compress(model, calib, CompressConfig(**base, refine_epochs=40, refine_lr=1e-3))
    return model, plain, refined


def test_refinement_keeps_every_support_and_lowers_the_held_out_error(mlp_runs):
    model, plain, refined = mlp_runs
    inits = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    a, b = inits(plain.model), inits(refined.model)
    for layer in find_layers(GraphView(model)).layers:
        np.testing.assert_array_equal(a[layer.weight_name] != 0, b[layer.weight_name] != 0)
    rows = refined.report.refined_blocks
    assert rows and all(r.loss_after < r.loss_before for r in rows if r.kept)
    assert any(r.kept for r in rows)
    held_out = samples_for(model, 300, seed=7)
    assert _relative_error(refined.model, model, held_out) < 0.97 * _relative_error(plain.model, model, held_out)
    assert plain.report.refined_blocks == []


def test_refinement_is_deterministic(mlp_runs):
    model, _, refined = mlp_runs
    again = compress(model, samples_for(model, 400, seed=1),
                     CompressConfig(method="sparse", sparsity=0.85, uniform=True, admm_iterations=15,
                                    refine_epochs=40, refine_lr=1e-3))
    assert again.model.SerializeToString() == refined.model.SerializeToString()


def test_a_block_onnx2torch_cannot_convert_runs_unchanged_and_the_rest_is_refined():
    b = GraphBuilder(5)
    h = b.gemm("input", 24, 48, act=None)
    h = b.node("Mish", [h])  # onnx2torch has no Mish converter
    h = b.gemm(h, 48, 48, act="Relu")
    h = b.gemm(h, 48, 48, act="Relu")
    model = b.model([("input", ["N", 24])], [b.gemm(h, 48, 10, act=None)], opset=18)
    calib = samples_for(model, 200)
    result = compress(model, calib, CompressConfig(method="sparse", sparsity=0.7, uniform=True,
                                                   admm_iterations=10, refine_epochs=5,
                                                   refine_block_layers=1))
    rows = result.report.refined_blocks
    assert any("not refined" in r.note and "Mish" in r.note for r in rows)
    assert any(r.kept for r in rows)
    out = run(result.model, calib)[0]
    assert np.isfinite(out).all() and out.shape == (200, 10)


def test_channel_pruning_with_refinement_exports_the_same_widths():
    model = residual_net(2)
    calib = samples_for(model, 200)
    base = dict(method="channel", target_macs=0.6, admm_iterations=10)
    plain = compress(model, calib, CompressConfig(**base))
    refined = compress(model, calib, CompressConfig(**base, refine_epochs=10, refine_lr=1e-3))
    shapes = lambda m: sorted(tuple(t.dims) for t in m.graph.initializer)  # noqa: E731
    assert shapes(plain.model) == shapes(refined.model)
    assert refined.report.refined_blocks
    out = run(refined.model, calib)[0]
    assert out.shape == (200, 10) and np.isfinite(out).all()


@pytest.mark.parametrize("form", ["pair", "tucker2"])
def test_factor_pairs_are_refined_against_the_original_blocks(form):
    """Low-rank export adds nodes (Tucker-2: two per conv); the cut tensors are the original's, so targets
    come from its blocks."""
    model = residual_net(4)
    calib = samples_for(model, 300)
    result = compress(model, calib, CompressConfig(method="lowrank", rank_ratio=0.4, objective="size",
                                                   admm_iterations=10, refine_epochs=10, refine_lr=1e-3,
                                                   lowrank_form=form))
    if form == "tucker2":
        assert any("Conv 1x1" in f.split(" + ")[0] for f in result.report.plan["export_forms"].values())
    rows = result.report.refined_blocks
    assert rows and any(r.kept for r in rows)
    assert not any("whole original" in r.note for r in rows)
    factor_nodes = {r.name for r in result.report.layers if r.factors}
    assert factor_nodes and len(result.model.graph.node) > len(model.graph.node)
    out = run(result.model, calib)[0]
    assert out.shape == (300, 10) and np.isfinite(out).all()


def test_loss_ignores_the_channels_slicing_removes():
    from onnxadmm.finetune.refine import _loss_weight

    target = np.ones((4, 6, 3, 3), np.float32)
    weight = _loss_weight(target, (1, np.array([0, 4])))
    assert weight.shape == (1, 6, 1, 1) and weight.flatten().tolist() == [0, 1, 1, 1, 0, 1]
    assert float(_loss_weight(target, None).sum()) == 1  # one weight broadcast over everything


def test_nodes_between_rejects_tensors_that_are_no_cut():
    from onnxadmm.analysis.blocks import nodes_between

    view = normalize(residual_net()).view()
    stream = next(n.output[0] for n in view.nodes if n.op_type == "Relu")
    inner = next(n.output[0] for n in view.nodes if n.op_type == "Add")
    assert nodes_between(view, [stream], [inner]) is not None  # the first residual block up to its Add
    conv = next(n.output[0] for n in view.nodes[view.producer[stream] + 1:] if n.op_type == "Conv")
    assert nodes_between(view, [conv], [inner]) is None  # the Add also reads the stream


def test_excluded_layers_are_not_trained():
    model = deep_mlp(4)
    calib = samples_for(model, 200)
    first = find_layers(normalize(model).view()).layers[1]
    result = compress(model, calib, CompressConfig(method="sparse", sparsity=0.8, uniform=True, admm_iterations=10,
                                                   refine_epochs=10, refine_lr=1e-3, refine_block_layers=5,
                                                   exclude=(first.name,)))
    assert any(r.kept for r in result.report.refined_blocks)
    before = {t.name: t for t in model.graph.initializer}
    after = {t.name: t for t in result.model.graph.initializer}
    assert after[first.weight_name] == before[first.weight_name] and after[first.bias_name] == before[first.bias_name]
    changed = [n for n in before if onnx.numpy_helper.to_array(after[n]).tobytes() !=
               onnx.numpy_helper.to_array(before[n]).tobytes()]
    assert len(changed) >= 6  # the other four layers' weights and biases were trained


def test_block_diagonal_pairs_stay_grouped_after_refinement():
    model = residual_net(6)
    calib = samples_for(model, 200)
    result = compress(model, calib, CompressConfig(method="grouped", conv_groups=2, admm_iterations=10, objective="size",
                                                   refine_epochs=5))
    assert result.report.refined_blocks and result.report.plan["block_diagonal"]
    groups = [a.i for n in result.model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert groups.count(2) >= 2
    out = run(result.model, calib)[0]
    assert out.shape == (200, 10) and np.isfinite(out).all()


def test_encoder_blocks_take_the_attention_mask_as_a_side_input_and_compose_to_the_model():
    """The expanded attention mask stays live through every encoder block; it is a side input (computed
    from the graph inputs alone), so the hidden state alone is a cut."""
    from encoders import encoder_inputs, encoder_weights, tiny_encoder
    from onnxadmm.analysis.blocks import nodes_between

    model = tiny_encoder(encoder_weights(), shapes="constant")
    view = normalize(model).view()
    layers = {l.node_index for l in find_layers(view).layers}
    blocks = find_blocks(view, layers, min_nodes=1)
    assert len(blocks) >= 3
    assert {s for b in blocks for s in b.sides} & {"mask/Unsqueeze", "mask/Cast", "mask/Sub", "mask/Mul"}
    for block in blocks[1:]:
        assert len(block.outputs) == 1 and block.inputs[0] not in block.sides
    feed = encoder_inputs(6)
    side_names = sorted({s for b in blocks for s in b.sides} - set(view.input_names))
    sides = cut(view, nodes_between(view, list(view.input_names), side_names), side_names)
    values = {**feed, **dict(zip(side_names, run(sides, {v.name: feed[v.name] for v in sides.graph.input})))}
    for block in blocks:
        segment = cut(view, block.node_ids, block.outputs)
        assert {v.name for v in segment.graph.input} <= set(block.inputs)
        values.update(zip(block.outputs, run(segment, {v.name: values[v.name] for v in segment.graph.input})))
    np.testing.assert_allclose(values["logits"], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_block_loss_counts_real_tokens_only():
    from onnxadmm.finetune.refine import _loss_weight, _rows

    tokens = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    hidden = np.ones((2, 3, 4), np.float32)
    weight = _loss_weight(hidden, None, tokens)
    np.testing.assert_array_equal((_rows(weight, [1]) * torch.from_numpy(hidden[[1]])).sum(axis=2).numpy(),
                                  [[4, 0, 0]])
    assert _loss_weight(np.ones((2, 5), np.float32), None, tokens).shape == (1, 1)  # pooled: every entry
    channels = _loss_weight(hidden, (-1, np.array([0])), tokens)
    assert float(channels.sum()) == 3 * 3  # 3 real tokens × 3 counted channels


def test_encoder_refinement_trains_blocks_that_read_the_mask_and_keeps_supports():
    from encoders import encoder_inputs, encoder_weights, tiny_encoder

    model = tiny_encoder(encoder_weights(3), shapes="constant", opset=17)  # onnx2torch: ReduceMean ≤ 17
    calib = encoder_inputs(200, seed=4)
    config = dict(method="sparse", sparsity=0.7, uniform=True, admm_iterations=10)
    plain = compress(model, calib, CompressConfig(**config))
    refined = compress(model, calib, CompressConfig(**config, refine_epochs=15, refine_block_layers=1))
    rows = {r.block: r for r in refined.report.refined_blocks}
    assert len(rows) >= 4 and not any(r.note.startswith("not refined") for r in rows.values())
    attention = next(r for r in rows.values() if "attn/k/MatMul" in r.layers)  # reads the mask as a side input
    assert not attention.block.startswith("attention_mask") and attention.kept
    assert all(r.loss_after < r.loss_before for r in rows.values() if r.kept)
    inits = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    a, b = inits(plain.model), inits(refined.model)
    for layer in find_layers(GraphView(model)).layers:
        np.testing.assert_array_equal(a[layer.weight_name] != 0, b[layer.weight_name] != 0)
