"""Command line: ``onnxadmm compress | validate | check``. The only module that prints.

Flags are generated from the config dataclasses' field metadata; a ``--config FILE.toml`` maps 1:1 to
the same fields and flags given on the command line win. Exit codes: 0 ok, 1 gate failed, 2 usage or
config error, 3 unsupported model or bad input (files, paths, disk), 4 internal error (a bug in onnxadmm),
128 + N ended by signal N (SIGINT 130, SIGTERM 143, SIGHUP 129).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import typing
from pathlib import Path

from . import __version__
from .config import (APPLIES_TO, THREADS_PER_CORE_MAX, CheckConfig, CompressConfig, ValidateConfig, check_threads,
                     from_mapping, load_toml, toml_settings)
from .errors import ConfigError, OnnxAdmmError
from .onnxio import scratch
from .onnxio.outputs import OutputSet, Use, check_paths, reads_of_model

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full, over-quota or read-only disk: exit 3


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, ``kill``) or SIGHUP (a closed terminal, a dropped ssh) raised as an interrupt,
    so that temporary folders and partial outputs are removed by the same ``finally`` blocks as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _ignore(signum, frame):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 2 with a clear line
        self.print_usage(sys.stderr)
        sys.stderr.write(f"onnxadmm: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        help_text = f"{meta.get('help', '')} (default: {meta.get('cli_default', repr(f.default))})".replace("%", "%%")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args and type(None) in args else hint
        if base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif typing.get_origin(base) is tuple:
            group.add_argument(flag, dest=f.name, action="append", default=None, help=help_text + " [repeatable]")
        else:
            group.add_argument(flag, dest=f.name, type=base, default=None, choices=meta.get("choices"),
                               help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxadmm", description="Post-training compression of ONNX models by layer-wise "
                     "ADMM through the activation, validated in onnxruntime.")
    parser.add_argument("--version", action="version", version=f"onnxadmm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a model with unlabelled calibration samples")
    c.add_argument("input", help="model to compress (.onnx); never modified")
    c.add_argument("output", help="where to write the compressed model (atomically)")
    c.add_argument("--calib", required=True, help="calibration samples: .npz keyed by input name, a folder, "
                   "or random:N (not representative)")
    c.add_argument("--val", default=None, help="held-out evaluation data (.npz); default: calibration samples "
                   "left out by --calib-samples")
    _common_output_flags(c)
    _add_config_flags(c, CompressConfig)
    _add_config_flags(c, ValidateConfig)

    v = sub.add_parser("validate", help="compare a compressed model with its original in onnxruntime")
    v.add_argument("original")
    v.add_argument("compressed")
    v.add_argument("--data", required=True, help="evaluation data (.npz keyed by input name, + labels)")
    v.add_argument("--batch-size", type=_at_least_one, default=32, help="samples per onnxruntime call")
    v.add_argument("--threads", type=_threads, default=0, help="onnxruntime threads (0 = all cores, at most "
                   f"{THREADS_PER_CORE_MAX}x the cores)")
    _common_output_flags(v)
    _add_config_flags(v, ValidateConfig)

    k = sub.add_parser("check", help="preflight: which layers would be compressed, which not and why")
    k.add_argument("input")
    k.add_argument("--method", default="none", help="method to check for (default none: what compress does "
                   "without --method or a budget, int8 alone)")
    k.add_argument("--nm", default="2:4", help="N:M pattern for --method nm")
    k.add_argument("--conv-groups", type=int, default=2, help="--method grouped: blocks per Conv pair")
    k.add_argument("--exclude", action="append", default=None, help="node names, globs or op types")
    k.add_argument("--report", default=None, help="write the JSON report here (and .md beside it)")
    k.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _threads(text: str) -> int:
    value = int(text)
    try:
        check_threads("threads", value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _common_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", default=None, help="JSON report path (a .md is written beside it); "
                   "default for compress: OUTPUT.report.json")
    p.add_argument("--config", default=None, help="TOML file with the same settings as the flags")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _configs(args, with_compress: bool) -> tuple[CompressConfig | None, ValidateConfig]:
    base_c, base_v = (load_toml(args.config) if getattr(args, "config", None)
                      else (CompressConfig(), ValidateConfig()))

    def merged(cls, base):
        values = dataclasses.asdict(base)
        for f in dataclasses.fields(cls):
            given = getattr(args, f.name, None)
            if given is None:
                continue
            if isinstance(given, list):  # repeatable flags may also be comma-separated
                given = [part for item in given for part in str(item).split(",") if part]
            values[f.name] = given
        return from_mapping(cls, values, "command line")

    if with_compress:
        _infer_method(args, base_v)
    return (merged(CompressConfig, base_c) if with_compress else None), merged(ValidateConfig, base_v)


def _infer_method(args, base_v: ValidateConfig) -> None:
    """``compress`` without a method (in the flags or the --config file): a method's own option keeps the default
    (sparse); else ``--quantize`` alone is that precision alone, a budget is the search, and nothing is int8 alone
    (the smaller and faster model: sparse zeros buy neither). Sets ``args.method`` (and what goes with it)."""
    # --refine-epochs refines what a method changed, so it keeps the default method too
    method_options = [name for name in (*APPLIES_TO, "target_macs", "target_latency", "target_params", "rank_ratio",
                                        "refine_epochs") if "auto" not in APPLIES_TO.get(name, ())]
    chosen_in_file = toml_settings(args.config) if getattr(args, "config", None) else set()
    if getattr(args, "method", None) is not None or chosen_in_file & {"method", "quantize", *method_options} \
            or any(getattr(args, name, None) is not None for name in method_options):
        return
    if getattr(args, "quantize", None) not in (None, "none"):
        args.method = "none"
    elif getattr(args, "max_accuracy_drop", None) is not None or getattr(args, "min_agreement", None) is not None \
            or base_v.max_accuracy_drop is not None or base_v.min_agreement is not None:
        args.method = "auto"
    else:
        args.method, args.quantize = "none", "int8"
        args.default_note = ("no --method: int8 alone (--method M for pruning, low-rank or sparsity; a budget, "
                             "--max-accuracy-drop PT or --min-agreement F, searches them)")


class Progress:
    """A one-line bar on a terminal; otherwise a log line per stage and at most every 10 s."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last_line = 0.0
        self.stage = None
        self.started = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int, detail: str) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.started
        if self.tty:
            width = 30
            filled = int(width * done / max(total, 1))
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r[{elapsed:6.1f}s] {stage:<11} [{bar}] {done}/{total} {detail[:50]:<50}")
            if stage == "done":
                sys.stderr.write("\n")
            sys.stderr.flush()
            return
        now = time.monotonic()
        if stage != self.stage or now - self.last_line >= 10 or done == total:
            sys.stderr.write(f"[{elapsed:7.1f}s] {stage}: {done}/{total} {detail}\n")
            sys.stderr.flush()
            self.last_line, self.stage = now, stage


def _stage_reports(outputs, report, path: Path) -> None:
    from .report.markdown import render

    if getattr(report, "search", None):  # the frontier as a PNG beside the reports, where matplotlib is installed
        from .budget.chart import frontier_png

        png = frontier_png(report.search)
        if png is not None:
            outputs.write_bytes(path.with_suffix(".png"), "frontier chart (PNG)", [png])
            report.search["png"] = path.with_suffix(".png").name
    outputs.write_text(path, "report (JSON)", report.to_json())
    outputs.write_text(_markdown_path(path), "report (Markdown)", render(report))


def _write_reports(report, path: Path) -> None:
    """The JSON and Markdown reports alone, written together (``check``, ``validate``)."""
    with OutputSet() as outputs:
        _stage_reports(outputs, report, path)
        outputs.commit()


def _markdown_path(report_path: Path) -> Path:
    return report_path.with_suffix(".md")


def _report_path(args, default: Path | None) -> Path | None:
    return Path(args.report) if args.report else default


def _report_writes(report_path: Path | None) -> list[Use]:
    if report_path is None:
        return []
    return [Use("report (JSON)", report_path), Use("report (Markdown)", _markdown_path(report_path))]


def _data_reads(spec: str | None, role: str) -> list[Use]:
    return [] if spec is None or str(spec).startswith("random:") else [Use(role, Path(spec))]


def _config_reads(args) -> list[Use]:
    return [Use("config file", Path(args.config))] if getattr(args, "config", None) else []


def run_compress(args) -> int:
    from .api import compress, search

    config, validate_config = _configs(args, with_compress=True)
    output = Path(args.output)
    report_path = _report_path(args, output.with_name(output.name + ".report.json"))
    writes = [Use("output model", output),
              Use("output model's external data (written above 2 GB)", output.with_name(output.name + ".data")),
              *_report_writes(report_path)]
    reads = [*reads_of_model(args.input, writes=writes), *_data_reads(args.calib, "calibration data"),
             *_data_reads(args.val, "evaluation data"), *_config_reads(args)]
    check_paths(reads, writes)
    if getattr(args, "default_note", None) and not args.quiet:
        print(f"onnxadmm: {args.default_note}", file=sys.stderr)
    run = search if config.method == "auto" else compress
    result = run(args.input, args.calib, config, validate_config, evaluation=args.val, progress=Progress(args.quiet))
    with OutputSet() as outputs:
        result.stage(outputs, output)
        _stage_reports(outputs, result.report, report_path)
        outputs.commit()
    _print_summary(result.report, report_path)
    return EXIT_OK if result.passed else EXIT_GATE


def run_validate(args) -> int:
    from .api import validate

    _, validate_config = _configs(args, with_compress=False)
    report_path = _report_path(args, None)
    writes = _report_writes(report_path)
    reads = [*reads_of_model(args.original, "original model", writes),
             *reads_of_model(args.compressed, "compressed model", writes),
             *_data_reads(args.data, "evaluation data"), *_config_reads(args)]
    check_paths(reads, writes)
    report, passed = validate(args.original, args.compressed, args.data, validate_config, args.batch_size,
                              args.threads)
    if report_path:
        _write_reports(report, report_path)
    _print_summary(report, report_path)
    return EXIT_OK if passed else EXIT_GATE


def run_check(args) -> int:
    from .api import check

    config = from_mapping(CheckConfig, {"method": args.method, "nm": args.nm, "conv_groups": args.conv_groups,
                                        "exclude": [p for e in (args.exclude or []) for p in e.split(",") if p]},
                          "command line")
    report_path = _report_path(args, None)
    writes = _report_writes(report_path)
    check_paths(reads_of_model(args.input, writes=writes), writes)
    report = check(args.input, config)
    lines = [f"note: {note}" for note in report.notes]
    lines.append(f"{len(report.compressible)} compressible layers for --method {config.method}, "
                 f"{len(report.declined)} declined")
    for row in report.compressible:
        lines.append(f"  + {row.name} ({row.op_type} {'x'.join(map(str, row.weight_shape))}, "
                     f"activation {row.activation})")
    for row in report.declined:
        lines.append(f"  - {row.name} ({row.op_type}): {row.reason}")
    for op in report.unsupported_ops:
        lines.append(f"  onnx2torch has no converter for {op['domain']}::{op['op_type']} at opset {op['opset']} "
                     f"(first: {op['first_node']}); only matters inside a layer's activation")
    lines.append(f"--method {config.method} would:")
    lines.extend(f"  {line}" for line in report.method_preview)
    estimate = report.estimate
    if estimate.get("macs_per_sample") is not None:
        lines.append(f"  MACs per sample: {estimate['macs_per_sample']:,}; parameters: {estimate['params']:,}")
    else:
        lines.append(f"  MACs/params not estimated: {estimate.get('reason')}")
    if report_path:
        _write_reports(report, report_path)
    _emit(lines)
    if not report.passed:
        print(f"onnxadmm: {report.verdict}", file=sys.stderr)
        return EXIT_INPUT
    return EXIT_OK


def _search_lines(search: dict) -> list[str]:
    """The frontier as a short table: every candidate, by cost."""
    lines = [f"search ({search['cost']}, gate {search['gate']}): {len(search['candidates'])} candidates in "
             f"{search['search_s']:.0f} s"]
    rows = sorted(search["candidates"], key=lambda r: (r["cost_ratio"] is None, r["cost_ratio"] or 0))
    for row in rows:
        cost = "   -  " if row["cost_ratio"] is None else f"{row['cost_ratio']:6.3f}"
        drop = "" if row["accuracy_drop_pt"] is None else f"drop {row['accuracy_drop_pt']:5.2f} pt  "
        agree = "" if row["agreement"] is None else f"agreement {row['agreement']:.4f}  "
        mark = "*" if row["chosen"] else ("f" if row["on_frontier"] else " ")
        lines.append(f"  {mark} {cost}  {drop}{agree}{'holds ' if row['passed'] else 'missed'}  {row['label']}"
                     + (f"  ({row['note']})" if row["note"] and not row["passed"] else ""))
    if search.get("side_by_side"):
        timing = search["side_by_side"]
        if "skipped" in timing:
            lines.append(f"  {timing['skipped']}")
        else:
            each = ", ".join(f"{c['label']} {c['side_by_side']:.3f} (own run {c['own_run']:.3f})"
                             for c in timing["candidates"])
            lines.append(f"  timed again side by side (batch {timing['batch']}, {timing['rounds']} rounds): {each}")
    lines.append(f"  chosen: {search['chosen']}" if search["held"] else f"  {search['reason']}")
    if search.get("within_noise"):
        lines.append(f"  {search['within_noise']}")
    return lines


def _print_summary(report, report_path: Path | None) -> None:
    """``report``: a ``CompressReport`` or ``ValidateReport``."""
    v = report.validation
    compress = report.kind == "compress"
    lines = _search_lines(report.search) if compress and report.search else []
    quant = report.plan.get("quantization") if compress else None
    if compress and report.config.method != "none":
        t = report.totals
        kept = t.layers_kept_dense
        lines.append(f"compressed {t.layers_compressed} layers"
                     + (f", {kept} kept dense (refit where compressed layers changed their inputs)" if kept else "")
                     + f", {t.layers_declined} declined; sparsity {t.sparsity:.3f}; nonzero layer weights "
                     f"{t.nonzero_reduction_x:.2f}x fewer")
    if quant:
        fusion = quant["fusion"]
        solved = quant["layers"]
        rounded = sum(r["error_projected"] for r in solved) / max(len(solved), 1)
        final = sum(r["error_final"] for r in solved) / max(len(solved), 1)
        precision = quant.get("precision", "int8")
        lines.append(f"{precision}: {len(solved)} layers' weights solved onto the {precision} grid (mean layer error "
                     f"{rounded:.2e} rounded -> {final:.2e} solved); "
                     + (f"{len(fusion['integer'])} of {len(fusion['integer']) + len(fusion['float'])} Conv/Gemm/"
                        "MatMul run as integer kernels in onnxruntime here" if precision == "int8" else
                        "stored as int4, run in float"))
        if quant.get("form_probe") or quant.get("held_out_output_error"):
            from .report.markdown import form_choice_line

            lines.append(form_choice_line(quant))
        if quant.get("smoothing"):
            from .report.markdown import smoothing_line

            lines.append(smoothing_line(quant["smoothing"]))
        if quant.get("float_fallback"):
            from .report.markdown import fallback_line

            lines.append(fallback_line(quant["float_fallback"]))
        if quant.get("refinement"):
            from .report.markdown import grid_refinement_line

            lines.append(grid_refinement_line(quant["refinement"]))
    c = v.comparison
    where = f"{c.samples} {'held-out' if v.held_out else 'calibration (not held-out)'} samples"
    if c.accuracy_original is not None:
        low, high = c.accuracy_drop_interval_pt
        lines.append(f"top-1 {100 * c.accuracy_original:.2f}% -> {100 * c.accuracy_compressed:.2f}% "
                     f"(drop {c.accuracy_drop_pt:.2f} pt; 95 % interval {low:.2f} to {high:.2f} pt) on {where}")
    if c.agreement is not None:
        low, high = c.agreement_interval
        lines.append(f"top-1 agreement with the original: {c.agreement:.4f} (95 % interval {low:.4f}-{high:.4f}) "
                     f"on {where}")
    for out in c.outputs[1:]:  # the first output is the one top-1 is taken from
        if out.sample_cosine is not None:
            lines.append(f"output {out.name!r}: mean per-sample cosine with the original {out.sample_cosine:.4f}")
    lines.extend(v.gains)
    for gate in v.gates:
        lines.append(f"gate {gate.name}: {'PASS' if gate.passed else 'FAIL'} — {gate.detail}")
    platform = report.platform_check
    if platform:
        for row in platform["models"]:
            verdict = (f"int8: top-1 same as x86 on {row['top1_same_as_x86']:.4f} of samples "
                       f"({'PASS' if row['passed'] else 'FAIL'})" if row.get("int8") else
                       f"{'within' if row['within_fp32_tolerance'] else 'OUTSIDE'} fp32 tolerance")
            lines.append(f"{platform['platform']}: {row['model']} max |diff| vs x86 {row['max_abs_diff_vs_x86']:.2e} "
                         f"(max |output| {row['max_abs_output']:.3g}), {verdict}; top-1 "
                         f"agreement with the x86 original {row['top1_agreement_with_original_x86']:.4f} "
                         f"on {platform['samples']} samples")
        lines.append(f"platform check: {'PASS' if platform['passed'] else 'FAIL'} ({platform['note']})")
    if report_path:
        lines.append(f"report: {report_path} (+ {_markdown_path(report_path).name})")
    _emit(lines)


def _emit(lines: list[str]) -> None:
    """Print the summary. A closed stdout (``| head``) does not turn a finished run into a failure."""
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail either
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # an ASCII-only or odd terminal never fails a run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="onnxadmm: %(message)s")
    runner = {"compress": run_compress, "validate": run_validate, "check": run_check}[args.command]
    with _SignalsHandled() as handled:
        try:
            return runner(args)
        except OnnxAdmmError as exc:
            if getattr(args, "debug", False):
                traceback.print_exc()
            kind = "config error" if isinstance(exc, ConfigError) else "error"
            _error(f"onnxadmm: {kind}: {exc}")
            return exc.exit_code
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
            handled.swallow_repeats()
            _error(f"onnxadmm: {_signal_cause(signum)}; no partial output is left and temporary files were "
                   "removed")
            return 128 + signum
        except Exception as exc:  # noqa: BLE001 - the last line of defence maps to exit 4
            if getattr(args, "debug", False):
                traceback.print_exc()
            if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:  # the machine's disk, not a bug
                where = f": {exc.filename}" if exc.filename else ""
                _error(f"onnxadmm: error: the disk refused a write ({exc.strerror}{where}); free space there or "
                       f"point TMPDIR (now {tempfile.gettempdir()}) at another disk; no partial output is left")
                return EXIT_INPUT
            _error(f"onnxadmm: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                   "traceback; please report it)")
            return EXIT_INTERNAL


def _error(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        pass


def _signal_cause(signum: int) -> str:
    return {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)",
            signal.SIGHUP: "hung up (SIGHUP)"}.get(signum, f"signal {signum}")


class _SignalsHandled:
    """SIGTERM and SIGHUP raise ``Terminated`` (SIGINT raises KeyboardInterrupt), so the ``finally`` blocks
    clean up as on Ctrl-C. A watchdog thread learns of the signal through the wakeup fd even while the main
    thread is inside a long onnxruntime or torch call (where Python cannot run the handler); if the main
    thread has not finished ``GRACE_S`` later, it removes every registered temporary path and exits
    128 + signal number."""

    GRACE_S = 5.0

    def __enter__(self):
        self.active = threading.current_thread() is threading.main_thread()
        if not self.active:
            return self
        self.previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous_wakeup = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.watchdog = threading.Thread(target=self._watch, name="onnxadmm-signal-watchdog", daemon=True)
        self.watchdog.start()
        return self

    def _watch(self) -> None:
        while True:
            data = os.read(self.read_fd, 1)
            if not data or data[0] == 0:  # closed, or the stop byte written by __exit__
                return
            signum = data[0]
            if signum not in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                continue
            time.sleep(self.GRACE_S)
            scratch.remove_all()
            os.write(2, f"onnxadmm: {_signal_cause(signum)}; the run did not stop within {self.GRACE_S:.0f} s "
                        "(inside onnxruntime or torch), so temporary files were removed and it was ended; no "
                        "partial output is left\n".encode())
            os._exit(128 + signum)

    def swallow_repeats(self) -> None:
        """After the first signal: a repeated or still-pending one must not interrupt the cleanup and the exit
        code (an unhandled second KeyboardInterrupt would end the process by the signal itself)."""
        if self.active:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self.previous.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, _ignore)

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        time.sleep(0.01)  # let a pending signal reach its (ignoring) Python handler before handlers are restored
        signal.set_wakeup_fd(self.previous_wakeup)
        os.write(self.write_fd, b"\0")
        self.watchdog.join(timeout=1)
        os.close(self.write_fd)
        os.close(self.read_fd)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
