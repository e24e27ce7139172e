"""Weights trained on a fixed integer grid (block refinement and distillation after a precision stage).

Each gridded weight enters the forward pass as

    Ŵ = s·clamp(round(W/s), −L, L)     per output channel, s the solved scales, L = 127, 63 or 7

with the gradient passed unchanged inside the clamp (straight-through), so the latent W is what the optimizer
moves and Ŵ is what is exported: the trained model is exactly the stored one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils import parametrize

from ..bridge.torch_block import BlockModule, WeightHandle


@dataclass
class FixedGrid:
    """The weights that stay on their integer grid while training a quantized model (the activations' roundings
    are nodes of the graph trained: ``quantize/fakequant.with_export_rounding``)."""

    weights: dict[str, tuple[np.ndarray, int, int]]  # initializer -> (per-channel scales, ONNX axis, levels L)


class GridWeight(torch.nn.Module):
    """W ↦ s·clamp(round(W/s), −L, L) per channel; the gradient passes unchanged inside the clamp."""

    def __init__(self, scales: np.ndarray, axis: int, levels: int):
        super().__init__()
        self.register_buffer("scales", torch.from_numpy(np.asarray(scales, np.float32).reshape(-1)))
        self.register_buffer("zeros", torch.zeros(self.scales.numel(), dtype=torch.int32))
        self.axis, self.levels = axis, levels

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(weight, self.scales, self.zeros, self.axis, -self.levels,
                                                      self.levels)


class GridHandle(WeightHandle):
    """A parametrized weight: ``tensor`` is the latent value trained, ``to_onnx`` the value on the grid."""

    def __init__(self, module: torch.nn.Module, attribute: str, transposed: bool):
        super().__init__(getattr(module.parametrizations, attribute).original, transposed)
        self.module, self.attribute = module, attribute

    def to_onnx(self) -> np.ndarray:
        with torch.no_grad():
            value = getattr(self.module, self.attribute).numpy()
        return np.ascontiguousarray(value.T if self.transposed else value)


def on_grid(student: BlockModule, handles: dict[str, WeightHandle], grid: FixedGrid | None
            ) -> dict[str, WeightHandle]:
    """Put each weight ``grid`` names behind ``GridWeight``; returns the handles, the gridded ones trained
    latent (all unchanged without a grid)."""
    if grid is None:
        return handles
    owners = {id(t): (m, n) for m in student.module.modules()
              for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}
    handles = dict(handles)
    for name, handle in handles.items():
        if name in grid.weights:
            module, attribute = owners[id(handle.tensor)]
            scales, axis, levels = grid.weights[name]
            axis = handle.tensor.ndim - 1 - axis if handle.transposed else axis
            parametrize.register_parametrization(module, attribute, GridWeight(scales, axis, levels), unsafe=True)
            handles[name] = GridHandle(module, attribute, handle.transposed)
    return handles
