"""Group-sparsity Z-steps on canonical weights V of shape (G, R, d), d = C·w (C input channels of
w columns each: kh·kw for a conv, H·W after a Flatten, 1 for a product).

All are Euclidean projections (or, for ℓ0 + ℓ2,1, the paper's two-stage hard threshold); ties are
broken by position, so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sparse import top_k_mask


def channel_norms(v: torch.Tensor, width: int) -> torch.Tensor:
    """‖V[:, :, c·w:(c+1)·w]‖²_F per input channel c (summed over groups and outputs): shape (C,)."""
    g, r, d = v.shape
    return v.reshape(g, r, d // width, width).pow(2).sum(dim=(0, 1, 3))


def expand_channels(keep: torch.Tensor, shape: torch.Size, width: int) -> torch.Tensor:
    """A (C,) channel mask as a mask of canonical shape (G, R, C·w)."""
    g, r, d = shape
    return keep[:, None].expand(d // width, width).reshape(1, 1, d).expand(g, r, d)


@dataclass(frozen=True)
class InputChannels:
    """Keep k input channels (column groups): C = {V : at most k channels c with V[:, :, c] ≠ 0}.

    Projection: keep the k channels of largest ‖V_c‖_F, zero the rest (exact: the objective
    separates over channels). ``fixed`` (a (C,) bool mask) pins the support instead — used when a
    channel group is shared by several consumers and was chosen jointly.
    """

    k: int
    width: int
    fixed: torch.Tensor | None = None
    name: str = "channels"

    def keep(self, v: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        return top_k_mask(channel_norms(v, self.width), self.k)

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        return v * expand_channels(self.keep(v), v.shape, self.width)


@dataclass(frozen=True)
class ChannelBlock:
    """``channels`` consecutive input channels from ``offset`` that belong to one channel group: keep ``k``
    of them (or exactly the ``fixed`` ones)."""

    offset: int
    channels: int
    k: int
    fixed: tuple[bool, ...] | None = None


@dataclass(frozen=True)
class ChannelBlocks:
    """Input channels of several groups in one consumer (a Concat of groups): in each block keep its k
    channels of largest ‖V_c‖_F (or its fixed ones); channels outside every block stay. Exact: the
    objective separates over blocks and channels."""

    blocks: tuple[ChannelBlock, ...]
    width: int
    name: str = "channels"

    def keep(self, v: torch.Tensor) -> torch.Tensor:
        norms = channel_norms(v, self.width)
        keep = torch.ones(norms.shape[0], dtype=torch.bool)
        for block in self.blocks:
            span = slice(block.offset, block.offset + block.channels)
            keep[span] = torch.tensor(block.fixed, dtype=torch.bool) if block.fixed is not None else \
                top_k_mask(norms[span], block.k)
        return keep

    def kept_channels(self, total: int) -> int:
        return total - sum(block.channels - block.k for block in self.blocks)

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        return v * expand_channels(self.keep(v), v.shape, self.width)


@dataclass(frozen=True)
class Filters:
    """Keep k output filters (rows): C = {V : at most k rows r with V[:, r, :] ≠ 0} — the ℓ2,1 group of
    Bui et al. 2019 in cardinality form. Projection: keep the k rows of largest ℓ2 norm."""

    k: int
    name: str = "filters"

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        g, r, _ = v.shape
        keep = top_k_mask(v.pow(2).sum(-1).reshape(-1), self.k).reshape(g, r, 1)
        return v * keep


@dataclass(frozen=True)
class ChannelsThenElements:
    """ℓ0 + ℓ2,1 (Bui et al. 2019): group hard threshold (keep k channels by norm), then element hard
    threshold inside the kept channels (keep the ``elements`` largest |v|).
    The result has ≤ k nonzero channels and ≤ ``elements`` nonzeros; it is the exact projection onto
    that intersection when the element budget binds within the kept channels' largest entries."""

    k: int
    width: int
    elements: int
    fixed: torch.Tensor | None = None
    blocks: tuple[ChannelBlock, ...] | None = None  # instead of k / fixed: per-group blocks
    name: str = "l0-l21"

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        grouped = ChannelBlocks(self.blocks, self.width)(v) if self.blocks is not None else \
            InputChannels(self.k, self.width, self.fixed)(v)
        return grouped * top_k_mask(grouped.abs(), self.elements)


@dataclass(frozen=True)
class Kernels:
    """Channel-wise sparse connections (Changpinyo et al. 2017): keep the k (output, input-channel)
    kernels of largest Frobenius norm; C = {V : at most k kernels V[g, r, c·w:(c+1)·w] ≠ 0}."""

    k: int
    width: int
    name: str = "kernels"

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        g, r, d = v.shape
        kernels = v.reshape(g, r, d // self.width, self.width)
        keep = top_k_mask(kernels.pow(2).sum(-1), self.k)
        return (kernels * keep[..., None]).reshape(g, r, d)


def balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """Assign each of C channels to one of G blocks, C/G per block, greedily by descending score
    (scores (C, G)): the largest remaining (channel, block) pair is taken while the block has room.
    Deterministic (stable order on ties); a ½-approximation of the best total, exact when one block
    dominates each channel."""
    channels, blocks = scores.shape
    capacity = [channels // blocks] * blocks
    block_of = torch.full((channels,), -1, dtype=torch.long)
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
    for flat in order.tolist():
        c, b = divmod(flat, blocks)
        if block_of[c] < 0 and capacity[b] > 0:
            block_of[c] = b
            capacity[b] -= 1
    return block_of


@dataclass(frozen=True)
class BlockDiagonal:
    """Channel-wise sparse connections in G blocks (Changpinyo et al. 2017), exportable as a grouped Conv:
    output block b (rows [b·R/G, (b+1)·R/G)) keeps only the input channels assigned to block b, C/G of
    them. ``assignment`` (C,) gives each input channel's block; without it the Z-step chooses the
    assignment maximizing the kept energy Σ_b Σ_{c→b} ‖V[rows_b, c]‖² (greedy balanced assignment)."""

    blocks: int
    width: int
    assignment: tuple[int, ...] | None = None
    name: str = "grouped"

    def mask(self, v: torch.Tensor) -> torch.Tensor:
        g, r, d = v.shape
        channels = d // self.width
        rows = torch.arange(r) * self.blocks // r  # output block of each row
        if self.assignment is not None:
            block_of = torch.tensor(self.assignment, dtype=torch.long)
        else:
            energy = v.reshape(g, r, channels, self.width).pow(2).sum(dim=(0, 3))  # (R, C)
            per_block = torch.stack([energy[rows == b].sum(0) for b in range(self.blocks)], dim=1)
            block_of = balanced_assignment(per_block)
        keep = rows[:, None] == block_of[None, :]  # (R, C)
        return keep[:, :, None].expand(r, channels, self.width).reshape(1, r, d).expand(g, r, d)

    def __call__(self, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        return v * self.mask(v)
