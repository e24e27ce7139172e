"""Render a report dict as Markdown (for CI job summaries and humans)."""

from __future__ import annotations


def _factor_plan(lines: list[str], plan: dict) -> None:
    planned = ", ".join(f"{k} {v[0] / v[1]:.3f} of the original" for k, v in plan["planned"].items()
                        if v and v[1])
    lines.append(f"## Factorized layers ({plan['strategy']}; planned {planned})")
    lines.append("")
    context = plan.get("pair_in_context_factor") or {}
    lines.append("| layer | exported form | factorized latency / dense (measured alone) | saving in the graph / alone |")
    lines.append("|---|---|---|---|")
    for name, form in plan["export_forms"].items():
        lines.append(f"| `{name}` | {form} | {_fmt(plan['pair_latency_ratio'].get(name))} | "
                     f"{_fmt(context.get(name))} |")
    lines.append("")
    for name, spec in plan["ranks"].items():
        if spec is not None and spec["rank"] == 0:
            lines.append(f"- `{name}` kept as a sparse layer (S alone, {spec['sparse_count']} nonzeros): its measured "
                         "damage per parameter was lower than any factorization's")
    for name, reason in plan["kept_dense"].items():
        lines.append(f"- `{name}` kept dense: {reason}")
    _latency_search(lines, plan)
    lines.append("")


def _latency_search(lines: list[str], plan: dict) -> None:
    """One line per plan timed for --target-latency: the table's prediction beside the measured graph."""
    for step in plan.get("latency_search") or []:
        lines.append(f"- latency plan at a {step.get('budget_unit', 'batch-1 latency')} budget of "
                     f"{step['budget_ratio']:.3f}: table predicts "
                     f"{step['predicted_ratio']:.3f}, exported graph measured {step['measured_ratio']:.3f} of the "
                     f"original's {step.get('measured', 'batch-1 latency')}")


def _platform(lines: list[str], check: dict) -> None:
    lines.append(f"## Platform check: {check['platform']} — {'PASS' if check['passed'] else 'FAIL'}")
    lines.append("")
    lines.append(f"onnxruntime {check['onnxruntime']} on {check['emulated_machine']}, {check['samples']} samples, "
                 f"tolerance rtol {check['tolerance']['rtol']}, atol {check['tolerance']['atol']}. {check['note']}.")
    lines.append("")
    lines.append("| model | max abs diff vs x86 | max abs output | within tolerance | top-1 same as x86 | "
                 "top-1 agreement with x86 original |")
    lines.append("|---|---|---|---|---|---|")
    for row in check["models"]:
        lines.append(f"| {row['model']} | {row['max_abs_diff_vs_x86']:.2e} | {row['max_abs_output']:.3g} | "
                     f"{row['within_fp32_tolerance']} | {row['top1_same_as_x86']:.4f} | "
                     f"{row['top1_agreement_with_original_x86']:.4f} |")
    lines.append("")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _validation(lines: list[str], v) -> None:
    """``v``: a ``validation.run.Validation``."""
    c = v.comparison
    lines.append(f"## Validation ({c.samples} samples, {'held-out' if v.held_out else 'NOT held-out'}: "
                 f"{v.data_source})")
    lines.append("")
    lines.append("| metric | value |")
    lines.append("|---|---|")
    if c.agreement is not None:
        low, high = c.agreement_interval
        lines.append(f"| top-1 agreement with original | {c.agreement:.4f} (95 % interval {low:.4f}–{high:.4f}) |")
    if c.accuracy_original is not None:
        lines.append(f"| top-1 original / compressed | {100 * c.accuracy_original:.2f} % / "
                     f"{100 * c.accuracy_compressed:.2f} % |")
        low, high = c.accuracy_drop_interval_pt
        lines.append(f"| top-1 drop | {c.accuracy_drop_pt:.2f} pt (95 % interval {low:.2f} to {high:.2f} pt; "
                     f"{c.only_original_right} samples only the original gets right, {c.only_compressed_right} "
                     "only the compressed model) |")
    for out in c.outputs:
        lines.append(f"| `{out.name}` cosine / max-abs / rel. error | {out.cosine:.6f} / "
                     f"{_fmt(out.max_abs)} / {_fmt(out.relative_error)} |")
        if out.sample_cosine is not None:
            lines.append(f"| `{out.name}` mean per-sample cosine | {out.sample_cosine:.4f} |")
    fa, fb = v.original, v.compressed
    lines.append(f"| file size raw | {fa.size_bytes:,} → {fb.size_bytes:,} B |")
    lines.append(f"| file size zip | {fa.zipped_bytes:,} → {fb.zipped_bytes:,} B |")
    lines.append(f"| nonzero params | {fa.nonzero_params:,} → {fb.nonzero_params:,} |")
    lines.append(f"| dense MACs / sample | {fa.macs:,} → {fb.macs:,} |")
    for lat in v.latency:
        lines.append(f"| latency batch {lat.batch_size}, {lat.threads} thr | "
                     f"{lat.original_ms_median:.3f} → {lat.compressed_ms_median:.3f} ms (median); "
                     f"speed-up {lat.speedup:.3f}×"
                     + (f" (95 % interval {lat.speedup_interval[0]:.3f}–{lat.speedup_interval[1]:.3f})"
                        if lat.speedup_interval else "")
                     + f"; rounds [{1 / lat.ratio_p90:.3f}, {1 / lat.ratio_p10:.3f}]"
                     + (f", faster in {lat.rounds_faster} of {lat.rounds} rounds" if lat.rounds_faster is not None
                        else "") + " |")
    lines.append("")
    _bullets(lines, "**What was gained**", v.gains)
    if v.time_split:
        _time_split(lines, v.time_split)
    if v.gates:
        lines.append("**Gates**")
        lines.append("")
        for gate in v.gates:
            lines.append(f"- {'PASS' if gate.passed else 'FAIL'} `{gate.name}`: {gate.detail}")
        lines.append("")


def _time_split(lines: list[str], split: dict, top: int = 15) -> None:
    """Per-node kernel times (onnxruntime profiler, batch 1): by op, then the slowest weight-product nodes."""
    lines.append("**Where the time goes** (onnxruntime profiler, batch 1, median kernel time per run; each node "
                 "named by the layer of the input graph it runs, or as onnxruntime names it)")
    lines.append("")
    lines.append("| op | original ms | compressed ms | ratio |")
    lines.append("|---|---|---|---|")
    for row in split["by_op_ms"]:
        ratio = row["compressed"] / row["original"] if row["original"] else None
        lines.append(f"| {row['op']} | {row['original']:.3f} | {row['compressed']:.3f} | {_fmt(ratio, 3)} |")
    lines.append("")
    lines.append("| node | output shape original → compressed | MACs × | time ms original → compressed | time × |")
    lines.append("|---|---|---|---|---|")
    for row in split["layers"][:top]:
        a, b = row["output_shape"]
        lines.append(f"| `{row.get('layer') or row['name']}` | {'×'.join(map(str, a))} → {'×'.join(map(str, b))} | "
                     f"{row['macs_ratio']:.3f} | {row['time_ms_original']:.3f} → {row['time_ms_compressed']:.3f} | "
                     f"{_fmt(row['time_ratio'], 3)} |")
    if len(split["layers"]) > top:
        lines.append(f"| … {len(split['layers']) - top} more in the JSON report | | | | |")
    lines.append("")


def _refined(lines: list[str], rows: list) -> None:
    """``rows``: ``finetune.refine.BlockOutcome``s."""
    kept = sum(r.kept for r in rows)
    lines.append(f"## Block-wise refinement ({kept} of {len(rows)} blocks improved; relative error of the "
                 "block output on held-out calibration samples)")
    lines.append("")
    lines.append("| block | layers | error before → after | kept | s | note |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| `{r.block}` | {len(r.layers)} | {_fmt(r.loss_before, 3)} → {_fmt(r.loss_after, 3)} | "
                     f"{'epoch ' + str(r.best_epoch) if r.kept else 'no'} | {r.seconds:.1f} | {r.note} |")
    lines.append("")


def _distilled(lines: list[str], d) -> None:
    """``d``: a ``finetune.distill.Distillation``."""
    lines.append(f"## Whole-model distillation ({d.epochs} epochs, augmentation {d.augment}, "
                 f"{len(d.trained)} weight tensors trained, {d.seconds:.1f} s)")
    lines.append("")
    lines.append("On every tenth calibration sample (held out of the solve, the block refinement and the "
                 "distillation):")
    lines.append("")
    lines.append(f"- loss to the original's outputs: {_fmt(d.loss_before, 4)} → {_fmt(d.loss_after, 4)}")
    if d.agreement_before is not None:
        lines.append(f"- top-1 agreement with the original: {_fmt(d.agreement_before, 3)} → "
                     f"{_fmt(d.agreement_after, 3)}")
    lines.append(f"- distilled weights kept: {'yes' if d.kept else 'no'}" + (f" ({d.note})" if d.note else ""))
    lines.append("")


def _quantization(lines: list[str], quant: dict) -> None:
    fusion = quant["fusion"]
    total = len(fusion["integer"]) + len(fusion["float"])
    precision = quant.get("precision", "int8")
    lines.append(f"## {precision}")
    lines.append("")
    lines.append(f"- format: {quant['format']}")
    if quant.get("form_probe") or quant.get("held_out_output_error"):
        lines.append(f"- {form_choice_line(quant)}")
    if precision == "int8":
        lines.append(f"- fusion coverage: {len(fusion['integer'])} of {total} Conv/Gemm/MatMul run as onnxruntime "
                     f"integer kernels on this CPU ({100 * fusion['fraction_integer']:.0f} %)")
        for row in fusion["float"]:
            lines.append(f"  - stays float: `{row['name']}` ({row['op_type']}): {row['reason']}")
    if quant.get("smoothing"):
        lines.append(f"- {smoothing_line(quant['smoothing'])}")
    if quant.get("float_fallback"):
        lines.append(f"- {fallback_line(quant['float_fallback'])}")
    if quant.get("refinement"):
        lines.append(f"- {grid_refinement_line(quant['refinement'])}")
    chosen = ", ".join(f"{name} {count}" for name, count in sorted(quant["estimators_chosen"].items()))
    if quant["activation_ranges"]:
        lines.append(f"- activation ranges: {len(quant['activation_ranges'])} tensors; estimator chosen: {chosen}")
    lines.append(f"- time: {quantization_time(quant.get('seconds', {}))}")
    lines.append("")
    if quant["layers"]:
        lines.append("| layer | op | shape | scales | error dense → rounded → solved |")
        lines.append("|---|---|---|---|---|")
        for row in quant["layers"]:
            lines.append(f"| `{row['name']}` | {row['op_type']} | {'×'.join(map(str, row['weight_shape']))} | "
                         f"{row['scale_min']:.2e}…{row['scale_max']:.2e} | {_fmt(row['error_dense'], 4)} → "
                         f"{_fmt(row['error_projected'], 4)} → {_fmt(row['error_final'], 4)} |")
        lines.append("")
    smoothed = [row for row in (quant.get("smoothing") or {}).get("inputs", []) if row["alpha"] is not None]
    if smoothed:
        lines.append("| smoothed input | read by | α | rounded output error before → after | 1/s placed in |")
        lines.append("|---|---|---|---|---|")
        for row in smoothed:
            lines.append(f"| `{row['tensor']}` | {len(row['consumers'])} MatMul | {row['alpha']:g} | "
                         f"{_fmt(row['error_before'], 3)} → {_fmt(row['error_after'], 3)} | {row['placed']} |")
        lines.append("")
    for row in quant.get("declined", []):
        kept = "weights with onnxruntime's own max-abs scales" if precision == "int8" else "weights kept float"
        lines.append(f"- {kept}: `{row['name']}` ({row['op_type']}): {row['reason']}")


STEPS = {"probe_s": "form probe", "smoothing_s": "smoothing", "weights_s": "weights", "ranges_s": "ranges",
         "refine_s": "grid refinement", "distill_s": "distillation", "export_s": "export",
         "latency_s": "int8 vs float timing"}


def quantization_time(seconds: dict[str, float]) -> str:
    """The precision stage's steps in the order they run; when both activation forms were built (``static_…``,
    ``dynamic_…``), each form's steps under its name."""
    def steps(prefix: str) -> str:
        return ", ".join(f"{label} {seconds[prefix + key]:.1f} s" for key, label in STEPS.items()
                         if prefix + key in seconds)
    forms = [form for form in ("static", "dynamic") if any(k.startswith(form + "_") for k in seconds)]
    parts = [f"{form}: {steps(form + '_')}" for form in forms] + ([steps("")] if steps("") else [])
    return "; ".join(parts) or "not recorded"


def form_choice_line(quant: dict) -> str:
    """Why the activation form is the one it is: the rounding-only probe's errors, and the solved ones."""
    def errors(values: dict) -> str:
        return ", ".join(f"{form} {_fmt(value)}" for form, value in sorted(values.items()))
    line = f"activation form {quant['activations']}"
    probe = quant.get("form_probe")
    if probe:
        line += f" — held-out output error with the weights only rounded: {errors(probe['held_out_output_error'])}"
        line += (f": at least {probe['margin']:g}x apart, so only {probe['decided']} was solved" if probe["decided"]
                 else f": closer than {probe['margin']:g}x, so both were solved")
    if quant.get("held_out_output_error"):
        line += f"; solved: {errors(quant['held_out_output_error'])}"
    return line


def smoothing_line(smoothing: dict) -> str:
    """One line on activation smoothing (dynamic int8, ``quantize/smooth.py``)."""
    rows = smoothing["inputs"]
    smoothed = [r for r in rows if r["alpha"] is not None]
    if not smoothed:
        return (f"activation smoothing: none of {len(rows)} MatMul inputs (their rounded output error fell too little: "
                "by 10 % at least where it takes a Mul node); graph unchanged")
    alphas = sorted({r["alpha"] for r in smoothed})
    before = sum(r["error_before"] for r in smoothed) / len(smoothed)
    after = sum(r["error_after"] for r in smoothed) / len(smoothed)
    nodes = sum(r["placed"].startswith("Mul node") for r in smoothed)
    return (f"activation smoothing: {len(smoothed)} of {len(rows)} MatMul inputs, α {alphas[0]:g}"
            + (f"–{alphas[-1]:g}" if len(alphas) > 1 else "")
            + f"; their MatMuls' rounded output error, mean {before:.2e} → {after:.2e}; 1/s folded into "
            f"{len(smoothed) - nodes} producers, {nodes} Mul nodes added")


def grid_refinement_line(refinement: dict) -> str:
    """One line on block refinement with the grid fixed (``--refine-grid-epochs``)."""
    blocks = refinement["blocks"]
    line = (f"block refinement with the grid fixed: {sum(b['kept'] for b in blocks)} of {len(blocks)} blocks "
            f"improved, {refinement['seconds']:.1f} s")
    if refinement["loss_before"] is None:
        return line + "; solved weights kept"
    return (line + f"; exported model's loss to the original on held-out calibration samples "
            f"{refinement['loss_before']:.4g} → {refinement['loss_after']:.4g}, "
            + ("refined weights kept" if refinement["kept"] else "solved weights kept"))


def fallback_line(fallback: dict) -> str:
    """One line on what ``--objective latency`` kept float, with the whole-graph ratios it chose by."""
    whole = ", ".join(f"{form} {ratio:.2f}" for form, ratio in fallback["whole_model_over_float"].items())
    kept = len(fallback["kept_float"])
    total = len(fallback["layer_int8_over_float"])
    what = {"int8": "every layer int8", "float": "every layer kept float (int8 is slower here)",
            "mixed": f"{kept} of {total} layers kept float (their int8 form measured slower alone)"}
    return (f"--objective latency: {what[fallback['chosen']]}; whole graph over the float one: {whole}")


def _search(lines: list[str], search: dict) -> None:
    gate = ", ".join(f"{k.replace('_pt', '')} {'≤' if k == 'accuracy_drop_pt' else '≥'} {v}"
                     for k, v in search["gate"].items())
    lines.append(f"## Search: the lowest {search['cost']} within the budget ({gate})")
    lines.append("")
    lines.append(f"Chosen: **{search['chosen']}**" + ("" if search["held"] else f" — {search['reason']}")
                 + f". {len(search['candidates'])} candidates in {search['search_s']:.0f} s"
                 + (f" (budget {search['time_budget_s'] / 60:.0f} min)" if search.get("time_budget_s") else "")
                 + "; the details below are the chosen model's.")
    lines.append("")
    if search.get("chart"):
        lines.extend([search["chart"], ""])
    if search.get("png"):
        lines.extend([f"![the frontier]({search['png']})", ""])
    lines.append(f"| candidate | {search['cost']} | top-1 drop (pt) | agreement | gate | frontier | s | note |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in search["candidates"]:
        name = f"**{row['label']}** (chosen)" if row["chosen"] else row["label"]
        cost = _fmt(row["cost_ratio"], 3)
        cost += f" (measured {row['cost_measured']:.3f})" if "cost_measured" in row else ""
        cost += f" (own run {row['cost_own_run']:.3f})" if "cost_own_run" in row else ""
        lines.append(f"| {name} | {cost} | {_fmt(row['accuracy_drop_pt'])} | "
                     f"{_fmt(row['agreement'], 4)} | {'holds' if row['passed'] else 'missed'} | "
                     f"{'yes' if row['on_frontier'] else ''} | {_seconds(row)} | {row['note']} |")
    lines.append("")
    if search.get("within_noise"):
        lines.extend([search["within_noise"][0].upper() + search["within_noise"][1:] + ".", ""])
    if search.get("side_by_side"):
        lines.extend([_side_by_side(search["side_by_side"]), ""])
    if any("cost_measured" in row for row in search["candidates"]):
        lines.extend([f"Candidates whose graphs differ only in their weights' values run the same kernels: their "
                      f"{search['cost']} is the geometric mean of their measurements (each one's in brackets).", ""])
    if any(row.get("reused_s") for row in search["candidates"]):
        lines.extend(["s: the candidate's own run; + what it reused of earlier candidates' runs (the original's "
                      "run on the evaluation samples, a solve it shares with one).", ""])


def _side_by_side(timing: dict) -> str:
    """One sentence: the search's finalists timed together, against their own runs' figures."""
    if "skipped" in timing:
        return timing["skipped"][0].upper() + timing["skipped"][1:] + "."
    each = "; ".join(f"{c['label']} {c['side_by_side']:.3f} (95 % {c['interval'][0]:.3f}–{c['interval'][1]:.3f}; "
                     f"own run {c['own_run']:.3f})" for c in timing["candidates"])
    return (f"The cheapest candidates that held the gate, and int8 alone when it held, were timed again side by side "
            f"(batch {timing['batch']}, {timing['rounds']} rounds, each against the original in the same rounds), "
            f"and the choice is made on these ratios: {each}.")


def _seconds(row: dict) -> str:
    reused = row.get("reused_s") or 0
    return f"{row['seconds']:.0f}" + (f" + {reused:.0f}" if reused >= 0.5 else "")


def render(report) -> str:
    """Markdown for a ``CompressReport``, ``ValidateReport`` or ``CheckReport`` (``schema.py``)."""
    lines = [f"# onnxadmm {report.kind} report", ""]
    status = "PASSED" if report.passed else "FAILED (a gate was missed)"
    lines.append(f"**Result: {status}**")
    lines.append("")
    lines.append(f"- input: `{report.input.path}` (sha256 {report.input.sha256[:12]}…)")
    if report.kind == "check":
        _check(lines, report)
        return "\n".join(lines)
    if report.output:
        lines.append(f"- output: `{report.output.path}`")
    compress = report.kind == "compress"
    if compress:
        c = report.config
        lines.append(f"- method `{c.method}`, loss `{c.loss}`, solver `{c.solver}`"
                     + (f" (large products in {c.admm_products})" if c.solver == "admm" else "") + f", seed {c.seed}")
        cal = report.calibration
        rep = "" if cal.representative else " — **random data, not representative**"
        lines.append(f"- calibration: {cal.samples} samples from `{cal.source}`{rep}")
        t = report.totals
        lines.append(f"- compressed layers: {t.layers_compressed}"
                     + (f", kept dense and refit: {t.layers_kept_dense}" if t.layers_kept_dense else "")
                     + f" (declined {t.layers_declined}); sparsity over them {t.sparsity:.4f}; nonzero layer "
                     f"weights {t.nonzero_reduction_x:.2f}× fewer")
    lines.append(f"- time {report.timing.total_s:.1f} s, peak RSS {report.timing.peak_rss_mb:.0f} MB")
    for note in report.notes if compress else []:
        lines.append(f"- note: {note}")
    lines.append("")
    if compress and report.search:
        _search(lines, report.search)
    _validation(lines, report.validation)
    if compress:
        _compress_sections(lines, report)
    if report.platform_check:
        _platform(lines, report.platform_check)
    if compress:
        _bullets(lines, "## Left dense", [f"`{row.name}` ({row.op_type}): {row.reason}" for row in report.declined])
    return "\n".join(lines)


def _compress_sections(lines: list[str], report) -> None:
    """The layers, the fine-tuning, and the plan as the method and the precision stage report it."""
    if report.layers:
        lines.append("## Layers")
        lines.append("")
        lines.append("| layer | op | shape | activation | structure | target | sparsity | error dense → "
                     "projected → final | s |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for row in report.layers:
            lines.append(f"| `{row.name}` | {row.op_type} | {'×'.join(map(str, row.weight_shape))} | "
                         f"{row.activation} | {row.structure} | {row.target_level:.2f} | {row.sparsity:.3f} | "
                         f"{_fmt(row.error_dense, 3)} → {_fmt(row.error_projected, 3)} → "
                         f"{_fmt(row.error_final, 3)} | {row.seconds:.2f} |")
        lines.append("")
    if report.refined_blocks:
        _refined(lines, report.refined_blocks)
    if report.distillation:
        _distilled(lines, report.distillation)
    plan = report.plan or {}
    if plan.get("groups"):
        lines.append(f"## Channel groups (MACs planned {plan['macs_planned_ratio']:.3f} of the original, "
                     f"{plan['strategy']})")
        lines.append("")
        lines.append("| group | channels | kept | consumers | stays whole because |")
        lines.append("|---|---|---|---|---|")
        for g in plan["groups"]:
            lines.append(f"| `{g['name']}` | {g['channels']} | {_fmt(g.get('kept'))} | {len(g['consumers'])} | "
                         f"{g['declined'] or ''} |")
        lines.append("")
        _latency_search(lines, plan)
        for attempt in plan.get("give_back") or []:
            lines.append(f"- give-back attempt at target MACs {attempt['target_macs']:.3f}: "
                         f"{'gate holds' if attempt['passed'] else 'gate missed'} (agreement "
                         f"{_fmt(attempt['agreement'])}, drop {_fmt(attempt['accuracy_drop_pt'])} pt)")
        lines.append("")
    if plan.get("export_forms") is not None:
        _factor_plan(lines, plan)
    if plan.get("quantization"):
        _quantization(lines, plan["quantization"])


def _check(lines: list[str], report) -> None:
    """``check``: what the method would compress and decline."""
    lines.append(f"- method `{report.method}`: {len(report.compressible)} compressible layers, "
                 f"{len(report.declined)} declined")
    lines.extend(f"- note: {note}" for note in report.notes)
    lines.append("")
    lines.extend(["## What the method would do", "", "```", *report.method_preview, "```", ""])
    if report.compressible:
        lines.append("| layer | op | shape | activation | params |")
        lines.append("|---|---|---|---|---|")
        for row in report.compressible:
            lines.append(f"| `{row.name}` | {row.op_type} | {'×'.join(map(str, row.weight_shape))} | "
                         f"{row.activation} | {row.params:,} |")
        lines.append("")
    _bullets(lines, "## Declined", [f"`{row.name}` ({row.op_type}): {row.reason}" for row in report.declined])


def _bullets(lines: list[str], title: str, items: list[str]) -> None:
    """A titled bullet list; nothing when there are no items."""
    if items:
        lines.extend([title, "", *(f"- {item}" for item in items), ""])
