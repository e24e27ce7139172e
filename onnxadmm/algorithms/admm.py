"""Layer-wise ADMM for   min f(W, b)  subject to  W ∈ C   (C given by its Z-step ``project``).

Scaled-form iterations with a growing penalty ρ (Zhang et al. 2018; Kiaee et al. 2016 keep ρ fixed):
    W  ← argmin f(W) + ρ/2 ‖W − Z + U‖²
    Z  ← project(W + U, ρ)
    U  ← U + W − Z;     ρ ← γρ (and U ← U/γ, keeping ρU fixed)
then W = Z and a refit of the nonzero entries on their support.

W-step, linear loss f = ‖W x̂ + b − y‖²: closed form W = (C + ρ'(Z − U))(Σ + ρ'I)⁻¹ with Σ = QΛQᵀ
computed once, so every ρ costs two products. W-step through the activation σ: preconditioned gradient
steps with per-output curvature a_o² = E[σ'(z_o)²] and the preconditioner a_o²κΣ̃ + ρ (same Q), each step
accepted only when the objective decreases (halving otherwise).
Where the CPU multiplies bfloat16 in hardware (``bf16_native``), the steps' two products with the sampled
inputs X̃ — the gradient DzᵀX̃ and the direction's X̃Dᵀ — run in bfloat16 when large (``BF16_FROM_MACS``;
float32 accumulation, ~2⁻⁹ relative rounding of each operand). They steer: θ is updated exactly, f(Z) and the
refits' errors are float32, and the line search judges z − tX̃Dᵀ with the rounded X̃Dᵀ; z = X̃θᵀ, carried from
step to step, drifts by that rounding and is recomputed in float32 every ``EXACT_EVERY`` steps — where f of the
carried z was more than ``DRIFT_SHARE`` off, the layer continues in float32.
ρ is expressed relative to the mean curvature of f, so the settings do not depend on the layer's scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .problem import CHUNK_BYTES, LayerProblem
from .refit import Moments, bias_for, masked_refit, moments, ridge, split_moments

Projection = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class AdmmSettings:
    iterations: int = 40
    rho_init: float = 0.02  # relative to the mean curvature of the layer objective
    rho_growth: float = 1.2
    inner_steps: int = 3  # gradient steps per W-step through the activation
    refit_steps: int = 40  # masked steps through the activation after the support is fixed
    grad_patches: int | None = None  # None: 32·(d+1) rows, between 4096 and 16384
    tolerance: float = 1e-4  # stop when ‖W − Z‖ / ‖W₀‖ falls below it
    settled_iterations: int = 3  # or, where a refit on Z's support follows, once it is settled this many times:
    settled_changes: float = 0.01  # entries that entered or left it since the last one: at most this share of it
    stall_iterations: int = 0  # or (0 = off) once f(Z) has not improved by STALL_GAIN in this many iterations
    seed: int = 0
    bf16_products: bool = False  # the descent's products with X̃ in bfloat16 (see the module docstring)
    subset_bytes: int | None = None  # memory for the objective's copy of its patches (None: no bound)
    model_fit: float = 0.0  # a W-step ends after a full step within this share of its model's decrease (0: off)
    layer_bytes: int | None = None  # memory for one layer's solve: beyond it, in blocks of rows (``rowblocks.py``)
    # called after every iteration with (iteration, iterations, primal residual, part): progress inside a long
    # layer; ``part`` names the block of rows being solved (``rowblocks.py``), "" for the whole layer
    on_iteration: Callable[[int, int, float, str], None] | None = field(default=None, compare=False, repr=False)
    part: str = field(default="", compare=False)

    def report(self, step: int, primal: float) -> None:
        if self.on_iteration is not None:
            self.on_iteration(step + 1, self.iterations, primal, self.part)


STALL_GAIN = 0.005  # relative improvement of f(Z) that counts as progress for ``stall_iterations``
# the refits' descent (support fixed) ends once STALL_WINDOW steps together gained less than REFIT_STALL of f
REFIT_STALL = 1e-4
STALL_WINDOW = 5
REFIT_CHECK_STEPS = 5  # a held-out refit's steps between two looks at the held-out error (early stopping)
EXACT_EVERY = 6  # bf16 products: steps after which the carried z = X̃θᵀ is recomputed in float32
BF16_FROM_MACS = 10 ** 8  # ... for products this large (smaller ones gain little: docs/SCALE.md)
# unstructured sparsity: a W-step's descent ends after a full step whose decrease is within this share of its
# quadratic model's, where the next step would gain little; not for whole channels (measured: docs/SCALE.md)
MODEL_FIT = 0.05
RECORD_SHARE = 4  # the history's f(Z), where no rule reads it, is taken on this fraction of the subset's rows
DRIFT_SHARE = 0.01  # ... and after which bf16 stops for the layer if f(carried z) was off f(X̃θᵀ) by more


def bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: x86 AMX tiles, or AVX512-BF16 dot products (AMD
    Zen 4, Intel Cooper Lake); elsewhere bfloat16 is emulated."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(probe and probe()) for probe in probes)


@dataclass
class AdmmHistory:
    """Per iteration: objective f(Z) (relative error; where no stopping rule reads it, on a quarter of the
    subset's rows), primal ‖W−Z‖/‖W₀‖, dual ρ‖Z−Z_prev‖/‖W₀‖, ρ."""

    objective: list[float] = field(default_factory=list)
    primal_residual: list[float] = field(default_factory=list)
    dual_residual: list[float] = field(default_factory=list)
    rho: list[float] = field(default_factory=list)

    def record(self, objective: float, primal: float, dual: float, rho: float) -> None:
        self.objective.append(float(objective))
        self.primal_residual.append(float(primal))
        self.dual_residual.append(float(dual))
        self.rho.append(float(rho))

    def as_dict(self) -> dict:
        return {"objective": self.objective, "primal_residual": self.primal_residual,
                "dual_residual": self.dual_residual, "rho": self.rho}

    def stalled(self, window: int) -> bool:
        """The best f(Z) of the last ``window`` iterations is not STALL_GAIN below the best before them."""
        if not window or len(self.objective) <= window:
            return False
        before = min(self.objective[:-window])
        return min(self.objective[-window:]) > (1.0 - STALL_GAIN) * before


class _Settled:
    """Counts the iterations in a row whose Z's support differs from the one before in at most ``changes`` times
    its size (entries in or out); true at ``needed`` in a row (never when ``needed`` is 0). The last few entries
    to cross the threshold sit at its margin, where the refit on the support decides their value."""

    def __init__(self, needed: int, changes: float = 0.0):
        self.needed, self.changes, self.count, self.support = needed, changes, 0, None

    def __call__(self, z: torch.Tensor) -> bool:
        if not self.needed:
            return False
        support = z != 0
        settled = self.support is not None and \
            int(torch.count_nonzero(support != self.support)) <= int(self.changes * int(torch.count_nonzero(support)))
        self.count = self.count + 1 if settled else 0
        self.support = support
        return self.count >= self.needed


def admm_linear(stats: Moments, w_start: torch.Tensor, project: Projection, settings: AdmmSettings,
                rho_fixed: bool = False, support_decides: bool = False) -> tuple[torch.Tensor, AdmmHistory]:
    """ADMM on the linear objective from its moments; returns Z (in C) and the history (``support_decides``:
    as in ``admm_activation``)."""
    sigma, cross = stats.sigma, stats.cross
    eigenvalues, basis = torch.linalg.eigh(sigma)  # (G,d), (G,d,d)
    eigenvalues = eigenvalues.clamp_min(0)
    curvature = stats.mean_eigenvalue
    norm0 = float(w_start.double().norm()) or 1.0
    history = AdmmHistory()
    w = w_start.double()
    rho = settings.rho_init * curvature
    z = project(w.float(), rho).double()
    u = torch.zeros_like(w)
    settled = _Settled(settings.settled_iterations if support_decides else 0, settings.settled_changes)
    for step in range(settings.iterations):
        rhs = cross + rho * (z - u)
        w = torch.bmm(torch.bmm(rhs, basis) / (eigenvalues[:, None, :] + rho), basis.transpose(1, 2))
        z, u, primal, dual = _z_and_dual_step(w, z, u, lambda v, r: project(v.float(), r).double(), rho, norm0)
        history.record(stats.relative_error(z), primal, dual, rho / curvature)
        if _stops(step, primal, z, history, settings, settled):
            break
        rho, u = _grown(rho, u, settings, rho_fixed)
    return z.float(), history


def _z_and_dual_step(w: torch.Tensor, z: torch.Tensor, u: torch.Tensor, project: Projection, rho: float,
                     norm0: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Z ← Π(W + U), U ← U + W − Z; with the primal ‖W − Z‖ and dual ρ‖Z − Z_prev‖ residuals over ‖W₀‖."""
    z_next = project(w + u, rho)
    u = u + w - z_next
    return z_next, u, float((w - z_next).norm()) / norm0, rho * float((z_next - z).norm()) / norm0


def _stops(step: int, primal: float, z: torch.Tensor, history: AdmmHistory, settings: AdmmSettings,
           settled: _Settled) -> bool:
    """After at least 4 iterations: the primal residual is below tolerance, Z's support has settled, or f(Z)
    has stalled."""
    settings.report(step, primal)
    return (primal < settings.tolerance or settled(z) or history.stalled(settings.stall_iterations)) and step >= 3


def _grown(rho: float, u: torch.Tensor, settings: AdmmSettings, rho_fixed: bool) -> tuple[float, torch.Tensor]:
    """ρ ← ρ·growth and the scaled dual U ← U / growth (the same unscaled dual), unless ρ is fixed."""
    if rho_fixed:
        return rho, u
    return rho * settings.rho_growth, u / settings.rho_growth


def grad_rows(requested: int | None, inputs: int) -> int:
    """Patches the gradient steps use: as asked, or 32 per unknown of a row (d + 1), in [4096, 16384].
    Too few over-fit the activation refit to the subset (ResNet-56 channel pruning at 0.65 MACs lost
    2.4 pt top-1 with 4096 rows, 0.8 pt with 16384)."""
    if requested:
        return requested
    return int(min(16384, max(4096, 32 * (inputs + 1))))


def subset_rows(settings: AdmmSettings, groups: int, inputs: int) -> int:
    """Rows of the objective's subset: ``grad_rows``, lowered where its copies of [x̂; 1] (float32, bfloat16
    where the products use it, and an ungrouped layer's transposed copy) would exceed ``settings.subset_bytes``
    — wide grouped layers, such as a depthwise conv of 1,152 channels with 5×5 kernels — but never below 32
    rows per unknown."""
    rows = max(grad_rows(settings.grad_patches, inputs), 4 * (inputs + 1))
    if settings.subset_bytes is None:
        return rows
    per_row = groups * (inputs + 1) * (8 if groups == 1 else 6 if settings.bf16_products else 4)
    return min(rows, max(32 * (inputs + 1), settings.subset_bytes // per_row))


class ActivationObjective:
    """f(W, b) = ‖σ(W x̂ + b) − t‖² / ‖t‖² on a fixed subset of patches, with its gradient and
    the eigenbasis of the augmented input second moment Σ̃ = E[x̃x̃ᵀ], x̃ = [x̂; 1]."""

    def __init__(self, problem: LayerProblem, settings: AdmmSettings):
        count, g, d = problem.x_hat.shape
        take = min(count, subset_rows(settings, g, d))
        key = ("objective subset", take, settings.seed)  # (built from x̂ alone: shared by a layer's row blocks)
        if key not in problem.shared or problem.shared[key][0] is not problem.x_hat:
            problem.shared[key] = (problem.x_hat, _subset_inputs(problem.x_hat, take, settings.seed))
        self.rows, self.x_aug, self.eigenvalues, self.basis, self.thin = problem.shared[key][1]
        self.problem = problem
        self.target = problem.target("activation")[self.rows]
        self.sides = problem.sides("hat", self.rows)
        self.scale = 1.0 / (float(self.target.pow(2).sum()) or 1.0)
        macs = self.x_aug.numel() * problem.w0.shape[1]  # of one product with X̃: G·M·(d+1)·R
        self.x_low = self.x_aug.bfloat16() if settings.bf16_products and macs >= BF16_FROM_MACS else None
        self.x_grad = self._transposed()
        # Gauss-Newton curvature of row o: a_o²·κ·S with κ = 2·scale; its mean eigenvalue is tr(S)/(d+1)
        self.kappa = 2.0 * self.scale
        mean_eigenvalue = float(self.eigenvalues.sum(-1).mean()) / (d + 1) if self.thin else \
            float(self.eigenvalues.mean())
        self.curvature = self.kappa * mean_eigenvalue or 1.0

    def _transposed(self) -> torch.Tensor | None:
        """X̃ᵀ (1, d+1, M), contiguous, in the gradient's precision, for an ungrouped layer: its gradient X̃ᵀ·dz
        reads X̃ along M, faster from this copy than from X̃ itself. Not for grouped layers, whose per-group
        products (few outputs each) are faster from X̃ (docs/SCALE.md)."""
        if self.x_aug.shape[0] != 1:
            return None
        return (self.x_aug if self.x_low is None else self.x_low).transpose(1, 2).contiguous()

    def stop_steering(self) -> None:
        """Every product in float32 from now on."""
        self.x_low = None
        self.x_grad = None  # the bfloat16 copy freed before the float32 one is made
        self.x_grad = self._transposed()

    def pre_activation(self, theta: torch.Tensor, steering: bool = False) -> torch.Tensor:
        """z = X̃θᵀ on the subset: (M, Cout); ``steering``: in bfloat16 where the objective has its copy."""
        g, r, _ = theta.shape
        if steering and self.x_low is not None:
            z = torch.bmm(self.x_low, theta.transpose(1, 2).bfloat16()).float()
        else:
            z = torch.bmm(self.x_aug, theta.transpose(1, 2))
        return z.transpose(0, 1).reshape(-1, g * r)

    def value_and_parts(self, z: torch.Tensor):
        """From z = X̃θᵀ: f(θ), dL/dz (M, Cout) and the per-output curvature factor a² (Cout)."""
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.problem.sigma(z, self.sides)
            (slope,) = torch.autograd.grad(out.sum(), z, allow_unused=True)
        if slope is None:
            slope = torch.zeros_like(z)
        diff = out.detach() - self.target
        value = squared_norm(diff) * self.scale
        dz = 2.0 * self.scale * diff * slope
        a2 = slope.pow(2).mean(dim=0).clamp_min(1e-3)
        return value, dz, a2

    def value_at(self, z: torch.Tensor) -> float:
        """f from z = X̃θᵀ."""
        with torch.no_grad():
            out = self.problem.sigma(z, self.sides)
        return squared_norm(out - self.target) * self.scale

    def recorded_value(self, theta: torch.Tensor) -> float:
        """f(θ) on the first 1/RECORD_SHARE of the subset's rows (a random draw, sorted) from the steering
        product: the history's record where it decides nothing, at a quarter of a full evaluation's cost."""
        g, r, _ = theta.shape
        rows = max(1, self.target.shape[0] // RECORD_SHARE)
        x = (self.x_aug if self.x_low is None else self.x_low)[:, :rows]
        z = torch.bmm(x, theta.transpose(1, 2).to(x.dtype)).float().transpose(0, 1).reshape(-1, g * r)
        target = self.target[:rows]
        with torch.no_grad():
            out = self.problem.sigma(z, tuple(side[:rows] for side in self.sides))
        return squared_norm(out - target) / (squared_norm(target) or 1.0)

    def value(self, theta: torch.Tensor) -> float:
        """f(θ), in float32."""
        return self.value_at(self.pre_activation(theta))

    def gradient(self, dz: torch.Tensor, shape) -> torch.Tensor:
        g, r, _ = shape
        dz_groups = dz.reshape(-1, g, r).transpose(0, 1)  # (G, M, R)
        if self.x_grad is not None:
            grad = torch.bmm(self.x_grad, dz_groups.to(self.x_grad.dtype)).float().transpose(1, 2).contiguous()
        elif self.x_low is not None:
            grad = torch.bmm(dz_groups.transpose(1, 2).bfloat16(), self.x_low).float()
        else:
            grad = torch.bmm(dz_groups.transpose(1, 2), self.x_aug)  # (G, R, d+1)
        if not self.problem.fit_bias:
            grad[..., -1] = 0.0
        return grad

    def precondition(self, grad: torch.Tensor, a2: torch.Tensor, rho: float) -> torch.Tensor:
        """(a_o²κS + ρI)⁻¹ applied to each row o of ``grad``. With the thin basis V (S = VΛVᵀ, V of k < d+1
        orthonormal columns) by Woodbury: g/ρ + (gV)·(1/(a²κλ + ρ) − 1/ρ)·Vᵀ."""
        g, r, _ = grad.shape
        scaled = torch.bmm(grad, self.basis)  # (G, R, k)
        denom = a2.reshape(g, r, 1) * self.kappa * self.eigenvalues[:, None, :] + rho
        if self.thin:
            return torch.baddbmm(grad, scaled * (1.0 / denom - 1.0 / rho), self.basis.transpose(1, 2), beta=1.0 / rho)
        return torch.bmm(scaled / denom, self.basis.transpose(1, 2))


def _subset_inputs(x_hat: torch.Tensor, take: int, seed: int):
    """The objective's subset: ``take`` patches drawn with ``seed`` (sorted), X̃ = [x̂ on them; 1] (G, M, d+1) —
    filled in chunks, so no (M, G, d) copy is held beside it — and the eigenbasis of X̃ᵀX̃ (``_eigenbasis``)."""
    count, g, d = x_hat.shape
    rows = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:take].sort().values
    x_aug = torch.empty((g, take, d + 1))
    x_aug[..., d] = 1.0
    chunk = max(1, CHUNK_BYTES // (4 * g * d))
    for start in range(0, take, chunk):
        part = rows[start:start + chunk]
        x_aug[:, start:start + len(part), :d] = x_hat[part].transpose(0, 1)
    return (rows, x_aug, *_eigenbasis(x_aug))


def squared_norm(x: torch.Tensor) -> float:
    """‖x‖² as one float32 dot product (blocked accumulation: relative error ~1e-7 on a million entries, 20×
    faster than summing a float64 copy)."""
    flat = x.reshape(-1)
    return float(torch.dot(flat, flat))


def _eigenbasis(x_aug: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigenvalues (G, k) and orthonormal eigenvectors (G, d+1, k) of S = X̃ᵀX̃ for X̃ (G, M, d+1), in float32.
    S is formed in float32 and decomposed in float64: it only preconditions (every step is accepted on the
    objective's decrease), so its rounding changes the path, not what a step must achieve.

    M ≥ d+1: the full eigendecomposition of S, O(d³). M < d+1 (few samples for a wide layer, e.g. a
    classifier on 9216 features fed by 16 images): S has rank ≤ M, and its nonzero spectrum comes from the
    Gram matrix K = X̃X̃ᵀ = UΛUᵀ as V = X̃ᵀUΛ^(-1/2), O(M²d) — the cost follows the data, not d² (``thin``).
    Directions of numerically zero eigenvalue get a zero column (they act as the complement)."""
    g, m, d1 = x_aug.shape
    if m >= d1:
        eigenvalues, basis = torch.linalg.eigh(torch.bmm(x_aug.transpose(1, 2), x_aug).double())
        return eigenvalues.clamp_min(0).float(), basis.float(), False
    x_aug = x_aug.double()
    eigenvalues, u = torch.linalg.eigh(torch.bmm(x_aug, x_aug.transpose(1, 2)))  # (G, M), (G, M, M)
    eigenvalues = eigenvalues.clamp_min(0)
    kept = eigenvalues > 1e-10 * eigenvalues.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    inverse_root = torch.where(kept, eigenvalues.clamp_min(1e-300).rsqrt(), torch.zeros_like(eigenvalues))
    basis = torch.bmm(x_aug.transpose(1, 2), u) * inverse_root[:, None, :]  # (G, d+1, M)
    return (eigenvalues * kept).float(), basis.float(), True


@dataclass
class Carried:
    """z = X̃θᵀ carried from one step to the next, how many steps updated it through bfloat16 products, and
    f(z) when known."""

    z: torch.Tensor
    rounded_steps: int = 0
    value: float | None = None


def _recomputed(objective: ActivationObjective, theta: torch.Tensor, z: torch.Tensor, value: float | None
                ) -> tuple[torch.Tensor, float]:
    """z = X̃θᵀ and its f in float32, after bfloat16 steps carried ``z`` (f ``value``); bfloat16 stops for the
    objective when the two f differ by more than DRIFT_SHARE (the rounding then steers as much as the data)."""
    tracked = value if value is not None else objective.value_at(z)
    z = objective.pre_activation(theta)
    value = objective.value_at(z)
    if abs(tracked - value) > DRIFT_SHARE * value:
        objective.stop_steering()
    return z, value


def _descent(objective: ActivationObjective, theta: torch.Tensor, penalty: "_Penalty | None", rho: float,
             mask: torch.Tensor | None, steps: int, carried: Carried | None = None, stall: float = 0.0,
             model_fit: float = 0.0) -> tuple[torch.Tensor, Carried]:
    """Up to ``steps`` preconditioned steps on F(θ) = f(θ) + ρ/2‖W − A‖² (the penalty when given), each accepted
    only if it decreases F (halving the step otherwise); with ``stall``, ended once STALL_WINDOW steps in a row
    gained less than that share of F; with ``model_fit`` (unmasked steps only), ended after a full step whose
    decrease came within that share of the ½⟨g, D⟩ its quadratic model predicts (D = P⁻¹g): where the model
    fits, the next step gains little. Returns θ and its z = X̃θᵀ (``carried``: that of the given θ, when the
    caller has it). Along a direction D the trials cost no weight-sized work: z(θ − tD) = z − t·X̃Dᵀ, and the
    penalty changes by ρ/2(t²‖D_W‖² − 2t⟨W − A, D_W⟩)."""
    carried = carried or Carried(objective.pre_activation(theta))
    z, rounded_steps, value = carried.z, carried.rounded_steps, carried.value
    residual = penalty.residual(theta) if penalty else None
    values = []
    for _ in range(steps):
        if rounded_steps >= EXACT_EVERY:
            (z, value), rounded_steps = _recomputed(objective, theta, z, value), 0
        if stall and len(values) > STALL_WINDOW and \
                values[-1 - STALL_WINDOW] - values[-1] < stall * values[-1 - STALL_WINDOW]:
            break
        value_here, dz, a2 = objective.value_and_parts(z)
        value = value_here if value is None else value
        grad = objective.gradient(dz, theta.shape)
        if penalty:
            grad.add_(residual, alpha=rho)
        direction = objective.precondition(grad, a2, rho if penalty else 1e-3 * objective.curvature)
        predicted = 0.5 * float(torch.dot(grad.reshape(-1), direction.reshape(-1))) if model_fit else 0.0
        del grad  # (a layer-sized tensor: not held through the line search)
        if mask is not None:
            direction.mul_(mask)
        z_direction = objective.pre_activation(direction, steering=True)
        if penalty:  # over contiguous (G, R, d+1) tensors; the residual's bias column is zero
            cross = float(torch.dot(residual.reshape(-1), direction.reshape(-1)))
            square = float(torch.dot(direction.reshape(-1), direction.reshape(-1))) - \
                float(direction[..., -1].pow(2).sum())
        step = 1.0
        for _ in range(6):
            z_candidate = z - step * z_direction
            candidate_value = objective.value_at(z_candidate)
            change = candidate_value - value
            if penalty:
                change += 0.5 * rho * (step * step * square - 2.0 * step * cross)
            if change < 0:
                theta = torch.add(theta, direction, alpha=-step)
                if penalty:
                    residual.sub_(direction, alpha=step)
                    residual[..., -1] = 0.0
                z, value = z_candidate, candidate_value
                rounded_steps += objective.x_low is not None
                break
            step *= 0.5
        else:
            break
        values.append(value)
        if model_fit and step == 1.0 and abs(-change - predicted) <= model_fit * predicted:
            break
    return theta, Carried(z, rounded_steps, value)


class _Penalty:
    """ρ/2 ‖W − Z + U‖² on the weight part of θ (not the bias)."""

    def __init__(self, rho: float, z: torch.Tensor, u: torch.Tensor):
        self.rho, self.anchor = rho, z - u

    def residual(self, theta: torch.Tensor) -> torch.Tensor:
        """θ − [A, b]: (G, R, d+1), zero in the bias column."""
        residual = theta.clone()
        residual[..., :-1] -= self.anchor
        residual[..., -1] = 0.0
        return residual


def admm_activation(problem: LayerProblem, w_start: torch.Tensor, b_start: torch.Tensor,
                    project: Projection, settings: AdmmSettings, rho_fixed: bool = False,
                    support_decides: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, AdmmHistory, ActivationObjective]:
    """ADMM whose W-step goes through the activation; returns Z, its bias, history, objective.
    ``support_decides``: the caller refits on Z's support, so the run stops once the support has settled."""
    objective = ActivationObjective(problem, settings)
    g, r, d = w_start.shape
    theta = torch.cat([w_start, b_start.reshape(g, r, 1)], dim=-1).clone()
    norm0 = float(w_start.norm()) or 1.0
    rho = settings.rho_init * objective.curvature
    z = project(theta[..., :-1], rho)
    u = torch.zeros_like(z)
    history = AdmmHistory()
    settled = _Settled(settings.settled_iterations if support_decides else 0, settings.settled_changes)
    carried = None  # X̃θᵀ, carried from one W-step to the next (θ does not change in between)
    for step in range(settings.iterations):
        penalty = _Penalty(rho, z, u)
        theta, carried = _descent(objective, theta, penalty, rho, None, settings.inner_steps, carried,
                                  model_fit=settings.model_fit)
        z, u, primal, dual = _z_and_dual_step(theta[..., :-1], z, u, project, rho, norm0)
        # f(Z) decides only where the stall rule is on; else it is the report's record, on a quarter of the rows
        z_theta = torch.cat([z, theta[..., -1:]], dim=-1)
        history.record(objective.value(z_theta) if settings.stall_iterations else objective.recorded_value(z_theta),
                       primal, dual, rho / objective.curvature)
        if _stops(step, primal, z, history, settings, settled):
            break
        rho, u = _grown(rho, u, settings, rho_fixed)
    return z, theta[..., -1].reshape(-1), history, objective


def refit_activation(objective: ActivationObjective, w: torch.Tensor, b: torch.Tensor,
                     mask: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked preconditioned descent on the activation objective (support fixed, bias free)."""
    g, r, _ = w.shape
    theta = torch.cat([w * mask, b.reshape(g, r, 1)], dim=-1)
    full_mask = torch.cat([mask.float(), torch.ones(g, r, 1)], dim=-1)
    theta, _ = _descent(objective, theta, None, 0.0, full_mask, steps, stall=REFIT_STALL)
    return theta[..., :-1] * mask, theta[..., -1].reshape(-1)


def refit_bias_activation(objective: ActivationObjective, w: torch.Tensor, b: torch.Tensor,
                          steps: int) -> torch.Tensor:
    """Descent through the activation on the bias alone (the weights stay exactly as they are: on a grid)."""
    g, r, _ = w.shape
    theta = torch.cat([w, b.reshape(g, r, 1)], dim=-1)
    bias_only = torch.cat([torch.zeros_like(w), torch.ones(g, r, 1)], dim=-1)
    theta, _ = _descent(objective, theta, None, 0.0, bias_only, steps, stall=REFIT_STALL)
    return theta[..., -1].reshape(-1)


RIDGE_STRENGTHS = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # λ / mean eigenvalue of Σ tried by the held-out choice


def refit_on_support(problem: LayerProblem, loss: str, settings: AdmmSettings, mask: torch.Tensor | None = None,
                     stats: Moments | None = None):
    """Refit the weights on a fixed support (all of them when ``mask`` is None) so the layer reproduces
    the original outputs from the compressed model's inputs (error compensation for layers upstream
    compression changed). Least squares on the support shrunk toward A = W₀·mask:
        (Σ + λI) w_S = c_S + λ a_S,   b = μ_y − W μ_x,
    then — for the activation loss — masked descent through σ. λ is chosen on held-out calibration samples
    (``LayerProblem.held_out``) among ``RIDGE_STRENGTHS`` and λ = ∞ (keep A); the descent runs on all samples
    for as many steps as, run on the others, kept lowering the held-out error (early stopping), and not at all
    when its first steps raise it: with few samples per input (a classifier on 1280 features fed by 500
    images) both the plain least squares and the descent fit the calibration noise.
    Without held-out samples: λ = 0, and the better of A and the least squares on the calibration error
    starts the descent. ``stats``: ``moments(problem)``, when the caller has them."""
    support = torch.ones_like(problem.w0, dtype=torch.bool) if mask is None else mask.bool()
    start = problem.w0 * support
    held = problem.held_out()
    if held is None:
        stats = stats or moments(problem)
        w = masked_refit(stats, start, support)
        b = bias_for(stats, w) if problem.fit_bias else problem.b0
        if loss == "linear":
            return w, b
        if problem.relative_error(w, b, loss) > problem.relative_error(start, problem.b0, loss):
            w, b = start, problem.b0
        return refit_activation(ActivationObjective(problem, settings), w, b, support, settings.refit_steps)
    fit, check = problem.subset(~held), problem.subset(held)
    fit_stats, all_stats = split_moments(problem, held, whole=stats)
    best_error, best_strength = check.relative_error(start, problem.b0, loss), None
    for strength in RIDGE_STRENGTHS:
        w = masked_refit(ridge(fit_stats, strength, start), start, support)
        error = check.relative_error(w, bias_for(fit_stats, w) if problem.fit_bias else problem.b0, loss)
        if error < best_error:
            best_error, best_strength = error, strength
    if best_strength is None:
        w, b = start, problem.b0
    else:
        w = masked_refit(ridge(all_stats, best_strength, start), start, support)
        b = bias_for(all_stats, w) if problem.fit_bias else problem.b0
    if loss == "linear":
        return w, b
    steps = _held_out_steps(fit, check, w, b, support, loss, settings)
    if steps == 0:
        return w, b
    return refit_activation(ActivationObjective(problem, settings), w, b, support, steps)


def _held_out_steps(fit: LayerProblem, check: LayerProblem, w: torch.Tensor, b: torch.Tensor,
                    support: torch.Tensor, loss: str, settings: AdmmSettings) -> int:
    """Early stopping: how many masked descent steps on the ``fit`` patches, from (w, b), leave the ``check``
    patches' error lowest. Looked at every REFIT_CHECK_STEPS steps up to ``settings.refit_steps``, and ended
    at the first look that does not lower it; 0 when none does."""
    objective = ActivationObjective(fit, settings)
    g, r, _ = w.shape
    theta = torch.cat([w * support, b.reshape(g, r, 1)], dim=-1)
    full_mask = torch.cat([support.float(), torch.ones(g, r, 1)], dim=-1)
    best_error, best_steps, carried = check.relative_error(w, b, loss), 0, None
    every = max(1, min(REFIT_CHECK_STEPS, settings.refit_steps))
    for steps in range(every, settings.refit_steps + 1, every):
        theta, carried = _descent(objective, theta, None, 0.0, full_mask, every, carried, stall=REFIT_STALL)
        error = check.relative_error(theta[..., :-1] * support, theta[..., -1].reshape(-1), loss)
        if not error < best_error:
            break
        best_error, best_steps = error, steps
    return best_steps


__all__ = ["AdmmSettings", "AdmmHistory", "admm_linear", "admm_activation", "refit_activation", "refit_bias_activation",
           "refit_on_support", "moments", "masked_refit", "bias_for"]
