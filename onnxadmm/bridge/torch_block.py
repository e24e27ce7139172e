"""A block of the graph as a trainable torch module (onnx2torch), and the tensors in it that hold the
weights of given layers, so block-wise refinement can train them and write them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
import torch

from ..onnxio.graph import GraphView, TensorType
from ..onnxio.subgraph import cut
from .torch_layer import check_convertible, onnx_to_torch


@dataclass
class BlockModule:
    module: torch.nn.Module
    input_names: list[str]  # positional order of the module's inputs
    output_names: list[str]

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        out = self.module(*(inputs[name] for name in self.input_names))
        return list(out) if isinstance(out, (tuple, list)) else [out]


def convert_block(view: GraphView, node_ids: list[int], outputs: list[str], values: Mapping[str, np.ndarray],
                  input_types: Mapping[str, TensorType] | None = None) -> BlockModule:
    """The nodes ``node_ids`` as a torch module computing ``outputs``, with initializers replaced by
    ``values`` where given. BridgeError names the node onnx2torch cannot convert."""
    check_convertible(view, node_ids)
    model = cut(view, node_ids, outputs, input_types, values, name="onnxadmm_block")
    module = onnx_to_torch(model, view.nodes[node_ids[0]])
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.requires_grad_(False)
    return BlockModule(module, [v.name for v in model.graph.input], list(outputs))


@dataclass
class WeightHandle:
    """A tensor of the module holding one ONNX initializer (possibly transposed, as onnx2torch stores
    Gemm's B for a Linear)."""

    tensor: torch.Tensor
    transposed: bool

    def to_onnx(self) -> np.ndarray:
        value = self.tensor.detach().numpy()
        return np.ascontiguousarray(value.T if self.transposed else value)


def find_weights(block: BlockModule, arrays: Mapping[str, np.ndarray]) -> dict[str, WeightHandle]:
    """For each initializer in ``arrays``, the module tensor with exactly its value (or its transpose).
    An initializer whose value is held by several tensors, or by none, is left out."""
    tensors = [t for t in [*block.module.parameters(), *block.module.buffers()] if t.is_floating_point()]
    found = {}
    for name, array in arrays.items():
        array = np.asarray(array, dtype=np.float32)
        matches = []
        for tensor in tensors:
            value = tensor.detach().numpy()
            if value.shape == array.shape and np.array_equal(value, array):
                matches.append(WeightHandle(tensor, False))
            elif array.ndim == 2 and value.shape == array.T.shape and np.array_equal(value, array.T):
                matches.append(WeightHandle(tensor, True))
        if len(matches) == 1:
            found[name] = matches[0]
    return found


def onnx_float32(model: onnx.ModelProto) -> bool:
    """True when every initializer of the model is float32 or not floating point."""
    floats = {onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return not any(t.data_type in floats for t in model.graph.initializer)
