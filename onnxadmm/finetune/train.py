"""What block refinement and distillation share: Adam with a cosine schedule, a step that keeps each
weight's support (W ← W ⊙ M), and running a converted block (or any callable) over samples in batches."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import onnx
import torch

from ..bridge.torch_block import BlockModule
from ..onnxio.graph import TensorType


def value_types(values: Mapping[str, np.ndarray]) -> dict[str, TensorType]:
    return {n: TensorType(onnx.helper.np_dtype_to_tensor_dtype(a.dtype), (None,) * a.ndim)
            for n, a in values.items()}


def cosine_adam(tensors: list[torch.Tensor], lr: float, steps: int):
    """Adam over ``tensors`` with the learning rate lr·½(1 + cos(π s / steps)) at step s."""
    optimizer = torch.optim.Adam(tensors, lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))


def masked_step(optimizer, schedule, loss: torch.Tensor, tensors: list[torch.Tensor],
                masks: list[torch.Tensor]) -> None:
    """One optimizer step on ``loss``, then W ← W ⊙ M for each tensor (supports stay fixed)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    with torch.no_grad():
        for tensor, mask in zip(tensors, masks):
            tensor.mul_(mask)


def run_torch(block: BlockModule, inputs: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """The module's outputs on ``inputs`` (no gradients), ``batch_size`` samples at a time."""
    def run(feed):
        with torch.no_grad():
            return [out.numpy() for out in block({n: torch.from_numpy(a) for n, a in feed.items()})]

    return in_batches(run, inputs, block.input_names, block.output_names, batch_size)


def in_batches(run, inputs: Mapping[str, np.ndarray], names: list[str], outputs: list[str],
                batch_size: int) -> dict[str, np.ndarray]:
    """``run`` (a feed of ``names`` -> arrays of ``outputs``) over all samples, ``batch_size`` at a time."""
    count = len(inputs[names[0]])
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for start in range(0, count, batch_size):
        for part, out in zip(parts, run({n: inputs[n][start:start + batch_size] for n in names})):
            part.append(out)
    return {name: np.concatenate(part) for name, part in zip(outputs, parts)}
