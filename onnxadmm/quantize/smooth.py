"""Activation smoothing for dynamic int8 (SmoothQuant, Xiao et al. 2023), the migration strength chosen per tensor.

At run time each MatMul input x is quantized to uint8 with one scale for the whole tensor, so a few outlier
channels (LayerNorm outputs, GELU outputs of transformers) leave the other channels a handful of levels. For
channel scales s > 0, exactly

    x·W = (x · diag(1/s)) · (diag(s) · W),        s_j = max|x_j|^α / max_k |W_jk|^(1−α),

max|x_j| over the calibration samples and max_k over every quantized MatMul reading x: the outliers move into
rows of W, whose int8 scales are per output column. Per input tensor, α ∈ ``ALPHAS`` or no smoothing, whichever
gives the smallest output error of its MatMuls

    Σ_consumers ‖q_x(x/s) · q_W(diag(s) W) − x·W‖² / ‖x·W‖²,

q_x the run-time rounding (uint8, each run's own min and max), q_W int8 per column at max-abs, on calibration
samples run one at a time as at batch 1. 1/s goes into x's producer where that is exact and nothing else reads x,
otherwise into a Mul node before the MatMuls (``export/smoothing.py``; the residual stream of a post-LN encoder, a
GELU's output), and then only where the error falls by at least 10 % (the Mul costs a pass over x at run time).
The float model computes what it did; the grid solve and the export then run on the smoothed graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from ..analysis.layers import Layer
from ..calib.ranges import LEVELS
from ..calib.readers import SampleSet, evenly_spaced
from ..export.dynamic import column_int8
from ..export.smoothing import add_mul, attention_heads, folding, insert_nodes, smoothable_inputs, weight_kn, \
    write_weight
from ..onnxio.graph import FreshNames, GraphView
from ..onnxio.runtime import session_with_outputs

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ERROR_SAMPLES = 32  # calibration samples the output errors are measured on (fewer when memory says so)
ERROR_ROWS = 4096  # rows of x in the error (evenly spaced over those samples) ...
MIN_ERROR_ROWS = 256
ERROR_PRODUCT = 1 << 32  # ... fewer where a candidate's products would take more multiply-adds than this
MUL_NODE_GAIN = 0.9  # a Mul node is added only where the error falls to this fraction of it or less
ERROR_COLUMNS = 4096  # output columns in the error, shared by the MatMuls reading x (each column is rounded alone)


@dataclass
class SmoothedInput:
    """One MatMul input: the chosen α (None: left as it was), the output errors without and with it."""

    tensor: str
    consumers: list[str]
    alpha: float | None
    error_before: float
    error_after: float
    placed: str  # where 1/s went: "LayerNormalization 'n'", "Mul 'n' (its constant)", "value projection 'n'",
    #              "Mul node 'n'", or "" (not smoothed)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Smoothing:
    inputs: list[SmoothedInput] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def smoothed(self) -> list[SmoothedInput]:
        return [i for i in self.inputs if i.alpha is not None]

    def as_dict(self) -> dict:
        return {"inputs": [i.as_dict() for i in self.inputs], "seconds": self.seconds,
                "alphas": list(ALPHAS)}


def smooth_activations(model: onnx.ModelProto, view: GraphView, layers: Sequence[Layer], samples: SampleSet,
                       weight_bits: int, batch_size: int, threads: int, memory_bytes: int,
                       progress: Callable | None = None) -> Smoothing:
    """Rewrites ``model`` (indexed by ``view``) in place: each input of the quantized MatMul/Gemm ``layers``
    smoothed where that lowers its output error. ``memory_bytes``: what the captured activations may hold."""
    started = time.perf_counter()
    progress = progress or (lambda *args: None)
    groups = smoothable_inputs(view, layers)
    result = Smoothing()
    if not groups:
        return result
    names = list(groups)
    channel_max, runs = _activations(model, names, samples, batch_size, threads, memory_bytes, progress)
    heads = attention_heads(view)
    fresh = FreshNames(model.graph)
    added: dict[int, list[onnx.NodeProto]] = {}  # producer node id (-1: a graph input) -> Mul nodes after it
    q_max = 2 ** (weight_bits - 1) - 1
    for done, (tensor, consumers) in enumerate(groups.items()):
        progress("quantize", done, len(groups), f"activation smoothing: {tensor}")
        row_max, columns = _weight_summary(view, consumers)
        alpha, before, after = _choose(runs.pop(tensor), channel_max[tensor], row_max, columns, q_max)
        fold = folding(view, tensor, consumers, fresh, heads)
        if alpha is not None and fold is None and after > MUL_NODE_GAIN * before:
            alpha, after = None, before  # too little for the run-time cost of a Mul node
        placed = ""
        if alpha is not None:
            scales = _scales(channel_max[tensor], row_max, alpha)
            for layer in consumers:  # one weight at a time
                write_weight(view, layer, weight_kn(view, layer) * scales[:, None])
            placed = fold(1.0 / scales) if fold else \
                add_mul(model, view, tensor, consumers, 1.0 / scales, fresh, added)
        result.inputs.append(SmoothedInput(tensor, [layer.name for layer in consumers], alpha, before, after, placed))
    insert_nodes(model, view, added)
    result.seconds = time.perf_counter() - started
    return result


def _activations(model: onnx.ModelProto, names: list[str], samples: SampleSet, batch_size: int, threads: int,
                 memory_bytes: int, progress) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Per tensor: max |x| per channel (last axis) over every calibration sample, and the tensor of each of up to
    ``ERROR_SAMPLES`` samples run alone (a fixed-batch model: one batch), as many as ``memory_bytes`` holds."""
    wanted = [n for n in names if n not in samples.arrays]
    fed = [n for n in names if n in samples.arrays]  # graph inputs (no session needed when only they are read)
    sess = session_with_outputs(model, wanted, threads, arena=False) if wanted else None

    def values(feed: dict) -> dict[str, np.ndarray]:
        return {**(dict(zip(wanted, sess.run(wanted, feed))) if sess else {}), **{n: feed[n] for n in fed}}

    single = samples.fixed_batch or 1
    per_run = sum(v.nbytes for v in values(samples.feed(single)).values())
    batch = int(max(1, min(batch_size, memory_bytes // max(2 * per_run // single, 1))))
    channel_max = {n: np.zeros(0, np.float32) for n in names}
    total = samples.num_batches(batch)
    for index, feed in enumerate(samples.batches(batch)):
        progress("quantize", index, total, "activation smoothing: channel ranges")
        for name, value in values(feed).items():
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float32)
            channel_max[name] = peak if not channel_max[name].size else np.maximum(channel_max[name], peak)
    count = int(max(1, min(ERROR_SAMPLES, memory_bytes // max(2 * per_run, 1))))
    runs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in samples.spread(count * single).batches(single):
        for name, value in values(feed).items():
            runs[name].append(np.asarray(value, np.float32))
    return channel_max, runs


def _weight_summary(view: GraphView, consumers: Sequence[Layer]) -> tuple[np.ndarray, list[np.ndarray]]:
    """max_k |W_jk| over every consumer's weight, and evenly spaced columns of each (``ERROR_COLUMNS`` in all),
    read one weight at a time."""
    per_consumer = max(1, ERROR_COLUMNS // len(consumers))
    row_max, columns = None, []
    for layer in consumers:
        weight = weight_kn(view, layer)
        peak = np.abs(weight).max(axis=1)
        row_max = peak if row_max is None else np.maximum(row_max, peak)
        columns.append(np.ascontiguousarray(weight[:, evenly_spaced(weight.shape[1], per_consumer)]))
        del weight
    return row_max, columns


def _scales(channel_max: np.ndarray, row_max: np.ndarray, alpha: float) -> np.ndarray:
    weight_max = row_max.astype(np.float64)
    x_max = channel_max.astype(np.float64)
    usable = (x_max > 0) & (weight_max > 0)
    scales = np.ones_like(x_max)
    scales[usable] = x_max[usable] ** alpha / weight_max[usable] ** (1 - alpha)
    return scales.astype(np.float32)


def _choose(runs: list[np.ndarray], channel_max: np.ndarray, row_max: np.ndarray, weights: list[np.ndarray],
            q_max: int) -> tuple[float | None, float, float]:
    """(α or None, the error without smoothing, the error with the choice); ``weights``: the sampled columns."""
    rows = [r.reshape(-1, r.shape[-1]) for r in runs]
    total = sum(len(r) for r in rows)
    affordable = ERROR_PRODUCT // max(rows[0].shape[1] * sum(w.shape[1] for w in weights), 1)
    keep = evenly_spaced(total, min(ERROR_ROWS, max(MIN_ERROR_ROWS, affordable)))
    x = np.concatenate(rows)[keep]
    references = [x @ w for w in weights]

    def error(scales: np.ndarray) -> float:
        rounded = np.concatenate([_round_run(r / scales) for r in rows])[keep]
        total_error = 0.0
        for w, y in zip(weights, references):
            y_hat = rounded @ _round_columns(w * scales[:, None], q_max)
            total_error += float(np.sum((y_hat - y).astype(np.float64) ** 2) / max(np.sum(y.astype(np.float64) ** 2),
                                                                                   1e-30))
        return total_error / len(weights)

    before = error(np.ones(x.shape[1], np.float32))
    best, best_error = None, before
    for alpha in ALPHAS:
        candidate = error(_scales(channel_max, row_max, alpha))
        if candidate < best_error:
            best, best_error = alpha, candidate
    return best, before, best_error


def _round_run(x: np.ndarray) -> np.ndarray:
    """x as onnxruntime's DynamicQuantizeLinear rounds it (then dequantized): uint8 over [min(x, 0), max(x, 0)],
    in float32 as it computes."""
    lo, hi = np.float32(min(float(x.min()), 0.0)), np.float32(max(float(x.max()), 0.0))
    if hi == lo:
        return x
    scale = np.float32((hi - lo) / np.float32(LEVELS))
    zero = np.float32(np.round(np.clip(-lo / scale, 0, LEVELS)))
    return (np.clip(np.round(x / scale) + zero, 0, LEVELS) - zero) * scale


def _round_columns(w: np.ndarray, q_max: int) -> np.ndarray:
    """W (K×N) rounded to int8 per column at max-abs scales, as the export rounds it, dequantized."""
    q, scales = column_int8(w, False, None, q_max)
    return q.astype(np.float32) * scales
