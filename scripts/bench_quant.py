#!/usr/bin/env python3
"""int8 on the test-bed: onnxruntime's own quantizer against onnxadmm, side by side in one run.

    python scripts/bench_quant.py [--models resnet56_cifar10,...] [--rows ort-minmax,admm,...]

Rows per model, all on the standard calibration split and evaluated on the standard evaluation split:
  ort-minmax / ort-entropy / ort-percentile   onnxruntime quantize_static (QDQ, per-channel int8 weights,
                                              uint8 activations) with that calibration method (Entropy and
                                              Percentile on EfficientNet-Lite0 run out of this machine's 24 GB)
  round      onnxadmm with round-to-nearest weights on its own scales and ranges (the ablation: --solver magnitude)
  admm       onnxadmm --quantize int8 (weights solved onto the grid through the activation)
  sparse90   LeNet-5 only: --method sparse --sparsity 0.9 --quantize int8 (the size objective)
Columns: top-1, drop, agreement with the original, latency ratio (A/B at batch 1 and 8), fusion coverage,
raw and zip size ratios, quantization time; then exact McNemar tests of admm against every onnxruntime row.
Results: docs/bench/quant__<model>.json, rendered into docs/QUANT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_testbed import COMMIT, RESULTS, ROOT, TESTBED, correct_bits, mcnemar, standard_split  # noqa: E402

MODELS = ["resnet20_cifar10", "resnet56_cifar10", "efficientnet_lite0_imagenet", "lenet5_mnist"]
ORT_METHODS = {"ort-minmax": "MinMax", "ort-entropy": "Entropy", "ort-percentile": "Percentile"}
CALIB_SAMPLES = 500  # what onnxruntime's quantizer is given (docs/INT8.md: MinMax on 500 calibration images)


class Reader:
    def __init__(self, x: np.ndarray, batch: int = 20):  # equal batches: the histogram calibrators need them
        self.batches = [{"input": x[i:i + batch]} for i in range(0, len(x), batch)]

    def get_next(self):
        return self.batches.pop(0) if self.batches else None


def ort_quantize(model_path: Path, calib: np.ndarray, method: str) -> tuple[onnx.ModelProto, float]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "q.onnx")
        quantize_static(str(model_path), out, Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
        return onnx.load(out), time.perf_counter() - started


def onnxadmm_quantize(model_path: Path, calib: np.ndarray, **settings) -> tuple[onnx.ModelProto, float, dict]:
    from onnxadmm import CompressConfig, ValidateConfig, compress

    started = time.perf_counter()
    config = CompressConfig(**{"method": "none", "quantize": "int8", **settings})
    result = compress(str(model_path), {"input": calib}, config, ValidateConfig(latency_rounds=1))
    return result.model, time.perf_counter() - started, result.report.as_dict()


def measure(original: onnx.ModelProto, quantized: onnx.ModelProto, evaluation: dict) -> dict:
    from onnxadmm.calib.readers import SampleSet
    from onnxadmm.config import ValidateConfig
    from onnxadmm.export.coverage import WEIGHT_OPS, fusion_coverage
    from onnxadmm.validation.run import validate_models

    samples = SampleSet({"input": evaluation["input"]}, "evaluation", labels=evaluation["labels"])
    v = validate_models(original, quantized, samples, ValidateConfig(latency_batch_sizes=(1, 8), latency_rounds=30),
                        batch_size=250, threads=2)
    layers = {n.name: n.op_type for n in original.graph.node if n.op_type in WEIGHT_OPS}
    coverage = fusion_coverage(quantized, layers)
    lat = {f"latency_b{l.batch_size}": l.ratio_median for l in v.latency}
    return {"top1": v.comparison.accuracy_compressed, "top1_original": v.comparison.accuracy_original,
            "drop_pt": v.comparison.accuracy_drop_pt, "agreement": v.comparison.agreement, **lat,
            "fusion_integer": len(coverage.integer), "fusion_total": len(layers),
            "size_ratio": v.compressed.size_bytes / v.original.size_bytes,
            "zip_ratio": v.compressed.zipped_bytes / v.original.zipped_bytes,
            "correct_bits": correct_bits(quantized, evaluation), "evaluated": len(evaluation["labels"])}


def run_model(name: str, rows: list[str], save=lambda data: None) -> dict:
    calib, evaluation, split = standard_split(name)
    path = TESTBED / "models" / f"{name}.onnx"
    original = onnx.load(str(path))
    x = calib["input"][np.floor(np.arange(CALIB_SAMPLES) * len(calib["input"]) / CALIB_SAMPLES).astype(int)] \
        if len(calib["input"]) > CALIB_SAMPLES else calib["input"]
    results = []
    for row in rows:
        print(f"[{name}] {row} ...", flush=True)
        report = None
        if row in ORT_METHODS:
            model, seconds = ort_quantize(path, x, ORT_METHODS[row])
        elif row == "round":
            model, seconds, report = onnxadmm_quantize(path, x, solver="magnitude")
        elif row == "admm":
            model, seconds, report = onnxadmm_quantize(path, x)
        elif row == "sparse90":
            if name != "lenet5_mnist":
                continue
            model, seconds, report = onnxadmm_quantize(path, x, method="sparse", sparsity=0.9)
        else:
            raise SystemExit(f"unknown row {row}")
        measured = {"row": row, "seconds": seconds, **measure(original, model, evaluation)}
        if report is not None:
            measured["estimators"] = report["plan"]["quantization"]["estimators_chosen"]
        results.append(measured)
        print(json.dumps({k: v for k, v in measured.items() if k != "correct_bits"}), flush=True)
        save({"model": name, "split": split, "commit": COMMIT, "calibration_samples": len(x), "rows": results})
    return {"model": name, "split": split, "commit": COMMIT, "calibration_samples": len(x), "rows": results}


def render() -> str:
    lines = ["# int8: onnxadmm against onnxruntime's own quantizer (test-bed, standard splits)", "",
             "Generated by `python scripts/bench_quant.py`. Every row of a model was measured in one process on the",
             "same calibration samples (500, evenly spaced in the standard calibration split; LeNet-5: 500 of its",
             "10,000) and the same evaluation split. Latency: A/B ratio quantized / original, 2 threads, median of 30",
             "rounds. Fusion: Conv/Gemm/MatMul that onnxruntime runs as integer kernels after optimization.",
             "onnxruntime's Entropy and Percentile calibrators were killed by the out-of-memory killer on",
             "EfficientNet-Lite0 (they keep the activations of all 500 images; this machine has 24 GB), so that",
             "model has no such rows. With 500 evaluation images one point of top-1 is 5 images.", ""]
    for path in sorted(RESULTS.glob("quant__*.json")):
        data = json.loads(path.read_text())
        lines += [f"## {data['model']} ({data['split']}; commit {data['commit']})", "",
                  "| row | top-1 % | drop pt | agreement | latency b1 | latency b8 | fusion | size | zip | time s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["rows"]:
            lines.append(f"| {r['row']} | {100 * r['top1']:.2f} | {r['drop_pt']:.2f} | {r['agreement']:.4f} | "
                         f"{r.get('latency_b1', float('nan')):.3f} | {r.get('latency_b8', float('nan')):.3f} | "
                         f"{r['fusion_integer']}/{r['fusion_total']} | {r['size_ratio']:.3f} | {r['zip_ratio']:.3f} | "
                         f"{r['seconds']:.1f} |")
        admm = next((r for r in data["rows"] if r["row"] == "admm"), None)
        pairs = [r for r in data["rows"] if r["row"] in ORT_METHODS or r["row"] == "round"]
        if admm and pairs:
            lines += ["", "| admm vs | top-1 difference pt | only admm right | only other right | McNemar p |",
                      "|---|---|---|---|---|"]
            for other in pairs:
                a, b, p = mcnemar(admm["correct_bits"], other["correct_bits"], admm["evaluated"])
                lines.append(f"| {other['row']} | {100 * (admm['top1'] - other['top1']):+.2f} | {a} | {b} | {p:.3g} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", default="ort-minmax,ort-entropy,ort-percentile,round,admm,sparse90")
    args = parser.parse_args()
    if not (TESTBED / "manifest.json").is_file():
        print(f"test-bed not found at {TESTBED}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):  # each row is saved as soon as it is measured
        run_model(name, args.rows.split(","),
                  lambda data: (RESULTS / f"quant__{data['model']}.json").write_text(json.dumps(data, indent=1)))
    (ROOT / "docs" / "QUANT.md").write_text(render())
    print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
