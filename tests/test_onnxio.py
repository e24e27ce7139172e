"""Loading (every bad-input case names the problem), normalization rewrites, atomic saving."""

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from models import GraphBuilder, run, samples_for, tiny_cnn
from onnxadmm.errors import BadInputError, ExportError, UnsupportedModelError
from onnxadmm.onnxio.graph import GraphView
from onnxadmm.onnxio.load import load_model
from onnxadmm.onnxio.normalize import normalize
from onnxadmm.onnxio.outputs import Use, check_paths, reads_of_model
from onnxadmm.onnxio.save import read_metadata, save_model_atomic, stamp_metadata


def save(model, path):
    onnx.save(model, str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_model(tmp_path / "nope.onnx")


def test_directory_as_model(tmp_path):
    with pytest.raises(BadInputError, match="is a directory"):
        load_model(tmp_path)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty"):
        load_model(tmp_path / "empty.onnx")


def test_not_onnx(tmp_path):
    (tmp_path / "text.onnx").write_text("definitely not a protobuf \xff\xfe")
    with pytest.raises(BadInputError, match="not"):
        load_model(tmp_path / "text.onnx")


def test_truncated_onnx(tmp_path):
    blob = tiny_cnn().SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(BadInputError, match="truncated|not"):
        load_model(tmp_path / "cut.onnx")


@pytest.mark.parametrize("escape", ["../outside.data", "ABSOLUTE"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, escape):
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save_model(tiny_cnn(), str(inner / "m.onnx"), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    (inner / "m.data").rename(tmp_path / "outside.data")
    location = str(tmp_path / "outside.data") if escape == "ABSOLUTE" else escape
    model = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (inner / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(BadInputError, match="outside the model's folder"):
        load_model(inner / "m.onnx")


def test_external_data_inside_the_folder_loads(tmp_path):
    model = tiny_cnn()
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    loaded = load_model(tmp_path / "m.onnx")
    assert len(loaded.model.graph.initializer) == len(model.graph.initializer)
    assert loaded.model.graph.initializer[0].data_location == TensorProto.DEFAULT


def test_opset_below_7_is_refused(tmp_path):
    b = GraphBuilder()
    y = b.node("Relu", ["input"])
    model = b.model([("input", ["N", 4])], [y], opset=6, ir_version=3)
    with pytest.raises(UnsupportedModelError, match="opset 6"):
        load_model(save(model, tmp_path / "old.onnx"))


def test_opset_newer_than_onnxruntime_is_refused(tmp_path):
    b = GraphBuilder()
    y = b.node("Relu", ["input"])
    model = b.model([("input", ["N", 4])], [y])
    model.opset_import[0].version = 99
    with pytest.raises(UnsupportedModelError, match="newer than this onnxruntime"):
        load_model(save(model, tmp_path / "new.onnx"))


def test_cycle_is_reported_with_a_node_name():
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match="cycle through node"):
        GraphView(model)


def test_dangling_input_is_reported():
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModelError, match="'adder'.*'ghost'.*dangling"):
        GraphView(model)


def legacy_model():
    """torch's legacy exporter style: Identity before the Conv bias, a Constant weight, a Clip without min."""
    b = GraphBuilder()
    w = b.const(b.weight(4, 3, 3, 3), "W")
    bias = b.node("Identity", [b.const(np.zeros(4, np.float32) + 0.1, "B")])
    weight_const = helper.make_node("Constant", [], ["wc"], name="",
                                    value=numpy_helper.from_array(b.weight(4, 4, 1, 1)))
    b.nodes.append(weight_const)
    y = b.node("Conv", ["input", w, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.node("Clip", [y, "", b.const(np.array(6, np.float32))])
    y = b.node("Conv", [y, "wc"], kernel_shape=[1, 1])
    return b.model([("input", ["N", 3, 6, 6])], [y])


def test_normalize_folds_weight_constants_and_fills_clip_bounds():
    model = legacy_model()
    norm = normalize(model)
    ops = [n.op_type for n in norm.model.graph.node]
    assert "Identity" not in ops and "Constant" not in ops
    clip = next(n for n in norm.model.graph.node if n.op_type == "Clip")
    assert all(clip.input[1:3])
    assert all(n.name for n in norm.model.graph.node)
    assert len({n.name for n in norm.model.graph.node}) == len(norm.model.graph.node)
    feed = samples_for(model, 4)
    np.testing.assert_allclose(run(model, feed)[0], run(norm.model, feed)[0], rtol=1e-6, atol=1e-6)
    assert model.graph.node[0].op_type == "Identity"  # the input proto is untouched


def test_normalize_keeps_value_info_of_the_original():
    model = tiny_cnn()
    norm = normalize(model)
    assert len(norm.model.graph.value_info) == len(model.graph.value_info)
    assert len(norm.inferred.graph.value_info) > 0


def test_save_is_atomic_and_refuses_the_input(tmp_path):
    model = tiny_cnn()
    source = save(model, tmp_path / "in.onnx")
    before = source.read_bytes()

    def check_output_path(out, model):
        check_paths(reads_of_model(model), [Use("output model", out)])

    with pytest.raises(ExportError, match="is the input"):
        check_output_path(source, source)
    os.link(source, tmp_path / "hardlink.onnx")
    with pytest.raises(ExportError, match="is the input"):
        check_output_path(tmp_path / "hardlink.onnx", source)
    with pytest.raises(ExportError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.onnx", source)
    with pytest.raises(ExportError, match="is a directory"):
        check_output_path(tmp_path, source)
    out = tmp_path / "out.onnx"
    stamp_metadata(model, {"version": "x", "seed": "3"})
    written = save_model_atomic(model, out)
    assert written == out.stat().st_size
    assert read_metadata(onnx.load(str(out))) == {"onnxadmm.version": "x", "onnxadmm.seed": "3"}
    assert source.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_metadata_merge_keeps_producer_entries():
    model = tiny_cnn()
    model.metadata_props.add(key="author", value="someone")
    stamp_metadata(model, {"version": "1"})
    stamp_metadata(model, {"version": "2"})
    props = {p.key: p.value for p in model.metadata_props}
    assert props == {"author": "someone", "onnxadmm.version": "2"}


def _corrupt(blob: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(blob)
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data[:cut] if cut else data)


@settings(max_examples=120, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=12),
       cut=st.one_of(st.none(), st.integers(1, 4000)))
def test_loader_never_raises_anything_but_a_clear_error_on_corrupted_bytes(tmp_path, edits, cut):
    """Randomly corrupted / truncated ModelProto bytes: either a model that loads and normalizes, or a
    BadInputError (exit 3) — never another exception, never a hang (hypothesis deadline)."""
    from onnxadmm.analysis.layers import find_layers
    from onnxadmm.onnxio.normalize import normalize

    path = tmp_path / "fuzz.onnx"
    path.write_bytes(_corrupt(FUZZ_SOURCE, edits, cut))
    try:
        loaded = load_model(path)
        find_layers(normalize(loaded.model).view())
    except BadInputError:
        pass


FUZZ_SOURCE = tiny_cnn().SerializeToString()


def test_shared_bias_is_unshared_so_both_layers_compress():
    """Exporters deduplicate equal tensors (fresh BatchNorm folds to equal biases): two convs reading one
    bias are both compressible after normalization, and the graph computes the same."""
    from onnxadmm.analysis.layers import find_layers

    b = GraphBuilder(3)
    bias = b.const(np.zeros(8, np.float32), "B")
    y = b.node("Conv", ["input", b.const(b.weight(8, 3, 3, 3), "W"), bias], kernel_shape=[3, 3], pads=[1] * 4)
    y = b.node("Conv", [b.node("Relu", [y]), b.const(b.weight(8, 8, 3, 3), "W"), bias], kernel_shape=[3, 3],
               pads=[1] * 4)
    model = b.model([("input", ["N", 3, 6, 6])], [y])
    assert len(find_layers(GraphView(model)).declined) == 2
    normalized = normalize(model)
    assert len(find_layers(normalized.view()).layers) == 2
    assert any("private copy" in r for r in normalized.rewrites)
    feed = samples_for(model, 2)
    assert np.allclose(run(normalized.model, feed)[0], run(model, feed)[0])


def test_footprint_of_a_model_over_the_protobuf_limit_is_measured_in_pieces(monkeypatch):
    """Over 2 GB a ModelProto cannot be serialized whole: size and zipped size come from the graph and
    each initializer in turn (checked here by lowering the limit), within zip framing of the whole blob."""
    from onnxadmm.onnxio import save
    from onnxadmm.cost import footprint as fp

    model = tiny_cnn()
    feed = samples_for(model, 1)
    whole = fp.footprint(model, feed, threads=1)
    monkeypatch.setattr(save, "PROTOBUF_LIMIT_BYTES", 10)  # every model counts as over the limit
    size, pieces = save.serialized_pieces(model)
    pieces = list(pieces)
    assert len(pieces) == 1 + len(model.graph.initializer)
    assert abs(size - whole.size_bytes) <= 6 * len(model.graph.initializer) and whole.size_bytes == model.ByteSize()
    pieced = fp.footprint(model, feed, threads=1)
    assert pieced.size_bytes == size
    assert abs(pieced.zipped_bytes - whole.zipped_bytes) <= 0.02 * whole.zipped_bytes
    assert (pieced.params, pieced.macs) == (whole.params, whole.macs)




def test_footprint_of_a_model_that_goes_through_files_is_zipped_in_pieces_with_its_exact_size(monkeypatch):
    """From the size at which models reach onnxruntime through files, the footprint zips the model initializer by
    initializer instead of serializing a copy of it: the size stays exact (under 2 GB), the zipped size within
    the framing of the initializers."""
    from onnxadmm.cost import footprint as fp
    from onnxadmm.onnxio import save

    model = tiny_cnn()
    feed = samples_for(model, 1)
    whole = fp.footprint(model, feed, threads=1)
    serialized = []  # initializers in each ModelProto serialized while the footprint sizes the model
    whole_bytes, observe_shapes = onnx.ModelProto.SerializeToString, fp.node_macs
    monkeypatch.setattr(fp, "FILES_FROM_BYTES", 10)
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString",
                        lambda self: serialized.append(len(self.graph.initializer)) or whole_bytes(self))
    monkeypatch.setattr(fp, "node_macs", lambda *args: serialized.append("sized") or observe_shapes(*args))
    pieced = fp.footprint(model, feed, threads=1)
    assert serialized[0] == 0 and serialized.index("sized") == 1  # the graph without its weights, then shapes
    assert pieced.size_bytes == whole.size_bytes == model.ByteSize()
    assert abs(pieced.zipped_bytes - whole.zipped_bytes) <= 8 * len(model.graph.initializer) + 64
    assert (pieced.params, pieced.macs) == (whole.params, whole.macs)
    assert save.serialized_pieces(model, 10)[0] == model.ByteSize()

def _zip_with_zipfile(pieces) -> int:
    """The zip zipfile streams (to an unseekable sink, as the footprint always counted it)."""
    import io
    import zipfile

    class Sink(io.RawIOBase):
        size = 0

        def writable(self):
            return True

        def write(self, data):
            self.size += len(data)
            return len(data)

    sink = Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        with archive.open("model.onnx", "w", force_zip64=True) as entry:
            for piece in pieces:
                entry.write(piece)
    return sink.size


def test_zipped_size_in_parallel_blocks_is_one_deflate_stream_of_the_input(monkeypatch):
    """Under one block the zipped size is exactly zipfile's; over several (pieces of any length crossing the
    block boundaries), the blocks join into one raw deflate stream that decompresses to the input, and the
    size stays within 64 bytes per block of zipfile's."""
    import zlib

    from onnxadmm.cost import footprint as fp

    rng = np.random.default_rng(0)
    weights = rng.standard_normal(300_000).astype(np.float32)
    weights[rng.random(weights.size) < 0.5] = 0.0
    blob = weights.tobytes()
    assert fp.zipped_size(blob) == _zip_with_zipfile([blob])
    assert fp.zipped_size(b"") == _zip_with_zipfile([b""])
    monkeypatch.setattr(fp, "DEFLATE_BLOCK_BYTES", 100_000)
    pieces = [blob[:1234], blob[1234:1234 + 250_000], blob[251_234:251_235], blob[251_235:]]
    assert zlib.decompress(b"".join(fp.deflated_blocks(pieces, threads=2)), -15) == blob
    blocks = -(-len(blob) // 100_000)
    assert 0 <= fp.zipped_size(pieces, threads=2) - _zip_with_zipfile([blob]) <= 64 * blocks
    assert fp.zipped_size(pieces, threads=1) == fp.zipped_size(blob, threads=2)

def test_models_over_the_protobuf_limit_are_saved_and_run_from_external_data_without_being_changed(
        tmp_path, monkeypatch):
    """Over 2 GB (simulated by lowering the limit): the atomic save writes external data tensor by tensor,
    sessions and their intermediate-output probes go through files, and the in-memory model is untouched."""
    from onnxadmm.onnxio import runtime
    from onnxadmm.onnxio import save

    model = tiny_cnn()
    before = model.SerializeToString()
    feed = samples_for(model, 3)
    expected = run(model, feed)[0]
    monkeypatch.setattr(save, "PROTOBUF_LIMIT_BYTES", 10)
    written = save.save_model_atomic(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    assert written == (tmp_path / "big.onnx").stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    reloaded = onnx.load(str(tmp_path / "big.onnx"))
    onnx.checker.check_model(reloaded, full_check=True)
    np.testing.assert_array_equal(run(reloaded, feed)[0], expected)
    sess = runtime.session(model, 1)
    np.testing.assert_array_equal(sess.run(None, feed)[0], expected)
    inner = model.graph.node[0].output[0]
    probe = runtime.session_with_outputs(model, [inner], 1)
    assert inner in [o.name for o in probe.get_outputs()]
    assert model.SerializeToString() == before


def test_fresh_names_never_meet_a_name_the_graph_has():
    from onnx import helper

    from onnxadmm.onnxio.graph import FreshNames

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r"),
                               helper.make_node("Relu", ["y"], ["w__onnxadmm_lowrank_out"], name="w__x")],
                              "g", [], [])
    fresh = FreshNames(graph)
    assert fresh.name("z") == "z" and fresh.name("z") == "z_2"  # handed out names are taken
    assert fresh.name("y") == "y_2" and fresh.name("r") == "r_2"
    stem = fresh.prefix("w__onnxadmm_lowrank")  # "…_out" exists: the stem itself must move
    assert stem == "w__onnxadmm_lowrank_2"


def test_large_models_reach_onnxruntime_through_files_with_the_same_results(monkeypatch):
    """Models from ``FILES_FROM_BYTES`` up are given to onnxruntime as a temporary file with external data (no
    in-memory serialization): with the threshold at 0, a whole compress through that path writes the model the
    in-memory path writes, byte for byte."""
    from onnxadmm import CompressConfig, ValidateConfig, compress
    from onnxadmm.onnxio import runtime

    model = tiny_cnn()
    feed = samples_for(model, 32)
    config = CompressConfig(sparsity=0.5, sensitivity_samples=8, admm_iterations=4, sample_patches=1024)
    in_memory = compress(model, feed, config, ValidateConfig(latency_rounds=1))
    calls = []
    through_files = runtime._session_from_files
    monkeypatch.setattr(runtime, "FILES_FROM_BYTES", 0)
    monkeypatch.setattr(runtime, "_session_from_files", lambda *a, **k: calls.append(1) or through_files(*a, **k))
    on_disk = compress(model, feed, config, ValidateConfig(latency_rounds=1))
    assert calls  # every session of the second run went through a file
    assert on_disk.model.SerializeToString() == in_memory.model.SerializeToString()
    assert on_disk.report.validation.comparison.outputs[0].cosine == in_memory.report.validation.comparison.outputs[0].cosine


def test_reaches_bytes_agrees_with_the_serialized_size_without_sizing_the_whole_model(monkeypatch):
    from onnxadmm.onnxio.save import reaches_bytes

    model = tiny_cnn()
    size = model.ByteSize()
    for limit in (1, size // 2, size - 64, size + 64, 10 * size):
        assert reaches_bytes(model, limit) == (size >= limit), limit
    # the initializers alone reach the limit: the model as a whole is never sized
    monkeypatch.setattr(onnx.ModelProto, "ByteSize", lambda self: pytest.fail("sized the whole model"))
    with pytest.raises(pytest.fail.Exception):
        model.ByteSize()
    assert reaches_bytes(model, size // 2)


@pytest.mark.parametrize("values", [np.arange(-3, 70000 * 3 - 3, dtype=np.float32).reshape(70000, 3),
                                    np.float32(2.5), np.array([0, 1.5, -0.0, 2], np.float16)])
def test_a_tensor_in_a_file_serializes_and_counts_in_blocks_as_when_it_is_read_whole(tmp_path, monkeypatch,
                                                                                      values):
    """The footprint reads a weight in a file a block at a time (a multi-GB tensor is never in memory whole)."""
    from onnxadmm.onnxio import weights

    monkeypatch.setattr(weights, "COPY_BLOCK_BYTES", 4096)
    values = np.asarray(values)
    values.tofile(tmp_path / "w.bin")
    tensor = weights.stub("w", helper.np_dtype_to_tensor_dtype(values.dtype), values.shape,
                          str(tmp_path / "w.bin"), 0, values.nbytes)
    pieces = list(weights.serialized(tensor))
    assert b"".join(pieces) == weights.inlined(tensor).SerializeToString()
    assert max(map(len, pieces)) <= 4096 + 64
    assert weights.count_nonzero(tensor) == np.count_nonzero(values)


def test_weights_in_external_data_stay_in_their_files_and_compress_to_the_same_model(tmp_path, monkeypatch):
    """A model read with external data keeps its large weights in the data file (mapped stubs, ``weights.py``);
    the solved weights go to a scratch file. The compressed weights are those of the same model compressed from one
    file, the output is written with external data, the input's files are unchanged, and the scratch file is gone
    with the result."""
    import gc
    import hashlib

    from onnxadmm import CompressConfig, ValidateConfig, compress, validate
    from onnxadmm.onnxio import weights

    monkeypatch.setattr(weights, "MAPPED_MIN_BYTES", 1024)  # the tiny CNN's convolutions and head
    model = tiny_cnn()
    feed = samples_for(model, 32)
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(tmp_path / "m.onnx"),
                    save_as_external_data=True, location="m.data", size_threshold=0)  # (converts what it is given)
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    loaded = load_model(tmp_path / "m.onnx")
    mapped = [t.name for t in loaded.model.graph.initializer if weights.is_mapped(t)]
    assert len(mapped) >= 3 and all(t.data_location == TensorProto.DEFAULT
                                    for t in loaded.model.graph.initializer if t.name not in mapped)
    view = GraphView(loaded.model)
    np.testing.assert_array_equal(view.constant(mapped[0]), numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == mapped[0])))

    config = CompressConfig(sparsity=0.5, sensitivity_samples=8, admm_iterations=4, sample_patches=1024)
    one_file = compress(model, feed, config, ValidateConfig(latency_rounds=1))
    from_files = compress(tmp_path / "m.onnx", feed, config, ValidateConfig(latency_rounds=1))
    kept = [t for t in from_files.model.graph.initializer if weights.is_mapped(t)]
    assert kept and len(from_files.weight_files) == 1
    assert all(weights.array(t).shape == tuple(t.dims) for t in kept)
    expected = {t.name: numpy_helper.to_array(t) for t in one_file.model.graph.initializer}
    for tensor in from_files.model.graph.initializer:
        np.testing.assert_array_equal(weights.array(tensor), expected[tensor.name], err_msg=tensor.name)
    assert from_files.report.validation.comparison.outputs[0].cosine == \
        one_file.report.validation.comparison.outputs[0].cosine

    (tmp_path / "out").mkdir()
    from_files.save(tmp_path / "out" / "c.onnx")
    written = onnx.load(str(tmp_path / "out" / "c.onnx"), load_external_data=False)
    assert sum(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer) == len(kept)
    assert all(entry.value == "c.onnx.data" for t in written.graph.initializer for entry in t.external_data
               if entry.key == "location")
    np.testing.assert_array_equal(run(onnx.load(str(tmp_path / "out" / "c.onnx")), feed)[0],
                                  run(one_file.model, feed)[0])
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir() if p.is_file()} == digests
    report, _ = validate(tmp_path / "m.onnx", tmp_path / "out" / "c.onnx", feed, ValidateConfig(latency_rounds=1))
    assert report.validation.comparison.outputs[0].cosine == one_file.report.validation.comparison.outputs[0].cosine

    scratch = from_files.weight_files[0].path
    assert scratch.exists()
    del from_files, kept
    gc.collect()
    assert not scratch.exists()


@pytest.mark.parametrize("settings", [
    dict(method="channel", target_macs=0.6, solver="magnitude"),
    dict(method="lowrank-sparse", target_params=0.5, objective="size", admm_iterations=4),
    dict(method="none", quantize="int8"),
    dict(sparsity=0.5, admm_iterations=4, quantize="int8"),
], ids=["channel", "lowrank", "int8", "sparse+int8"])
def test_every_method_compresses_a_model_with_weights_in_files_as_it_does_from_one_file(tmp_path, monkeypatch,
                                                                                       settings):
    from onnxadmm import CompressConfig, ValidateConfig, compress
    from onnxadmm.onnxio import weights

    monkeypatch.setattr(weights, "MAPPED_MIN_BYTES", 1024)
    model = tiny_cnn()
    feed = samples_for(model, 32)
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(tmp_path / "m.onnx"),
                    save_as_external_data=True, location="m.data", size_threshold=0)
    config = CompressConfig(sensitivity_samples=8, sample_patches=1024, **settings)
    one_file = compress(model, feed, config, ValidateConfig(latency_rounds=1))
    from_files = compress(tmp_path / "m.onnx", feed, config, ValidateConfig(latency_rounds=1))
    expected = {t.name: numpy_helper.to_array(t) for t in one_file.model.graph.initializer}
    assert sorted(expected) == sorted(t.name for t in from_files.model.graph.initializer)
    for tensor in from_files.model.graph.initializer:
        np.testing.assert_array_equal(weights.array(tensor), expected[tensor.name], err_msg=tensor.name)
    from_files.save(tmp_path / "c.onnx")
    np.testing.assert_array_equal(run(onnx.load(str(tmp_path / "c.onnx")), feed)[0], run(one_file.model, feed)[0])


@pytest.mark.parametrize("damage", ["length", "truncated"])
def test_external_data_that_does_not_fit_a_weight_kept_in_its_file_is_refused_at_load(tmp_path, monkeypatch, damage):
    """A weight read from its file when needed is checked when the model is loaded: a declared length other than
    its type and shape need, or a data file too short for it (no length given), is refused naming it."""
    from onnxadmm.onnxio import weights

    monkeypatch.setattr(weights, "MAPPED_MIN_BYTES", 1024)
    model = tiny_cnn()
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(tmp_path / "m.onnx"),
                    save_as_external_data=True, location="m.data", size_threshold=0)
    stored = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    large = [t for t in stored.graph.initializer if int(np.prod(t.dims)) * 4 >= 1024]
    last = max(large, key=lambda t: int(dict((e.key, e.value) for e in t.external_data)["offset"]))
    entries = {e.key: e for e in last.external_data}
    if damage == "length":
        entries["length"].value = str(int(entries["length"].value) - 4)
        match = f"initializer {last.name!r} declares"
    else:
        last.external_data.remove(entries["length"])
        with open(tmp_path / "m.data", "r+b") as data:
            data.truncate(int(entries["offset"].value) + 8)
        match = "truncated"
    (tmp_path / "m.onnx").write_bytes(stored.SerializeToString())
    with pytest.raises(BadInputError, match=match):
        load_model(tmp_path / "m.onnx")
