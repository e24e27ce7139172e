"""Size and compute of a model as onnxruntime sees it.

* size: serialized bytes, and bytes after zip (deflate) — zeros in dense weights only shrink the latter;
* parameters: float initializer elements (in a QDQ model: the integer weights and biases), and how many
  are nonzero;
* MACs per sample of every Conv / Gemm / MatMul (and MatMulInteger), from tensor shapes observed in one onnxruntime run:
  Conv: |out| · Cin/G · kh · kw;  Gemm/MatMul: |out| · K.  ``dense`` is what the CPU executes;
  ``nonzero`` counts only multiplications by nonzero weights (what a sparse kernel could skip to).
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx

from ..onnxio import weights
from ..onnxio.graph import GraphView
from ..onnxio.runtime import FILES_FROM_BYTES, cpu_threads, session_with_outputs
from ..onnxio.save import serialized_pieces


@dataclass
class Footprint:
    size_bytes: int
    zipped_bytes: int
    params: int
    nonzero_params: int
    macs: int  # per sample, dense
    nonzero_macs: int
    layer_weights: int
    nonzero_layer_weights: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


DEFLATE_LEVEL = 6
DEFLATE_BLOCK_BYTES = 16 << 20  # unit of work for the threads
DEFLATE_WINDOW_BYTES = 32 << 10  # deflate's history: each block is primed with the bytes before it


def zipped_size(blob: bytes | Iterable[bytes], threads: int = 0) -> int:
    """Bytes of a zip (deflate, level 6) holding the model; ``blob`` may come in pieces (models over 2 GB).
    The zip is never held: only its length is counted."""
    return ZIP_CONTAINER_BYTES + sum(len(chunk) for chunk in deflated_blocks(
        [blob] if isinstance(blob, (bytes, bytearray, memoryview)) else blob, threads))


def deflated_blocks(pieces: Iterable[bytes], threads: int = 0) -> Iterator[bytes]:
    """One raw deflate stream of the concatenated ``pieces``, in order, compressed in blocks of
    ``DEFLATE_BLOCK_BYTES`` on ``threads`` threads (0: every core; zlib releases the GIL). Each block is primed
    with the 32 KB before it and ends with a sync flush (pigz's scheme), so the blocks join into one valid
    stream, a few bytes per block longer than deflating it in one go; under one block it is that stream."""
    workers = cpu_threads(threads)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for block, window, last in _blocks(pieces):
            pending.append(pool.submit(_deflate, block, window, last))
            while len(pending) > 2 * workers:  # bounded: at most a few blocks in memory
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _blocks(pieces: Iterable[bytes]) -> Iterator[tuple[bytes | memoryview, bytes | memoryview, bool]]:
    """(block, the up to 32 KB before it, whether it is the last) over the concatenation of ``pieces``."""
    window, previous = b"", None
    for chunk in _chunks(pieces):
        if previous is not None:
            yield previous, window, False
            window = previous[-DEFLATE_WINDOW_BYTES:]
        previous = chunk
    yield previous, window, True


def _chunks(pieces: Iterable[bytes]) -> Iterator[bytes | memoryview]:
    """The concatenation of ``pieces`` in ``DEFLATE_BLOCK_BYTES`` blocks (the last shorter; one empty block when
    there are no bytes), without copying the blocks that lie inside one piece."""
    carry = bytearray()  # bytes not yet in a block
    whole = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        if carry:
            take = DEFLATE_BLOCK_BYTES - len(carry)
            carry += view[:take]
            view = view[take:]
            if len(carry) < DEFLATE_BLOCK_BYTES:
                continue
            yield bytes(carry)
            carry, whole = bytearray(), whole + 1
        while len(view) >= DEFLATE_BLOCK_BYTES:
            yield view[:DEFLATE_BLOCK_BYTES]
            view, whole = view[DEFLATE_BLOCK_BYTES:], whole + 1
        carry += view
    if carry or not whole:
        yield bytes(carry)


def _deflate(block, window, last: bool) -> bytes:
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY,
                                  *([window] if len(window) else []))
    return compressor.compress(block) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _zip_of(data: bytes) -> int:
    """Bytes of the zip ``zipfile`` writes for one entry holding ``data`` (the container ``zipped_size`` adds)."""
    counter = _ByteCounter()
    with zipfile.ZipFile(counter, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=DEFLATE_LEVEL) as archive:
        with archive.open("model.onnx", "w", force_zip64=True) as entry:
            entry.write(data)
    return counter.size


class _ByteCounter(io.RawIOBase):
    """A write-only sink that keeps only the count."""

    def __init__(self):
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)


ZIP_CONTAINER_BYTES = _zip_of(b"") - len(_deflate(b"", b"", True))  # headers, descriptor, central directory


INTEGER_PRODUCTS = ("MatMulInteger",)  # dynamic int8: the integer weight is the product's second input
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _parameter_initializers(model: onnx.ModelProto):
    """Float initializers, and the integer tensors DequantizeLinear nodes read (a QDQ model's weights and
    biases; their scales and zero points are not counted)."""
    quantized = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    quantized |= {node.input[1] for node in model.graph.node if node.op_type in INTEGER_PRODUCTS}
    quant_params = {name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                    for name in node.input[1:]}
    for tensor in model.graph.initializer:
        if tensor.name in quantized or (tensor.data_type in FLOAT_TYPES and tensor.name not in quant_params):
            yield tensor


@dataclass(frozen=True)
class NodeCost:
    node: onnx.NodeProto
    dense: int  # multiply-accumulates per sample
    positions: int  # output positions per sample (each weight is used this many times)
    input_shape: tuple[int, ...] = ()  # of the data input, as observed

def node_macs(model: onnx.ModelProto, feed_one: dict[str, np.ndarray], threads: int = 0) -> dict[int, NodeCost]:
    """Dense MACs of every Conv/ConvTranspose/Gemm/MatMul node (by node id), from shapes observed in one
    onnxruntime run on ``feed_one`` (a single sample)."""
    view = GraphView(model)
    compute = [i for i in view.order
               if view.nodes[i].op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose", *INTEGER_PRODUCTS)]
    names = sorted({t for i in compute for t in (view.nodes[i].input[0], view.nodes[i].output[0])})
    sess = session_with_outputs(model, names, threads)
    outputs = [o.name for o in sess.get_outputs()]
    shapes = dict(zip(outputs, (np.shape(v) for v in sess.run(outputs, feed_one))))
    costs = {}
    for index in compute:
        node = view.nodes[index]
        out_shape = shapes.get(node.output[0])
        if out_shape is None:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            in_channels = shapes[node.input[0]][1]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            weight_dims = _weight_dims(view, node.input[1])
            kernel = int(np.prod(weight_dims[2:])) if weight_dims and all(
                isinstance(d, int) for d in weight_dims) else 1
            dense = int(np.prod(out_shape)) * (in_channels // group) * kernel
            positions = int(np.prod(out_shape[2:])) * out_shape[0]
        else:
            depth = shapes[node.input[0]][-1]
            dense = int(np.prod(out_shape)) * depth
            positions = int(np.prod(out_shape[:-1]))
        costs[index] = NodeCost(node, dense, positions, tuple(shapes[node.input[0]]))
    return costs


def _weight_dims(view: GraphView, name: str) -> tuple | None:
    """Static dims of a weight, looking through a DequantizeLinear (QDQ models) to its integer tensor."""
    producer = view.producer.get(name)
    if producer is not None and view.nodes[producer].op_type == "DequantizeLinear":
        name = view.nodes[producer].input[0]
    if name in view.initializers:
        return tuple(view.initializers[name].dims)
    return view.types[name].shape if name in view.types else None


@dataclass
class StoredSize:
    """What a model's file costs, read from its initializers alone (no onnxruntime run): serialized and zipped
    bytes, and the elements and nonzero elements of each parameter tensor (``_parameter_initializers``)."""

    size_bytes: int
    zipped_bytes: int
    counts: dict[str, tuple[int, int]]  # initializer -> (elements, nonzero elements)


def stored_size(model: onnx.ModelProto, threads: int = 0) -> StoredSize:
    """Sizes and parameter counts of ``model``. Models large enough to reach onnxruntime through files are zipped
    initializer by initializer (no serialized copy), a tensor in a file a block at a time."""
    size_bytes, pieces = serialized_pieces(model, FILES_FROM_BYTES)
    zipped_bytes = zipped_size(pieces, threads)
    del pieces
    counts = {tensor.name: (int(np.prod(tensor.dims, dtype=np.int64)), weights.count_nonzero(tensor))
              for tensor in _parameter_initializers(model)}
    return StoredSize(size_bytes, zipped_bytes, counts)


def footprint(model: onnx.ModelProto, feed_one: dict[str, np.ndarray], threads: int = 0,
              stored: StoredSize | None = None) -> Footprint:
    """Measure ``model``; ``feed_one`` is a single-sample input used to observe shapes. ``stored``: the sizes and
    counts already measured (``stored_size``) — of this model, or of the file it was normalized from, which
    computes the same (``api.compress`` measures its input before normalizing it in place)."""
    stored = stored or stored_size(model, threads)
    counts = dict(stored.counts)
    params, nonzero = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    for node in model.graph.node:  # QDQ: a layer's weight is the integer tensor behind its DequantizeLinear
        if node.op_type == "DequantizeLinear" and node.input[0] in counts:
            counts[node.output[0]] = counts[node.input[0]]
    macs = nonzero_macs = layer_weights = nonzero_layer_weights = 0
    for index, cost in node_macs(model, feed_one, threads).items():
        node = cost.node
        weight = counts.get(node.input[1]) if len(node.input) > 1 else None
        macs += cost.dense
        if weight is not None:
            layer_weights += weight[0]
            nz = weight[1]
            nonzero_layer_weights += nz
            nonzero_macs += nz * cost.positions if node.op_type != "ConvTranspose" else cost.dense
        else:
            nonzero_macs += cost.dense
    return Footprint(size_bytes=stored.size_bytes, zipped_bytes=stored.zipped_bytes, params=params,
                     nonzero_params=nonzero, macs=macs, nonzero_macs=nonzero_macs,
                     layer_weights=layer_weights, nonzero_layer_weights=nonzero_layer_weights)
