"""Least-squares refit of a layer on a fixed support, and the second moments it needs.

Linear metric: with Σ = Cov(x̂), C = Cov(y, x̂) (per group), μ the means, each output row solves
    min_w  w Σ wᵀ − 2 c wᵀ   subject to  w_j = 0 outside its support,
i.e. w_S = c_S Σ_SS⁻¹, and the bias is b = μ_y − W μ_x. Rows are solved together by Jacobi-
preconditioned conjugate gradients restricted to each row's support (exact in at most |S| steps); rows that
share one support, by one Cholesky factorization of Σ_SS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .problem import CHUNK_BYTES, LayerProblem


@dataclass
class Moments:
    """Second moments of one layer problem in float64: Σ (G,d,d), C (G,R,d), μx (G,d), μy (Cout);
    var_y = E‖y − μy‖², energy_y = E‖y‖² (so the relative error is (tr(WΣWᵀ) − 2tr(WCᵀ) + var_y) / energy_y)."""

    sigma: torch.Tensor
    cross: torch.Tensor
    mean_x: torch.Tensor
    mean_y: torch.Tensor
    var_y: float
    energy_y: float
    sums: _Sums | None = field(default=None, repr=False, compare=False)  # the raw sums they came from

    def relative_error(self, w: torch.Tensor) -> float:
        """Linear-metric relative error of W with its optimal bias."""
        w = w.double()
        quad = (torch.bmm(w, self.sigma) * w).sum() - 2 * (self.cross * w).sum()
        return max(float(quad) + self.var_y, 0.0) / self.energy_y

    @property
    def mean_eigenvalue(self) -> float:
        d = self.sigma.shape[-1]
        return float(torch.diagonal(self.sigma, dim1=-2, dim2=-1).sum() / (self.sigma.shape[0] * d)) or 1.0


@dataclass
class _Sums:
    """Raw sums over a set of patches (float64): n, Σx (G,d), Σy (Cout), Σxxᵀ (G,d,d), Σyxᵀ (G,R,d), Σ‖y‖²."""

    count: int
    x: torch.Tensor
    y: torch.Tensor
    xx: torch.Tensor
    yx: torch.Tensor
    yy: float

    def __sub__(self, other: "_Sums") -> "_Sums":
        return _Sums(self.count - other.count, self.x - other.x, self.y - other.y, self.xx - other.xx,
                     self.yx - other.yx, self.yy - other.yy)

    def __add__(self, other: "_Sums") -> "_Sums":
        return _Sums(self.count + other.count, self.x + other.x, self.y + other.y, self.xx + other.xx,
                     self.yx + other.yx, self.yy + other.yy)


def _sums(problem: LayerProblem) -> _Sums:
    """The sums over every patch, taken ``CHUNK_BYTES`` of float64 rows at a time."""
    count, g, d = problem.x_hat.shape
    rows = max(1, CHUNK_BYTES // (8 * g * (d + problem.y_ref.shape[1] // max(g, 1))))
    total = None
    for start in range(0, max(count, 1), rows):  # (one empty chunk when there are no patches)
        x = problem.x_hat[start:start + rows].double().transpose(0, 1)  # (G, p, d)
        y = problem.y_ref[start:start + rows].double()
        y_groups = y.reshape(x.shape[1], g, -1).transpose(0, 1)  # (G, p, R)
        part = _Sums(x.shape[1], x.sum(dim=1), y.sum(dim=0), torch.bmm(x.transpose(1, 2), x),
                     torch.bmm(y_groups.transpose(1, 2), x), float(y.pow(2).sum()))
        total = part if total is None else total + part
    return total


def _moments(sums: _Sums, fit_bias: bool, damping: float) -> Moments:
    count, g = max(sums.count, 1), sums.x.shape[0]
    if fit_bias:
        mean_x, mean_y = sums.x / count, sums.y / count
    else:
        mean_x, mean_y = torch.zeros_like(sums.x), torch.zeros_like(sums.y)
    sigma = _covariance(sums.xx, mean_x, count, damping)
    cross = sums.yx / count - mean_y.reshape(g, -1)[:, :, None] * mean_x[:, None, :]
    energy_y = sums.yy / count
    var_y = max(energy_y - float(mean_y.pow(2).sum()), 0.0)
    return Moments(sigma=sigma, cross=cross, mean_x=mean_x, mean_y=mean_y, var_y=var_y, energy_y=energy_y or 1.0,
                   sums=sums)


def _covariance(xx: torch.Tensor, mean_x: torch.Tensor, count: int, damping: float) -> torch.Tensor:
    """Σ = Σxxᵀ/n − μμᵀ, plus ``damping`` × its mean diagonal on the diagonal."""
    sigma = xx / count - mean_x[:, :, None] * mean_x[:, None, :]
    scale = torch.diagonal(sigma, dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-12)
    return sigma + damping * scale[:, None, None] * torch.eye(sigma.shape[-1], dtype=sigma.dtype)


def moments(problem: LayerProblem, damping: float = 1e-6) -> Moments:
    """Centered (or, without a free bias, uncentered) moments of x̂ and y over the sampled patches."""
    return _moments(_sums(problem), problem.fit_bias, damping)


@dataclass
class InputMoments:
    """What the grid's scales and the mean-shift bias need: Σ = Cov(x̂) (G,d,d) and the means μx (G,d), μy
    (Cout), in float64 (``bias_for`` takes these or ``Moments``)."""

    sigma: torch.Tensor
    mean_x: torch.Tensor
    mean_y: torch.Tensor


def input_moments(problem: LayerProblem, damping: float = 1e-6) -> InputMoments:
    """Σ and the means over every patch without the targets' cross moments: each chunk's Σxxᵀ is a float32
    product (relative rounding ~1e-6), summed across chunks in float64."""
    count, g, d = problem.x_hat.shape
    rows = max(1, CHUNK_BYTES // (4 * g * d))
    xx = torch.zeros(g, d, d, dtype=torch.float64)
    sum_x = torch.zeros(g, d, dtype=torch.float64)
    sum_y = torch.zeros(problem.y_ref.shape[1], dtype=torch.float64)
    for start in range(0, count, rows):
        x = problem.x_hat[start:start + rows].transpose(0, 1)  # (G, p, d) float32
        xx += torch.bmm(x.transpose(1, 2), x).double()
        sum_x += x.sum(dim=1, dtype=torch.float64)
        sum_y += problem.y_ref[start:start + rows].sum(dim=0, dtype=torch.float64)
    n = max(count, 1)
    if not problem.fit_bias:  # uncentered, as ``moments``
        sum_x, sum_y = torch.zeros_like(sum_x), torch.zeros_like(sum_y)
    mean_x, mean_y = sum_x / n, sum_y / n
    return InputMoments(_covariance(xx, mean_x, n, damping), mean_x, mean_y)


def split_moments(problem: LayerProblem, held: torch.Tensor, damping: float = 1e-6, whole: Moments | None = None
                  ) -> tuple[Moments, Moments]:
    """Moments of the patches outside ``held`` and of all patches, from one pass over the data
    (the held-out sums are subtracted from the full sums); ``whole``: ``moments(problem)`` when the caller has
    taken them (their sums are reused: no second pass)."""
    total = whole.sums if whole is not None and whole.sums is not None else _sums(problem)
    fit = total - _sums(problem.subset(held))
    return _moments(fit, problem.fit_bias, damping), _moments(total, problem.fit_bias, damping)


def ridge(stats: Moments, strength: float, anchor: torch.Tensor) -> Moments:
    """The moments of   min E‖y − Wx − b‖² + λ‖W − A‖²,  λ = ``strength`` × the mean eigenvalue of Σ:
    Σ → Σ + λI and C → C + λA, so the least squares on them shrinks toward the anchor A (λ → ∞ gives A)."""
    lam = strength * stats.mean_eigenvalue
    eye = torch.eye(stats.sigma.shape[-1], dtype=stats.sigma.dtype)
    return Moments(sigma=stats.sigma + lam * eye, cross=stats.cross + lam * anchor.double(), mean_x=stats.mean_x,
                   mean_y=stats.mean_y, var_y=stats.var_y, energy_y=stats.energy_y)


def bias_for(stats: "Moments | InputMoments", w: torch.Tensor) -> torch.Tensor:
    """b = μ_y − W μ_x, the optimal bias for weights W under the linear metric."""
    wx = torch.einsum("grd,gd->gr", w.double(), stats.mean_x).reshape(-1)
    return (stats.mean_y - wx).float()


REFIT_BLOCK_ELEMENTS = 1 << 22  # rows are solved in blocks of ≤ 4 M weights (32 MB per float64 work array)
DIRECT_SUPPORT = 4096  # a shared support up to this many inputs is solved by Cholesky (Σ_SS ≤ 128 MB in float64)


def masked_refit(stats: Moments, w: torch.Tensor, mask: torch.Tensor, iterations: int | None = None,
                 tolerance: float = 1e-10) -> torch.Tensor:
    """Exact least squares of every row on its support (``mask``), warm-started at ``w``. Rows are
    independent problems, so a large layer is solved a block of rows at a time (bounded working memory).
    An ungrouped layer whose rows share one support (removed input channels, or none) of at most
    DIRECT_SUPPORT inputs is solved directly instead: one Cholesky factorization of Σ_SS for every row."""
    if iterations is None:
        direct = _shared_support_refit(stats, mask)
        if direct is not None:
            return direct
    rows, d = w.shape[1], w.shape[2]
    block = max(1, REFIT_BLOCK_ELEMENTS // max(1, d * w.shape[0]))
    if rows <= block:
        return _masked_refit_rows(stats.sigma, stats.cross, w, mask, iterations, tolerance)
    return torch.cat([_masked_refit_rows(stats.sigma, stats.cross[:, i:i + block], w[:, i:i + block],
                                         mask[:, i:i + block], iterations, tolerance)
                      for i in range(0, rows, block)], dim=1)


def _shared_support_refit(stats: Moments, mask: torch.Tensor) -> torch.Tensor | None:
    """w_S = c_S Σ_SS⁻¹ for all rows at once, when there is one group, every row has the same support S and
    |S| ≤ DIRECT_SUPPORT; None otherwise, or when Σ_SS is not numerically positive definite."""
    if mask.shape[0] != 1:
        return None
    support = mask[0, 0].bool()
    count = int(support.sum())
    if count == 0 or count > DIRECT_SUPPORT or not bool((mask[0].bool() == support).all()):
        return None
    index = torch.nonzero(support).flatten()
    factor, info = torch.linalg.cholesky_ex(stats.sigma[0][index][:, index])
    if int(info) != 0:
        return None
    w = torch.zeros(mask.shape, dtype=torch.float32)
    w[0][:, index] = torch.cholesky_solve(stats.cross[0][:, index].T, factor).T.float()
    return w


def _masked_refit_rows(sigma: torch.Tensor, cross: torch.Tensor, w: torch.Tensor, mask: torch.Tensor,
                       iterations: int | None, tolerance: float) -> torch.Tensor:
    """Jacobi-preconditioned CG on w Σ_SS = c_S for the rows given (``cross`` and ``w`` of those rows)."""
    m = mask.double()
    w = w.double() * m
    diag = torch.diagonal(sigma, dim1=-2, dim2=-1)[:, None, :].clamp_min(1e-30)  # (G,1,d)
    residual = (cross - torch.bmm(w, sigma)) * m
    z = residual / diag
    p = z.clone()
    rz = (residual * z).sum(-1, keepdim=True)
    limit = iterations or int(min(mask.shape[-1], 500))
    start = rz.abs().max().item() or 1.0
    for _ in range(limit):
        q = torch.bmm(p, sigma) * m
        pq = (p * q).sum(-1, keepdim=True)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(1e-300), torch.zeros_like(pq))
        w = w + alpha * p
        residual = residual - alpha * q
        z = residual / diag
        rz_new = (residual * z).sum(-1, keepdim=True)
        if rz_new.abs().max().item() <= tolerance * start:
            break
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return (w * m).float()
