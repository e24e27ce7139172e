"""Calibration readers (sources and errors), the segment-by-segment stream, and layer sampling."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models import mlp, run, samples_for, tiny_cnn, token_mlp
from onnxadmm.analysis.layers import find_layers
from onnxadmm.calib.readers import SampleSet, evenly_spaced, open_samples, select
from onnxadmm.solve.problem import SampleSettings, sample_problem
from onnxadmm.calib.stream import COMPRESSED, ORIGINAL, ActivationStream
from onnxadmm.errors import CalibrationError
from onnxadmm.onnxio.graph import TensorType
from onnxadmm.onnxio.normalize import normalize

F32 = onnx.TensorProto.FLOAT
INPUTS = {"input": TensorType(F32, ("N", 3, 12, 12))}


def x(count=6, seed=0):
    return np.random.default_rng(seed).standard_normal((count, 3, 12, 12)).astype(np.float32)


def test_npz_with_labels(tmp_path):
    np.savez(tmp_path / "c.npz", input=x(), labels=np.arange(6))
    samples = open_samples(tmp_path / "c.npz", INPUTS, labels_key="labels")
    assert samples.num_samples == 6 and list(samples.labels) == list(range(6))


def test_folder_of_npz_and_npy_in_name_order(tmp_path):
    np.savez(tmp_path / "a.npz", input=x(2, 0))
    np.save(tmp_path / "b.npy", x(3, 1))
    samples = open_samples(tmp_path, INPUTS)
    assert samples.num_samples == 5
    np.testing.assert_array_equal(samples.arrays["input"][2:], x(3, 1))


def test_model_zoo_layout(tmp_path):
    for k in range(2):
        folder = tmp_path / f"test_data_set_{k}"
        folder.mkdir()
        (folder / "input_0.pb").write_bytes(numpy_helper.from_array(x(1, k), "input").SerializeToString())
    assert open_samples(tmp_path, INPUTS).num_samples == 2


def test_random_is_flagged_not_representative():
    samples = open_samples("random:5", {"input": TensorType(F32, ("N", 3, 4, 4))}, seed=3)
    assert samples.num_samples == 5 and not samples.representative
    again = open_samples("random:5", {"input": TensorType(F32, ("N", 3, 4, 4))}, seed=3)
    np.testing.assert_array_equal(samples.arrays["input"], again.arrays["input"])


def test_reader_protocol_and_iterables():
    class Reader:
        def __init__(self):
            self.items = iter([{"input": x(2, 0)}, {"input": x(1, 1)}])

        def get_next(self):
            return next(self.items, None)

    assert open_samples(Reader(), INPUTS).num_samples == 3
    assert open_samples(({"input": x(1, k)} for k in range(4)), INPUTS).num_samples == 4


@pytest.mark.parametrize("arrays, message", [
    ({"images": x()}, "no array for model input 'input'"),
    ({"input": x().astype(np.float64)}, "dtype float64.*float32"),
    ({"input": x()[:, :, :8]}, r"axis 2 must be 12"),
    ({"input": x()[0]}, "rank"),
    ({"input": np.full((2, 3, 12, 12), np.nan, np.float32)}, "NaN"),
    ({"input": np.zeros((0, 3, 12, 12), np.float32)}, "zero samples"),
    ({"input": x(), "extra": x()}, "not model inputs"),
])
def test_bad_calibration_names_the_input(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationError, match=message):
        open_samples(tmp_path / "bad.npz", INPUTS)


def test_pickled_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CalibrationError, match="pickled"):
        open_samples(tmp_path / "p.npz", INPUTS)


def test_too_few_samples_for_the_count():
    samples = SampleSet({"input": x(6)}, "mem")
    with pytest.raises(CalibrationError, match="only 6"):
        select(samples, 10)
    chosen, rest = select(samples, 3)
    assert chosen.num_samples == 3 and len(rest) == 3


def test_evenly_spaced_is_deterministic_and_spread():
    picked = evenly_spaced(100, 10)
    assert list(picked) == list(range(0, 100, 10))
    assert len(set(evenly_spaced(7, 5))) == 5


@pytest.mark.parametrize("budget", [1 << 30, 40_000])  # in memory, and spilling to disk
def test_stream_matches_a_full_run(budget):
    model = tiny_cnn()
    norm = normalize(model)
    view = norm.view()
    feed = samples_for(model, 10)
    samples = SampleSet(feed, "mem")
    stream = ActivationStream(view, samples, batch_size=4, memory_budget_bytes=budget)
    layers = find_layers(view).layers
    probe = onnx.ModelProto()
    probe.CopyFrom(norm.model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=l.input_name) for l in layers)
    full = dict(zip([o.name for o in probe.graph.output], run(probe, feed)))
    for layer in layers:
        stream.ensure([layer.input_name])
        got = np.concatenate([stream.get(ORIGINAL, layer.input_name, b) for b in range(stream.num_batches)])
        np.testing.assert_allclose(got, full[layer.input_name], rtol=1e-5, atol=1e-5)
    if budget < 1 << 20:
        assert stream.spilled_bytes > 0
    stream.close()


class _InterruptedSamples(SampleSet):
    """A sample set whose reading is interrupted (Ctrl-C, SIGTERM) after ``after`` batches."""

    def __init__(self, feed, after):
        super().__init__(feed, "mem")
        self.after = after

    def batches(self, batch_size):
        for index, batch in enumerate(super().batches(batch_size)):
            if index == self.after:
                raise KeyboardInterrupt
            yield batch


def test_an_interrupt_while_filling_the_stream_removes_what_it_spilled(tmp_path, monkeypatch):
    """The constructor already spills; interrupted there, no caller holds the stream to close it."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = tiny_cnn()
    view = normalize(model).view()
    with pytest.raises(KeyboardInterrupt):
        ActivationStream(view, _InterruptedSamples(samples_for(model, 40), after=6), 4, 40_000)
    assert list(tmp_path.iterdir()) == []


def test_spilling_names_its_folder_before_creating_it(tmp_path, monkeypatch):
    """An interrupt right after the folder appears leaves no folder behind (and ``close`` still works)."""
    from onnxadmm.calib.store import TensorStore

    store = TensorStore(budget_bytes=10, spill_dir=str(tmp_path))
    made = []
    real_mkdir = type(tmp_path).mkdir

    def mkdir_then_interrupt(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        made.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tmp_path), "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        for batch in range(3):
            store.put("t", batch, np.zeros(8, np.float32))
    monkeypatch.undo()
    assert len(made) == 1 and not made[0].exists()
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_stream_sees_compressed_weights_only_downstream():
    model = tiny_cnn()
    view = normalize(model).view()
    layers = find_layers(view).layers
    stream = ActivationStream(view, SampleSet(samples_for(model, 4), "mem"), 4, 1 << 30)
    stream.ensure([layers[1].input_name])
    before = stream.get(ORIGINAL, layers[1].input_name, 0)
    assert stream.get(COMPRESSED, layers[1].input_name, 0) is before  # shared until something differs
    zero = np.zeros_like(view.constant(layers[1].weight_name))
    stream.set_initializers({layers[1].weight_name: zero})
    stream.ensure([layers[3].input_name])
    assert layers[1].input_name not in stream.stores[ORIGINAL].names()  # no pending reader: evicted
    assert not np.allclose(stream.get(ORIGINAL, layers[3].input_name, 0), stream.get(COMPRESSED, layers[3].input_name, 0))


@pytest.mark.parametrize("builder", [lambda: mlp(trans_b=False, alpha=0.5, beta=2.0), token_mlp])
def test_the_conversion_check_reads_a_gemm_or_matmul_weight_in_place_and_still_catches_a_wrong_view(monkeypatch,
                                                                                                     builder):
    """The check converts the layer with its weight as the module's input (a multi-GB weight is not copied into
    the converted graph and module) and still refuses a patch view that is not the layer's."""
    from onnxadmm.bridge import torch_layer

    model = builder()
    view = normalize(model).view()
    samples = SampleSet(samples_for(model, 24), "mem")
    stream = ActivationStream(view, samples, 3, 1 << 30)
    converted = []
    convert = torch_layer._convert
    monkeypatch.setattr(torch_layer, "_convert", lambda *args: converted.append(convert(*args)) or converted[-1])
    for index, layer in enumerate(find_layers(view).layers):
        assert layer.op_type in ("Gemm", "MatMul")
        stream.ensure([layer.input_name, *layer.chain.side_inputs])
        w0 = layer.canonical(view.constant(layer.weight_name))
        settings = SampleSettings(max_patches=100, seed=0)
        sigma = torch_layer.activation_function(view, layer)
        sample_problem(stream, layer, index, w0, layer.canonical_bias(view), sigma, True, settings,
                       samples.num_samples)
        checked = converted[-1]
        assert all(t.numel() < w0.size for t in checked.state_dict().values())
        with pytest.raises(torch_layer.BridgeError, match="disagrees"):
            sample_problem(stream, layer, index, w0 * 1.01, layer.canonical_bias(view), sigma, True, settings,
                           samples.num_samples)


@pytest.mark.parametrize("builder", [tiny_cnn, token_mlp])
def test_sampled_problem_matches_the_real_layer_output(builder):
    model = builder()
    view = normalize(model).view()
    layers = find_layers(view).layers
    samples = SampleSet(samples_for(model, 24), "mem")
    stream = ActivationStream(view, samples, 3, 1 << 30)
    from onnxadmm.bridge.torch_layer import activation_function

    for index, layer in enumerate(layers):
        stream.ensure([layer.input_name, *layer.chain.side_inputs])
        w0 = layer.canonical(view.constant(layer.weight_name))
        problem = sample_problem(stream, layer, index, w0, layer.canonical_bias(view),
                                 activation_function(view, layer), True,
                                 SampleSettings(max_patches=100, seed=0), samples.num_samples)
        # verify_layer inside sample_problem compared with onnx2torch; here: sizes and determinism
        assert problem.x_hat.shape[1:] == (layer.groups, layer.in_features)
        assert 0 < problem.num_patches <= 100 + stream.num_batches
        ids = problem.sample_ids.numpy()  # the calibration sample of each patch (held-out refit choice)
        held = ids % 10 == 9  # stored last, so the held-out split takes views (algorithms/problem.py)
        assert ids.shape == (problem.num_patches,) and held.any() and held[np.argmax(held):].all()
        assert np.all(np.diff(ids[~held]) >= 0) and np.all(np.diff(ids[held]) >= 0)
        assert ids.min() >= 0 and ids.max() < samples.num_samples and len(np.unique(ids)) > 1
        if index == 0:  # the model input: each patch's values come from its own sample
            inputs = next(iter(samples_for(model, 24).values()))
            for patch, sample in zip(problem.x_hat.numpy(), ids):
                values = patch.reshape(-1)
                assert np.isin(values[values != 0], inputs[sample]).all()
        again = sample_problem(stream, layer, index, w0, layer.canonical_bias(view), None, True,
                               SampleSettings(max_patches=100, seed=0), samples.num_samples, verify=False)
        assert np.array_equal(problem.x_hat.numpy(), again.x_hat.numpy())
    stream.close()


@pytest.mark.parametrize("builder", [tiny_cnn, token_mlp])
def test_sampled_problem_is_the_same_from_spilled_batches(builder):
    """Batches read back from disk (read-only memory maps) give the same problem as batches held in memory,
    and sampling leaves the cached batches as they were."""
    from onnxadmm.bridge.torch_layer import activation_function

    model = builder()
    view = normalize(model).view()
    layers = find_layers(view).layers
    samples = SampleSet(samples_for(model, 24), "mem")
    streams = [ActivationStream(view, samples, 3, budget) for budget in (1 << 30, 4_000)]
    for index, layer in enumerate(layers):
        names = [layer.input_name, *layer.chain.side_inputs]
        problems, cached = [], []
        for stream in streams:
            stream.ensure(names)
            before = [np.array(stream.get(ORIGINAL, n, b)) for n in names for b in range(stream.num_batches)]
            w0 = layer.canonical(view.constant(layer.weight_name))
            problems.append(sample_problem(stream, layer, index, w0, layer.canonical_bias(view),
                                           activation_function(view, layer), True,
                                           SampleSettings(max_patches=100, seed=0), samples.num_samples))
            after = [stream.get(ORIGINAL, n, b) for n in names for b in range(stream.num_batches)]
            assert all(np.array_equal(a, b) for a, b in zip(before, after))
            cached.append(after)
        assert any(isinstance(a, np.memmap) for a in cached[1])  # the small budget really read from disk
        for field in ("x_hat", "y_ref", "sample_ids"):
            assert np.array_equal(getattr(problems[0], field).numpy(), getattr(problems[1], field).numpy())
    assert streams[1].spilled_bytes > 0
    for stream in streams:
        stream.close()


def test_a_model_input_without_a_batch_axis_is_refused_saying_so(tmp_path):
    unbatched = {"image": TensorType(F32, (3, 12, 12))}  # one image per run, as detectors export
    np.savez(tmp_path / "images.npz", image=x(4))
    with pytest.raises(CalibrationError, match=r"'image' of the model has no batch axis: it takes one sample"):
        open_samples(tmp_path / "images.npz", unbatched)
    batch_one = {"input": TensorType(F32, (1, 3, 12, 12))}  # a batch axis of 1: another message
    np.savez(tmp_path / "extra_axis.npz", input=x(4)[:, None])
    with pytest.raises(CalibrationError, match=r"rank 5\); the model expects rank 4"):
        open_samples(tmp_path / "extra_axis.npz", batch_one)


@pytest.mark.parametrize("builder", [tiny_cnn, token_mlp])
def test_input_second_moments_are_each_input_channel_s_mean_square(builder):
    """E[x_j²] per layer input channel, accumulated one sample at a time, equals the mean square over every
    position of the layer's input as onnxruntime computes it (conv channels, 3-D MatMul rows)."""
    from onnxadmm.onnxio.runtime import session_with_outputs
    from onnxadmm.plan.sensitivity import input_second_moments

    model = builder()
    view = normalize(model).view()
    layers = find_layers(view).layers
    samples = SampleSet(samples_for(model, 7), "mem")
    moments = input_second_moments(view, layers, samples, 3, 1)
    names = sorted({layer.input_name for layer in layers})
    values = dict(zip(names, session_with_outputs(view.model, names).run(names, samples.arrays)))
    for layer in layers:
        value = values[layer.input_name].astype(np.float64)
        axis = 1 if layer.op_type == "Conv" else value.ndim - 1
        per_channel = (np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis]) ** 2).mean(axis=0)
        taps = layer.in_features * layer.groups // len(per_channel)
        expected = np.repeat(per_channel, taps).reshape(layer.groups, layer.in_features)
        np.testing.assert_allclose(moments[layer.name], expected, rtol=1e-10)


def test_freed_memory_is_handed_back_once_the_process_has_grown_by_the_threshold(monkeypatch):
    from onnxadmm.calib import memory

    calls, resident = [], [1000]
    libc = type("Libc", (), {"malloc_trim": staticmethod(lambda pad: calls.append(pad) or resident.append(1100))})
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    monkeypatch.setattr(memory, "resident_bytes", lambda: resident[-1])
    freed = memory.FreedMemory(threshold_bytes=500)
    resident.append(1400)
    freed.release()  # grown by 400: left alone
    assert calls == []
    resident.append(1600)
    freed.release()  # by 600: trimmed, to 1100
    assert calls == [0]
    resident.append(1500)
    freed.release()  # by 400 since then
    assert calls == [0]


def test_freed_blocks_are_kept_for_reuse_between_releases():
    """After ``keep_freed_blocks``, freed temporaries' pages are reused by the next ones instead of being returned
    and faulted in again (with malloc's default policy, three 4 MB temporaries freed together are returned)."""
    import resource

    import torch

    from onnxadmm.calib import memory

    if memory._glibc() is None:
        pytest.skip("not glibc: malloc's policy is left as it is")
    memory.keep_freed_blocks()
    z, step = torch.randn(16384, 64), torch.randn(16384, 64)

    def temporaries():
        half, other = z * 0.5, step * 0.5
        return float((half + other)[0, 0])

    for _ in range(3):
        temporaries()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        temporaries()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 100 * 3 * 1024 // 20, faults  # fresh pages each time: 1,024 faults per temporary
