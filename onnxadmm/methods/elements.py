"""Element sparsity (``--method sparse | nm | l1 | l0 | kernels``): each layer's sparsity from the global
target (``plan/planner.py``), then the layer-wise solve with that layer's Z-step. The graph keeps its
shape: zeros are written into the weights (smaller once compressed, faster with sparse kernels)."""

from __future__ import annotations

import dataclasses

from ..algorithms.solve import Structure
from ..analysis.layers import Declined, Layer, LayerSet
from ..config import CompressConfig
from ..export.apply import apply_initializers
from ..plan.planner import Plan, plan_sparsity
from ..solve.layerwise import compress_layers
from .base import CompressionMethod, Context, Solved, register

KINDS = {"sparse": "unstructured", "nm": "nm", "l1": "l1", "l0": "l0", "kernels": "kernels"}


def structure_for(layer: Layer, config: CompressConfig, level: float) -> Structure:
    """The per-layer structure of the element-sparsity methods at ``level``."""
    n, m = config.nm_pattern
    return Structure(kind=KINDS[config.method], sparsity=level, n=n, m=m, taps=layer.taps)


@register(*KINDS)
class ElementSparsity(CompressionMethod):
    def configure(self, config: CompressConfig) -> CompressConfig:
        if config.target_params is not None:  # a parameter budget F is the sparsity 1 − F
            return dataclasses.replace(config, sparsity=1.0 - config.target_params)
        return config

    def declines(self, found: LayerSet, config: CompressConfig) -> LayerSet:
        if self.name != "nm":
            return found
        n, m = config.nm_pattern
        kept, declined = [], list(found.declined)
        for layer in found.layers:
            if (layer.in_features // layer.taps) % m:
                declined.append(Declined(layer.name, layer.op_type, f"{layer.in_features // layer.taps} input "
                                         f"channels per group is not a multiple of M={m} for {n}:{m}"))
            else:
                kept.append(layer)
        return LayerSet(kept, declined)

    def plan(self, ctx: Context) -> Plan:
        ctx.progress("plan", 0, 1, "measuring sensitivity")
        return plan_sparsity(ctx.view, ctx.layers, ctx.samples, ctx.config)

    def solve(self, ctx: Context, plan: Plan) -> Solved:
        structures = {l.name: structure_for(l, ctx.config, plan.levels[l.name]) for l in ctx.layers}
        result = compress_layers(ctx.view, ctx.layers, ctx.samples, structures, plan.levels, ctx.config,
                                 ctx.progress)
        return Solved(apply_initializers(ctx.model, result.initializers, consume=True), result)
