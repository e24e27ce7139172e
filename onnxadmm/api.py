"""Python API: ``compress``, ``search``, ``validate`` and ``check``. Orchestration only — the same stages, in the same
order, for every method (``methods/base.py``):

    load → normalize → find layers → plan → solve → refine → export → distill → quantize → validate → report
"""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import onnx

from . import __version__
from .analysis.layers import apply_exclude, find_layers
from .calib.readers import SampleSet, evenly_spaced, open_samples, run_samples, select
from .config import CheckConfig, CompressConfig, ValidateConfig, config_hash
from .errors import UnsupportedModelError
from .onnxio.graph import GraphView, model_inputs, signature_differences
from .onnxio.load import LoadedModel, as_loaded
from .onnxio.normalize import normalize
from .onnxio.outputs import OutputSet
from .onnxio.save import compressed_before, stage_model, without_initializers
from .onnxio.weights import collected
from .report.build import compress_report, validate_report
from .report.schema import CheckReport, CompressReport, ValidateReport, WrittenFile
from .solve.layerwise import Progress, resolved_products
from .solve.reuse import StageReuse


@dataclasses.dataclass
class CompressResult:
    model: onnx.ModelProto
    report: CompressReport
    passed: bool
    weight_files: list = dataclasses.field(default_factory=list, repr=False)  # the scratch files model refers to

    def save(self, path: str | Path) -> int:
        """Write the model atomically; returns bytes written. (The CLI checks the path first.)"""
        with OutputSet() as outputs:
            written = self.stage(outputs, Path(path))
            outputs.commit()
        return written

    def stage(self, outputs: OutputSet, path: Path) -> int:
        """Stage the model in ``outputs`` (committed with the reports); records path and size in the report."""
        written = stage_model(outputs, self.model, path)
        self.report.output = WrittenFile(str(path), written)
        return written


def compress(model: Any, calibration: Any, config: CompressConfig = CompressConfig(),
             validate_config: ValidateConfig | None = None, evaluation: Any = None,
             progress: Progress | None = None, reuse: StageReuse | None = None) -> CompressResult:
    """Compress ``model`` (path, ModelProto or LoadedModel) with ``calibration`` samples. ``evaluation`` (optional,
    same forms) is the held-out data for validation; without it, calibration samples left out by ``calib_samples``
    are used, or else the calibration samples themselves (reported as not held-out). A model given by its path is
    normalized in place (its weights held once) and timed from its file. ``reuse``: what the candidates of one
    search share (``solve/reuse.py``)."""
    import torch

    from .onnxio.runtime import cpu_threads
    from .validation.platform import platform_check
    from .validation.run import validate_models

    validate_config = (validate_config or ValidateConfig()).timing_batch(config.latency_batch)
    progress = progress or (lambda *args: None)
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(config.threads))
    try:
        progress("load", 0, 1, "reading model")
        loaded = as_loaded(model)
        notes: list[str] = list(loaded.notes) + compressed_before(loaded.model, config.force)
        with collected() as files:  # the scratch files the compressed model's weights are in (``onnxio/weights.py``)
            compressed, config, parts = _pipeline(loaded, calibration, evaluation, config, validate_config, progress,
                                                  isinstance(model, (str, os.PathLike)), reuse)
        notes.extend(parts["notes"])
        solve_seconds = time.perf_counter() - started
        eval_set, reference = parts["eval_set"], parts["reference"]
        progress("validate", 0, 1, f"{eval_set.num_samples} samples")
        validation = validate_models(reference, compressed, eval_set, validate_config, config.batch_size,
                                     config.threads, parts["held_out"], sequence_length=config.latency_seq_len)
        report = compress_report(loaded, config, validate_config, parts["digest"], parts["calib"],
                                 parts["plan_report"], parts["solved"], parts["declined"], validation, notes,
                                 started, solve_seconds)
        if validate_config.platform:
            report.platform_check = platform_check(reference.model(), compressed, eval_set, validate_config, progress)
            report.passed = validation.passed and report.platform_check["passed"]
        progress("done", 1, 1, "")
        return CompressResult(compressed, report, report.passed, files)
    finally:
        torch.set_num_threads(threads_before)


def search(model: Any, calibration: Any, config: CompressConfig = CompressConfig(method="auto"),
           validate_config: ValidateConfig | None = None, evaluation: Any = None,
           progress: Progress | None = None) -> CompressResult:
    """The fastest (or smallest) model the methods reach within the accuracy budget of ``validate_config``:
    candidates compressed one by one (``budget/run.py``), the chosen one returned with its frontier."""
    from .budget.run import run_search

    loaded, progress = as_loaded(model), progress or (lambda *args: None)
    return run_search(lambda candidate, reuse: compress(loaded, calibration, candidate, validate_config, evaluation,
                                                        progress, reuse), config, validate_config or ValidateConfig(),
                      progress)


def _pipeline(loaded: LoadedModel, calibration, evaluation, config: CompressConfig,
              validate_config: ValidateConfig, progress: Progress, in_place: bool = False,
              reuse: StageReuse | None = None) -> tuple[onnx.ModelProto, CompressConfig, dict]:
    """Every stage before validation, and the original measured; of the model-sized data only the output is kept."""
    from .cost.footprint import stored_size
    from .export.apply import finalize
    from .finetune.distill import distill
    from .methods import Context, method_for, run_method
    from .quantize.stage import quantize
    from .validation.gates import check_gate_inputs
    from .validation.run import gate_checker, measure_reference

    method = method_for(config.method)
    config = resolved_products(method.configure(config))  # (the report names the products run)
    stored = stored_size(loaded.model, config.threads)  # the input's own bytes, before it is normalized
    normalized = normalize(loaded.model, in_place=in_place)
    notes = list(normalized.rewrites)
    view = normalized.view()
    everything = find_layers(view)
    found = method.declines(apply_exclude(everything, config.exclude), config)
    if not found.layers:
        reasons = "; ".join(f"{d.name}: {d.reason}" for d in found.declined[:5]) or "no Conv/Gemm/MatMul"
        raise UnsupportedModelError(f"nothing to compress in this model ({reasons})")
    progress("calibration", 0, 1, "reading samples")
    run = run_samples(calibration, evaluation, model_inputs(view), config, validate_config)
    notes.extend(run.notes)
    check_gate_inputs(validate_config, run.evaluation.labels is not None)
    progress("calibration", 0, 1, f"running the original on {run.evaluation.num_samples} evaluation samples")
    measure = partial(measure_reference, normalized.model, run.evaluation, config.batch_size, config.threads,
                      stored, loaded.path if in_place else loaded.model, loaded.sha256)
    reference = reuse.reference(config, measure, run.evaluation, validate_config) if reuse else measure()
    loaded.model = without_initializers(loaded.model) if in_place else loaded.model  # (the report reads its opset)
    ctx = Context(view, normalized.model, everything.layers, found.layers, run.solving, config, progress, reuse)
    gate = gate_checker(reference, run.evaluation, validate_config, config) if method.relax(config) else None
    compressed, solved, plan_report = run_method(method, ctx, gate)
    notes.extend(ctx.notes)
    if config.quantize == "none":
        compressed, solved.result.distilled = distill(normalized.model, compressed, run.calib, config, progress)
    else:  # distillation, if asked, runs inside the precision stage with the grid fixed
        quantized = quantize(compressed, run.calib, config, progress, teacher=normalized.model, in_place=True)
        quantized.add_stream_to(solved.result)
        compressed, plan_report["quantization"], solved.result.distilled = quantized.model, quantized.report(), \
            quantized.distilled
        notes.extend(method.notes(config) + quantized.notes)
    progress("export", 0, 1, "writing weights")
    digest = config_hash(config)
    stamp = {"version": __version__, "config_sha256": digest, "seed": str(config.seed), "source_sha256": loaded.sha256}
    notes.extend(finalize(compressed, normalized.model, {**stamp, "method": config.method}))
    return compressed, config, {
        "notes": notes, "calib": run.calib, "eval_set": run.evaluation, "held_out": run.held_out, "digest": digest,
        "reference": reference, "plan_report": plan_report,
        "solved": dataclasses.replace(solved.result, initializers={}),
        "declined": solved.result.declined + solved.declined + found.declined}


def validate(original: Any, compressed: Any, data: Any, config: ValidateConfig = ValidateConfig(),
             batch_size: int = 32, threads: int = 0) -> tuple[ValidateReport, bool]:
    """Compare two models on ``data``; returns (report, passed)."""
    from .validation.gates import check_gate_inputs
    from .validation.platform import platform_check
    from .validation.run import validate_models

    started, a, b = time.perf_counter(), as_loaded(original), as_loaded(compressed)
    view_a = GraphView(a.model)
    if differences := signature_differences(view_a, GraphView(b.model)):
        raise UnsupportedModelError("the two models cannot be compared on the same data: " + "; ".join(differences))
    samples = open_samples(data, model_inputs(view_a), config.labels, what="evaluation")
    if config.eval_samples:
        samples, _ = select(samples, min(config.eval_samples, samples.num_samples), "evaluation")
    check_gate_inputs(config, samples.labels is not None)
    validation = validate_models(a.model, b.model, samples, config, batch_size, threads, True)
    report = validate_report(a, b, config, validation, started)
    if config.platform:
        report.platform_check = platform_check(a.model, b.model, samples, config)
        report.passed = validation.passed and report.platform_check["passed"]
    return report, report.passed


def check(model: Any, config: CheckConfig | CompressConfig = CheckConfig()) -> CheckReport:
    """Preflight (``validation/preflight.py``): what ``compress`` would compress and decline, and why."""
    from .validation.preflight import check as preflight

    return preflight(model, config)


__all__ = ["compress", "search", "validate", "check", "CompressResult", "CompressConfig", "ValidateConfig",
           "SampleSet", "evenly_spaced"]
