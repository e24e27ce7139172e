"""Where a large initializer's bytes live: in the protobuf message, or in a file it is read from when needed.

A model read from a file with external data keeps its initializers of ``MAPPED_MIN_BYTES`` or more in that file:
the in-memory proto holds a *mapped* stub (``data_location`` EXTERNAL, ``location`` the data file's absolute
path, with its offset and length), and ``array`` reads the values when a step needs them. The weights the solve
writes are appended to a scratch ``WeightFile`` and handed on as read-only ``np.memmap`` views, which
``stub_for`` turns back into stubs, so the solved model refers to them instead of holding them. Protobuf's
Python runtime frees a message's bytes only with the whole message (replacing a tensor's ``raw_data`` frees
nothing), so this is what bounds a large model's memory: the weights stay in files and are read one tensor at a
time. Mapped stubs are internal: onnxruntime refuses absolute external-data paths, so models reach it, and the
output file, through ``onnxio/save.py``, which copies each stub's bytes from its file.
"""

from __future__ import annotations

import mmap
import os
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from .scratch import new_folder, remove

MAPPED_MIN_BYTES = 1 << 20  # smaller external tensors are read into the proto (a bias, a norm's scale)
COPY_BLOCK_BYTES = 16 << 20


# packed sub-byte types and strings are always read into the proto
_NOT_MAPPED = {onnx.TensorProto.STRING, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
               getattr(onnx.TensorProto, "FLOAT4E2M1", onnx.TensorProto.STRING)}


def is_mapped(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and os.path.isabs(_info(tensor).location)


def any_mapped(model: onnx.ModelProto) -> bool:
    return any(is_mapped(t) for t in model.graph.initializer)


def _info(tensor: onnx.TensorProto) -> external_data_helper.ExternalDataInfo:
    return external_data_helper.ExternalDataInfo(tensor)


def _dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")


def payload_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a mapped tensor's values (as ``raw_data`` would hold them)."""
    return int(np.prod(tensor.dims, dtype=np.int64)) * _dtype(tensor).itemsize


def value_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's type and shape need as raw data; None for strings and packed sub-byte types."""
    return None if tensor.data_type in _NOT_MAPPED else payload_bytes(tensor)


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """The tensor's serialized size with its values inside the message (``ByteSize`` of the inlined tensor)."""
    if not is_mapped(tensor):
        return tensor.ByteSize()
    length = payload_bytes(tensor)
    header = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims).ByteSize()
    return header + 1 + len(_varint(length)) + length


RAW_DATA_TAG = bytes([(9 << 3) | 2])  # TensorProto.raw_data: field 9, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; a mapped tensor is read from its file into a private array (one tensor's memory,
    freed with the array)."""
    if not is_mapped(tensor):
        return numpy_helper.to_array(tensor)
    info, dtype = _info(tensor), _dtype(tensor)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    values = np.fromfile(info.location, dtype=dtype, count=count, offset=info.offset or 0)
    if values.size != count:
        raise OSError(f"{info.location} ends before initializer {tensor.name!r} (its data file was changed)")
    return values.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(tensor.dims))


def chunks(tensor: onnx.TensorProto) -> Iterator[bytes]:
    """A mapped tensor's raw little-endian bytes, ``COPY_BLOCK_BYTES`` at a time."""
    info = _info(tensor)
    left = payload_bytes(tensor)
    with open(info.location, "rb") as handle:
        handle.seek(info.offset or 0)
        while left:
            block = handle.read(min(left, COPY_BLOCK_BYTES))
            if not block:
                raise OSError(f"{info.location} ends before initializer {tensor.name!r}")
            left -= len(block)
            yield block


def serialized(tensor: onnx.TensorProto) -> Iterator[bytes]:
    """``inlined(tensor).SerializeToString()`` in pieces: a mapped tensor's message header, then its values read
    ``COPY_BLOCK_BYTES`` at a time (never the whole tensor in memory); any other tensor in one piece."""
    if not is_mapped(tensor):
        yield tensor.SerializeToString()
        return
    header = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims).SerializeToString()
    yield header + RAW_DATA_TAG + _varint(payload_bytes(tensor))
    yield from chunks(tensor)


def count_nonzero(tensor: onnx.TensorProto) -> int:
    """Nonzero values of the tensor; a mapped one counted a block at a time."""
    if not is_mapped(tensor):
        return int(np.count_nonzero(numpy_helper.to_array(tensor)))
    dtype = _dtype(tensor)
    return sum(int(np.count_nonzero(np.frombuffer(block, dtype=dtype))) for block in chunks(tensor))


def inlined(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor with its values inside the message (a new message for a mapped one, else ``tensor``)."""
    if not is_mapped(tensor):
        return tensor
    out = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    out.raw_data = b"".join(chunks(tensor))
    return out


def stub(name: str, data_type: int, dims: Iterable[int], path: str, offset: int, length: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", str(path)), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def stub_for(name: str, values, data_type: int | None = None) -> onnx.TensorProto | None:
    """A mapped stub for ``values`` when they are a whole ``np.memmap`` of a file (the solve's kept weights) of
    the tensor's type; None otherwise."""
    if not isinstance(values, np.memmap) or not isinstance(values.base, mmap.mmap) or values.filename is None:
        return None  # (a slice or reshape of a memmap is one too, with its parent's offset)
    elem = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    if data_type is not None and elem != data_type:
        return None
    return stub(name, elem, values.shape, values.filename, values.offset, values.nbytes)


def map_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Turn the graph's external initializers of ``MAPPED_MIN_BYTES`` or more into mapped stubs (absolute
    paths under ``folder``; the loader has checked the paths, lengths and file sizes) and read every other
    external tensor in."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and (value_bytes(tensor) or 0) >= MAPPED_MIN_BYTES:
            info = _info(tensor)
            mapped = stub(tensor.name, tensor.data_type, tensor.dims, str((folder / info.location).resolve()),
                          info.offset or 0, payload_bytes(tensor))
            tensor.ClearField("external_data")
            tensor.external_data.extend(mapped.external_data)
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not is_mapped(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(folder))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph``: its initializers and tensor attributes, and those of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


_COLLECTORS: list[list["WeightFile"]] = []


@contextmanager
def collected() -> Iterator[list["WeightFile"]]:
    """The weight files created inside the block; whoever holds the list keeps them (a result whose model refers to
    them). They are removed when the block raises."""
    files: list[WeightFile] = []
    _COLLECTORS.append(files)
    try:
        yield files
    except BaseException:
        for file in files:
            file.close()
        raise
    finally:
        _COLLECTORS.remove(files)


_UNTIL_EXIT: list["WeightFile"] = []


class WeightFile:
    """An append-only scratch file of solved weights; ``keep`` returns each as a read-only memmap view of it. The
    file is removed with ``close``, or once this object is garbage-collected (or at exit): whatever refers to the
    kept weights by file (a model's stubs) must hold it — the ``collected`` blocks it is made in do, and with
    ``until_exit`` (a model returned with nothing else to hold its file) the process does outside them."""

    def __init__(self, until_exit: bool = False):
        self.folder = new_folder("onnxadmm-weights-")
        self.path = self.folder / "weights.bin"
        self._handle = open(self.path, "wb")
        self._finalizer = weakref.finalize(self, _close, self._handle, self.folder)
        for files in _COLLECTORS:
            files.append(self)
        if until_exit and not _COLLECTORS:
            _UNTIL_EXIT.append(self)

    def keep(self, values: np.ndarray) -> np.memmap:
        values = np.ascontiguousarray(values)
        data = values.astype(values.dtype.newbyteorder("<"), copy=False)
        offset = self._handle.tell()
        self._handle.write(memoryview(data).cast("B"))
        self._handle.flush()
        return np.memmap(self.path, dtype=values.dtype, mode="r", offset=offset, shape=values.shape)

    def close(self) -> None:
        self._finalizer()


def _close(handle, folder: Path) -> None:
    handle.close()
    remove(folder)


def moved_to(model: onnx.ModelProto, file: WeightFile) -> onnx.ModelProto:
    """``model`` with every mapped initializer's values copied into ``file``, one tensor at a time, and its stub
    pointing there (so the files it referred to may be removed)."""
    for tensor in model.graph.initializer:
        if is_mapped(tensor):
            moved = stub_for(tensor.name, file.keep(array(tensor)), tensor.data_type)
            tensor.ClearField("external_data")
            tensor.external_data.extend(moved.external_data)
    return model


def tensor_in(values: np.ndarray, name: str, file: WeightFile | None) -> onnx.TensorProto:
    """``values`` as an initializer: a mapped stub into ``file`` when given and they are ``MAPPED_MIN_BYTES`` or
    more, else in the message."""
    if file is None or values.nbytes < MAPPED_MIN_BYTES:
        return numpy_helper.from_array(values, name)
    return stub_for(name, file.keep(values))


def kept(values: dict[str, np.ndarray], file: WeightFile | None) -> dict[str, np.ndarray]:
    """``values`` with every array of ``MAPPED_MIN_BYTES`` or more moved to ``file`` (all as they are without one)."""
    if file is None:
        return values
    return {name: file.keep(value) if np.asarray(value).nbytes >= MAPPED_MIN_BYTES else value
            for name, value in values.items()}
