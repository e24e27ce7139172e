"""Low-rank and low-rank + sparse Z-steps on canonical weights V of shape (G, R, d) (Ma et al. 2019).

Rank r (per group, V_g reshaped R × d = Cout × Cin·kh·kw):
    P_r(V) = argmin_{rank L ≤ r} ‖V − L‖_F = U_r Σ_r V_rᵀ  (truncated SVD, Eckart–Young).
Tucker-2 rank (r, r₁) of a Conv (V_g as the tensor R × Cin × kh·kw; mode 0 = outputs, mode 1 = inputs):
    C = {V : mode-0 rank ≤ r, mode-1 rank ≤ r₁}, projected by HOOI (alternating truncated SVDs of the
    two unfoldings, started from the HOSVD; each sweep never increases ‖V − P(V)‖):
    P(V) = U Uᵀ · V ×₁ (Q Qᵀ),  U (R × r), Q (Cin × r₁) orthonormal.
Low-rank + sparse:  C = {L + S : rank L ≤ r, S ∈ 𝒮}, 𝒮 one of
    unstructured (‖S‖₀ ≤ k), rows (at most c whole output rows nonzero: they merge into the factor pair as
    rank r + c), columns (at most c whole input channels of ``width`` columns each).
The projection onto C has no closed form; it is approximated by block-coordinate descent
    L ← P_r(V − S),   S ← P_𝒮(V − L),
each step an exact minimization of ‖V − L − S‖² over one block, so the objective never increases.
It is warm-started from the previous Z-step's S (ADMM calls it repeatedly on slowly changing V);
the first call starts from S = P_𝒮(V − P_r(V)) (initialization from the SVD of W).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .groups import Filters, InputChannels
from .sparse import TopK


def truncated_svd(v: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A (G, R, r), B (G, r, d)) with A·B = P_r(V), singular values folded into A."""
    u, s, vh = torch.linalg.svd(v.double(), full_matrices=False)
    r = min(rank, s.shape[-1])
    return (u[..., :r] * s[..., None, :r]).to(v.dtype), vh[..., :r, :].to(v.dtype)


def low_rank(v: torch.Tensor, rank: int) -> torch.Tensor:
    """P_r(V): the best rank-``rank`` approximation of each group in the Frobenius norm."""
    a, b = truncated_svd(v, rank)
    return torch.bmm(a, b)


@dataclass(frozen=True)
class Rank:
    """C = {V : rank V_g ≤ r for every group}; projection = truncated SVD."""

    rank: int
    name: str = "lowrank"

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        return low_rank(v, self.rank)


def input_mode(v: torch.Tensor, basis: torch.Tensor, taps: int) -> torch.Tensor:
    """V ×₁ (Qᵀ Q): each group's input channels projected onto the rows of ``basis`` (r₁ × Cin, orthonormal)."""
    g, rows, d = v.shape
    t = v.reshape(g, rows, d // taps, taps)
    return torch.einsum("grct,bc,be->gret", t, basis, basis).reshape(g, rows, d)


def tucker2_bases(v: torch.Tensor, rank: int, input_rank: int, taps: int, sweeps: int = 2
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal (U (R × r), Q (r₁ × Cin, rows)) of the Tucker-2 projection of ``v`` (group 0) by HOOI."""
    w = v[0].double()
    rows, d = w.shape
    channels = d // taps
    unfold_in = w.reshape(rows, channels, taps).permute(1, 0, 2).reshape(channels, rows * taps)
    q = torch.linalg.svd(unfold_in, full_matrices=False)[0][:, :input_rank].T
    u = None
    for _ in range(sweeps):
        u = torch.linalg.svd(input_mode(w[None], q, taps)[0], full_matrices=False)[0][:, :rank]
        reduced = (u.T @ w).reshape(-1, channels, taps).permute(1, 0, 2).reshape(channels, -1)
        q = torch.linalg.svd(reduced, full_matrices=False)[0][:, :input_rank].T
    return u, q


def tucker2(v: torch.Tensor, rank: int, input_rank: int, taps: int) -> torch.Tensor:
    """P(V) onto Tucker-2 rank (r, r₁) (group 0; factorization is for single-group layers)."""
    u, q = tucker2_bases(v, rank, input_rank, taps)
    return (u @ u.T @ input_mode(v.double(), q, taps)[0])[None].to(v.dtype)


@dataclass(frozen=True)
class Tucker2:
    """C = {V : Tucker-2 rank ≤ (r, r₁)} of a Conv with ``taps`` = kh·kw columns per input channel."""

    rank: int
    input_rank: int
    taps: int
    name: str = "tucker2"

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        return tucker2(v, self.rank, self.input_rank, self.taps)


def sparse_projection(structure: str, count: int, width: int = 1):
    """P_𝒮 for ``structure`` rows | columns | unstructured with ``count`` rows / channels / entries."""
    if structure == "rows":
        return Filters(count)
    if structure == "columns":
        return InputChannels(count, width)
    if structure == "unstructured":
        return TopK(count)
    raise ValueError(f"unknown sparse structure {structure!r}")


def split_low_rank_sparse(v: torch.Tensor, rank: int, project_sparse, s_start: torch.Tensor | None = None,
                          iterations: int = 10, history: list[float] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, S) from block-coordinate descent on ‖V − L − S‖² (see the module docstring)."""
    s = project_sparse(v - low_rank(v, rank)) if s_start is None else project_sparse(s_start)
    low = low_rank(v - s, rank)
    for _ in range(iterations):
        s_new = project_sparse(v - low)
        low = low_rank(v - s_new, rank)
        if history is not None:
            history.append(float((v - low - s_new).double().pow(2).sum()))
        converged = bool(torch.equal(s_new != 0, s != 0))
        s = s_new
        if converged:
            break
    return low, s


@dataclass
class LowRankSparse:
    """Z-step onto {L + S : rank L ≤ r, S ∈ 𝒮}; keeps the last S as the next call's warm start."""

    rank: int
    project_sparse: object
    iterations: int = 10
    last_sparse: torch.Tensor | None = field(default=None, repr=False)
    name: str = "lowrank-sparse"

    def split(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, s = split_low_rank_sparse(v, self.rank, self.project_sparse, self.last_sparse, self.iterations)
        self.last_sparse = s
        return low, s

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        low, s = self.split(v)
        return low + s
