"""onnxruntime sessions as this package uses them: CPU provider, fixed intra-op threads, and thread-pool
spinning off, so two sessions timed side by side do not steal each other's cores (docs/RUNTIME.md §5)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

import onnx

from ..config import available_cores
from ..errors import UnsupportedModelError
from .save import (
    reaches_bytes,
    without_initializers,
    write_with_external_data,
)
from .scratch import scratch_folder
from .weights import any_mapped


def cpu_threads(requested: int) -> int:
    """``requested`` threads, or every core this process may use when it is 0."""
    return requested if requested > 0 else available_cores()


def session(model: onnx.ModelProto | bytes | str | Path, threads: int = 0, optimize: bool = True,
            arena: bool = True, options=None):
    """An InferenceSession on the CPU with ``threads`` intra-op threads (0 = all cores); ``model`` may be a
    file's path (onnxruntime reads it and its external data itself). ``arena`` False: onnxruntime returns each
    run's intermediate tensors to the system instead of keeping its peak allocated for the next run.
    ``options``: SessionOptions to use instead of those three."""
    import onnxruntime as ort

    options = options or session_options(threads, optimize, arena)
    if isinstance(model, onnx.ModelProto) and through_files(model):
        return _session_from_files(model, options)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else \
        str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.NotImplemented) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"onnxruntime (CPU) cannot load the model: {first}. onnxadmm calibrates and validates in "
            "onnxruntime, so every node must be one it runs: register the custom-op library or replace "
            "the node before compressing") from None


def session_options(threads: int, optimize: bool, arena: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.intra_op_num_threads = cpu_threads(threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def _session_from_files(model: onnx.ModelProto, options, extra_outputs: Sequence[str] = (),
                        extra_inputs: Sequence[onnx.ValueInfoProto] = ()):
    """Large models go through a temporary file with external data, written tensor by tensor from ``model``
    (not copied); ``extra_outputs`` / ``extra_inputs`` are added to the written graph's outputs / inputs."""
    import onnxruntime as ort

    skeleton = without_initializers(model)
    _add_outputs(skeleton, extra_outputs)
    skeleton.graph.input.extend(extra_inputs)
    with scratch_folder("onnxadmm-session-") as folder:
        path = os.path.join(folder, "model.onnx")
        write_with_external_data(skeleton, model.graph.initializer, Path(path), "model.onnx.data")
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def session_with_outputs(model: onnx.ModelProto, names: Sequence[str], threads: int = 0, arena: bool = True):
    """A session whose outputs also include the intermediate tensors ``names`` (the model is not changed)."""
    if through_files(model):
        return _session_from_files(model, session_options(threads, True, arena), names)
    probe = copy.deepcopy(model)
    _add_outputs(probe, names)
    return session(probe, threads, arena=arena)


def session_with_inputs(model: onnx.ModelProto, inputs: Sequence[onnx.ValueInfoProto], threads: int = 0,
                        arena: bool = True):
    """A session where the initializers named by ``inputs`` can also be fed (their stored values are the
    defaults); the model is not changed."""
    present = {v.name for v in model.graph.input}
    added = [v for v in inputs if v.name not in present]
    if through_files(model):
        return _session_from_files(model, session_options(threads, True, arena), extra_inputs=added)
    probe = copy.deepcopy(model)  # (copy.copy serializes: fails over 2 GB)
    probe.graph.input.extend(added)
    if probe.ir_version < 4:
        probe.ir_version = 4
    return session(probe, threads, arena=arena)


def _add_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)


FILES_FROM_BYTES = 64 * 2**20


def through_files(model: onnx.ModelProto) -> bool:
    """Large models reach onnxruntime through a temporary file with external data, written tensor by tensor:
    serializing them in memory would hold the weights twice more while the session is built (three times for
    ``session_with_outputs``, which copies the model), and over protobuf's 2 GB limit it cannot be done. A model
    whose weights are in files (``weights.py``) always goes this way: onnxruntime reads no absolute paths."""
    return any_mapped(model) or reaches_bytes(model, FILES_FROM_BYTES)
