"""Layers kept float where their int8 form is slower (``--quantize int8 --objective latency``).

Integer kernels do not win everywhere: on small layers (a LeNet-5's, a stem conv with one input channel) the
int8 kernel plus its layout changes takes longer than the float kernel. Two steps:

1. Proposal: each integer layer alone, its int8 form against its fp32 form at ``--latency-batch``
   (``LatencyTable.int8_node_ratio``: static QDQ timed uint8 in, uint8 out, as between int8 neighbours).
   A layer with ratio > 1 is proposed float.
2. Decision on the whole graph: the model with every layer int8, the one with the proposed layers float, and
   the float model (every layer float: the original's latency) — each timed A/B against the float model
   (cached per graph structure, so a repeated run on this machine chooses the same); the fastest is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx

from ..cost.footprint import node_macs
from ..onnxio import weights
from ..plan.latency import LatencyTable

@dataclass
class FloatFallback:
    """What the latency objective measured and kept."""

    layer_ratios: dict[str, float]  # integer layer -> its int8 / fp32 time alone
    whole_model: dict[str, float]  # form -> the form's latency over the float model's
    chosen: str  # "int8" (every layer), "mixed" (the proposed layers float) or "float" (every layer)
    kept_float: list[str]  # layers the chosen model runs in float

    def as_dict(self) -> dict:
        return {"layer_int8_over_float": self.layer_ratios, "whole_model_over_float": self.whole_model,
                "chosen": self.chosen, "kept_float": self.kept_float}


def keep_faster_float(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, integer_layers: Sequence[str],
                      export: Callable[[Sequence[str]], onnx.ModelProto], feed: dict[str, np.ndarray],
                      threads: int, precision: str, progress: Callable[[str, int, int, str], None]
                      ) -> tuple[onnx.ModelProto, FloatFallback]:
    """The fastest of ``int8_model``, ``export(proposed layers)`` (int8 except those, kept float) and
    ``float_model`` on ``feed``, with what was measured. ``integer_layers`` are the node names of
    ``float_model`` that ``int8_model`` runs as integer kernels."""
    table = LatencyTable(threads, precision=precision)
    try:
        ratios = _layer_ratios(float_model, integer_layers, feed, table, progress)
        proposed = [name for name in integer_layers if ratios[name] > 1.0]
        forms = {"int8": (int8_model, [])}
        if proposed and len(proposed) < len(integer_layers):
            forms["mixed"] = (export(proposed), proposed)
        whole = {}
        for index, (form, (model, _)) in enumerate(forms.items()):
            progress("int8 latency", index, len(forms), f"whole graph, {form}")
            whole[form] = round(table.plan_ratio(float_model, model, feed, precision="none"), 4)  # as they are
    finally:
        table.save()
    whole["float"] = 1.0
    chosen = min(whole, key=whole.get)
    model, kept = forms[chosen] if chosen != "float" else (float_model, list(integer_layers))
    return model, FloatFallback(ratios, whole, chosen, kept)


def _layer_ratios(model: onnx.ModelProto, names: Sequence[str], feed: dict[str, np.ndarray], table: LatencyTable,
                  progress) -> dict[str, float]:
    """Layer name -> its int8 / fp32 time alone, at the shapes ``feed`` gives it."""
    index_of = {node.name: i for i, node in enumerate(model.graph.node)}
    costs = node_macs(model, feed)
    constants = {t.name: t for t in model.graph.initializer}
    ratios = {}
    for done, name in enumerate(names):
        node = model.graph.node[index_of[name]]
        progress("int8 latency", done, len(names), f"{name} alone, int8 vs float")
        weight = weights.array(constants[node.input[1]])
        ratios[name] = round(table.int8_node_ratio(node, costs[index_of[name]].input_shape, weight)[1], 4)
    return ratios
