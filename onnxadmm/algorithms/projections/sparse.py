"""Element-sparsity Z-steps on canonical weights V of shape (G, R, d).

All are pure functions; ties are broken by position (stable sort), so results are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def keep_count(numel: int, sparsity: float) -> int:
    """Number of entries kept at ``sparsity`` (fraction removed), rounded to the nearest integer."""
    return int(min(numel, max(0, round(numel * (1.0 - sparsity)))))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``scores`` (over all entries; ties go to the earlier position).

    By selection, O(n): t = the k-th largest score; keep every score > t and the first k − #(> t)
    scores equal to t (the result a stable descending sort would give, without sorting)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    ties = torch.nonzero(flat == threshold).reshape(-1)[: k - int(torch.count_nonzero(mask))]
    mask[ties] = True
    return mask.reshape(scores.shape)


@dataclass(frozen=True)
class TopK:
    """Cardinality constraint (Zhang et al. 2018): C = {W : ‖W‖₀ ≤ k}.

    Euclidean projection: keep the k entries of largest |v|, zero the rest.
    """

    k: int
    name: str = "unstructured"

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        return v * top_k_mask(v.abs(), self.k)


@dataclass(frozen=True)
class NM:
    """N:M sparsity: in every group of M consecutive input channels at the same kernel tap, at most N
    nonzeros. The d axis of the canonical view is (Cin/G, taps); groups run along Cin/G.

    Projection: in each group keep the N entries of largest |v| (exact, groups are independent).
    """

    n: int
    m: int
    taps: int = 1
    name: str = "nm"

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        return v * self.mask(v)

    def mask(self, v: torch.Tensor) -> torch.Tensor:
        g, r, d = v.shape
        cin = d // self.taps
        grouped = v.abs().reshape(g, r, cin // self.m, self.m, self.taps).transpose(-1, -2)
        # rank within each group of M; stable so ties keep the earlier channel
        order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(self.m).expand_as(order).contiguous())
        keep = (ranks < self.n).transpose(-1, -2).reshape(g, r, d)
        return keep

    @staticmethod
    def applicable(in_per_group: int, taps: int, m: int) -> bool:
        return in_per_group % taps == 0 and (in_per_group // taps) % m == 0


@dataclass(frozen=True)
class SoftThreshold:
    """Proximal step of the ℓ1 penalty μ‖W‖₁ (Kiaee et al. 2016):
    Z = argmin μ‖Z‖₁ + ρ/2‖Z − V‖² = sign(V)·max(|V| − μ/ρ, 0).
    """

    mu: float
    name: str = "l1"

    def __call__(self, v: torch.Tensor, rho: float) -> torch.Tensor:
        return torch.sign(v) * torch.clamp(v.abs() - self.mu / rho, min=0.0)


@dataclass(frozen=True)
class HardThreshold:
    """Proximal step of the ℓ0 penalty μ‖W‖₀ (Kiaee et al. 2016):
    Z = argmin μ‖Z‖₀ + ρ/2‖Z − V‖² = V·[|V| > √(2μ/ρ)].
    """

    mu: float
    name: str = "l0"

    def __call__(self, v: torch.Tensor, rho: float) -> torch.Tensor:
        return v * (v.abs() > math.sqrt(2.0 * self.mu / rho))
