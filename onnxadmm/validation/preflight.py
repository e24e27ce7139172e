"""Preflight (``onnxadmm check``): which layers would be compressed, which are declined and why, the channel
groups, MACs and parameters — without calibration data."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..analysis.channels import find_channel_groups
from ..analysis.layers import Declined, apply_exclude, find_layers
from ..bridge.torch_layer import BridgeError, activation_function, converter_missing
from ..config import CheckConfig, CompressConfig
from ..cost.footprint import footprint
from ..methods import REGISTRY
from ..onnxio.graph import GraphView, model_inputs
from ..onnxio.load import as_loaded, default_opset
from ..onnxio.normalize import normalize
from ..onnxio.runtime import session
from ..report.schema import CheckReport, CompressibleLayer, GroupSummary, ModelFile


def check(model: Any, config: CheckConfig | CompressConfig = CheckConfig()) -> CheckReport:
    """Preflight: which layers would be compressed, which are declined and why, MACs and params. What
    ``compress`` would refuse before any work (unreadable text, a failed full check, a node onnxruntime
    cannot run) raises here the same error."""
    loaded = as_loaded(model)
    normalized = normalize(loaded.model)
    session(normalized.model, 1)  # compress calibrates in onnxruntime: a model it cannot load is refused
    view = normalized.view()
    method = REGISTRY.get(config.method)  # None: the search, which tries several methods
    everything = find_layers(view)
    found = apply_exclude(everything, config.exclude)
    found = method.declines(found, config) if method else found
    compressible, declined = [], list(found.declined)
    for layer in found.layers:
        try:
            activation_function(view, layer)
        except BridgeError as exc:
            declined.append(Declined(layer.name, layer.op_type, str(exc)))
            continue
        compressible.append(CompressibleLayer(layer.name, layer.op_type, list(layer.weight_shape), layer.groups,
                                              layer.chain.description if layer.chain else "none", layer.num_weights))
    groups = [GroupSummary(g.name, g.channels, len(g.producers), [c.layer for c in g.consumers], g.declined)
              for g in find_channel_groups(view, found.layers)]
    return CheckReport(ModelFile.of(loaded), config.method, loaded.notes, normalized.rewrites, compressible, declined,
                       groups, _preview(method, view, everything, found, config), _unsupported_ops(view),
                       _estimate(loaded.model, view))


def _preview(method, view: GraphView, everything, found, config) -> list[str]:
    """What the method would do; for the search, what each of its candidate families would."""
    if method is not None:
        return method.preview(view, everything.layers, found.layers, config)
    lines = ["the search (a budget and no --method) tries int8 alone, then channels + int8 (--objective latency) "
             "or sparsity + int8 (--objective size):"]
    return lines + REGISTRY["channel"].preview(view, everything.layers, found.layers, config)


def _unsupported_ops(view: GraphView) -> list[dict]:
    """(op, opset) pairs onnx2torch has no converter for: fine outside layers, listed for information."""
    opset = default_opset(view.model)
    seen = {}
    for node in view.nodes:
        key = (node.domain or "ai.onnx", node.op_type)
        if key not in seen and converter_missing(node, opset):
            seen[key] = {"domain": key[0], "op_type": node.op_type, "opset": opset, "first_node": node.name}
    return list(seen.values())


def _estimate(model: onnx.ModelProto, view: GraphView) -> dict:
    feed = {}
    for name, tensor_type in model_inputs(view).items():
        if tensor_type.shape is None or any(not isinstance(d, int) for d in tensor_type.shape[1:]):
            return {"macs": None, "params": None, "reason": f"input {name!r} has dynamic dimensions"}
        feed[name] = np.zeros((1, *tensor_type.shape[1:]), dtype=tensor_type.dtype)
    try:
        fp = footprint(model, feed)
    except Exception as exc:  # noqa: BLE001 - an estimate must not stop the preflight
        return {"macs": None, "params": None, "reason": f"onnxruntime could not run it: {exc}"}
    return {"macs_per_sample": fp.macs, "params": fp.params, "layer_weights": fp.layer_weights}
