"""Fusion coverage: which weight layers onnxruntime runs as integer kernels in an int8 model.

The quantized model is optimized by onnxruntime (the level that runs the QDQ fusions); a Conv/Gemm/MatMul of
the float model is *integer* when its node became an integer kernel (QLinearConv, QGemm, QLinearMatMul,
MatMulIntegerToFloat, ConvInteger, MatMulInteger, DynamicQuantizeMatMul) and *float* otherwise, with the reason
(no DequantizeLinear in front; no QuantizeLinear after it to fuse with; not a product with a constant weight,
which the dynamic form needs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

import onnx

from ..onnxio.runtime import session, session_options
from ..onnxio.scratch import scratch_folder
from .dynamic import dynamic_products

INTEGER_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
                   "DynamicQuantizeMatMul", "NhwcQLinearConv"}
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class FusionCoverage:
    """Which weight layers onnxruntime runs as integer kernels after its graph optimizations."""

    integer: list[str] = field(default_factory=list)
    float: list[dict] = field(default_factory=list)  # {"name", "op_type", "reason"}

    @property
    def fraction(self) -> float:
        total = len(self.integer) + len(self.float)
        return len(self.integer) / total if total else 1.0

    def as_dict(self) -> dict:
        return {"integer": self.integer, "float": self.float, "fraction_integer": self.fraction}


def fusion_coverage(quantized: onnx.ModelProto, layer_nodes: Mapping[str, str]) -> FusionCoverage:
    """For each weight layer (node name -> op type), whether the optimized quantized graph runs it as an
    integer kernel. onnxruntime gives a fused node the name of the node it replaces."""
    import onnxruntime as ort

    optimized = {node.name: node for node in _optimized(quantized, ort).graph.node}
    by_output = {node.output[0]: node for node in quantized.graph.node if node.output}
    by_name = {node.name: node for node in quantized.graph.node}
    dynamic = dynamic_products(quantized)
    coverage = FusionCoverage()
    for name, op_type in layer_nodes.items():
        node = optimized.get(dynamic.get(name, name))
        if node is not None and node.op_type in INTEGER_KERNELS:
            coverage.integer.append(name)
            continue
        source = by_name.get(name)
        if dynamic and name not in dynamic:
            reason = (f"stays float {op_type}: dynamic int8 covers MatMul/Gemm with a constant 2-D weight only "
                      "(a Gemm with alpha = beta = 1 and no transA)")
        elif node is None:
            reason = "not found after optimization (fused into another node)"
        elif source is None or not any(by_output.get(i) is not None and by_output[i].op_type == "DequantizeLinear"
                                       for i in source.input[:1]):
            reason = f"runs as float {node.op_type}: its input is not quantized (no DequantizeLinear in front)"
        else:
            reason = (f"runs as float {node.op_type}: onnxruntime did not fuse its Q/DQ (no Q after it, or an "
                      "activation between without an integer kernel)")
        coverage.float.append({"name": name, "op_type": op_type, "reason": reason})
    return coverage


def _optimized(model: onnx.ModelProto, ort) -> onnx.ModelProto:
    """The graph after onnxruntime's extended optimizations (where the QDQ fusions run), without its weights:
    the session is built from files for a large model, does not pre-pack its weights (it never runs), and
    writes the optimized graph's initializers to a file that is not read back."""
    options = session_options(1, True)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.add_session_config_entry("session.disable_prepacking", "1")
    with scratch_folder("onnxadmm-fusion-") as folder:
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        session(model, options=options)
        return onnx.load(options.optimized_model_filepath, load_external_data=False)
