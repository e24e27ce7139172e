"""Tiny ONNX models built in code for the tests (no files, no test-bed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Accumulates nodes and initializers; ``model()`` wraps them with dynamic-batch I/O."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower() + "_out") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_"), **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, *shape: int, scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (self.rng.standard_normal(shape) * (scale or np.sqrt(2.0 / fan_in))).astype(np.float32)

    def conv(self, x: str, cin: int, cout: int, k: int = 3, groups: int = 1, bias: bool = True,
             stride: int = 1, pad: int | None = None, dilation: int = 1, act: str | None = "Relu",
             **extra) -> str:
        pad = k // 2 * dilation if pad is None else pad
        inputs = [x, self.const(self.weight(cout, cin // groups, k, k), "W")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "B"))
        attrs = dict(kernel_shape=[k, k], group=groups, strides=[stride, stride],
                     dilations=[dilation, dilation], **extra)
        if "auto_pad" not in extra:
            attrs["pads"] = [pad] * 4
        y = self.node("Conv", inputs, **attrs)
        return self.activation(y, act)

    def gemm(self, x: str, k: int, n: int, trans_b: bool = True, alpha: float = 1.0, beta: float = 1.0,
             bias: bool = True, act: str | None = "Relu") -> str:
        w = self.weight(n, k)
        inputs = [x, self.const(w if trans_b else w.T.copy(), "W")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(n) * 0.1).astype(np.float32), "B"))
        y = self.node("Gemm", inputs, transB=int(trans_b), alpha=alpha, beta=beta)
        return self.activation(y, act)

    def matmul(self, x: str, k: int, n: int, act: str | None = None) -> str:
        y = self.node("MatMul", [x, self.const(self.weight(k, n).reshape(k, n), "W")])
        return self.activation(y, act)

    def activation(self, y: str, act: str | None) -> str:
        if act is None:
            return y
        if act == "Relu6":
            return self.node("Clip", [y, self.const(np.array(0, np.float32)), self.const(np.array(6, np.float32))])
        if act == "SiLU":
            return self.node("Mul", [y, self.node("Sigmoid", [y])])
        if act == "LeakyRelu":
            return self.node("LeakyRelu", [y], alpha=0.1)
        return self.node(act, [y])

    def model(self, inputs: list[tuple[str, list]], outputs: list[str], opset: int = OPSET,
              ir_version: int = 8) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
        model.producer_name = "tests"
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for index, out in enumerate(outputs):
            if out in known and known[out].type.tensor_type.HasField("shape"):
                model.graph.output[index].CopyFrom(known[out])
        onnx.checker.check_model(model)
        return model


def tiny_cnn(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Conv -> depthwise Conv -> grouped Conv -> residual Add -> GAP -> Gemm: a small classifier."""
    b = GraphBuilder(seed)
    x = b.conv("input", 3, 16, act="Relu")
    y = b.conv(x, 16, 16, groups=16, act="Relu6")  # depthwise
    y = b.conv(y, 16, 16, k=1, groups=2, act=None)  # grouped 1x1
    y = b.node("Relu", [b.node("Add", [y, x])])  # residual
    y = b.conv(y, 16, 32, stride=2, act="Relu")
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])])
    logits = b.gemm(y, 32, classes, act=None)
    return b.model([("input", ["N", 3, 12, 12])], [logits])


def mlp(seed: int = 0, trans_b: bool = True, alpha: float = 1.0, beta: float = 1.0) -> onnx.ModelProto:
    b = GraphBuilder(seed)
    h = b.gemm("input", 32, 64, trans_b=trans_b, alpha=alpha, beta=beta, act="Relu")
    h = b.gemm(h, 64, 48, trans_b=not trans_b, alpha=alpha, act="LeakyRelu")
    logits = b.gemm(h, 48, 10, act=None)
    return b.model([("input", ["N", 32])], [logits])


def token_mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul on 3-D input [N, T, K] (transformer-style), Gelu-free: MatMul -> Relu -> MatMul."""
    b = GraphBuilder(seed)
    h = b.matmul("input", 16, 32, act="Relu")
    out = b.matmul(h, 32, 16, act=None)
    return b.model([("input", ["N", 5, 16])], [out])


def samples_for(model: onnx.ModelProto, count: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Standard-normal samples for every (float) input, batch axis first."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim][1:]
        out[value.name] = rng.standard_normal((count, *dims)).astype(np.float32)
    return out


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def to_float16(model: onnx.ModelProto, keep_io_types: bool) -> onnx.ModelProto:
    """``model`` computing in float16, as onnxconverter-common's converter writes it: float16 weights and
    constants, Casts to float16; float16 inputs and outputs, or (``keep_io_types``) float32 ones read and written
    through Casts."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    del graph.value_info[:]
    tensors = [*graph.initializer, *(a.t for n in graph.node for a in n.attribute if a.type == a.TENSOR)]
    for tensor in tensors:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16
    if not keep_io_types:
        for value in (*graph.input, *graph.output):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
        return half
    head, tail = [], []
    for value in graph.input:
        for node in graph.node:
            node.input[:] = [f"{value.name}_half" if i == value.name else i for i in node.input]
        head.append(helper.make_node("Cast", [value.name], [f"{value.name}_half"], f"{value.name}_to_half",
                                     to=TensorProto.FLOAT16))
    for value in graph.output:
        for node in graph.node:
            node.output[:] = [f"{value.name}_half" if o == value.name else o for o in node.output]
        tail.append(helper.make_node("Cast", [f"{value.name}_half"], [value.name], f"{value.name}_to_float",
                                     to=TensorProto.FLOAT))
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return half
