#!/usr/bin/env python3
"""Benchmark onnxadmm on the test-bed models with their standard splits, baselines in the same run.

    python scripts/bench_testbed.py --suite sparse [--models lenet5_mnist,resnet20_cifar10,...]

Each model runs in its own process; inside it, every configuration (onnxadmm and the baselines) is
compressed and validated one after another with the same data, so ratios are comparable. Results go
to docs/bench/<suite>__<model>.json; docs/BENCHMARKS.md is re-rendered from every JSON there.
Latency ratios are A/B interleaved inside one process (original vs compressed); absolute times on a
shared 2-core machine are noisy and are not the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TESTBED = ROOT.parent / "shared" / "testbed"
RESULTS = ROOT / "docs" / "bench"
MODELS = ["lenet5_mnist", "resnet20_cifar10", "resnet56_cifar10", "efficientnet_lite0_imagenet"]


def _commit() -> str:
    """The checkout's short commit (+ "dirty" with uncommitted changes): which code measured a row."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        return git("rev-parse", "--short", "HEAD") + (" dirty" if git("status", "--porcelain", "onnxadmm") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


COMMIT = _commit()


# -- data: the test-bed's standard splits ----------------------------------------------------------
def preprocess(name: str, images: np.ndarray) -> np.ndarray:
    spec = json.loads((TESTBED / "manifest.json").read_text())[name]["preprocess"]
    mean = np.array([float(v) for v in str(spec["mean"]).split(",")], np.float32)
    std = np.array([float(v) for v in str(spec["std"]).split(",")], np.float32)
    x = (images.astype(np.float32) / float(spec["scale"]) - mean) / std
    return np.ascontiguousarray(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))


def standard_split(name: str) -> tuple[dict, dict, str]:
    """(calibration inputs, evaluation inputs + labels, description) as the test-bed README defines."""
    if name == "lenet5_mnist":
        train, test = np.load(TESTBED / "data/mnist_train10k.npz"), np.load(TESTBED / "data/mnist_test.npz")
        calib = {"input": preprocess(name, train["images"])}
        evaluation = {"input": preprocess(name, test["images"]), "labels": test["labels"].astype(np.int64)}
        return calib, evaluation, "calibration mnist_train10k (10,000); evaluation mnist_test (10,000)"
    if name.endswith("cifar10"):
        data = np.load(TESTBED / "data/cifar10_test.npz")
        keep = np.zeros(len(data["labels"]), bool)
        keep[::10] = True
        x = preprocess(name, data["images"])
        return ({"input": x[keep]}, {"input": x[~keep], "labels": data["labels"][~keep].astype(np.int64)},
                "calibration cifar10_test[::10] (1,000); evaluation the other 9,000")
    data = np.load(TESTBED / "data/imagenet_sample1000_224.npz")
    x = preprocess(name, data["images"])
    return ({"input": x[0::2]}, {"input": x[1::2], "labels": data["labels"][1::2].astype(np.int64)},
            "calibration imagenet_sample1000 even indices (500); evaluation odd indices (500)")


# -- memory --------------------------------------------------------------------------------------
class PeakRss:
    """Peak resident memory of this process while the block runs (sampled from /proc every 20 ms)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return self.peak / 2**20


# -- suites --------------------------------------------------------------------------------------
def sparse_suite(name: str) -> list[dict]:
    """Issue 2: unstructured ADMM vs magnitude and magnitude + least-squares refit, same per-layer levels."""
    levels = {"lenet5_mnist": [0.8, 0.9, 0.95], "resnet20_cifar10": [0.5, 0.7],
              "resnet56_cifar10": [0.5, 0.7], "efficientnet_lite0_imagenet": [0.3, 0.5]}[name]
    runs = []
    for level in levels:
        for solver in ("admm", "refit", "magnitude"):
            runs.append({"label": f"sparse {solver}", "group": f"sparsity {level}",
                         "config": {"method": "sparse", "sparsity": level, "solver": solver}})
    if name != "lenet5_mnist":
        runs.append({"label": "nm 2:4 admm", "group": "2:4", "config": {"method": "nm", "nm": "2:4"}})
        runs.append({"label": "nm 2:4 magnitude", "group": "2:4",
                     "config": {"method": "nm", "nm": "2:4", "solver": "magnitude"}})
    if name == "lenet5_mnist":
        for method in ("l1", "l0"):
            runs.append({"label": f"{method} admm", "group": "sparsity 0.9",
                         "config": {"method": method, "sparsity": 0.9}})
        runs.append({"label": "sparse admm, linear loss", "group": "sparsity 0.9",
                     "config": {"method": "sparse", "sparsity": 0.9, "loss": "linear"}})
        runs.append({"label": "sparse admm, uniform", "group": "sparsity 0.9",
                     "config": {"method": "sparse", "sparsity": 0.9, "uniform": True}})
    return runs


TARGETS: tuple[float, ...] = ()  # --targets: MACs targets of the channel suite instead of its defaults


REFINE = {"refine_epochs": 30}  # block-wise refinement rows (docs: README "Refinement")
DISTILL = {"distill_epochs": 30}  # whole-model distillation rows (docs: README "Refinement")


def channel_suite(name: str) -> list[dict]:
    """Issue 3: channel pruning at MACs targets; baselines in the same run: l1-norm filter pruning without
    reconstruction (Li et al. 2017) and l1-norm + least-squares refit; uniform vs allocated; l0 + l2,1 — every
    one at every target, on every model. EfficientNet-Lite0 (4-10 min a run here): block refinement and
    distillation at MACs 0.75 only."""
    runs = []
    large = name == "efficientnet_lite0_imagenet"
    for target in TARGETS or (0.75, 0.5, 0.35):
        for solver, label in (("admm", "channel admm"), ("refit", "l1-norm + LS refit"),
                              ("magnitude", "l1-norm (Li 2017)")):
            runs.append({"label": label, "group": f"MACs {target}",
                         "config": {"method": "channel", "target_macs": target, "solver": solver}})
        runs.append({"label": "channel admm, uniform", "group": f"MACs {target}",
                     "config": {"method": "channel", "target_macs": target, "uniform": True}})
        runs.append({"label": "l0-l21 admm (50% inside)", "group": f"MACs {target}",
                     "config": {"method": "l0-l21", "target_macs": target, "sparsity": 0.5}})
        if target == 0.75 and large and not TARGETS:  # what error compensation (dense refits) does here
            runs.append({"label": "channel admm, no dense refit", "group": f"MACs {target}",
                         "config": {"method": "channel", "target_macs": target, "refit_dense": False}})
        if not large or target == 0.75:  # block-wise refinement after the layer-wise solve
            runs.append({"label": "channel admm + block refine", "group": f"MACs {target}",
                         "config": {"method": "channel", "target_macs": target, **REFINE,
                                    **({"refine_block_layers": 3} if large else {})}})
        if target == 0.75 and large and not TARGETS:  # then whole-model distillation
            runs.append({"label": "channel admm + block refine + distill", "group": f"MACs {target}",
                         "config": {"method": "channel", "target_macs": target, **REFINE, "refine_block_layers": 3,
                                    **DISTILL}})
    if not TARGETS:
        for blocks in (2,) if large else (2, 4):  # every eligible pair, faster or not
            runs.append({"label": f"grouped (Changpinyo), {blocks} blocks", "group": f"{blocks} blocks",
                         "config": {"method": "grouped", "conv_groups": blocks, "objective": "size"}})
        runs.append({"label": "grouped (Changpinyo), 2 blocks, latency objective", "group": "2 blocks",
                     "config": {"method": "grouped", "conv_groups": 2}})  # only pairs measured faster
    return runs


def latency_suite(name: str) -> list[dict]:
    """Issue 3: what a latency target buys over a MACs target (docs/RUNTIME.md: widths off multiples of 16 run as
    slow as the next multiple); ADMM channel pruning only. A latency target is met on the measured graph
    (batch 1; one row at --latency-batch 8, as issue 3 asks for 1.5x at both), so its rows show what each
    speed costs in accuracy."""
    if name == "efficientnet_lite0_imagenet":  # issue 3's bar there: 1.25x (0.8); a run takes ~10 min
        return [{"label": "channel admm, latency target", "group": "latency 0.8",
                 "config": {"method": "channel", "target_latency": 0.8}}]
    runs = [{"label": "channel admm", "group": "MACs 0.65",
             "config": {"method": "channel", "target_macs": 0.65}},
            {"label": "channel admm, widths x16", "group": "MACs 0.65",
             "config": {"method": "channel", "target_macs": 0.65, "channel_multiple": 16}}]
    for target in (0.75, 0.67):
        runs.append({"label": "channel admm, latency target", "group": f"latency {target}",
                     "config": {"method": "channel", "target_latency": target}})
    runs.append({"label": "channel admm, latency target + block refine", "group": "latency 0.67",
                 "config": {"method": "channel", "target_latency": 0.67, **REFINE}})
    runs.append({"label": "channel admm, latency target + block refine + distill", "group": "latency 0.67",
                 "config": {"method": "channel", "target_latency": 0.67, **REFINE, **DISTILL}})
    runs.append({"label": "channel admm, latency target at batch 8 + block refine", "group": "latency 0.67",
                 "config": {"method": "channel", "target_latency": 0.67, "latency_batch": 8, **REFINE}})
    return runs


def lowrank_suite(name: str) -> list[dict]:
    """Issue 4: at equal nonzero parameters (--target-params 0.5 and 0.3), low-rank only, sparse only, L+S
    with an unstructured S and with a row-sparse S (merged into the pair), each with the loss through the
    activation and the linear loss; plain truncated SVD without data as the baseline; low-rank with the form
    per layer chosen between the pair and Tucker-2 (``--lowrank-form auto``). All at --objective size
    (the forms are priced in parameters). EfficientNet-Lite0 (4-11 min a run here): the loss through the
    activation only, no refinement row. ResNet-56 also at the latency objective: --target-latency 0.7 (issue
    4's bar) and 0.8 (within what factor pairs reach here)."""
    large = name == "efficientnet_lite0_imagenet"
    runs = []
    for target in TARGETS or (0.5, 0.3):
        group = f"params {target}"
        base = {"target_params": target}
        methods = [("low-rank", {"method": "lowrank", "objective": "size"}),
                   ("sparse", {"method": "sparse"}),
                   ("L+S unstructured S", {"method": "lowrank-sparse", "sparse_structure": "unstructured",
                                           "objective": "size"}),
                   ("L+S row S merged", {"method": "lowrank-sparse", "sparse_structure": "rows",
                                         "objective": "size"})]
        for label, config in methods:
            for loss in ("activation",) if large else ("activation", "linear"):
                runs.append({"label": f"{label}, {loss} loss", "group": group,
                             "config": {**base, **config, "loss": loss}})
        if not large:  # EfficientNet-Lite0's k×k convs are depthwise: no Tucker-2 form there
            runs.append({"label": "low-rank, pair or Tucker-2 (auto), activation loss", "group": group,
                         "config": {**base, "method": "lowrank", "objective": "size", "lowrank_form": "auto"}})
            runs.append({"label": "L+S row S merged, activation loss + block refine", "group": group,
                         "config": {**base, "method": "lowrank-sparse", "sparse_structure": "rows",
                                    "objective": "size", **REFINE}})
        runs.append({"label": "truncated SVD, no data", "group": group,
                     "config": {**base, "method": "lowrank", "objective": "size", "solver": "magnitude"}})
    if name == "resnet56_cifar10" and not TARGETS:
        for method in ("lowrank", "lowrank-sparse"):
            runs.append({"label": f"{method}, latency objective", "group": "latency 0.7",
                         "config": {"method": method, "target_latency": 0.7}})
        for target in (0.7, 0.75, 0.8):  # Tucker-2 triples where they are faster than the pair (docs/METHODS.md)
            runs.append({"label": "lowrank, pair or Tucker-2 (auto), latency objective", "group": f"latency {target}",
                         "config": {"method": "lowrank", "target_latency": target, "lowrank_form": "auto"}})
            if target > 0.7:
                runs.append({"label": "lowrank, pair or Tucker-2 (auto), latency objective + block refine",
                             "group": f"latency {target}", "config": {"method": "lowrank", "target_latency": target,
                                                                      "lowrank_form": "auto", **REFINE}})
        runs.append({"label": "lowrank, latency objective", "group": "latency 0.8",
                     "config": {"method": "lowrank", "target_latency": 0.8}})
        runs.append({"label": "lowrank, latency objective + block refine", "group": "latency 0.8",
                     "config": {"method": "lowrank", "target_latency": 0.8, **REFINE}})
    return runs


SUITES = {"sparse": sparse_suite, "channel": channel_suite, "latency": latency_suite, "lowrank": lowrank_suite}


# -- paired comparison: two compressed models on the same evaluation samples --------------------------
PAIRED = {  # suite -> (row A, row B) label pairs compared per group, where both rows carry correct_bits
    "lowrank": [("L+S unstructured S, activation loss", "sparse, activation loss"),
                ("L+S unstructured S, activation loss", "low-rank, activation loss"),
                ("L+S row S merged, activation loss", "low-rank, activation loss"),
                ("low-rank, activation loss", "low-rank, linear loss"),
                ("low-rank, pair or Tucker-2 (auto), activation loss", "low-rank, activation loss"),
                ("lowrank, pair or Tucker-2 (auto), latency objective", "lowrank, latency objective")],
    "channel": [("channel admm", "l1-norm + LS refit"),
                ("channel admm", "channel admm, uniform"),
                ("l0-l21 admm (50% inside)", "l1-norm + LS refit"),
                ("channel admm + block refine + distill", "channel admm + block refine")],
    "latency": [("channel admm, latency target", "channel admm, latency target, table timed alone"),
                ("channel admm, latency target + block refine",
                 "channel admm, latency target, table timed alone + block refine"),
                ("channel admm, latency target + block refine + distill",
                 "channel admm, latency target + block refine")],
}


def correct_bits(model, evaluation: dict, batch_size: int = 250) -> str:
    """Which evaluation samples the model classifies right (top-1 of its first output), packed as hex."""
    from onnxadmm.onnxio.runtime import session

    sess = session(model, 2)
    inputs = {k: v for k, v in evaluation.items() if k != "labels"}
    count = len(evaluation["labels"])
    top1 = np.concatenate([np.asarray(sess.run(None, {k: v[i:i + batch_size] for k, v in inputs.items()})[0])
                           .reshape(min(batch_size, count - i), -1).argmax(1) for i in range(0, count, batch_size)])
    return np.packbits(top1 == evaluation["labels"]).tobytes().hex()


def mcnemar(bits_a: str, bits_b: str, count: int) -> tuple[int, int, float]:
    """(samples only A gets right, only B gets right, exact two-sided McNemar p-value): under H0 (equal
    accuracy) each discordant sample is A's with probability 1/2, p = min(1, 2·P[Bin(n, ½) ≤ min(a, b)])."""
    from onnxadmm.cost.timing import sign_test_p

    a = np.unpackbits(np.frombuffer(bytes.fromhex(bits_a), np.uint8))[:count].astype(bool)
    b = np.unpackbits(np.frombuffer(bytes.fromhex(bits_b), np.uint8))[:count].astype(bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    return only_a, only_b, sign_test_p(only_a, only_a + only_b)


def paired_lines(suite: str, rows: list[dict]) -> list[str]:
    """A table of the suite's paired comparisons (``PAIRED``) for every group where both rows were measured
    with correct_bits; its p-value says whether a top-1 difference is more than evaluation-sample noise."""
    found = {(r["label"], r["group"]): r for r in rows if r.get("correct_bits")}
    lines = []
    for group in dict.fromkeys(r["group"] for r in rows):
        for label_a, label_b in PAIRED.get(suite, []):
            a, b = found.get((label_a, group)), found.get((label_b, group))
            if a is None or b is None or a.get("evaluated") != b.get("evaluated"):
                continue
            only_a, only_b, p = mcnemar(a["correct_bits"], b["correct_bits"], a["evaluated"])
            lines.append(f"| {group} | {label_a} | {label_b} | {100 * (a['top1'] - b['top1']):+.2f} | "
                         f"{only_a} | {only_b} | {p:.3g} |")
    if not lines:
        return []
    return ["Paired on the same evaluation samples (exact McNemar test; p ≥ 0.05: the top-1 difference is "
            "within what the evaluation sample explains):", "",
            "| group | A | B | A − B top-1 pt | only A right | only B right | p |", "|---|---|---|---|---|---|---|",
            *lines, ""]


def run_model(suite: str, name: str, only: str | None) -> dict:
    from onnxadmm import CompressConfig, ValidateConfig, compress
    from onnxadmm.errors import ConfigError

    import onnx

    from onnxadmm.cost.timing import measure

    calib, evaluation, split = standard_split(name)
    model = TESTBED / "models" / f"{name}.onnx"
    model_proto = onnx.load(str(model))
    rows = []
    levels_by_group: dict[str, dict] = {}
    for spec in SUITES[suite](name):
        if only and not any(part in f"{spec['label']} @ {spec['group']}" for part in only.split(";")):
            continue
        config = CompressConfig(**spec["config"])
        validate = ValidateConfig(labels="labels", latency_batch_sizes=(1, 8), latency_rounds=20)
        started = time.perf_counter()
        with PeakRss() as rss:
            try:
                result = compress(model, calib, config, validate, evaluation=evaluation)
            except ConfigError as exc:  # a target this model cannot meet: a row that says so
                rows.append({"label": spec["label"], "group": spec["group"], "config": spec["config"],
                             "error": str(exc)})
                print(f"[{name}] {spec['label']:<28} {spec['group']:<14} {exc}", flush=True)
                continue
        wall = time.perf_counter() - started
        report = result.report.as_dict()  # as the JSON report has it
        one_thread = [measure(model_proto, result.model, {"input": evaluation["input"][:size]}, 20, 1)
                      for size in (1, 8)] if suite in ("channel", "latency", "lowrank") else []
        levels = {r["name"]: r["target_level"] for r in report["layers"]}
        key = json.dumps({k: v for k, v in spec["config"].items() if k != "solver"}, sort_keys=True)
        if config.solver == "admm":
            levels_by_group[key] = levels
        same_levels = None if config.solver == "admm" else levels_by_group.get(key) == levels
        v = report["validation"]
        fa, fb = v["footprint"]["original"], v["footprint"]["compressed"]
        rows.append({
            "label": spec["label"], "group": spec["group"], "config": spec["config"],
            "sparsity": report["totals"]["sparsity"], "nonzero_reduction_x": report["totals"]["nonzero_reduction_x"],
            "top1_original": v["accuracy_original"], "top1": v["accuracy_compressed"],
            "drop_pt": v["accuracy_drop_pt"], "agreement": v["agreement"],
            "size_raw": fb["size_bytes"], "size_zip": fb["zipped_bytes"], "size_zip_original": fa["zipped_bytes"],
            "macs_ratio": fb["macs"] / fa["macs"], "params_ratio": fb["params"] / fa["params"],
            "nonzero_params_ratio": fb["nonzero_params"] / fa["nonzero_params"],
            "latency": [{"batch": l["batch_size"], "threads": l["threads"], "ratio": l["ratio_median"],
                         "p10": l["ratio_p10"], "p90": l["ratio_p90"]}
                        for l in v["latency"] + [o.as_dict() for o in one_thread]],
            "compress_s": report["timing"]["compress_s"], "wall_s": wall, "peak_rss_mb": rss.mb,
            "same_levels_as_admm": same_levels, "declined": len(report["declined"]),
            "measured": f"{time.strftime('%Y-%m-%d')} {COMMIT}",
            "evaluated": len(evaluation["labels"]), "correct_bits": correct_bits(result.model, evaluation),
            "distillation": {k: v for k, v in (report.get("distillation") or {}).items() if k != "trained"} or None,
        })
        print(f"[{name}] {spec['label']:<28} {spec['group']:<14} top1 {100 * v['accuracy_compressed']:.2f} "
              f"drop {v['accuracy_drop_pt']:.2f} agree {v['agreement']:.4f} t {report['timing']['compress_s']:.0f}s "
              f"rss {rss.mb:.0f}MB", flush=True)
    return {"suite": suite, "model": name, "split": split, "rows": rows,
            "command": " ".join(["python", "scripts/bench_testbed.py", "--suite", suite, "--models", name]),
            "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
            "date": time.strftime("%Y-%m-%d")}


# -- rendering -----------------------------------------------------------------------------------
def render() -> str:
    lines = ["# Benchmarks", "",
             "Measured on this project's shared 2-core x86-64 machine with `scripts/bench_testbed.py`; every "
             "table comes from one process per model (command under each table). Latency is the median of "
             "per-round ratios compressed/original, A/B interleaved in one process (2 threads, spinning off); "
             "`[p10–p90]` is the spread over rounds. Absolute times are noisy here; compare ratios. Some runs "
             "shared the two cores with other jobs (tests, other runs): their compress times are inflated and a "
             "wide latency band (p90 well above the median) marks a disturbed measurement, not the model.", ""]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        if "suite" not in data:  # another script's results (bench_quant.py, bench_search.py)
            continue
        lines.append(f"## {data['suite']}: {data['model']}")
        lines.append("")
        top1 = next((r["top1_original"] for r in data["rows"] if "top1_original" in r), float("nan"))
        lines.append(f"Split: {data['split']}. Original top-1: {100 * top1:.2f} %. Date {data['date']}. "
                     "Rows without a commit in the last column come from earlier runs (partial reruns with "
                     "`--only` replace only their own rows).")
        lines.append("")
        settings = sorted({(l["batch"], l["threads"]) for r in data["rows"] for l in r.get("latency", [])},
                          key=lambda bt: (-bt[1], bt[0]))
        lines.append("| configuration | level | nonzero ↓× | params × | MACs × | top-1 % | drop pt | agreement | "
                     "zip MB (orig) | " + " | ".join(f"latency × b{b} t{t}" for b, t in settings) +
                     " | compress s | peak RSS MB | measured |")
        lines.append("|---" * (12 + len(settings)) + "|")
        for r in data["rows"]:
            if "error" in r:
                lines.append(f"| {r['label']} | {r['group']} | not met: {r['error']} |" + " |" * (9 + len(settings))
                             + f" {r.get('measured', '')} |")
                continue
            lat = {(l["batch"], l["threads"]): f"{l['ratio']:.2f} [{l['p10']:.2f}–{l['p90']:.2f}]"
                   for l in r["latency"]}
            lines.append(
                f"| {r['label']} | {r['group']} | {r['nonzero_reduction_x']:.2f} | {r.get('params_ratio', 1):.2f} | "
                f"{r['macs_ratio']:.2f} | {100 * r['top1']:.2f} | {r['drop_pt']:.2f} | {r['agreement']:.4f} | "
                f"{r['size_zip'] / 1e6:.2f} ({r['size_zip_original'] / 1e6:.2f}) | " +
                " | ".join(lat.get(bt, "—") for bt in settings) +
                f" | {r['compress_s']:.1f} | {r['peak_rss_mb']:.0f} | {r.get('measured', '')} |")
        lines.append("")
        lines.extend(paired_lines(data["suite"], data["rows"]))
        lines.append(f"Command: `{data['command']}`")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--suite", choices=sorted(SUITES), default="sparse")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--only", default=None, help="run only configurations whose 'label @ group' contains one of these "
                                                         "';'-separated strings")
    parser.add_argument("--targets", default="", help="channel / lowrank suite: comma-separated MACs / params "
                                                      "targets instead of the suite's defaults")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--render-only", action="store_true", help="re-render docs/BENCHMARKS.md")
    args = parser.parse_args()
    global TARGETS
    TARGETS = tuple(float(t) for t in args.targets.split(",") if t)
    if not (TESTBED / "manifest.json").is_file():
        print(f"test-bed not found at {TESTBED}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.worker:
        result = run_model(args.suite, args.models, args.only)
        suffix = f"__targets-{args.targets.replace(',', '-')}" if args.targets else ""
        if args.targets:
            result["command"] += f" --targets {args.targets}"
        path = RESULTS / f"{args.suite}__{args.models}{suffix}.json"
        if args.only and path.is_file():  # a partial rerun replaces its rows in the earlier results
            earlier = json.loads(path.read_text())
            fresh = {(r["label"], r["group"]) for r in result["rows"]}
            result["rows"] = [r for r in earlier["rows"] if (r["label"], r["group"]) not in fresh] + result["rows"]
        path.write_text(json.dumps(result, indent=1))
        return 0
    if not args.render_only:
        for name in args.models.split(","):
            command = [sys.executable, __file__, "--suite", args.suite, "--models", name, "--worker",
                       "--targets", args.targets]
            if args.only:
                command += ["--only", args.only]
            subprocess.run(command, check=True)
    (ROOT / "docs" / "BENCHMARKS.md").write_text(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
