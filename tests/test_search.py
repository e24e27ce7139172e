"""The budget-driven search (compress with a budget and no --method): frontier bookkeeping on synthetic
measurements, the candidate ladder on a synthetic cost/damage table, the Mermaid chart, and the CLI end to
end on the bundled LeNet-5."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from conftest import ROOT
from onnxadmm.config import CompressConfig, ValidateConfig
from onnxadmm.errors import ConfigError
from onnxadmm.budget.chart import mermaid_frontier
from onnxadmm.budget.frontier import Candidate, Measured, choose, closest, frontier, mark
from onnxadmm.budget.run import run_search


def _measured(label, cost, drop, passed):
    return Measured(Candidate(label, {}), cost, drop, 1 - drop / 100, passed, 1.0)


def test_frontier_keeps_the_undominated_points_and_the_choice_is_the_cheapest_that_holds():
    points = [_measured("a", 0.50, 0.0, True), _measured("b", 0.40, 0.3, True), _measured("c", 0.45, 0.4, True),
              _measured("d", 0.30, 1.2, False), _measured("e", 0.60, 0.1, True)]
    assert [m.candidate.label for m in frontier(points)] == ["d", "b", "a"]  # c is beaten by b, e by a
    assert choose(points).candidate.label == "b"
    mark(points, choose(points))
    assert [m.chosen for m in points] == [False, True, False, False, False]
    missed = [_measured("x", 0.3, 2.0, False), _measured("y", 0.5, 0.8, False)]
    assert choose(missed) is None and closest(missed).candidate.label == "y"


class _Table:
    """Stands in for `compress` with a synthetic table: cost and top-1 drop as functions of the settings; the
    "model" is an empty graph named by ``model_of(config)`` (equal names: the same model)."""

    def __init__(self, drop_of, cost_of, model_of=lambda c: repr(c), structure_of=None, noise_pt=0.0):
        self.drop_of, self.cost_of, self.model_of, self.calls = drop_of, cost_of, model_of, []
        self.noise_pt = noise_pt  # half-width of each drop's 95 % interval over the held-out samples
        self.structure_of = structure_of or model_of  # the graph without its weights' values
        self.original_bytes = 1000

    def __call__(self, config: CompressConfig, reuse=None):
        self.calls.append(config)
        if config.target_latency_of == "int8":  # a fraction of the int8 original's latency: as one of the original's
            int8 = self.cost_of(CompressConfig(method="none", quantize="int8"))
            config = dataclasses.replace(config, target_latency=round(config.target_latency * int8, 3),
                                         target_latency_of="original")
        if config.method == "channel" and config.target_latency < 0.31:
            raise ConfigError(f"--target-latency {config.target_latency} cannot be met")
        drop, cost = self.drop_of(config), self.cost_of(config)
        gate = SimpleNamespace(name="max_accuracy_drop", passed=drop <= 0.5,
                               within_noise=drop - self.noise_pt < 0.5 < drop + self.noise_pt)
        validation = SimpleNamespace(
            comparison=SimpleNamespace(accuracy_drop_pt=drop, agreement=1 - drop / 100, samples=200), gates=[gate],
            latency=[SimpleNamespace(batch_size=1, ratio_median=cost)],
            original=SimpleNamespace(zipped_bytes=1000, size_bytes=self.original_bytes),
            compressed=SimpleNamespace(zipped_bytes=int(cost * 1000), size_bytes=self.original_bytes // 4))
        report = SimpleNamespace(passed=gate.passed, validation=validation, search=None)
        node = onnx.helper.make_node("Identity", ["w"], ["y"], name=self.structure_of(config))
        weight = onnx.numpy_helper.from_array(np.array([len(self.model_of(config))], np.float32), "w")
        model = onnx.helper.make_model(onnx.helper.make_graph([node], self.model_of(config), [], [], [weight]))
        return SimpleNamespace(report=report, passed=report.passed, model=model)


def _latency_drop(config):
    if config.method == "none":
        return 0.1
    return 0.1 + 40 * max(0.0, 0.45 - config.target_latency) - (0.2 if config.refine_epochs else 0.0)


def _latency_cost(config):
    return 0.47 if config.method == "none" else config.target_latency


def test_latency_search_climbs_channel_targets_below_int8_and_refines_the_first_miss():
    table = _Table(_latency_drop, _latency_cost)
    result = run_search(table, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5),
                        lambda *a: None)
    tried = [(c.method, c.quantize, c.target_latency, c.target_latency_of, c.refine_epochs) for c in table.calls]
    assert tried[0] == ("none", "int8", None, "original", 0)  # int8 alone first
    assert all(q == "int8" for _, q, *_ in tried[1:])  # int8 held and is faster: channels compose with it
    assert tried[1][2:] == (0.92, "int8", 0)  # a fraction of the int8 original's latency, as the planner times it
    search = result.report.search
    rows = {r["label"]: r for r in search["candidates"]}
    assert any(r["round"] == "refine" for r in rows.values())  # the least aggressive miss, refined
    holding = [r for r in rows.values() if r["passed"]]
    assert search["held"] and result.passed
    assert rows[search["chosen"]]["cost_ratio"] == min(r["cost_ratio"] for r in holding)
    assert rows[search["chosen"]]["chosen"] and rows[search["chosen"]]["on_frontier"]
    assert "```mermaid" in search["chart"]


def test_the_search_says_how_many_candidates_the_evaluation_could_not_separate_from_the_gate():
    quiet = run_search(_Table(_latency_drop, _latency_cost), CompressConfig(method="auto"),
                       ValidateConfig(max_accuracy_drop=0.5), lambda *a: None).report.search
    assert quiet["within_noise"] == "" and all(r["within_noise"] == [] for r in quiet["candidates"] if r["samples"])
    noisy = run_search(_Table(_latency_drop, _latency_cost, noise_pt=0.45), CompressConfig(method="auto"),
                       ValidateConfig(max_accuracy_drop=0.5), lambda *a: None).report.search
    measured = [r for r in noisy["candidates"] if r.get("samples")]
    inside = [r for r in measured if r["within_noise"]]
    assert inside and all(abs(r["accuracy_drop_pt"] - 0.5) < 0.45 for r in inside)
    assert noisy["within_noise"].startswith(f"{len(inside)} of {len(measured)} candidates")
    assert "200 held-out samples" in noisy["within_noise"]


def test_size_search_uses_the_zipped_size_and_sparsity_ladder():
    table = _Table(lambda c: 0.0 if c.method == "none" else max(0.0, (c.sparsity - 0.8) * 10),
                   lambda c: 0.28 if c.method == "none" else 0.28 * (1 - c.sparsity))
    result = run_search(table, CompressConfig(method="auto", objective="size"),
                        ValidateConfig(max_accuracy_drop=0.5), lambda *a: None)
    sparsities = [c.sparsity for c in table.calls if c.method == "sparse"]
    assert sparsities[:3] == [0.5, 0.75, 0.9]  # 0.9 misses (1.0 pt): the ladder stops there
    assert 0.825 in sparsities  # one bisection step between 0.75 and 0.9
    assert result.report.search["chosen"].startswith("sparse 0.825")
    # sparse 0.5 + w4 first: it holds, so neither precision alone (both larger) is run
    assert table.calls[0].method == "sparse" and table.calls[0].quantize == "w4"
    assert [c.quantize for c in table.calls if c.method == "none"] == []
    rows = {r["label"]: r for r in result.report.search["candidates"]}
    for alone in ("w4", "int8"):
        assert rows[alone]["note"].startswith("not tried: sparse 0.500 + w4 holds the gate")


def test_size_search_falls_back_to_int4_alone_when_the_first_sparsity_misses():
    table = _Table(lambda c: 0.1 if c.method == "none" else 0.1 + 1.2 * c.sparsity,  # 0.25 holds, 0.5 misses
                   lambda c: 0.15 if c.method == "none" else 0.15 * (1 - c.sparsity))
    result = run_search(table, CompressConfig(method="auto", objective="size"),
                        ValidateConfig(max_accuracy_drop=0.5), lambda *a: None)
    tried = [(c.method, c.quantize, c.sparsity if c.method == "sparse" else None, c.refine_epochs)
             for c in table.calls]
    # the miss at 1.4x the budget is refined first; that misses too, so the bisection tries 0.25 (from level 0)
    assert tried == [("sparse", "w4", 0.5, 0), ("none", "w4", None, 0), ("sparse", "w4", 0.5, 10),
                     ("sparse", "w4", 0.25, 0)]
    rows = {r["label"]: r for r in result.report.search["candidates"]}
    assert rows["int8"]["note"].startswith("not tried: int4 weights alone hold the gate")
    assert result.report.search["chosen"] == "sparse 0.250 + w4"


def test_size_search_climbs_sparsity_with_int4_weights_when_they_hold_and_are_smaller():
    def drop(c):
        return (0.3 if c.quantize == "w4" else 0.0) + (max(0.0, (c.sparsity - 0.8) * 10) if c.method == "sparse"
                                                        else 0.0)

    def cost(c):
        return (0.15 if c.quantize == "w4" else 0.28) * ((1 - c.sparsity) if c.method == "sparse" else 1.0)

    table = _Table(drop, cost)
    result = run_search(table, CompressConfig(method="auto", objective="size"),
                        ValidateConfig(max_accuracy_drop=0.5), lambda *a: None)
    assert {c.quantize for c in table.calls if c.method == "sparse"} == {"w4"}
    assert result.report.search["chosen"].endswith("+ w4")
    table = _Table(lambda c: drop(c) + (1.0 if c.quantize == "w4" else 0.0), cost)  # w4 misses the gate alone
    run_search(table, CompressConfig(method="auto", objective="size"), ValidateConfig(max_accuracy_drop=0.5),
               lambda *a: None)
    assert [c.quantize for c in table.calls if c.method == "none"] == ["w4", "int8"]
    assert [c.quantize for c in table.calls if c.method == "sparse"][0] == "w4"  # the first try, before w4 alone
    assert {c.quantize for c in table.calls[3:] if c.method == "sparse"} == {"int8"}


def test_a_candidate_that_changes_nothing_is_recognized_and_noise_level_cost_gains_do_not_win():
    """Channels at a target int8 alone already meets plan nothing: the same model, measured again, must not
    win on latency noise; and a candidate within 3 % of the cheapest that damages less is preferred."""
    def model_of(c):
        return "int8" if c.method == "none" or c.target_latency >= 0.45 else repr(c)

    table = _Table(lambda c: 0.1 if model_of(c) == "int8" else 0.3,
                   lambda c: 0.50 if c.method == "none" else (0.47 if model_of(c) == "int8" else 0.49), model_of)
    result = run_search(table, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5),
                        lambda *a: None)
    rows = result.report.search["candidates"]
    assert rows[1]["note"] == "the same model as int8" and rows[1]["cost_ratio"] is None
    assert result.report.search["chosen"] == "int8"  # 0.49 is within 3 % of nothing cheaper; int8 is 0.50
    close = [_measured("a", 0.500, 0.1, True), _measured("b", 0.490, 0.4, True), _measured("c", 0.40, 0.9, False)]
    assert choose(close).candidate.label == "a"  # 2 % cheaper is inside the noise: the lower damage wins


def test_a_candidate_that_cannot_be_built_is_reported_and_the_bisection_tries_between_it_and_the_last_hold():
    """Targets below 0.31 of the original are refused (as a planner refuses one it can reach only by destroying a
    group): the refusal at 0.76 of int8 (0.304) is a miss with nothing to refine, so the next candidate is the level
    halfway from 0.84 of int8."""
    table = _Table(lambda c: 0.0, lambda c: 0.4 if c.method == "none" else c.target_latency)
    result = run_search(table, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5),
                        lambda *a: None)
    rows = {r["label"]: r for r in result.report.search["candidates"]}
    refused = rows["channels 0.760 of int8 + int8"]
    assert refused["note"].startswith("failed: --target-latency 0.304 cannot be met") and not refused["passed"]
    assert list(rows)[-1] == "channels 0.800 of int8 + int8" and not any(label.endswith("refined") for label in rows)
    assert result.passed and result.report.search["chosen"] == "channels 0.800 of int8 + int8"
    table = _Table(lambda c: 0.0, lambda c: 0.4 if c.method == "none" else c.target_latency)

    def refuse_below(config, reuse=None):  # the halfway level is refused too
        if config.method == "channel" and config.target_latency < 0.835:  # (of int8 alone's 0.4: 0.334)
            raise ConfigError(f"--target-latency {config.target_latency} cannot be met")
        return table(config, reuse)

    result = run_search(refuse_below, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5),
                        lambda *a: None)
    labels = [r["label"] for r in result.report.search["candidates"]]
    assert labels[-2:] == ["channels 0.760 of int8 + int8", "channels 0.800 of int8 + int8"]  # both refused
    assert result.report.search["chosen"] == "channels 0.840 of int8 + int8"


def test_no_holding_candidate_returns_the_closest_with_the_reason():
    table = _Table(lambda c: 2.0 + (0 if c.method == "none" else 1.0), lambda c: 0.5)
    result = run_search(table, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5),
                        lambda *a: None)
    search = result.report.search
    assert not result.passed and not result.report.passed and not search["held"]
    assert search["chosen"] == "int8" and "no candidate held the gate" in search["reason"]


@pytest.mark.parametrize("int8_s, channels_tried", [(150.0, 1), (250.0, 0)])
def test_the_time_budget_skips_a_candidate_expected_to_overrun_it(monkeypatch, int8_s, channels_tried):
    """--time-budget-min 10 (600 s), channels + int8 taking 400 s a run: the first channel candidate is expected at
    3x the int8 run (it solves, then runs the int8 stage), the next at the 400 s its method took."""
    import onnxadmm.budget.run as search_module

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(search_module.time, "perf_counter", lambda: clock.now)
    table = _Table(_latency_drop, _latency_cost)

    def timed(config, reuse=None):
        clock.now += int8_s if config.method == "none" else 400.0
        return table(config, reuse)

    result = run_search(timed, CompressConfig(method="auto", time_budget_min=10),
                        ValidateConfig(max_accuracy_drop=0.5), lambda *a: None)
    assert [c.method for c in table.calls] == ["none"] + ["channel"] * channels_tried
    assert clock.now <= 600.0
    rows = result.report.search["candidates"]
    skipped = [r for r in rows if r["note"].startswith("skipped")]
    assert skipped and "budget spent, and it would take about" in skipped[0]["note"]
    expected = 3 * int8_s if channels_tried == 0 else 400
    assert f"about {expected:.0f} s" in skipped[0]["note"]


def test_a_budget_is_required_and_search_options_need_the_search():
    with pytest.raises(ConfigError, match="needs a budget"):
        run_search(_Table(lambda c: 0, lambda c: 1), CompressConfig(method="auto"), ValidateConfig(),
                   lambda *a: None)
    with pytest.raises(ConfigError, match="time-budget-min"):
        CompressConfig(method="sparse", time_budget_min=5)


XYCHART = [
    r"xychart-beta",
    r'    title "[^"]*"',
    r'    x-axis "[^"]*" \[("[^"]*")(, "[^"]*")*\]',
    r'    y-axis "[^"]*" -?[0-9.e+-]+ --> -?[0-9.e+-]+',
    r"    bar \[-?[0-9.e+-]+(, -?[0-9.e+-]+)*\]",
    r"    line \[-?[0-9.e+-]+(, -?[0-9.e+-]+)*\]",
]


def test_the_mermaid_block_is_xychart_syntax_and_marks_the_chosen_point():
    rows = [{"label": 'int8 "q"', "cost_ratio": 0.47, "accuracy_drop_pt": 0.05, "chosen": False},
            {"label": "channels 0.43 + int8", "cost_ratio": 0.43, "accuracy_drop_pt": 0.4, "chosen": True},
            {"label": "skipped", "cost_ratio": None, "accuracy_drop_pt": None, "chosen": False}]
    block = mermaid_frontier(rows, "latency", "accuracy_drop_pt", 0.5).splitlines()
    assert block[0] == "```mermaid" and block[-1] == "```"
    body = block[1:-1]
    assert len(body) == len(XYCHART)
    for line, pattern in zip(body, XYCHART):
        assert re.fullmatch(pattern, line), line
    categories = re.findall(r'"([^"]*)"', body[2].split("[", 1)[1])
    values = body[4].split("[")[1].rstrip("]").split(", ")
    assert len(categories) == len(values) == 2  # one bar per measured candidate, by cost
    assert categories[0].startswith("*channels 0.43") and not categories[1].startswith("*")
    low, high = map(float, body[3].split('" ')[-1].split(" --> "))
    assert low <= 0.05 and high >= 0.5  # the gate line is inside the axis range


def test_cli_search_on_lenet_misses_an_impossible_gate_with_exit_1_and_writes_the_closest(tmp_path):
    data = np.load(ROOT / "calibration" / "mnist_train1000.npz")
    np.savez(tmp_path / "calib.npz", input=data["input"][:300], labels=data["labels"][:300])
    shutil.copy(ROOT / "calibration" / "lenet5_mnist.onnx", tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxadmm", "compress", str(tmp_path / "m.onnx"), str(out),
                           "--calib", str(tmp_path / "calib.npz"), "--calib-samples", "200", "--labels", "labels",
                           "--max-accuracy-drop", "1", "--min-speedup", "50", "--latency-rounds", "3",
                           "--objective", "size", "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out.onnx.report.json").read_text())
    assert report["search"]["held"] is False and out.exists()
    assert "no candidate held the gate" in proc.stdout
    markdown = (tmp_path / "out.onnx.report.md").read_text()
    assert "```mermaid" in markdown
    png = tmp_path / "out.onnx.report.png"  # with the plot extra (matplotlib), the frontier as a PNG beside it
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![the frontier](out.onnx.report.png)" in markdown


def test_frontier_png_is_deterministic_and_optional(monkeypatch):
    from onnxadmm.budget.chart import frontier_png

    rows = [{"label": "int8", "cost_ratio": 0.47, "accuracy_drop_pt": 0.05, "chosen": False, "on_frontier": True},
            {"label": "channels 0.43 + int8", "cost_ratio": 0.43, "accuracy_drop_pt": 0.4, "chosen": True,
             "on_frontier": True},
            {"label": "failed", "cost_ratio": None, "accuracy_drop_pt": None, "chosen": False, "on_frontier": False}]
    search = {"gate": {"accuracy_drop_pt": 0.5}, "candidates": rows, "cost": "latency ratio"}
    first = frontier_png(search)
    assert first[:4] == b"\x89PNG" and frontier_png(search) == first
    assert frontier_png({**search, "candidates": rows[2:]}) is None  # nothing measured: no picture
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # the plot extra not installed
    assert frontier_png(search) is None


@pytest.mark.parametrize("words,method", [
    (["--max-accuracy-drop", "1"], "auto"),
    (["--min-agreement", "0.99", "--objective", "size", "--time-budget-min", "5"], "auto"),
    (["--max-accuracy-drop", "1", "--channel-multiple", "16", "--latency-batch", "8"], "auto"),
    (["--max-accuracy-drop", "1", "--sparsity", "0.8"], "sparse"),
    (["--max-accuracy-drop", "1", "--quantize", "int8"], "none"),
    (["--sparsity", "0.8"], "sparse"),
    (["--refine-epochs", "5"], "sparse"),
    ([], "none"),
    (["--activation-range", "mse"], "none"),
])
def test_a_budget_without_a_method_is_the_search(words, method):
    """A budget without a method searches; a method's own option chooses that method; nothing chooses int8
    alone (the smaller and faster model)."""
    from onnxadmm.cli import _configs, build_parser

    args = build_parser().parse_args(["compress", "m.onnx", "o.onnx", "--calib", "random:4", *words])
    config = _configs(args, with_compress=True)[0]
    assert config.method == method
    assert (config.quantize == "int8") == (method == "none")


@pytest.mark.parametrize("toml,words,method", [
    ('sparsity = 0.7\n', [], "sparse"),
    ('method = "sparse"\n', [], "sparse"),
    ('[refine]\nepochs = 2\n', [], "sparse"),
    ('seed = 3\n', [], "none"),
    ('seed = 3\n[validate]\nmin_agreement = 0.99\n', [], "auto"),
    ('sparsity = 0.7\n', ["--quantize", "int8"], "sparse"),
])
def test_a_config_file_chooses_the_method_as_the_flags_do(tmp_path, toml, words, method):
    """A setting named in --config counts as given: a method or its option there keeps that method."""
    from onnxadmm.cli import _configs, build_parser

    (tmp_path / "c.toml").write_text(toml)
    args = build_parser().parse_args(["compress", "m.onnx", "o.onnx", "--calib", "random:4", "--config",
                                      str(tmp_path / "c.toml"), *words])
    assert _configs(args, with_compress=True)[0].method == method


@pytest.mark.parametrize("miss_drop, refined", [(0.8, True), (3.0, False)])
def test_refinement_is_retried_only_on_a_miss_within_reach_of_the_budget(miss_drop, refined):
    """A miss at 1.6x the 0.5 pt budget gets the refinement retry; one at 6x is reported as not tried."""
    table = _Table(lambda c: 0.1 if c.method == "none" or c.sparsity < 0.75 else miss_drop,
                   lambda c: 0.28 if c.method == "none" else 0.28 * (1 - c.sparsity))
    result = run_search(table, CompressConfig(method="auto", objective="size"), ValidateConfig(max_accuracy_drop=0.5),
                        lambda *a: None)
    assert any(c.refine_epochs for c in table.calls) == refined
    rows = result.report.search["candidates"]
    retry = next(r for r in rows if r["label"].endswith(", refined"))
    assert retry["label"] == "sparse 0.750 + w4, refined"  # the miss itself, retried before any bisection
    assert retry["note"].startswith("not tried: the unrefined run's damage is 6.0x the budget") != refined
    assert rows.index(retry) < [r["label"] for r in rows].index("sparse 0.625 + w4")
    assert result.report.search["chosen"] == "sparse 0.625 + w4"  # the bisection's hold, refined or not


def test_a_refinement_retry_and_its_miss_share_one_latency_figure():
    """The retry's graph is its miss's with other weight values: the two latency measurements (0.42, 0.48) are one
    quantity, each candidate gets their geometric mean, and the retry is chosen against int8 alone (0.47) on it."""
    measured = {0: 0.42, 1: 0.48}
    table = _Table(lambda c: 0.1 if c.method == "none" else (0.3 if c.refine_epochs else 0.8),
                   lambda c: 0.47 if c.method == "none" else measured[int(bool(c.refine_epochs))],
                   structure_of=lambda c: repr(dataclasses.replace(c, refine_epochs=0)))
    result = run_search(table, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5), lambda *a: None)
    rows = {r["label"]: r for r in result.report.search["candidates"]}
    miss, retry = rows["channels 0.920 of int8 + int8"], rows["channels 0.920 of int8 + int8, refined"]
    assert miss["cost_measured"] == 0.42 and retry["cost_measured"] == 0.48
    assert miss["cost_ratio"] == retry["cost_ratio"] == pytest.approx((0.42 * 0.48) ** 0.5)
    assert "cost_measured" not in rows["int8"]
    assert result.report.search["chosen"] == "channels 0.920 of int8 + int8, refined"
    assert list(rows) == ["int8", "channels 0.920 of int8 + int8", "channels 0.920 of int8 + int8, refined"]  # no bisection


def test_a_refined_hold_at_the_miss_ends_the_search_without_a_bisection():
    table = _Table(lambda c: 0.1 if c.method == "none" or c.sparsity < 0.75 else (0.3 if c.refine_epochs else 0.8),
                   lambda c: 0.28 if c.method == "none" else 0.28 * (1 - c.sparsity))
    result = run_search(table, CompressConfig(method="auto", objective="size"), ValidateConfig(max_accuracy_drop=0.5),
                        lambda *a: None)
    labels = [r["label"] for r in result.report.search["candidates"]]
    assert result.report.search["chosen"] == "sparse 0.750 + w4, refined"
    assert not any(label.startswith("sparse 0.625") for label in labels), labels


def test_a_refined_retry_starts_from_the_missed_candidates_solve_and_computes_what_a_fresh_run_does(monkeypatch):
    """Candidates that differ only in block refinement share the plan and the layer-wise solve, and the
    original's evaluation run is measured once; the retry's model is the one a compress of its settings on its
    own writes, and the search counts the reused seconds."""
    from models import samples_for, tiny_cnn
    from onnxadmm import compress
    from onnxadmm.methods.elements import ElementSparsity
    from onnxadmm.solve.reuse import StageReuse
    from onnxadmm.validation import run as validation_run

    solves, references = [], []
    solve, measure = ElementSparsity.solve, validation_run.measure_reference
    monkeypatch.setattr(ElementSparsity, "solve", lambda self, ctx, plan: solves.append(1) or solve(self, ctx, plan))
    monkeypatch.setattr(validation_run, "measure_reference", lambda *a, **k: references.append(1) or measure(*a, **k))
    model = tiny_cnn()
    feed = samples_for(model, 40)
    fast = dict(sensitivity_samples=8, admm_iterations=6, sample_patches=1024, seed=0, uniform=True)
    check = ValidateConfig(latency_rounds=1)
    reuse = StageReuse()
    first = compress(model, feed, CompressConfig(sparsity=0.6, **fast), check, reuse=reuse)
    refined = compress(model, feed, CompressConfig(sparsity=0.6, refine_epochs=2, **fast), check, reuse=reuse)
    assert len(solves) == 1 and len(references) == 1 and reuse.saved_s > 0
    original, timing_rows = reuse.timing_inputs()  # what the search times its finalists against, on what
    assert original.source is model and timing_rows.num_samples == max(check.latency_batch_sizes) < 40
    assert any("earlier candidate" in note for note in refined.report.notes)
    assert refined.report.refined_blocks and not first.report.refined_blocks
    other = compress(model, feed, CompressConfig(sparsity=0.7, **fast), check, reuse=reuse)
    assert len(solves) == 2 and len(references) == 1  # another sparsity: solved anew, the same original's run
    alone = compress(model, feed, CompressConfig(sparsity=0.6, refine_epochs=2, **fast), check)
    assert len(solves) == 3
    weights = [{t.name: onnx.numpy_helper.to_array(t) for t in r.model.graph.initializer} for r in (refined, alone)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not np.array_equal(*(onnx.numpy_helper.to_array(t) for t in (first.model.graph.initializer[0],
                                                                        other.model.graph.initializer[0])))


def test_the_reused_solve_is_a_copy_later_stages_cannot_change():
    from onnxadmm.solve.reuse import StageReuse

    reuse, runs = StageReuse(), []

    @dataclasses.dataclass
    class Result:
        refined: list

    @dataclasses.dataclass
    class Solved:
        model: onnx.ModelProto
        result: Result

    def solve():
        runs.append(1)
        return "plan", Solved(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), Result([]))

    _, first, note = reuse.plan_and_solve(CompressConfig(sparsity=0.5), solve)
    first.model.graph.name, first.result.refined = "changed by a later stage", ["a block"]
    _, again, note = reuse.plan_and_solve(CompressConfig(sparsity=0.5, refine_epochs=3), solve)
    assert len(runs) == 1 and note and again.model.graph.name == "g" and again.result.refined == []
    for sparsity in (0.6, 0.7):
        reuse.plan_and_solve(CompressConfig(sparsity=sparsity), solve)
    reuse.plan_and_solve(CompressConfig(sparsity=0.5), solve)  # pushed out by the solves after it (SOLVES_KEPT = 1)
    assert len(runs) == 4


class _TimedTable(_Table):
    """``_Table`` whose candidates measure the original on evaluation samples (so the search can time its
    finalists), with the side-by-side timing replaced by ``side_by_side`` (graph name -> ratio)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timed = []

    def __call__(self, config: CompressConfig, reuse=None):
        samples = SimpleNamespace(feed=lambda batch, seq_len=None: {"x": np.zeros((batch, 2), np.float32)},
                                  num_samples=100)
        samples.subset = lambda rows: samples
        reuse.reference(config, lambda: SimpleNamespace(source="the original"), samples)
        return super().__call__(config, reuse)

    def timer(self, side_by_side):
        def measure(original, models, feed, rounds, threads):
            self.timed.append((original, [m.graph.name for m in models], feed["x"].shape[0], rounds))
            return [SimpleNamespace(ratio_median=side_by_side[m.graph.name], ratio_interval=(0.4, 0.5), threads=2)
                    for m in models]
        return measure


def test_the_held_candidates_close_to_the_cheapest_are_timed_again_side_by_side_and_chosen_on_that(monkeypatch):
    """Own runs: int8 alone 0.50, channels at 0.46 (0.44 measured) hold, 0.423 misses. Timed together, int8 alone
    is the faster one (0.45 against 0.47): the choice follows the side-by-side figures."""
    import onnxadmm.budget.run as search_module
    from onnxadmm.report.markdown import _search

    def name(c):
        return "int8" if c.method == "none" else f"channels {c.target_latency}{'r' if c.refine_epochs else ''}"

    table = _TimedTable(lambda c: 0.1 if c.method == "none" else (0.2 if c.target_latency > 0.44 else 3.0),
                        lambda c: 0.50 if c.method == "none" else c.target_latency - 0.02, model_of=name)
    monkeypatch.setattr(search_module, "measure_side_by_side", table.timer({"int8": 0.45, "channels 0.46": 0.47}))
    result = run_search(table, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5, latency_rounds=12),
                        lambda *a: None)
    search = result.report.search
    assert table.timed == [("the original", ["channels 0.46", "int8"], 1, 12)]  # cheapest first, one run
    assert search["chosen"] == "int8" and result.passed
    rows = {r["label"]: r for r in search["candidates"]}
    assert rows["int8"]["cost_ratio"] == 0.45 and rows["int8"]["cost_own_run"] == 0.50
    assert rows["channels 0.920 of int8 + int8"]["cost_ratio"] == 0.47
    assert rows["channels 0.920 of int8 + int8"]["cost_own_run"] == pytest.approx(0.44)
    assert [c["label"] for c in search["side_by_side"]["candidates"]] == ["channels 0.920 of int8 + int8", "int8"]
    lines = []
    _search(lines, search)
    text = "\n".join(lines)
    assert "timed again side by side (batch 1, 12 rounds" in text and "own run 0.500" in text


def test_the_three_cheapest_and_int8_alone_are_the_finalists_and_a_lone_hold_is_not_timed_again(monkeypatch):
    import onnxadmm.budget.run as search_module

    def name(c):
        return "int8" if c.method == "none" else f"channels {c.target_latency}"

    table = _TimedTable(lambda c: 0.1, lambda c: 0.50 if c.method == "none" else c.target_latency - 0.02,
                        model_of=name)
    monkeypatch.setattr(search_module, "measure_side_by_side", table.timer(
        {"channels 0.38": 0.47, "channels 0.42": 0.41, "channels 0.46": 0.45, "int8": 0.48}))
    result = run_search(table, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5), lambda *a: None)
    # every level held (own runs 0.36, 0.40, 0.44; int8 alone 0.50): the three cheapest and the baseline
    assert table.timed[0][1] == ["channels 0.38", "channels 0.42", "channels 0.46", "int8"]
    assert result.report.search["chosen"] == "channels 0.840 of int8 + int8"  # 0.41 side by side; 0.38's 0.36 was noise

    lone = _TimedTable(lambda c: 0.1 if c.method == "channel" and c.target_latency > 0.9 else 3.0,
                       lambda c: 0.50 if c.method == "none" else c.target_latency)
    monkeypatch.setattr(search_module, "measure_side_by_side", lone.timer({}))
    result = run_search(lone, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5), lambda *a: None)
    assert result.report.search["chosen"] == "channels 0.920 (fp32)"  # int8 alone missed: nothing to compare with
    assert lone.timed == [] and result.report.search["side_by_side"] is None


def test_finalists_too_large_to_time_together_are_reported_as_not_timed_again(monkeypatch):
    import onnxadmm.budget.run as search_module
    from onnxadmm.report.markdown import _search

    table = _TimedTable(lambda c: 0.1 if c.method == "none" or c.target_latency > 0.45 else 3.0,
                        lambda c: 0.50 if c.method == "none" else c.target_latency)
    table.original_bytes = 800 << 20  # int8 alone and channels 0.46 + int8 hold: 800 + 2 x 200 MB
    monkeypatch.setattr(search_module, "measure_side_by_side", table.timer({}))
    result = run_search(table, CompressConfig(method="auto"), ValidateConfig(max_accuracy_drop=0.5), lambda *a: None)
    search = result.report.search
    assert table.timed == [] and search["side_by_side"]["skipped"].startswith("not timed again side by side")
    assert search["chosen"] == "channels 0.920 of int8 + int8"  # on the costs of their own runs
    lines = []
    _search(lines, search)
    assert any(line.startswith("Not timed again side by side: the original and the 2 finalists hold") for line in lines)
