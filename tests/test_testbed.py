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
    assert report.compressible and not report.declined


def test_lenet5_tenfold_fewer_weights_within_half_a_point():
    """Issue 2 bar: >= 10x fewer nonzero weights at <= 0.5 pt top-1 drop on the official test set."""
    train = np.load(TESTBED / "data" / "mnist_train10k.npz")
    test = np.load(TESTBED / "data" / "mnist_test.npz")
    calib = {"input": preprocess("lenet5_mnist", train["images"])}
    evaluation = {"input": preprocess("lenet5_mnist", test["images"]), "labels": test["labels"].astype(np.int64)}
    result = compress(TESTBED / "models" / "lenet5_mnist.onnx", calib, CompressConfig(sparsity=0.9),
                      ValidateConfig(labels="labels", latency_rounds=5), evaluation=evaluation)
    v = result.report.validation.comparison
    assert result.report.totals.nonzero_reduction_x >= 10.0
    assert v.accuracy_original == pytest.approx(0.9856, abs=1e-4)  # the test-bed's measured figure
    assert v.accuracy_drop_pt <= 0.5


def test_minilm_heads_and_neurons_slice_exactly():
    """MiniLM-L3 as exported: 3 attention-head groups (12 heads of 32) and 3 FFN groups (1,536 neurons); removing
    half of each from the graph computes what zeroing their output-projection / down-projection rows computes."""
    import onnx
    import onnxruntime as ort

    from onnxadmm.analysis.layers import find_layers
    from onnxadmm.export.channels import slice_channels
    from onnxadmm.methods.channels import channel_groups
    from onnxadmm.onnxio.normalize import normalize

    normalized = normalize(onnx.load(TESTBED / "models" / "minilm_l3_sentiment.onnx"))
    view = normalized.view()
    layers = find_layers(view).layers
    groups = [g for g in channel_groups(view, layers, layers) if not g.declined]
    assert sorted((g.channels, g.block) for g in groups) == [(384, 32)] * 3 + [(1536, 1)] * 3
    masked = onnx.ModelProto()
    masked.CopyFrom(normalized.model)
    inits = {t.name: t for t in masked.graph.initializer}
    keep = {}
    for group in groups:
        mask = np.repeat(np.arange(group.channels // group.block) % 2 == 0, group.block)
        keep[group.name] = mask
        weight = inits[view.nodes[group.consumers[0].node_index].input[1]]
        zeroed = onnx.numpy_helper.to_array(weight).copy()
        zeroed[~mask] = 0
        weight.CopyFrom(onnx.numpy_helper.from_array(zeroed, weight.name))
    sliced = slice_channels(normalized.model, groups, keep)
    data = np.load(TESTBED / "data" / "vader_movie2000_len64.npz")
    feed = {k: data[k][:16] for k in ("input_ids", "attention_mask")}
    want = ort.InferenceSession(masked.SerializeToString()).run(None, feed)
    got = ort.InferenceSession(sliced.SerializeToString()).run(None, feed)
    for a, b in zip(want, got):
        assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())
