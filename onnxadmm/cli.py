"""Command line: ``onnxadmm compress | validate | check``. The only module that prints.

Flags are generated from the config dataclasses' field metadata; a ``--config FILE.toml`` maps 1:1 to
the same fields and flags given on the command line win. Exit codes: 0 ok, 1 gate failed, 2 usage or
config error, 3 unsupported model or bad input, 4 internal error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import time
import traceback
import typing
from pathlib import Path

from . import __version__
from .config import CompressConfig, ValidateConfig, from_mapping, load_toml
from .errors import ConfigError, OnnxAdmmError

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, ``kill``) raised as an interrupt, so that temporary folders and partial
    outputs are removed by the same ``finally`` blocks as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


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
        help_text = f"{meta.get('help', '')} (default: {f.default!r})"
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
    v.add_argument("--batch-size", type=int, default=32, help="samples per onnxruntime call")
    v.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = all cores)")
    _common_output_flags(v)
    _add_config_flags(v, ValidateConfig)

    k = sub.add_parser("check", help="preflight: which layers would be compressed, which not and why")
    k.add_argument("input")
    k.add_argument("--method", default="sparse", help="method to check for (default sparse)")
    k.add_argument("--nm", default="2:4")
    k.add_argument("--exclude", action="append", default=None, help="node names, globs or op types")
    k.add_argument("--report", default=None, help="write the JSON report here (and .md beside it)")
    k.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


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

    return (merged(CompressConfig, base_c) if with_compress else None), merged(ValidateConfig, base_v)


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


def _write_reports(report: dict, path: Path) -> None:
    from .onnxio.save import check_output_path
    from .report.markdown import render
    from .report.schema import to_json

    check_output_path(path, None)
    path.write_text(to_json(report))
    path.with_suffix(".md").write_text(render(report))


def _report_path(args, default: Path | None) -> Path | None:
    return Path(args.report) if args.report else default


def run_compress(args) -> int:
    from .api import compress
    from .onnxio.save import check_output_path

    config, validate_config = _configs(args, with_compress=True)
    output = check_output_path(args.output, args.input)
    report_path = _report_path(args, output.with_name(output.name + ".report.json"))
    if report_path is not None:
        check_output_path(report_path, args.input)
    result = compress(args.input, args.calib, config, validate_config, evaluation=args.val,
                      progress=Progress(args.quiet))
    result.save(output)
    _write_reports(result.report, report_path)
    _print_summary(result.report, report_path)
    return EXIT_OK if result.passed else EXIT_GATE


def run_validate(args) -> int:
    from .api import validate

    _, validate_config = _configs(args, with_compress=False)
    report, passed = validate(args.original, args.compressed, args.data, validate_config, args.batch_size,
                              args.threads)
    report_path = _report_path(args, None)
    if report_path:
        _write_reports(report, report_path)
    _print_summary(report, report_path)
    return EXIT_OK if passed else EXIT_GATE


def run_check(args) -> int:
    from .api import check

    config = from_mapping(CompressConfig, {"method": args.method, "nm": args.nm,
                                           "exclude": [p for e in (args.exclude or []) for p in e.split(",") if p]},
                          "command line")
    report = check(args.input, config)
    print(f"{len(report['compressible'])} compressible layers, {len(report['declined'])} declined")
    for row in report["compressible"]:
        print(f"  + {row['name']} ({row['op_type']} {'x'.join(map(str, row['weight_shape']))}, "
              f"activation {row['activation']})")
    for row in report["declined"]:
        print(f"  - {row['name']} ({row['op_type']}): {row['reason']}")
    for op in report["unsupported_ops"]:
        print(f"  onnx2torch has no converter for {op['domain']}::{op['op_type']} at opset {op['opset']} "
              f"(first: {op['first_node']}); only matters inside a layer's activation")
    groups = report["channel_groups"]
    prunable = [g for g in groups if not g["declined"]]
    print(f"{len(prunable)} of {len(groups)} channel groups can lose channels (--method channel | l0-l21)")
    for g in groups:
        if g["declined"]:
            print(f"  = {g['name']} ({g['channels']} channels) stays whole: {g['declined']}")
    estimate = report["estimate"]
    if estimate.get("macs_per_sample") is not None:
        print(f"  MACs per sample: {estimate['macs_per_sample']:,}; parameters: {estimate['params']:,}")
    else:
        print(f"  MACs/params not estimated: {estimate.get('reason')}")
    if args.report:
        _write_reports(report, Path(args.report))
    if not report["compressible"]:
        print("onnxadmm: nothing can be compressed in this model", file=sys.stderr)
        return EXIT_INPUT
    return EXIT_OK


def _print_summary(report: dict, report_path: Path | None) -> None:
    v = report.get("validation") or {}
    lines = []
    if report.get("totals"):
        t = report["totals"]
        kept = t.get("layers_kept_dense", 0)
        lines.append(f"compressed {t['layers_compressed']} layers"
                     + (f", {kept} kept dense (refit to the compressed model's inputs)" if kept else "")
                     + f", {t['layers_declined']} declined; sparsity {t['sparsity']:.3f}; nonzero layer weights "
                     f"{t['nonzero_reduction_x']:.2f}x fewer")
    if v:
        if v.get("accuracy_original") is not None:
            lines.append(f"top-1 {100 * v['accuracy_original']:.2f}% -> {100 * v['accuracy_compressed']:.2f}% "
                         f"(drop {v['accuracy_drop_pt']:.2f} pt) on {v['samples']} "
                         f"{'held-out' if v['held_out'] else 'calibration (not held-out)'} samples")
        if v.get("agreement") is not None:
            lines.append(f"top-1 agreement with the original: {v['agreement']:.4f} on {v['samples']} "
                         f"{'held-out' if v['held_out'] else 'calibration (not held-out)'} samples")
        lines.extend(v.get("gains", []))
        for gate in v.get("gates", []):
            lines.append(f"gate {gate['name']}: {'PASS' if gate['passed'] else 'FAIL'} — {gate['detail']}")
    platform = report.get("platform_check")
    if platform:
        for row in platform["models"]:
            lines.append(f"{platform['platform']}: {row['model']} max |diff| vs x86 {row['max_abs_diff_vs_x86']:.2e} "
                         f"(max |output| {row['max_abs_output']:.3g}), "
                         f"{'within' if row['within_fp32_tolerance'] else 'OUTSIDE'} fp32 tolerance; top-1 "
                         f"agreement with the x86 original {row['top1_agreement_with_original_x86']:.4f} "
                         f"on {platform['samples']} samples")
        lines.append(f"platform check: {'PASS' if platform['passed'] else 'FAIL'} ({platform['note']})")
    if report_path:
        lines.append(f"report: {report_path} (+ {report_path.with_suffix('.md').name})")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="onnxadmm: %(message)s")
    runner = {"compress": run_compress, "validate": run_validate, "check": run_check}[args.command]
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return runner(args)
    except OnnxAdmmError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"onnxadmm: {kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        cause = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"onnxadmm: {cause}; no partial output is left and temporary files were removed", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001 - the last line of defence maps to exit 4
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"onnxadmm: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback; "
              "please report it)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
