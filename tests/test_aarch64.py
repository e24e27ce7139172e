"""The aarch64 check: both models in the official aarch64 onnxruntime under qemu, outputs against x86.

The end-to-end cases carry the ``arm`` marker (they build the emulated environment once: root for
mmdebstrap, and the Debian / PyPI mirrors): ``python -m pytest -m arm``. The comparison logic runs by default.
"""

import numpy as np
import pytest

from conftest import ROOT, TESTBED, needs_testbed
from onnxadmm.validation.aarch64 import compare

BUNDLED = ROOT / "calibration"


def test_compare_accepts_fp32_noise_and_rejects_a_real_difference():
    rng = np.random.default_rng(0)
    x86 = [[rng.standard_normal((16, 10)).astype(np.float32)] for _ in range(2)]
    noisy = [[o[0] * (1 + 1e-6 * rng.standard_normal(o[0].shape)).astype(np.float32)] for o in x86]
    result = compare(x86, noisy, ["original", "compressed"])
    assert result["passed"] and all(r["within_fp32_tolerance"] for r in result["models"])
    assert "not measured" in result["note"]
    wrong = [noisy[0], [noisy[1][0] + 1e-2]]
    result = compare(x86, wrong, ["original", "compressed"])
    assert not result["passed"] and not result["models"][1]["within_fp32_tolerance"]
    assert result["models"][0]["within_fp32_tolerance"]


def _check(original, compressed, data, labels, samples):
    from onnxadmm import ValidateConfig
    from onnxadmm.api import validate

    config = ValidateConfig(labels=labels, platform="linux-aarch64", platform_samples=samples, latency_rounds=3)
    report, passed = validate(original, compressed, data, config)
    return report, passed


@pytest.mark.arm
def test_platform_check_on_the_bundled_lenet(tmp_path):
    from onnxadmm import CompressConfig, ValidateConfig, compress

    result = compress(BUNDLED / "lenet5_mnist.onnx", BUNDLED / "mnist_train1000.npz",
                      CompressConfig(sparsity=0.8, calib_samples=200), ValidateConfig(labels="labels"))
    result.save(tmp_path / "lenet.onnx")
    report, passed = _check(BUNDLED / "lenet5_mnist.onnx", tmp_path / "lenet.onnx",
                            BUNDLED / "mnist_train1000.npz", "labels", 64)
    check = report.platform_check
    assert passed and check["passed"] and check["emulated_machine"] == "aarch64"
    assert all(r["within_fp32_tolerance"] and r["top1_same_as_x86"] == 1.0 for r in check["models"])
    assert "latency" not in {k for r in check["models"] for k in r}


@pytest.mark.arm
@needs_testbed()
def test_platform_check_on_resnet20(tmp_path):
    """ResNet-20 channel-pruned (a physically different graph), checked on 32 CIFAR-10 images."""
    from onnxadmm import CompressConfig, compress
    from test_testbed import preprocess

    data = np.load(TESTBED / "data" / "cifar10_test.npz")
    x = preprocess("resnet20_cifar10", data["images"][:600])
    model = TESTBED / "models" / "resnet20_cifar10.onnx"
    result = compress(model, {"input": x[:300]}, CompressConfig(method="channel", target_macs=0.75))
    result.save(tmp_path / "resnet20.onnx")
    evaluation = {"input": x[300:], "labels": data["labels"][300:600].astype(np.int64)}
    np.savez(tmp_path / "eval.npz", **evaluation)
    report, passed = _check(model, tmp_path / "resnet20.onnx", tmp_path / "eval.npz", "labels", 32)
    check = report.platform_check
    assert check["passed"] and all(r["within_fp32_tolerance"] for r in check["models"])
    assert check["models"][0]["top1_agreement_with_original_x86"] == 1.0
    assert check["models"][1]["top1_same_as_x86"] == 1.0


@pytest.mark.arm
@needs_testbed()
def test_x86_avx2_check_finds_the_saturating_int8_model_and_reduced_range_fixes_it(tmp_path):
    """ResNet-20 int8 on an emulated AVX2 CPU without VNNI: 8-bit weights saturate the 16-bit sums there (the
    check fails, the fp32 original matches); 7-bit weights (--int8-reduce-range) compute the same as here."""
    from onnxadmm import CompressConfig, ValidateConfig, compress
    from onnxadmm.api import validate
    from test_testbed import preprocess

    data = np.load(TESTBED / "data" / "cifar10_test.npz")
    x = preprocess("resnet20_cifar10", data["images"][:400])
    model = TESTBED / "models" / "resnet20_cifar10.onnx"
    np.savez(tmp_path / "eval.npz", input=x[300:], labels=data["labels"][300:400].astype(np.int64))
    config = ValidateConfig(labels="labels", platform="linux-x86_64-avx2", platform_samples=100, latency_rounds=2)
    checks = {}
    for reduce_range in (False, True):
        result = compress(model, {"input": x[:300]}, CompressConfig(method="none", quantize="int8",
                                                                    int8_reduce_range=reduce_range))
        result.save(tmp_path / f"int8_{reduce_range}.onnx")
        report, _ = validate(model, tmp_path / f"int8_{reduce_range}.onnx", tmp_path / "eval.npz", config)
        checks[reduce_range] = report.platform_check
    for check in checks.values():
        assert check["models"][0]["within_fp32_tolerance"]  # the emulation itself computes fp32 right
        assert "Haswell" in check["emulated_machine"]
    assert not checks[False]["passed"] and checks[False]["models"][1]["top1_same_as_x86"] < 0.99
    assert "--int8-reduce-range" in checks[False]["note"]
    assert checks[True]["passed"] and checks[True]["models"][1]["max_abs_diff_vs_x86"] == 0.0
