"""Activation ranges for uint8 quantization, from statistics streamed over the calibration samples.

Two passes over the samples in batches (only one batch of intermediates in memory at a time): the first
finds each tensor's min and max, the second fills a ``BINS``-bin histogram over [min, max]. From the
histogram, each estimator proposes a range [lo, hi] (always containing 0, as the integer kernels need 0
exactly representable):
  minmax      the observed [min, max];
  percentile  the PERCENTILE_TAIL and 1 − PERCENTILE_TAIL quantiles (outliers clipped);
  mse         the range minimizing the expected squared quantization error
                  E[(x − q(x))²],  q(x) = s·(clamp(round(x/s) + z, 0, 255) − z),  s = (hi − lo)/255,
              over hi = α·max, lo = β·min on a grid of clipping ratios.
``auto`` takes, per tensor, the estimator whose range gives the smallest of that error.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx

from ..onnxio.runtime import cpu_threads, session_with_outputs
from .readers import SampleSet

ESTIMATORS = ("auto", "minmax", "percentile", "mse")
BINS = 2048
PERCENTILE_TAIL = 1e-5
CLIP_RATIOS = np.geomspace(1.0, 0.01, 48)  # an outlier can stretch the observed range 100-fold
LEVELS = 255


@dataclass
class TensorRange:
    lo: float
    hi: float
    estimator: str
    mse: float  # expected squared quantization error of the chosen range (on the calibration histogram)

    def as_dict(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "estimator": self.estimator, "mse": self.mse}


def float_tensors(model: onnx.ModelProto, inferred: onnx.ModelProto) -> list[str]:
    """Graph inputs and node outputs of float type (what the quantizer may put Q/DQ on)."""
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)}
    initializers = {t.name for t in model.graph.initializer}
    names = [v.name for v in model.graph.input if v.name not in initializers]
    names += [out for node in model.graph.node for out in node.output if out]
    return [n for n in dict.fromkeys(names) if types.get(n) == onnx.TensorProto.FLOAT]


def activation_ranges(model: onnx.ModelProto, names: list[str], samples: SampleSet, estimator: str,
                      batch_size: int, threads: int, progress: Callable | None = None,
                      memory_bytes: int | None = None, label: str = "ranges") -> dict[str, TensorRange]:
    """One ``TensorRange`` per tensor in ``names``, chosen by ``estimator`` (see the module docstring). With
    ``memory_bytes``, the batches are made small enough that one batch of every tensor in ``names`` fits it (the
    statistics do not depend on how the samples are batched). ``label``: what the progress lines call the passes."""
    progress = progress or (lambda *args: None)
    # without onnxruntime's arena: a batch of every tensor is not kept allocated after the passes
    sess = session_with_outputs(model, names, threads, arena=False)
    wanted = [n for n in names if n not in samples.arrays]
    fed = [n for n in names if n in samples.arrays]  # graph inputs among the tensors (not every input is float)
    batch_size = _batch_within(sess, wanted, samples, batch_size, memory_bytes)
    lows = {n: np.inf for n in names}
    highs = {n: -np.inf for n in names}
    # each batch's tensors on every core: numpy's sorts and reductions release the GIL
    with ThreadPoolExecutor(max_workers=cpu_threads(threads)) as pool:
        for values in _stream(sess, wanted, fed, samples, batch_size, progress, f"{label} (1/2)"):
            for name, (low, high) in zip(values, pool.map(_extremes, values.values())):
                lows[name], highs[name] = min(lows[name], low), max(highs[name], high)
        edges = {n: _edges(lows[n], highs[n]) for n in names}
        counts = {n: np.zeros(BINS, np.float64) for n in names}
        for values in _stream(sess, wanted, fed, samples, batch_size, progress, f"{label} (2/2)"):
            for name, count in zip(values, pool.map(lambda item: np.histogram(item[1], bins=edges[item[0]])[0],
                                                    values.items())):
                counts[name] += count
    return {n: choose_range(counts[n], edges[n], estimator) for n in names if np.isfinite(lows[n])}


def _batch_within(sess, wanted: list[str], samples: SampleSet, batch_size: int, memory_bytes: int | None) -> int:
    """``batch_size``, lowered so that one batch of the ``wanted`` outputs (their bytes for one sample, measured)
    fits ``memory_bytes``; a model with a fixed batch keeps it."""
    if memory_bytes is None or samples.fixed_batch or not wanted:
        return batch_size
    per_sample = sum(np.asarray(value).nbytes for value in sess.run(wanted, samples.feed(1)))
    return int(max(1, min(batch_size, memory_bytes // max(per_sample, 1))))


def _extremes(value: np.ndarray) -> tuple[float, float]:
    return (float(value.min()), float(value.max())) if value.size else (np.inf, -np.inf)


def _stream(sess, wanted: list[str], fed: list[str], samples: SampleSet, batch_size: int, progress, stage: str
            ) -> Iterable[dict[str, np.ndarray]]:
    total = samples.num_batches(batch_size)
    for index, batch in enumerate(samples.batches(batch_size)):
        progress("quantize", index, total, stage)
        outputs = sess.run(wanted, batch)
        yield {**{n: v for n, v in zip(wanted, outputs)}, **{n: batch[n] for n in fed}}


def _edges(lo: float, hi: float) -> np.ndarray:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 0:
        lo, hi = -1.0, 1.0
    return np.linspace(lo, hi, BINS + 1)


def quantization_mse(counts: np.ndarray, centers: np.ndarray, lo: float, hi: float) -> float:
    """E[(x − q(x))²] of uint8 quantization with range [lo, hi] for the histogram (bin centers)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return float(np.sum(counts * centers ** 2) / max(counts.sum(), 1))
    scale = (hi - lo) / LEVELS
    zero = np.round(-lo / scale)
    q = (np.clip(np.round(centers / scale) + zero, 0, LEVELS) - zero) * scale
    return float(np.sum(counts * (centers - q) ** 2) / max(counts.sum(), 1))


def choose_range(counts: np.ndarray, edges: np.ndarray, estimator: str) -> TensorRange:
    centers = 0.5 * (edges[:-1] + edges[1:])
    lo, hi = float(edges[0]), float(edges[-1])
    candidates = {"minmax": (lo, hi), "percentile": _percentile(counts, edges), "mse": _mse_range(counts, centers)}
    names = tuple(candidates) if estimator == "auto" else (estimator,)
    scored = [(quantization_mse(counts, centers, *candidates[n]), n) for n in names]
    error, name = min(scored)
    return TensorRange(float(min(candidates[name][0], 0.0)), float(max(candidates[name][1], 0.0)), name, error)


def _percentile(counts: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    total = counts.sum()
    if total == 0:
        return float(edges[0]), float(edges[-1])
    cumulative = np.cumsum(counts) / total
    lo_bin = int(np.searchsorted(cumulative, PERCENTILE_TAIL))
    hi_bin = int(np.searchsorted(cumulative, 1 - PERCENTILE_TAIL))
    return float(edges[lo_bin]), float(edges[min(hi_bin + 1, BINS)])


def _mse_range(counts: np.ndarray, centers: np.ndarray) -> tuple[float, float]:
    lo, hi = min(float(centers[0]), 0.0), max(float(centers[-1]), 0.0)
    los = lo * CLIP_RATIOS if lo < 0 else np.zeros(1)
    his = hi * CLIP_RATIOS if hi > 0 else np.zeros(1)
    total = max(counts.sum(), 1)
    best = (np.inf, lo, hi)
    for candidate_lo in los:  # all hi at once: (H, BINS)
        scale = np.maximum(his - candidate_lo, 1e-30)[:, None] / LEVELS
        zero = np.round(-candidate_lo / scale)
        q = (np.clip(np.round(centers[None, :] / scale) + zero, 0, LEVELS) - zero) * scale
        errors = ((centers[None, :] - q) ** 2 * counts[None, :]).sum(axis=1) / total
        index = int(np.argmin(errors))
        if errors[index] < best[0]:
            best = (float(errors[index]), float(candidate_lo), float(his[index]))
    return best[1], best[2]
