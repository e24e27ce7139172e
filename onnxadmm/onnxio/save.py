"""Write a model atomically (temporary file in the target folder, then rename), never over the input.

Models whose protobuf would exceed 2 GB are written with external data in ``<name>.data`` next to it.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import numpy_helper

from ..errors import ExportError, UnsupportedModelError
from . import weights
from .outputs import OutputSet

PROTOBUF_LIMIT_BYTES = (1 << 31) - (1 << 20)  # keep 1 MB of margin under protobuf's 2 GB
METADATA_PREFIX = "onnxadmm."


def exceeds_protobuf_limit(model: onnx.ModelProto) -> bool:
    """True when ``model`` cannot be serialized as one protobuf (protobuf refuses even to size it then)."""
    return reaches_bytes(model, PROTOBUF_LIMIT_BYTES)


def reaches_bytes(model: onnx.ModelProto, limit: int) -> bool:
    """Whether ``model`` serializes to at least ``limit`` bytes: its graph's initializers are sized one by one,
    stopping once they reach it, and the rest (the graph without them) once. Sizing a model over 2 GB whole takes
    protobuf about 11 s — and it then refuses — where each initializer sizes in milliseconds."""
    total = 0
    for tensor in model.graph.initializer:
        total += weights.stored_bytes(tensor) + FRAMING_BYTES
        if total >= limit:
            return True
    try:
        return total + without_initializers(model).ByteSize() >= limit
    except EncodeError:  # protobuf refuses to size a message over its 2 GB limit
        return True


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything but the graph's initializers (cheap: the weights are not copied)."""
    return _copy_except(model, {"graph": lambda graph: _copy_except(graph, {"initializer": None})})


WEIGHTLESS_MIN_ELEMENTS = 1024  # initializers at least this large are typed graph inputs in ``weightless``


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every large initializer (``WEIGHTLESS_MIN_ELEMENTS`` or more elements) turned into a graph
    input of the same type and shape; small constants, which shape arithmetic may read, stay. onnx.checker and
    shape inference see the same graph and types, without a copy of the weights (the checker otherwise
    serializes the whole model, twice its size in memory) and whatever the model's size."""
    proxy = without_initializers(model)
    declared = {v.name for v in proxy.graph.input}
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) < WEIGHTLESS_MIN_ELEMENTS and not weights.is_mapped(tensor):
            proxy.graph.initializer.append(tensor)
        elif tensor.name not in declared:
            proxy.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                        list(tensor.dims)))
    return proxy


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


def serialized_pieces(model: onnx.ModelProto, whole_below: int = PROTOBUF_LIMIT_BYTES
                      ) -> tuple[int, Iterable[bytes]]:
    """(serialized size, its bytes in pieces): one blob when the model serializes to under ``whole_below``
    bytes; otherwise the graph without initializers, then each initializer, one at a time (the same bytes up to
    each initializer's field framing), so no model-sized copy is held; weights in files (``weights.py``) are read
    one tensor at a time. The size is exact under protobuf's 2 GB limit for a model held in memory; otherwise the
    framing counts ``FRAMING_BYTES`` per initializer."""
    over_limit = exceeds_protobuf_limit(model)
    mapped = weights.any_mapped(model)
    if not over_limit and not mapped and not reaches_bytes(model, whole_below):
        blob = model.SerializeToString()
        return len(blob), [blob]
    skeleton = without_initializers(model).SerializeToString()
    size = len(skeleton) + sum(weights.stored_bytes(t) + FRAMING_BYTES for t in model.graph.initializer) \
        if over_limit or mapped else model.ByteSize()
    return size, itertools.chain([skeleton], *(weights.serialized(t) for t in model.graph.initializer))


FRAMING_BYTES = 6  # tag + length varint of an initializer inside the graph


def _repeated(field) -> bool:
    """``is_repeated`` (protobuf ≥ 5) or the older ``label``."""
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED


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
    with OutputSet() as outputs:
        written = stage_model(outputs, model, Path(out))
        outputs.commit()
    return written


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is written as a graph plus a data file: above protobuf's 2 GB, or when its large weights
    are in files (a model read with external data, ``weights.py``)."""
    return weights.any_mapped(model) or exceeds_protobuf_limit(model)


def stage_model(outputs: OutputSet, model: onnx.ModelProto, out: Path, role: str = "output model") -> int:
    """Stage ``model`` for ``out`` in ``outputs`` (an ``OutputSet``): one file, or (``needs_external_data``)
    the graph plus its tensors in ``<name>.data``. Returns the bytes staged."""
    if not needs_external_data(model):
        return outputs.write_bytes(out, role, [model.SerializeToString()])
    location = out.name + ".data"
    stubs: list[onnx.TensorProto] = []
    data_bytes = outputs.write_with(out.parent / location, f"external data of the {role}",
                                    lambda stream: stubs.extend(write_tensor_data(model.graph.initializer,
                                                                                  stream, location)))
    blob = model_with_stubs(without_initializers(model), stubs)
    return data_bytes + outputs.write_bytes(out, role, [blob])


EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx (as onnx.save_model does)


def write_tensor_data(initializers: Iterable[onnx.TensorProto], stream, location: str) -> list[onnx.TensorProto]:
    """Write the bytes of every initializer of ``EXTERNAL_MIN_BYTES`` or more to ``stream`` (the file that
    will be called ``location`` beside the model); returns the initializers to put in the model: small ones
    as they are, large ones as stubs pointing into ``location``. Nothing is copied but one tensor at a time,
    so a model over 2 GB costs one tensor (``onnx.save_model`` would rewrite the caller's model in place). A
    mapped tensor's bytes are copied from its file, a block at a time."""
    stubs, offset = [], 0
    for tensor in initializers:
        if weights.is_mapped(tensor):
            length = 0
            for block in weights.chunks(tensor):
                stream.write(block)
                length += len(block)
            stubs.append(weights.stub(tensor.name, tensor.data_type, tensor.dims, location, offset, length))
            offset += length
            continue
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
        stub = weights.stub(tensor.name, tensor.data_type, tensor.dims, location, offset, len(raw))
        stream.write(raw)
        offset += len(raw)
        stubs.append(stub)
    return stubs


def model_with_stubs(skeleton: onnx.ModelProto, stubs: Iterable[onnx.TensorProto]) -> bytes:
    """The serialized ``skeleton`` (a model without initializers) with ``stubs`` as its initializers."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    model.graph.initializer.extend(stubs)
    return model.SerializeToString()


def write_with_external_data(skeleton: onnx.ModelProto, initializers: Iterable[onnx.TensorProto], path: Path,
                             location: str) -> int:
    """Write ``skeleton`` plus ``initializers`` to ``path`` (a scratch location, not atomic), the tensor
    bytes in ``location`` next to it; returns the bytes written."""
    path = Path(path)
    with open(path.parent / location, "wb") as data:
        stubs = write_tensor_data(initializers, data, location)
        data_bytes = data.tell()
    blob = model_with_stubs(skeleton, stubs)
    path.write_bytes(blob)
    return len(blob) + data_bytes


def compressed_before(model: onnx.ModelProto, force: bool) -> list[str]:
    """A note when onnxadmm already compressed ``model`` (its metadata says so); refused unless ``force``."""
    previous = read_metadata(model)
    if f"{METADATA_PREFIX}version" not in previous:
        return []
    message = (f"this model was already compressed by onnxadmm {previous[f'{METADATA_PREFIX}version']} "
               f"(config sha256 {previous.get(f'{METADATA_PREFIX}config_sha256', '?')[:12]})")
    if not force:
        raise UnsupportedModelError(message + "; compressing twice compounds the error. Pass --force to do it "
                                              "anyway")
    return [message + "; compressed again because of --force"]
