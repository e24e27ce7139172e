"""Solve one layer: choose the constraint set from the structure, run the solver, refit, measure.

Solvers: ``admm`` (this package's method), and the baselines ``magnitude`` (keep the largest |w|, no
data) and ``refit`` (magnitude support + exact least-squares refit, no ADMM).
Errors are relative: ‖prediction − target‖² / ‖target‖² on the layer's sampled patches, in the metric
of the chosen loss (after the activation, or before it for the linear loss).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .admm import (MODEL_FIT, ActivationObjective, AdmmSettings, admm_activation, admm_linear, refit_activation,
                   refit_bias_activation, refit_on_support)
from .factorize import Factors, RankSpec, solve_factored
from .problem import LayerProblem
from .projections.grid import IntegerGrid, output_error_scales
from .projections.groups import ChannelBlock, ChannelBlocks, ChannelsThenElements, Kernels
from .projections.sparse import NM, HardThreshold, SoftThreshold, TopK, keep_count
from .refit import bias_for, input_moments, masked_refit, moments
from .rowblocks import row_blocks, solve_in_row_blocks

PENALTY_RHO = 1.0  # fixed ρ, relative to the layer's curvature, for the penalty methods (Kiaee et al.)
PENALTY_SEARCH_STEPS = 10
PENALTY_TOLERANCE = 0.005


@dataclass(frozen=True)
class Structure:
    """What the layer is projected onto.

    ``kind``: unstructured | nm | l1 | l0 (element sparsity at ``sparsity``); kernels (keep whole
    (output, input-channel) kernels, a fraction ``sparsity`` removed); channels (in each of ``blocks``,
    one per channel group read, keep k input channels of ``width`` columns each, or pinned ones); l0-l21 (those
    channels, then element sparsity ``sparsity`` inside them); lowrank / lowrank-sparse (W ≈ A·B (+ S) as
    ``rank`` says, see ``factorize.py``); dense / mask (refit only, on all weights or a fixed support);
    grid (per-output-channel symmetric integers of ``bits`` bits, scales chosen by the output error; with
    ``keep_zeros`` the zeros of W₀ stay zero: the grid intersected with a sparse method's support).
    """

    kind: str
    sparsity: float = 0.0
    n: int = 2
    m: int = 4
    taps: int = 1
    blocks: tuple[ChannelBlock, ...] | None = None  # channels / l0-l21: which input channels each group keeps
    width: int = 1
    mask: torch.Tensor | None = field(default=None, compare=False)  # mask: a fixed support (G, R, d)
    rank: RankSpec | None = None  # lowrank / lowrank-sparse: rank of L and the form of S
    bits: int = 8  # grid: integer width
    keep_zeros: bool = False  # grid: W₀'s zeros stay zero
    keep: int | None = None  # unstructured / kernels: entries (kernels) kept, instead of what ``sparsity`` implies

    def projection(self, w0: torch.Tensor):
        """The Z-step of a constraint set (the penalties build theirs in the μ search)."""
        if self.kind == "unstructured":
            return TopK(keep_count(w0.numel(), self.sparsity) if self.keep is None else self.keep)
        if self.kind == "nm":
            return NM(self.n, self.m, self.taps)
        if self.kind == "kernels":
            return Kernels(keep_count(w0.numel() // self.taps, self.sparsity) if self.keep is None else self.keep,
                           self.taps)
        if self.kind == "channels":
            return ChannelBlocks(self.blocks, self.width)
        if self.kind == "l0-l21":
            total = w0.shape[-1] // self.width
            kept = ChannelBlocks(self.blocks, self.width).kept_channels(total) * (w0.numel() // total)
            return ChannelsThenElements(0, self.width, keep_count(kept, self.sparsity), blocks=self.blocks)
        raise ValueError(f"structure {self.kind!r} has no fixed projection")


@dataclass
class LayerSolution:
    weight: torch.Tensor  # (G, R, d)
    bias: torch.Tensor  # (Cout,)
    mask: torch.Tensor
    error_dense: float  # original weights on the compressed model's inputs
    error_projected: float  # magnitude projection of the original weights (no data)
    error_final: float
    history: dict = field(default_factory=dict)
    penalty_mu: float | None = None
    factors: Factors | None = None  # lowrank / lowrank-sparse: the exported pair (and S branch)
    scales: torch.Tensor | None = None  # grid: per-output-channel scales (G, R); weight = scale · integer

    @property
    def sparsity(self) -> float:
        return 1.0 - int(torch.count_nonzero(self.mask)) / max(self.mask.numel(), 1)


def solve_layer(problem: LayerProblem, structure: Structure, loss: str = "activation",
                solver: str = "admm", settings: AdmmSettings = AdmmSettings()) -> LayerSolution:
    """The layer's solution; in blocks of output rows where its solve would exceed ``settings.layer_bytes``
    and its constraint allows (``rowblocks.py``)."""
    if loss == "activation" and problem.activation is not None:  # a chain that only shifts (bias, residual)
        linear = problem.shift_free()                              # is solved as the linear problem it is
        problem, loss = (linear, "linear") if linear is not problem else (problem, loss)
    blocks = row_blocks(problem, structure, settings)
    if len(blocks) > 1:
        return solve_in_row_blocks(problem, structure, blocks, loss,
                                   lambda part, kind, inner: _solve(part, kind, loss, solver, inner), settings)
    return _solve(problem, structure, loss, solver, settings)


def _solve(problem: LayerProblem, structure: Structure, loss: str, solver: str,
           settings: AdmmSettings) -> LayerSolution:
    w0, b0 = problem.w0, problem.b0
    if structure.kind in ("lowrank", "lowrank-sparse"):
        return _solve_factored(problem, structure, loss, solver, settings)
    if structure.kind == "grid":
        return _solve_grid(problem, structure, loss, solver, settings)
    magnitude_w = _magnitude(w0, structure)
    penalty_mu = None
    history: dict = {}
    if solver == "magnitude":
        w, b = magnitude_w, b0
    elif solver == "refit" and structure.kind in ("dense", "mask"):
        w, b = refit_on_support(problem, "linear", settings, structure.mask)
    elif solver == "refit":
        stats = moments(problem)
        mask = magnitude_w != 0
        w = masked_refit(stats, magnitude_w, mask)
        b = bias_for(stats, w) if problem.fit_bias else b0
    elif structure.kind in ("dense", "mask"):
        w, b = refit_on_support(problem, loss, settings, structure.mask)
    elif structure.kind in ("l1", "l0"):
        w, b, history, penalty_mu = _penalty_search(problem, structure, loss, settings)
    else:
        if structure.kind == "unstructured":
            settings = dataclasses.replace(settings, model_fit=MODEL_FIT)
        w, b, history = _admm(problem, structure.projection(w0), loss, settings, rho_fixed=False)
    error_dense, error_projected, error_final = problem.relative_errors([(w0, b0), (magnitude_w, b0), (w, b)], loss)
    return LayerSolution(weight=w, bias=b, mask=w != 0, error_dense=error_dense, error_projected=error_projected,
                         error_final=error_final, history=history, penalty_mu=penalty_mu)


def _solve_factored(problem: LayerProblem, structure: Structure, loss: str, solver: str,
                    settings: AdmmSettings) -> LayerSolution:
    w0, b0 = problem.w0, problem.b0
    plain, *_ = solve_factored(problem, structure.rank, loss, "magnitude", settings)
    w, b, factors, history = solve_factored(problem, structure.rank, loss, solver, settings)
    error_dense, error_projected, error_final = problem.relative_errors([(w0, b0), (plain, b0), (w, b)], loss)
    return LayerSolution(weight=w, bias=b, mask=w != 0, error_dense=error_dense, error_projected=error_projected,
                         error_final=error_final, history=history, factors=factors)


GRID_STALL_ITERATIONS = 5  # the grid's Z stops improving long before ‖W − Z‖ settles (docs/INT8.md)


def _solve_grid(problem: LayerProblem, structure: Structure, loss: str, solver: str,
                settings: AdmmSettings) -> LayerSolution:
    """Weights onto the integer grid. Scales by the output error (``output_error_scales``); then ADMM
    with the grid as its Z-step (solver ``admm``) or plain rounding (``magnitude``: round to nearest, the
    ablation). ADMM's result is kept only where it beats rounding on the layer objective, both with the
    least-squares bias. The weights end on the grid exactly; the bias is then corrected: least squares (the
    mean shift), then, for the activation loss, descent through the activation on the bias alone."""
    w0, b0 = problem.w0, problem.b0
    stats = moments(problem) if loss == "linear" else input_moments(problem)  # (ADMM on the linear loss needs C)
    support = (w0 != 0) if structure.keep_zeros else None
    scales = output_error_scales(w0, stats.sigma, structure.bits, support)
    project = IntegerGrid(scales, structure.bits, support)
    rounded = project(w0)
    history: dict = {}

    def least_squares_bias(w: torch.Tensor) -> torch.Tensor:  # the mean shift
        return bias_for(stats, w) if problem.fit_bias else b0

    w = rounded
    settings = dataclasses.replace(settings, stall_iterations=GRID_STALL_ITERATIONS)
    objective = None
    if solver == "admm":
        if loss == "linear":
            z, trace = admm_linear(stats, w0, project, settings)
        else:
            z, _, trace, objective = admm_activation(problem, w0, b0, project, settings)
        z = project(z)  # exactly on the grid
        history = trace.as_dict()
        solved, plain = problem.relative_errors([(z, least_squares_bias(z)), (rounded, least_squares_bias(rounded))],
                                                loss)
        if solved < plain:
            w = z
    b = least_squares_bias(w)
    if loss == "activation" and problem.fit_bias:
        b = refit_bias_activation(objective or ActivationObjective(problem, settings), w, b, settings.refit_steps)
    error_dense, error_projected, error_final = problem.relative_errors([(w0, b0), (rounded, b0), (w, b)], loss)
    return LayerSolution(weight=w, bias=b, mask=w != 0, error_dense=error_dense, error_projected=error_projected,
                         error_final=error_final, history=history, scales=scales)


def _magnitude(w0: torch.Tensor, structure: Structure) -> torch.Tensor:
    """The data-free projection at the same level (penalties: top-k at their target sparsity)."""
    if structure.kind == "dense":
        return w0
    if structure.kind == "mask":
        return w0 * structure.mask
    if structure.kind in ("l1", "l0"):
        return TopK(keep_count(w0.numel(), structure.sparsity))(w0)
    return structure.projection(w0)(w0)


def _admm(problem: LayerProblem, project, loss: str, settings: AdmmSettings, rho_fixed: bool):
    """ADMM onto ``project``'s set, then a refit on Z's support. On the linear loss: least squares, shrunk
    toward W₀ on the support by a strength chosen on held-out samples where there are enough
    (``refit_on_support``; with 500 images the plain least squares of a 1152-input layer fits their noise).
    Through the activation: a masked descent from Z."""
    if loss == "linear":
        stats = moments(problem)
        z, history = admm_linear(stats, problem.w0, project, settings, rho_fixed=rho_fixed,
                                 support_decides=not rho_fixed)
        if problem.held_out() is None:
            w = masked_refit(stats, z, z != 0)
            b = bias_for(stats, w) if problem.fit_bias else problem.b0
        else:
            w, b = refit_on_support(problem, "linear", settings, z != 0, stats)
        return w, b, history.as_dict()
    z, b, history, objective = admm_activation(problem, problem.w0, problem.b0, project, settings,
                                               rho_fixed=rho_fixed, support_decides=not rho_fixed)
    w, b = refit_activation(objective, z, b if problem.fit_bias else problem.b0, z != 0,
                            settings.refit_steps)
    return w, b, history.as_dict()


def _penalty_search(problem: LayerProblem, structure: Structure, loss: str, settings: AdmmSettings):
    """Kiaee-style penalty ADMM (fixed ρ); the penalty weight μ is bisected (on a log scale) until the
    layer reaches its allotted sparsity. Returns the trial closest to the target from above."""
    w0 = problem.w0
    settings = dataclasses.replace(settings, rho_init=PENALTY_RHO)
    scale = float(w0.pow(2).mean().sqrt()) or 1.0
    target = structure.sparsity
    lo, hi = math.log(1e-4 * scale), math.log(10 * scale)
    best = None
    for _ in range(PENALTY_SEARCH_STEPS):
        threshold = math.exp(0.5 * (lo + hi))
        project = _FixedThreshold(structure.kind, threshold)
        w, b, history = _admm(problem, project, loss, settings, rho_fixed=True)
        achieved = 1.0 - float((w != 0).float().mean())
        key = (achieved < target - PENALTY_TOLERANCE, abs(achieved - target))
        if best is None or key < best[0]:
            best = (key, w, b, history, project.mu)
        if abs(achieved - target) <= PENALTY_TOLERANCE:
            break
        if achieved < target:
            lo = math.log(threshold)
        else:
            hi = math.log(threshold)
    _, w, b, history, mu = best
    return w, b, history, mu


class _FixedThreshold:
    """Penalty prox with threshold τ at the fixed ADMM ρ; records the μ it implies:
    τ = μ/ρ for ℓ1 (soft threshold), τ = √(2μ/ρ) for ℓ0 (hard threshold)."""

    def __init__(self, kind: str, threshold: float):
        self.kind, self.threshold = kind, threshold
        self.mu = None

    def __call__(self, v: torch.Tensor, rho: float) -> torch.Tensor:
        if self.kind == "l1":
            self.mu = self.threshold * rho
            return SoftThreshold(self.mu)(v, rho)
        self.mu = self.threshold ** 2 * rho / 2
        return HardThreshold(self.mu)(v, rho)
