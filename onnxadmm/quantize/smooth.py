"""Activation smoothing for dynamic int8 (SmoothQuant, Xiao et al. 2023), the migration strength chosen per tensor.

At run time each MatMul input x is quantized to uint8 with one scale for the whole tensor, so a few outlier
channels (LayerNorm outputs, GELU outputs of transformers) leave the other channels a handful of levels. For
channel scales s > 0, exactly

    x·W = (x · diag(1/s)) · (diag(s) · W),        s_j = max|x_j|^α / max_k |W_jk|^(1−α),

max|x_j| over the calibration samples and max_k over every quantized MatMul reading x: the outliers move into
rows of W, whose int8 scales are per output column. Per input tensor, α ∈ ``ALPHAS`` or no smoothing, whichever
gives the smallest output error of its MatMuls

    Σ_consumers ‖q_x(x/s) · q_W(diag(s) W) − x·W‖² / ‖x·W‖²,

q_x the run-time rounding (uint8, each run's own min and max), q_W int8 per column at max-abs, on calibration
samples run one at a time as at batch 1. 1/s goes into x's producer where that is exact and nothing else reads x
(a LayerNormalization's scale and bias, a Mul by a per-channel constant, the value projection of an attention
whose output projection reads x), otherwise into a Mul node before the MatMuls (the residual stream of a post-LN
encoder; a GELU's output, which would not be fused any more) where the error falls by at least 10 % (the Mul
costs a pass over x at run time). The float model computes what it did; the grid solve and the export then
run on the smoothed graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..analysis.channels import ChannelGroup
from ..analysis.heads import find_head_groups
from ..analysis.layers import Layer, find_layers
from ..calib.readers import SampleSet, evenly_spaced
from ..onnxio.graph import FreshNames, GraphView, attribute
from ..onnxio.runtime import session_with_outputs

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ERROR_SAMPLES = 32  # calibration samples the output errors are measured on (fewer when memory says so)
ERROR_ROWS = 4096  # rows of x in the error (evenly spaced over those samples) ...
MIN_ERROR_ROWS = 256
ERROR_PRODUCT = 1 << 32  # ... fewer where a candidate's products would take more multiply-adds than this
MUL_NODE_GAIN = 0.9  # a Mul node is added only where the error falls to this fraction of it or less
ERROR_COLUMNS = 4096  # output columns in the error, shared by the MatMuls reading x (each column is rounded alone)
LEVELS = 255


@dataclass
class SmoothedInput:
    """One MatMul input: the chosen α (None: left as it was), the output errors without and with it."""

    tensor: str
    consumers: list[str]
    alpha: float | None
    error_before: float
    error_after: float
    placed: str  # where 1/s went: "LayerNormalization 'n'", "Mul 'n' (its constant)", "value projection 'n'",
    #              "Mul node 'n'", or "" (not smoothed)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Smoothing:
    inputs: list[SmoothedInput] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def smoothed(self) -> list[SmoothedInput]:
        return [i for i in self.inputs if i.alpha is not None]

    def as_dict(self) -> dict:
        return {"inputs": [i.as_dict() for i in self.inputs], "seconds": self.seconds,
                "alphas": list(ALPHAS)}


def smooth_activations(model: onnx.ModelProto, view: GraphView, layers: Sequence[Layer], samples: SampleSet,
                       weight_bits: int, batch_size: int, threads: int, memory_bytes: int,
                       progress: Callable | None = None) -> Smoothing:
    """Rewrites ``model`` (indexed by ``view``) in place: each input of the quantized MatMul/Gemm ``layers``
    smoothed where that lowers its output error. ``memory_bytes``: what the captured activations may hold."""
    started = time.perf_counter()
    progress = progress or (lambda *args: None)
    groups = _groups(view, layers)
    result = Smoothing()
    if not groups:
        return result
    names = list(groups)
    channel_max, runs = _activations(model, names, samples, batch_size, threads, memory_bytes, progress)
    by_node = {layer.node_index: layer for layer in find_layers(view).layers}
    heads = {group.consumers[0].node_index: (group, by_node) for group in find_head_groups(view, by_node)
             if not group.declined}
    fresh = FreshNames(model.graph)
    added: dict[int, list[onnx.NodeProto]] = {}  # producer node id (-1: a graph input) -> Mul nodes after it
    q_max = 2 ** (weight_bits - 1) - 1
    for done, (tensor, consumers) in enumerate(groups.items()):
        progress("quantize", done, len(groups), f"activation smoothing: {tensor}")
        row_max, columns = _weight_summary(view, consumers)
        alpha, before, after = _choose(runs.pop(tensor), channel_max[tensor], row_max, columns, q_max)
        fold = _folding(view, tensor, consumers, fresh, heads)
        if alpha is not None and fold is None and after > MUL_NODE_GAIN * before:
            alpha, after = None, before  # too little for the run-time cost of a Mul node
        placed = ""
        if alpha is not None:
            scales = _scales(channel_max[tensor], row_max, alpha)
            for layer in consumers:  # one weight at a time
                _write_weight(view, layer, _weight_kn(view, layer) * scales[:, None])
            placed = fold(1.0 / scales) if fold else _add_mul(model, view, tensor, consumers, 1.0 / scales, fresh,
                                                               added)
        result.inputs.append(SmoothedInput(tensor, [layer.name for layer in consumers], alpha, before, after, placed))
    if added:
        nodes = added.get(-1, []) + [n for i, node in enumerate(view.nodes) for n in [node] + added.get(i, [])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    result.seconds = time.perf_counter() - started
    return result


def _groups(view: GraphView, layers: Sequence[Layer]) -> dict[str, list[Layer]]:
    """Input tensor -> the layers reading it whose weights may be rescaled (a float initializer that no other
    node reads and the user cannot override as a graph input)."""
    groups: dict[str, list[Layer]] = {}
    declared = {v.name for v in view.graph.input}
    for layer in layers:
        if layer.op_type not in ("MatMul", "Gemm") or layer.layout == "conv":
            continue
        weight = view.initializers.get(layer.weight_name)
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT or \
                layer.weight_name in declared or len(view.initializer_users(layer.weight_name)) != 1 or \
                layer.input_name in view.initializers:
            continue
        groups.setdefault(layer.input_name, []).append(layer)
    return groups


def _weight_kn(view: GraphView, layer: Layer) -> np.ndarray:
    """The weight as K×N (input channels on rows)."""
    weight = view.constant(layer.weight_name)
    return np.ascontiguousarray(weight.T) if layer.layout == "gemm_nk" else weight


def _write_weight(view: GraphView, layer: Layer, weight_kn: np.ndarray) -> None:
    array = weight_kn.T if layer.layout == "gemm_nk" else weight_kn
    view.initializers[layer.weight_name].CopyFrom(
        numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), layer.weight_name))


def _activations(model: onnx.ModelProto, names: list[str], samples: SampleSet, batch_size: int, threads: int,
                 memory_bytes: int, progress) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Per tensor: max |x| per channel (last axis) over every calibration sample, and the tensor of each of up to
    ``ERROR_SAMPLES`` samples run alone (a fixed-batch model: one batch), as many as ``memory_bytes`` holds."""
    wanted = [n for n in names if n not in samples.arrays]
    fed = [n for n in names if n in samples.arrays]  # graph inputs (no session needed when only they are read)
    sess = session_with_outputs(model, wanted, threads, arena=False) if wanted else None

    def values(feed: dict) -> dict[str, np.ndarray]:
        return {**(dict(zip(wanted, sess.run(wanted, feed))) if sess else {}), **{n: feed[n] for n in fed}}

    single = samples.fixed_batch or 1
    per_run = sum(v.nbytes for v in values(samples.feed(single)).values())
    batch = int(max(1, min(batch_size, memory_bytes // max(2 * per_run // single, 1))))
    channel_max = {n: np.zeros(0, np.float32) for n in names}
    total = samples.num_batches(batch)
    for index, feed in enumerate(samples.batches(batch)):
        progress("quantize", index, total, "activation smoothing: channel ranges")
        for name, value in values(feed).items():
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float32)
            channel_max[name] = peak if not channel_max[name].size else np.maximum(channel_max[name], peak)
    count = int(max(1, min(ERROR_SAMPLES, memory_bytes // max(2 * per_run, 1))))
    runs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in samples.spread(count * single).batches(single):
        for name, value in values(feed).items():
            runs[name].append(np.asarray(value, np.float32))
    return channel_max, runs


def _weight_summary(view: GraphView, consumers: Sequence[Layer]) -> tuple[np.ndarray, list[np.ndarray]]:
    """max_k |W_jk| over every consumer's weight, and evenly spaced columns of each (``ERROR_COLUMNS`` in all),
    read one weight at a time."""
    per_consumer = max(1, ERROR_COLUMNS // len(consumers))
    row_max, columns = None, []
    for layer in consumers:
        weight = _weight_kn(view, layer)
        peak = np.abs(weight).max(axis=1)
        row_max = peak if row_max is None else np.maximum(row_max, peak)
        columns.append(np.ascontiguousarray(weight[:, evenly_spaced(weight.shape[1], per_consumer)]))
        del weight
    return row_max, columns


def _scales(channel_max: np.ndarray, row_max: np.ndarray, alpha: float) -> np.ndarray:
    weight_max = row_max.astype(np.float64)
    x_max = channel_max.astype(np.float64)
    usable = (x_max > 0) & (weight_max > 0)
    scales = np.ones_like(x_max)
    scales[usable] = x_max[usable] ** alpha / weight_max[usable] ** (1 - alpha)
    return scales.astype(np.float32)


def _choose(runs: list[np.ndarray], channel_max: np.ndarray, row_max: np.ndarray, weights: list[np.ndarray],
            q_max: int) -> tuple[float | None, float, float]:
    """(α or None, the error without smoothing, the error with the choice); ``weights``: the sampled columns."""
    rows = [r.reshape(-1, r.shape[-1]) for r in runs]
    total = sum(len(r) for r in rows)
    affordable = ERROR_PRODUCT // max(rows[0].shape[1] * sum(w.shape[1] for w in weights), 1)
    keep = evenly_spaced(total, min(ERROR_ROWS, max(MIN_ERROR_ROWS, affordable)))
    x = np.concatenate(rows)[keep]
    references = [x @ w for w in weights]

    def error(scales: np.ndarray) -> float:
        rounded = np.concatenate([_round_run(r / scales) for r in rows])[keep]
        total_error = 0.0
        for w, y in zip(weights, references):
            y_hat = rounded @ _round_columns(w * scales[:, None], q_max)
            total_error += float(np.sum((y_hat - y).astype(np.float64) ** 2) / max(np.sum(y.astype(np.float64) ** 2),
                                                                                   1e-30))
        return total_error / len(weights)

    before = error(np.ones(x.shape[1], np.float32))
    best, best_error = None, before
    for alpha in ALPHAS:
        candidate = error(_scales(channel_max, row_max, alpha))
        if candidate < best_error:
            best, best_error = alpha, candidate
    return best, before, best_error


def _round_run(x: np.ndarray) -> np.ndarray:
    """x as onnxruntime's DynamicQuantizeLinear rounds it (then dequantized): uint8 over [min(x, 0), max(x, 0)],
    in float32 as it computes."""
    lo, hi = np.float32(min(float(x.min()), 0.0)), np.float32(max(float(x.max()), 0.0))
    if hi == lo:
        return x
    scale = np.float32((hi - lo) / np.float32(LEVELS))
    zero = np.float32(np.round(np.clip(-lo / scale, 0, LEVELS)))
    return (np.clip(np.round(x / scale) + zero, 0, LEVELS) - zero) * scale


def _round_columns(w: np.ndarray, q_max: int) -> np.ndarray:
    scale = np.abs(w).max(axis=0, keepdims=True) / q_max
    scale[scale == 0] = 1.0
    return (np.clip(np.round(w / scale), -q_max, q_max) * scale).astype(np.float32)


def _folding(view: GraphView, tensor: str, consumers: Sequence[Layer], fresh: FreshNames,
             heads: dict[int, tuple[ChannelGroup, dict[int, Layer]]]) -> Callable[[np.ndarray], str] | None:
    """How ``tensor`` · diag(1/s) can be computed by what produces it, as a function of 1/s that does it and says
    what it did; None when nothing else reads ``tensor`` is not the case or no producer takes it (a Mul node)."""
    readers = set(view.consumers.get(tensor, []))
    if readers != {layer.node_index for layer in consumers} or tensor in view.output_names or \
            tensor not in view.producer:
        return None
    producer = view.nodes[view.producer[tensor]]
    return _into_producer(view, producer, consumers[0].in_features, fresh) or \
        _into_values(view, consumers[0], fresh, heads)


def _add_mul(model: onnx.ModelProto, view: GraphView, tensor: str, consumers: Sequence[Layer], inverse: np.ndarray,
             fresh: FreshNames, added: dict[int, list[onnx.NodeProto]]) -> str:
    """``consumers`` read ``tensor`` · diag(``inverse``) from a Mul node, to go right after the producer."""
    name = fresh.name(f"{tensor}_smooth")
    smoothed, factor = fresh.name(f"{tensor}_smoothed"), fresh.name(f"{tensor}_smooth_scale")
    model.graph.initializer.append(numpy_helper.from_array(inverse.astype(np.float32), factor))
    for layer in consumers:
        view.nodes[layer.node_index].input[0] = smoothed
    added.setdefault(view.producer.get(tensor, -1), []).append(
        helper.make_node("Mul", [tensor, factor], [smoothed], name=name))
    return f"Mul node {name!r}"


def _into_producer(view: GraphView, producer: onnx.NodeProto, channels: int, fresh: FreshNames
                   ) -> Callable[[np.ndarray], str] | None:
    """A producer per-channel linear on the last axis: a LayerNormalization over the last axis (its scale and
    bias), or a Mul by a constant of one value per channel (a scalar stays one: GELU's ·0.5 is matched as a scalar
    when onnxruntime fuses the Gelu)."""
    if producer.op_type == "LayerNormalization" and attribute(producer, "axis", -1) == -1:
        params = [(position, name) for position, name in enumerate(producer.input[1:3], start=1) if name]
        if not all(_fixed(view, n) and view.constant(n).shape == (channels,) for _, n in params):
            return None

        def fold(inverse: np.ndarray) -> str:
            for position, name in params:
                _replace_constant(view, producer, position, view.constant(name) * inverse, fresh)
            return f"LayerNormalization {producer.name!r}"
        return fold
    if producer.op_type == "Mul":
        for position in (0, 1):
            name = producer.input[position]
            if _fixed(view, name) and view.constant(name).shape[-1:] == (channels,) and \
                    view.constant(name).size == channels:
                def fold(inverse: np.ndarray, position=position, name=name) -> str:
                    value = view.constant(name)
                    _replace_constant(view, producer, position, value * inverse.reshape(value.shape), fresh)
                    return f"Mul {producer.name!r} (its constant)"
                return fold
    return None


def _into_values(view: GraphView, consumer: Layer, fresh: FreshNames,
                 heads: dict[int, tuple[ChannelGroup, dict[int, Layer]]]) -> Callable[[np.ndarray], str] | None:
    """``consumer`` the output projection of an attention whose heads are recognized (``heads.py``: its input
    channel c is channel c of the value projection, through the head split and merge): the factor goes into the
    value projection's output columns and its bias."""
    if consumer.node_index not in heads:
        return None
    group, by_node = heads[consumer.node_index]
    merged = view.nodes[view.producer[consumer.input_name]]  # Reshape(Transpose(P · V_h))
    transposed = view.nodes[view.producer[merged.input[0]]] if merged.input[0] in view.producer else None
    product = view.nodes[view.producer[transposed.input[0]]] if transposed and transposed.input[0] in view.producer \
        else None
    if merged.op_type != "Reshape" or transposed is None or transposed.op_type != "Transpose" or product is None \
            or product.op_type != "MatMul":
        return None
    tensor, path = product.input[1], []
    for _ in range(6):  # back through the head split (Transpose, Reshape) and the per-channel members
        index = view.producer.get(tensor)
        if index is None:
            return None
        if index in group.producers:
            break
        path.append(index)
        tensor = next((n for n in view.nodes[index].input if n and not view.is_constant(n)), "")
    else:
        return None
    values = by_node.get(index)
    if values is None:
        return None
    biases = [(i, next(p for p, n in enumerate(view.nodes[i].input) if view.is_constant(n)))
              for i in path if i in group.through and view.nodes[i].op_type == "Add"]
    if values.bias_name:  # a Gemm's own bias (input 2)
        biases.append((index, 2))
    if view.initializer_users(values.weight_name) != [index] or \
            not all(_fixed(view, view.nodes[i].input[p]) for i, p in biases):
        return None

    def fold(inverse: np.ndarray) -> str:
        _write_weight(view, values, _weight_kn(view, values) * inverse[None, :])
        for member, position in biases:
            node = view.nodes[member]
            bias = view.constant(node.input[position])
            _replace_constant(view, node, position, np.broadcast_to(bias.reshape(-1), inverse.shape) * inverse,
                              fresh)
        return f"value projection {values.name!r}"
    return fold


def _fixed(view: GraphView, name: str) -> bool:
    """A constant the user cannot override (an initializer not declared as a graph input)."""
    return view.is_constant(name) and all(v.name != name for v in view.graph.input)


def _replace_constant(view: GraphView, node: onnx.NodeProto, position: int, value: np.ndarray,
                      fresh: FreshNames) -> None:
    """Input ``position`` of ``node`` holds ``value`` from now on: its initializer rewritten where only this node
    reads it, else a new initializer (the old one stays for its other readers)."""
    name = node.input[position]
    old = view.initializers[name]
    tensor = numpy_helper.from_array(value.astype(onnx.helper.tensor_dtype_to_np_dtype(old.data_type)), name)
    readers = [view.nodes[i] for i in view.initializer_users(name)]
    if all(reader is node for reader in readers) and list(node.input).count(name) == 1:
        old.CopyFrom(tensor)
        return
    tensor.name = fresh.name(f"{name}_smoothed")
    view.graph.initializer.append(tensor)
    node.input[position] = tensor.name
