"""``--method none``: no structural change (the precision stage alone, e.g. ``--quantize int8``)."""

from __future__ import annotations

from ..solve.layerwise import SequentialResult
from .base import CompressionMethod, Context, Solved, register


class NoPlan:
    def report(self) -> dict:
        return {"strategy": "none (no structural compression)"}


@register("none")
class NoStructure(CompressionMethod):
    def preview(self, view, all_layers, layers, config) -> list[str]:
        return [f"no structural change; with --quantize int8 (what compress does without --method or a budget) the "
                f"{len(layers)} layers' weights are solved onto the int8 grid"]

    def plan(self, ctx: Context) -> NoPlan:
        return NoPlan()

    def solve(self, ctx: Context, plan: NoPlan) -> Solved:
        return Solved(ctx.model, SequentialResult({}, [], [], 0, 0))
