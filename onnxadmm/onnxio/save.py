"""Write a model atomically (temporary file in the target folder, then rename), never over the input.

Models whose protobuf would exceed 2 GB are written with external data in ``<name>.data`` next to it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import onnx
from google.protobuf.message import EncodeError
from onnx import numpy_helper

from ..errors import ExportError

PROTOBUF_LIMIT_BYTES = (1 << 31) - (1 << 20)  # keep 1 MB of margin under protobuf's 2 GB
METADATA_PREFIX = "onnxadmm."


def exceeds_protobuf_limit(model: onnx.ModelProto) -> bool:
    """True when ``model`` cannot be serialized as one protobuf (protobuf refuses even to size it then)."""
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT_BYTES
    except EncodeError:
        return True


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything but the graph's initializers (cheap: the weights are not copied)."""
    return _copy_except(model, {"graph": lambda graph: _copy_except(graph, {"initializer": None})})


def _copy_except(message, special: dict):
    out = type(message)()
    for field, value in message.ListFields():
        if field.name in special:
            if special[field.name] is not None:
                getattr(out, field.name).CopyFrom(special[field.name](value))
        elif _repeated(field):
            getattr(out, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    return out


def serialized_pieces(model: onnx.ModelProto) -> tuple[int, Iterable[bytes]]:
    """(serialized size, its bytes in pieces): one blob under protobuf's 2 GB limit; above it the graph
    without initializers, then each initializer (the same bytes up to each initializer's field framing of
    ``FRAMING_BYTES``)."""
    if not exceeds_protobuf_limit(model):
        blob = model.SerializeToString()
        return len(blob), [blob]
    skeleton = without_initializers(model).SerializeToString()
    size = len(skeleton) + sum(t.ByteSize() + FRAMING_BYTES for t in model.graph.initializer)
    return size, itertools.chain([skeleton], (t.SerializeToString() for t in model.graph.initializer))


FRAMING_BYTES = 6  # tag + length varint of an initializer inside the graph


def _repeated(field) -> bool:
    """``is_repeated`` (protobuf ≥ 5) or the older ``label``."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


def check_output_path(out: str | os.PathLike, input_path: str | os.PathLike | None) -> Path:
    """Fail early (before any work) when the output cannot or must not be written."""
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ExportError(f"output path {out} is a directory; give a file name such as {out}/model.onnx")
    if input_path is not None:
        source = Path(input_path)
        same = out.resolve() == source.resolve()
        if not same and out.exists() and source.exists():
            same = os.path.samefile(out, source)
        if same:
            raise ExportError(f"output path {out} is the input model; choose another file name "
                              "(onnxadmm never writes over its input)")
        data_file = out.parent / (out.name + ".data")
        if data_file.resolve().parent == source.resolve().parent and data_file.exists() and \
                _referenced_by(source, data_file.name):
            raise ExportError(f"writing {out} could overwrite {data_file}, which the input model uses "
                              "for external data; choose another output name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.exists():
        raise ExportError(f"output folder {folder} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".onnxadmm-probe-", delete=True):
            pass
    except OSError as exc:
        raise ExportError(f"cannot write in output folder {folder}: {exc.strerror or exc}") from None
    return out


def _referenced_by(model_path: Path, data_name: str) -> bool:
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable input is reported elsewhere
        return False
    return any(entry.key == "location" and entry.value == data_name
               for tensor in model.graph.initializer for entry in tensor.external_data)


def stamp_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Merge ``onnxadmm.*`` keys into ``metadata_props``, keeping the producer's own entries."""
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in entries.items():
        full_key = key if key.startswith(METADATA_PREFIX) else METADATA_PREFIX + key
        if full_key in existing:
            existing[full_key].value = str(value)
        else:
            model.metadata_props.add(key=full_key, value=str(value))


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


def save_model_atomic(model: onnx.ModelProto, out: str | os.PathLike) -> int:
    """Write ``model`` to ``out`` atomically; returns the bytes written (model + external data)."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not exceeds_protobuf_limit(model):
        blob = model.SerializeToString()
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(blob)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(blob)
    return _save_with_external_data(model, out, folder)


def _save_with_external_data(model: onnx.ModelProto, out: Path, folder: Path) -> int:
    data_name = out.name + ".data"
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        staged = staging / out.name
        total = write_with_external_data(without_initializers(model), model.graph.initializer, staged, data_name)
        os.replace(staging / data_name, folder / data_name)
        os.replace(staged, out)
        return total
    finally:
        shutil.rmtree(staging, ignore_errors=True)


EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx (as onnx.save_model does)


def write_with_external_data(skeleton: onnx.ModelProto, initializers: Iterable[onnx.TensorProto], path: Path,
                             location: str) -> int:
    """Write ``skeleton`` (a model without initializers) plus ``initializers`` to ``path``, the tensor bytes
    in ``location`` next to it; returns the bytes written. Neither argument is modified and no copy of the
    weights is made (``onnx.save_model`` would rewrite the caller's model in place), so a model over 2 GB
    costs one tensor at a time."""
    path = Path(path)
    stubs, offset = [], 0
    with open(path.parent / location, "wb") as data:
        for tensor in initializers:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ExportError(f"initializer {tensor.name!r} still refers to external data; load its data first")
            raw = tensor.raw_data if tensor.HasField("raw_data") else None
            size = len(raw) if raw is not None else tensor.ByteSize()
            if tensor.data_type == onnx.TensorProto.STRING or size < EXTERNAL_MIN_BYTES:
                stubs.append(tensor)
                continue
            if raw is None:  # typed fields (float_data, ...): the little-endian bytes ONNX stores as raw_data
                array = numpy_helper.to_array(tensor)
                raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
            stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                    data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                stub.external_data.add(key=key, value=value)
            data.write(raw)
            offset += len(raw)
            stubs.append(stub)
        data.flush()
        os.fsync(data.fileno())
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    model.graph.initializer.extend(stubs)
    blob = model.SerializeToString()
    with open(path, "wb") as stream:
        stream.write(blob)
        stream.flush()
        os.fsync(stream.fileno())
    return len(blob) + offset
