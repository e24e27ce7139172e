"""The int8 stage: runs on the float model any method produced (or the input itself), so it composes with
every method — sparse, N:M, channels, grouped, low-rank factors (each factor a layer on its own grid).

1. Weights onto the integer grid, layer by layer in dependency order (``compress_layers`` with the
   ``grid`` structure): per-output-channel symmetric int8 with scales chosen by the layer's output error,
   ADMM with the grid as its Z-step on ‖σ(Ŵ x̂ + b) − σ(W x + b)‖², x̂ the inputs in the model whose earlier
   layers are already on the grid and whose layer inputs are rounded to uint8 as exported (ranges from a
   first pass, ``fakequant.py``), then bias correction. Zeros stay zero (the grid ∩ a sparse support).
2. Activation ranges per tensor from two streamed passes (``ranges.py``), on the model with the solved
   weights.
3. Training with the grid fixed (``finetune/grid.py``) on a float graph that rounds every tensor the export
   quantizes as the export does (``fakequant.with_export_rounding``): with ``--refine-grid-epochs``, block
   refinement against the float model the stage was given (``finetune/refine.py``); with ``--distill-epochs``,
   distillation against the original (``finetune/distill.py``; the rows it is checked on are left out of
   step 1). Each is kept when the exported graph gets closer to the original on the held-out samples.
4. QDQ through onnxruntime's quantizer, handed every range and the weights already as int8 (``qdq.py``), and
   the fusion coverage: which layers onnxruntime then runs as integer kernels (``coverage.py``).
Dynamic activations (transformers: calibrated ranges clip the outliers of LayerNorm outputs and residual
streams): each MatMul input's outlier channels first moved into the weights' rows where that lowers the rounded
output error (``smooth.py``), the MatMuls' weights solved onto the grid from the float inputs, exported in
onnxruntime's dynamic form (activations quantized per tensor at run time), written into the graph directly
(``dynamic.py``). ``auto``, where MatMuls hold most of the weights, first scores both forms with the weights
only rounded (``forms.py``) and solves the better one, or both when the probe cannot tell them apart (then the
smaller solved output error on the held-out calibration samples wins).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx

from ..algorithms.solve import Structure
from ..analysis.layers import apply_exclude, find_layers
from ..calib.ranges import TensorRange, activation_ranges, float_tensors
from ..calib.readers import SampleSet, held_out_rows
from ..config import CompressConfig
from ..export.apply import apply_initializers
from ..export.coverage import WEIGHT_OPS, FusionCoverage, fusion_coverage
from ..export.dynamic import quantize_dynamic_int8
from ..export.qdq import WeightScales, int8_forms, quantize_qdq, weight_axis
from ..export.smoothing import dynamic_layers
from ..export.w4 import W4_BITS, W4_OPSET, int4_weights
from ..finetune.distill import Distillation, distill, held_out_loss
from ..finetune.grid import FixedGrid
from ..finetune.refine import BlockOutcome, refine_blocks
from ..onnxio.graph import GraphView
from ..onnxio.load import default_opset
from ..onnxio.normalize import infer_types, normalize
from ..onnxio.widen import computes_narrow, widen
from ..plan.latency import timing_feed
from ..report.schema import LayerRow
from ..solve.layerwise import compress_layers
from .fakequant import embedding_rounding, with_export_rounding, with_input_rounding
from .fallback import FloatFallback, keep_faster_float
from .forms import FormProbe, held_out_errors, probe_forms
from .smooth import Smoothing, smooth_activations

Progress = Callable[[str, int, int, str], None]


@dataclass
class GridRefinement:
    """Block refinement with the grid fixed: each block's outcome, and the loss D of the exported model to the
    original on the held-out calibration samples before and after (``held_out_loss``)."""

    blocks: list[BlockOutcome]
    loss_before: float | None = None
    loss_after: float | None = None
    kept: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"blocks": [dataclasses.asdict(b) for b in self.blocks], "loss_before": self.loss_before,
                "loss_after": self.loss_after, "kept": self.kept, "seconds": self.seconds}


@dataclass
class QuantizedModel:
    model: onnx.ModelProto
    layers: list[dict]  # report rows of the grid solve (error_projected: rounding; error_final: solved)
    declined: list[dict]  # layers whose weights onnxruntime quantizes with its own max-abs scales
    ranges: dict[str, TensorRange]
    coverage: FusionCoverage
    seconds: dict[str, float] = field(default_factory=dict)
    activations: str = "static"
    held_out_errors: dict[str, float] = field(default_factory=dict)  # per activation mode solved (auto)
    probe: FormProbe | None = None  # auto, where both forms apply: the rounding-only probe (``forms.py``)
    float_model: onnx.ModelProto | None = field(default=None, repr=False)  # the solved weights, every op float
    export: Callable[[Sequence[str]], onnx.ModelProto] | None = field(default=None, repr=False)  # float nodes ->
    fallback: FloatFallback | None = None  # --objective latency: layers kept float where int8 is slower
    notes: list[str] = field(default_factory=list)  # for the report's notes
    weight_bits: int = 8  # 7 with --int8-reduce-range, 4 for w4
    refinement: GridRefinement | None = None  # --refine-grid-epochs: block refinement with the grid fixed
    distilled: Distillation | None = None  # --distill-epochs: distillation with the grid fixed
    stream: tuple[int, int] = (0, 0)  # the grid solve's activation caches: peak bytes held, bytes spilled to disk
    smoothing: Smoothing | None = None  # dynamic form: activation smoothing (``smooth.py``)

    def add_stream_to(self, solved) -> None:
        """Fold this stage's activation-cache figures into the method's ``SequentialResult`` (the report's timing)."""
        solved.peak_cache_bytes = max(solved.peak_cache_bytes, self.stream[0])
        solved.spilled_bytes += self.stream[1]

    def report(self) -> dict:
        estimators: dict[str, int] = {}
        for r in self.ranges.values():
            estimators[r.estimator] = estimators.get(r.estimator, 0) + 1
        form = {"static": "QDQ: uint8 activations (per tensor), int8 weights (per output channel, symmetric), "
                          "int32 biases",
                "dynamic": "dynamic: MatMul/Gemm inputs quantized to uint8 per tensor at run time, int8 weights (per "
                           "output column, symmetric), embedding tables int8 per row; other ops float",
                "float": "w4: int4 weights (per output channel, symmetric, -7..7) read through DequantizeLinear "
                         "(opset 21); activations and arithmetic float"}[self.activations]
        if self.weight_bits == 7:
            form += "; weights on 7 bits (-63..63: no saturation without VNNI)"
        return {"format": form, "precision": "w4" if self.weight_bits == 4 else "int8",
                "activations": self.activations,
                "held_out_output_error": self.held_out_errors or None,
                "form_probe": self.probe.as_dict() if self.probe else None,
                "layers": self.layers, "declined": self.declined,
                "activation_ranges": {name: r.as_dict() for name, r in self.ranges.items()},
                "estimators_chosen": estimators, "fusion": self.coverage.as_dict(), "seconds": self.seconds,
                "float_fallback": self.fallback.as_dict() if self.fallback else None,
                "refinement": self.refinement.as_dict() if self.refinement else None,
                "smoothing": self.smoothing.as_dict() if self.smoothing else None}


def quantize(model: onnx.ModelProto, samples: SampleSet, config: CompressConfig,
             progress: Progress | None = None, teacher: onnx.ModelProto | None = None,
             in_place: bool = False) -> QuantizedModel:
    """The precision stage ``config.quantize`` names (int8 or w4). ``teacher``: the original model, which
    distillation with the grid fixed (``--distill-epochs``) matches; ``model`` when not given. A graph that
    computes in float16 or bfloat16 is widened to float32 first (``onnxio/widen.py``), its inputs and outputs
    keeping their types. ``in_place``: ``model`` (already normalized, as every method's output is, and never
    changed by the stage after that) is normalized in place instead of copied: its weights are held once."""
    narrow = computes_narrow(model)
    if narrow:
        model, teacher = widen(model), (widen(teacher) if teacher is not None else None)
    quantized = (quantize_int8 if config.quantize == "int8" else quantize_w4)(model, samples, config, progress,
                                                                              teacher, in_place)
    if narrow:
        quantized.notes.append("the model computes in 16-bit floats: its float parts now compute in float32 "
                               "(onnxruntime's integer kernels and quantizer take float32, and its CPU kernels "
                               "compute 16-bit floats as float32 anyway); inputs and outputs keep their types")
    return quantized


def quantize_w4(model: onnx.ModelProto, samples: SampleSet, config: CompressConfig,
                progress: Progress | None = None, teacher: onnx.ModelProto | None = None,
                in_place: bool = False) -> QuantizedModel:
    """int4 weights, float activations (``export/w4.py``): every layer's weights onto the 4-bit grid through its
    activation, x̂ the inputs of the model whose earlier layers are already on their grid (zeros kept), then
    stored as int4 with their scales."""
    progress = progress or (lambda *args: None)
    started = time.perf_counter()
    normalized = normalize(model, in_place=in_place)
    view = normalized.view()
    found = apply_exclude(find_layers(view), config.exclude)
    structures = {layer.name: Structure("grid", bits=W4_BITS, keep_zeros=True) for layer in found.layers}
    solved = compress_layers(view, found.layers, _solving(samples, config), structures,
                             {l.name: 1.0 for l in found.layers}, config, progress)
    solved_model = apply_initializers(normalized.model, solved.initializers, consume=True)
    seconds = {"weights_s": time.perf_counter() - started}
    scales = _solved_scales(solved_model, solved)
    solved_model, refinement, distilled = _trained(normalized.model, teacher or normalized.model, solved_model,
                                                   samples, config, progress, scales, W4_BITS,
                                                   lambda m: int4_weights(m, scales), seconds)
    started = time.perf_counter()
    progress("quantize", 0, 1, "int4 export")
    quantized = int4_weights(solved_model, scales)
    seconds["export_s"] = time.perf_counter() - started
    coverage = FusionCoverage(float=[{"name": o.layer.name, "op_type": o.layer.op_type,
                                      "reason": "w4: int4 weights dequantized to float; the layer runs in float"}
                                     for o in solved.outcomes if o.scales is not None])
    notes = [] if default_opset(model) >= W4_OPSET else [
        f"--quantize w4: the model was converted from opset {default_opset(model)} to {W4_OPSET} and IR version "
        f"{model.ir_version} to {quantized.ir_version} (int4 weights need both; onnxruntime >= 1.20 runs it)"]
    return QuantizedModel(quantized, _rows(solved), _declined(found, solved), {}, coverage, seconds, "float",
                          float_model=solved_model, notes=notes, weight_bits=W4_BITS, refinement=refinement,
                          distilled=distilled, stream=(solved.peak_cache_bytes, solved.spilled_bytes))


def quantize_int8(model: onnx.ModelProto, samples: SampleSet, config: CompressConfig,
                  progress: Progress | None = None, teacher: onnx.ModelProto | None = None,
                  in_place: bool = False) -> QuantizedModel:
    """The int8 model with static or dynamic activations (``config.int8_activations``; auto: both where the
    MatMuls hold most of the layer weights, the one with the smaller output error on the held-out calibration
    samples kept)."""
    progress = progress or (lambda *args: None)
    normalized = normalize(model, in_place=in_place)
    found = apply_exclude(find_layers(normalized.view()), config.exclude)
    modes = int8_forms(found.layers, config.int8_activations)
    probe = None
    if len(modes) > 1:
        probe = probe_forms(normalized.model, normalized.inferred, samples, config, _ranges_memory(config),
                            progress)
        modes = [probe.chosen] if probe.chosen else modes
    built = {mode: _static(normalized, found, samples, config, progress, teacher or normalized.model,
                           probe.ranges if probe else None) if mode == "static" else
             _dynamic(normalized, found, samples, config, progress, teacher or normalized.model)
             for mode in modes}
    chosen = next(iter(built.values()))
    if len(built) > 1:
        errors = held_out_errors(normalized.model, {m: q.model for m, q in built.items()}, samples, config)
        chosen = built[min(errors, key=errors.get)]
        chosen.held_out_errors = errors
        chosen.seconds = {f"{mode}_{k}": v for mode, q in built.items() for k, v in q.seconds.items()}
        chosen.stream = (max(q.stream[0] for q in built.values()), sum(q.stream[1] for q in built.values()))
    if probe:
        chosen.probe = probe
        chosen.seconds["probe_s"] = probe.seconds
    chosen.weight_bits = int8_bits(config)
    if config.objective == "latency":
        _keep_faster_float(chosen, normalized.view(), samples, config, progress)
    return chosen


def _keep_faster_float(quantized: QuantizedModel, view: GraphView, samples: SampleSet, config: CompressConfig,
                       progress) -> None:
    """``--objective latency``: the integer layers measured slower than float stay float (``fallback.py``)."""
    started = time.perf_counter()
    precision = "int8" if quantized.activations == "static" else "int8-dynamic"
    feed = timing_feed(samples, config.latency_batch, config.latency_seq_len)
    model, fallback = keep_faster_float(quantized.float_model, quantized.model, quantized.coverage.integer,
                                        quantized.export, feed, config.threads, precision, progress)
    if fallback.chosen != "int8":
        quantized.coverage = _coverage(model, quantized.float_model, view)
        whole = fallback.whole_model["int8"]
        for row in quantized.coverage.float:
            if row["name"] in fallback.kept_float:
                ratio = fallback.layer_ratios[row["name"]]
                row["reason"] = (f"kept float (--objective latency): int8 measured {ratio:.2f}x its float time "
                                 "alone" + ("" if fallback.chosen == "mixed" else
                                            f"; the whole graph in int8 {whole:.2f}x the float graph"))
    quantized.model, quantized.fallback = model, fallback
    quantized.seconds["latency_s"] = time.perf_counter() - started


def _static(normalized, found, samples: SampleSet, config: CompressConfig, progress, teacher,
            float_ranges: dict[str, TensorRange] | None = None) -> QuantizedModel:
    """``float_ranges``: ranges already estimated on the float model (the form probe's), reused for the layer
    inputs' rounding when they cover every input."""
    seconds = {}
    started = time.perf_counter()
    view = normalized.view()
    inputs = {layer.name: layer.input_name for layer in found.layers}
    wanted = sorted(set(inputs.values()))
    input_ranges = {n: float_ranges[n] for n in wanted} if float_ranges and set(wanted) <= set(float_ranges) else \
        activation_ranges(normalized.model, wanted, samples, config.activation_range, config.batch_size,
                          config.threads, progress, _ranges_memory(config), "layer inputs' ranges")
    solved = _solved_on_rounded_inputs(normalized.model, inputs, input_ranges, samples, config, progress)
    solved_model = apply_initializers(normalized.model, solved.initializers, consume=True)
    seconds["weights_s"] = time.perf_counter() - started
    started = time.perf_counter()
    names = float_tensors(solved_model, normalized.inferred)
    ranges = activation_ranges(solved_model, names, samples, config.activation_range, config.batch_size,
                               config.threads, progress, _ranges_memory(config), "ranges of the solved model")
    seconds["ranges_s"] = time.perf_counter() - started
    scales = _solved_scales(solved_model, solved)
    solved_model, refinement, distilled = _trained(
        normalized.model, teacher, solved_model, samples, config, progress, scales, int8_bits(config),
        lambda m: quantize_qdq(m, samples, ranges, scales, (), config.int8_reduce_range), seconds)
    started = time.perf_counter()
    progress("quantize", 0, 1, "QDQ export")

    def export(float_nodes=()):
        return quantize_qdq(solved_model, samples, ranges, scales, float_nodes, config.int8_reduce_range)

    quantized = export()
    coverage = _coverage(quantized, solved_model, view)
    seconds["export_s"] = time.perf_counter() - started
    return QuantizedModel(quantized, _rows(solved), _declined(found, solved), ranges, coverage, seconds, "static",
                          float_model=solved_model, export=export, refinement=refinement,
                          distilled=distilled, stream=(solved.peak_cache_bytes, solved.spilled_bytes))


def _solved_on_rounded_inputs(model: onnx.ModelProto, inputs: dict[str, str], input_ranges: dict[str, TensorRange],
                              samples: SampleSet, config: CompressConfig, progress):
    """Every layer (node name -> its input tensor in ``inputs``) onto the int8 grid, solved in the copy of ``model``
    whose layer inputs are rounded as exported; the copy, a second set of the weights, is freed on return."""
    rounding, switches = with_input_rounding(model, input_ranges, inputs)
    rounded_view = GraphView(rounding, infer_types(rounding))
    layers = [layer for layer in apply_exclude(find_layers(rounded_view), config.exclude).layers
              if layer.name in inputs]
    structures = {layer.name: Structure("grid", bits=int8_bits(config), keep_zeros=True) for layer in layers}
    return compress_layers(rounded_view, layers, _solving(samples, config), structures,
                           {l.name: 1.0 for l in layers}, config, progress, switches)


def _dynamic(normalized, found, samples: SampleSet, config: CompressConfig, progress, teacher) -> QuantizedModel:
    """Weights of the MatMuls (and plain Gemms) onto the grid, x̂ the inputs of the model whose embedding tables
    are already rounded as exported (the run-time activation rounding follows each tensor's own range, which no
    calibrated pass reproduces), then onnxruntime's dynamic form (embeddings int8 per row)."""
    seconds = {}
    started = time.perf_counter()
    view = normalized.view()
    layers = dynamic_layers(found.layers)
    smoothing = None
    if config.int8_smoothing == "auto":
        smoothing = smooth_activations(normalized.model, view, layers, _solving(samples, config), int8_bits(config),
                                       config.batch_size, config.threads, _ranges_memory(config), progress)
        if smoothing.smoothed:  # the graph changed: index it again
            normalized.inferred = infer_types(normalized.model)
            view = normalized.view()
            names = {layer.name for layer in layers}
            layers = [layer for layer in find_layers(view).layers if layer.name in names]
        seconds["smoothing_s"] = time.perf_counter() - started
        started = time.perf_counter()
    structures = {layer.name: Structure("grid", bits=int8_bits(config), keep_zeros=True) for layer in layers}
    tables = embedding_rounding(view)
    solved = compress_layers(view, layers, _solving(samples, config), structures, {l.name: 1.0 for l in layers},
                             config, progress, tables)
    solved_model = apply_initializers(normalized.model, solved.initializers, consume=True)
    seconds["weights_s"] = time.perf_counter() - started
    scales = _solved_scales(solved_model, solved)
    solved_model, refinement, distilled = _trained(
        normalized.model, teacher, solved_model, samples, config, progress, scales, int8_bits(config),
        lambda m: quantize_dynamic_int8(m, scales, (), config.int8_reduce_range), seconds)
    started = time.perf_counter()
    progress("quantize", 0, 1, "dynamic int8 export")

    def export(float_nodes=()):
        return quantize_dynamic_int8(solved_model, scales, float_nodes, config.int8_reduce_range)

    quantized = export()
    coverage = _coverage(quantized, solved_model, view)
    seconds["export_s"] = time.perf_counter() - started
    return QuantizedModel(quantized, _rows(solved), _declined(found, solved), {}, coverage, seconds, "dynamic",
                          float_model=solved_model, export=export, refinement=refinement,
                          distilled=distilled, stream=(solved.peak_cache_bytes, solved.spilled_bytes),
                          smoothing=smoothing)


def _ranges_memory(config: CompressConfig) -> int:
    """What one batch of the range passes' tensors may hold: a quarter of ``--max-memory-mb`` (onnxruntime
    hands them over as a copy, so a batch is held about twice while it runs)."""
    return (config.max_memory_mb << 20) // 4


def _solving(samples: SampleSet, config: CompressConfig) -> SampleSet:
    """The samples the grid solve sees: with ``--distill-epochs``, the held-out rows the distillation is checked
    on are left out."""
    held = held_out_rows(samples.num_samples, samples.fixed_batch)
    return samples.subset(np.flatnonzero(~held)) if config.distill_epochs and held.any() else samples


def _trained(given: onnx.ModelProto, teacher: onnx.ModelProto, solved_model: onnx.ModelProto, samples: SampleSet,
             config: CompressConfig, progress, scales: dict[str, WeightScales], bits: int,
             export: Callable[[onnx.ModelProto], onnx.ModelProto], seconds: dict[str, float]
             ) -> tuple[onnx.ModelProto, GridRefinement | None, Distillation | None]:
    """The solved model trained with the grid fixed (``finetune/grid.py``) on a float graph that rounds every
    tensor the export quantizes as it does: ``--refine-grid-epochs``, block by block against ``given`` (the float
    model the stage was given: the same shapes at every cut); then ``--distill-epochs``, the whole model against
    ``teacher``. Each is kept only when its exported form is closer to ``teacher`` on the held-out calibration
    samples than the model before it."""
    if not config.refine_grid_epochs and not config.distill_epochs:
        return solved_model, None, None
    grid = FixedGrid({name: (s.scales, s.axis, 2 ** (bits - 1) - 1) for name, s in scales.items()})
    exported = export(solved_model)  # (the exported form of the model so far: each step is judged against it)
    refinement = None
    if config.refine_grid_epochs:
        started = time.perf_counter()
        values, outcomes = refine_blocks(GraphView(given), with_export_rounding(solved_model, exported)[0], samples,
                                         config, progress, {}, grid, config.refine_grid_epochs)
        refinement = GridRefinement(outcomes)
        if values:
            refined = apply_initializers(solved_model, values)
            refined_exported = export(refined)
            losses = held_out_loss(teacher, {"solved": exported, "refined": refined_exported}, samples, config)
            refinement.loss_before, refinement.loss_after = losses["solved"], losses["refined"]
            refinement.kept = losses["refined"] < losses["solved"]
            if refinement.kept:
                solved_model, exported = refined, refined_exported
        refinement.seconds = seconds["refine_s"] = time.perf_counter() - started
    if not config.distill_epochs:
        return solved_model, refinement, None
    started = time.perf_counter()
    training, _ = with_export_rounding(solved_model, exported)
    trained, record = distill(teacher, training, samples, config, progress, grid)
    distilled_model = solved_model
    if record.kept:  # judged again on the exported graphs
        view = GraphView(trained)
        distilled_model = apply_initializers(solved_model, {name: view.constant(name) for name in record.trained})
        losses = held_out_loss(teacher, {"solved": exported, "distilled": export(distilled_model)}, samples, config)
        record.kept = losses["distilled"] < losses["solved"]
        record.note = "; ".join(n for n in (record.note, "exported graphs on the held-out samples: loss "
                                            f"{losses['solved']:.4g} solved, {losses['distilled']:.4g} distilled"
                                            + ("" if record.kept else "; solved weights kept")) if n)
    seconds["distill_s"] = time.perf_counter() - started
    return (distilled_model if record.kept else solved_model), refinement, record


def int8_bits(config: CompressConfig) -> int:
    """Weight bits of the int8 grid: 8 (−127…127), or 7 (−63…63) with ``--int8-reduce-range``, where no two
    uint8 × int8 products can saturate the 16-bit sums of x86 CPUs without VNNI (``validation/x86_avx2.py``)."""
    return 7 if config.int8_reduce_range else 8


def _solved_scales(solved_model: onnx.ModelProto, solved) -> dict[str, WeightScales]:
    nodes = {node.name: node for node in solved_model.graph.node}
    return {o.layer.weight_name: WeightScales(o.scales, weight_axis(nodes[o.layer.name]))
            for o in solved.outcomes if o.scales is not None}


def _coverage(quantized: onnx.ModelProto, solved_model: onnx.ModelProto, view: GraphView) -> FusionCoverage:
    return fusion_coverage(quantized, {n.name: n.op_type for n in solved_model.graph.node
                                       if n.op_type in WEIGHT_OPS and len(n.input) > 1
                                       and n.input[1] in view.initializers})


def _declined(found, solved) -> list[dict]:
    return [{"name": d.name, "op_type": d.op_type, "reason": d.reason} for d in found.declined + solved.declined]


def _rows(solved) -> list[dict]:
    return [{**LayerRow.of(o).as_dict(), "scale_min": float(o.scales.min()), "scale_max": float(o.scales.max())}
            for o in solved.outcomes if o.scales is not None]
