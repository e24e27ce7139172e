"""The command line in a subprocess: exit codes, messages, reports, input untouched, no partial output."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from models import samples_for, tiny_cnn

FAST = ["--latency-rounds", "3", "--sensitivity-samples", "8", "--admm-iterations", "10",
        "--sample-patches", "2048", "--quiet"]


def cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "onnxadmm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def workdir(tmp_path):
    model = tiny_cnn()
    onnx.save(model, str(tmp_path / "in.onnx"))
    feed = samples_for(model, 40)
    labels = np.random.default_rng(0).integers(0, 10, 40)
    np.savez(tmp_path / "calib.npz", input=feed["input"], labels=labels)
    return tmp_path


def test_compress_writes_model_and_reports(workdir):
    before = digest(workdir / "in.onnx")
    code, out, err = cli("compress", workdir / "in.onnx", workdir / "out.onnx", "--calib", workdir / "calib.npz",
                         "--calib-samples", "30", "--labels", "labels", "--sparsity", "0.5", *FAST)
    assert code == 0, err
    assert digest(workdir / "in.onnx") == before
    report = json.loads((workdir / "out.onnx.report.json").read_text())
    assert report["schema_version"] == "1.0" and report["passed"] is True
    assert report["validation"]["held_out"] is True and report["validation"]["samples"] == 10
    assert "# onnxadmm compress report" in (workdir / "out.onnx.report.md").read_text()
    assert "not latency" in out  # the honest gains statement
    assert f"compressed {report['totals']['layers_compressed']} layers, 0 declined" in out
    assert "agreement with the original" in out and "on 10 held-out samples" in out
    onnx.checker.check_model(onnx.load(str(workdir / "out.onnx")), full_check=True)


def test_compress_without_a_method_or_budget_writes_the_int8_model_and_says_so(workdir):
    flags = [f for f in FAST if f != "--quiet"]
    code, out, err = cli("compress", workdir / "in.onnx", workdir / "out.onnx", "--calib", workdir / "calib.npz",
                         "--labels", "labels", *flags)
    assert code == 0, err
    assert "no --method: int8 alone" in err and "int8: " in out
    report = json.loads((workdir / "out.onnx.report.json").read_text())
    assert report["config"]["method"] == "none" and report["config"]["quantize"] == "int8"
    ops = {n.op_type for n in onnx.load(str(workdir / "out.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    footprint = report["validation"]["footprint"]
    assert footprint["compressed"]["size_bytes"] < footprint["original"]["size_bytes"]


def test_channel_method_writes_a_smaller_faster_graph(workdir):
    code, out, err = cli("compress", workdir / "in.onnx", workdir / "out.onnx", "--calib", workdir / "calib.npz",
                         "--labels", "labels", "--method", "channel", "--target-macs", "0.7", *FAST)
    assert code == 0, err
    report = json.loads((workdir / "out.onnx.report.json").read_text())
    fp = report["validation"]["footprint"]
    assert fp["compressed"]["macs"] <= 0.7 * fp["original"]["macs"]
    assert report["plan"]["groups"] and "physically smaller" in out
    code, _, err = cli("compress", workdir / "in.onnx", workdir / "out2.onnx", "--calib", workdir / "calib.npz",
                       "--method", "channel", *FAST)
    assert code == 2 and "--target-macs" in err and not (workdir / "out2.onnx").exists()


def test_lowrank_sparse_method_writes_factor_pairs(workdir):
    code, out, err = cli("compress", workdir / "in.onnx", workdir / "out.onnx", "--calib", workdir / "calib.npz",
                         "--labels", "labels", "--method", "lowrank-sparse", "--sparse-structure", "rows",
                         "--rank-ratio", "0.25",
                         "--objective", "size", "--loss", "linear", *FAST)
    assert code == 0, err
    report = json.loads((workdir / "out.onnx.report.json").read_text())
    forms = report["plan"]["export_forms"]
    assert forms and all("Conv 1x1" in f or "Gemm" in f for f in forms.values())
    factored = [r for r in report["layers"] if "rank" in r]
    assert factored and all(r["inner"] == r["rank"] + r["merged_rows"] for r in factored)
    fp = report["validation"]["footprint"]
    assert fp["compressed"]["macs"] < fp["original"]["macs"] and "physically smaller" in out
    onnx.checker.check_model(onnx.load(str(workdir / "out.onnx")), full_check=True)
    code, _, err = cli("compress", workdir / "in.onnx", workdir / "out2.onnx", "--calib", workdir / "calib.npz",
                       "--labels", "labels", "--method", "lowrank-sparse", "--sparse-structure", "unstructured",
                       "--target-params", "0.5",
                       *FAST)
    assert code == 2 and "--objective size" in err and not (workdir / "out2.onnx").exists()


def test_missed_gate_exits_1_and_still_writes(workdir):
    code, out, _ = cli("compress", workdir / "in.onnx", workdir / "out.onnx", "--calib", workdir / "calib.npz",
                       "--labels", "labels", "--sparsity", "0.9", "--min-speedup", "10", *FAST)
    assert code == 1
    assert "FAIL" in out and (workdir / "out.onnx").exists()
    assert json.loads((workdir / "out.onnx.report.json").read_text())["passed"] is False


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity must be in"),
    (["--method", "sparce"], "invalid choice"),
    (["--exclude", "no_such_layer"], "matches no Conv/Gemm/MatMul"),
    (["--max-accuracy-drop", "1"], "needs labelled evaluation data"),
    (["--method", "lowrank", "--target-params", "0.01", "--objective", "size"], "cannot be met"),
    (["--method", "channel", "--target-macs", "0.7", "--sparsity", "0.5", "--rank-ratio", "0.5"], "--rank-ratio"),
])
def test_usage_errors_exit_2(workdir, args, message):
    np.savez(workdir / "unlabelled.npz", input=np.load(workdir / "calib.npz")["input"])
    code, _, err = cli("compress", workdir / "in.onnx", workdir / "out.onnx", "--calib",
                       workdir / "unlabelled.npz", *args, *FAST)
    assert code == 2, err
    assert message in err
    assert not (workdir / "out.onnx").exists()


def test_toml_unknown_key_suggests_the_right_one(workdir):
    (workdir / "c.toml").write_text("sparsty = 0.5\n")
    code, _, err = cli("compress", workdir / "in.onnx", workdir / "out.onnx", "--calib", workdir / "calib.npz",
                       "--config", workdir / "c.toml")
    assert code == 2 and "did you mean 'sparsity'" in err


def test_missing_calib_flag_is_a_usage_error(workdir):
    code, _, err = cli("compress", workdir / "in.onnx", workdir / "out.onnx")
    assert code == 2 and "--calib" in err


def bad_inputs(workdir):
    x = np.load(workdir / "calib.npz")["input"]
    np.savez(workdir / "nokey.npz", images=x)
    np.savez(workdir / "f64.npz", input=x.astype(np.float64))
    np.savez(workdir / "shape.npz", input=x[:, :, :6])
    nan = x.copy()
    nan[3, 0, 0, 0] = np.nan
    np.savez(workdir / "nan.npz", input=nan)
    (workdir / "trunc.onnx").write_bytes((workdir / "in.onnx").read_bytes()[:500])
    (workdir / "text.onnx").write_text("hello")


@pytest.mark.parametrize("model, calib, out, message", [
    ("missing.onnx", "calib.npz", "out.onnx", "not found"),
    ("text.onnx", "calib.npz", "out.onnx", "not"),
    ("trunc.onnx", "calib.npz", "out.onnx", "truncated"),
    ("in.onnx", "nokey.npz", "out.onnx", "no array for model input 'input'"),
    ("in.onnx", "f64.npz", "out.onnx", "dtype float64"),
    ("in.onnx", "shape.npz", "out.onnx", "axis 2 must be 12"),
    ("in.onnx", "nan.npz", "out.onnx", "NaN"),
    ("in.onnx", "calib.npz", "in.onnx", "is the input"),
    ("in.onnx", "calib.npz", "nofolder/out.onnx", "does not exist"),
])
def test_bad_input_exits_3_with_a_clear_message(workdir, model, calib, out, message):
    bad_inputs(workdir)
    before = digest(workdir / "in.onnx")
    code, _, err = cli("compress", workdir / model, workdir / out, "--calib", workdir / calib, *FAST)
    assert code == 3, err
    assert message in err
    assert digest(workdir / "in.onnx") == before
    if out == "out.onnx":
        assert not (workdir / "out.onnx").exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("folder", ["/proc", "readonly"])
def test_output_in_a_folder_that_cannot_be_written_exits_3(workdir, folder):
    if folder == "readonly":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; /proc covers the case")
        (workdir / folder).mkdir()
        (workdir / folder).chmod(0o555)
        folder = workdir / folder
    code, _, err = cli("compress", workdir / "in.onnx", f"{folder}/out.onnx", "--calib", workdir / "calib.npz",
                       "--labels", "labels", *FAST)
    assert code == 3 and "cannot write in output folder" in err


def test_check_lists_layers(workdir):
    code, out, _ = cli("check", workdir / "in.onnx")
    assert code == 0
    assert "5 compressible layers for --method none" in out and "MACs per sample" in out
    assert "int8 grid" in out  # what compress does without a method


def test_check_says_what_each_method_would_do(workdir):
    from onnxadmm import check
    from onnxadmm.config import CheckConfig

    reports = {m: check(workdir / "in.onnx", CheckConfig(method=m)) for m in ("channel", "grouped", "lowrank", "none",
                                                                              "auto")}
    preview = {m: r.method_preview for m, r in reports.items()}
    groups = reports["channel"].channel_groups
    assert preview["channel"][0].startswith(f"{sum(not g.declined for g in groups)} of {len(groups)} channel groups")
    assert "Conv pairs can become block-diagonal with 2 blocks" in preview["grouped"][0]
    layers = len(reports["lowrank"].compressible)
    assert sum(line.startswith("  + ") for line in preview["lowrank"]) == layers  # every layer, with its ranks
    assert "int8 grid" in preview["none"][0] and preview["auto"][1] == preview["channel"][0]
    from onnxadmm.report.markdown import render

    markdown = render(reports["lowrank"])  # what `check --report` writes beside the JSON
    assert markdown.startswith("# onnxadmm check report") and "```\n" + preview["lowrank"][0] in markdown
    assert all(f"| `{row.name}` |" in markdown for row in reports["lowrank"].compressible)
    code, out, _ = cli("check", workdir / "in.onnx", "--method", "grouped", "--conv-groups", "3")
    assert code == 0 and "with 3 blocks" in out
    code, _, err = cli("check", workdir / "in.onnx", "--conv-groups", "3")
    assert code == 2 and "--conv-groups applies to --method grouped" in err


def test_check_exits_3_when_nothing_is_compressible(tmp_path):
    from models import GraphBuilder

    b = GraphBuilder()
    model = b.model([("input", ["N", 4])], [b.node("Relu", ["input"])])
    onnx.save(model, str(tmp_path / "relu.onnx"))
    code, out, _ = cli("check", tmp_path / "relu.onnx")
    assert code == 3 and "0 compressible layers" in out


def test_validate_command_gates(workdir):
    code, _, err = cli("compress", workdir / "in.onnx", workdir / "out.onnx", "--calib", workdir / "calib.npz",
                       "--labels", "labels", "--sparsity", "0.3", *FAST)
    assert code == 0, err
    common = ["validate", workdir / "in.onnx", workdir / "out.onnx", "--data", workdir / "calib.npz",
              "--labels", "labels", "--latency-rounds", "3"]
    code, out, err = cli(*common, "--min-agreement", "0.5", "--report", workdir / "v.json")
    assert code == 0, err
    assert json.loads((workdir / "v.json").read_text())["kind"] == "validate"
    code, out, _ = cli(*common, "--max-accuracy-drop", "-0.0001")
    assert code == 2  # a negative limit is a config error
    code, out, _ = cli(*common, "--min-agreement", "1.0", "--min-speedup", "50")
    assert code == 1 and "FAIL" in out


@pytest.mark.parametrize("preset, expected", [({}, "30000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                              ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_importing_onnxadmm_bounds_openmp_spinning_unless_the_user_chose(preset, expected):
    """Set before torch loads, so torch's OpenMP threads sleep after 30,000 spin rounds (starving each other
    on shared cores otherwise); a wait policy or spin count the user set is left alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, onnxadmm; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, **preset}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(expected)
