"""Python API: ``compress`` (load → layers → plan → layer-wise ADMM → export → validate → report),
``validate`` (two models on held-out data, with gates) and ``check`` (preflight). Orchestration only:
every step lives in its own module. Saving is separate (``CompressResult.save``).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from . import __version__
from .analysis.layers import Declined, LayerSet, apply_exclude, find_layers
from .calib.readers import SampleSet, evenly_spaced, open_samples, select
from .config import CHANNEL_METHODS, LOWRANK_METHODS, CheckConfig, CompressConfig, ValidateConfig, config_hash
from .errors import UnsupportedModelError
from .onnxio.graph import GraphView, TensorType, has_qdq
from .onnxio.load import LoadedModel, default_opset, load_model, model_from_proto
from .onnxio.normalize import normalize
from .onnxio.outputs import OutputSet
from .onnxio.save import METADATA_PREFIX, read_metadata, save_model_atomic, stage_model
from .report.schema import SCHEMA_VERSION, layer_row, machine

log = logging.getLogger("onnxadmm")
Progress = Callable[[str, int, int, str], None]


@dataclass
class CompressResult:
    model: onnx.ModelProto
    report: dict
    passed: bool

    def save(self, path: str | Path) -> int:
        """Write the model atomically; returns bytes written. (The CLI checks the path first.)"""
        with OutputSet() as outputs:
            written = self.stage(outputs, Path(path))
            outputs.commit()
        return written

    def stage(self, outputs: OutputSet, path: Path) -> int:
        """Stage the model in ``outputs`` (committed with the reports); records path and size in the report."""
        written = stage_model(outputs, self.model, path)
        self.report.setdefault("output", {})["path"] = str(path)
        self.report["output"]["size_bytes"] = written
        return written


def _load(model: Any) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else (
        model_from_proto(model) if isinstance(model, onnx.ModelProto) else load_model(model))


def model_inputs(view: GraphView) -> dict[str, TensorType]:
    inputs = {}
    for name in view.input_names:
        tensor_type = view.types.get(name)
        if tensor_type is None:
            raise UnsupportedModelError(f"model input {name!r} has no tensor type; onnxadmm needs typed inputs")
        inputs[name] = tensor_type
    return inputs


def _kept_dense(row: dict) -> bool:
    """A solved layer that lost no weight and was not factorized (its values may be refit)."""
    return row["structure"] == "dense" or ("rank" not in row and row["nonzero"] >= row["params"])


def _input_info(loaded: LoadedModel) -> dict:
    model = loaded.model
    return {"path": str(loaded.path) if loaded.path else None, "sha256": loaded.sha256,
            "size_bytes": loaded.size_bytes, "opset": default_opset(model), "ir_version": model.ir_version,
            "producer": f"{model.producer_name} {model.producer_version}".strip()}


def _declines_for_method(found: LayerSet, config: CompressConfig) -> LayerSet:
    if config.method != "nm":
        return found
    n, m = config.nm_pattern
    kept, declined = [], list(found.declined)
    for layer in found.layers:
        cin = layer.in_features // layer.taps
        if cin % m:
            declined.append(Declined(layer.name, layer.op_type,
                                     f"{cin} input channels per group is not a multiple of M={m} for {n}:{m}"))
        else:
            kept.append(layer)
    return LayerSet(kept, declined)


def _evaluation_set(evaluation, inputs, calib_all: SampleSet, rest: np.ndarray, used: SampleSet,
                    validate_config: ValidateConfig, seed: int) -> tuple[SampleSet, bool]:
    if evaluation is not None:
        samples = open_samples(evaluation, inputs, validate_config.labels, seed, what="evaluation")
        held_out = True
    elif len(rest):
        samples, held_out = calib_all.subset(rest), True
    else:
        samples, held_out = used, False
    if validate_config.eval_samples:
        samples, _ = select(samples, min(validate_config.eval_samples, samples.num_samples), "evaluation")
    return samples, held_out


def compress(model: Any, calibration: Any, config: CompressConfig = CompressConfig(),
             validate_config: ValidateConfig | None = None, evaluation: Any = None,
             progress: Progress | None = None) -> CompressResult:
    """Compress ``model`` (path, ModelProto or LoadedModel) with ``calibration`` samples.

    ``evaluation`` (optional, same forms as calibration) is the held-out data for validation; without
    it, calibration samples left out by ``calib_samples`` are used, or else the calibration samples
    themselves (reported as not held-out).
    """
    import torch

    from .runtime import cpu_threads
    from .validation.run import validate_models

    validate_config = validate_config or ValidateConfig()
    if config.latency_batch and config.latency_batch not in validate_config.latency_batch_sizes:
        # the batch the target was met at is also the one the validation times
        validate_config = dataclasses.replace(
            validate_config, latency_batch_sizes=(*validate_config.latency_batch_sizes, config.latency_batch))
    progress = progress or (lambda *args: None)
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(config.threads))
    try:
        progress("load", 0, 1, "reading model")
        loaded = _load(model)
        previous = read_metadata(loaded.model)
        notes: list[str] = list(loaded.notes)
        if f"{METADATA_PREFIX}version" in previous:
            message = (f"this model was already compressed by onnxadmm {previous[f'{METADATA_PREFIX}version']} "
                       f"(config sha256 {previous.get(f'{METADATA_PREFIX}config_sha256', '?')[:12]})")
            if not config.force:
                raise UnsupportedModelError(message + "; compressing twice compounds the error. Pass --force "
                                                      "to do it anyway")
            notes.append(message + "; compressed again because of --force")
        solution = _solve_and_export(loaded, calibration, evaluation, config, validate_config, progress)
        notes.extend(solution.notes)
        config, calib, eval_set, solved = solution.config, solution.calib, solution.eval_set, solution.solved
        solve_seconds = time.perf_counter() - started
        progress("validate", 0, 1, f"{eval_set.num_samples} samples")
        validation = validate_models(loaded.model, solution.model, eval_set, validate_config, config.batch_size,
                                     config.threads, solution.held_out)
        report = _compress_report(loaded, config, validate_config, solution.digest, calib, solution.plan_report,
                                  solved, solution.declined, validation, notes, started, solve_seconds)
        if validate_config.platform:
            report["platform_check"] = platform_check(loaded.model, solution.model, eval_set, validate_config,
                                                      progress)
            report["passed"] = validation.passed and report["platform_check"]["passed"]
        progress("done", 1, 1, "")
        return CompressResult(solution.model, report, report["passed"])
    finally:
        torch.set_num_threads(threads_before)


@dataclass
class _Solution:
    """What the solve hands to validation: the compressed model and what the report needs. The normalized
    graph, its view and the solved weight arrays are not kept (a model over 2 GB must not be held thrice)."""

    model: onnx.ModelProto
    solved: Any  # SequentialResult, with its weight arrays dropped (they live in ``model`` now)
    config: CompressConfig
    calib: SampleSet
    eval_set: SampleSet
    held_out: bool
    plan_report: dict
    declined: list
    digest: str
    notes: list[str]


def _solve_and_export(loaded: LoadedModel, calibration, evaluation, config: CompressConfig,
                      validate_config: ValidateConfig, progress: Progress) -> _Solution:
    """Normalize, find the layers, plan, solve and write the weights back (the whole pipeline before
    validation)."""
    from .distill import distill, held_out_rows
    from .export.apply import apply_initializers, finalize
    from .factored import compress_factored
    from .plan.planner import plan_sparsity
    from .quantize.stage import quantize_int8
    from .refine import refine
    from .sequential import SequentialResult, compress_layers, structure_for
    from .structured import compress_channels, compress_grouped, declined_groups
    from .validation.gates import check_gate_inputs

    notes: list[str] = []
    normalized = normalize(loaded.model)
    notes.extend(normalized.rewrites)
    view = normalized.view()
    everything = find_layers(view)
    found = _declines_for_method(apply_exclude(everything, config.exclude), config)
    if not found.layers:
        reasons = "; ".join(f"{d.name}: {d.reason}" for d in found.declined[:5]) or "no Conv/Gemm/MatMul"
        raise UnsupportedModelError(f"nothing to compress in this model ({reasons})")
    inputs = model_inputs(view)
    progress("calibration", 0, 1, "reading samples")
    calib_all = open_samples(calibration, inputs, validate_config.labels, config.seed, labels_required=False)
    calib, rest = select(calib_all, config.calib_samples)
    eval_set, held_out = _evaluation_set(evaluation, inputs, calib_all, rest, calib, validate_config,
                                         config.seed)
    check_gate_inputs(validate_config, eval_set.labels is not None)
    channels, factored, give_back = None, None, []
    solving = calib  # what the solve and block refinement see; distillation checks on samples they did not
    if config.distill_epochs:
        solving = calib.subset(np.flatnonzero(~held_out_rows(calib.num_samples, calib.fixed_batch)))
        notes.append(f"{calib.num_samples - solving.num_samples} of {calib.num_samples} calibration samples held "
                     "out of the layer-wise solve and block refinement, to check the distillation on")
    if config.method == "none":
        solved, compressed = SequentialResult({}, [], [], 0, 0), normalized.model
    elif config.method in LOWRANK_METHODS:
        factored = compress_factored(view, normalized.model, found.layers, solving, config, progress)
        solved = factored.solved
        compressed, solved.refined = refine(view, factored.model, solving, config, progress)
    elif config.method == "grouped" or config.method in CHANNEL_METHODS:
        method = compress_grouped if config.method == "grouped" else compress_channels
        channels = method(view, normalized.model, everything.layers, found.layers, solving, config, progress)
        if config.max_macs is not None and (validate_config.max_accuracy_drop is not None or
                                            validate_config.min_agreement is not None):
            channels, give_back = _give_back(channels, view, normalized.model, everything, found, solving,
                                             eval_set, loaded.model, config, validate_config, progress)
        solved, compressed = channels.solved, channels.model
        found.declined.extend(declined_groups(channels))
    else:
        progress("plan", 0, 1, "measuring sensitivity")
        if config.target_params is not None:  # sparse at a parameter budget: sparsity = 1 − F
            config = dataclasses.replace(config, sparsity=1.0 - config.target_params)
        plan = plan_sparsity(view, found.layers, solving, config)
        structures = {l.name: structure_for(l, config, plan.levels[l.name]) for l in found.layers}
        solved = compress_layers(view, found.layers, solving, structures, plan.levels, config, progress)
        compressed, solved.refined = refine(view, apply_initializers(normalized.model, solved.initializers),
                                            solving, config, progress)
    compressed, solved.distilled = distill(normalized.model, compressed, calib, config, progress)
    quantized = None
    if config.quantize == "int8":
        quantized = quantize_int8(compressed, calib, config, progress)
        compressed = quantized.model
        if config.target_latency is None and config.objective == "latency" and \
                config.method in LOWRANK_METHODS + ("grouped",):
            notes.append("--objective latency chose each layer's form by fp32 timings of that layer; the int8 "
                         "model's own latency is the measured figure in the validation")
    progress("export", 0, 1, "writing weights")
    digest = config_hash(config)
    notes.extend(finalize(compressed, normalized.model, {
        "version": __version__, "config_sha256": digest, "seed": str(config.seed),
        "source_sha256": loaded.sha256, "method": config.method}))
    declined = solved.declined + found.declined
    if channels is not None:
        plan_report = {**channels.report(), "give_back": give_back}
    elif factored is not None:
        plan_report = factored.report()
    elif config.method == "none":
        plan_report = {"strategy": "none (no structural compression)"}
    else:
        plan_report = {"strategy": plan.strategy, "probe_level": plan.probe_level,
                       "measured_output_damage": plan.measured_damage}
    solved = dataclasses.replace(solved, initializers={})
    if quantized is not None:
        plan_report["quantization"] = quantized.report()
    return _Solution(compressed, solved, config, calib, eval_set, held_out, plan_report, declined, digest, notes)


def _give_back(channels, view, model, everything, found, calib, eval_set, original, config, validate_config,
               progress):
    """Accuracy gate with give-back: while the accuracy/agreement gate fails on the evaluation data, raise
    the MACs target by ``give_back_step`` (the allocation returns width where it cuts damage most per
    MAC) and solve again, up to ``max_macs``. Returns the last attempt and the list of attempts."""
    from .structured import compress_channels
    from .validation.compare import run_all
    from .validation.run import accuracy_gates
    from .runtime import session

    outputs_original = run_all(session(original, config.threads), eval_set, config.batch_size)
    target, attempts = config.target_macs, []
    while True:
        passed, comparison = accuracy_gates(outputs_original, channels.model, eval_set, validate_config,
                                            config.batch_size, config.threads)
        attempts.append({"target_macs": round(target, 6), "passed": passed, "agreement": comparison.agreement,
                         "accuracy_drop_pt": comparison.accuracy_drop_pt,
                         "macs_planned_ratio": channels.plan.macs_planned / max(channels.plan.macs_original, 1)})
        if passed or target >= config.max_macs - 1e-9:
            return channels, attempts
        target = min(config.max_macs, target + config.give_back_step)
        progress("give-back", len(attempts), len(attempts) + 1, f"gate missed; target MACs {target:.3f}")
        channels = compress_channels(view, model, everything.layers, found.layers, calib,
                                     dataclasses.replace(config, target_macs=target), progress)


def _compress_report(loaded, config, validate_config, digest, calib, plan_report, solved, declined, validation,
                     notes, started, solve_seconds) -> dict:
    rows = [layer_row(o) for o in solved.outcomes]
    total = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    fp_a, fp_b = validation.original, validation.compressed
    return {
        "schema_version": SCHEMA_VERSION, "kind": "compress", "tool": machine(),
        "input": _input_info(loaded), "output": {},
        "config": dataclasses.asdict(config), "validate_config": dataclasses.asdict(validate_config),
        "config_sha256": digest, "seed": config.seed,
        "calibration": {"source": calib.source, "samples": calib.num_samples,
                        "representative": calib.representative},
        "plan": plan_report,
        "layers": rows, "refined_blocks": [dataclasses.asdict(o) for o in solved.refined],
        "distillation": dataclasses.asdict(solved.distilled) if solved.distilled else None,
        "declined": [dataclasses.asdict(d) for d in declined],
        "totals": {"layers_compressed": sum(not _kept_dense(r) for r in rows),
                   "layers_kept_dense": sum(_kept_dense(r) for r in rows),  # solved (refit), nothing removed
                   "layers_declined": len(declined),
                   "weights_in_compressed_layers": total, "nonzero_in_compressed_layers": nonzero,
                   "sparsity": 1 - nonzero / total if total else 0.0,
                   "nonzero_reduction_x": fp_a.nonzero_layer_weights / max(fp_b.nonzero_layer_weights, 1)},
        "validation": validation.as_dict(), "passed": validation.passed,
        "timing": {"compress_s": solve_seconds, "total_s": time.perf_counter() - started,
                   "peak_rss_mb": peak_rss_mb(), "activation_cache_peak_mb": solved.peak_cache_bytes / 2**20,
                   "activation_spilled_mb": solved.spilled_bytes / 2**20},
        "notes": notes,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def validate(original: Any, compressed: Any, data: Any, config: ValidateConfig = ValidateConfig(),
             batch_size: int = 32, threads: int = 0) -> tuple[dict, bool]:
    """Compare two models on ``data``; returns (report, passed)."""
    from .validation.gates import check_gate_inputs
    from .validation.run import validate_models

    started = time.perf_counter()
    a, b = _load(original), _load(compressed)
    view_a, view_b = GraphView(a.model), GraphView(b.model)
    inputs = model_inputs(view_a)
    differences = signature_differences(view_a, view_b)
    if differences:
        raise UnsupportedModelError("the two models cannot be compared on the same data: "
                                    + "; ".join(differences))
    samples = open_samples(data, inputs, config.labels, what="evaluation")
    if config.eval_samples:
        samples, _ = select(samples, min(config.eval_samples, samples.num_samples), "evaluation")
    check_gate_inputs(config, samples.labels is not None)
    validation = validate_models(a.model, b.model, samples, config, batch_size, threads, True)
    platform = platform_check(a.model, b.model, samples, config) if config.platform else None
    report = {"schema_version": SCHEMA_VERSION, "kind": "validate", "tool": machine(),
              "input": _input_info(a), "output": _input_info(b), "validate_config": dataclasses.asdict(config),
              "validation": validation.as_dict(), "passed": validation.passed,
              "timing": {"total_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}}
    if platform is not None:
        report["platform_check"] = platform
        report["passed"] = validation.passed and platform["passed"]
    return report, report["passed"]


def signature_differences(a: GraphView, b: GraphView) -> list[str]:
    """How the inputs and outputs of two models differ: names, dtypes, ranks and dimensions (a static size
    differs from another size and from a dynamic axis; two dynamic axes match whatever their names)."""
    if a.input_names != b.input_names or a.output_names != b.output_names:
        return [f"inputs {a.input_names} vs {b.input_names}, outputs {a.output_names} vs {b.output_names}"]
    found = []
    for kind, names in (("input", a.input_names), ("output", a.output_names)):
        for name in names:
            ta, tb = a.types.get(name), b.types.get(name)
            if ta is None or tb is None:
                continue
            if ta.elem_type != tb.elem_type:
                found.append(f"{kind} {name!r} is {ta.dtype} vs {tb.dtype}")
            elif ta.shape is not None and tb.shape is not None and (
                    len(ta.shape) != len(tb.shape) or any(_static(x) != _static(y) for x, y in zip(ta.shape, tb.shape))):
                found.append(f"{kind} {name!r} has shape {list(ta.shape)} vs {list(tb.shape)}")
    return found


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def platform_check(original: onnx.ModelProto, compressed: onnx.ModelProto, samples: SampleSet,
                   config: ValidateConfig, progress: Progress | None = None) -> dict:
    """Both models on the first ``platform_samples`` samples in the other platform's onnxruntime (emulated)
    and here; outputs compared (``validation/aarch64.py``)."""
    from .onnxio.scratch import scratch_folder
    from .runtime import session
    from .validation.aarch64 import compare, prepare

    progress = progress or (lambda *args: None)
    progress("platform", 0, 1, f"{config.platform}: preparing the emulated onnxruntime")
    env = prepare(log=lambda message: progress("platform", 0, 1, message))
    count = min(config.platform_samples, samples.num_samples)
    feed = {name: array[:count] for name, array in samples.arrays.items()}
    x86 = []
    for model in (original, compressed):
        sess = session(model, 1)
        names = [o.name for o in sess.get_outputs()]
        runs = [sess.run(names, {n: v[i:i + 1] for n, v in feed.items()}) for i in range(count)]
        x86.append([np.concatenate([r[k] for r in runs]) for k in range(len(names))])
    with scratch_folder("onnxadmm-platform-") as folder:
        paths = []
        for name, model in (("original", original), ("compressed", compressed)):
            path = Path(folder) / f"{name}.onnx"
            save_model_atomic(model, path)  # (over 2 GB: external data, the model in memory unchanged)
            paths.append(path)
        progress("platform", 0, 1, f"running {count} samples under qemu")
        arm = env.run(paths, feed)
    result = compare(x86, arm["outputs"], ["original", "compressed"], [has_qdq(original), has_qdq(compressed)])
    result.update({"samples": count, "emulated_machine": arm["machine"], "onnxruntime": arm["ort"]})
    return result


def check(model: Any, config: CheckConfig | CompressConfig = CheckConfig()) -> dict:
    """Preflight: which layers would be compressed, which are declined and why, MACs and params. What
    ``compress`` would refuse before any work (unreadable text, a failed full check, a node onnxruntime
    cannot run) raises here the same error."""
    from .runtime import session

    loaded = _load(model)
    normalized = normalize(loaded.model)
    session(normalized.model, 1)  # compress calibrates in onnxruntime: a model it cannot load is refused
    view = normalized.view()
    found = _declines_for_method(apply_exclude(find_layers(view), config.exclude), config)
    from .bridge.torch_layer import BridgeError, activation_function

    compressible, declined = [], [dataclasses.asdict(d) for d in found.declined]
    for layer in found.layers:
        try:
            activation_function(view, layer)
        except BridgeError as exc:
            declined.append({"name": layer.name, "op_type": layer.op_type, "reason": str(exc)})
            continue
        compressible.append({"name": layer.name, "op_type": layer.op_type,
                             "weight_shape": list(layer.weight_shape), "groups": layer.groups,
                             "activation": layer.chain.description if layer.chain else "none",
                             "params": layer.num_weights})
    from .analysis.channels import find_channel_groups

    groups = [{"name": g.name, "channels": g.channels, "producers": len(g.producers),
               "consumers": [c.layer for c in g.consumers], "declined": g.declined}
              for g in find_channel_groups(view, found.layers)]
    report = {"schema_version": SCHEMA_VERSION, "kind": "check", "tool": machine(), "input": _input_info(loaded),
              "method": config.method, "notes": loaded.notes,
              "normalization": normalized.rewrites, "compressible": compressible, "declined": declined,
              "channel_groups": groups,
              "unsupported_ops": _unsupported_ops(view), "estimate": _estimate(loaded.model, view)}
    report["passed"] = bool(compressible)
    report["verdict"] = "ok" if compressible else f"nothing can be compressed in this model by --method {config.method}"
    return report


def _unsupported_ops(view: GraphView) -> list[dict]:
    """(op, opset) pairs onnx2torch has no converter for: fine outside layers, listed for information."""
    from .bridge.torch_layer import converter_missing

    opset = default_opset(view.model)
    seen = {}
    for node in view.nodes:
        key = (node.domain or "ai.onnx", node.op_type)
        if key not in seen and converter_missing(node, opset):
            seen[key] = {"domain": key[0], "op_type": node.op_type, "opset": opset, "first_node": node.name}
    return list(seen.values())


def _estimate(model: onnx.ModelProto, view: GraphView) -> dict:
    from .validation.footprint import footprint

    feed = {}
    for name, tensor_type in model_inputs(view).items():
        if tensor_type.shape is None or any(not isinstance(d, int) for d in tensor_type.shape[1:]):
            return {"macs": None, "params": None, "reason": f"input {name!r} has dynamic dimensions"}
        feed[name] = np.zeros((1, *tensor_type.shape[1:]), dtype=tensor_type.dtype)
    try:
        fp = footprint(model, feed)
    except Exception as exc:  # noqa: BLE001 - an estimate must not stop the preflight
        return {"macs": None, "params": None, "reason": f"onnxruntime could not run it: {exc}"}
    return {"macs_per_sample": fp.macs, "params": fp.params, "layer_weights": fp.layer_weights}


__all__ = ["compress", "validate", "check", "CompressResult", "CompressConfig", "ValidateConfig",
           "evenly_spaced"]
