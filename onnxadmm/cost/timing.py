"""Latency of original (A) vs compressed (B), measured side by side in one process.

Both sessions use the same thread count with thread-pool spinning off (else one session's idle
spinning steals the other's core). After warm-up, rounds alternate the order (A B, then B A, ...);
each measurement repeats the call enough times to last a few milliseconds. The result is the median
of per-round ratios B/A with its 10th–90th percentile band; speed-up = 1 / ratio. Absolute times on a
shared machine are noisy — the ratio is the figure to trust.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..onnxio.runtime import cpu_threads, session

MIN_MEASURE_S = 0.005


@dataclass
class LatencyAB:
    batch_size: int
    threads: int
    rounds: int
    repeats: int
    original_ms_median: float
    original_ms_p90: float
    compressed_ms_median: float
    compressed_ms_p90: float
    ratio_median: float  # compressed / original
    ratio_p10: float
    ratio_p90: float
    sequence_length: int | None = None  # tokens per sample, when timed at --latency-seq-len

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio_median

    def as_dict(self) -> dict:
        return {**self.__dict__, "speedup": self.speedup}


def timed(sess, names, feed, repeats: int) -> float:
    """Seconds per call of ``sess.run`` over ``repeats`` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        sess.run(names, feed)
    return (time.perf_counter() - start) / repeats


def measure(model_a, model_b, feed: dict[str, np.ndarray], rounds: int, threads: int,
            warmup: int = 3, feed_b: dict[str, np.ndarray] | None = None) -> LatencyAB:
    """A/B latency of two models on the same ``feed`` (the batch size is the feed's first axis), or on
    ``feed_b`` for B when the two take differently shaped inputs."""
    feed_b = feed if feed_b is None else feed_b
    threads = cpu_threads(threads)
    sess_a, sess_b = session(model_a, threads), session(model_b, threads)
    names_a = [o.name for o in sess_a.get_outputs()]
    names_b = [o.name for o in sess_b.get_outputs()]
    for _ in range(warmup):
        timed(sess_a, names_a, feed, 1)
        timed(sess_b, names_b, feed_b, 1)
    single = max(timed(sess_a, names_a, feed, 1), 1e-6)
    repeats = max(1, int(np.ceil(MIN_MEASURE_S / single)))
    times_a, times_b = [], []
    for index in range(rounds):
        if index % 2 == 0:
            times_a.append(timed(sess_a, names_a, feed, repeats))
            times_b.append(timed(sess_b, names_b, feed_b, repeats))
        else:
            times_b.append(timed(sess_b, names_b, feed_b, repeats))
            times_a.append(timed(sess_a, names_a, feed, repeats))
    a, b = np.array(times_a) * 1e3, np.array(times_b) * 1e3
    ratios = b / a
    batch = len(next(iter(feed.values())))
    return LatencyAB(batch_size=batch, threads=threads, rounds=rounds, repeats=repeats,
                     original_ms_median=float(np.median(a)), original_ms_p90=float(np.percentile(a, 90)),
                     compressed_ms_median=float(np.median(b)), compressed_ms_p90=float(np.percentile(b, 90)),
                     ratio_median=float(np.median(ratios)), ratio_p10=float(np.percentile(ratios, 10)),
                     ratio_p90=float(np.percentile(ratios, 90)))
