"""int4 weights (``--quantize w4``): for the size objective, activations stay float.

Each solved weight W = s ⊙ K (K integers in [−7, 7], one scale s per output channel, ``algorithms/projections/
grid.py`` with 4 bits) is stored as K in an int4 initializer (two values per byte) and its scales, and read
through DequantizeLinear(K, s, axis) into the tensor name the layer consumed, so every consumer is unchanged:

    W = DequantizeLinear(K_int4, s, axis)  →  Conv / Gemm / MatMul (float)

int4 DequantizeLinear needs ai.onnx opset 21 and IR version 10: a model below is converted with ONNX's version
converter (an error names what it cannot convert). onnxruntime has no int4 Conv kernel (``docs/RUNTIME.md``):
a default session dequantizes the weights on every call (its constant folding skips DequantizeLinear, kept for
QDQ fusions); with ``session.disable_quant_qdq = 1`` it folds them once, at load, and runs at float speed.
"""

from __future__ import annotations

from typing import Mapping

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UnsupportedModelError
from ..onnxio.weights import array as tensor_values
from ..onnxio.graph import FreshNames
from ..onnxio.load import default_opset
from .qdq import WeightScales

W4_BITS = 4
W4_OPSET = 21
W4_IR_VERSION = 10
Q_MAX = (1 << (W4_BITS - 1)) - 1  # 7


def int4_weights(model: onnx.ModelProto, weights: Mapping[str, WeightScales]) -> onnx.ModelProto:
    """``model`` with each initializer named in ``weights`` (on its 4-bit grid) stored as int4 + scales."""
    out = _at_opset(model)
    graph = out.graph
    fresh = FreshNames(graph)
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for name, solved in weights.items():
        if name not in inits:
            continue
        tensor = inits[name]
        value = tensor_values(tensor).astype(np.float32)
        integers, scales = integer_weights(value, solved)
        stored = numpy_helper.from_array(integers.astype(ml_dtypes.int4), fresh.name(f"{name}_int4"))
        scale = numpy_helper.from_array(scales.astype(np.float32), fresh.name(f"{name}_scale"))
        graph.initializer.remove(tensor)
        graph.initializer.extend([stored, scale])
        nodes.append(helper.make_node("DequantizeLinear", [stored.name, scale.name], [name],
                                      name=fresh.name(f"{name}_DequantizeLinear"), axis=solved.axis))
    kept = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + kept)  # initializers only in: valid anywhere before their consumers
    out.ir_version = max(out.ir_version, W4_IR_VERSION)
    return out


def integer_weights(value: np.ndarray, solved: WeightScales) -> tuple[np.ndarray, np.ndarray]:
    """(K, s): the integers of a weight on its grid along ``solved.axis``, K = round(W / s) in [−7, 7]."""
    scales = np.asarray(solved.scales, np.float32).reshape(-1)
    if scales.size != value.shape[solved.axis]:
        raise ValueError(f"{scales.size} scales for {value.shape[solved.axis]} channels on axis {solved.axis}")
    shape = [1] * value.ndim
    shape[solved.axis] = -1
    integers = np.clip(np.round(value / scales.reshape(shape)), -Q_MAX, Q_MAX).astype(np.int8)
    return integers, scales


def _at_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` at ai.onnx opset ≥ 21."""
    if default_opset(model) >= W4_OPSET:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, W4_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors naming the op it cannot adapt
        raise UnsupportedModelError(f"--quantize w4 stores int4 weights, which need opset {W4_OPSET}; ONNX's "
                                    f"version converter could not bring this opset-{default_opset(model)} model "
                                    f"there: {exc}. Use --quantize int8, or export the model at opset "
                                    f"{W4_OPSET}") from exc
