"""Layer solver: exact refit, constraints hold, ADMM beats the baselines, penalties reach targets."""

import dataclasses

import numpy as np
import pytest
import torch

from onnxadmm.algorithms.admm import AdmmSettings, admm_linear
from onnxadmm.algorithms.problem import LayerProblem
from onnxadmm.algorithms.projections.sparse import TopK
from onnxadmm.algorithms.refit import bias_for, masked_refit, moments
from onnxadmm.algorithms.solve import Structure, solve_layer


def problem(seed=0, patches=6000, d=48, rows=12, groups=1, relu=True, fit_bias=True):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d ** 0.5
    x = torch.relu(torch.randn(patches, groups, d, generator=gen) @ mix + 0.2)
    w0 = torch.randn(groups, rows, d, generator=gen) / d ** 0.5
    b0 = torch.randn(groups * rows, generator=gen) * 0.1 if fit_bias else torch.zeros(groups * rows)
    y = torch.einsum("pgd,grd->pgr", x, w0).reshape(patches, -1) + b0
    x_hat = x + 0.05 * torch.randn(x.shape, generator=gen)  # upstream compression noise
    act = (lambda z, s: torch.relu(z)) if relu else None
    return LayerProblem(x_hat=x_hat, y_ref=y, w0=w0, b0=b0, activation=act, fit_bias=fit_bias)


def test_masked_refit_is_exact_least_squares():
    prob = problem(groups=2, d=10, rows=3)
    stats = moments(prob, damping=0.0)
    mask = torch.rand(prob.w0.shape, generator=torch.Generator().manual_seed(1)) > 0.4
    w = masked_refit(stats, torch.zeros_like(prob.w0), mask, tolerance=1e-14)
    b = bias_for(stats, w)
    x = prob.x_hat.double().numpy()
    y = prob.y_ref.double().numpy()
    for g in range(2):
        for r in range(3):
            support = mask[g, r].numpy()
            design = np.concatenate([x[:, g, support], np.ones((len(x), 1))], axis=1)
            coef, *_ = np.linalg.lstsq(design, y[:, g * 3 + r], rcond=None)
            np.testing.assert_allclose(w[g, r, support].numpy(), coef[:-1], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(float(b[g * 3 + r]), coef[-1], rtol=1e-4, atol=1e-5)
            assert torch.all(w[g, r, ~mask[g, r]] == 0)


def test_masked_refit_of_a_large_layer_in_row_blocks_equals_the_whole_solve(monkeypatch):
    """Rows are independent least-squares problems: solving them a block at a time (bounded memory for
    huge layers) gives the same weights."""
    from onnxadmm.algorithms import refit

    prob = problem(groups=2, d=10, rows=7)
    stats = moments(prob)
    mask = torch.rand(prob.w0.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    whole = masked_refit(stats, prob.w0, mask, tolerance=1e-14)
    monkeypatch.setattr(refit, "REFIT_BLOCK_ELEMENTS", 2 * 10 * 3)  # 3 rows a block: blocks of 3, 3, 1
    blocked = masked_refit(stats, prob.w0, mask, tolerance=1e-14)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)


def test_moments_and_the_objective_subset_taken_in_chunks_equal_the_whole(monkeypatch):
    """The float64 sums and the objective's [x̂; 1] subset are built a few rows at a time (no copy of x̂'s size
    beside it): the same moments, the same subset, in any chunk size."""
    from onnxadmm.algorithms import admm, refit
    from onnxadmm.algorithms.admm import ActivationObjective

    prob = problem(groups=3, d=7, rows=4, patches=500)
    whole, objective = moments(prob), ActivationObjective(prob, AdmmSettings())
    x = prob.x_hat[objective.rows].transpose(0, 1)
    torch.testing.assert_close(objective.x_aug, torch.cat([x, torch.ones(*x.shape[:2], 1)], -1), rtol=0, atol=0)
    monkeypatch.setattr(refit, "CHUNK_BYTES", 8 * 3 * (7 + 4) * 37)  # 37 rows a chunk: 13 full chunks, one of 19
    monkeypatch.setattr(admm, "CHUNK_BYTES", 4 * 3 * 7 * 37)
    chunked, again = moments(prob), ActivationObjective(prob, AdmmSettings())
    for name in ("sigma", "cross", "mean_x", "mean_y"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    assert chunked.var_y == pytest.approx(whole.var_y, rel=1e-12)
    assert torch.equal(again.x_aug, objective.x_aug)


@pytest.mark.parametrize("fit_bias", [True, False])
def test_the_grid_s_input_moments_equal_the_full_moments_in_any_chunk_size(monkeypatch, fit_bias):
    """Σ and the means from float32 chunk products summed in float64, without the targets' moments."""
    from onnxadmm.algorithms import refit

    prob = problem(groups=3, d=7, rows=4, patches=500, fit_bias=fit_bias)
    whole = moments(prob)
    monkeypatch.setattr(refit, "CHUNK_BYTES", 4 * 3 * 7 * 37)  # 37 rows a chunk: 13 full chunks, one of 19
    light = refit.input_moments(prob)
    torch.testing.assert_close(light.sigma, whole.sigma, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(light.mean_x, whole.mean_x, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias_for(light, prob.w0), bias_for(whole, prob.w0), rtol=1e-5, atol=1e-6)


def test_admm_linear_lands_in_the_set_and_records_history():
    prob = problem(relu=False)
    stats = moments(prob)
    k = prob.w0.numel() // 5
    z, history = admm_linear(stats, prob.w0, TopK(k), AdmmSettings(iterations=30))
    assert int((z != 0).sum()) <= k
    h = history.as_dict()
    assert len(h["objective"]) == len(h["rho"]) == len(h["primal_residual"]) >= 4
    assert all(b > a for a, b in zip(h["rho"], h["rho"][1:]))  # growing penalty
    assert h["primal_residual"][-1] < h["primal_residual"][0]


@pytest.mark.parametrize("loss", ["linear", "activation"])
@pytest.mark.parametrize("seed", [0, 1])
def test_admm_beats_refit_beats_magnitude(loss, seed):
    prob = problem(seed=seed)
    structure = Structure("unstructured", 0.8)
    errors = {s: solve_layer(prob, structure, loss, s).error_final for s in ("magnitude", "refit", "admm")}
    assert errors["admm"] < errors["refit"] < errors["magnitude"]


def test_solution_meets_sparsity_and_reports_errors():
    prob = problem(groups=3, d=16, rows=4)
    sol = solve_layer(prob, Structure("unstructured", 0.75), "activation", "admm")
    assert sol.sparsity == pytest.approx(0.75, abs=1 / prob.w0.numel())
    assert sol.error_dense < sol.error_final < sol.error_projected


def test_nm_solution_keeps_the_pattern():
    prob = problem(d=32)
    sol = solve_layer(prob, Structure("nm", n=2, m=4, taps=1), "activation", "admm")
    counts = (sol.weight != 0).reshape(1, 12, 8, 4).sum(-1)
    assert int(counts.max()) <= 2
    assert sol.error_final < sol.error_projected


@pytest.mark.parametrize("kind", ["l1", "l0"])
def test_penalty_methods_reach_the_target(kind):
    prob = problem(d=32)
    sol = solve_layer(prob, Structure(kind, 0.7), "linear", "admm")
    assert abs(sol.sparsity - 0.7) <= 0.01
    assert sol.penalty_mu is not None and sol.penalty_mu > 0
    assert sol.error_final < sol.error_projected


def test_layer_without_bias_keeps_zero_bias():
    prob = problem(fit_bias=False)
    for loss in ("linear", "activation"):
        sol = solve_layer(prob, Structure("unstructured", 0.5), loss, "admm")
        assert torch.all(sol.bias == 0)


def test_through_activation_loss_cares_only_about_what_relu_passes():
    """Errors on pre-activations that ReLU clips to zero in both models cost nothing."""
    prob = problem(seed=3)
    sol = solve_layer(prob, Structure("unstructured", 0.85), "activation", "admm")
    linear = solve_layer(prob, Structure("unstructured", 0.85), "linear", "admm")
    after_relu_of_linear = prob.relative_error(linear.weight, linear.bias, "activation")
    assert sol.error_final <= after_relu_of_linear


def _gemm_problem(samples: int, d: int, upstream, seed: int, rows: int = 8) -> tuple[LayerProblem, callable]:
    """A Gemm layer (one patch per sample, ids 0..samples−1) whose compressed-model inputs are
    ``upstream(x, gen)``; also returns a maker of fresh problems from the same distribution."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(1, rows, d, generator=gen) / d ** 0.5
    b0 = torch.randn(rows, generator=gen) * 0.1

    def make(count: int, gen: torch.Generator) -> LayerProblem:
        x = torch.relu(torch.randn(count, 1, d, generator=gen) + 0.3)
        y = torch.einsum("pgd,grd->pgr", x, w0).reshape(count, -1) + b0
        return LayerProblem(x_hat=upstream(x, gen), y_ref=y, w0=w0, b0=b0, activation=None,
                            sample_ids=torch.arange(count))

    return make(samples, gen), lambda: make(4000, torch.Generator().manual_seed(seed + 100))


def test_dense_refit_with_fewer_samples_than_inputs_does_not_fit_the_noise():
    """200 samples for 400 inputs, upstream noise that carries no signal: the plain least squares
    interpolates the noise and is worse than the original weights on fresh samples; the held-out
    choice of the shrinkage (λ = ∞ allowed) is not."""
    from onnxadmm.algorithms.admm import refit_on_support

    prob, fresh = _gemm_problem(200, 400, lambda x, gen: x + 0.3 * torch.randn(x.shape, generator=gen), seed=3)
    stats = moments(prob)
    plain = masked_refit(stats, prob.w0, torch.ones_like(prob.w0, dtype=torch.bool))
    guarded_w, guarded_b = refit_on_support(prob, "linear", AdmmSettings())
    test = fresh()
    original = test.relative_error(prob.w0, prob.b0, "linear")
    assert test.relative_error(plain, bias_for(stats, plain), "linear") > 1.2 * original
    assert test.relative_error(guarded_w, guarded_b, "linear") <= 1.01 * original


def test_dense_refit_still_compensates_a_systematic_upstream_change():
    """Upstream channels halved (a signal, not noise): the held-out choice keeps the compensation,
    W ≈ 2·W₀, and the error on fresh samples falls far below the original weights'."""
    from onnxadmm.algorithms.admm import refit_on_support

    prob, fresh = _gemm_problem(2000, 40, lambda x, gen: 0.5 * x, seed=4)
    w, b = refit_on_support(prob, "activation", AdmmSettings())
    test = fresh()
    assert test.relative_error(w, b, "linear") < 0.01 * test.relative_error(prob.w0, prob.b0, "linear")


def test_held_out_patches_are_every_tenth_sample_and_need_enough_samples():
    prob, _ = _gemm_problem(200, 10, lambda x, gen: x, seed=5)
    held = prob.held_out()
    assert held.sum() == 20 and bool((prob.sample_ids[held] % 10 == 9).all())
    few, _ = _gemm_problem(50, 10, lambda x, gen: x, seed=5)
    assert few.held_out() is None  # 5 held-out samples: too few to choose on
    assert LayerProblem(x_hat=prob.x_hat, y_ref=prob.y_ref, w0=prob.w0, b0=prob.b0).held_out() is None


def test_held_out_patches_stored_last_make_both_sides_of_the_split_views_of_the_patches():
    from onnxadmm.algorithms.problem import held_out_last

    prob, _ = _gemm_problem(200, 10, lambda x, gen: x, seed=5)
    order = held_out_last(prob.sample_ids)
    stored = torch.empty_like(prob.x_hat).index_copy_(0, order, prob.x_hat)
    ids = torch.empty_like(prob.sample_ids).index_copy_(0, order, prob.sample_ids)
    assert ids[:180].tolist() == [i for i in range(200) if i % 10 != 9]  # each side in its own order
    assert ids[180:].tolist() == list(range(9, 200, 10))
    last = dataclasses.replace(prob, x_hat=stored, y_ref=torch.empty_like(prob.y_ref).index_copy_(0, order, prob.y_ref),
                               sample_ids=ids)
    held = last.held_out()
    for part, mask in ((last.subset(~held), ~held), (last.subset(held), held)):
        assert part.x_hat.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()  # a view
        assert torch.equal(part.x_hat, stored[mask]) and torch.equal(part.sample_ids, ids[mask])
    scattered = prob.subset(prob.held_out())  # held-out patches spread out: copied, the same rows
    assert torch.equal(scattered.x_hat, prob.x_hat[prob.sample_ids % 10 == 9])


def test_the_objective_s_subset_fits_its_memory_share_but_keeps_32_rows_per_unknown():
    from onnxadmm.algorithms.admm import ActivationObjective, grad_rows, subset_rows

    free = AdmmSettings()
    assert subset_rows(free, 1152, 25) == grad_rows(None, 25) == 4096  # no share: as before
    share = dataclasses.replace(free, subset_bytes=256 << 20, bf16_products=True)
    assert subset_rows(share, 1152, 25) == (256 << 20) // (1152 * 26 * 6)  # a wide depthwise conv: 1,424
    assert subset_rows(share, 1, 577) == grad_rows(None, 577)  # an ordinary conv: untouched
    assert subset_rows(dataclasses.replace(share, subset_bytes=1 << 20), 1152, 25) == 32 * 26  # the floor
    prob = problem(patches=3000, d=24, rows=1, groups=64)
    objective = ActivationObjective(prob, dataclasses.replace(free, subset_bytes=64 * 25 * 4 * 1000))
    assert objective.x_aug.shape == (64, 1000, 25) and objective.x_aug.numel() * 4 <= 64 * 25 * 4 * 1000


@pytest.mark.parametrize("patches", [12, 400])  # fewer samples than inputs (thin basis), and more
def test_preconditioner_inverts_the_gauss_newton_matrix(patches):
    from onnxadmm.algorithms.admm import ActivationObjective

    prob = problem(patches=patches, d=40, rows=5, groups=2)
    objective = ActivationObjective(prob, AdmmSettings())
    assert objective.thin == (patches < 41)
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(2, 5, 41, generator=gen)
    a2 = torch.rand(10, generator=gen) + 0.5
    rho = 0.3 * objective.curvature
    got = objective.precondition(grad, a2, rho).double()
    x = objective.x_aug.double()
    for g in range(2):
        s = x[g].T @ x[g]
        for r in range(5):
            matrix = float(a2[g * 5 + r]) * objective.kappa * s + rho * torch.eye(41, dtype=torch.float64)
            expected = torch.linalg.solve(matrix, grad[g, r].double())
            torch.testing.assert_close(got[g, r], expected, rtol=2e-3, atol=1e-6 * float(expected.abs().max()))


def test_admm_stops_once_the_support_settles_where_a_refit_on_it_follows():
    from onnxadmm.algorithms.admm import admm_activation

    prob = problem(patches=3000, d=32, rows=8)
    k = prob.w0.numel() // 2
    supports = []

    def project(v, rho=1.0):
        z = TopK(k)(v, rho)
        supports.append(z != 0)
        return z

    settings = AdmmSettings(iterations=60, tolerance=1e-12, settled_changes=0.0)  # the residual alone runs all 60
    z_full, _, full, _ = admm_activation(prob, prob.w0, prob.b0, project, settings)
    assert len(full.objective) == 60
    supports.clear()
    z_early, _, early, _ = admm_activation(prob, prob.w0, prob.b0, project, settings, support_decides=True)
    assert len(early.objective) < 60
    assert all(torch.equal(s, supports[-1]) for s in supports[-1 - settings.settled_iterations:])
    assert torch.equal(z_early != 0, z_full != 0)  # the support it stopped on is the one the full run ends on

    # settled up to a share of the support's size: stops no later, each of the last steps changed at most that
    loose = dataclasses.replace(settings, settled_changes=0.02)
    supports.clear()
    admm_activation(prob, prob.w0, prob.b0, project, loose, support_decides=True)
    last = supports[-1 - loose.settled_iterations:]
    assert len(supports) <= len(early.objective) + 1
    assert all(int((a != b).sum()) <= int(0.02 * int(b.sum())) for a, b in zip(last, last[1:]))


class _Quadratic:
    """f(θ) = Σ λ_j θ_j² with z = θ, descended with the step 1/(2 max λ): after the first step, the tiny λ
    leave a descent that gains almost nothing per step (a stand-in for a converged refit)."""

    curvature = 1.0
    x_low = None  # float32 products throughout

    def __init__(self, lam):
        self.lam = lam.reshape(1, -1)

    def pre_activation(self, theta, steering=False):
        return theta.reshape(1, -1).clone()

    def value_at(self, z):
        return float((self.lam * z * z).sum())

    def value_and_parts(self, z):
        return self.value_at(z), 2 * self.lam * z, torch.ones(z.shape[1])

    def gradient(self, dz, shape):
        return dz.reshape(shape)

    def precondition(self, grad, a2, rho):
        return grad / (2 * float(self.lam.max()))


def test_a_descent_with_a_stall_share_ends_once_its_last_steps_gain_less_than_it():
    from onnxadmm.algorithms.admm import STALL_WINDOW, _descent

    objective = _Quadratic(torch.tensor([1.0] + [1e-6] * 29, dtype=torch.float64))
    theta = torch.ones(1, 1, 30, dtype=torch.float64)
    values = []
    for stall in (0.0, 1e-3):
        end, _ = _descent(objective, theta, None, 0.0, None, 400, stall=stall)
        values.append(objective.value_at(end.reshape(1, -1)))
    assert values[0] < values[1] < objective.value_at(theta.reshape(1, -1))  # it stopped, after progress
    # where it stopped, STALL_WINDOW more steps gain less than the share (on this objective's slowing descent)
    later, _ = _descent(objective, end, None, 0.0, None, STALL_WINDOW)
    assert values[1] - objective.value_at(later.reshape(1, -1)) < 1e-3 * values[1]


@pytest.mark.parametrize("lam, steps", [([1.0] * 4, 1), ([1.0, 0.5, 1.0, 0.5], 3)])
def test_a_w_step_ends_after_a_full_step_that_did_what_its_quadratic_model_predicted(lam, steps):
    """Where the preconditioner is the Hessian, the first full step lowers f by the ½⟨g, D⟩ its model predicts
    and lands on the minimum: with ``model_fit`` the descent ends there. Where it is not (half the coordinates'
    curvature is half the preconditioner's), each step gains more than predicted and the descent goes on."""
    from onnxadmm.algorithms.admm import MODEL_FIT, _descent

    objective = _Quadratic(torch.tensor(lam, dtype=torch.float64))
    calls, evaluate = [], objective.value_and_parts
    objective.value_and_parts = lambda z: calls.append(z) or evaluate(z)
    _descent(objective, torch.ones(1, 1, 4, dtype=torch.float64), None, 0.0, None, 3, model_fit=MODEL_FIT)
    assert len(calls) == steps


@pytest.mark.parametrize("groups", [1, 3])
def test_the_gradient_is_the_subset_s_transpose_times_dz_from_either_layout(groups):
    """An ungrouped layer's gradient reads a transposed copy of X̃ (faster along M); a grouped one reads X̃: both
    are X̃ᵀ·dz per group."""
    from onnxadmm.algorithms.admm import ActivationObjective

    prob = problem(seed=5, patches=3000, d=24, rows=6, groups=groups)
    objective = ActivationObjective(prob, AdmmSettings())
    assert (objective.x_grad is not None) == (groups == 1)
    dz = torch.randn(objective.x_aug.shape[1], groups * 6, generator=torch.Generator().manual_seed(1))
    expected = torch.einsum("gmd,gmr->grd", objective.x_aug.double(), dz.reshape(-1, groups, 6).transpose(0, 1).double())
    grad = objective.gradient(dz, (groups, 6, 25))
    assert grad.shape == (groups, 6, 25) and grad.is_contiguous()
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loss, groups", [("activation", 1), ("linear", 2)])
def test_errors_of_several_weights_in_one_pass_equal_each_computed_alone(loss, groups):
    prob = problem(seed=6, patches=20000, d=16, rows=5, groups=groups)
    candidates = [(prob.w0, prob.b0), (prob.w0 * 0.5, prob.b0 + 0.1), (torch.zeros_like(prob.w0), prob.b0)]
    together = prob.relative_errors(candidates, loss)
    for (w, b), error in zip(candidates, together):
        alone = (prob.prediction(w, b, loss) - prob.target(loss)).double().pow(2).sum() / \
            prob.target(loss).double().pow(2).sum()
        assert error == pytest.approx(float(alone), rel=1e-4)


@pytest.mark.parametrize("structure, ends_on_fit", [(Structure("unstructured", sparsity=0.5), True),
                                                     (Structure("kernels", sparsity=0.5, taps=9), False)])
def test_only_unstructured_sparsity_ends_its_w_steps_on_the_model_fit(structure, ends_on_fit, monkeypatch):
    """Whole groups (kernels, channels) keep every W-step's 3 steps: channel pruning lost accuracy without them."""
    import onnxadmm.algorithms.admm as admm

    shares, descend = [], admm._descent
    monkeypatch.setattr(admm, "_descent", lambda *a, **k: shares.append(k.get("model_fit", 0.0)) or descend(*a, **k))
    solve_layer(problem(seed=2, patches=3000, d=18, rows=4), structure, "activation", "admm", AdmmSettings(iterations=5))
    assert shares and any(shares) == ends_on_fit
    assert set(shares) <= {0.0, admm.MODEL_FIT}


def test_a_chain_that_only_shifts_is_solved_as_the_linear_problem():
    """σ(z; s) = z + c + s (bias and residual): the problem becomes the linear one with target y₀ + s − ŝ,
    which has the same minimizer and value; a chain with a nonlinearity is left as it is."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(600, 1, 12, generator=gen)
    w0, b0 = torch.randn(1, 5, 12, generator=gen), torch.randn(5, generator=gen)
    y = torch.bmm(x.transpose(0, 1), w0.transpose(1, 2)).transpose(0, 1).reshape(600, 5) + b0
    side_ref, side_hat = torch.randn(600, 5, generator=gen), torch.randn(600, 5, generator=gen)
    shift = torch.randn(5, generator=gen)

    def residual(z, sides):
        return z + shift + sides[0]

    problem = LayerProblem(x_hat=x + 0.1 * torch.randn(x.shape, generator=gen), y_ref=y, w0=w0, b0=b0,
                           side_hat=(side_hat,), side_ref=(side_ref,), activation=residual)
    linear = problem.shift_free()
    assert linear.activation is None and not linear.side_hat
    torch.testing.assert_close(linear.y_ref, y + side_ref - side_hat)
    w, b = w0 * 0.7, b0 + 0.2
    through_chain = problem.prediction(w, b, "activation") - problem.target("activation")
    assert torch.allclose(linear.prediction(w, b, "linear") - linear.target("linear"), through_chain, atol=1e-5)
    relu = LayerProblem(x_hat=x, y_ref=y, w0=w0, b0=b0, side_hat=(side_hat,), side_ref=(side_ref,),
                        activation=lambda z, sides: torch.relu(z + sides[0]))
    assert relu.shift_free() is relu


def test_history_stalls_when_the_objective_stops_improving():
    from onnxadmm.algorithms.admm import AdmmHistory
    history = AdmmHistory()
    for value in (1.0, 0.8, 0.7, 0.699, 0.6985, 0.698, 0.6979, 0.6978):
        history.record(value, 0.0, 0.0, 1.0)
    assert history.stalled(5)  # the last five are within 0.5 % of 0.7
    assert not history.stalled(6)  # 0.7 in the window: the best before it (0.8) is 13 % worse
    assert not history.stalled(0)


@pytest.mark.parametrize("structure", [Structure("unstructured", 0.7), Structure("grid", bits=8, keep_zeros=True)])
def test_bf16_steering_products_solve_a_layer_as_well_as_float32(structure, monkeypatch):
    monkeypatch.setattr("onnxadmm.algorithms.admm.BF16_FROM_MACS", 0)  # bf16 for this small layer too
    prob = problem(seed=3, patches=8000, d=96, rows=16)
    solutions = {bf16: solve_layer(prob, structure, "activation", "admm", AdmmSettings(bf16_products=bf16))
                 for bf16 in (False, True)}
    assert not torch.equal(solutions[True].weight, solutions[False].weight)  # the products did run in bfloat16
    fp32, bf16 = solutions[False].error_final, solutions[True].error_final
    assert bf16 <= 1.05 * fp32 + 1e-5, (bf16, fp32)
    assert solutions[True].sparsity == pytest.approx(solutions[False].sparsity, abs=0.01)


def test_the_carried_pre_activation_is_recomputed_before_bf16_rounding_accumulates(monkeypatch):
    monkeypatch.setattr("onnxadmm.algorithms.admm.BF16_FROM_MACS", 0)  # bf16 for this small layer too
    from onnxadmm.algorithms.admm import EXACT_EVERY, ActivationObjective, Carried, _descent

    prob = problem(seed=4, patches=8000, d=96, rows=16)
    objective = ActivationObjective(prob, AdmmSettings(bf16_products=True))
    theta = torch.cat([prob.w0 * 0.5, prob.b0.reshape(1, -1, 1)], dim=-1)
    carried = None
    for _ in range(3 * EXACT_EVERY):  # W-steps of one step each, z carried from one to the next
        theta, carried = _descent(objective, theta, None, 0.0, None, 1, carried)
        assert carried.rounded_steps <= EXACT_EVERY
        exact = objective.pre_activation(theta)
        assert float((carried.z - exact).norm() / exact.norm()) < 1e-2
    assert isinstance(carried, Carried)
    # float32 products carry z exactly up to float32 rounding
    objective32 = ActivationObjective(prob, AdmmSettings())
    theta32, carried32 = _descent(objective32, theta, None, 0.0, None, 8)
    assert carried32.rounded_steps == 0
    assert float((carried32.z - objective32.pre_activation(theta32)).norm() /
                 objective32.pre_activation(theta32).norm()) < 1e-5


def test_bf16_steering_stops_for_a_layer_once_float32_disagrees_with_it(monkeypatch):
    monkeypatch.setattr("onnxadmm.algorithms.admm.BF16_FROM_MACS", 0)  # bf16 for this small layer too
    from onnxadmm.algorithms.admm import EXACT_EVERY, ActivationObjective, refit_activation

    prob = problem(seed=6, patches=8000, d=96, rows=16)
    support = torch.ones_like(prob.w0, dtype=torch.bool)
    start = prob.w0 * 0.5
    exact = ActivationObjective(prob, AdmmSettings())
    w32, b32 = refit_activation(exact, start, prob.b0, support, 4 * EXACT_EVERY)
    honest = ActivationObjective(prob, AdmmSettings(bf16_products=True))
    refit_activation(honest, start, prob.b0, support, 4 * EXACT_EVERY)
    assert honest.x_low is not None  # true bfloat16 rounding stays within the drift share on this layer
    skewed = ActivationObjective(prob, AdmmSettings(bf16_products=True))
    skewed.x_low = (skewed.x_aug * 1.1).bfloat16()  # a steering copy 10 % off: z drifts from X̃θᵀ
    w, b = refit_activation(skewed, start, prob.b0, support, 4 * EXACT_EVERY)
    assert skewed.x_low is None  # the first float32 recompute saw the drift and stopped bf16
    assert prob.relative_error(w, b, "activation") <= 1.05 * prob.relative_error(w32, b32, "activation")


def test_small_products_stay_float32_where_converting_would_cost_what_bf16_saves():
    from onnxadmm.algorithms.admm import BF16_FROM_MACS, ActivationObjective

    small = ActivationObjective(problem(seed=7, patches=4000, d=48, rows=12), AdmmSettings(bf16_products=True))
    assert small.x_aug.numel() * 12 < BF16_FROM_MACS and small.x_low is None
    large = ActivationObjective(problem(seed=7, patches=16384, d=575, rows=16), AdmmSettings(bf16_products=True))
    assert large.x_aug.numel() * 16 >= BF16_FROM_MACS and large.x_low.dtype == torch.bfloat16


def _relu_problem(samples: int, d: int, upstream, seed: int) -> tuple[LayerProblem, callable]:
    prob, fresh = _gemm_problem(samples, d, upstream, seed)
    relu = lambda z, sides: torch.relu(z)  # noqa: E731
    return dataclasses.replace(prob, activation=relu), lambda: dataclasses.replace(fresh(), activation=relu)


@pytest.mark.parametrize("samples, d, upstream", [
    (200, 400, lambda x, gen: x + 0.3 * torch.randn(x.shape, generator=gen)),  # noise: the descent fits it
    (2000, 40, lambda x, gen: 0.5 * x),  # a systematic change the descent compensates
])
def test_the_refit_descent_takes_the_steps_after_which_the_held_out_error_was_lowest(samples, d, upstream):
    """Early stopping: the steps returned are those of the look (every REFIT_CHECK_STEPS steps) with the lowest
    held-out error before the first look that did not lower it."""
    from onnxadmm.algorithms.admm import REFIT_CHECK_STEPS, ActivationObjective, _descent, _held_out_steps

    prob, _ = _relu_problem(samples, d, upstream, seed=6)
    held = prob.held_out()
    fit, check = prob.subset(~held), prob.subset(held)
    support = torch.ones_like(prob.w0, dtype=torch.bool)
    settings = AdmmSettings()
    steps = _held_out_steps(fit, check, prob.w0, prob.b0, support, "activation", settings)
    objective = ActivationObjective(fit, settings)
    theta, carried = torch.cat([prob.w0, prob.b0.reshape(1, -1, 1)], dim=-1), None
    errors = [check.relative_error(prob.w0, prob.b0, "activation")]
    for _ in range(settings.refit_steps // REFIT_CHECK_STEPS):
        theta, carried = _descent(objective, theta, None, 0.0, torch.ones_like(theta), REFIT_CHECK_STEPS, carried,
                                  stall=1e-4)
        errors.append(check.relative_error(theta[..., :-1], theta[..., -1].reshape(-1), "activation"))
    falling = next((k for k in range(1, len(errors)) if not errors[k] < errors[k - 1]), len(errors))
    assert steps == (falling - 1) * REFIT_CHECK_STEPS
    if d == 40:
        assert steps > 0 and errors[steps // REFIT_CHECK_STEPS] < 0.5 * errors[0]



def test_the_refit_after_admm_on_a_linear_loss_chooses_its_shrinkage_on_held_out_samples():
    """200 samples for 400 inputs with upstream noise: on ADMM's support, the plain least squares fits the
    noise; the solve's refit (shrinkage toward W₀ on the support, chosen on held-out samples) does better on
    fresh samples."""
    prob, fresh = _gemm_problem(200, 400, lambda x, gen: x + 0.3 * torch.randn(x.shape, generator=gen), seed=3)
    sol = solve_layer(prob, Structure("unstructured", 0.3), "linear", "admm")
    stats = moments(prob)
    plain = masked_refit(stats, sol.weight, sol.mask)
    test = fresh()
    assert test.relative_error(sol.weight, sol.bias, "linear") < 0.9 * test.relative_error(
        plain, bias_for(stats, plain), "linear")


def test_rows_sharing_one_support_are_solved_directly_to_the_same_least_squares():
    from onnxadmm.algorithms import refit

    prob = problem(d=40, rows=6)
    stats = moments(prob, damping=0.0)
    columns = torch.rand(40, generator=torch.Generator().manual_seed(2)) > 0.3  # input channels kept
    mask = columns.expand(1, 6, 40).clone()
    direct = refit._shared_support_refit(stats, mask)
    by_cg = refit._masked_refit_rows(stats.sigma, stats.cross, torch.zeros_like(prob.w0), mask, None, 1e-14)
    assert direct is not None and torch.allclose(direct, by_cg, atol=1e-5)
    assert bool((direct[..., ~columns] == 0).all())
    mask[0, 0, int(torch.nonzero(columns)[0])] = False  # one row's support differs: conjugate gradients
    assert refit._shared_support_refit(stats, mask) is None


def test_split_moments_from_the_whole_problems_moments_equal_those_taken_again():
    from onnxadmm.algorithms.refit import split_moments

    prob, _ = _gemm_problem(200, 10, lambda x, gen: x, seed=5)
    held = prob.held_out()
    again, reused = split_moments(prob, held), split_moments(prob, held, whole=moments(prob))
    for a, b in zip(again, reused):
        assert torch.equal(a.sigma, b.sigma) and torch.equal(a.cross, b.cross) and a.var_y == b.var_y
