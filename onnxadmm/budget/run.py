"""The budget-driven search (``onnxadmm compress IN OUT --calib C --max-accuracy-drop PT`` with no
``--method``): the fastest (``--objective latency``) or smallest (``size``) model the methods reach while every
gate holds on the evaluation data.

Candidates, cheapest first, each a full ``compress`` measured in onnxruntime like any other run:
1. latency: int8 alone (``--method none --quantize int8``).
   size: the first sparsity with int4 weights (``--quantize w4``); when it holds, neither precision alone can be
   the smaller model and neither is run. Otherwise int4 weights alone, and int8 alone only when w4 misses the
   gate (it stores the same weights in twice the bits).
2. latency: channel pruning + int8 at ``--target-latency-of int8 --target-latency`` f for f in ``LATENCY_STEPS``:
   a fraction of the int8 original's latency as the planner times it, in the same A/B as every plan. (Anchored on
   int8 alone's own validation run, a noisy ratio, the whole ladder could lie above what the planner measures for
   int8, and then no level plans anything.)
   fp32 channel pruning at f of the original when int8 is not faster or fails the gate.
   size: element sparsity at ``SPARSITIES`` with the smallest precision that holds the gate (w4, else int8, else
   fp32). Each ladder is climbed while the gate holds: damage grows with the step, so the first miss ends it.
3. The miss is tried again with block refinement (``--refine-epochs``, default ``REFINE_EPOCHS``), starting from
   its own solve, when its damage is at most ``REFINE_REACH`` times the budget (top-1 drop, or 1 − agreement; a
   farther miss is reported as not tried — the measurements behind the reach: ``docs/METHODS.md``). A refined
   hold ends the search: it costs less than any level between the last hold and the miss. Otherwise one bisection
   step tries the level between the last hold (the precision alone counting as the ladder's start) and the miss,
   itself retried with refinement when it misses within reach. A level that could not be built (a latency target the
   planner refuses as reachable only by destroying a layer group) is a miss with nothing to refine: the bisection
   step follows it directly.
Under ``--objective latency``, candidates whose graphs differ only in their weights' values share one latency
figure, the geometric mean of their measurements (``_Search._pool``). A candidate that would not finish within
``--time-budget-min`` is skipped and reported as such: its time is estimated as the longest run of its method so far,
or, for the first candidate of a method that solves (channels, sparsity), ``NEW_METHOD_FACTOR`` times the slowest
run so far (it runs its own solve and then the precision stage that a precision-alone candidate ran).
``--channel-multiple`` and ``--latency-batch`` go to the channel candidates; the latency batch is also the one
every candidate's cost is measured at.
4. latency: the ``FINALISTS`` cheapest candidates that held the gate (one per graph structure), and int8 alone
   when it held, are timed again side by side, in the same rounds against the original
   (``cost/timing.py: measure_side_by_side``), and the choice is made on those ratios: each candidate's own run
   was timed minutes apart from the others', and on a shared machine the same graph's ratio moves by more than
   the candidates differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from typing import Callable

from ..config import CompressConfig, ValidateConfig, default_of
from ..cost.timing import measure_side_by_side
from ..errors import ConfigError, OnnxAdmmError
from ..onnxio.weights import any_mapped
from ..solve.reuse import StageReuse
from ..validation.run import INTERLEAVE_BELOW_BYTES
from .chart import mermaid_frontier
from .frontier import Candidate, Measured, choose, closest, frontier, mark

LATENCY_STEPS = (0.92, 0.84, 0.76)
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
REFINE_EPOCHS = 10
REFINE_REACH = 2.0
# a solving method's first candidate over the slowest run before it: channels + int8 over int8 alone measured 1.6-1.7
# (ResNet-56), 1.9 (EfficientNet-Lite0, Intel) and 2.8 (the same, AMD Zen 4)
NEW_METHOD_FACTOR = 3.0
FINALISTS = 3  # the cheapest held candidates timed again side by side (with int8 alone when it held)
FINALISTS_BELOW_BYTES = 1 << 28  # finalists' models are held for the side-by-side timing only below this size each


def run_search(attempt: Callable[[CompressConfig, StageReuse], object], config: CompressConfig,
               validate_config: ValidateConfig, progress: Callable[[str, int, int, str], None]):
    """``attempt(config, reuse) -> CompressResult`` runs one candidate (``reuse``: what the candidates share,
    ``solve/reuse.py``). Returns the chosen candidate's result with the report's ``search`` section (or, when no
    candidate holds the gate, the closest one with ``passed`` False)."""
    if validate_config.max_accuracy_drop is None and validate_config.min_agreement is None:
        raise ConfigError("the search needs a budget: --max-accuracy-drop PT (with --labels) or --min-agreement F "
                          "(or choose a --method)")
    search = _Search(attempt, config, progress)
    int8_alone = Candidate("int8", {"method": "none", "quantize": "int8"})

    def make(level: float, quantize: str, refine: int = 0) -> Candidate:
        if config.objective == "latency":  # with int8, the level is a fraction of the int8 original's latency
            of_int8 = quantize == "int8"
            label = f"channels {level:.3f}" + (" of int8" if of_int8 else "")
            settings = {"method": "channel", "target_latency": round(level, 3),
                        "channel_multiple": config.channel_multiple, "latency_batch": config.latency_batch,
                        **({"target_latency_of": "int8"} if of_int8 else {})}
        else:
            label, settings = f"sparse {level:.3f}", {"method": "sparse", "sparsity": round(level, 3)}
        settings = {**settings, "quantize": quantize, **({"refine_epochs": refine} if refine else {})}
        suffix = f" + {quantize}" if quantize != "none" else " (fp32)"
        return Candidate(label + suffix + (", refined" if refine else ""), settings, "refine" if refine else "solve")

    missed = miss = None  # the least aggressive level that missed the gate, and its measurement
    if config.objective == "size":
        quantize, held, ladder, missed, miss = _size_start(search, make, int8_alone)
    else:
        int8 = search.run(int8_alone)
        alone_holds = int8 is not None and int8.passed
        quantize = "int8" if alone_holds and int8.cost < 1.0 else "none"
        # levels are fractions of the int8 original's latency as the planner times it (of the original's without
        # int8); int8 alone is level 1.0, so the bisection may fall between it and the first step
        held, ladder = (1.0 if alone_holds else None), list(LATENCY_STEPS)
    for level in ladder:
        outcome = search.run(make(level, quantize))
        if outcome is None or not outcome.passed:  # None: skipped for the time budget, which ends the search
            if outcome is not None:  # missed the gate, or could not be built (a target the planner refuses)
                missed, miss = level, (outcome if outcome.cost is not None else None)
            break
        held = level
    if missed is None:
        return search.result(validate_config)
    epochs = config.refine_epochs or REFINE_EPOCHS
    retry = _refine(search, make(missed, quantize, epochs), miss, validate_config) if miss is not None else None
    if (retry is None or not retry.passed) and held is not None:  # one bisection step between the hold and the miss
        middle = (held + missed) / 2
        outcome = search.run(make(middle, quantize))
        if outcome is not None and not outcome.passed and outcome.cost is not None:
            _refine(search, make(middle, quantize, epochs), outcome, validate_config)
    return search.result(validate_config)


def _refine(search: "_Search", refined: Candidate, miss: Measured, validate_config: ValidateConfig
            ) -> Measured | None:
    """The refinement retry of a miss (it starts from the miss's solve, ``solve/reuse.py``), when the miss's damage
    is within ``REFINE_REACH`` budgets; else ``refined`` is reported as not tried. None when not run."""
    excess = _excess(miss, validate_config)
    if excess <= REFINE_REACH * (1 + 1e-6):  # a drop of exactly twice the budget, give or take float rounding
        return search.run(refined)
    search.skip(refined, f"not tried: the unrefined run's damage is {excess:.1f}x the budget, beyond what "
                         f"refinement recovered in any measurement ({REFINE_REACH:g}x at most)")
    return None


def _size_start(search: "_Search", make, int8_alone: Candidate):
    """The size search's precision and start: (quantize, the level that held — 0.0 for the precision alone —,
    the sparsities left to climb, the level that missed and its measurement). Sparsity with int4 weights at the
    first level is tried first: when it holds, it is smaller than either precision alone, which are reported
    as not tried."""
    first = search.run(make(SPARSITIES[0], "w4"))
    w4_alone = Candidate("w4", {"method": "none", "quantize": "w4"})
    if first is not None and first.passed:
        reason = f"not tried: {first.candidate.label} holds the gate, and this stores more"
        search.skip(w4_alone, reason)
        search.skip(int8_alone, reason)
        return "w4", SPARSITIES[0], list(SPARSITIES[1:]), None, None
    missed, miss = (SPARSITIES[0], first) if first is not None and first.cost is not None else (None, None)
    w4 = search.run(w4_alone)
    if w4 is not None and w4.passed:  # the same weights in half the bits: int8 alone cannot be smaller
        search.skip(int8_alone, "not tried: int4 weights alone hold the gate, and int8 stores the same weights "
                                "in twice the bits")
        return "w4", 0.0, [], missed, miss
    int8 = search.run(int8_alone)
    holds = int8 is not None and int8.passed
    return ("int8" if holds else "none"), (0.0 if holds else None), list(SPARSITIES), None, None


def _excess(miss: Measured, validate_config: ValidateConfig) -> float:
    """How many budgets a miss spent: top-1 drop / the drop allowed, or (1 − agreement) / (1 − the agreement
    required); the larger where both gates are set."""
    ratios = [0.0]
    if validate_config.max_accuracy_drop is not None and miss.accuracy_drop_pt is not None:
        ratios.append(miss.accuracy_drop_pt / max(validate_config.max_accuracy_drop, 1e-9))
    if validate_config.min_agreement is not None and miss.agreement is not None:
        ratios.append((1.0 - miss.agreement) / max(1.0 - validate_config.min_agreement, 1e-9))
    return max(ratios)


def _noise_statement(rows: list[dict]) -> str:
    """How many measured candidates had the gate's limit inside their figure's 95 % interval; empty if none."""
    measured = [r for r in rows if r.get("samples")]
    noisy = [r for r in measured if r.get("within_noise")]
    if not noisy:
        return ""
    return (f"{len(noisy)} of {len(measured)} candidates measured within the evaluation's noise: the gate's limit "
            f"lies inside the 95 % interval of their figure over the {measured[0]['samples']} held-out samples "
            "(more held-out samples would make the choice firmer)")


def _model_bytes(report) -> int:
    """The compressed model's bytes as its validation measured them (0 when it does not say)."""
    return getattr(getattr(report.validation, "compressed", None), "size_bytes", 0) or 0


def _graph_digest(model) -> str | None:
    """sha256 of the graph (nodes and weights, not the model's metadata, which names each candidate's
    settings); None for a graph over protobuf's 2 GB limit or whose weights are in files."""
    if any_mapped(model):
        return None
    try:
        return hashlib.sha256(model.graph.SerializeToString()).hexdigest()
    except ValueError:
        return None


def _structure_digest(model) -> str:
    """sha256 of the graph without its weights' values: the nodes, and each initializer's name, type and shape."""
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(node.SerializeToString())
    for tensor in model.graph.initializer:
        digest.update(f"{tensor.name}|{tensor.data_type}|{tuple(tensor.dims)}".encode())
    for value in (*model.graph.input, *model.graph.output):
        digest.update(value.SerializeToString())
    return digest.hexdigest()


class _Search:
    def __init__(self, attempt, config: CompressConfig, progress):
        self.attempt, self.progress = attempt, progress
        # each candidate is an ordinary compress: options of the search itself go back to their defaults
        self.base = dataclasses.replace(config, method="sparse", objective=None, time_budget_min=None,
                                        refine_epochs=0, channel_multiple=default_of("channel_multiple"),
                                        latency_batch=None, latency_seq_len=config.latency_seq_len)
        self.objective, self.batch = config.objective, config.latency_batch
        self.budget_s = config.time_budget_min * 60 if config.time_budget_min else math.inf
        self.started = time.perf_counter()
        self.measured: list[Measured] = []
        self.results: dict[int, object] = {}  # id(Measured) -> CompressResult, for the chosen and the closest
        self.models: dict[str, Measured] = {}  # sha256 of each distinct output model -> its measurement
        self.reuse = StageReuse()
        self.structures: dict[str, list[Measured]] = {}  # sha256 of a graph without its weights' values
        self.structure_of: dict[int, str] = {}  # id(Measured) -> its structure's sha256
        self.holdable: set[int] = set()  # id(Measured) of the models small enough to hold for the side-by-side timing
        self.side_by_side: dict | None = None  # what the finalists measured, timed together

    def run(self, candidate: Candidate) -> Measured | None:
        elapsed = time.perf_counter() - self.started
        expected = self._expected_seconds(candidate)
        if self.measured and elapsed + expected > self.budget_s:
            self.skip(candidate, f"skipped: {elapsed:.0f} s of the {self.budget_s:.0f} s budget spent, and it "
                                 f"would take about {expected:.0f} s")
            return None
        self.progress("search", len(self.measured), len(self.measured) + 1, candidate.label)
        started, saved_before = time.perf_counter(), self.reuse.saved_s
        try:
            result = self.attempt(dataclasses.replace(self.base, **candidate.settings), self.reuse)
        except OnnxAdmmError as exc:
            # on the first candidate a config error is about the settings themselves (e.g. no labels): stop; a
            # later error is about that candidate (e.g. a latency target it cannot meet): say why and go on
            if isinstance(exc, ConfigError) and not self.measured:
                raise
            self.measured.append(Measured(candidate, None, None, None, False, time.perf_counter() - started,
                                          f"failed: {exc}"))
            return self.measured[-1]
        digest = _graph_digest(result.model)
        same = self.models.get(digest) if digest else None
        if same is not None:  # the method changed nothing here (e.g. a target int8 alone already meets)
            self.measured.append(Measured(candidate, None, same.accuracy_drop_pt, same.agreement, False,
                                          time.perf_counter() - started, f"the same model as {same.candidate.label}"))
            return same
        measured = self._measure(candidate, result.report, time.perf_counter() - started)
        measured.extra["reused_s"] = round(self.reuse.saved_s - saved_before, 2)
        if digest:
            self.models[digest] = measured
        self.measured.append(measured)
        if self.objective == "latency" and measured.cost is not None:
            self.structure_of[id(measured)] = _structure_digest(result.model)
            self._pool(self.structure_of[id(measured)], measured)
            if _model_bytes(result.report) < FINALISTS_BELOW_BYTES:
                self.holdable.add(id(measured))
        self.results[id(measured)] = result
        keep = {id(choose(self.measured)), id(closest(self.measured)), *map(id, self._finalists())}
        self.results = {k: v for k, v in self.results.items() if k in keep}  # hold at most FINALISTS + 3 models
        return measured

    def _expected_seconds(self, candidate: Candidate) -> float:
        """The longest measured run of the candidate's method; a solving method's first candidate,
        NEW_METHOD_FACTOR times the slowest run so far."""
        method = candidate.settings.get("method")
        same = [m.seconds for m in self.measured if m.candidate.settings.get("method") == method]
        slowest = max((m.seconds for m in self.measured), default=0.0)
        if same:
            return max(same)
        return slowest * (NEW_METHOD_FACTOR if method not in (None, "none") else 1.0)

    def _pool(self, structure: str, measured: Measured) -> None:
        """Candidates whose graphs differ only in their weights' values (a refinement retry and its miss) run the
        same kernels: their latency ratio is one quantity measured more than once, so each gets the geometric
        mean of the measurements (``cost_measured`` keeps its own)."""
        twins = self.structures.setdefault(structure, [])
        twins.append(measured)
        if len(twins) > 1:
            raw = [m.extra.setdefault("cost_measured", m.cost) for m in twins]
            pooled = math.exp(sum(math.log(r) for r in raw) / len(raw))
            for m in twins:
                m.cost = pooled
                m.extra["cost_pooled_with"] = [o.candidate.label for o in twins if o is not m]

    def skip(self, candidate: Candidate, reason: str) -> None:
        """Report ``candidate`` as not run, and why."""
        self.measured.append(Measured(candidate, None, None, None, False, 0.0, reason))

    def _measure(self, candidate: Candidate, report, seconds: float) -> Measured:
        """The candidate's cost and accuracy from its ``CompressReport``."""
        validation = report.validation
        if self.objective == "latency":
            batch = self.batch or validation.latency[0].batch_size
            cost = next(r.ratio_median for r in validation.latency if r.batch_size == batch)
        else:
            cost = validation.compressed.zipped_bytes / max(validation.original.zipped_bytes, 1)
        failed = [g.name for g in validation.gates if not g.passed]
        measured = Measured(candidate, cost, validation.comparison.accuracy_drop_pt, validation.comparison.agreement,
                            bool(report.passed), seconds, f"gate missed: {', '.join(failed)}" if failed else "")
        measured.extra["within_noise"] = [g.name for g in validation.gates if g.within_noise]
        measured.extra["samples"] = validation.comparison.samples
        return measured

    def _finalists(self) -> list[Measured]:
        """The FINALISTS cheapest held candidates, one per graph structure (the least damaged), and the precision
        alone if it held (the baseline the others are measured against), cheapest first; under ``--objective
        latency`` only."""
        if self.objective != "latency":
            return []
        passing = sorted((m for m in self.measured if m.passed and m.cost is not None and id(m) in self.holdable),
                         key=lambda m: (m.cost, m.damage))
        finalists, structures = [], set()
        for m in passing:
            structure = self.structure_of.get(id(m))
            alone = m.candidate.settings.get("method") == "none"
            if structure not in structures and (len(finalists) < FINALISTS or alone):
                finalists.append(m)
                structures.add(structure)
        return finalists

    def time_finalists(self, validate_config: ValidateConfig) -> None:
        """The finalists timed again together, each against the original in the same rounds, at the batch their
        costs were measured at; their costs (and their twins', which run the same kernels) become those ratios."""
        finalists = [m for m in self._finalists() if id(m) in self.results]
        timing = self.reuse.timing_inputs()
        if len(finalists) < 2 or timing is None:
            return
        reference, samples = timing
        validation = self.results[id(finalists[0])].report.validation
        held_bytes = validation.original.size_bytes + sum(_model_bytes(self.results[id(m)].report) for m in finalists)
        if held_bytes >= INTERLEAVE_BELOW_BYTES:
            self.side_by_side = {"skipped": f"not timed again side by side: the original and the {len(finalists)} "
                                            f"finalists hold {held_bytes / 2 ** 20:.0f} MB together, more than one "
                                            "process times at once"}
            return
        batch = self.batch or validation.latency[0].batch_size
        rounds, threads = validate_config.latency_rounds, validate_config.latency_threads or self.base.threads
        self.progress("search", len(self.measured), len(self.measured),
                      f"timing the {len(finalists)} finalists side by side")
        feed = samples.feed(batch, self.base.latency_seq_len)
        latencies = measure_side_by_side(reference.source, [self.results[id(m)].model for m in finalists], feed,
                                         rounds, threads)
        timed = []
        for m, latency in zip(finalists, latencies):
            for twin in self.structures.get(self.structure_of.get(id(m)), [m]):
                if twin.passed:
                    twin.extra["cost_own_run"] = twin.cost
                    twin.cost = latency.ratio_median
            timed.append({"label": m.candidate.label, "own_run": m.extra["cost_own_run"],
                          "side_by_side": round(latency.ratio_median, 4),
                          "interval": [round(x, 4) for x in latency.ratio_interval]})
        self.side_by_side = {"batch": batch, "rounds": rounds, "threads": latencies[0].threads, "candidates": timed}

    def result(self, validate_config: ValidateConfig):
        self.time_finalists(validate_config)
        chosen = choose(self.measured)
        best = chosen or closest(self.measured)
        mark(self.measured, chosen)
        if best is None:
            reasons = "; ".join(f"{m.candidate.label}: {m.note}" for m in self.measured)
            raise OnnxAdmmError(f"no candidate of the search could be compressed ({reasons})")
        result = self.results[id(best)]
        gate_kind, gate_value = (("accuracy_drop_pt", validate_config.max_accuracy_drop)
                                 if validate_config.max_accuracy_drop is not None
                                 else ("agreement", validate_config.min_agreement))
        rows = [m.row() for m in self.measured]
        result.report.search = {
            "objective": self.objective, "cost": "latency ratio" if self.objective == "latency" else
            "zipped size ratio", "latency_batch": self.batch, "gate": {gate_kind: gate_value},
            "time_budget_s": None if math.isinf(self.budget_s) else self.budget_s,
            "search_s": time.perf_counter() - self.started, "chosen": best.candidate.label,
            "held": chosen is not None, "candidates": rows,
            "frontier": [m.candidate.label for m in frontier(self.measured)],
            "chart": mermaid_frontier(rows, self.objective, gate_kind, gate_value),
            "within_noise": _noise_statement(rows), "side_by_side": self.side_by_side,
            "reason": "" if chosen else "no candidate held the gate on the evaluation data; the output is the "
                                        f"one closest to it ({best.candidate.label}: {best.note})"}
        result.report.passed = result.passed = chosen is not None and result.report.passed
        return result
