"""End to end through the Python API on tiny models built in code."""

import numpy as np
import onnx
import pytest

from models import GraphBuilder, mlp, run, samples_for, tiny_cnn, token_mlp
from onnxadmm import CompressConfig, ValidateConfig, compress
from onnxadmm.analysis.layers import find_layers
from onnxadmm.errors import UnsupportedModelError
from onnxadmm.export.apply import apply_initializers
from onnxadmm.onnxio.normalize import normalize

FAST = ValidateConfig(latency_rounds=3)


def cfg(**kw):
    base = dict(sensitivity_samples=16, admm_iterations=20, sample_patches=4096, grad_patches=1024)
    base.update(kw)
    return CompressConfig(**base)


def io_signature(model):
    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
    inits = {t.name for t in model.graph.initializer}
    return sig([v for v in model.graph.input if v.name not in inits]), sig(model.graph.output)


def layer_weights(model):
    view = normalize(model).view()
    return {l.name: (l, view.constant(l.weight_name)) for l in find_layers(view).layers}


@pytest.fixture(scope="module")
def cnn_result():
    model = tiny_cnn()
    result = compress(model, samples_for(model, 48), cfg(sparsity=0.6), FAST)
    return model, result


def test_output_keeps_the_contract(cnn_result):
    model, result = cnn_result
    out = result.model
    assert io_signature(out) == io_signature(model)
    assert out.opset_import == model.opset_import and out.ir_version == model.ir_version
    onnx.checker.check_model(out, full_check=True)
    feed = samples_for(model, 3, seed=9)
    assert run(out, feed)[0].shape == run(model, feed)[0].shape
    props = {p.key: p.value for p in out.metadata_props}
    assert props["onnxadmm.seed"] == "0" and len(props["onnxadmm.source_sha256"]) == 64


def test_typed_report_serializes_to_the_documented_json_and_renders(cnn_result, tmp_path):
    import json

    from onnxadmm.report.markdown import render
    from onnxadmm.report.schema import SCHEMA_VERSION

    _, result = cnn_result
    report = result.report
    assert report.output is None  # set when the model is saved
    result.save(tmp_path / "out.onnx")
    data = json.loads(report.to_json())
    assert list(data) == ["schema_version", "kind", "tool", "input", "output", "config", "validate_config",
                          "config_sha256", "seed", "calibration", "plan", "layers", "refined_blocks", "distillation",
                          "declined", "totals", "validation", "passed", "timing", "notes"]
    assert data["schema_version"] == SCHEMA_VERSION and data["kind"] == "compress"
    assert data["output"] == {"path": str(tmp_path / "out.onnx"), "size_bytes": (tmp_path / "out.onnx").stat().st_size}
    assert [row["name"] for row in data["layers"]] == [row.name for row in report.layers]
    assert data["layers"][0]["nonzero"] == report.layers[0].nonzero and "rank" not in data["layers"][0]
    assert data["totals"]["sparsity"] == report.totals.sparsity and data["seed"] == report.config.seed
    assert data["validation"]["agreement"] == report.validation.comparison.agreement
    assert data["passed"] is report.passed
    markdown = render(report)
    assert markdown.startswith("# onnxadmm compress report") and f"`{report.layers[0].name}`" in markdown


def test_sparsity_target_is_met_and_reported(cnn_result):
    model, result = cnn_result
    totals = result.report.totals
    assert totals.sparsity == pytest.approx(0.6, abs=0.01)
    weights = layer_weights(result.model)
    kept = sum(np.count_nonzero(w) for _, w in weights.values())
    total = sum(w.size for _, w in weights.values())
    assert 1 - kept / total == pytest.approx(totals.sparsity, abs=1e-9)
    for row in result.report.layers:
        assert row.error_final <= row.error_projected + 1e-9
        assert len(row.admm_history["objective"]) >= 1
    assert result.report.validation.comparison.agreement is not None
    assert result.report.calibration.representative is True


def test_allocation_is_not_uniform(cnn_result):
    _, result = cnn_result
    levels = {row.target_level for row in result.report.layers}
    assert len(levels) > 1
    assert result.report.plan["strategy"] == "sensitivity"


def test_uniform_switch():
    model = tiny_cnn()
    result = compress(model, samples_for(model, 32), cfg(sparsity=0.5, uniform=True), FAST)
    assert {row.target_level for row in result.report.layers} == {0.5}


def test_nm_pattern_holds_in_the_exported_weights():
    model = tiny_cnn()
    result = compress(model, samples_for(model, 32), cfg(method="nm", nm="2:4"), FAST)
    compressed = 0
    for name, (layer, w) in layer_weights(result.model).items():
        row = next((r for r in result.report.layers if r.name == name), None)
        if row is None:
            continue
        canonical = layer.canonical(w)
        taps = layer.conv.kernel[0] * layer.conv.kernel[1] if layer.conv else 1
        g, r, d = canonical.shape
        groups = (canonical.reshape(g, r, d // taps // 4, 4, taps) != 0).sum(axis=3)
        assert groups.max() <= 2
        compressed += 1
    assert compressed >= 3
    declined = {d.name: d.reason for d in result.report.declined}
    assert any("not a multiple of M=4" in r for r in declined.values())  # the 3-channel stem


@pytest.mark.parametrize("method", ["l1", "l0"])
def test_penalty_methods_end_to_end(method):
    model = mlp()
    result = compress(model, samples_for(model, 128), cfg(method=method, sparsity=0.7, uniform=True), FAST)
    for row in result.report.layers:
        assert abs(row.sparsity - 0.7) <= 0.011
        assert row.penalty_mu > 0


@pytest.mark.parametrize("builder", [lambda: mlp(trans_b=False, alpha=0.5, beta=2.0), token_mlp])
def test_gemm_layouts_and_3d_matmul(builder):
    model = builder()
    result = compress(model, samples_for(model, 64), cfg(sparsity=0.5), FAST)
    expected_layers = 3 if any(n.op_type == "Gemm" for n in model.graph.node) else 2
    assert len(result.report.layers) == expected_layers
    assert result.report.totals.sparsity == pytest.approx(0.5, abs=0.01)
    assert result.report.validation.comparison.outputs[0].cosine > 0.9


def test_exact_round_trip_gives_identical_outputs():
    model = tiny_cnn()
    norm = normalize(model)
    view = norm.view()
    values = {}
    for layer in find_layers(view).layers:
        values[layer.weight_name] = layer.stored(layer.canonical(view.constant(layer.weight_name)))
    again = apply_initializers(norm.model, values)
    feed = samples_for(model, 5)
    for a, b in zip(run(model, feed), run(again, feed)):
        np.testing.assert_array_equal(a, b)
    handed = dict(values)
    consumed = apply_initializers(norm.model, handed, consume=True)
    assert consumed.SerializeToString() == again.SerializeToString()
    assert handed == {}  # each solved array released once it is in the model


def test_zero_sparsity_leaves_weights_untouched():
    model = tiny_cnn()
    result = compress(model, samples_for(model, 16), cfg(sparsity=0.0), FAST)
    feed = samples_for(model, 4, seed=5)
    np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_unconvertible_activation_leaves_that_layer_dense():
    b = GraphBuilder()
    y = b.conv("input", 3, 8, act="Mish")  # onnx2torch has no Mish converter
    y = b.conv(y, 8, 8, act="Relu")
    model = b.model([("input", ["N", 3, 8, 8])], [y], opset=18)
    result = compress(model, samples_for(model, 16), cfg(sparsity=0.5, uniform=True), FAST)
    declined = result.report.declined
    assert len(declined) == 1 and "Mish" in declined[0].reason and "onnx2torch" in declined[0].reason
    assert [r.name for r in result.report.layers] == [find_layers(normalize(model).view()).layers[1].name]
    first = model.graph.initializer[0]
    out_first = next(t for t in result.model.graph.initializer if t.name == first.name)
    assert out_first == first  # left bit-identical


def test_already_compressed_is_refused_unless_forced():
    model = tiny_cnn()
    feed = samples_for(model, 16)
    once = compress(model, feed, cfg(sparsity=0.3), FAST).model
    with pytest.raises(UnsupportedModelError, match="already compressed by onnxadmm"):
        compress(once, feed, cfg(sparsity=0.3), FAST)
    again = compress(once, feed, cfg(sparsity=0.3, force=True), FAST)
    assert any("--force" in n for n in again.report.notes)


def test_random_calibration_is_flagged():
    model = tiny_cnn()
    result = compress(model, "random:16", cfg(sparsity=0.3), FAST)
    assert result.report.calibration.representative is False
    assert result.report.validation.held_out is False


def test_two_runs_are_byte_identical():
    model = tiny_cnn()
    feed = samples_for(model, 24)
    a = compress(model, feed, cfg(sparsity=0.5), FAST).model.SerializeToString()
    b = compress(model, feed, cfg(sparsity=0.5), FAST).model.SerializeToString()
    assert a == b


def test_gates_decide_passed():
    model = tiny_cnn()
    feed = samples_for(model, 32)
    strict = ValidateConfig(latency_rounds=3, min_agreement=1.0, min_speedup=5.0)
    result = compress(model, feed, cfg(sparsity=0.9), strict)
    assert result.passed is False
    gates = {g.name: g.passed for g in result.report.validation.gates}
    assert gates["min_speedup"] is False


def test_public_api_names_are_functions_even_after_the_pipeline_modules_load():
    """`from onnxadmm import validate` must give the function, not a subpackage of the same name (a
    subpackage import binds its name on the package and would shadow the lazy API attribute)."""
    import importlib

    import onnxadmm
    for module in ("onnxadmm.validation.run", "onnxadmm.api", "onnxadmm.calib.readers", "onnxadmm.budget.run"):
        importlib.import_module(module)
    from onnxadmm import check, compress, search, validate

    assert all(callable(f) and not isinstance(f, type(onnxadmm)) for f in (check, compress, search, validate))


def test_residual_with_a_shortcut_conv_is_scheduled():
    """torchvision's ResNet downsample: the block's last conv and the shortcut conv meet at one Add, so each
    is the other's side input. Both are solved (the first in graph order sees the other's original weights)."""
    from models import GraphBuilder

    b = GraphBuilder(8)
    x = b.conv("input", 3, 8)
    main = b.conv(b.conv(x, 8, 16, stride=2), 16, 16, act=None)
    shortcut = b.conv(x, 8, 16, k=1, stride=2, act=None)
    y = b.node("Relu", [b.node("Add", [main, shortcut])])
    model = b.model([("input", ["N", 3, 8, 8])], [y])
    result = compress(model, samples_for(model, 16), CompressConfig(sparsity=0.5, uniform=True, admm_iterations=5))
    assert result.report.totals.layers_compressed == 4
    assert not result.report.declined


def test_a_model_read_from_its_file_is_normalized_in_place_and_reported_as_the_file(tmp_path):
    """compress(path) normalizes the model it reads in place (its weights held once) and times the original from
    its file: the figures for the original are those of the file, and the output the same as compress(proto)."""
    model = tiny_cnn()
    model.graph.node[1].name = ""  # normalization names it: the normalized graph is not the file's bytes
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    samples = samples_for(model, 48)
    from_file = compress(str(path), samples, cfg(sparsity=0.6), FAST)
    from_proto = compress(model, samples, cfg(sparsity=0.6), FAST)
    assert path.read_bytes() == before
    original = from_file.report.validation.original
    assert original.size_bytes == len(before) == from_proto.report.validation.original.size_bytes
    assert original == from_proto.report.validation.original
    assert from_file.model.SerializeToString() == from_proto.model.SerializeToString()
    assert from_file.report.validation.comparison.agreement == from_proto.report.validation.comparison.agreement
    assert all(latency.interleaved for latency in from_file.report.validation.latency)


def test_the_original_read_again_must_be_the_file_that_was_measured(tmp_path):
    from onnxadmm.errors import BadInputError
    from onnxadmm.onnxio.load import load_model
    from onnxadmm.validation.run import measure_reference
    from onnxadmm.calib.readers import SampleSet

    model = tiny_cnn()
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path)
    reference = measure_reference(loaded.model, SampleSet(samples_for(model, 4), "test"), source=path,
                                  sha256=loaded.sha256)
    assert reference.model().SerializeToString() == loaded.model.SerializeToString()
    onnx.save(tiny_cnn(seed=1), str(path))
    with pytest.raises(BadInputError, match="changed on disk"):
        reference.model()


def test_models_too_large_for_two_sessions_are_timed_one_after_the_other(monkeypatch):
    from onnxadmm.calib.readers import SampleSet
    from onnxadmm.validation import run as validation

    model = tiny_cnn()
    samples = SampleSet(samples_for(model, 8), "test")
    monkeypatch.setattr(validation, "INTERLEAVE_BELOW_BYTES", 0)
    result = validation.validate_models(model, model, samples, FAST, batch_size=8)
    assert [latency.interleaved for latency in result.latency] == [False]
    assert 0.5 < result.latency[0].ratio_median < 2.0  # the same model against itself
    assert any("one model after the other" in line for line in result.gains)


def test_peak_memory_is_this_programs_not_its_parents():
    """A run started by a process holding a lot of memory (a CI runner, a test) reports its own peak: Linux's
    ``ru_maxrss`` would keep the parent's from before the exec."""
    import subprocess
    import sys

    child = "from onnxadmm.report.build import peak_rss_mb; print(peak_rss_mb())"
    parent = ("import subprocess, sys, numpy as np; held = np.ones(600 << 17); "  # 600 MB, touched
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True).stdout)")
    reported = float(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                                    check=True).stdout)
    assert reported < 400


def test_admm_products_are_resolved_for_this_machine_and_named_in_the_report():
    from onnxadmm.algorithms.admm import bf16_native
    from onnxadmm.errors import ConfigError
    from onnxadmm.solve.layerwise import admm_settings, resolved_products

    with pytest.raises(ConfigError, match="admm_products"):
        CompressConfig(admm_products="fp16")
    expected = "bf16" if bf16_native() else "fp32"
    assert resolved_products(cfg(sparsity=0.5)).admm_products == expected
    assert admm_settings(cfg(sparsity=0.5)).bf16_products == (expected == "bf16")
    assert admm_settings(cfg(sparsity=0.5, admm_products="fp32")).bf16_products is False
    assert admm_settings(cfg(sparsity=0.5, admm_products="bf16")).bf16_products is True
    model = tiny_cnn()
    result = compress(model, samples_for(model, 24), cfg(sparsity=0.5), FAST)
    assert result.report.config.admm_products == expected
    from onnxadmm.report.markdown import render

    assert f"large products in {expected}" in render(result.report)


@pytest.mark.parametrize("amx, avx512_bf16, native", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_counts_as_native_with_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, native):
    import torch

    from onnxadmm.algorithms.admm import bf16_native

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert bf16_native() is native
