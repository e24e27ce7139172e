"""The protocol every compression method follows, and the registry that names them.

``api.compress`` runs the same stages for every method:

    plan(ctx) → solve(ctx, plan) → refine (shared) → export(ctx, plan, solved) → distill → quantize

``solve`` writes the solved weights back in a form that computes what the exported graph computes and keeps
the original's tensor shapes between blocks (removed channels are zero columns, a factor pair is already a
pair), so block refinement can compare it with the original block by block; ``export`` then makes the
graph physically smaller (slices channels, groups convs). Adding a method is one module with a class
decorated by ``@register("name")`` (and the name in ``config.METHODS`` for its flag).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx

from ..algorithms.solve import Structure
from ..analysis.layers import Declined, Layer, LayerSet
from ..calib.readers import SampleSet
from ..config import CompressConfig
from ..finetune.refine import refine
from ..onnxio.graph import GraphView
from ..solve.layerwise import Progress, SequentialResult
from ..solve.reuse import StageReuse

Ignored = dict[str, tuple[int, np.ndarray]]  # tensor -> (axis, positions the export removes)
Gate = Callable[[onnx.ModelProto], tuple[bool, Any]]  # model -> (accuracy gates passed, comparison)


@dataclass
class Context:
    """What every stage of a method sees."""

    view: GraphView  # the normalized original
    model: onnx.ModelProto  # the same graph as a ModelProto
    all_layers: list[Layer]  # every Conv/Gemm/MatMul found (before --exclude): channel groups span them all
    layers: list[Layer]  # the layers this method may change
    samples: SampleSet  # what the layer-wise solve and the block refinement see
    config: CompressConfig
    progress: Progress
    reuse: StageReuse | None = None  # a search's candidates share their solves (``solve/reuse.py``)
    notes: list[str] = field(default_factory=list)  # for the report


@dataclass
class Solved:
    """A method's solve: the model with the solved weights written back, and what the report needs."""

    model: onnx.ModelProto
    result: SequentialResult
    ignored: Ignored = field(default_factory=dict)  # refinement leaves these positions out of its loss
    declined: list[Declined] = field(default_factory=list)  # groups or layers the method left as they were
    details: Any = None  # method-specific (kept channels, block pairs, ...)


class Plan(Protocol):
    def report(self) -> dict: ...


class CompressionMethod:
    """Base of every method. Subclasses implement ``plan``, ``solve`` and (when the graph changes shape)
    ``export``; the defaults below are what a method that needs nothing else does."""

    name = ""

    def configure(self, config: CompressConfig) -> CompressConfig:
        """The config as this method reads it (e.g. a parameter budget expressed as a sparsity)."""
        return config

    def declines(self, found: LayerSet, config: CompressConfig) -> LayerSet:
        """Layers this method cannot handle, moved to ``declined`` with the reason."""
        return found

    def preview(self, view: GraphView, all_layers: list[Layer], layers: list[Layer], config) -> list[str]:
        """What this method would do to the model, in lines for ``onnxadmm check`` (no calibration data)."""
        return [f"{len(layers)} layers would be solved with the {self.name} constraint"]

    def plan(self, ctx: Context) -> Plan:
        raise NotImplementedError

    def solve(self, ctx: Context, plan: Plan) -> Solved:
        raise NotImplementedError

    def export(self, ctx: Context, plan: Plan, solved: Solved) -> onnx.ModelProto:
        return solved.model

    def report(self, plan: Plan, solved: Solved) -> dict:
        return plan.report()

    def relax(self, config: CompressConfig) -> CompressConfig | None:
        """A looser target to try when the accuracy gate fails (give-back), or None when there is none."""
        return None

    def target(self, config: CompressConfig) -> dict:
        """The setting ``relax`` moves, as reported with each give-back attempt."""
        return {}

    def notes(self, config: CompressConfig) -> list[str]:
        """Notes for the report about how this method's choices meet the rest of the pipeline."""
        return []


REGISTRY: dict[str, CompressionMethod] = {}


def register(*names: str):
    """Class decorator: one instance of the method answers to each of ``names``."""

    def add(cls):
        for name in names:
            instance = cls()
            instance.name = name
            REGISTRY[name] = instance
        return cls

    return add


def _plan_and_solve(method: CompressionMethod, ctx: Context) -> tuple[Plan, Solved]:
    def run():
        plan = method.plan(ctx)
        return plan, method.solve(ctx, plan)

    if ctx.reuse is None:
        return run()
    plan, solved, note = ctx.reuse.plan_and_solve(ctx.config, run)
    ctx.notes.extend([note] if note else [])
    return plan, solved


def refit_the_rest(structures: dict[str, Structure], levels: dict[str, float], layers: list[Layer],
                   config: CompressConfig) -> None:
    """With ``refit_dense``, every layer without a structure is refit to the compressed model's inputs
    (sequential error compensation; the solve keeps a layer that no compressed layer feeds as it is)."""
    if config.refit_dense:
        for layer in layers:
            if layer.name not in structures:
                structures[layer.name], levels[layer.name] = Structure(kind="dense"), 0.0


def with_config(ctx: Context, config: CompressConfig) -> Context:
    return dataclasses.replace(ctx, config=config)


def run_method(method: CompressionMethod, ctx: Context, gate: Gate | None
               ) -> tuple[onnx.ModelProto, Solved, dict]:
    """plan → solve → refine → export; returns the exported model, the solve and the plan's report. With an
    accuracy ``gate`` and a method that can relax its target, the stages run again at the relaxed target while
    the gate fails (give-back; each attempt goes in the report)."""
    attempts = []
    while True:
        plan, solved = _plan_and_solve(method, ctx)
        solved.model, solved.result.refined = refine(ctx.view, solved.model, ctx.samples, ctx.config,
                                                     ctx.progress, solved.ignored)
        exported = method.export(ctx, plan, solved)
        plan_report = method.report(plan, solved)
        if gate is None:
            return exported, solved, plan_report
        passed, comparison = gate(exported)
        attempts.append({**method.target(ctx.config), "passed": passed, "agreement": comparison.agreement,
                         "accuracy_drop_pt": comparison.accuracy_drop_pt,
                         "macs_planned_ratio": plan_report.get("macs_planned_ratio")})
        relaxed = None if passed else method.relax(ctx.config)
        if relaxed is None:
            return exported, solved, {**plan_report, "give_back": attempts}
        ctx = with_config(ctx, relaxed)
        ctx.progress("give-back", len(attempts), len(attempts) + 1,
                     f"gate missed; {', '.join(f'{k} {v:.3f}' for k, v in method.target(relaxed).items())}")
