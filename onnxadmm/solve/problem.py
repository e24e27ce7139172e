"""Build one layer's reconstruction problem from the activation stream.

Output positions are sampled per batch (a fixed quota per sample, deterministic in the seed and the
layer's index), and at each position we keep the compressed-model input patch x̂, the original
pre-activation y = W₀x + b₀, and the chain's side inputs from both models. Memory is bounded by the
patch cap, not by the number of calibration samples.

Token rows of a sequence model ([batch, sequence, K] inputs) are sampled only where the token mask (an
input such as ``attention_mask``, 0 at padding) is nonzero: padded positions never reach the model's
outputs, and fitting them would spend the layer's least squares on tokens that do not exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..algorithms.patches import conv_patches, resolve_conv, sample_positions
from ..algorithms.problem import LayerProblem
from ..analysis.layers import Layer
from ..bridge.torch_layer import BridgeError, verify_layer
from ..calib.stream import COMPRESSED, ORIGINAL, ActivationStream
from ..errors import ConfigError
from ..onnxio.graph import GraphView


class SamplingError(Exception):
    """The tensors seen at run time do not fit the layer's static description, or the solver's arithmetic."""


# a layer input whose largest magnitude is outside this range leaves float32 arithmetic in the solver: sums of
# about 1e6 rows of x² overflow above it, and x² falls below float32's normal numbers under it; trained
# networks stay many orders inside it
INPUT_RANGE = (1e-15, 1e15)


@dataclass(frozen=True)
class SampleSettings:
    max_patches: int = 65536
    memory_bytes: int = 512 << 20
    seed: int = 0
    token_mask: str | None = None  # graph input [batch, sequence]: rows at its zeros are not sampled


def token_mask_input(view: GraphView, requested: str) -> str | None:
    """The graph input that masks padding tokens: ``requested`` by name, or for 'auto' an input named
    ``attention_mask`` of rank 2 ([batch, sequence]) when there is one; None for 'none'."""
    if requested == "none":
        return None
    name = "attention_mask" if requested == "auto" else requested
    tensor = view.types.get(name)
    if name in view.input_names and tensor is not None and tensor.shape is not None and len(tensor.shape) == 2:
        return name
    if requested == "auto":
        return None
    raise ConfigError(f"--token-mask {requested!r}: the model has no input of that name shaped [batch, sequence] "
                      f"(inputs: {', '.join(view.input_names)})")


def patch_budget(layer: Layer, num_sides: int, settings: SampleSettings) -> int:
    """Patches kept: the cap, lowered so x̂ (G·d), y and the side inputs fit the memory share."""
    floats_per_patch = layer.groups * layer.in_features + layer.out_features * (2 + 2 * num_sides)
    return min(settings.max_patches, max(256, settings.memory_bytes // (4 * floats_per_patch)))


def sample_problem(stream: ActivationStream, layer: Layer, layer_index: int, w0: np.ndarray,
                   b0: np.ndarray, activation, fit_bias: bool, settings: SampleSettings,
                   total_samples: int, verify: bool = True) -> LayerProblem:
    """Gather the problem of ``layer`` (canonical ``w0`` (G,R,d), ``b0`` (Cout)) over all batches."""
    sides = list(layer.chain.side_inputs) if layer.chain else []
    budget = patch_budget(layer, len(sides), settings)
    w0_t = torch.from_numpy(np.require(w0, np.float32, ["C", "W"]))  # shares ``w0`` when it can (no second copy)
    b0_t = torch.from_numpy(np.array(b0, np.float32))
    parts = {"x_hat": [], "y": [], "ids": [], "side_hat": [[] for _ in sides], "side_ref": [[] for _ in sides]}
    first_sample = 0  # global index of the batch's first calibration sample
    for batch in range(stream.num_batches):
        x_ref = torch.from_numpy(np.array(stream.get(ORIGINAL, layer.input_name, batch), dtype=np.float32))
        x_hat = torch.from_numpy(np.array(stream.get(COMPRESSED, layer.input_name, batch), dtype=np.float32))
        rng = np.random.default_rng([settings.seed, layer_index, batch])
        quota = math.ceil(budget * _samples_in(layer, x_ref) / total_samples)
        if layer.op_type == "Conv":
            p_ref, p_hat, gather, ids = _conv_positions(layer, x_ref, x_hat, rng, quota)
        else:
            tokens = None if settings.token_mask is None else stream.get(ORIGINAL, settings.token_mask, batch)
            p_ref, p_hat, gather, ids = _row_positions(layer, x_ref, x_hat, rng, quota, tokens)
        largest = max(float(p_ref.abs().max()), float(p_hat.abs().max())) if p_ref.numel() else 0.0
        if not (largest == 0.0 or INPUT_RANGE[0] <= largest <= INPUT_RANGE[1]):  # NaN included
            raise SamplingError(f"its input peaks at {largest:.1e} on the calibration samples, outside "
                                f"{INPUT_RANGE[0]:.0e}..{INPUT_RANGE[1]:.0e} where the solver's float32 products "
                                "stay finite and normal (such values come from untrained or broken weights), so "
                                "the layer is not solved")
        parts["ids"].append(ids + first_sample)
        first_sample += _samples_in(layer, x_ref)
        y = torch.bmm(p_ref.transpose(0, 1), w0_t.transpose(1, 2)).transpose(0, 1).reshape(len(p_ref), -1) + b0_t
        side_ref_full = [np.asarray(stream.get(ORIGINAL, s, batch), dtype=np.float32) for s in sides]
        for k, name in enumerate(sides):
            ref = torch.from_numpy(np.array(side_ref_full[k]))
            hat = torch.from_numpy(np.array(stream.get(COMPRESSED, name, batch), dtype=np.float32))
            parts["side_ref"][k].append(gather(ref, name))
            parts["side_hat"][k].append(gather(hat, name))
        if verify and batch == 0:
            expected = y if activation is None else activation(y, tuple(p[-1] for p in parts["side_ref"]))
            verify_layer(stream.view, layer, x_ref.numpy(), side_ref_full,
                         lambda full: gather(full, layer.output_name), expected.detach())
        parts["x_hat"].append(p_hat)
        parts["y"].append(y)
    return LayerProblem(
        x_hat=_concat(parts["x_hat"]), y_ref=_concat(parts["y"]), w0=w0_t, b0=b0_t,
        side_hat=tuple(_concat(p) for p in parts["side_hat"]),
        side_ref=tuple(_concat(p) for p in parts["side_ref"]),
        activation=activation, fit_bias=fit_bias, sample_ids=_concat(parts["ids"]))


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, emptying ``parts`` as it copies them: the peak is the result and one part, not
    the result and all of them."""
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype)
    start = 0
    while parts:
        part = parts.pop(0)
        out[start:start + len(part)] = part
        start += len(part)
    return out


def _samples_in(layer: Layer, x: torch.Tensor) -> int:
    return x.shape[0] if layer.op_type in ("Conv", "Gemm") or x.ndim > 1 else 1


def _conv_positions(layer: Layer, x_ref: torch.Tensor, x_hat: torch.Tensor, rng, quota: int):
    geometry = layer.conv
    if geometry.spatial_rank == 1:
        x_ref, x_hat = x_ref[:, :, None, :], x_hat[:, :, None, :]
    if x_ref.ndim != 4 or x_ref.shape[1] != layer.groups * (layer.in_features //
                                                             (geometry.kernel[0] * geometry.kernel[1])):
        raise SamplingError(f"layer {layer.name!r}: input of shape {tuple(x_ref.shape)} does not match its "
                            f"weight {layer.weight_shape}")
    count, _, height, width = x_ref.shape
    shape = resolve_conv(height, width, geometry.kernel, geometry.strides, geometry.dilations,
                         geometry.pads, geometry.auto_pad)
    per_sample = shape.out_h * shape.out_w
    flat = torch.from_numpy(sample_positions(rng, count * per_sample, quota))
    sample, rest = flat // per_sample, flat % per_sample
    oy, ox = rest // shape.out_w, rest % shape.out_w
    args = (geometry.kernel, geometry.strides, geometry.dilations, shape, layer.groups, sample, oy, ox)
    p_ref, p_hat = conv_patches(x_ref, *args), conv_patches(x_hat, *args)
    expected = (count, layer.out_features, shape.out_h, shape.out_w)

    def gather(full: torch.Tensor, name: str) -> torch.Tensor:
        full = torch.as_tensor(full)
        if geometry.spatial_rank == 1:
            full = full[:, :, None, :]
        if tuple(full.shape) != expected:
            raise SamplingError(f"tensor {name!r} has shape {tuple(full.shape)}, expected {expected} "
                                f"(the output of layer {layer.name!r})")
        return full[sample, :, oy, ox]

    return p_ref, p_hat, gather, sample


def _row_positions(layer: Layer, x_ref: torch.Tensor, x_hat: torch.Tensor, rng, quota: int,
                   tokens: np.ndarray | None = None):
    """Rows of a Gemm/MatMul input; with ``tokens`` ([batch, sequence] matching a 3-D input), only the
    rows of nonzero tokens."""
    k = layer.in_features
    if x_ref.shape[-1] != k:
        raise SamplingError(f"layer {layer.name!r}: input of shape {tuple(x_ref.shape)} does not end in "
                            f"K={k}")
    rows_ref, rows_hat = x_ref.reshape(-1, k), x_hat.reshape(-1, k)
    candidates = np.arange(rows_ref.shape[0])
    if tokens is not None and x_ref.ndim == 3 and tuple(np.shape(tokens)) == tuple(x_ref.shape[:2]):
        candidates = np.flatnonzero(np.asarray(tokens).reshape(-1) != 0)
    picked = torch.from_numpy(candidates[sample_positions(rng, len(candidates), quota)])
    expected_rows = rows_ref.shape[0]

    def gather(full: torch.Tensor, name: str) -> torch.Tensor:
        full = torch.as_tensor(full)
        if full.shape[-1] != layer.out_features or full.numel() != expected_rows * layer.out_features:
            raise SamplingError(f"tensor {name!r} has shape {tuple(full.shape)}, not the output shape of "
                                f"layer {layer.name!r}")
        return full.reshape(-1, layer.out_features)[picked]

    per_sample = max(1, expected_rows // _samples_in(layer, x_ref))
    return rows_ref[picked][:, None, :], rows_hat[picked][:, None, :], gather, picked // per_sample


__all__ = ["SampleSettings", "SamplingError", "sample_problem", "patch_budget", "BridgeError"]
