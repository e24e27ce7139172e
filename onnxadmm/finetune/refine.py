"""Block-wise refinement (after the layer-wise solve; ``--refine-epochs N``).

Layer-wise reconstruction leaves each layer's error to the next; a block (a residual block, or a few
layers between cut tensors: ``analysis/blocks.py``) can correct it jointly. For each block B in order,
the weights of its compressed layers minimize

    L(W) = ‖f_B(x̂; W) − f_B(x; W₀)‖² / ‖f_B(x; W₀)‖²

over the calibration samples with Adam (cosine learning rate), x̂ the compressed model's input to B
(refined blocks before it), x the original's. The support of every weight is fixed — after each step
W ← W ⊙ M with M = (W ≠ 0) at the start — so sparsity patterns and removed channels stay exactly as
solved. Every tenth calibration sample is held out: each block keeps the weights of the epoch with the
lowest held-out loss, or its solved weights if no epoch beat them. No labels are used. For token inputs
(``--token-mask``), a [batch, sequence, ...] block output counts only at real tokens, as in the
layer-wise solve; side inputs of a block (``analysis/blocks.py``: an attention mask) are computed once.
After a precision stage (``--refine-grid-epochs``) the same runs with the grid fixed: the compressed graph
rounds every tensor the export quantizes (``quantize/fakequant.with_export_rounding``), the solved weights enter as
s·clamp(round(W/s), −L, L) with their solved scales (``grid.py``, straight-through), and x is the float model
the stage was given; the weights are written back on the grid. A block onnx2torch cannot convert runs
unchanged in onnxruntime. The block inputs and targets of every calibration sample are held in memory
(outside ``--max-memory-mb``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
import torch

from ..analysis.blocks import Block, constant_nodes, find_blocks, nodes_between
from ..bridge.fakequant import with_standard_ops
from ..bridge.torch_block import BlockModule, WeightHandle, convert_block, find_weights
from ..bridge.torch_layer import BridgeError
from ..calib.readers import SampleSet, held_out_rows
from ..config import CompressConfig
from ..export.apply import apply_initializers
from ..onnxio.graph import GraphView
from ..onnxio.runtime import session
from ..onnxio.subgraph import cut
from ..solve.layerwise import Progress
from ..solve.problem import token_mask_input
from .grid import FixedGrid, on_grid
from .train import cosine_adam, in_batches, masked_step, run_torch, value_types


@dataclass
class BlockOutcome:
    """One block's refinement (a row of the report). Losses are relative, on held-out calibration samples."""

    block: str
    layers: list[str]
    loss_before: float | None
    loss_after: float | None
    kept: bool
    seconds: float
    note: str = ""
    best_epoch: int = 0  # the epoch whose weights were kept (0: the solved weights)


Ignored = Mapping[str, tuple[int, np.ndarray]]  # tensor -> (axis, positions) left out of the loss


def refine(original: GraphView, compressed: onnx.ModelProto, samples: SampleSet, config: CompressConfig,
           progress: Progress | None = None, ignored: Ignored | None = None, grid: FixedGrid | None = None
           ) -> tuple[onnx.ModelProto, list[BlockOutcome]]:
    """``compressed`` (same inputs, outputs and cut tensors as ``original``) refined block by block; one
    outcome per block. Trained: the initializers that differ from the original's (solved layers, factor
    pairs); layers left as they were stay so (training those too was measured to overfit EfficientNet-Lite0's
    large late layers on 450 images). ``ignored`` positions of a block output (channels that will be sliced
    away) do not count in its loss. ``grid``: the weights trained on their fixed integer grid (module docstring).
    Off (unchanged, no outcomes) when ``config.refine_epochs`` is 0."""
    if not config.refine_epochs:
        return compressed, []
    values, outcomes = refine_blocks(original, compressed, samples, config, progress, ignored or {}, grid)
    return (apply_initializers(compressed, values) if values else compressed), outcomes


def changed_initializers(original: GraphView, compressed: GraphView) -> set[str]:
    """Float initializers of ``compressed`` that the original does not have or holds with other values."""
    changed = set()
    for name, tensor in compressed.initializers.items():
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) == 0:
            continue
        if name not in original.initializers or not np.array_equal(compressed.constant(name),
                                                                    original.constant(name)):
            changed.add(name)
    return changed


def refine_blocks(original: GraphView, compressed: onnx.ModelProto, samples: SampleSet, config: CompressConfig,
                  progress: Progress | None = None, ignored: Ignored | None = None, grid: FixedGrid | None = None,
                  epochs: int | None = None) -> tuple[dict[str, np.ndarray], list[BlockOutcome]]:
    """Refined values of the changed initializers, and one outcome per block (blocks are counted in
    nodes that read a changed initializer); ``epochs`` per block, ``config.refine_epochs`` when not given."""
    progress = progress or (lambda *args: None)
    view = GraphView(compressed)
    changed = changed_initializers(original, view)
    counted = {i for i, node in enumerate(view.nodes) if any(n in changed for n in node.input)}
    blocks = find_blocks(view, counted, config.refine_block_layers, cuts=set(original.producer))
    original_constants = constant_nodes(original)
    teacher_values = {name: np.asarray(a) for name, a in samples.arrays.items()}
    student_values = dict(teacher_values)
    side_names = sorted({name for block in blocks for name in block.sides})
    student_sides = _side_values(view, side_names, samples, config)
    in_original = [name for name in side_names if name in original.producer or name in original.input_names]
    teacher_sides = {**student_sides, **_side_values(original, in_original, samples, config)}
    teacher_values.update(teacher_sides)
    student_values.update(student_sides)
    tokens = _token_weights(view, samples, config)
    refined: dict[str, np.ndarray] = {}
    outcomes = []
    held_out = held_out_rows(samples.num_samples, samples.fixed_batch)
    for index, block in enumerate(blocks):
        progress("refine", index, len(blocks), block.name)
        started = time.perf_counter()
        outcome = BlockOutcome(block.name, [view.nodes[i].name for i in block.counted], None, None, False, 0.0)
        targets, teacher_note = _teacher(original, original_constants, block, teacher_values, samples, config)
        weights = {name: _loss_weight(targets[name], (ignored or {}).get(name), tokens) for name in block.outputs}
        try:
            student = convert_block(view, block.node_ids, block.outputs, {}, value_types(student_values))
        except BridgeError as exc:
            student_values = {**student_sides, **_run_onnx(view, block, student_values, config)}
            outcome.note = f"not refined: {exc}"
        else:
            trainable = {n for i in block.node_ids for n in view.nodes[i].input if n in changed}
            handles = on_grid(student, find_weights(student, {n: view.constant(n) for n in trainable}), grid)
            if handles:
                torch.manual_seed(config.seed + index)
                refined.update(_train(student, handles, student_values, targets, weights, held_out, config, index,
                                      outcome, epochs or config.refine_epochs))
            else:
                outcome.note = "no compressed weights found in the converted block"
            student_values = {**student_sides, **run_torch(student, student_values, config.batch_size)}
        outcome.note = "; ".join(n for n in (outcome.note, teacher_note) if n)
        teacher_values = {**teacher_sides, **targets}
        outcome.seconds = time.perf_counter() - started
        outcomes.append(outcome)
    progress("refine", len(blocks), len(blocks), "done")
    return refined, outcomes


def _teacher(original: GraphView, constants: set[int], block: Block, values: Mapping[str, np.ndarray],
             samples: SampleSet, config: CompressConfig) -> tuple[dict[str, np.ndarray], str]:
    """The original model's values of the block outputs: the original's nodes between the same cut
    tensors (torch, else onnxruntime), or, when those tensors are no cut of the original, the whole
    original model from the samples."""
    ids = nodes_between(original, block.inputs, block.outputs, constants)
    if ids is None:
        whole = Block(list(original.order), list(samples.arrays), block.outputs, [])
        return _run_onnx(original, whole, samples.arrays, config), "targets from the whole original model"
    piece = Block(ids, block.inputs, block.outputs, [])
    try:
        teacher = convert_block(original, ids, block.outputs, {}, value_types(values))
    except BridgeError:
        return _run_onnx(original, piece, values, config), ""
    return run_torch(teacher, values, config.batch_size), ""


def _side_values(view: GraphView, names: list[str], samples: SampleSet, config: CompressConfig
                 ) -> dict[str, np.ndarray]:
    """The side inputs ``names``: graph inputs from the samples, the rest computed by ``view`` from them."""
    given = {name: np.asarray(samples.arrays[name]) for name in names if name in samples.arrays}
    computed = [name for name in names if name not in given]
    if not computed:
        return given
    ids = nodes_between(view, list(view.input_names), computed)
    if ids is None:
        raise ValueError(f"side inputs {computed} are not computed from the graph inputs alone")
    return {**given, **_run_onnx(view, Block(ids, list(view.input_names), computed, []), samples.arrays, config)}


def _token_weights(view: GraphView, samples: SampleSet, config: CompressConfig) -> np.ndarray | None:
    """The token mask [samples, sequence] as float 0/1 (``--token-mask``), or None."""
    name = token_mask_input(view, config.token_mask)
    return None if name is None or name not in samples.arrays else (samples.arrays[name] != 0).astype(np.float32)


def _loss_weight(target: np.ndarray, ignored: tuple[int, np.ndarray] | None, tokens: np.ndarray | None = None
                 ) -> torch.Tensor:
    """1 where the block output counts in the loss, 0 at the ignored positions; with ``tokens`` and a
    [samples, sequence, ...] target, also 0 at padding tokens. Shaped [samples or 1, ...] to broadcast
    against the target (``_rows`` picks a batch's rows)."""
    weight = torch.ones([1] * target.ndim)
    if ignored is not None and len(ignored[1]):
        axis, positions = ignored
        axis %= target.ndim
        channels = np.ones(target.shape[axis], np.float32)
        channels[np.asarray(positions, dtype=np.int64)] = 0
        weight = weight * torch.from_numpy(channels.reshape([-1 if a == axis else 1 for a in range(target.ndim)]))
    if tokens is not None and target.ndim >= 3 and target.shape[:2] == tokens.shape:
        weight = weight * torch.from_numpy(tokens.reshape(tokens.shape + (1,) * (target.ndim - 2)))
    return weight


def _rows(weight: torch.Tensor, take) -> torch.Tensor:
    """The loss weight of the samples ``take`` (a weight without a sample axis applies to every sample)."""
    return weight if weight.shape[0] == 1 else weight[torch.from_numpy(np.asarray(take))]


def relative_loss(block: BlockModule, inputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                  weights: Mapping[str, torch.Tensor], rows: np.ndarray, batch_size: int) -> float:
    """Σ‖w ⊙ (f(x̂) − y)‖² / Σ‖w ⊙ y‖² over the samples ``rows``."""
    error = energy = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            take = rows[start:start + batch_size]
            outs = block({n: torch.from_numpy(a[take]) for n, a in inputs.items() if n in block.input_names})
            for out, name in zip(outs, block.output_names):
                weight = _rows(weights[name], take)
                y = torch.from_numpy(targets[name][take]) * weight
                error += float((out * weight - y).pow(2).sum())
                energy += float(y.pow(2).sum())
    return error / max(energy, 1e-30)


def _train(student: BlockModule, handles: dict[str, WeightHandle], inputs, targets, weights,
           held_out: np.ndarray, config: CompressConfig, index: int, outcome: BlockOutcome, epochs: int
           ) -> dict[str, np.ndarray]:
    """Adam on the block's relative loss with fixed supports, ``epochs`` epochs. After every epoch the held-out loss is
    measured; the weights of the best epoch are returned as ONNX values (none when no epoch beat the
    solved weights)."""
    train_rows, check_rows = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    check_rows = check_rows if len(check_rows) else train_rows
    tensors = [h.tensor for h in handles.values()]
    masks = [(t != 0).float() for t in tensors]
    best = [t.detach().clone() for t in tensors]
    outcome.loss_before = best_loss = relative_loss(student, inputs, targets, weights, check_rows,
                                                    config.batch_size)
    energy = {name: float((torch.from_numpy(targets[name][train_rows]) * _rows(weights[name], train_rows))
                          .pow(2).mean()) or 1.0
              for name in student.output_names}
    for tensor in tensors:
        tensor.requires_grad_(True)
    batch = min(config.batch_size, len(train_rows))
    steps = epochs * math.ceil(len(train_rows) / batch)
    optimizer, schedule = cosine_adam(tensors, config.refine_lr, steps)
    rng = np.random.default_rng(config.seed + index)
    for epoch in range(epochs):
        order = rng.permutation(train_rows)
        for start in range(0, len(order), batch):
            take = np.sort(order[start:start + batch])
            outs = student({n: torch.from_numpy(a[take]) for n, a in inputs.items() if n in student.input_names})
            loss = sum(((out - torch.from_numpy(targets[name][take])) * _rows(weights[name], take)).pow(2).mean()
                       / energy[name]
                       for out, name in zip(outs, student.output_names))
            masked_step(optimizer, schedule, loss, tensors, masks)
        check = relative_loss(student, inputs, targets, weights, check_rows, config.batch_size)
        if check < best_loss:
            best_loss, best, outcome.best_epoch = check, [t.detach().clone() for t in tensors], epoch + 1
    with torch.no_grad():
        for tensor, value in zip(tensors, best):
            tensor.requires_grad_(False)
            tensor.copy_(value)
    outcome.loss_after = best_loss
    outcome.kept = best_loss < outcome.loss_before
    if not outcome.kept:
        outcome.note = "no epoch lowered the held-out loss; solved weights kept"
        return {}
    return {name: handle.to_onnx() for name, handle in handles.items()}


def _run_onnx(view: GraphView, block: Block, inputs: Mapping[str, np.ndarray],
              config: CompressConfig) -> dict[str, np.ndarray]:
    model = cut(view, block.node_ids, block.outputs, value_types(inputs))
    standard = with_standard_ops(model)  # a training graph's roundings (run unoptimized: they are exact there)
    sess = session(standard, config.threads, optimize=standard is model)
    return in_batches(lambda feed: sess.run(block.outputs, feed), inputs, [v.name for v in model.graph.input],
                       block.outputs, config.batch_size)
