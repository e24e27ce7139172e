"""One layer-wise reconstruction problem, on sampled input patches.

    minimize over (W, b)   E ‖σ(W x̂ + b; ŝ) − σ(W₀ x + b₀; s)‖²

x̂ are the layer's input patches in the already-compressed model, x the same positions in the original
model, s / ŝ the chain's side inputs (a residual branch) at those positions, σ the activation chain.
The canonical weight W has shape (G, R, d): G groups of R outputs, d inputs each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Activation = Callable[[torch.Tensor, tuple], torch.Tensor]


@dataclass
class LayerProblem:
    x_hat: torch.Tensor  # (P, G, d) compressed-model input patches
    y_ref: torch.Tensor  # (P, Cout) original pre-activation W₀x + b₀
    w0: torch.Tensor  # (G, R, d)
    b0: torch.Tensor  # (Cout,)
    side_hat: tuple[torch.Tensor, ...] = ()  # (P, Cout) each, compressed model
    side_ref: tuple[torch.Tensor, ...] = ()  # (P, Cout) each, original model
    activation: Activation | None = None  # None = identity
    fit_bias: bool = True
    _target: torch.Tensor | None = field(default=None, repr=False)

    @property
    def groups(self) -> int:
        return self.w0.shape[0]

    @property
    def num_patches(self) -> int:
        return self.x_hat.shape[0]

    def pre_activation(self, w: torch.Tensor, b: torch.Tensor, rows: slice | torch.Tensor = slice(None)
                       ) -> torch.Tensor:
        """W x̂ + b at the sampled positions: (P, Cout)."""
        x = self.x_hat[rows]
        out = torch.bmm(x.transpose(0, 1), w.transpose(1, 2))  # (G, P, R)
        return out.transpose(0, 1).reshape(x.shape[0], -1) + b

    def sigma(self, z: torch.Tensor, sides: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return z if self.activation is None else self.activation(z, sides)

    def sides(self, which: str, rows: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, ...]:
        source = self.side_hat if which == "hat" else self.side_ref
        return tuple(s[rows] for s in source)

    def target(self, loss: str) -> torch.Tensor:
        """σ(W₀x + b₀; s) for the activation loss, W₀x + b₀ for the linear loss."""
        if loss == "linear":
            return self.y_ref
        if self._target is None:
            self._target = self.sigma(self.y_ref, self.side_ref).detach()
        return self._target

    def prediction(self, w: torch.Tensor, b: torch.Tensor, loss: str,
                   rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        z = self.pre_activation(w, b, rows)
        return z if loss == "linear" else self.sigma(z, self.sides("hat", rows))

    @torch.no_grad()
    def relative_error(self, w: torch.Tensor, b: torch.Tensor, loss: str) -> float:
        """‖prediction − target‖² / ‖target‖² over all sampled positions (chunked)."""
        target = self.target(loss)
        num, den = 0.0, float(target.double().pow(2).sum()) or 1.0
        step = 8192
        for start in range(0, self.num_patches, step):
            rows = slice(start, start + step)
            diff = self.prediction(w, b, loss, rows) - target[rows]
            num += float(diff.double().pow(2).sum())
        return num / den
