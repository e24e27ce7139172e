"""What the candidates of one search share (``budget/run.py``). They differ in their settings, not in the model
or the data, so:
- the original's run on the evaluation samples is measured once (keyed by the settings that choose those
  samples and run them), and kept with the first of those samples: the search times its finalists against
  the original on them, side by side;
- a candidate that differs from an earlier one only in what acts after the solve (block refinement: the search's
  retry of a missed candidate) starts from that candidate's plan and layer-wise solve instead of repeating them.
  The solve is deterministic for given settings, so the reused solve is the one the candidate would compute
  (a plan priced by measured latencies could differ by the timings' noise: the retry refines its miss's plan).

``saved_s`` sums the measured seconds of the stages reused, so a candidate's cost on its own is its run time plus
what it reused.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import onnx

from ..config import CompressConfig, ValidateConfig, config_hash, default_of

# the settings read only after the solve
AFTER_SOLVE = ("refine_epochs", "refine_grid_epochs", "refine_lr", "refine_block_layers")
SOLVES_KEPT = 1  # a retry follows its miss directly (each kept solve holds a model)


class StageReuse:
    def __init__(self):
        self.saved_s = 0.0
        self._reference: tuple[tuple, Any, float] | None = None
        self.evaluation: Any = None  # the first rows of the samples the last reference was measured on
        self._solves: OrderedDict[str, tuple[Any, Any, float]] = OrderedDict()

    def reference(self, config: CompressConfig, measure: Callable[[], Any], samples: Any = None,
                  validate_config: ValidateConfig | None = None) -> Any:
        """``measure()`` (the original run on the evaluation samples), or its earlier result for the same
        samples (chosen by ``calib_samples`` and ``seed``) run the same way (batch, threads). Of the evaluation
        ``samples``, the rows the largest latency feed of ``validate_config`` takes are kept for the search."""
        key = (config.calib_samples, config.seed, config.batch_size, config.threads, config.latency_seq_len)
        rows = max((validate_config or ValidateConfig()).latency_batch_sizes)
        self.evaluation = None if samples is None else samples.subset(np.arange(min(samples.num_samples, rows)))
        if self._reference is not None and self._reference[0] == key:
            self.saved_s += self._reference[2]
            return self._reference[1]
        started = time.perf_counter()
        reference = measure()
        self._reference = (key, reference, time.perf_counter() - started)
        return reference

    def timing_inputs(self) -> tuple[Any, Any] | None:
        """(the last reference — its ``source`` is what onnxruntime times as the original —, the first rows of
        its evaluation samples), or None before any candidate measured one."""
        if self._reference is None or self.evaluation is None:
            return None
        return self._reference[1], self.evaluation

    def plan_and_solve(self, config: CompressConfig, plan_and_solve: Callable[[], tuple[Any, Any]]
                       ) -> tuple[Any, Any, str | None]:
        """(plan, solved, a note when reused): ``plan_and_solve()``, or a copy of an earlier candidate's whose
        settings differ at most in ``AFTER_SOLVE``."""
        key = config_hash(dataclasses.replace(config, **{name: default_of(name) for name in AFTER_SOLVE}))
        if key in self._solves:
            plan, solved, seconds = self._solves[key]
            self._solves.move_to_end(key)
            self.saved_s += seconds
            return plan, _copy(solved), (f"the plan and the layer-wise solve ({seconds:.0f} s) are an earlier "
                                         "candidate's of this search with the same settings before refinement")
        started = time.perf_counter()
        plan, solved = plan_and_solve()
        self._solves[key] = (plan, _copy(solved), time.perf_counter() - started)
        while len(self._solves) > SOLVES_KEPT:
            self._solves.popitem(last=False)
        return plan, solved, None


def _copy(solved):
    """A ``Solved`` the later stages may change (they replace its model and set its result's fields)."""
    model = onnx.ModelProto()
    model.CopyFrom(solved.model)
    return dataclasses.replace(solved, model=model, result=dataclasses.replace(solved.result))
