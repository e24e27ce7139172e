"""--target-latency is decided on the measured graph: the search over the table's budget
(``meet_measured_latency``) on latency responses of known shape (end to end: test_channels.py)."""

import pytest

from onnxadmm.errors import ConfigError
from onnxadmm.plan.latency import SEARCH_STEPS, SEARCH_TOLERANCE, meet_measured_latency


def search(response, target):
    """Plans on a grid of 0.01 (as kept widths are discrete); ``response`` maps a plan's table ratio to the
    ratio its graph measures."""
    def plan_at(budget):
        plan = round(budget, 2)
        return plan, plan

    return meet_measured_latency(plan_at, response, target)


@pytest.mark.parametrize("slope, offset", [
    (0.5, 0.3),  # the table overstates what a plan saves (ResNet-56 here)
    (1.0, 0.1),  # the table understates it
    (1.0, 0.0),  # the table is right
])
def test_the_search_returns_a_plan_measured_within_tolerance_below_the_target(slope, offset):
    def response(plan):
        return offset + slope * plan

    plan, measured, steps = search(response, 0.7)
    assert target_met(measured, 0.7)
    assert measured == pytest.approx(response(plan))
    best_budget = (0.7 - offset) / slope
    assert best_budget - SEARCH_TOLERANCE / slope - 0.01 - 1e-9 <= plan <= best_budget + 1e-9
    assert len(steps) <= SEARCH_STEPS
    assert steps[0].budget_ratio == 0.7  # it starts from what the table says


def target_met(measured, target):
    return target - SEARCH_TOLERANCE - 1e-9 <= measured <= target


def test_the_search_keeps_the_least_aggressive_plan_that_met_when_none_is_within_tolerance():
    def response(plan):  # measured 0.62 below a budget of 0.62, else above the target: never within tolerance
        return 0.62 if plan <= 0.62 else 0.75

    plan, measured, steps = search(response, 0.7)
    met = [s for s in steps if s.measured_ratio <= 0.7]
    assert len(steps) <= SEARCH_STEPS and met and measured == 0.62
    assert plan == round(max(s.budget_ratio for s in met), 2) == 0.62  # the bracket closed on the jump


def test_an_unreachable_latency_is_refused_with_the_fastest_measured_ratio_and_the_floor():
    timed = []

    def response(plan):
        timed.append(plan)
        return 0.8 + 0.2 * plan

    with pytest.raises(ConfigError, match=r"--target-latency 0.5 cannot be met: the fastest plan tried measured "
                                          r"0\.80\d .* \(\d plans timed\); with every layer at its most aggressive "
                                          r"option the graph measures 0\.800"):
        search(response, 0.5)
    assert timed[-1] == 0.0  # the budget-0 plan is timed for the floor


def test_the_floor_is_left_out_when_the_planner_cannot_form_the_strongest_plan():
    def plan_at(budget):
        if budget <= 0.0:
            raise ConfigError("no plan at budget 0")
        return round(budget, 2), budget

    with pytest.raises(ConfigError) as refused:
        meet_measured_latency(plan_at, lambda p: 0.8 + 0.2 * p, 0.5)
    assert "most aggressive" not in str(refused.value) and "plans timed); ask for less" in str(refused.value)


def test_the_strongest_plan_is_returned_when_the_search_steps_all_missed_but_it_meets_the_target():
    """A response with a cliff only the strongest plan is past (the budget-0 plan measures 0.3, every other
    plan the search can reach 0.75): the target of 0.7 is met by that plan, not refused."""
    def response(plan):
        return 0.3 if plan == 0.0 else 0.75

    plan, measured, steps = search(response, 0.7)
    assert plan == 0.0 and measured == 0.3
    assert steps[-1].budget_ratio == 0.0 and steps[-1].measured_ratio == 0.3
    assert all(s.measured_ratio == 0.75 for s in steps[:-1])


def test_the_sign_test_matches_the_binomial_tails():
    from onnxadmm.cost.timing import sign_test_p

    assert sign_test_p(15, 30) == 1.0
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)  # five rounds can never show a difference at 5 %
    assert sign_test_p(21, 30) == pytest.approx(0.0428, abs=1e-4)  # the fewest of 30 that do
    assert sign_test_p(20, 30) == pytest.approx(0.0987, abs=1e-4)
    assert sign_test_p(1000, 2000) == 1.0 and sign_test_p(900, 2000) < 1e-5  # 2,000 rounds or discordant pairs
    assert sign_test_p(9, 30) == sign_test_p(21, 30)


def latency(ratio, faster, rounds=30):
    from onnxadmm.cost.timing import LatencyAB

    return LatencyAB(1, 2, rounds, 10, 1.0, 1.1, ratio, ratio, ratio, ratio * 0.8, ratio * 1.2, rounds_faster=faster)


@pytest.mark.parametrize("ratio, faster, rounds, verdict", [
    (0.948, 17, 30, "no measurable change"),  # a 5.5 % median gain that 17 of 30 rounds do not establish
    (0.948, 24, 30, "faster"),
    (1.10, 5, 30, "slower"),
    (0.98, 30, 30, "no measurable change"),  # consistent, but inside the noise band
    (0.80, 3, 3, "faster"),  # too few rounds for the sign test: the median decides
    (0.80, None, 30, "faster"),  # rounds not recorded (a report read back from an older version)
])
def test_the_latency_verdict_needs_the_median_outside_the_band_and_the_rounds_to_agree(ratio, faster, rounds,
                                                                                        verdict):
    from onnxadmm.cost.footprint import Footprint
    from onnxadmm.validation.run import gains_statement

    footprint = Footprint(1000, 900, 100, 100, 1000, 1000, 90, 90)
    line = gains_statement(footprint, footprint, [latency(ratio, faster, rounds)])[-1]
    assert line.endswith(f"— {verdict}."), line
    assert (f"faster in {faster} of {rounds} rounds" in line) == (faster is not None)


@pytest.mark.parametrize("rounds", [6, 10, 30, 100])
def test_the_median_interval_covers_the_true_median_at_least_95_percent_of_the_time(rounds):
    import numpy as np

    from onnxadmm.cost.timing import median_interval

    rng = np.random.default_rng(rounds)
    ratios = 0.5 * rng.lognormal(0.0, 0.15, size=(3000, rounds))  # true median 0.5, skewed like timings
    covered = np.mean([lo <= 0.5 <= hi for lo, hi in map(median_interval, ratios)])
    assert 0.94 <= covered <= 0.995, covered  # at least 95 % in theory; 3,000 draws resolve about ±0.008
    assert median_interval(np.arange(1.0, 31.0)) == (10.0, 21.0)  # the 10th and 21st of 30
    assert median_interval(np.arange(1.0, 6.0)) == (1.0, 5.0)  # too few rounds: the whole range


def test_a_speedup_gate_inside_the_median_interval_says_more_rounds_would_decide_it():
    from onnxadmm.config import ValidateConfig
    from onnxadmm.validation.compare import Comparison
    from onnxadmm.validation.gates import evaluate

    timing = latency(0.5, 30)
    timing.ratio_interval = (0.48, 0.53)  # speed-up 1.89–2.08
    near, = evaluate(ValidateConfig(min_speedup=2.0), Comparison(samples=10), [timing])
    assert near.passed and near.within_noise and "more A/B rounds would decide this gate" in near.detail
    far, = evaluate(ValidateConfig(min_speedup=1.5), Comparison(samples=10), [timing])
    assert far.passed and not far.within_noise and "95 % interval 1.887 to 2.083x" in far.detail


def _matmuls(count: int, width: int = 256):
    """x (1 × width) through ``count`` MatMuls by a width × width weight: work that grows with ``count``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(width, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}" if i + 1 < count else "y"])
             for i in range(count)]
    graph = helper.make_graph(nodes, f"matmuls{count}", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                        [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_models_timed_side_by_side_each_get_their_ratio_to_the_same_original():
    import numpy as np

    from onnxadmm.cost.timing import measure, measure_side_by_side

    feed = {"x": np.ones((1, 256), np.float32)}
    light, original, heavy = _matmuls(2), _matmuls(16), _matmuls(128)
    latencies = measure_side_by_side(original, [light, heavy], feed, rounds=8, threads=1)
    assert len(latencies) == 2 and all(l.rounds == 8 and l.interleaved for l in latencies)
    assert latencies[0].ratio_median < 1.0 < latencies[1].ratio_median  # 2 and 128 MatMuls against 16
    assert latencies[0].original_ms_median == latencies[1].original_ms_median  # the same rounds of A
    pair = measure(original, heavy, feed, rounds=4, threads=1)
    assert pair.interleaved and pair.ratio_median > 1.0
    apart = measure(original, heavy, feed, rounds=4, threads=1, interleaved=False)
    assert not apart.interleaved and apart.ratio_median > 1.0
