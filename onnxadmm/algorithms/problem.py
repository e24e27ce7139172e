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
CHUNK_BYTES = 64 << 20  # copies of patch rows made at a time (float64 sums, the objective's subset): none of x̂'s size
HOLD_OUT_EVERY = 10  # held-out patches: those of every 10th calibration sample
MIN_HELD_OUT_SAMPLES = 8  # fewer held-out samples than this: no held-out check


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
    sample_ids: torch.Tensor | None = None  # (P,) the calibration sample each patch comes from
    _target: torch.Tensor | None = field(default=None, repr=False)
    _energy: dict = field(default_factory=dict, repr=False)  # loss -> ‖target‖²
    # what is built from x̂ alone (the objective's subset and its eigenbasis), shared by the row blocks of a layer;
    # each entry is (the x̂ it was built from, the value), so a copy of the problem with other patches builds its own
    shared: dict = field(default_factory=dict, repr=False)

    def held_out(self, every: int = HOLD_OUT_EVERY) -> torch.Tensor | None:
        """(P,) mask of the patches from every ``every``-th calibration sample (id ≡ every−1 mod every);
        None without sample ids or when fewer than ``MIN_HELD_OUT_SAMPLES`` samples would be held out."""
        if self.sample_ids is None:
            return None
        held = self.sample_ids % every == every - 1
        if int(torch.unique(self.sample_ids[held]).numel()) < MIN_HELD_OUT_SAMPLES or bool(held.all()):
            return None
        return held

    def subset(self, rows: torch.Tensor) -> "LayerProblem":
        """The same problem on the patches ``rows`` (a mask or indices). A mask selecting one contiguous run
        of patches gives views, not copies: the sampler stores the held-out patches last
        (``held_out_last``), so both sides of the held-out split share x̂'s memory."""
        rows = _as_slice(rows)
        return LayerProblem(
            x_hat=self.x_hat[rows], y_ref=self.y_ref[rows], w0=self.w0, b0=self.b0,
            side_hat=tuple(s[rows] for s in self.side_hat), side_ref=tuple(s[rows] for s in self.side_ref),
            activation=self.activation, fit_bias=self.fit_bias,
            sample_ids=None if self.sample_ids is None else self.sample_ids[rows])

    def output_rows(self, start: int, stop: int) -> "LayerProblem":
        """The same problem for outputs ``start:stop`` of every group (W₀[:, start:stop]): the loss is a sum over
        output channels, each a function of its own row of W (σ acts per channel; ``rowblocks.py`` checks that it
        takes a block of them), so a layer's rows can be solved apart. x̂ and ``shared`` are shared, not copied."""
        g, r, _ = self.w0.shape

        def columns(t: torch.Tensor) -> torch.Tensor:
            return output_columns(t, g, r, start, stop)

        return LayerProblem(
            x_hat=self.x_hat, y_ref=columns(self.y_ref), w0=self.w0[:, start:stop],
            b0=self.b0.reshape(g, r)[:, start:stop].reshape(-1), side_hat=tuple(columns(s) for s in self.side_hat),
            side_ref=tuple(columns(s) for s in self.side_ref), activation=self.activation, fit_bias=self.fit_bias,
            sample_ids=self.sample_ids, shared=self.shared)

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

    def relative_error(self, w: torch.Tensor, b: torch.Tensor, loss: str) -> float:
        """‖prediction − target‖² / ‖target‖² over all sampled positions."""
        return self.relative_errors([(w, b)], loss)[0]

    def energy(self, loss: str) -> float:
        """‖target‖² over all sampled positions (1 where it is 0): the relative errors' denominator."""
        if loss not in self._energy:
            self._energy[loss] = float(self.target(loss).pow(2).sum()) or 1.0
        return self._energy[loss]

    @torch.no_grad()
    def relative_errors(self, candidates: list[tuple[torch.Tensor, torch.Tensor]], loss: str) -> list[float]:
        """``relative_error`` of each (W, b) in ``candidates``, in one pass over the patches: one product per
        chunk with their weights stacked, (G, K·R, d) (chunked; float32 sums, which torch accumulates
        pairwise)."""
        target = self.target(loss)
        energy = self.energy(loss)
        outputs = self.w0.shape[1]
        stacked = torch.cat([w for w, _ in candidates], dim=1).transpose(1, 2)  # (G, d, K·R)
        nums = [0.0] * len(candidates)
        step = max(256, 8192 // len(candidates))
        for start in range(0, self.num_patches, step):
            rows = slice(start, start + step)
            x = self.x_hat[rows]
            out = torch.bmm(x.transpose(0, 1), stacked)  # (G, P, K·R)
            sides = self.sides("hat", rows) if loss != "linear" else ()
            for k, (_, b) in enumerate(candidates):
                z = out[..., k * outputs:(k + 1) * outputs].transpose(0, 1).reshape(x.shape[0], -1) + b
                prediction = z if loss == "linear" else self.sigma(z, sides)
                nums[k] += float((prediction - target[rows]).pow(2).sum())
        return [num / energy for num in nums]

    @torch.no_grad()
    def shift_free(self) -> "LayerProblem":
        """When the chain only shifts, σ(z; s) = z + c(s) (additions of constants and side inputs: a bias and a
        residual), the loss ‖Wx̂ + b + c(ŝ) − W₀x − b₀ − c(s)‖² is the linear one with target
        y₀ + c(s) − c(ŝ): that problem, with σ the identity (solved in closed form). Otherwise ``self``.
        The shift is recognized by value: σ(z; s) − z is the same at two different z."""
        if self.activation is None or not self.num_patches:
            return self
        rows = slice(0, min(self.num_patches, 512))
        z = self.y_ref[rows]
        sides = self.sides("ref", rows)
        other = 2.0 * z + 1.0
        first, second = self.sigma(z, sides) - z, self.sigma(other, sides) - other
        scale = float(z.abs().max()) + float(first.abs().max()) + 1.0
        if not torch.allclose(first, second, rtol=0.0, atol=1e-5 * scale):
            return self
        zeros = torch.zeros_like(self.y_ref[:1]).expand_as(self.y_ref)
        shift = self.sigma(zeros, self.side_ref) - self.sigma(zeros, self.side_hat)
        return LayerProblem(x_hat=self.x_hat, y_ref=self.y_ref + shift, w0=self.w0, b0=self.b0,
                            activation=None, fit_bias=self.fit_bias, sample_ids=self.sample_ids)


def output_columns(t: torch.Tensor, groups: int, rows: int, start: int, stop: int) -> torch.Tensor:
    """The columns of outputs ``start:stop`` of every group: (P, G·R) -> (P, G·(stop − start))."""
    return t.reshape(t.shape[0], groups, rows)[:, :, start:stop].reshape(t.shape[0], -1)


def held_out_last(sample_ids: torch.Tensor, every: int = HOLD_OUT_EVERY) -> torch.Tensor:
    """The row each patch is stored at so that the held-out ones (``LayerProblem.held_out``) come last, each
    side in its original order: (P,) destinations."""
    held = sample_ids % every == every - 1
    destination = torch.empty(len(sample_ids), dtype=torch.int64)
    fit = int((~held).sum())
    destination[~held] = torch.arange(fit)
    destination[held] = torch.arange(fit, len(sample_ids))
    return destination


def _as_slice(rows: torch.Tensor) -> torch.Tensor | slice:
    """A boolean mask whose selected rows are one contiguous run, as that slice; anything else as given."""
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool:
        return rows
    picked = torch.nonzero(rows).flatten()
    if picked.numel() and int(picked[-1]) - int(picked[0]) + 1 == picked.numel():
        return slice(int(picked[0]), int(picked[-1]) + 1)
    return rows
