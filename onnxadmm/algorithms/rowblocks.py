"""One layer solved in blocks of its output rows, so that its solve's memory follows a setting, not the layer.

The layer loss is a sum over output channels, Σ_o ‖σ(w_o x̂ + b_o) − t_o‖², each term a function of its own row
w_o (σ acts per channel), so the W-step splits by rows. The Z-step splits where the constraint is one per row or
per output channel — N:M, the integer grid (per-row scales), a fixed support or none — and, for a layer-wide
count (unstructured and kernel sparsity, ‖W‖₀ ≤ k), once each block is given its share of k: the entries
(kernels) of the block among the layer's k largest |W₀| (kernel norms), the data-free projection's
allocation; inside a block ADMM moves entries freely, across blocks not. Constraints that couple every row
(whole input channels, low rank, the penalties' layer-wide μ search) are solved whole.

A block is sized so that the solver's copies of its rows fit ``AdmmSettings.layer_bytes``: about
``WEIGHT_COPIES`` layer-sized tensors (θ, Z, U, W₀, the gradient, the direction, the projection's temporaries:
measured) and ``PATCH_COPIES`` tensors of the subset's M rows by the block's outputs (pre-activation, σ, its
slope, the line search's trials). What every block shares — x̂, the objective's subset of it and its
eigenbasis — is built once (``LayerProblem.shared``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .admm import AdmmSettings, subset_rows
from .problem import CHUNK_BYTES, LayerProblem, output_columns

WEIGHT_COPIES = 16  # float32 tensors of a block's weight size held at once by its solve (measured: docs/SCALE.md)
PATCH_COPIES = 8  # ... and of (subset rows × the block's outputs)
MIN_ROWS = 64  # no block of fewer output rows (per group)
SPLIT_KINDS = ("unstructured", "nm", "kernels", "grid", "dense", "mask")
PROBE_PATCHES = 64  # patches on which σ is checked to take a block of channels


def row_blocks(problem: LayerProblem, structure, settings: AdmmSettings) -> list[tuple[int, int]]:
    """Output-row ranges [start, stop) of each group that the layer is solved in: one, [0, R), unless its
    solve would exceed ``settings.layer_bytes``, its constraint splits by rows (module docstring) and σ takes a
    block of channels; else equal blocks, each within ``layer_bytes`` where MIN_ROWS allow."""
    g, r, d = problem.w0.shape
    layer_bytes = settings.layer_bytes
    if layer_bytes is None or structure.kind not in SPLIT_KINDS or r < 2 * MIN_ROWS:
        return [(0, r)]
    per_row = 4 * g * (WEIGHT_COPIES * (d + 1) + PATCH_COPIES * objective_rows(problem, settings))
    if per_row * r <= layer_bytes:
        return [(0, r)]
    count = min(math.ceil(per_row * r / layer_bytes), r // MIN_ROWS)
    bounds = [round(i * r / count) for i in range(count + 1)]
    blocks = list(zip(bounds[:-1], bounds[1:]))
    if not _channelwise(problem, blocks):
        return [(0, r)]
    return blocks


def objective_rows(problem: LayerProblem, settings: AdmmSettings) -> int:
    """M: the rows of the activation objective's subset (``admm.subset_rows``)."""
    return min(problem.num_patches, subset_rows(settings, problem.groups, problem.w0.shape[-1]))


@torch.no_grad()
def _channelwise(problem: LayerProblem, blocks: list[tuple[int, int]]) -> bool:
    """Whether σ applied to a block of output channels (and its side inputs) gives those channels of σ on all
    of them, on the first PROBE_PATCHES patches for the first and the last block: false where the chain holds
    one constant per channel (a per-channel PRelu slope), which a block's columns would not broadcast with."""
    if problem.activation is None:
        return True
    rows = slice(0, min(problem.num_patches, PROBE_PATCHES))
    z = problem.y_ref[rows] * 1.5 - 0.25 * problem.y_ref[rows].abs().mean()  # (some of each sign)
    sides = problem.sides("ref", rows)
    whole = problem.sigma(z, sides)
    g, r, _ = problem.w0.shape
    for start, stop in (blocks[0], blocks[-1]):
        def cut(t: torch.Tensor) -> torch.Tensor:
            return output_columns(t, g, r, start, stop)
        try:
            got = problem.sigma(cut(z), tuple(cut(s) for s in sides))
        except RuntimeError:  # (a per-channel constant that does not broadcast with the block)
            return False
        if got.shape != cut(whole).shape or not torch.allclose(got, cut(whole), rtol=1e-6, atol=1e-6):
            return False
    return True


def block_structures(structure, w0: torch.Tensor, blocks: list[tuple[int, int]]) -> list:
    """Each block's constraint: a layer-wide count split by the data-free projection's allocation (module
    docstring), a fixed support cut to the block's rows, anything else as it is."""
    if structure.kind in ("unstructured", "kernels"):
        kept = kept_per_row(w0, structure.taps if structure.kind == "kernels" else 1, structure.projection(w0).k)
        return [dataclasses.replace(structure, keep=int(kept[start:stop].sum())) for start, stop in blocks]
    if structure.kind == "mask":
        return [dataclasses.replace(structure, mask=structure.mask[:, start:stop]) for start, stop in blocks]
    return [structure] * len(blocks)


def kept_per_row(w0: torch.Tensor, taps: int, k: int) -> torch.Tensor:
    """(R,): how many entries of each output row (summed over groups) are among the layer's k largest |W₀| —
    of its kernels of ``taps`` entries, by norm, where taps > 1 — as ``top_k_mask`` chooses them (ties to the
    earlier position), without a copy of the layer: a non-negative float32's bit pattern, read as an int32,
    orders as the float does, so the k-th largest is found from two histograms (the top 16 bits, then the
    low 15 within its bin), each one pass over chunks of rows."""
    g, r, _ = w0.shape
    chunk = max(1, CHUNK_BYTES // (4 * w0.shape[-1]))

    def bit_chunks():  # (group, first row, (rows, scores) int32 bit patterns), in top_k_mask's flat order
        for group in range(g):
            for start in range(0, r, chunk):
                part = w0[group, start:start + chunk]
                scores = part.abs() if taps == 1 else part.reshape(part.shape[0], -1, taps).pow(2).sum(-1)
                yield start, scores.contiguous().view(torch.int32)

    total = w0.numel() // taps
    if k <= 0 or k >= total:
        return torch.full((r,), g * (w0.shape[-1] // taps) if k > 0 else 0, dtype=torch.int64)
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for _, bits in bit_chunks():
        high += torch.bincount((bits >> 15).reshape(-1).long(), minlength=1 << 16)
    top_bin, needed = _kth_bin(high, k)
    low = torch.zeros(1 << 15, dtype=torch.int64)
    for _, bits in bit_chunks():
        inside = bits[(bits >> 15) == top_bin]
        low += torch.bincount((inside & 0x7FFF).long(), minlength=1 << 15)
    low_bin, ties = _kth_bin(low, needed)
    threshold = (top_bin << 15) | low_bin
    counts = torch.zeros(r, dtype=torch.int64)
    for start, bits in bit_chunks():
        equal = (bits == threshold).sum(-1)
        before = equal.cumsum(0) - equal  # ties in earlier rows of the chunk
        taken = (ties - before).clamp(min=0).minimum(equal)
        ties -= int(taken.sum())
        counts[start:start + bits.shape[0]] += (bits > threshold).sum(-1) + taken
    return counts


def _kth_bin(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value counted in ``histogram``, and which of that bin's values it is
    (from the top)."""
    at_or_above = histogram.flip(0).cumsum(0).flip(0)
    index = int(torch.nonzero(at_or_above >= k).max())
    above = int(at_or_above[index + 1]) if index + 1 < len(at_or_above) else 0
    return index, k - above


def solve_in_row_blocks(problem: LayerProblem, structure, blocks: list[tuple[int, int]], loss: str,
                        solve: Callable, settings: AdmmSettings):
    """``solve(block problem, block structure, settings)`` for each block (``loss``: the errors' metric), merged into one solution of the layer: the
    weights, bias and scales in place; each relative error the blocks' errors weighted by their targets'
    energy (the sum of the numerators over the sum of the denominators); the history per block."""
    g, r, _ = problem.w0.shape
    structures = block_structures(structure, problem.w0, blocks)
    weight = torch.empty_like(problem.w0)
    bias = torch.empty(g, r)
    scales = None
    errors = {"error_dense": 0.0, "error_projected": 0.0, "error_final": 0.0}
    total_energy = 0.0
    histories = []
    first = None
    for index, ((start, stop), part_structure) in enumerate(zip(blocks, structures)):
        part = problem.output_rows(start, stop)
        inner = dataclasses.replace(settings, part=f"block {index + 1}/{len(blocks)} (rows {start}-{stop} of {r})")
        solution = solve(part, part_structure, inner)
        energy = part.energy(loss)
        weight[:, start:stop] = solution.weight
        bias[:, start:stop] = solution.bias.reshape(g, -1)
        if solution.scales is not None:
            scales = torch.empty(g, r) if scales is None else scales
            scales[:, start:stop] = solution.scales.reshape(g, -1)
        for name in errors:
            errors[name] += getattr(solution, name) * energy
        total_energy += energy
        histories.append({"rows": [start, stop], **solution.history})
        first = first or solution
        del part, solution
    total_energy = total_energy or 1.0
    return dataclasses.replace(first, weight=weight, bias=bias.reshape(-1), mask=weight != 0, scales=scales,
                               history={"row_blocks": histories},
                               **{name: value / total_energy for name, value in errors.items()})
