"""Every Z-step: result in its set, idempotent, optimal where the optimum is known."""

import itertools
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxadmm.algorithms.projections.sparse import NM, HardThreshold, SoftThreshold, TopK, keep_count

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4))


@st.composite
def tensors(draw, d_multiple: int = 1):
    g, r, d = draw(shapes)
    d *= d_multiple
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((g, r, d)).astype(np.float32))


@given(tensors(), st.floats(0, 1, exclude_max=True))
@settings(max_examples=60, deadline=None)
def test_topk_in_set_idempotent_optimal(v, sparsity):
    k = keep_count(v.numel(), sparsity)
    z = TopK(k)(v)
    assert int((z != 0).sum()) <= k
    assert torch.equal(TopK(k)(z), z)
    # optimal: the discarded energy equals the sum of the numel-k smallest squares
    smallest = torch.sort(v.reshape(-1).pow(2)).values[: v.numel() - k].sum()
    assert math.isclose(float((v - z).pow(2).sum()), float(smallest), rel_tol=1e-5, abs_tol=1e-6)


def test_topk_brute_force_small():
    rng = np.random.default_rng(3)
    v = torch.from_numpy(rng.standard_normal((1, 2, 3)).astype(np.float32))
    best = min(
        float((v.reshape(-1) * (1 - torch.tensor(m, dtype=torch.float32))).pow(2).sum())
        for m in itertools.product([0, 1], repeat=6) if sum(m) <= 2)
    assert math.isclose(float((v - TopK(2)(v)).pow(2).sum()), best, rel_tol=1e-6)


@given(tensors(d_multiple=4), st.sampled_from([(1, 4), (2, 4), (3, 4)]))
@settings(max_examples=60, deadline=None)
def test_nm_in_set_idempotent_optimal(v, nm):
    n, m = nm
    z = NM(n, m)(v)
    g, r, d = v.shape
    groups = (z != 0).reshape(g, r, d // m, m).sum(-1)
    assert int(groups.max()) <= n
    assert torch.equal(NM(n, m)(z), z)
    per_group = torch.sort(v.pow(2).reshape(g, r, d // m, m), dim=-1).values[..., : m - n].sum()
    assert math.isclose(float((v - z).pow(2).sum()), float(per_group), rel_tol=1e-5, abs_tol=1e-6)


def test_nm_groups_run_along_input_channels_per_tap():
    # 8 input channels x 2 taps, layout (c, tap): groups of 4 channels at the same tap
    v = torch.arange(16, dtype=torch.float32).reshape(1, 1, 16) + 1
    z = NM(2, 4, taps=2)(v).reshape(8, 2)
    for tap in range(2):
        column = z[:, tap]
        for group in range(2):
            chunk = column[group * 4:(group + 1) * 4]
            assert int((chunk != 0).sum()) == 2
            assert torch.equal(chunk[2:], torch.arange(16.0).reshape(8, 2)[group * 4 + 2:group * 4 + 4, tap] + 1)


@given(tensors(), st.floats(0.01, 3), st.floats(0.1, 10))
@settings(max_examples=40, deadline=None)
def test_soft_threshold_is_the_l1_prox(v, mu, rho):
    z = SoftThreshold(mu)(v, rho)
    # prox optimality per entry: minimize mu|z| + rho/2 (z - v)^2 on a fine grid
    grid = torch.linspace(-4, 4, 8001)
    for value, got in zip(v.reshape(-1)[:5], z.reshape(-1)[:5]):
        cost = mu * grid.abs() + rho / 2 * (grid - value) ** 2
        best = grid[cost.argmin()]
        assert abs(float(best) - float(got)) <= 2e-3 or abs(float(value)) > 3.9


@given(tensors(), st.floats(0.01, 3), st.floats(0.1, 10))
@settings(max_examples=40, deadline=None)
def test_hard_threshold_is_the_l0_prox_and_idempotent(v, mu, rho):
    z = HardThreshold(mu)(v, rho)
    assert torch.equal(HardThreshold(mu)(z, rho), z)
    keep = (z != 0)
    # keeping an entry costs mu, dropping it costs rho/2 v^2
    assert torch.all(rho / 2 * v[keep] ** 2 >= mu - 1e-6)
    assert torch.all(rho / 2 * v[~keep] ** 2 <= mu + 1e-6)


def test_top_k_by_selection_keeps_what_a_stable_sort_keeps_including_ties():
    from onnxadmm.algorithms.projections.sparse import top_k_mask

    rng = np.random.default_rng(5)
    scores = torch.from_numpy(rng.integers(0, 6, size=(3, 7, 11)).astype(np.float32))  # many ties
    for k in (0, 1, 17, 100, scores.numel() - 1, scores.numel()):
        order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:k]
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[order] = True
        assert torch.equal(top_k_mask(scores, k), expected.reshape(scores.shape)), k
