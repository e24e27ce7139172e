"""Low-rank and low-rank + sparse (``--method lowrank | lowrank-sparse``, Ma et al. 2019): ranks per layer
(``plan/lowrank.py``) → layer-wise ADMM with the rank / L+S Z-step, through the activation, sequential
(``algorithms/factorize.py``) → every factorized layer written as its factor pair (``export/lowrank.py``; a
k×k Conv with ``--lowrank-form tucker2`` as its Tucker-2 triple); layers left dense are refit to the
compressed model's inputs.

The solve writes the pairs into the graph (they keep the original's tensors between layers, so the block
refinement trains the factors); nothing is left for the export. A layer planned as S alone (rank 0) is
solved and stored as a sparse layer.
"""

from __future__ import annotations

from ..algorithms.solve import Structure
from ..export.apply import apply_initializers
from ..export.lowrank import FactoredLayer, export_form, factorize
from ..plan.lowrank import RankPlan, plan_ranks
from ..solve.layerwise import compress_layers
from .base import CompressionMethod, Context, Solved, register


@register("lowrank", "lowrank-sparse")
class LowRank(CompressionMethod):
    def preview(self, view, all_layers, layers, config) -> list[str]:
        lines = [f"{len(layers)} layers can be factorized; a pair W = A·B of rank r has fewer parameters than "
                 "the Cout×D layer when r < Cout·D / (Cout + D)"]
        for layer in layers:
            cout, d = layer.out_features, layer.in_features
            lines.append(f"  + {layer.name}: {cout}x{d}, full rank {min(cout, d)}, fewer parameters below rank "
                         f"{cout * d // (cout + d)}")
        return lines

    def plan(self, ctx: Context) -> RankPlan:
        ctx.progress("plan", 0, 1, "choosing ranks")
        return plan_ranks(ctx.view, ctx.layers, ctx.samples, ctx.config)

    def solve(self, ctx: Context, plan: RankPlan) -> Solved:
        config, structures, levels = ctx.config, {}, {}
        for layer in ctx.layers:
            spec = plan.specs[layer.name]
            if spec is None:
                structures[layer.name] = Structure("dense" if config.refit_dense else "unstructured")
                levels[layer.name] = 0.0
            elif spec.rank == 0:  # S alone: a sparse layer with the planned nonzeros (Zhang et al.'s Z-step)
                sparsity = 1.0 - spec.sparse_count / layer.num_weights
                structures[layer.name], levels[layer.name] = Structure("unstructured", sparsity), sparsity
            else:
                structures[layer.name] = Structure(self.name, rank=spec)
                levels[layer.name] = spec.rank / min(layer.out_features, layer.in_features)  # the rank ratio
        result = compress_layers(ctx.view, ctx.layers, ctx.samples, structures, levels, config, ctx.progress)
        factored = [FactoredLayer(o.layer, o.factors.left.numpy(), o.factors.right.numpy(),
                                  None if o.factors.sparse is None else o.factors.sparse.numpy(),
                                  None if o.factors.input_basis is None else o.factors.input_basis.numpy())
                    for o in result.outcomes if o.factors is not None]
        return Solved(factorize(apply_initializers(ctx.model, result.initializers, consume=True), factored), result)

    def report(self, plan: RankPlan, solved: Solved) -> dict:
        forms = {o.layer.name: export_form(o.layer, o.factors.inner, o.factors.sparse is not None,
                                           o.factors.input_rank)
                 for o in solved.result.outcomes if o.factors is not None}
        return {**plan.report(), "export_forms": forms}

    def notes(self, config) -> list[str]:
        return timed_in_fp32(config)


def timed_in_fp32(config) -> list[str]:
    """The forms chosen by per-layer fp32 timings, when the model is then made int8."""
    if config.quantize == "int8" and config.target_latency is None and config.objective == "latency":
        return ["--objective latency chose each layer's form by fp32 timings of that layer; the int8 model's "
                "own latency is the measured figure in the validation"]
    return []
