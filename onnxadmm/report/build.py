"""The reports' content: what ``compress`` and ``validate`` write as JSON (``schema.py`` for the
versioned envelope and the per-layer rows, ``markdown.py`` for the rendering)."""

from __future__ import annotations

import dataclasses
import resource
import time

from ..onnxio.load import LoadedModel, default_opset
from .schema import SCHEMA_VERSION, layer_row, machine


def kept_dense(row: dict) -> bool:
    """A solved layer that lost no weight and was not factorized (its values may be refit)."""
    return row["structure"] == "dense" or ("rank" not in row and row["nonzero"] >= row["params"])


def input_info(loaded: LoadedModel) -> dict:
    model = loaded.model
    return {"path": str(loaded.path) if loaded.path else None, "sha256": loaded.sha256,
            "size_bytes": loaded.size_bytes, "opset": default_opset(model), "ir_version": model.ir_version,
            "producer": f"{model.producer_name} {model.producer_version}".strip()}



def compress_report(loaded: LoadedModel, config, validate_config, digest: str, calib, plan_report: dict, solved,
                    declined: list, validation, notes: list[str], started: float, solve_seconds: float) -> dict:
    """The ``compress`` report (schema ``SCHEMA_VERSION``); ``started`` is the run's ``perf_counter`` start."""
    rows = [layer_row(o) for o in solved.outcomes]
    total = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    fp_a, fp_b = validation.original, validation.compressed
    return {
        "schema_version": SCHEMA_VERSION, "kind": "compress", "tool": machine(),
        "input": input_info(loaded), "output": {},
        "config": dataclasses.asdict(config), "validate_config": dataclasses.asdict(validate_config),
        "config_sha256": digest, "seed": config.seed,
        "calibration": {"source": calib.source, "samples": calib.num_samples,
                        "representative": calib.representative},
        "plan": plan_report,
        "layers": rows, "refined_blocks": [dataclasses.asdict(o) for o in solved.refined],
        "distillation": dataclasses.asdict(solved.distilled) if solved.distilled else None,
        "declined": [dataclasses.asdict(d) for d in declined],
        "totals": {"layers_compressed": sum(not kept_dense(r) for r in rows),
                   "layers_kept_dense": sum(kept_dense(r) for r in rows),  # solved (refit), nothing removed
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


def validate_report(original: LoadedModel, compressed: LoadedModel, config, validation, started: float) -> dict:
    """The ``validate`` report; ``started`` is the run's ``perf_counter`` start."""
    return {"schema_version": SCHEMA_VERSION, "kind": "validate", "tool": machine(),
            "input": input_info(original), "output": input_info(compressed),
            "validate_config": dataclasses.asdict(config), "validation": validation.as_dict(),
            "passed": validation.passed,
            "timing": {"total_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
