"""Input patches of a layer at chosen output positions (im2col without building the full matrix).

For a 2-D conv with kernel (kh, kw), the patch of output (n, oy, ox) is
    x_pad[n, :, oy·sh + ky·dh, ox·sw + kx·dw]  for ky < kh, kx < kw,
flattened channel-major (c, ky, kx) — the order of W.reshape(Cout, Cin/G·kh·kw) — and split into G
groups of d = Cin/G·kh·kw. For a product (Gemm/MatMul) the patch is the input row x[..., :].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ConvShape:
    """Resolved geometry for one input size: explicit pads and the output size."""

    pads: tuple[int, int, int, int]  # top, left, bottom, right
    out_h: int
    out_w: int


def resolve_conv(height: int, width: int, kernel, strides, dilations, pads, auto_pad: str) -> ConvShape:
    """Explicit pads (resolving auto_pad SAME_UPPER / SAME_LOWER / VALID) and the output size."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        resolved = []
        for size, k, s, dil in ((height, kernel[0], strides[0], dilations[0]),
                                (width, kernel[1], strides[1], dilations[1])):
            out = math.ceil(size / s)
            total = max((out - 1) * s + dil * (k - 1) + 1 - size, 0)
            small, large = total // 2, total - total // 2
            resolved.append((large, small) if auto_pad == "SAME_LOWER" else (small, large))
        pads = (resolved[0][0], resolved[1][0], resolved[0][1], resolved[1][1])
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    top, left, bottom, right = pads
    out_h = (height + top + bottom - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    out_w = (width + left + right - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    return ConvShape(pads=tuple(pads), out_h=out_h, out_w=out_w)


def conv_patches(x: torch.Tensor, kernel, strides, dilations, shape: ConvShape, groups: int,
                 sample: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor) -> torch.Tensor:
    """Patches (P, G, d) of x (N, C, H, W) at output positions (sample, oy, ox): the padded input laid out
    channels-last, one row of C values per pixel, and each patch's kh·kw pixels taken as whole rows."""
    top, left, bottom, right = shape.pads
    count, channels, rows_in, cols_in = x.shape
    height, width = rows_in + top + bottom, cols_in + left + right
    padded = x.new_zeros((count, height, width, channels))  # channels-last, zero border: one copy of x
    padded[:, top:top + rows_in, left:left + cols_in] = x.permute(0, 2, 3, 1)
    pixels = padded.reshape(-1, channels)  # (N·H·W, C)
    ky = torch.arange(kernel[0]) * dilations[0]
    kx = torch.arange(kernel[1]) * dilations[1]
    rows = oy[:, None] * strides[0] + ky[None, :]  # (P, kh)
    cols = ox[:, None] * strides[1] + kx[None, :]  # (P, kw)
    index = (sample[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]  # (P, kh, kw)
    picked = pixels.index_select(0, index.reshape(-1)).reshape(len(sample), -1, channels)  # (P, kh·kw, C)
    return picked.transpose(1, 2).reshape(len(sample), groups, -1)  # (P, G, C/G·kh·kw)


def sample_positions(rng: np.random.Generator, total: int, count: int) -> np.ndarray:
    """``count`` distinct flat positions out of ``total`` (all of them, in order, if count >= total)."""
    if count >= total:
        return np.arange(total)
    return np.sort(rng.choice(total, size=count, replace=False))
