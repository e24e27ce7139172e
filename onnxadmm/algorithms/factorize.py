"""Solve one layer under a rank constraint: W ≈ A·B (low-rank), W ≈ A·B + S (low-rank + sparse), or a
Conv's Tucker-2 form W ≈ A·(core ×₁ Q) (B = core ×₁ Q: its input channels pass through r₁ < Cin first).

Layer objective as elsewhere: f(W, b) = ‖σ(W x̂ + b) − σ(W₀x + b₀)‖² (``activation``) or
‖W x̂ + b − (W₀x + b₀)‖² (``linear``), on the sampled patches. Single-group layers only (G = 1).

* Whitened low-rank (the data metric, not ‖W − L‖): with Σ = Cov(x̂), C = Cov(y, x̂),
      min_{rank L ≤ r} ‖L x̂ + b − y‖²  ⇔  min ‖L Σ^½ − C Σ^-½‖²  ⇒  L = P_r(C Σ^-½) Σ^-½,
  exact for the linear loss (reduced-rank regression; with x̂ = x, C Σ^-½ = W₀ Σ^½: the SVD of W·H^½), and
  its error for every r comes from one SVD: e(r) = (Var y − Σ_{i≤r} s_i²) / E‖y‖².
  With few samples per input it fits the calibration noise, so the start is the rank-r ridge toward W₀,
      min_{rank L ≤ r} E‖L x̂ + b − y‖² + λ‖L − W₀‖²   (the same formula on Σ + λI, C + λW₀),
  λ chosen on held-out calibration samples; λ → ∞ is the truncated SVD of W₀ (``whitened_start``).
* ADMM (``admm.py``) with the Z-step of ``projections/lowrank.py`` — rank r started from the whitened
  solution, L + S from W₀ (the whitened solution stays the fallback); for the activation loss the W-step
  goes through σ.
* Refit on the factored form: B (the row space of L) is kept, and [A | S] with S's support fixed is a
  linear layer on the inputs [B x̂ ; x̂]; it is refit exactly (least squares) and, for the activation
  loss, by masked descent through σ.
Row-sparse S merges into the pair: A·B + E_I S_I = [A | E_I]·[B ; S_I] (rank r + c, c = |I|).
* Tucker-2 (r, r₁): the start is the HOOI projection of the whitened rank-r solution, ADMM's Z-step the
  HOOI projection (``projections/lowrank.Tucker2``); Q and B = core ×₁ Q come from the final Z, and A is
  refit as for the pair (B fixed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .admm import RIDGE_STRENGTHS, AdmmSettings, admm_activation, admm_linear, refit_on_support
from .problem import LayerProblem
from .projections.lowrank import (LowRankSparse, Rank, Tucker2, input_mode, sparse_projection, truncated_svd,
                                  tucker2_bases)
from .refit import Moments, bias_for, moments, split_moments

WHITENING_DAMPING = 1e-4  # ridge added to Σ (relative to its mean eigenvalue) before Σ^-½


@dataclass(frozen=True)
class RankSpec:
    """What a layer is factorized to: rank r of L, and S of ``sparse_count`` rows / channels / entries."""

    rank: int
    sparse_structure: str | None = None  # None | rows | columns | unstructured
    sparse_count: int = 0
    width: int = 1  # columns per input channel (kh·kw) for columns-sparse S and Tucker-2
    input_rank: int = 0  # Tucker-2: r₁ input channels after a 1×1 Conv (0: the plain pair)


@dataclass
class Factors:
    """W = left·right + sparse; ``left`` (Cout, k), ``right`` (k, d), ``sparse`` (Cout, d) or None
    (only unstructured / column S stay a separate branch; rows are merged into the pair)."""

    left: torch.Tensor
    right: torch.Tensor
    sparse: torch.Tensor | None
    rank: int  # r of the low-rank part
    merged_rows: int = 0  # c rows of S inside the pair (k = r + c)
    input_basis: torch.Tensor | None = None  # Tucker-2: Q (r₁, Cin) orthonormal rows; ``right`` = core ×₁ Q

    @property
    def input_rank(self) -> int:
        """r₁ of a Tucker-2 form, 0 for a pair."""
        return 0 if self.input_basis is None else self.input_basis.shape[0]

    @property
    def inner(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        w = self.left @ self.right
        return w if self.sparse is None else w + self.sparse

    @property
    def nonzero(self) -> int:
        if self.input_basis is not None:  # the exported core (k, r₁·taps) and Q, not B
            taps = self.right.shape[1] // self.input_basis.shape[1]
            count = int((self.left != 0).sum()) + self.inner * self.input_rank * taps
            return count + int((self.input_basis != 0).sum())
        count = int((self.left != 0).sum()) + int((self.right != 0).sum())
        return count + (0 if self.sparse is None else int((self.sparse != 0).sum()))


class RidgeReducedRank:
    """The best rank-r layer in the data metric with a ridge toward the anchor A (W₀):
        min_{rank L ≤ r} E‖L x̂ + b − y‖² + λ‖L − A‖²  ⇒  L = P_r(C' Σ'^-½) Σ'^-½,  Σ' = Σ + λI, C' = C + λA,
    for any λ from one eigendecomposition of Σ (Σ + λI has the same eigenvectors). Group 0 only."""

    def __init__(self, stats: Moments, anchor: torch.Tensor | None = None):
        eigenvalues, self.basis = torch.linalg.eigh(stats.sigma[0])
        self.eigenvalues = eigenvalues.clamp_min(0)
        self.cross, self.mean_eigenvalue = stats.cross[0], stats.mean_eigenvalue
        self.anchor = None if anchor is None else anchor[0].double()

    def solve(self, rank: int, strength: float = 0.0, damping: float = WHITENING_DAMPING
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A (R, r), B (r, d), s) with A·B = L for λ = ``strength`` × the mean eigenvalue of Σ; s the singular
        values of C' Σ'^-½. ``damping`` (relative to the mean eigenvalue of Σ') keeps Σ'^-½ finite."""
        lam = strength * self.mean_eigenvalue
        eigenvalues = self.eigenvalues + lam
        eigenvalues = eigenvalues + damping * float(eigenvalues.mean())
        inv_sqrt = (self.basis / eigenvalues.sqrt()) @ self.basis.T
        cross = self.cross if lam == 0 or self.anchor is None else self.cross + lam * self.anchor
        u, s, vh = torch.linalg.svd(cross @ inv_sqrt, full_matrices=False)
        r = min(rank, s.shape[0])
        return (u[:, :r] * s[:r]).float(), (vh[:r] @ inv_sqrt).float(), s


def whitened_low_rank(stats: Moments, rank: int, damping: float = WHITENING_DAMPING
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (R, r), B (r, d), s) with A·B = P_r(C Σ^-½) Σ^-½ for group 0; s the singular values of C Σ^-½."""
    return RidgeReducedRank(stats).solve(rank, 0.0, damping)


def whitened_start(problem: LayerProblem, stats: Moments, rank: int, loss: str) -> tuple[torch.Tensor, str]:
    """The rank-r start L (R, d) and how it was chosen: ``RidgeReducedRank`` toward W₀ with the strength
    among ``RIDGE_STRENGTHS`` or ∞ (the truncated SVD of W₀) that gives the least ``loss`` error on the
    held-out calibration samples, then solved on all samples (``stats``: their moments). Without held-out
    samples: λ = 0."""
    held = problem.held_out()
    if held is None:
        a, b, _ = whitened_low_rank(stats, rank)
        return a @ b, "whitened"
    fit_stats, _ = split_moments(problem, held, whole=stats)
    check = problem.subset(held)
    on_fit = RidgeReducedRank(fit_stats, problem.w0)

    def held_error(low: torch.Tensor) -> float:
        bias = bias_for(fit_stats, low[None]) if problem.fit_bias else problem.b0
        return check.relative_error(low[None], bias, loss)

    errors = {}
    for strength in RIDGE_STRENGTHS:
        a, b, _ = on_fit.solve(rank, strength)
        errors[strength] = held_error(a @ b)
    u, v = truncated_svd(problem.w0, rank)
    svd = (u @ v)[0]
    errors[float("inf")] = held_error(svd)
    best = min(errors, key=lambda k: (errors[k], -k))
    if best == float("inf"):
        return svd, "truncated SVD of W0 (held-out choice)"
    a, b, _ = RidgeReducedRank(stats, problem.w0).solve(rank, best)
    return a @ b, f"whitened, ridge {best:g} (held-out choice)"


def rank_error_curve(stats: Moments) -> torch.Tensor:
    """Linear-metric relative error of the best rank-r layer for r = 0..min(R, d) (index r)."""
    _, _, s = whitened_low_rank(stats, 1)
    explained = torch.cat([torch.zeros(1, dtype=s.dtype), torch.cumsum(s ** 2, 0)])
    return ((stats.var_y - explained).clamp_min(0) / stats.energy_y).float()


def solve_factored(problem: LayerProblem, spec: RankSpec, loss: str, solver: str,
                   settings: AdmmSettings) -> tuple[torch.Tensor, torch.Tensor, Factors, dict]:
    """Returns (W (1, R, d), b, factors, ADMM history) for ``spec`` on ``problem``."""
    if problem.groups != 1:
        raise ValueError("factorization is for single-group layers")
    w0, b0 = problem.w0, problem.b0
    if solver == "magnitude" and spec.input_rank:  # plain HOOI of W, no data
        return (*_tucker_finish(problem, w0, spec, refit=None), {})
    if solver == "magnitude":  # plain truncated SVD of W, no data
        a, b = truncated_svd(w0, spec.rank)
        low = torch.bmm(a, b)
        s = _sparse(spec)(w0 - low) if spec.sparse_structure else None
        return (*_finish(problem, a[0], b[0], None if s is None else s[0], b0, spec, refit=None), {})
    stats = moments(problem)
    low, chosen = whitened_start(problem, stats, spec.rank, loss)
    start = low[None]
    history: dict = {"start": chosen}
    if spec.input_rank:
        start = Tucker2(spec.rank, spec.input_rank, spec.width)(start)
        history["start"] = f"{chosen}, then Tucker-2 (HOOI)"
    if solver == "refit" or (spec.sparse_structure is None and loss == "linear" and not spec.input_rank):
        z = start  # the whitened solution is exact for the linear loss
    else:
        if spec.input_rank:
            project = Tucker2(spec.rank, spec.input_rank, spec.width)
        elif spec.sparse_structure is None:
            project = Rank(spec.rank)
        else:
            project = LowRankSparse(spec.rank, _sparse(spec))
        # With an S part ADMM starts from W₀ (its first Z-step is the SVD initialization L = P_r(W₀),
        # S = P_S(W₀ − L)): from the whitened L alone, S starts at 0 and, for S alone (r = 0), W = 0 puts
        # every ReLU output with b₀ < 0 where the gradient is zero — the descent never leaves it.
        admm_start = start if spec.sparse_structure is None else w0
        if loss == "linear":
            z, trace = admm_linear(stats, admm_start, project, settings)
        else:
            z, _, trace, _ = admm_activation(problem, admm_start, b0, project, settings)
        history = {**history, **trace.as_dict()}
    result = _from_z(problem, z, spec, loss, settings)
    if z is not start:  # never worse than the whitened closed form, refit the same way
        fallback = _from_z(problem, start, spec, loss, settings)
        if problem.relative_error(fallback[0], fallback[1], loss) < problem.relative_error(result[0], result[1], loss):
            result, history = fallback, {**history, "kept": "whitened start (ADMM ended worse)"}
    return (*result, history)


def _from_z(problem: LayerProblem, z: torch.Tensor, spec: RankSpec, loss: str, settings: AdmmSettings):
    """Split Z into L (+ S), factor L, refit: (W, b, factors)."""
    if spec.input_rank:
        return _tucker_finish(problem, z, spec, refit=(loss, settings))
    if spec.sparse_structure is None:
        low, s = z, None
    else:
        low, s = LowRankSparse(spec.rank, _sparse(spec)).split(z)
    a, b = truncated_svd(low, spec.rank)
    return _finish(problem, a[0], b[0], None if s is None else s[0], problem.b0, spec, refit=(loss, settings))


def _tucker_finish(problem: LayerProblem, z: torch.Tensor, spec: RankSpec, refit
                   ) -> tuple[torch.Tensor, torch.Tensor, Factors]:
    """Q and U of Z's Tucker-2 projection; B = Uᵀ·Z ×₁ QᵀQ (rows in Q's span), A = U refit with B fixed."""
    u, q = tucker2_bases(z, spec.rank, spec.input_rank, spec.width)
    b = (u.T @ input_mode(z.double(), q, spec.width)[0]).float()
    a, bias = u.float(), problem.b0
    if refit is not None:
        a, _, bias = _refit_factors(problem, a, b, None, *refit)
    factors = Factors(a, b, None, a.shape[1], input_basis=q.float())
    return factors.dense()[None], bias, factors


def _sparse(spec: RankSpec):
    return sparse_projection(spec.sparse_structure, spec.sparse_count, spec.width)


def _finish(problem: LayerProblem, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor | None, bias: torch.Tensor,
            spec: RankSpec, refit) -> tuple[torch.Tensor, torch.Tensor, Factors]:
    """Refit [A | S] on [B x̂ ; x̂] (when ``refit`` is (loss, settings)), then build the exported factors."""
    if refit is not None:
        a, s, bias = _refit_factors(problem, a, b, s, *refit)
    if s is not None and spec.sparse_structure == "rows":
        rows = torch.nonzero(s.pow(2).sum(1) > 0).reshape(-1)
        selector = torch.zeros(a.shape[0], len(rows))
        selector[rows, torch.arange(len(rows))] = 1.0
        factors = Factors(torch.cat([a, selector], 1), torch.cat([b, s[rows]], 0), None, a.shape[1], len(rows))
    else:
        factors = Factors(a, b, s, a.shape[1])
    return factors.dense()[None], bias, factors


def _refit_factors(problem: LayerProblem, a, b, s, loss: str, settings: AdmmSettings):
    """Least squares (and descent through σ) of [A | S] with B and S's support fixed."""
    x = problem.x_hat[:, 0, :]  # (P, d)
    inputs = [x @ b.T] + ([x] if s is not None else [])
    start = torch.cat([a] + ([s] if s is not None else []), 1)
    support = torch.cat([torch.ones_like(a, dtype=torch.bool)] + ([s != 0] if s is not None else []), 1)
    augmented = dataclasses.replace(problem, x_hat=torch.cat(inputs, 1)[:, None, :], w0=start[None])
    w, bias = refit_on_support(augmented, loss, settings, support[None])
    w = w[0]
    r = a.shape[1]
    return w[:, :r], (w[:, r:] if s is not None else None), bias
