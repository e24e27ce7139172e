"""The held-out figures' 95 % intervals: coverage by simulation, the counts they come from, and the gate note."""

import numpy as np
import pytest

from onnxadmm.config import ValidateConfig
from onnxadmm.validation.compare import compare
from onnxadmm.validation.gates import evaluate
from onnxadmm.validation.intervals import paired_drop_interval_pt, wilson_interval


@pytest.mark.parametrize("samples, p_only_original, p_only_compressed", [
    (200, 0.010, 0.005),  # a handful of discordant samples: where the plain Wald interval under-covers
    (500, 0.030, 0.020),
    (2000, 0.004, 0.004),
])
def test_the_paired_drop_interval_covers_the_true_drop_about_95_percent_of_the_time(samples, p_only_original,
                                                                                     p_only_compressed):
    rng = np.random.default_rng(0)
    runs = 4000
    cells = rng.multinomial(samples, [p_only_original, p_only_compressed, 1 - p_only_original - p_only_compressed],
                            size=runs)
    true_drop_pt = 100 * (p_only_original - p_only_compressed)
    covered = np.mean([lo <= true_drop_pt <= hi for lo, hi in
                       (paired_drop_interval_pt(b, c, samples) for b, c, _ in cells)])
    assert 0.93 <= covered <= 0.995, covered


@pytest.mark.parametrize("samples, p", [(200, 0.985), (500, 0.95), (9000, 0.99)])
def test_the_agreement_interval_covers_the_true_agreement_about_95_percent_of_the_time(samples, p):
    rng = np.random.default_rng(1)
    hits = rng.binomial(samples, p, size=4000)
    covered = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(int(k), samples) for k in hits)])
    assert 0.93 <= covered <= 0.975, covered


def test_intervals_narrow_with_more_samples_and_hold_the_estimate():
    small, large = paired_drop_interval_pt(2, 0, 200), paired_drop_interval_pt(20, 0, 2000)
    assert small[0] < 1.0 < small[1] and large[0] < 1.0 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 2
    low, high = wilson_interval(197, 200)
    assert low < 0.985 < high <= 1.0


def classifier_outputs():
    """Ten samples, three classes: the original right on 0–7, the compressed model differing on 6, 8 and 9."""
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    top_original = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0, 1])  # wrong on 8 and 9
    top_compressed = top_original.copy()
    top_compressed[[6, 8, 9]] = [1, 2, 0]  # 6 now wrong; 8 and 9 now right
    return {"y": np.eye(3)[top_original]}, {"y": np.eye(3)[top_compressed]}, labels


def test_compare_counts_the_samples_each_model_alone_gets_right():
    original, compressed, labels = classifier_outputs()
    c = compare(original, compressed, labels, 10)
    assert (c.only_original_right, c.only_compressed_right, c.agreeing) == (1, 2, 7)
    assert c.accuracy_drop_pt == pytest.approx(-10.0)
    assert c.accuracy_drop_interval_pt == pytest.approx(paired_drop_interval_pt(1, 2, 10))
    assert c.as_dict()["agreement_interval"] == pytest.approx(wilson_interval(7, 10))


def test_a_gate_whose_limit_lies_inside_the_interval_says_other_samples_could_decide_it():
    original, compressed, labels = classifier_outputs()
    c = compare(original, compressed, labels, 10)
    near, = evaluate(ValidateConfig(labels="labels", max_accuracy_drop=0.5), c, [])
    assert near.passed and near.within_noise and "more held-out samples would decide this gate" in near.detail
    far, = evaluate(ValidateConfig(labels="labels", max_accuracy_drop=90.0), c, [])
    assert far.passed and not far.within_noise and "95 % interval" in far.detail
    agreement, = evaluate(ValidateConfig(min_agreement=0.8), c, [])
    assert not agreement.passed and agreement.within_noise  # 7 of 10: 0.8 is well inside its interval
