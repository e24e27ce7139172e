"""Validate a compressed model against its original in onnxruntime: outputs, size, compute, latency,
gates — and a plain statement of which gain is file size and which is speed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..calib.readers import SampleSet, run_all
from ..config import ValidateConfig
from ..cost.footprint import Footprint, StoredSize, footprint
from ..cost.timing import LatencyAB, measure
from ..errors import BadInputError
from ..onnxio.graph import is_quantized, quantized_form
from ..onnxio.runtime import session
from .compare import Comparison, compare
from .gates import GateResult, evaluate
from .profile import explain, time_split

# A speed-up inside this band is reported as "no measurable change" (as is one the rounds' sign test does not
# establish: ``LatencyAB.differs``).
NOISE_BAND = 0.05
# Two models of this many bytes together are timed one after the other, not with both sessions held at once.
INTERLEAVE_BELOW_BYTES = 1 << 30


@dataclass
class Reference:
    """The original as validation compares against it, measured once: its outputs on the evaluation samples and
    its footprint. ``source`` is what onnxruntime times: the model, or the file it was read from when its weights
    are no longer held (``model()`` then reads the file again and checks it has not changed)."""

    outputs: dict[str, np.ndarray]
    footprint: Footprint
    quantized: bool
    source: onnx.ModelProto | Path
    sha256: str | None = None

    def model(self) -> onnx.ModelProto:
        if isinstance(self.source, onnx.ModelProto):
            return self.source
        from ..onnxio.load import load_model

        loaded = load_model(self.source)
        if self.sha256 and loaded.sha256 != self.sha256:
            raise BadInputError(f"{self.source} changed on disk while onnxadmm was running; run it again on a file "
                                "that stays as it is")
        return loaded.model


def measure_reference(model: onnx.ModelProto, samples: SampleSet, batch_size: int = 32, threads: int = 0,
                      stored: StoredSize | None = None, source: onnx.ModelProto | Path | None = None,
                      sha256: str | None = None) -> Reference:
    """Run ``model`` on ``samples`` and measure its footprint. ``stored``: its sizes, measured before (of the file
    ``model`` was normalized from, which computes the same); ``source``: what to time instead of ``model``."""
    outputs = run_all(session(model, threads), samples, batch_size)
    measured = footprint(model, samples.feed(samples.fixed_batch or 1), threads, stored=stored)
    return Reference(outputs, measured, is_quantized(model), model if source is None else source, sha256)


@dataclass
class Validation:
    comparison: Comparison
    original: Footprint
    compressed: Footprint
    latency: list[LatencyAB]
    gates: list[GateResult]
    held_out: bool
    data_source: str
    gains: list[str] = field(default_factory=list)
    time_split: dict | None = None  # per-node kernel times, original vs compressed (when MACs fell)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def as_dict(self) -> dict:
        return {"data": self.data_source, "held_out": self.held_out, **self.comparison.as_dict(),
                "footprint": {"original": self.original.as_dict(), "compressed": self.compressed.as_dict()},
                "latency": [l.as_dict() for l in self.latency],
                "gates": [g.as_dict() for g in self.gates], "passed": self.passed, "gains": self.gains,
                "time_split": self.time_split}


def validate_models(original: onnx.ModelProto | Reference, compressed: onnx.ModelProto, samples: SampleSet,
                    config: ValidateConfig, batch_size: int = 32, threads: int = 0, held_out: bool = True,
                    sequence_length: int | None = None) -> Validation:
    reference = original if isinstance(original, Reference) else \
        measure_reference(original, samples, batch_size, threads)
    outputs_b = run_all(session(compressed, threads), samples, batch_size)  # one session at a time
    comparison = compare(reference.outputs, outputs_b, samples.labels, samples.num_samples)
    one = samples.feed(samples.fixed_batch or 1)
    fp_a, fp_b = reference.footprint, footprint(compressed, one, threads)
    interleaved = fp_a.size_bytes + fp_b.size_bytes < INTERLEAVE_BELOW_BYTES
    latencies = []
    for size in config.latency_batch_sizes:
        if samples.fixed_batch and size != samples.fixed_batch:
            continue
        latencies.append(measure(reference.source, compressed, samples.feed(size, sequence_length),
                                 config.latency_rounds, config.latency_threads or threads, interleaved=interleaved))
        latencies[-1].sequence_length = sequence_length
    gates = evaluate(config, comparison, latencies)
    validation = Validation(comparison, fp_a, fp_b, latencies, gates, held_out, samples.source)
    validation.gains = gains_statement(fp_a, fp_b, latencies,
                                       None if reference.quantized else quantized_form(compressed))
    if fp_b.macs < fp_a.macs and latencies:  # structure removed: say where the time went, node by node
        split = time_split(reference.model(), compressed, one, config.latency_threads or threads)
        if split is not None:
            validation.time_split = split.as_dict()
            validation.gains.extend(explain(validation.time_split, fp_b.macs / max(fp_a.macs, 1)))
    return validation


def accuracy_gates(outputs_original: dict[str, np.ndarray], compressed: onnx.ModelProto, samples: SampleSet,
                   config: ValidateConfig, batch_size: int, threads: int) -> tuple[bool, Comparison]:
    """Only the accuracy / agreement gates (no latency): the cheap check between give-back attempts."""
    outputs = run_all(session(compressed, threads), samples, batch_size)
    comparison = compare(outputs_original, outputs, samples.labels, samples.num_samples)
    accuracy_only = dataclasses.replace(config, min_speedup=None)
    return all(g.passed for g in evaluate(accuracy_only, comparison, [])), comparison


def gate_checker(reference: Reference, samples: SampleSet, config: ValidateConfig, compress_config
                 ) -> Callable[[onnx.ModelProto], tuple[bool, Comparison]] | None:
    """``model -> (accuracy gates passed, comparison)`` against the original's outputs on ``samples``
    (``reference``, measured on them), or None when ``config`` sets no accuracy or agreement gate."""
    if config.max_accuracy_drop is None and config.min_agreement is None:
        return None
    batch, threads = compress_config.batch_size, compress_config.threads
    return lambda model: accuracy_gates(reference.outputs, model, samples, config, batch, threads)


def gains_statement(a: Footprint, b: Footprint, latencies: list[LatencyAB], precision: str | None = None
                    ) -> list[str]:
    """Say which gain is size and which is speed, from the measured figures (``precision``: what the compressed
    model gained over a float original, "int8" or "w4")."""
    lines = []
    quantized = precision is not None
    if precision == "int8":
        lines.append("int8: weights stored as 8-bit integers and activations quantized to 8 bits; onnxruntime "
                     "runs the fused layers in integer kernels (speed), and the file shrinks about 4x (size).")
    elif precision == "w4":
        lines.append("w4: weights stored as 4-bit integers (two per byte), activations float: the gain is file "
                     "size. A default onnxruntime session dequantizes the weights on every call (slower than "
                     "float); with the session option session.disable_quant_qdq = 1 it folds them into float "
                     "weights once, at load, and runs at float speed.")
    if a.nonzero_layer_weights and (not quantized or b.nonzero_layer_weights < 0.9 * a.nonzero_layer_weights):
        lines.append(f"Nonzero layer weights: {a.nonzero_layer_weights:,} -> {b.nonzero_layer_weights:,} "
                     f"({a.nonzero_layer_weights / max(b.nonzero_layer_weights, 1):.2f}x fewer).")
    lines.append(f"File size: {a.size_bytes:,} -> {b.size_bytes:,} bytes raw; {a.zipped_bytes:,} -> "
                 f"{b.zipped_bytes:,} bytes zip-compressed ({a.zipped_bytes / max(b.zipped_bytes, 1):.2f}x).")
    lines.append(f"Dense MACs per sample (what onnxruntime executes): {a.macs:,} -> {b.macs:,} "
                 f"({b.macs / max(a.macs, 1):.3f}x).")
    if b.macs >= a.macs and b.nonzero_macs < a.nonzero_macs and not quantized:
        lines.append("Zeros inside dense weights give no speed-up in onnxruntime on CPU (it runs dense "
                     "kernels): this compression buys file size (after zip), not latency.")
    if b.macs > a.macs:
        lines.append("The compressed graph executes more dense MACs than the original (a dense-stored sparse "
                     "branch runs beside a factor pair): it is smaller after zip, and slower.")
    if b.macs < a.macs:
        macs_ratio = b.macs / max(a.macs, 1)
        lines.append(f"The graph is physically smaller (channels or factors removed): onnxruntime executes "
                     f"{macs_ratio:.3f}x the MACs, so latency can fall with them; the measured ratio is below.")
        for lat in latencies:
            gap = lat.ratio_median / macs_ratio - 1.0
            if gap > 0.15:
                lines.append(f"At batch {lat.batch_size} the latency ratio {lat.ratio_median:.3f} is "
                             f"{100 * gap:+.0f} % off the MACs ratio: fixed costs (layers left whole, memory-"
                             "bound ops, per-call overhead at small sizes) do not shrink with MACs.")
            elif gap < -0.15:
                why = ("the integer kernels run each remaining MAC faster than the original's float kernels"
                       if precision == "int8" else "the remaining layers run faster per MAC than the original's")
                lines.append(f"At batch {lat.batch_size} the latency ratio {lat.ratio_median:.3f} is "
                             f"{100 * gap:+.0f} % off the MACs ratio: {why}.")
    for lat in latencies:
        verdict = ("faster" if lat.speedup > 1 else "slower") if lat.differs(NOISE_BAND) else "no measurable change"
        tokens = f", sequence {lat.sequence_length}" if lat.sequence_length else ""
        order = "" if lat.interleaved else (" (timed one model after the other: the two are too large to hold two "
                                            "sessions at once, so a change in the machine's load is not cancelled)")
        lines.append(f"Latency at batch {lat.batch_size}{tokens}, {lat.threads} threads: speed-up "
                     f"{lat.speedup:.3f}x ({_speedup_interval(lat)}band {1 / lat.ratio_p90:.3f}-"
                     f"{1 / lat.ratio_p10:.3f}x{_rounds(lat)}) — "
                     f"{verdict}{order}.")
    return lines


def _speedup_interval(lat: LatencyAB) -> str:
    """'95 % interval a-bx; ' where the rounds' interval of the median is recorded."""
    interval = lat.speedup_interval
    return "" if interval is None else f"95 % interval {interval[0]:.3f}-{interval[1]:.3f}x; "


def _rounds(lat: LatencyAB) -> str:
    """The rounds B was faster in, as '; faster in 21 of 30 rounds' (empty where they are not recorded)."""
    return "" if lat.rounds_faster is None else f"; faster in {lat.rounds_faster} of {lat.rounds} rounds"
