"""The report: one versioned JSON document (``schema_version``) per command; Markdown is rendered from it.

Top-level keys of a ``compress`` report:
  schema_version, kind, tool, input, output, config, config_sha256, seed, calibration, plan,
  layers[] (name, op_type, weight_shape, activation, structure, target_level, sparsity, params, nonzero,
            error_dense, error_projected, error_final, patches, seconds, admm_history; for factorized layers
            rank, inner (rank + merged rows), merged_rows, sparse_nonzero),
  refined_blocks[] (block, layers, loss_before, loss_after, kept, seconds, note; with --refine-epochs),
  distillation (epochs, augment, trained, loss_before/after, agreement_before/after, kept, seconds, note;
                with --distill-epochs, else null),
  declined[] (name, op_type, reason), totals, validation, passed, timing, notes.
Errors are relative squared errors of the layer output on the sampled calibration patches:
  error_dense — original weights on the compressed model's inputs (error inherited from upstream);
  error_projected — the data-free projection of the original weights (what you get without ADMM);
  error_final — after ADMM and the refit.
"""

from __future__ import annotations

import json
import platform
from typing import Any

import numpy as np

SCHEMA_VERSION = "1.0"


def layer_row(outcome) -> dict[str, Any]:
    layer = outcome.layer
    return {
        "name": layer.name, "op_type": layer.op_type, "weight_shape": list(layer.weight_shape),
        "groups": layer.groups, "activation": layer.chain.description if layer.chain else "none",
        "structure": outcome.structure.kind, "target_level": round(outcome.target_level, 6),
        "sparsity": round(outcome.sparsity, 6), "params": layer.num_weights, "nonzero": outcome.nonzero,
        "error_dense": outcome.error_dense, "error_projected": outcome.error_projected,
        "error_final": outcome.error_final, "patches": outcome.patches, "seconds": round(outcome.seconds, 3),
        "penalty_mu": outcome.penalty_mu, "admm_history": outcome.history,
        **({} if outcome.factors is None else {
            "rank": outcome.factors.rank, "inner": outcome.factors.inner,
            "merged_rows": outcome.factors.merged_rows,
            "input_rank": outcome.factors.input_rank,
            "sparse_nonzero": None if outcome.factors.sparse is None else int((outcome.factors.sparse != 0).sum())}),
    }


def machine() -> dict[str, Any]:
    import onnxruntime

    from .. import __version__

    return {"onnxadmm": __version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "system": platform.system()}


def _clean(value):
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def to_json(report: dict) -> str:
    return json.dumps(_clean(report), indent=2, sort_keys=False) + "\n"
