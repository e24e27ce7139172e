"""The report: one typed object per command (``CompressReport``, ``ValidateReport``, ``CheckReport``),
serialized to one versioned JSON document (``schema_version``); Markdown is rendered from the same object.

Top-level keys of a ``compress`` report (``CompressReport.as_dict``):
  schema_version, kind, tool, input, output, config, validate_config, config_sha256, seed, calibration, plan,
  layers[] (name, op_type, weight_shape, groups, activation, structure, target_level, sparsity, params, nonzero,
            error_dense, error_projected, error_final, patches, seconds, penalty_mu, admm_history; for
            factorized layers rank, inner (rank + merged rows), merged_rows, input_rank, sparse_nonzero),
  refined_blocks[] (block, layers, loss_before, loss_after, kept, seconds, note, best_epoch; with
                    --refine-epochs),
  distillation (epochs, augment, trained, loss_before/after, agreement_before/after, kept, seconds, note;
                with --distill-epochs, else null),
  declined[] (name, op_type, reason), totals, validation, passed, timing, notes; platform_check (with
  --platform) and search (with a budget and no --method) when they ran.
Sections a stage owns are written as that stage reports itself: ``plan`` (the method's plan, and the
precision stage's ``quantization``), ``validation`` (``validation/run.py``), ``platform_check``, ``search``.
Errors are relative squared errors of the layer output on the sampled calibration patches:
  error_dense — original weights on the compressed model's inputs (error inherited from upstream);
  error_projected — the data-free projection of the original weights (what you get without ADMM);
  error_final — after ADMM and the refit.
admm_history holds, per ADMM iteration, objective (f(Z) on the solver's patch subset; through the activation,
on a quarter of it where no stopping rule reads it), primal_residual, dual_residual and rho (relative to the
layer's curvature); for a layer solved in blocks of output rows (``algorithms/rowblocks.py``), row_blocks: one such
history per block, with its rows [start, stop).
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

SCHEMA_VERSION = "1.0"


@dataclass
class ModelFile:
    """A model the command read (``input``) or compared."""

    path: str | None
    sha256: str
    size_bytes: int
    opset: int
    ir_version: int
    producer: str

    @classmethod
    def of(cls, loaded) -> ModelFile:
        """From an ``onnxio.load.LoadedModel``."""
        from ..onnxio.load import default_opset

        model = loaded.model
        return cls(str(loaded.path) if loaded.path else None, loaded.sha256, loaded.size_bytes,
                   default_opset(model), model.ir_version,
                   f"{model.producer_name} {model.producer_version}".strip())


@dataclass
class WrittenFile:
    """The model a ``compress`` wrote (set when it is staged)."""

    path: str
    size_bytes: int


@dataclass
class Calibration:
    source: str
    samples: int
    representative: bool  # False for random:N data


@dataclass
class Factors:
    """A factorized layer's shape (low-rank methods)."""

    rank: int
    inner: int  # rank + merged rows
    merged_rows: int
    input_rank: int
    sparse_nonzero: int | None  # the sparse branch of low-rank + sparse


@dataclass
class LayerRow:
    """One solved layer (``solve.layerwise.LayerOutcome``)."""

    name: str
    op_type: str
    weight_shape: list[int]
    groups: int
    activation: str
    structure: str
    target_level: float
    sparsity: float
    params: int
    nonzero: int
    error_dense: float
    error_projected: float
    error_final: float
    patches: int
    seconds: float
    penalty_mu: float | None
    admm_history: dict
    factors: Factors | None = None

    @classmethod
    def of(cls, outcome) -> LayerRow:
        layer, factors = outcome.layer, outcome.factors
        return cls(layer.name, layer.op_type, list(layer.weight_shape), layer.groups,
                   layer.chain.description if layer.chain else "none", outcome.structure.kind,
                   round(outcome.target_level, 6), round(outcome.sparsity, 6), layer.num_weights, outcome.nonzero,
                   outcome.error_dense, outcome.error_projected, outcome.error_final, outcome.patches,
                   round(outcome.seconds, 3), outcome.penalty_mu, outcome.history,
                   None if factors is None else Factors(
                       factors.rank, factors.inner, factors.merged_rows, factors.input_rank,
                       None if factors.sparse is None else int((factors.sparse != 0).sum())))

    @property
    def kept_dense(self) -> bool:
        """Solved (its values may be refit) but lost no weight and was not factorized."""
        return self.structure == "dense" or (self.factors is None and self.nonzero >= self.params)

    def as_dict(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "factors"}
        return row if self.factors is None else {**row, **dataclasses.asdict(self.factors)}


@dataclass
class Totals:
    layers_compressed: int
    layers_kept_dense: int  # solved (refit), nothing removed
    layers_declined: int
    weights_in_compressed_layers: int
    nonzero_in_compressed_layers: int
    sparsity: float
    nonzero_reduction_x: float

    @classmethod
    def of(cls, rows: list[LayerRow], declined: int, nonzero_reduction_x: float) -> Totals:
        total, nonzero = sum(r.params for r in rows), sum(r.nonzero for r in rows)
        return cls(sum(not r.kept_dense for r in rows), sum(r.kept_dense for r in rows), declined, total, nonzero,
                   1 - nonzero / total if total else 0.0, nonzero_reduction_x)


@dataclass
class Timing:
    total_s: float
    peak_rss_mb: float
    compress_s: float | None = None  # up to validation (compress only)
    activation_cache_peak_mb: float | None = None
    activation_spilled_mb: float | None = None

    def as_dict(self) -> dict:
        if self.compress_s is None:
            return {"total_s": self.total_s, "peak_rss_mb": self.peak_rss_mb}
        return {"compress_s": self.compress_s, "total_s": self.total_s, "peak_rss_mb": self.peak_rss_mb,
                "activation_cache_peak_mb": self.activation_cache_peak_mb,
                "activation_spilled_mb": self.activation_spilled_mb}


def machine() -> dict[str, Any]:
    import onnxruntime

    from .. import __version__

    return {"onnxadmm": __version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "system": platform.system()}


class Report:
    """What every report has: its kind, the tool that wrote it, and whether its gates held."""

    kind: ClassVar[str] = ""
    passed: bool

    def as_dict(self) -> dict:
        raise NotImplementedError

    def to_json(self) -> str:
        return json.dumps(_clean(self.as_dict()), indent=2, sort_keys=False) + "\n"

    def _envelope(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": self.kind, "tool": self.tool}


@dataclass
class CompressReport(Report):
    kind: ClassVar[str] = "compress"
    input: ModelFile
    config: Any  # config.CompressConfig
    validate_config: Any  # config.ValidateConfig
    config_sha256: str
    calibration: Calibration
    plan: dict  # the method's plan as it reports itself; "quantization": the precision stage's
    layers: list[LayerRow]
    refined_blocks: list  # finetune.refine.BlockOutcome
    distillation: Any  # finetune.distill.Distillation, or None
    declined: list  # analysis.layers.Declined
    totals: Totals
    validation: Any  # validation.run.Validation
    timing: Timing
    notes: list[str]
    passed: bool
    output: WrittenFile | None = None
    platform_check: dict | None = None  # validation/platform.py, with --platform
    search: dict | None = None  # budget/run.py, with a budget and no --method
    tool: dict = field(default_factory=machine)

    @property
    def seed(self) -> int:
        return self.config.seed

    def as_dict(self) -> dict:
        out = {**self._envelope(), "input": dataclasses.asdict(self.input),
               "output": dataclasses.asdict(self.output) if self.output else {},
               "config": dataclasses.asdict(self.config), "validate_config": dataclasses.asdict(self.validate_config),
               "config_sha256": self.config_sha256, "seed": self.seed,
               "calibration": dataclasses.asdict(self.calibration), "plan": self.plan,
               "layers": [r.as_dict() for r in self.layers],
               "refined_blocks": [dataclasses.asdict(o) for o in self.refined_blocks],
               "distillation": dataclasses.asdict(self.distillation) if self.distillation else None,
               "declined": [dataclasses.asdict(d) for d in self.declined],
               "totals": dataclasses.asdict(self.totals), "validation": self.validation.as_dict(),
               "passed": self.passed, "timing": self.timing.as_dict(), "notes": self.notes}
        for name in ("platform_check", "search"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass
class ValidateReport(Report):
    kind: ClassVar[str] = "validate"
    input: ModelFile
    output: ModelFile  # the compressed model compared
    validate_config: Any  # config.ValidateConfig
    validation: Any  # validation.run.Validation
    timing: Timing
    passed: bool
    platform_check: dict | None = None
    tool: dict = field(default_factory=machine)

    def as_dict(self) -> dict:
        out = {**self._envelope(), "input": dataclasses.asdict(self.input), "output": dataclasses.asdict(self.output),
               "validate_config": dataclasses.asdict(self.validate_config), "validation": self.validation.as_dict(),
               "passed": self.passed, "timing": self.timing.as_dict()}
        if self.platform_check is not None:
            out["platform_check"] = self.platform_check
        return out


@dataclass
class CompressibleLayer:
    name: str
    op_type: str
    weight_shape: list[int]
    groups: int
    activation: str
    params: int


@dataclass
class GroupSummary:
    """A channel group as ``check`` lists it."""

    name: str
    channels: int
    producers: int
    consumers: list[str]
    declined: str | None


@dataclass
class CheckReport(Report):
    kind: ClassVar[str] = "check"
    input: ModelFile
    method: str
    notes: list[str]
    normalization: list[str]
    compressible: list[CompressibleLayer]
    declined: list  # analysis.layers.Declined
    channel_groups: list[GroupSummary]
    method_preview: list[str]
    unsupported_ops: list[dict]  # {domain, op_type, opset, first_node}
    estimate: dict  # {macs_per_sample, params} or {reason}
    tool: dict = field(default_factory=machine)

    @property
    def passed(self) -> bool:
        return bool(self.compressible)

    @property
    def verdict(self) -> str:
        return "ok" if self.passed else f"nothing can be compressed in this model by --method {self.method}"

    def as_dict(self) -> dict:
        return {**self._envelope(), "input": dataclasses.asdict(self.input), "method": self.method,
                "notes": self.notes, "normalization": self.normalization,
                "compressible": [dataclasses.asdict(c) for c in self.compressible],
                "declined": [dataclasses.asdict(d) for d in self.declined],
                "channel_groups": [dataclasses.asdict(g) for g in self.channel_groups],
                "method_preview": self.method_preview, "unsupported_ops": self.unsupported_ops,
                "estimate": self.estimate, "passed": self.passed, "verdict": self.verdict}


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
