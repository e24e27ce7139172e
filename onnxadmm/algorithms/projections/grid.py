"""The integer grid: per-output-channel symmetric quantization of canonical weights V (G, R, d).

Grid of row o with scale s_o and q_max = 2^(bits−1) − 1:   C_o = { s_o·k : k ∈ {−q_max, …, q_max} }^d.
Euclidean projection onto C (intersected with a fixed support S, zeros kept):
    Π(v) = s·clamp(round(v / s), −q_max, q_max) · 1_S
Rounding is to nearest, ties to even (``torch.round``), which is what onnxruntime's quantizer does, so the
exported integers are exactly the projected values divided by the scale.

Scales are chosen by the layer's output error, not by max |w|: for each row, among s = α·max|w_o| / q_max
with α on a grid, the one minimizing (w_o − Π(w_o))ᵀ Σ (w_o − Π(w_o)), Σ the covariance of the layer's
inputs (the output error once the bias absorbs the mean shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALPHAS = tuple(1.0 - 0.02 * i for i in range(26))  # clipping ratios tried: 1.00, 0.98, …, 0.50


def q_max(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def to_grid(v: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Π(v) for scales of shape (G, R) (no support)."""
    s = scales.unsqueeze(-1)
    limit = q_max(bits)
    return torch.clamp(torch.round(v / s), -limit, limit) * s


def integer_values(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers k of on-grid weights w = s·k."""
    limit = q_max(bits)
    return torch.clamp(torch.round(w / scales.unsqueeze(-1)), -limit, limit)


@dataclass(frozen=True)
class IntegerGrid:
    """Z-step onto the grid with fixed scales (G, R), intersected with a fixed support (or none)."""

    scales: torch.Tensor
    bits: int = 8
    support: torch.Tensor | None = None
    name: str = "grid"

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        z = to_grid(v, self.scales, self.bits)
        return z if self.support is None else z * self.support


def output_error_scales(w: torch.Tensor, sigma: torch.Tensor, bits: int = 8,
                        support: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row scales (G, R) minimizing the output error (w − Π(w))ᵀ Σ (w − Π(w)) over ``ALPHAS``.

    ``w`` (G, R, d), ``sigma`` (G, d, d). A row of zeros gets the scale 1 (any scale represents it)."""
    w = w.double()
    sigma = sigma.double()
    peak = w.abs().amax(dim=-1)  # (G, R)
    base = torch.where(peak > 0, peak / q_max(bits), torch.ones_like(peak))
    best_error = torch.full_like(peak, float("inf"))
    best = base.clone()
    for alpha in ALPHAS:
        scales = base * alpha
        delta = w - to_grid(w, scales, bits) * (1 if support is None else support)
        error = (torch.bmm(delta, sigma) * delta).sum(-1)  # (G, R)
        better = error < best_error
        best = torch.where(better, scales, best)
        best_error = torch.where(better, error, best_error)
    return best.float()
