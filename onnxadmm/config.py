"""Settings as frozen dataclasses. A TOML file, a dict and the CLI flags map 1:1 onto the fields.

Each field's ``metadata`` carries its help text (and choices), so the CLI flags are generated from
here and ``--help`` never drifts from the code. Unknown keys are errors with a did-you-mean hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

#: Compression methods. Each names a constraint set (the ADMM Z-step) and an export form.
METHODS = {
    "sparse": "unstructured top-k cardinality (Zhang et al. 2018)",
    "nm": "N:M fine-grained sparsity along input channels",
    "l1": "l1 penalty, soft thresholding (Kiaee et al. 2016)",
    "l0": "l0 penalty, hard thresholding (Kiaee et al. 2016)",
    "kernels": "whole (output, input-channel) kernels, channel-wise sparse connections (Changpinyo et al. 2017)",
    "channel": "remove coupled channels (physically smaller, faster graph), ADMM on each consumer",
    "l0-l21": "l0 + l2,1: remove channels, then element sparsity inside them (Bui et al. 2019)",
    "grouped": "block-diagonal channel connections exported as grouped Convs (Changpinyo et al. 2017)",
    "lowrank": "W = A·B per layer, exported as two Convs / products (Ma et al. 2019)",
    "lowrank-sparse": "W = A·B + S, S row-sparse (merged into the pair) or unstructured (Ma et al. 2019)",
    "none": "no structural compression (with --quantize int8 or w4: the precision stage alone)",
    "auto": "search: the fastest (or smallest, --objective size) model within the accuracy budget "
            "(--max-accuracy-drop / --min-agreement); the default when a budget is given without a method",
}
CHANNEL_METHODS = ("channel", "l0-l21")
LOWRANK_METHODS = ("lowrank", "lowrank-sparse")
OBJECTIVE_DEFAULT_LATENCY = LOWRANK_METHODS + ("grouped", "auto")  # methods that always have an objective
SPARSE_STRUCTURES = ("rows", "unstructured")
LOWRANK_FORMS = ("pair", "tucker2", "auto")
OBJECTIVES = ("latency", "size")
AUGMENTATIONS = ("auto", "none")
PLATFORMS = ("linux-aarch64", "linux-x86_64-avx2")
PRECISIONS = ("none", "int8", "w4")
RANGE_ESTIMATORS = ("auto", "minmax", "percentile", "mse")
INT8_ACTIVATIONS = ("auto", "static", "dynamic")
INT8_SMOOTHING = ("auto", "off")
LOSSES = ("activation", "linear")
PRODUCTS = ("auto", "bf16", "fp32")
SOLVERS = ("admm", "magnitude", "refit")
ELEMENT_METHODS = ("sparse", "nm", "l1", "l0", "kernels")
SEED_MAX = 2**32 - 1  # numpy's legacy and torch's generators both take seeds in [0, 2**32)
THREADS_PER_CORE_MAX = 4  # --threads above 4x the cores only adds contention (and thousands of threads)

#: Method options: a value other than the default is refused with any other method (never silently ignored).
APPLIES_TO = {
    "sparsity": ELEMENT_METHODS + ("l0-l21",),
    "nm": ("nm",),
    "uniform": ELEMENT_METHODS + CHANNEL_METHODS,
    "sparse_structure": ("lowrank-sparse",),
    "sparse_share": ("lowrank-sparse",),
    "objective": LOWRANK_METHODS + ("grouped", "auto"),  # and every method with --quantize int8
    "time_budget_min": ("auto",),
    "conv_groups": ("grouped",),
    "refit_dense": CHANNEL_METHODS + LOWRANK_METHODS + ("grouped",),
    "give_back_step": CHANNEL_METHODS,
    "channel_multiple": CHANNEL_METHODS + LOWRANK_METHODS + ("grouped", "auto"),
    "sensitivity_probes": CHANNEL_METHODS,
    "latency_batch": CHANNEL_METHODS + LOWRANK_METHODS + ("grouped", "auto"),
}


def _opt(help_text: str, choices: tuple[str, ...] | None = None, flag: str | None = None) -> dict:
    meta: dict[str, Any] = {"help": help_text}
    if choices:
        meta["choices"] = tuple(choices)
    if flag:
        meta["flag"] = flag
    return meta


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how. ``sparsity`` is the fraction of weights set to zero (0..1)."""

    method: str = field(default="sparse", metadata={
        **_opt("constraint set / structure", tuple(METHODS)),
        "cli_default": "with a budget, the search (auto); with --sparsity (or another sparse option) or "
                       "--refine-epochs, sparse; otherwise none with --quantize int8 (int8 alone)"})
    sparsity: float = field(
        default=0.5, metadata=_opt("global fraction of weights removed over the compressed layers (for "
                                   "l0-l21: inside the kept channels; for kernels: fraction of kernels)")
    )
    target_macs: float | None = field(
        default=None, metadata=_opt("channel and lowrank methods: MACs of the output as a fraction of the "
                                    "original's")
    )
    target_latency: float | None = field(
        default=None, metadata=_opt("channel and lowrank methods: latency of the output (at --latency-batch) as "
                                    "a fraction of the original's, met on the exported graph timed in "
                                    "onnxruntime here")
    )
    target_latency_of: str = field(
        default="original", metadata=_opt("what --target-latency is a fraction of: the original's latency, or, with "
                                          "--quantize int8, the int8 original's as the planner times it (0.9: the "
                                          "int8 model 10 % faster than int8 alone)", ("original", "int8"))
    )
    latency_batch: int | None = field(
        default=None, metadata=_opt("batch size at which --target-latency and the latency objective (also "
                                    "--quantize int8 --objective latency) time the model: the batch you serve "
                                    "(default 1, or the model's fixed batch)")
    )
    latency_seq_len: int | None = field(
        default=None, metadata=_opt("transformers: the sequence length (tokens) --target-latency and the latency "
                                    "objective time at, and the validation's latency A/B: inputs with a dynamic "
                                    "second axis cut to it or padded with zeros (default: the calibration data's)")
    )
    target_params: float | None = field(
        default=None, metadata=_opt("sparse and lowrank methods: nonzero weights of the compressible layers as "
                                    "a fraction of the original's (for sparse: sparsity = 1 - F)")
    )
    rank_ratio: float | None = field(
        default=None, metadata=_opt("lowrank methods: rank of every layer as a fraction of its full rank "
                                    "min(Cout, Cin·kh·kw) (a Tucker-2 conv: of min(Cout, Cin))")
    )
    sparse_structure: str = field(
        default="rows", metadata=_opt("lowrank-sparse: S as whole output rows (merged into the factor pair: "
                                      "fast) or unstructured (a dense-stored parallel branch: small, slower)",
                                      SPARSE_STRUCTURES)
    )
    sparse_share: float = field(
        default=0.5, metadata=_opt("lowrank-sparse: fraction of each layer's parameters given to S")
    )
    lowrank_form: str = field(
        default="pair", metadata=_opt("lowrank: a k×k Conv of rank r as a pair (k×k Cin→r, 1×1 r→Cout), as "
                                      "Tucker-2 (1×1 Cin→r, k×k r→r, 1×1 r→Cout: fewer MACs, more error), or "
                                      "auto (both offered; the allocation picks per layer; needs a target)",
                                      LOWRANK_FORMS)
    )
    objective: str | None = field(
        default=None, metadata=_opt("lowrank methods and --method grouped: latency (only forms measured faster "
                                    "than the dense layers; their default) or size (any form with fewer "
                                    "parameters); the search: what it minimizes within the budget (default "
                                    "latency); --quantize int8: latency keeps float the layers whose int8 kernel "
                                    "measures slower here (default: every layer int8)", OBJECTIVES)
    )
    time_budget_min: float | None = field(
        default=None, metadata=_opt("the search: minutes it may spend (a candidate that would not finish in "
                                    "time is skipped)")
    )
    max_macs: float | None = field(
        default=None, metadata=_opt("channel methods with --max-accuracy-drop / --min-agreement: when the gate "
                                    "is missed, give width back (--give-back-step at a time) up to this MACs "
                                    "fraction until it holds")
    )
    give_back_step: float = field(default=0.05, metadata=_opt("MACs fraction given back per attempt"))
    refit_dense: bool = field(
        default=True, metadata=_opt("channel methods: also refit the layers that lose no input channels to "
                                    "the compressed model's inputs (sequential error compensation)")
    )
    refine_epochs: int = field(
        default=0, metadata=_opt("block-wise refinement after the layer-wise solve: epochs of Adam over the "
                                 "calibration samples per block, supports fixed, no labels (0 = off)")
    )
    refine_lr: float = field(default=1e-3, metadata=_opt("block-wise refinement: Adam learning rate"))
    refine_grid_epochs: int = field(
        default=0, metadata=_opt("with --quantize: block-wise refinement of the quantized model, weights on their "
                                 "grid and activations rounded as exported (0 = off; --refine-lr and "
                                 "--refine-block-layers apply)")
    )
    refine_block_layers: int = field(
        default=2, metadata=_opt("block-wise refinement: merge cut-to-cut stretches until a block holds this "
                                 "many compressed layers")
    )
    distill_epochs: int = field(
        default=0, metadata=_opt("whole-model distillation after the solve: epochs of Adam matching the original's "
                                 "outputs on (augmented) calibration samples, supports fixed, no labels; every tenth sample is "
                                 "then held out of the solve to check it on (0 = off)")
    )
    distill_lr: float = field(default=1e-4, metadata=_opt("whole-model distillation: Adam learning rate"))
    distill_augment: str = field(
        default="auto", metadata=_opt("whole-model distillation: auto (random flip and shift of an image input) "
                                      "or none", AUGMENTATIONS)
    )
    conv_groups: int = field(
        default=2, metadata=_opt("--method grouped: blocks per Conv pair (the exported Conv's group)")
    )
    channel_multiple: int = field(
        default=8, metadata=_opt("channel methods: kept widths are multiples of this (CPU kernels like 8/16)")
    )
    nm: str = field(default="2:4", metadata=_opt("N:M pattern for --method nm (keep N of every M)"))
    uniform: bool = field(
        default=False,
        metadata=_opt("same sparsity in every layer instead of the sensitivity-based allocation"),
    )
    exclude: tuple[str, ...] = field(
        default=(),
        metadata=_opt("leave dense: node names, name globs or op types (repeat or comma-separate)"),
    )
    loss: str = field(
        default="activation",
        metadata=_opt("layer objective: through the following activation, or before it", LOSSES),
    )
    solver: str = field(
        default="admm",
        metadata=_opt("admm, or the baselines: magnitude (no data) / refit (magnitude + least squares)",
                      SOLVERS),
    )
    seed: int = field(default=0, metadata=_opt("seed for every random choice (sampling, init)"))
    calib_samples: int | None = field(
        default=None, metadata=_opt("use at most N calibration samples (evenly spaced, deterministic)")
    )
    batch_size: int = field(default=32, metadata=_opt("samples per onnxruntime call during calibration"))
    token_mask: str = field(
        default="auto", metadata=_opt("sequence models: the input whose zeros mark padding tokens, left out of "
                                      "every layer's reconstruction ('auto': an input named attention_mask; "
                                      "'none')")
    )
    max_memory_mb: int = field(
        default=2048,
        metadata=_opt("working memory: a quarter for the cached layer inputs (beyond it they spill to a "
                      "temporary folder), a quarter for a layer's sampled patches, an eighth for the solver's "
                      "copy of them, the rest for its working copies of the layer (a larger layer is solved in "
                      "blocks of output rows); a quarter for the batches of the int8 range passes"),
    )
    sample_patches: int = field(
        default=65536, metadata=_opt("input patches sampled per layer for its statistics")
    )
    grad_patches: int | None = field(
        default=None, metadata=_opt("patches used by the gradient steps through the activation (default: "
                                    "32 per input of a row, between 4096 and 16384)")
    )
    admm_iterations: int = field(default=40, metadata=_opt("ADMM iterations per layer"))
    admm_products: str = field(
        default="auto",
        metadata=_opt("the ADMM descent's large products with the sampled inputs (gradient, step): bf16 (float32 "
                      "accumulation; they steer the descent, the weights and reported errors stay float32), fp32, "
                      "or auto: bf16 where the CPU multiplies it in hardware (x86 AMX or AVX512-BF16)", PRODUCTS),
    )
    rho_init: float = field(
        default=0.02, metadata=_opt("initial ADMM penalty, relative to the mean eigenvalue of H")
    )
    rho_growth: float = field(default=1.2, metadata=_opt("rho multiplier per ADMM iteration"))
    sensitivity_samples: int = field(
        default=64, metadata=_opt("calibration samples used to measure per-layer sensitivity")
    )
    sensitivity_probes: int = field(
        default=6, metadata=_opt("channel methods: widths per group whose output damage is measured")
    )
    quantize: str = field(
        default="none", metadata=_opt("precision stage after the method: int8 = uint8 activations and int8 "
                                      "per-channel weights solved onto their grid (QDQ that onnxruntime fuses); "
                                      "w4 = int4 per-channel weights solved onto their grid, float activations "
                                      "(for file size: the layers run at float speed; opset 21); without "
                                      "--method, the precision stage alone", PRECISIONS)
    )
    activation_range: str = field(
        default="auto", metadata=_opt("--quantize int8: activation range estimator per tensor (auto = the one "
                                      "with the smallest quantization error on the calibration histogram)",
                                      RANGE_ESTIMATORS)
    )
    int8_activations: str = field(
        default="auto", metadata=_opt("--quantize int8: activations quantized with calibrated ranges (static: QDQ "
                                      "on every op onnxruntime has an integer kernel for) or per tensor at run time "
                                      "(dynamic: the MatMuls only, for transformers); auto: both where MatMuls hold "
                                      "most of the weights, kept by the smaller held-out output error, else static",
                                      INT8_ACTIVATIONS)
    )
    int8_smoothing: str = field(
        default="auto", metadata=_opt("--quantize int8, dynamic activations: each MatMul input's outlier channels "
                                      "moved into the weights' rows, x.W = (x/s).(diag(s) W) (SmoothQuant), the "
                                      "strength chosen per tensor by the rounded output error, where it lowers "
                                      "it (auto), or off", INT8_SMOOTHING)
    )
    int8_reduce_range: bool = field(
        default=False, metadata=_opt("--quantize int8: weights on 7 bits (-63..63), so onnxruntime's uint8 x int8 "
                                     "products cannot saturate on x86 CPUs without VNNI (AVX2 only; see --platform "
                                     "linux-x86_64-avx2), for one bit of weight precision")
    )
    threads: int = field(default=0, metadata=_opt("torch/onnxruntime threads (0 = all cores)"))
    force: bool = field(
        default=False, metadata=_opt("compress a model that onnxadmm already compressed")
    )

    def __post_init__(self) -> None:
        _check_choice("method", self.method, tuple(METHODS))
        _check_finite(self)
        _check_applies(self)
        _check_seed(self.seed)
        check_threads("threads", self.threads)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("solver", self.solver, SOLVERS)
        _check_choice("admm_products", self.admm_products, PRODUCTS)
        _check_choice("sparse_structure", self.sparse_structure, SPARSE_STRUCTURES)
        _check_choice("lowrank_form", self.lowrank_form, LOWRANK_FORMS)
        if self.objective is None and self.method in OBJECTIVE_DEFAULT_LATENCY:
            object.__setattr__(self, "objective", "latency")
        if self.objective is not None:
            _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("distill_augment", self.distill_augment, AUGMENTATIONS)
        _check_choice("quantize", self.quantize, PRECISIONS)
        _check_choice("target_latency_of", self.target_latency_of, ("original", "int8"))
        _check_choice("activation_range", self.activation_range, RANGE_ESTIMATORS)
        if self.activation_range != "auto" and self.quantize != "int8":
            raise ConfigError("--activation-range applies to --quantize int8")
        _check_choice("int8_activations", self.int8_activations, INT8_ACTIVATIONS)
        if self.int8_activations != "auto" and self.quantize != "int8":
            raise ConfigError("--int8-activations applies to --quantize int8")
        _check_choice("int8_smoothing", self.int8_smoothing, INT8_SMOOTHING)
        if self.int8_smoothing != "auto" and self.quantize != "int8":
            raise ConfigError("--int8-smoothing applies to --quantize int8")
        if self.int8_reduce_range and self.quantize != "int8":
            raise ConfigError("--int8-reduce-range applies to --quantize int8")
        if self.refine_grid_epochs < 0:
            raise ConfigError(f"refine_grid_epochs must be >= 0, got {self.refine_grid_epochs}")
        if self.refine_grid_epochs and self.quantize == "none":
            raise ConfigError("--refine-grid-epochs applies to --quantize int8 or w4")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise ConfigError(f"time_budget_min must be > 0, got {self.time_budget_min}")
        if self.method == "none" and self.quantize == "none":
            raise ConfigError("--method none compresses nothing: add --quantize int8 (or w4), or choose a method")
        if self.method == "none" and self.refine_epochs:
            raise ConfigError("--refine-epochs refines the layers --method changed, and --method none changes none: "
                              "use --refine-grid-epochs to refine the quantized model")
        _check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        self.nm_pattern  # validates
        if self.grad_patches is not None and self.grad_patches < 1:
            raise ConfigError(f"grad_patches must be >= 1, got {self.grad_patches}")
        for name in ("latency_batch", "latency_seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "max_memory_mb", "sample_patches",
                     "admm_iterations", "sensitivity_samples", "sensitivity_probes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.method in CHANNEL_METHODS and (self.target_macs is None) == (self.target_latency is None):
            raise ConfigError(f"--method {self.method} needs one of --target-macs F or --target-latency F "
                              "(fraction of the original, e.g. 0.5)")
        for name in ("target_macs", "target_latency"):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), 0.0, 1.0)
                if self.method not in CHANNEL_METHODS + LOWRANK_METHODS:
                    raise ConfigError(f"--{name.replace('_', '-')} applies to --method "
                                      f"{' | '.join(CHANNEL_METHODS + LOWRANK_METHODS)}, not {self.method!r} "
                                      "(zeros in dense weights do not reduce MACs or latency)")
        if self.target_latency_of == "int8" and (self.target_latency is None or self.quantize != "int8"):
            raise ConfigError("--target-latency-of int8 takes --target-latency as a fraction of the int8 original's "
                              "latency: give --target-latency F and --quantize int8")
        self._check_lowrank()
        if self.max_macs is not None:
            _check_range("max_macs", self.max_macs, 0.0, 1.0)
            if self.target_macs is None or self.max_macs < self.target_macs:
                raise ConfigError("--max-macs is the give-back ceiling: it needs --target-macs <= --max-macs "
                                  "(give-back works on the MACs target)")
        if not 0 < self.give_back_step <= 1:
            raise ConfigError(f"give_back_step must be in (0, 1], got {self.give_back_step}")
        if self.conv_groups < 2:
            raise ConfigError(f"conv_groups must be >= 2, got {self.conv_groups}")
        if self.channel_multiple < 1:
            raise ConfigError(f"channel_multiple must be >= 1, got {self.channel_multiple}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ConfigError(f"calib_samples must be >= 1, got {self.calib_samples}")
        if not self.rho_init > 0 or not self.rho_growth >= 1:
            raise ConfigError("rho_init must be > 0 and rho_growth >= 1")
        if self.refine_epochs < 0 or not self.refine_lr > 0 or self.refine_block_layers < 1:
            raise ConfigError("refine_epochs must be >= 0, refine_lr > 0 and refine_block_layers >= 1")
        if self.distill_epochs < 0 or not self.distill_lr > 0:
            raise ConfigError("distill_epochs must be >= 0 and distill_lr > 0")

    def _check_lowrank(self) -> None:
        for name in ("target_params", "rank_ratio"):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), 0.0, 1.0)
                if name == "target_params" and getattr(self, name) == 0:
                    raise ConfigError("target_params must be > 0")
        if self.target_params is not None and self.method not in ("sparse",) + LOWRANK_METHODS:
            raise ConfigError(f"--target-params applies to --method sparse | lowrank | lowrank-sparse, not "
                              f"{self.method!r}")
        if self.rank_ratio is not None and self.method not in LOWRANK_METHODS:
            raise ConfigError(f"--rank-ratio applies to --method lowrank | lowrank-sparse, not {self.method!r}")
        if not 0 < self.sparse_share < 1:
            raise ConfigError(f"sparse_share must be in (0, 1), got {self.sparse_share}")
        if self.lowrank_form != "pair" and self.method != "lowrank":
            raise ConfigError(f"--lowrank-form {self.lowrank_form} applies to --method lowrank, not {self.method!r}")
        if self.method not in LOWRANK_METHODS:
            return
        targets = [n for n in ("rank_ratio", "target_params", "target_macs", "target_latency")
                   if getattr(self, n) is not None]
        if len(targets) != 1:
            raise ConfigError(f"--method {self.method} needs exactly one of --rank-ratio, --target-params, "
                              f"--target-macs, --target-latency (got {len(targets) or 'none'})")
        if self.rank_ratio == 0:
            raise ConfigError("rank_ratio must be > 0")
        if self.lowrank_form == "auto" and self.rank_ratio is not None:
            raise ConfigError("--lowrank-form auto lets the allocation choose each layer's form by its measured "
                              "damage per cost: give --target-params / --target-macs / --target-latency, or "
                              "choose --lowrank-form pair | tucker2 with --rank-ratio")
        if self.method == "lowrank-sparse" and self.sparse_structure == "unstructured":
            if self.objective == "latency" or targets[0] in ("target_macs", "target_latency"):
                raise ConfigError("an unstructured S is exported as a dense-stored parallel branch + Add, slower "
                                  "than the dense layer: use --sparse-structure rows (merged into the factor "
                                  "pair), or --objective size with --rank-ratio / --target-params")

    @property
    def nm_pattern(self) -> tuple[int, int]:
        """(N, M) parsed from ``nm``: keep N of every M consecutive input weights."""
        return parse_nm(self.nm)


@dataclass(frozen=True)
class ValidateConfig:
    """How the original and compressed models are compared in onnxruntime, and the CI gates."""

    labels: str | None = field(
        default=None, metadata=_opt("name of the labels array in the data .npz (enables accuracy)")
    )
    max_accuracy_drop: float | None = field(
        default=None, metadata=_opt("gate: largest allowed top-1 drop, in percentage points")
    )
    min_agreement: float | None = field(
        default=None, metadata=_opt("gate: smallest allowed top-1 agreement with the original (0..1)")
    )
    min_speedup: float | None = field(
        default=None, metadata=_opt("gate: smallest allowed latency speed-up (original / compressed)")
    )
    eval_samples: int | None = field(
        default=None, metadata=_opt("evaluate on at most N samples (evenly spaced)")
    )
    latency_batch_sizes: tuple[int, ...] = field(
        default=(1,), metadata=_opt("batch sizes timed in the latency A/B (comma-separated)")
    )
    latency_rounds: int = field(default=30, metadata=_opt("A/B rounds per batch size"))
    latency_threads: int = field(
        default=0, metadata=_opt("onnxruntime intra-op threads while timing (0 = all cores)")
    )
    platform: str | None = field(
        default=None, metadata=_opt("also run both models in onnxruntime for this platform (emulated with qemu) "
                                    "and compare outputs with this machine's run; outputs only, never speed",
                                    PLATFORMS)
    )
    platform_samples: int = field(default=32, metadata=_opt("samples run under emulation by --platform"))

    def __post_init__(self) -> None:
        _check_finite(self)
        check_threads("latency_threads", self.latency_threads)
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise ConfigError("max_accuracy_drop is in percentage points and must be >= 0")
        if self.min_agreement is not None:
            _check_range("min_agreement", self.min_agreement, 0.0, 1.0)
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise ConfigError("min_speedup must be > 0 (1.0 = as fast as the original)")
        if not self.latency_batch_sizes or min(self.latency_batch_sizes) < 1:
            raise ConfigError("latency_batch_sizes must list batch sizes >= 1")
        if self.latency_rounds < 1 or self.latency_threads < 0:
            raise ConfigError("latency_rounds must be >= 1 and latency_threads >= 0")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ConfigError("eval_samples must be >= 1")
        if self.platform is not None:
            _check_choice("platform", self.platform, PLATFORMS)
        if self.platform_samples < 1:
            raise ConfigError("platform_samples must be >= 1")

    def timing_batch(self, batch: int | None) -> "ValidateConfig":
        """These settings with ``batch`` among the latency batch sizes (the batch a latency target was met at is
        also the one the validation times)."""
        if not batch or batch in self.latency_batch_sizes:
            return self
        return dataclasses.replace(self, latency_batch_sizes=(*self.latency_batch_sizes, batch))


@dataclass(frozen=True)
class CheckConfig:
    """What ``check`` needs: the method (its declines differ, e.g. N:M needs Cin divisible by M) and the
    exclusions. No targets: ``check`` lists what the method could do, it does not plan."""

    method: str = field(default="sparse", metadata=_opt("method to check for", tuple(METHODS)))
    nm: str = field(default="2:4", metadata=_opt("N:M pattern for --method nm"))
    conv_groups: int = field(default=2, metadata=_opt("--method grouped: blocks per Conv pair"))
    exclude: tuple[str, ...] = field(default=(), metadata=_opt("leave dense: node names, name globs or op types"))

    def __post_init__(self) -> None:
        _check_choice("method", self.method, tuple(METHODS))
        if self.nm != "2:4" and self.method != "nm":
            raise ConfigError(f"--nm applies to --method nm, not {self.method!r}")
        if self.conv_groups != 2 and self.method != "grouped":
            raise ConfigError(f"--conv-groups applies to --method grouped, not {self.method!r}")
        if self.conv_groups < 2:
            raise ConfigError(f"conv_groups must be >= 2, got {self.conv_groups}")
        parse_nm(self.nm)

    @property
    def nm_pattern(self) -> tuple[int, int]:
        return parse_nm(self.nm)


def parse_nm(text: str) -> tuple[int, int]:
    """(N, M) from "N:M": keep N of every M consecutive input weights."""
    try:
        n_str, m_str = text.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise ConfigError(f"--nm must look like 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"--nm N:M needs 0 < N < M, got {text!r}")
    return n, m


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_threads(name: str, value: int) -> None:
    limit = THREADS_PER_CORE_MAX * available_cores()
    if not 0 <= value <= limit:
        raise ConfigError(f"{name} must be between 0 (all cores) and {limit} ({THREADS_PER_CORE_MAX}x the "
                          f"{available_cores()} cores here), got {value}")


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed must be in [0, {SEED_MAX}], got {seed}")


def _check_finite(config) -> None:
    """Every float setting is a finite number (NaN would pass every comparison-based check unnoticed)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


def default_of(name: str):
    """The default of the ``CompressConfig`` setting ``name``."""
    return next(f.default for f in dataclasses.fields(CompressConfig) if f.name == name)


def _check_applies(config: "CompressConfig") -> None:
    for name, methods in APPLIES_TO.items():
        default = default_of(name)
        if name == "objective" and config.quantize == "int8":
            continue  # the int8 stage has an objective of its own (layers kept float where int8 is slower)
        if name == "latency_batch" and config.quantize == "int8" and \
                config.objective == "latency":
            continue  # ... timed at this batch
        if getattr(config, name) != default and config.method not in methods:
            also = " (or with --quantize int8)" if name == "objective" else ""
            raise ConfigError(f"--{name.replace('_', '-')} applies to --method {' | '.join(methods)}{also}, not "
                              f"{config.method!r}; drop it or choose one of those methods")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}{extra}")


def _check_range(name: str, value: float, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and lo <= value
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{name} must be in [{lo}, {hi}{bracket}, got {value!r}")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a TOML/JSON value to the field's declared type, or raise ConfigError."""
    hints = typing.get_type_hints(cls)
    target = hints[name]
    args = typing.get_args(target)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty")
    base = next((a for a in args if a is not type(None)), target) if optional else target
    origin = typing.get_origin(base)
    try:
        if origin is tuple:
            (item_type, *_) = typing.get_args(base)
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(item_type(v.strip() if isinstance(v, str) else v) for v in items if v != "")
        if base is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base in (int, float) and isinstance(value, bool):  # TOML true is not the number 1
            raise TypeError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be of type {getattr(base, '__name__', base)}, got {value!r}") from None


def from_mapping(cls: type, mapping: Mapping[str, Any], where: str = "config"):
    """Build ``cls`` from a dict, rejecting unknown keys (with a did-you-mean suggestion)."""
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in mapping.items():
        name = key.replace("-", "_")
        if name not in names:
            hint = difflib.get_close_matches(name, names, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown key {key!r} in {where}{extra}")
        kwargs[name] = _coerce(cls, name, value)
    return cls(**kwargs)


def load_toml(path: str | Path) -> tuple[CompressConfig, ValidateConfig]:
    """Read a TOML file: top-level keys are CompressConfig fields, ``[validate]`` holds ValidateConfig."""
    path = Path(path)
    data = _read_toml(path)
    validate = data.pop("validate", {})
    if not isinstance(validate, dict):
        raise ConfigError(f"[validate] in {path} must be a table")
    return (from_mapping(CompressConfig, _flatten_sections(data, path), str(path)),
            from_mapping(ValidateConfig, validate, f"{path} [validate]"))


def toml_settings(path: str | Path) -> set[str]:
    """The ``CompressConfig`` settings a TOML file names (``[validate]`` aside), given or not at their defaults."""
    data = _read_toml(Path(path))
    data.pop("validate", None)
    return set(_flatten_sections(data, Path(path)))


def _read_toml(path: Path) -> dict:
    if path.exists() and not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file (a folder, FIFO or device); give a .toml file")
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _flatten_sections(data: dict, path: Path) -> dict:
    """``[refine] epochs = 10`` is ``refine_epochs = 10``: a table names the prefix of the settings it holds
    (``[refine]``, ``[distill]``, ``[admm]``, ``[sensitivity]``, ``[latency]``, ...); a key that is not a
    setting once prefixed is refused like any unknown key."""
    flat = {key: value for key, value in data.items() if not isinstance(value, dict)}
    for section, table in data.items():
        if not isinstance(table, dict):
            continue
        for name, value in table.items():
            full = f"{section}_{name}"
            if full in flat:
                raise ConfigError(f"{path}: {full} is set twice (as {full} and as [{section}] {name})")
            flat[full] = value
    return flat


def config_hash(*configs: Any) -> str:
    """sha256 of the canonical JSON of the settings that change the output model."""
    blob = json.dumps([dataclasses.asdict(c) for c in configs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
