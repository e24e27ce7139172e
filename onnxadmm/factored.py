"""Low-rank and low-rank + sparse end to end (``--method lowrank | lowrank-sparse``, Ma et al. 2019):
ranks per layer (``plan/lowrank.py``) → layer-wise ADMM with the rank / L+S Z-step, through the activation,
sequential (``algorithms/factorize.py``) → every factorized layer exported as its factor pair
(``export/lowrank.py``; a k×k Conv with ``--lowrank-form tucker2`` as its Tucker-2 triple); layers left dense
are refit to the compressed model's inputs.

During the solve a factorized layer is its dense product A·B + S, which computes what the pair
computes; the graph is rewritten once, at the end. A layer planned as S alone (rank 0) is solved and
stored as a sparse layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .algorithms.solve import Structure
from .analysis.layers import Layer
from .calib.readers import SampleSet
from .config import CompressConfig
from .export.apply import apply_initializers
from .export.lowrank import FactoredLayer, export_form, factorize
from .onnxio.graph import GraphView
from .plan.lowrank import RankPlan, plan_ranks
from .sequential import Progress, SequentialResult, compress_layers


@dataclass
class FactoredResult:
    model: onnx.ModelProto
    plan: RankPlan
    solved: SequentialResult

    def report(self) -> dict:
        forms = {o.layer.name: export_form(o.layer, o.factors.inner, o.factors.sparse is not None,
                                           o.factors.input_rank)
                 for o in self.solved.outcomes if o.factors is not None}
        return {**self.plan.report(), "export_forms": forms}


def compress_factored(view: GraphView, model: onnx.ModelProto, layers: list[Layer], samples: SampleSet,
                      config: CompressConfig, progress: Progress) -> FactoredResult:
    progress("plan", 0, 1, "choosing ranks")
    plan = plan_ranks(view, layers, samples, config)
    structures, levels = {}, {}
    for layer in layers:
        spec = plan.specs[layer.name]
        if spec is None:
            structures[layer.name] = Structure("dense" if config.refit_dense else "unstructured")
            levels[layer.name] = 0.0
        elif spec.rank == 0:  # S alone: a sparse layer with the planned nonzeros (Zhang et al.'s Z-step)
            sparsity = 1.0 - spec.sparse_count / layer.num_weights
            structures[layer.name], levels[layer.name] = Structure("unstructured", sparsity), sparsity
        else:
            structures[layer.name] = Structure(config.method, rank=spec)
            levels[layer.name] = spec.rank / min(layer.out_features, layer.in_features)  # the rank ratio
    solved = compress_layers(view, layers, samples, structures, levels, config, progress)
    compressed = apply_initializers(model, solved.initializers)
    factored = [FactoredLayer(o.layer, o.factors.left.numpy(), o.factors.right.numpy(),
                              None if o.factors.sparse is None else o.factors.sparse.numpy(),
                              None if o.factors.input_basis is None else o.factors.input_basis.numpy())
                for o in solved.outcomes if o.factors is not None]
    return FactoredResult(factorize(compressed, factored), plan, solved)
