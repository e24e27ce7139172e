"""On the real pretrained models of ../shared/testbed (skipped when it is absent)."""

import json

import numpy as np
import pytest

from conftest import TESTBED, needs_testbed
from onnxadmm import CompressConfig, ValidateConfig, check, compress

pytestmark = [needs_testbed(), pytest.mark.testbed]


def preprocess(name: str, images: np.ndarray) -> np.ndarray:
    spec = json.loads((TESTBED / "manifest.json").read_text())[name]["preprocess"]
    mean = np.array([float(v) for v in str(spec["mean"]).split(",")], np.float32)
    std = np.array([float(v) for v in str(spec["std"]).split(",")], np.float32)
    x = (images.astype(np.float32) / float(spec["scale"]) - mean) / std
    return x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("name", ["lenet5_mnist", "resnet20_cifar10", "resnet56_cifar10",
                                  "efficientnet_lite0_imagenet"])
def test_every_testbed_model_is_fully_compressible(name):
    report = check(TESTBED / "models" / f"{name}.onnx")
    assert report["compressible"] and not report["declined"]


def test_lenet5_tenfold_fewer_weights_within_half_a_point():
    """Issue 2 bar: >= 10x fewer nonzero weights at <= 0.5 pt top-1 drop on the official test set."""
    train = np.load(TESTBED / "data" / "mnist_train10k.npz")
    test = np.load(TESTBED / "data" / "mnist_test.npz")
    calib = {"input": preprocess("lenet5_mnist", train["images"])}
    evaluation = {"input": preprocess("lenet5_mnist", test["images"]), "labels": test["labels"].astype(np.int64)}
    result = compress(TESTBED / "models" / "lenet5_mnist.onnx", calib, CompressConfig(sparsity=0.9),
                      ValidateConfig(labels="labels", latency_rounds=5), evaluation=evaluation)
    v = result.report["validation"]
    assert result.report["totals"]["nonzero_reduction_x"] >= 10.0
    assert v["accuracy_original"] == pytest.approx(0.9856, abs=1e-4)  # the test-bed's measured figure
    assert v["accuracy_drop_pt"] <= 0.5
