"""Coverage of real exporter output (slow): torchvision classifiers with random weights, exported by both
torch exporters (TorchScript ``dynamo=False`` and ``dynamo=True``) at opsets 13, 17 and 18, then compressed
at zero and at a light level.

Pass: no crash; the output passes onnx.checker and runs in onnxruntime; at zero compression the outputs
equal the original's to 1e-4; every layer left dense has a reason. The light level prunes 30 % by magnitude:
the point is the graph handling (load, normalize, layers, the activation chains converted by onnx2torch for
the loss through the activation, calibration, export, validation), not the solver, whose math the other
tests cover (ADMM on ConvNeXt's 768×3072 layers costs minutes a cell). An export that torch itself cannot
produce is skipped with torch's message (not onnxadmm's to fix). Each case appends a row to
``$ONNXADMM_COVERAGE_LOG`` (JSON lines) when set, for the coverage table.

    python -m pytest -m slow tests/test_coverage.py
"""

import json
import os
import time

import numpy as np
import onnx
import pytest

from models import run

ARCHITECTURES = {  # name: (image size, constructor keyword arguments)
    "resnet18": (64, {}), "mobilenet_v2": (64, {}), "mobilenet_v3_small": (64, {}),
    "squeezenet1_0": (64, {}), "shufflenet_v2_x0_5": (64, {}), "densenet121": (64, {}),
    "regnet_x_400mf": (64, {}), "efficientnet_b0": (64, {}), "convnext_tiny": (64, {}),
    "vit_b_16": (32, {"image_size": 32}),
}
EXPORTERS = ("torchscript", "dynamo")
OPSETS = (13, 17, 18)
LIGHT = dict(sparsity=0.3, uniform=True, solver="magnitude", sample_patches=2048, loss="activation")


def export(name: str, exporter: str, opset: int, path) -> int:
    import torch
    import torchvision

    size, kwargs = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    try:
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                          opset_version=opset, dynamo=exporter == "dynamo",
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    except Exception as exc:  # noqa: BLE001 - the exporter's own failure: skip, with its words
        pytest.skip(f"torch could not export {name} ({exporter}, opset {opset}): {str(exc).splitlines()[0][:200]}")
    return size


def _log(row: dict) -> None:
    target = os.environ.get("ONNXADMM_COVERAGE_LOG")
    if target:
        with open(target, "a") as handle:
            handle.write(json.dumps(row) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_real_exporter_output_compresses_or_declines_with_reasons(tmp_path, name, exporter, opset):
    from onnxadmm import CompressConfig, ValidateConfig, check, compress

    started = time.perf_counter()
    size = export(name, exporter, opset, tmp_path / "model.onnx")
    feed = {"input": np.random.default_rng(0).standard_normal((6, 3, size, size)).astype(np.float32)}
    preflight = check(tmp_path / "model.onnx")
    row = {"model": name, "exporter": exporter, "opset": opset, "compressible": len(preflight.compressible),
           "declined": len(preflight.declined)}
    settings = {k: v for k, v in LIGHT.items() if v is not None}
    for level in (0.0, settings["sparsity"]):
        config = CompressConfig(**{**settings, "sparsity": level, "calib_samples": 4})
        result = compress(tmp_path / "model.onnx", feed, config, ValidateConfig(latency_rounds=1))
        onnx.checker.check_model(result.model, full_check=True)
        got, ref = run(result.model, feed), run(onnx.load(str(tmp_path / "model.onnx")), feed)
        assert all(np.isfinite(g).all() and g.shape == r.shape for g, r in zip(got, ref))
        assert all(d.reason for d in result.report.declined)
        if level == 0:
            assert max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref)) <= 1e-4
        else:
            row.update(layers_compressed=result.report.totals.layers_compressed,
                       layers_left_dense=len(result.report.declined),
                       reasons=sorted({d.reason.split(":")[0][:60] for d in result.report.declined}),
                       sparsity=round(result.report.totals.sparsity, 3),
                       agreement=result.report.validation.comparison.agreement)
    row["seconds"] = round(time.perf_counter() - started, 1)
    _log(row)
