"""Tiny transformer encoders built with onnx.helper, and a numpy forward of the same model with heads and FFN
neurons zeroed (the reference the sliced graphs are checked against)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN, HEADS, HEAD_DIM, FFN = 16, 4, 4, 24


def encoder_weights(seed: int = 0, bias: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"wq": w(HIDDEN, HIDDEN), "wk": w(HIDDEN, HIDDEN), "wv": w(HIDDEN, HIDDEN),
               "wo": w(HIDDEN, HIDDEN), "w1": w(HIDDEN, FFN), "w2": w(FFN, HIDDEN), "wc": w(2, HIDDEN),
               "ln1_g": 1 + w(HIDDEN, scale=0.1), "ln1_b": w(HIDDEN, scale=0.1),
               "ln2_g": 1 + w(HIDDEN, scale=0.1), "ln2_b": w(HIDDEN, scale=0.1), "bc": w(2, scale=0.1)}
    for name, size in (("bq", HIDDEN), ("bk", HIDDEN), ("bv", HIDDEN), ("bo", HIDDEN), ("b1", FFN), ("b2", HIDDEN)):
        weights[name] = w(size, scale=0.2) if bias else np.zeros(size, np.float32)
    return weights


def tiny_encoder(weights: dict[str, np.ndarray], gelu: str = "erf", bias: bool = True, shapes: str = "concat",
                 ffn_rank: int = 3, fused: bool = False, vocab: int = 0, opset: int = 18) -> onnx.ModelProto:
    """One encoder layer on ``x`` [batch, sequence, 16] with ``attention_mask`` [batch, sequence] (int64),
    then a mean-pooled classifier. ``gelu``: "erf" (x·½(1 + erf(x/√2))), "tanh" (the tanh approximation)
    or "op" (the opset-20 Gelu). ``shapes``: "concat" (head shapes built from Shape/Gather/Concat as
    torch exports them) or "constant" ([0, 0, H, d] constants). ``ffn_rank`` 2: the FFN reads the tokens
    flattened to [batch·sequence, 16]. ``fused``: attention as onnxruntime's fused ``Attention`` op
    (com.microsoft; its QKV weight is not a layer), then the output projection. ``vocab`` > 0: the input is
    ``input_ids`` [batch, sequence] (int64), looked up in an embedding table of that many rows."""
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(x, w, b, name):
        y = node("MatMul", [x, const(w, weights[w])], f"{name}/MatMul")
        return node("Add", [const(b, weights[b]), y], f"{name}/Add") if bias else y

    if vocab:
        table = np.random.default_rng(5).standard_normal((vocab, HIDDEN)).astype(np.float32)
        nodes.append(helper.make_node("Gather", [const("embedding", table), "input_ids"], ["x"], name="embed"))
    # the mask term: (1 - mask) · (-10000), broadcast over heads and query positions
    m = node("Unsqueeze", ["attention_mask", const("axes12", np.array([1, 2], np.int64))], "mask/Unsqueeze")
    m = node("Cast", [m], "mask/Cast", to=TensorProto.FLOAT)
    m = node("Sub", [const("one", np.float32(1.0)), m], "mask/Sub")
    mask_term = node("Mul", [m, const("neg", np.float32(-10000.0))], "mask/Mul")

    if shapes == "concat":
        shape = node("Shape", ["x"], "attn/Shape")
        batch = node("Unsqueeze", [node("Gather", [shape, const("i0", np.int64(0))], "attn/Gather0"),
                                   const("ax0", np.array([0], np.int64))], "attn/Unsqueeze0")
        seq = node("Unsqueeze", [node("Gather", [shape, const("i1", np.int64(1))], "attn/Gather1"),
                                 const("ax0b", np.array([0], np.int64))], "attn/Unsqueeze1")

        def split_shape(tag):
            return node("Concat", [batch, seq, const(f"heads_{tag}", np.array([HEADS], np.int64)),
                                   const(f"dim_{tag}", np.array([HEAD_DIM], np.int64))], f"attn/Concat_{tag}", axis=0)
        merge_shape = node("Concat", [batch, seq, const("width", np.array([HIDDEN], np.int64))], "attn/Concat_o",
                           axis=0)
    else:
        def split_shape(tag):
            return const(f"split_{tag}", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
        merge_shape = const("merge", np.array([0, 0, HIDDEN], np.int64))

    if fused:
        qkv_w = np.concatenate([weights["wq"], weights["wk"], weights["wv"]], axis=1)
        qkv_b = np.concatenate([weights["bq"], weights["bk"], weights["bv"]])
        index = node("Cast", ["attention_mask"], "mask/Int32", to=TensorProto.INT32)
        nodes.append(helper.make_node("Attention", ["x", const("qkv_w", qkv_w), const("qkv_b", qkv_b), index],
                                      ["attn/fused"], name="attn/Attention", domain="com.microsoft",
                                      num_heads=HEADS))
    heads = {}
    for tag, perm in (() if fused else (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3]))):
        y = linear("x", f"w{tag}", f"b{tag}", f"attn/{tag}")
        y = node("Reshape", [y, split_shape(tag)], f"attn/Reshape_{tag}")
        heads[tag] = node("Transpose", [y], f"attn/Transpose_{tag}", perm=perm)
    if fused:
        c = "attn/fused"
    else:
        s = node("MatMul", [heads["q"], heads["k"]], "attn/scores")
        s = node("Div", [s, const("scale", np.float32(math.sqrt(HEAD_DIM)))], "attn/Div")
        s = node("Add", [s, mask_term], "attn/AddMask")
        p = node("Softmax", [s], "attn/Softmax", axis=-1)
        c = node("MatMul", [p, heads["v"]], "attn/context")
        c = node("Transpose", [c], "attn/Transpose_o", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, merge_shape], "attn/Reshape_o")
    o = linear(c, "wo", "bo", "attn/out")
    h = node("Add", [o, "x"], "attn/Residual")
    h = node("LayerNormalization", [h, const("ln1_g", weights["ln1_g"]), const("ln1_b", weights["ln1_b"])],
             "ln1", axis=-1)
    tokens = h if ffn_rank == 3 else node("Reshape", [h, const("rows", np.array([-1, HIDDEN], np.int64))],
                                          "ffn/Flatten")
    f = linear(tokens, "w1", "b1", "ffn/up")
    f = _gelu(node, const, f, gelu)
    f = linear(f, "w2", "b2", "ffn/down")
    if ffn_rank == 2:
        f = node("Reshape", [f, node("Shape", [h], "ffn/Shape")], "ffn/Unflatten")
    f = node("Add", [f, h], "ffn/Residual")
    f = node("LayerNormalization", [f, const("ln2_g", weights["ln2_g"]), const("ln2_b", weights["ln2_b"])],
             "ln2", axis=-1)
    if opset >= 18:
        nodes.append(helper.make_node("ReduceMean", [f, const("ax1", np.array([1], np.int64))], ["pooled"],
                                      name="pool", keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMean", [f], ["pooled"], name="pool", axes=[1], keepdims=0))
    nodes.append(helper.make_node("Gemm", ["pooled", const("wc", weights["wc"]), const("bc", weights["bc"])],
                                  ["logits"], name="classifier", transB=1))
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]) if vocab else
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if fused else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _gelu(node, const, x, form):
    if form == "op":
        return node("Gelu", [x], "ffn/Gelu")
    if form == "erf":
        e = node("Erf", [node("Div", [x, const("sqrt2", np.float32(math.sqrt(2)))], "ffn/Div")], "ffn/Erf")
        e = node("Add", [e, const("g1", np.float32(1.0))], "ffn/Add1")
        return node("Mul", [node("Mul", [x, e], "ffn/Mul"), const("half", np.float32(0.5))], "ffn/Mul_half")
    cube = node("Mul", [node("Mul", [x, x], "ffn/Sq"), x], "ffn/Cube")
    inner = node("Add", [x, node("Mul", [cube, const("c", np.float32(0.044715))], "ffn/MulC")], "ffn/Inner")
    t = node("Tanh", [node("Mul", [inner, const("k", np.float32(math.sqrt(2 / math.pi)))], "ffn/MulK")],
             "ffn/Tanh")
    t = node("Add", [t, const("g1", np.float32(1.0))], "ffn/Add1")
    return node("Mul", [node("Mul", [x, t], "ffn/Mul"), const("half", np.float32(0.5))], "ffn/Mul_half")


def reference(weights: dict[str, np.ndarray], x: np.ndarray, mask: np.ndarray, gelu: str = "erf",
              kept_heads=None, kept_neurons=None) -> np.ndarray:
    """The encoder in numpy (float64), with the heads not in ``kept_heads`` and the FFN neurons not in
    ``kept_neurons`` removed (their W_o rows / W2 rows zeroed)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    x = x.astype(np.float64)
    batch, seq, _ = x.shape

    def split(t):
        return t.reshape(batch, seq, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)

    q, k, v = (split(x @ w[f"w{t}"] + w[f"b{t}"]) for t in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(HEAD_DIM) + (1 - mask[:, None, None, :]) * -10000.0
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    context = (p @ v).transpose(0, 2, 1, 3).reshape(batch, seq, HIDDEN)
    wo = w["wo"].copy()
    if kept_heads is not None:
        for head in set(range(HEADS)) - set(kept_heads):
            wo[head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
    h = _layer_norm(context @ wo + w["bo"] + x, w["ln1_g"], w["ln1_b"])
    f = h @ w["w1"] + w["b1"]
    if gelu == "tanh":
        f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
    else:
        from math import erf
        f = 0.5 * f * (1 + np.vectorize(erf)(f / math.sqrt(2)))
    w2 = w["w2"].copy()
    if kept_neurons is not None:
        w2[np.setdiff1d(np.arange(FFN), kept_neurons)] = 0
    out = _layer_norm(f @ w2 + w["b2"] + h, w["ln2_g"], w["ln2_b"])
    return out.mean(axis=1) @ w["wc"].T + w["bc"]


def _layer_norm(x, gain, shift):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * gain + shift


def encoder_inputs(count: int = 8, seq: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((count, seq), np.int64)
    for i in range(count):
        mask[i, rng.integers(2, seq + 1):] = 0
    return {"x": rng.standard_normal((count, seq, HIDDEN)).astype(np.float32), "attention_mask": mask}
