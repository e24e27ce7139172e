"""The CI shell recipe of docs/ci.md (scripts/ci_compress.sh), end to end on the bundled LeNet-5."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

RECIPE = ROOT / "scripts" / "ci_compress.sh"


@pytest.fixture()
def job(tmp_path):
    data = np.load(ROOT / "calibration" / "mnist_train1000.npz")
    np.savez(tmp_path / "calib.npz", input=data["input"][:400])
    np.savez(tmp_path / "val.npz", input=data["input"][800:], labels=data["labels"][800:])
    shutil.copy(ROOT / "calibration" / "lenet5_mnist.onnx", tmp_path / "model.onnx")
    return tmp_path


def run_recipe(job: Path, **settings) -> subprocess.CompletedProcess:
    env = {**os.environ, "ONNXADMM_MODEL": str(job / "model.onnx"), "ONNXADMM_CALIB": str(job / "calib.npz"),
           "ONNXADMM_VAL": str(job / "val.npz"), "GITHUB_STEP_SUMMARY": str(job / "summary.md"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **settings}
    return subprocess.run(["sh", str(RECIPE)], env=env, capture_output=True, text=True, timeout=900)


def test_recipe_passes_publishes_the_summary_and_keeps_the_input(job):
    before = (job / "model.onnx").read_bytes()
    proc = run_recipe(job, ONNXADMM_ARGS="--objective size --latency-rounds 5",  # no method: the search
                      ONNXADMM_GATES="--max-accuracy-drop 1.5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (job / "model.onnx").read_bytes() == before
    out = job / "model.compressed.onnx"
    compress_report = json.loads(Path(f"{out}.compress.json").read_text())
    validate_report = json.loads(Path(f"{out}.validate.json").read_text())
    assert compress_report["passed"] and validate_report["passed"]
    assert validate_report["validation"]["accuracy_drop_pt"] <= 1.5 + 1e-9
    assert compress_report["search"]["held"] and compress_report["search"]["chosen"] != "int8"
    summary = (job / "summary.md").read_text()
    assert summary.count("# onnxadmm") == 2  # both reports in the job summary
    assert "```mermaid" in summary  # the frontier, drawn


def test_recipe_fails_the_job_on_a_missed_gate_but_writes_everything(job):
    proc = run_recipe(job, ONNXADMM_ARGS="--sparsity 0.99 --latency-rounds 3",
                      ONNXADMM_GATES="--min-agreement 1.0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = job / "model.compressed.onnx"
    assert out.exists() and Path(f"{out}.validate.json").exists()
    assert "FAIL" in proc.stdout and "# onnxadmm" in (job / "summary.md").read_text()


def test_recipe_stops_on_bad_input_with_its_exit_code(job):
    (job / "model.onnx").write_bytes(b"")
    proc = run_recipe(job)
    assert proc.returncode == 3 and "empty" in proc.stderr
    assert not (job / "model.compressed.onnx").exists()
