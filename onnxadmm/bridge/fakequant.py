"""Training-only ops (domain ``onnxadmm``) that give onnx2torch the roundings of an exported int8 model, with
gradients passed straight through, so distillation can train a float graph through them:

    FakeQuantize(x; scale s, zero_point z)   y = s·(clamp(round(x/s) + z, 0, 255) − z)   (uint8, static)
    DynamicFakeQuantize(x)                   the same with s, z from the tensor's own range, as onnxruntime's
                                             DynamicQuantizeLinear takes them at run time ([min(x, 0), max(x, 0)])

The gradient is 1 where x falls inside the representable range, 0 outside (torch's fake-quantize). They exist
only in graphs built for training (``quantize/fakequant.py``); no output file contains them.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node

DOMAIN = "onnxadmm"  # no dot: onnx2torch names modules "<domain>/<node>"
OPS = ("FakeQuantize", "DynamicFakeQuantize")


class FakeQuantize(torch.nn.Module, OnnxToTorchModule):
    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)


class DynamicFakeQuantize(torch.nn.Module, OnnxToTorchModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lo, hi = float(x.min().clamp(max=0)), float(x.max().clamp(min=0))
        if hi <= lo:
            return x
        scale = (hi - lo) / 255.0
        return torch.fake_quantize_per_tensor_affine(x, scale, int(round(-lo / scale)), 0, 255)


_registered = False


def register() -> None:
    """Give onnx2torch converters for the ops above (once)."""
    global _registered
    if _registered:
        return
    add_converter(operation_type="FakeQuantize", version=1, domain=DOMAIN)(
        lambda node, graph: OperationConverterResult(
            torch_module=FakeQuantize(node.attributes["scale"], node.attributes["zero_point"]),
            onnx_mapping=onnx_mapping_from_node(node)))
    add_converter(operation_type="DynamicFakeQuantize", version=1, domain=DOMAIN)(
        lambda node, graph: OperationConverterResult(torch_module=DynamicFakeQuantize(),
                                                     onnx_mapping=onnx_mapping_from_node(node)))
    _registered = True


def with_standard_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each op above replaced by the standard ONNX ops that compute the same, for onnxruntime:
    FakeQuantize(s, z) → QuantizeLinear(s, z) → DequantizeLinear, DynamicFakeQuantize → DynamicQuantizeLinear →
    DequantizeLinear. The same tensor names; ``model`` itself when it has none of them. Run it unoptimized:
    onnxruntime's QDQ rewrites (a Relu before a Q dropped, Q/DQ around an op fused into an integer kernel) change
    what it computes."""
    if not any(node.domain == DOMAIN for node in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for index, node in enumerate(model.graph.node):
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        prefix = f"{node.output[0]}__standard{index}"
        q, s, z = f"{prefix}_q", f"{prefix}_scale", f"{prefix}_zero_point"
        if node.op_type == "FakeQuantize":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            out.graph.initializer.extend([numpy_helper.from_array(np.array(attrs["scale"], np.float32), s),
                                          numpy_helper.from_array(np.array(attrs["zero_point"], np.uint8), z)])
            nodes.append(helper.make_node("QuantizeLinear", [node.input[0], s, z], [q], f"{prefix}_Q"))
        else:
            nodes.append(helper.make_node("DynamicQuantizeLinear", [node.input[0]], [q, s, z], f"{prefix}_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [node.output[0]], f"{prefix}_DQ"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
