"""Latency of original (A) vs compressed (B), measured side by side in one process.

Both sessions use the same thread count with thread-pool spinning off (else one session's idle
spinning steals the other's core). After warm-up, rounds alternate the order (A B, then B A, ...);
each measurement repeats the call enough times to last a few milliseconds. The result is the median
of per-round ratios B/A with its 10th–90th percentile band; speed-up = 1 / ratio. Whether B differs from A at
all is a sign test over the rounds: under "no difference" each round's ratio is as likely below 1 as above, so
k of n rounds faster has two-sided p = min(1, 2·P(X ≤ min(k, n − k))), X ~ Binomial(n, ½). The median ratio's
95 % interval is the distribution-free one from the sorted ratios r₍₁₎ ≤ … ≤ r₍ₙ₎: [r₍ₖ₎, r₍ₙ₋ₖ₊₁₎] with k the
largest such that P(X < k) ≤ 2.5 % (k = 10 of 30 rounds). Absolute times on a
shared machine are noisy — the ratio is the figure to trust. Models too large to hold two sessions of
(``interleaved=False``) are timed one after the other, each session dropped before the next is built: the
same rounds and ratios, without the alternation that cancels a change in the machine's load.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..onnxio.runtime import cpu_threads, session

MIN_MEASURE_S = 0.005
SIGN_TEST_LEVEL = 0.05  # a difference whose sign test p exceeds this is not established by the rounds


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
    interleaved: bool = True  # False: A's rounds, then B's (one session at a time)
    rounds_faster: int | None = None  # rounds in which B took less time than A (None: not recorded)
    ratio_interval: tuple[float, float] | None = None  # 95 % interval of the median ratio (None: not recorded)

    @property
    def speedup(self) -> float:
        return 1.0 / self.ratio_median

    @property
    def speedup_interval(self) -> tuple[float, float] | None:
        """95 % interval of the speed-up, 1 / the median ratio's."""
        return None if self.ratio_interval is None else (1.0 / self.ratio_interval[1], 1.0 / self.ratio_interval[0])

    @property
    def sign_p(self) -> float | None:
        """Two-sided sign-test p of "B is as likely faster as slower in a round"; None when not recorded."""
        return None if self.rounds_faster is None else sign_test_p(self.rounds_faster, self.rounds)

    def differs(self, noise_band: float) -> bool:
        """Whether B's latency differs from A's: the median speed-up outside 1 ± ``noise_band`` and, where the
        rounds are recorded and enough to show it, a significant sign test."""
        if abs(self.speedup - 1.0) <= noise_band:
            return False
        if self.rounds_faster is None or sign_test_p(0, self.rounds) > SIGN_TEST_LEVEL:
            return True  # too few rounds for the test ever to show a difference: the median alone
        return self.sign_p <= SIGN_TEST_LEVEL

    def as_dict(self) -> dict:
        return {**self.__dict__, "speedup": self.speedup}


def half_binomial_cdf(k: int, n: int) -> float:
    """P(X ≤ k) for X ~ Binomial(n, ½)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n  # integers: exact for any n (2.0 ** n overflows)


def sign_test_p(successes: int, trials: int) -> float:
    """Two-sided exact sign test: min(1, 2·P(X ≤ min(k, n − k))) for X ~ Binomial(n, ½) (with k and n the
    discordant pairs of two classifiers, the exact McNemar test)."""
    return min(1.0, 2.0 * half_binomial_cdf(min(successes, trials - successes), trials))


def median_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval of the median: [x₍ₖ₎, x₍ₙ₋ₖ₊₁₎] of the sorted values, k the largest with
    P(Binomial(n, ½) < k) ≤ (1 − level)/2; the whole range when n is too small for that (coverage 1 − 2^(1−n))."""
    ordered, n = np.sort(np.asarray(values, dtype=float)), len(values)
    k = 0
    while k < n // 2 and half_binomial_cdf(k, n) <= (1 - level) / 2:  # P(X < k + 1)
        k += 1
    k = max(k, 1)
    return float(ordered[k - 1]), float(ordered[n - k])


def timed(sess, names, feed, repeats: int) -> float:
    """Seconds per call of ``sess.run`` over ``repeats`` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        sess.run(names, feed)
    return (time.perf_counter() - start) / repeats


def measure(model_a, model_b, feed: dict[str, np.ndarray], rounds: int, threads: int,
            warmup: int = 3, feed_b: dict[str, np.ndarray] | None = None, interleaved: bool = True) -> LatencyAB:
    """A/B latency of two models on the same ``feed`` (the batch size is the feed's first axis), or on
    ``feed_b`` for B when the two take differently shaped inputs."""
    if interleaved:
        return measure_side_by_side(model_a, [model_b], feed, rounds, threads, warmup, feed_b)[0]
    feed_b = feed if feed_b is None else feed_b
    threads = cpu_threads(threads)
    timer_a = _Timer(model_a, feed, threads)  # one session at a time: A's is released before B's is built
    repeats = _warm_up([timer_a], warmup)
    times_a = [timer_a.time(repeats) for _ in range(rounds)]
    del timer_a
    timer_b = _Timer(model_b, feed_b, threads)
    _warm_up([timer_b], warmup)
    times_b = [timer_b.time(repeats) for _ in range(rounds)]
    return _latency_ab(times_a, times_b, feed, threads, rounds, repeats, interleaved=False)


def measure_side_by_side(model_a, models: list, feed: dict[str, np.ndarray], rounds: int, threads: int,
                         warmup: int = 3, feed_b: dict[str, np.ndarray] | None = None) -> list[LatencyAB]:
    """Each of ``models`` against ``model_a``, all sessions held and timed in the same rounds: a round times
    A, B₁ … Bₙ, the next one in the reverse order, so each Bᵢ sits on average where A does and a change in
    the machine's load between rounds reaches all of them alike. One ``LatencyAB`` per model (B/A ratios)."""
    feed_b = feed if feed_b is None else feed_b
    threads = cpu_threads(threads)
    timers = [_Timer(model_a, feed, threads)] + [_Timer(model, feed_b, threads) for model in models]
    repeats = _warm_up(timers, warmup)
    times: list[list[float]] = [[] for _ in timers]
    for index in range(rounds):
        order = range(len(timers)) if index % 2 == 0 else reversed(range(len(timers)))
        for position in order:
            times[position].append(timers[position].time(repeats))
    return [_latency_ab(times[0], times_b, feed, threads, rounds, repeats) for times_b in times[1:]]


def _latency_ab(times_a: list[float], times_b: list[float], feed: dict[str, np.ndarray], threads: int,
                rounds: int, repeats: int, interleaved: bool = True) -> LatencyAB:
    a, b = np.array(times_a) * 1e3, np.array(times_b) * 1e3
    ratios = b / a
    batch = len(next(iter(feed.values())))
    return LatencyAB(batch_size=batch, threads=threads, rounds=rounds, repeats=repeats,
                     original_ms_median=float(np.median(a)), original_ms_p90=float(np.percentile(a, 90)),
                     compressed_ms_median=float(np.median(b)), compressed_ms_p90=float(np.percentile(b, 90)),
                     ratio_median=float(np.median(ratios)), ratio_p10=float(np.percentile(ratios, 10)),
                     ratio_p90=float(np.percentile(ratios, 90)), interleaved=interleaved,
                     rounds_faster=int(np.sum(ratios < 1.0)), ratio_interval=median_interval(ratios))


def _warm_up(timers: list["_Timer"], warmup: int) -> int:
    """``warmup`` calls of each; returns the repeats that make one measurement of the first last a few ms."""
    for _ in range(warmup):
        for timer in timers:
            timer.time(1)
    return max(1, int(np.ceil(MIN_MEASURE_S / max(timers[0].time(1), 1e-6))))


class _Timer:
    """One model's session and feed."""

    def __init__(self, model, feed: dict[str, np.ndarray], threads: int):
        self.session, self.feed = session(model, threads), feed
        self.names = [o.name for o in self.session.get_outputs()]

    def time(self, repeats: int) -> float:
        return timed(self.session, self.names, self.feed, repeats)
