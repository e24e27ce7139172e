"""The layer-wise loop: for each layer in dependency order, sample its problem from the activation
stream (inputs from the model compressed so far), solve it, and write the new weights back so the
following layers see them. A layer whose problem cannot be built (onnx2torch cannot convert its
activation, shapes disagree at run time) stays dense and is reported.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..algorithms.admm import AdmmSettings, bf16_native
from ..algorithms.factorize import Factors
from ..algorithms.solve import Structure, solve_layer
from ..analysis.layers import Declined, Layer
from ..bridge.torch_layer import BridgeError, activation_function
from ..calib.memory import FreedMemory, keep_freed_blocks
from ..calib.readers import SampleSet
from ..calib.stream import ActivationStream
from ..config import CompressConfig
from ..onnxio.graph import GraphView
from ..onnxio.weights import WeightFile, any_mapped, kept
from .problem import SampleSettings, SamplingError, sample_problem, token_mask_input

Progress = Callable[[str, int, int, str], None]


@dataclass
class LayerOutcome:
    """What happened to one layer (becomes a row of the report)."""

    layer: Layer
    structure: Structure
    target_level: float
    sparsity: float
    nonzero: int
    error_dense: float
    error_projected: float
    error_final: float
    seconds: float
    patches: int
    history: dict = field(default_factory=dict)
    penalty_mu: float | None = None
    factors: Factors | None = None  # lowrank methods: the factor pair to export
    scales: np.ndarray | None = None  # grid: per-output-channel scales of the stored weight (weight = scale·k)


@dataclass
class SequentialResult:
    initializers: dict[str, np.ndarray]  # new values for weight / bias initializers
    outcomes: list[LayerOutcome]
    declined: list[Declined]
    peak_cache_bytes: int
    spilled_bytes: int
    refined: list = field(default_factory=list)  # block-wise refinement outcomes (finetune/refine.py), when it ran
    distilled: Any = None  # the whole-model distillation record (finetune/distill.py), when it ran


def schedule(view: GraphView, layers: list[Layer]) -> list[Layer]:
    """Topological order in which every layer feeding a layer's input or side inputs comes first.

    Two layers can be each other's side input: a residual Add of a block's last conv and its shortcut
    (downsample) conv. Then the one that comes first in the graph is solved first, seeing the other at
    its current (original) weights through the side input; input dependencies are never relaxed."""
    by_node = {layer.node_index: layer for layer in layers}

    def feeding(names) -> set[str]:
        return {by_node[i].name for i in view.ancestors(list(names)) if i in by_node}

    inputs = {l.name: feeding([l.input_name]) for l in layers}
    sides = {l.name: feeding(l.chain.side_inputs) if l.chain and l.chain.side_inputs else set() for l in layers}
    position = {layer.name: view.order.index(layer.node_index) for layer in layers}
    ordered, done = [], set()
    remaining = sorted(layers, key=lambda l: position[l.name])
    while remaining:
        ready = next((l for l in remaining if inputs[l.name] | sides[l.name] <= done), None) or \
            next((l for l in remaining if inputs[l.name] <= done), remaining[0])
        ordered.append(ready)
        done.add(ready.name)
        remaining.remove(ready)
    return ordered


COLLECT_FROM_WEIGHTS = 1 << 22  # after a layer this large, its converted modules are freed at once


def admm_settings(config: CompressConfig) -> AdmmSettings:
    return AdmmSettings(iterations=config.admm_iterations, rho_init=config.rho_init,
                        rho_growth=config.rho_growth, grad_patches=config.grad_patches, seed=config.seed,
                        bf16_products=resolved_products(config).admm_products == "bf16",
                        subset_bytes=(config.max_memory_mb << 20) // 8,  # (the budget's shares: compress_layers)
                        layer_bytes=(config.max_memory_mb << 20) * 3 // 8)


def resolved_products(config: CompressConfig) -> CompressConfig:
    """``--admm-products auto`` as this machine resolves it: bf16 where the CPU multiplies it in hardware."""
    if config.admm_products != "auto":
        return config
    return dataclasses.replace(config, admm_products="bf16" if bf16_native() else "fp32")


def compress_layers(view: GraphView, layers: list[Layer], samples: SampleSet, structures: dict[str, Structure],
                    levels: dict[str, float], config: CompressConfig, progress: Progress | None = None,
                    switches: dict[str, np.ndarray] | None = None) -> SequentialResult:
    """Solve every layer in ``layers`` for its ``structures`` entry (``levels`` is what the report calls
    its target: sparsity, or the fraction of input channels removed); level 0 keeps a layer as it is.
    ``switches``: initializer values that only the compressed model uses from the start (the int8 stage's
    activation rounding, ``quantize/fakequant.py``)."""
    progress = progress or (lambda *args: None)
    order = schedule(view, layers)
    pending: dict[str, int] = {}
    for layer in order:
        for name in (layer.input_name, *_sides(layer)):
            pending[name] = pending.get(name, 0) + 1
    budget = config.max_memory_mb << 20  # a quarter cached activations, a quarter one layer's sampled problem, an
    # eighth the solver's copy of its patch subset, the rest (``admm_settings``) the solver's working copies of the
    # layer (beyond it, solved in blocks of rows) or onnxruntime's segment runs, which do not run at the same time
    sampling = SampleSettings(max_patches=config.sample_patches, memory_bytes=budget // 4, seed=config.seed,
                              token_mask=token_mask_input(view, config.token_mask))
    settings = admm_settings(config)
    initializers: dict[str, np.ndarray] = {}
    outcomes: list[LayerOutcome] = []
    declined: list[Declined] = []
    keep_freed_blocks()
    freed = FreedMemory(budget // 4)  # handed back once the process has grown by a quarter of the budget
    solved_file = WeightFile() if any_mapped(view.model) else None  # a model whose weights stay in files
    readers_of_new = _readers(view, switches or {})  # nodes reading a value the compressed model replaced
    stream = ActivationStream(view, samples, config.batch_size, budget // 4, config.threads,
                              keep=lambda name: pending.get(name, 0) > 0 or name == sampling.token_mask)
    try:  # nothing between creating the stream and here, so an interrupt cannot leave its spill behind
        stream.set_initializers(switches or {})
        for index, layer in enumerate(order):
            progress("solve", index, len(order), layer.name)
            started = time.perf_counter()
            sides = _sides(layer)
            level = levels[layer.name]
            kept_as_is = _without_solve(view, layer, structures[layer.name], level, readers_of_new)
            if kept_as_is is not None:
                outcomes.append(kept_as_is)
                for name in (layer.input_name, *sides):
                    pending[name] -= 1
                continue
            stream.ensure([layer.input_name, *sides])
            freed.release()
            inside = dataclasses.replace(settings, on_iteration=_inner_progress(progress, index, len(order), layer.name))
            try:
                outcome, values = _solve_one(stream, view, layer, index, level, structures[layer.name],
                                             config, sampling, inside, samples.num_samples, freed)
            except (BridgeError, SamplingError) as exc:
                declined.append(Declined(layer.name, layer.op_type, str(exc)))
            else:
                outcome.seconds = time.perf_counter() - started
                outcomes.append(outcome)
                values = kept(values, solved_file)
                initializers.update(values)
                stream.set_initializers(values)
                readers_of_new |= _readers(view, values)
            for name in (layer.input_name, *sides):
                pending[name] -= 1
            stream.evict()
            if layer.num_weights >= COLLECT_FROM_WEIGHTS:
                gc.collect()  # the converted layer (an onnx2torch graph: reference cycles) holds a copy of its weight
            freed.release()
        progress("solve", len(order), len(order), "done")
        return SequentialResult(initializers, outcomes, declined, stream.peak_bytes, stream.spilled_bytes)
    finally:
        stream.close()


def _inner_progress(progress: Progress, index: int, total: int, name: str):
    """Progress inside one layer's solve: its ADMM iteration and primal residual ‖W − Z‖/‖W₀‖ (the sink
    decides how often to show it; on a log, at most every 10 s, so only long layers print these)."""
    def report(iteration: int, iterations: int, primal: float, part: str = "") -> None:
        progress("solve", index, total, f"{name}: {part + ', ' if part else ''}ADMM iteration "
                                        f"{iteration}/{iterations}, residual {primal:.1e}")
    return report


def _without_solve(view: GraphView, layer: Layer, structure: Structure, level: float, readers_of_new: set[int]
                   ) -> LayerOutcome | None:
    """The outcome of a layer that keeps its original weights bit for bit without a solve, else None: one
    planned at level 0 (errors not measured), and a dense refit that no replaced value reaches — its inputs
    are the original model's, so its weights reproduce its outputs exactly (every error 0)."""
    if level == 0 and structure.kind not in ("nm", "dense"):
        error = float("nan")
    elif structure.kind == "dense" and not (view.ancestors([layer.input_name, *_sides(layer)]) | {layer.node_index}) \
            & readers_of_new:
        error = 0.0
    else:
        return None
    return LayerOutcome(layer=layer, structure=structure, target_level=0.0, sparsity=0.0,
                        nonzero=int(np.count_nonzero(view.constant(layer.weight_name))), error_dense=error,
                        error_projected=error, error_final=error, seconds=0.0, patches=0)


def _sides(layer: Layer) -> tuple[str, ...]:
    return tuple(layer.chain.side_inputs) if layer.chain else ()


def _readers(view: GraphView, names) -> set[int]:
    """Nodes that read any of the initializers ``names``."""
    return {node for name in names for node in view.initializer_users(name)}


def _solve_one(stream, view, layer, index, level, structure, config, sampling, settings, total_samples, freed):
    w0 = layer.canonical(view.constant(layer.weight_name))
    b0 = layer.canonical_bias(view)
    activation = activation_function(view, layer)
    fit_bias = layer.bias_name is not None and layer.beta != 0
    problem = sample_problem(stream, layer, index, w0, b0, activation, fit_bias, sampling, total_samples)
    freed.release()  # the batches' patches, before the solve's copies
    torch.manual_seed(config.seed + index)
    solution = solve_layer(problem, structure, config.loss, config.solver, settings)
    patches = problem.num_patches
    del problem, w0  # the original weights (a copy in the solver's layout), before the solved ones are laid out
    values = {layer.weight_name: layer.stored(solution.weight.numpy())}
    if layer.bias_name is not None:
        original = view.constant(layer.bias_name)
        bias = solution.bias.numpy().astype(np.float64) / layer.beta
        values[layer.bias_name] = np.broadcast_to(bias.reshape(-1), (layer.out_features,)) \
            .reshape(original.shape if original.size == layer.out_features else (layer.out_features,)) \
            .astype(original.dtype)
    outcome = LayerOutcome(
        layer=layer, structure=structure, target_level=level, sparsity=solution.sparsity,
        nonzero=int(torch.count_nonzero(solution.mask)) if solution.factors is None else solution.factors.nonzero,
        error_dense=solution.error_dense, error_projected=solution.error_projected,
        error_final=solution.error_final, seconds=0.0, patches=patches, history=solution.history,
        penalty_mu=solution.penalty_mu, factors=solution.factors,
        scales=None if solution.scales is None else solution.scales.reshape(-1).numpy() / np.float32(layer.alpha))
    if solution.factors is not None:
        outcome.sparsity = 1.0 - outcome.nonzero / layer.num_weights
    return outcome, values
