"""Build one layer's reconstruction problem from the activation stream.

Output positions are sampled per batch (a fixed quota per sample, deterministic in the seed and the
layer's index), and at each position we keep the compressed-model input patch x̂, the original
pre-activation y = W₀x + b₀, and the chain's side inputs from both models. Memory is bounded by the
patch cap, not by the number of calibration samples. The patches of the refit's held-out samples are stored
last (``held_out_last``), so its split of the problem takes views.

Token rows of a sequence model ([batch, sequence, K] inputs) are sampled only where the token mask (an
input such as ``attention_mask``, 0 at padding) is nonzero: padded positions never reach the model's
outputs, and fitting them would spend the layer's least squares on tokens that do not exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..algorithms.patches import conv_patches, resolve_conv, sample_positions
from ..algorithms.problem import LayerProblem, held_out_last
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
    """Gather the problem of ``layer`` (canonical ``w0`` (G,R,d), ``b0`` (Cout)) over all batches.

    Two passes: the positions are drawn from the batches' shapes (and the token mask) alone, so the arrays are
    allocated once at their final size and each batch's patches are copied straight into place — never the
    patches beside a joined copy of them."""
    sides = list(layer.chain.side_inputs) if layer.chain else []
    budget = patch_budget(layer, len(sides), settings)
    w0_t = torch.from_numpy(np.require(w0, np.float32, ["C", "W"]))  # shares ``w0`` when it can (no second copy)
    b0_t = torch.from_numpy(np.array(b0, np.float32))
    picks, ids, first_sample = [], [], 0  # first_sample: global index of the batch's first calibration sample
    for batch in range(stream.num_batches):
        shape = np.shape(stream.get(ORIGINAL, layer.input_name, batch))
        rng = np.random.default_rng([settings.seed, layer_index, batch])
        quota = math.ceil(budget * _samples_in(layer, shape) / total_samples)
        if layer.op_type == "Conv":
            pick = _conv_pick(layer, shape, rng, quota)
        else:
            tokens = None if settings.token_mask is None else stream.get(ORIGINAL, settings.token_mask, batch)
            pick = _row_pick(layer, shape, rng, quota, tokens)
        picks.append(pick)
        ids.append(pick.ids + first_sample)
        first_sample += _samples_in(layer, shape)
    sample_ids = torch.cat(ids)
    order = held_out_last(sample_ids)  # row of each patch in the problem
    count = len(order)
    x_hat = torch.empty((count, layer.groups, layer.in_features))
    y_ref = torch.empty((count, layer.out_features))
    side_hat = [torch.empty((count, layer.out_features)) for _ in sides]
    side_ref = [torch.empty((count, layer.out_features)) for _ in sides]
    start = 0
    for batch, pick in enumerate(picks):
        rows = order[start:start + len(pick.ids)]
        start += len(pick.ids)
        x_ref = _tensor(stream.get(ORIGINAL, layer.input_name, batch))
        p_ref = pick.patches(x_ref)
        p_hat = pick.patches(_tensor(stream.get(COMPRESSED, layer.input_name, batch)))
        largest = _largest_magnitude(p_ref, p_hat)
        if not (largest == 0.0 or INPUT_RANGE[0] <= largest <= INPUT_RANGE[1]):  # NaN included
            raise SamplingError(f"its input peaks at {largest:.1e} on the calibration samples, outside "
                                f"{INPUT_RANGE[0]:.0e}..{INPUT_RANGE[1]:.0e} where the solver's float32 products "
                                "stay finite and normal (such values come from untrained or broken weights), so "
                                "the layer is not solved")
        y = torch.bmm(p_ref.transpose(0, 1), w0_t.transpose(1, 2)).transpose(0, 1).reshape(len(p_ref), -1) + b0_t
        side_ref_full = [_tensor(stream.get(ORIGINAL, s, batch)) for s in sides]
        for k, name in enumerate(sides):
            side_ref[k].index_copy_(0, rows, pick.gather(side_ref_full[k], name))
            side_hat[k].index_copy_(0, rows, pick.gather(_tensor(stream.get(COMPRESSED, name, batch)), name))
        if verify and batch == 0:
            expected = y if activation is None else activation(y, tuple(s[rows] for s in side_ref))
            verify_layer(stream.view, layer, x_ref.numpy(), [t.numpy() for t in side_ref_full],
                         lambda full: pick.gather(full, layer.output_name), expected.detach())
        x_hat.index_copy_(0, rows, p_hat)
        y_ref.index_copy_(0, rows, y)
    return LayerProblem(
        x_hat=x_hat, y_ref=y_ref, w0=w0_t, b0=b0_t, side_hat=tuple(side_hat), side_ref=tuple(side_ref),
        activation=activation, fit_bias=fit_bias,
        sample_ids=torch.empty_like(sample_ids).index_copy_(0, order, sample_ids))


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 tensor of a cached batch: sharing its memory when it can (a writable float32 array; the batch
    is only read), a copy otherwise (a spilled batch is a read-only memory map)."""
    array = np.asarray(array)
    if array.dtype == np.float32 and array.flags.writeable and array.flags.c_contiguous:
        return torch.from_numpy(array)
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _largest_magnitude(*tensors: torch.Tensor) -> float:
    """max |x| over ``tensors``, one pass each (no |x| temporary); NaN when one holds a NaN; 0 when all are empty."""
    peaks: list[float] = []
    for x in tensors:
        if x.numel():
            low, high = torch.aminmax(x)
            peaks += [-float(low), float(high)]
    return float("nan") if any(math.isnan(p) for p in peaks) else max(peaks, default=0.0)


def _samples_in(layer: Layer, shape: tuple[int, ...]) -> int:
    return shape[0] if layer.op_type in ("Conv", "Gemm") or len(shape) > 1 else 1


@dataclass(frozen=True)
class _Pick:
    """Where one batch is sampled: ``ids`` (P,) the sample of each patch within the batch; ``patches(x)`` the
    layer's input patches there, (P, G, d); ``gather(full, name)`` a layer-output-shaped tensor there, (P, Cout)."""

    ids: torch.Tensor
    patches: Callable[[torch.Tensor], torch.Tensor]
    gather: Callable[[torch.Tensor, str], torch.Tensor]


def _conv_pick(layer: Layer, shape: tuple[int, ...], rng, quota: int) -> _Pick:
    geometry = layer.conv
    if geometry.spatial_rank == 1:
        shape = (*shape[:2], 1, *shape[2:])
    if len(shape) != 4 or shape[1] != layer.groups * (layer.in_features // (geometry.kernel[0] * geometry.kernel[1])):
        raise SamplingError(f"layer {layer.name!r}: input of shape {tuple(shape)} does not match its "
                            f"weight {layer.weight_shape}")
    count, _, height, width = shape
    resolved = resolve_conv(height, width, geometry.kernel, geometry.strides, geometry.dilations,
                            geometry.pads, geometry.auto_pad)
    per_sample = resolved.out_h * resolved.out_w
    flat = torch.from_numpy(sample_positions(rng, count * per_sample, quota))
    sample, rest = flat // per_sample, flat % per_sample
    oy, ox = rest // resolved.out_w, rest % resolved.out_w
    expected = (count, layer.out_features, resolved.out_h, resolved.out_w)

    def spatial_2d(full) -> torch.Tensor:
        full = torch.as_tensor(full)
        return full[:, :, None, :] if geometry.spatial_rank == 1 else full

    def patches(x: torch.Tensor) -> torch.Tensor:
        return conv_patches(spatial_2d(x), geometry.kernel, geometry.strides, geometry.dilations, resolved,
                            layer.groups, sample, oy, ox)

    def gather(full, name: str) -> torch.Tensor:
        full = spatial_2d(full)
        if tuple(full.shape) != expected:
            raise SamplingError(f"tensor {name!r} has shape {tuple(full.shape)}, expected {expected} "
                                f"(the output of layer {layer.name!r})")
        return full[sample, :, oy, ox]

    return _Pick(sample, patches, gather)


def _row_pick(layer: Layer, shape: tuple[int, ...], rng, quota: int, tokens: np.ndarray | None = None) -> _Pick:
    """Rows of a Gemm/MatMul input; with ``tokens`` ([batch, sequence] matching a 3-D input), only the
    rows of nonzero tokens."""
    k = layer.in_features
    if not shape or shape[-1] != k:
        raise SamplingError(f"layer {layer.name!r}: input of shape {tuple(shape)} does not end in K={k}")
    expected_rows = int(np.prod(shape[:-1]))
    candidates = np.arange(expected_rows)
    if tokens is not None and len(shape) == 3 and tuple(np.shape(tokens)) == tuple(shape[:2]):
        candidates = np.flatnonzero(np.asarray(tokens).reshape(-1) != 0)
    picked = torch.from_numpy(candidates[sample_positions(rng, len(candidates), quota)])
    per_sample = max(1, expected_rows // _samples_in(layer, shape))

    def patches(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, k)[picked][:, None, :]

    def gather(full, name: str) -> torch.Tensor:
        full = torch.as_tensor(full)
        if full.shape[-1] != layer.out_features or full.numel() != expected_rows * layer.out_features:
            raise SamplingError(f"tensor {name!r} has shape {tuple(full.shape)}, not the output shape of "
                                f"layer {layer.name!r}")
        return full.reshape(-1, layer.out_features)[picked]

    return _Pick(picked // per_sample, patches, gather)


__all__ = ["SampleSettings", "SamplingError", "sample_problem", "patch_budget", "BridgeError"]
