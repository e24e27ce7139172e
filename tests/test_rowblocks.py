"""A layer whose solve would exceed its memory share is solved in blocks of output rows (algorithms/rowblocks.py)."""

import dataclasses

import pytest
import torch

from onnxadmm.algorithms import rowblocks
from onnxadmm.algorithms.admm import ActivationObjective, AdmmSettings
from onnxadmm.algorithms.problem import LayerProblem
from onnxadmm.algorithms.projections.grid import q_max
from onnxadmm.algorithms.projections.sparse import keep_count, top_k_mask
from onnxadmm.algorithms.rowblocks import kept_per_row, row_blocks
from onnxadmm.algorithms.solve import Structure, solve_layer


def problem(rows=200, d=16, groups=1, patches=3000, activation=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(patches, groups, d, generator=gen) + 0.2)
    w0 = torch.randn(groups, rows, d, generator=gen) / d ** 0.5
    b0 = torch.randn(groups * rows, generator=gen) * 0.1
    y = torch.einsum("pgd,grd->pgr", x, w0).reshape(patches, -1) + b0
    x_hat = x + 0.05 * torch.randn(x.shape, generator=gen)
    return LayerProblem(x_hat=x_hat, y_ref=y, w0=w0, b0=b0,
                        activation=activation or (lambda z, s: torch.relu(z)))


def share(prob, blocks):
    """Settings whose layer_bytes give ``prob`` about ``blocks`` row blocks."""
    g, r, d = prob.w0.shape
    rows = rowblocks.objective_rows(prob, AdmmSettings())
    per_row = 4 * g * (rowblocks.WEIGHT_COPIES * (d + 1) + rowblocks.PATCH_COPIES * rows)
    return AdmmSettings(layer_bytes=per_row * r // blocks + 1)


@pytest.mark.parametrize("taps", [1, 4])
def test_kept_per_row_counts_what_top_k_mask_keeps_ties_included(monkeypatch, taps):
    monkeypatch.setattr(rowblocks, "CHUNK_BYTES", 4 * 16 * 7)  # 7 rows a chunk: ties cross chunks and groups
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-2, 3, (3, 40, 16), generator=gen).float()  # many equal magnitudes
    scores = w.abs() if taps == 1 else w.reshape(3, 40, 16 // taps, taps).pow(2).sum(-1)
    for k in (0, 1, 37, scores.numel() // 2, scores.numel() - 1, scores.numel()):
        assert torch.equal(kept_per_row(w, taps, k), top_k_mask(scores, k).sum(dim=(0, 2))), k


def test_a_layer_within_its_share_is_solved_whole_and_unchanged():
    prob = problem()
    structure = Structure("unstructured", sparsity=0.6)
    assert row_blocks(prob, structure, AdmmSettings(layer_bytes=1 << 30)) == [(0, 200)]
    whole = solve_layer(prob, structure, settings=AdmmSettings(iterations=8))
    again = solve_layer(problem(), structure, settings=AdmmSettings(iterations=8, layer_bytes=1 << 30))
    assert torch.equal(whole.weight, again.weight) and torch.equal(whole.bias, again.bias)


@pytest.mark.parametrize("groups", [1, 2])
def test_unstructured_sparsity_in_row_blocks_keeps_the_layer_s_count_and_the_whole_solve_s_quality(groups):
    prob = problem(groups=groups)
    structure = Structure("unstructured", sparsity=0.6)
    layer_bytes = share(prob, 3).layer_bytes
    blocks = row_blocks(prob, structure, share(prob, 3))
    assert len(blocks) == 3 and blocks[0][0] == 0 and blocks[-1][1] == 200
    parts = []
    settings = AdmmSettings(iterations=12, layer_bytes=layer_bytes,
                            on_iteration=lambda i, n, primal, part: parts.append(part))
    split = solve_layer(prob, structure, settings=settings)
    whole = solve_layer(problem(groups=groups), structure, settings=AdmmSettings(iterations=12))
    assert int(split.mask.sum()) == keep_count(prob.w0.numel(), 0.6)
    kept = kept_per_row(prob.w0, 1, keep_count(prob.w0.numel(), 0.6))
    for start, stop in blocks:  # each block keeps its share: the data-free projection's
        assert int(split.mask[:, start:stop].sum()) == int(kept[start:stop].sum())
    # the merged errors are the layer's errors
    assert split.error_final == pytest.approx(prob.relative_error(split.weight, split.bias, "activation"), rel=1e-4)
    assert split.error_dense == pytest.approx(prob.relative_error(prob.w0, prob.b0, "activation"), rel=1e-4)
    assert split.error_final < 0.85 * split.error_projected
    assert split.error_final < 1.1 * whole.error_final, (split.error_final, whole.error_final)
    assert [h["rows"] for h in split.history["row_blocks"]] == [list(b) for b in blocks]
    assert f"block 3/3 (rows {blocks[2][0]}-200 of 200)" in parts


def test_the_blocks_share_the_objective_s_subset_of_the_inputs():
    prob = problem()
    settings = AdmmSettings()
    first, second = (ActivationObjective(prob.output_rows(a, b), settings) for a, b in ((0, 100), (100, 200)))
    assert first.x_aug is second.x_aug and first.basis is second.basis
    assert first.target.shape[1] == 100
    other = ActivationObjective(dataclasses.replace(prob, x_hat=2 * prob.x_hat), settings)  # other patches: its own
    torch.testing.assert_close(other.x_aug[..., :-1], 2 * first.x_aug[..., :-1])


def test_nm_and_the_integer_grid_in_row_blocks_hold_their_pattern_row_by_row():
    prob = problem(d=16)
    settings = AdmmSettings(iterations=6, layer_bytes=share(prob, 4).layer_bytes)
    nm = solve_layer(prob, Structure("nm", n=2, m=4), settings=settings)
    assert "row_blocks" in nm.history
    assert torch.all((nm.weight.reshape(1, 200, 4, 4) != 0).sum(-1) <= 2)
    grid = solve_layer(problem(d=16), Structure("grid", bits=8), settings=settings)
    assert "row_blocks" in grid.history and grid.scales.shape == (1, 200)
    integers = grid.weight / grid.scales[..., None]
    torch.testing.assert_close(integers, integers.round(), rtol=0, atol=1e-3)
    assert float(integers.abs().max()) <= q_max(8) + 1e-3
    assert grid.error_final == pytest.approx(prob.relative_error(grid.weight, grid.bias, "activation"), rel=1e-4)


def test_a_chain_with_one_constant_per_channel_or_a_coupling_constraint_is_solved_whole():
    slopes = torch.linspace(0.05, 0.3, 200)

    def prelu(z, sides):  # one slope per output channel: a block's columns do not broadcast with it
        return torch.where(z > 0, z, slopes * z)

    prob = problem(activation=prelu)
    assert row_blocks(prob, Structure("unstructured", sparsity=0.5), share(prob, 4)) == [(0, 200)]
    plain = problem()
    assert len(row_blocks(plain, Structure("unstructured", sparsity=0.5), share(plain, 4))) == 3  # (MIN_ROWS: 64)
    channels = dataclasses.replace(Structure("lowrank"))
    assert row_blocks(plain, channels, share(plain, 4)) == [(0, 200)]
