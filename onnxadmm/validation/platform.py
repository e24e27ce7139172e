"""The platform check: both models in the other platform's onnxruntime (emulated) and here, outputs
compared: an ARM core (``aarch64.py``) or an x86-64 CPU without VNNI (``x86_avx2.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..calib.readers import SampleSet
from ..config import ValidateConfig
from ..onnxio.graph import is_quantized
from ..onnxio.runtime import session
from ..onnxio.save import save_model_atomic
from ..onnxio.scratch import scratch_folder
from . import aarch64, x86_avx2
from .aarch64 import compare


def platform_check(original: onnx.ModelProto, compressed: onnx.ModelProto, samples: SampleSet,
                   config: ValidateConfig, progress: Callable[[str, int, int, str], None] | None = None) -> dict:
    """Both models on the first ``platform_samples`` samples in the other platform's onnxruntime (emulated)
    and here; outputs compared (``aarch64.py``)."""
    progress = progress or (lambda *args: None)
    progress("platform", 0, 1, f"{config.platform}: preparing the emulated onnxruntime")
    emulation = x86_avx2 if config.platform == "linux-x86_64-avx2" else aarch64
    env = emulation.prepare(log=lambda message: progress("platform", 0, 1, message))
    count = min(config.platform_samples, samples.num_samples)
    feed = {name: array[:count] for name, array in samples.arrays.items()}
    x86 = []
    for model in (original, compressed):
        sess = session(model, 1)
        names = [o.name for o in sess.get_outputs()]
        runs = [sess.run(names, {n: v[i:i + 1] for n, v in feed.items()}) for i in range(count)]
        x86.append([np.concatenate([r[k] for r in runs]) for k in range(len(names))])
    with scratch_folder("onnxadmm-platform-") as folder:
        paths = []
        for name, model in (("original", original), ("compressed", compressed)):
            path = Path(folder) / f"{name}.onnx"
            save_model_atomic(model, path)  # (over 2 GB: external data, the model in memory unchanged)
            paths.append(path)
        progress("platform", 0, 1, f"running {count} samples under qemu")
        arm = env.run(paths, feed)
    result = compare(x86, arm["outputs"], ["original", "compressed"], [is_quantized(original), is_quantized(compressed)],
                     emulation.PLATFORM)
    result.update({"samples": count, "emulated_machine": arm["machine"], "onnxruntime": arm["ort"]})
    if emulation is x86_avx2 and not result["passed"] and result["models"][1]["int8"]:
        result["note"] += ("; the int8 model computes differently without VNNI (saturating 16-bit sums of uint8 x "
                           "int8 products): compress with --int8-reduce-range (7-bit weights) for such CPUs")
    return result
