"""onnxadmm: post-training compression of ONNX models by layer-wise ADMM, validated in onnxruntime.

    from onnxadmm import compress, CompressConfig
    result = compress("model.onnx", "calib.npz", CompressConfig(sparsity=0.8))
    result.save("model.sparse.onnx")
"""

__version__ = "0.1.0"

import os

# torch's OpenMP (libgomp) threads spin for 300,000 rounds before they sleep. When the cores are shared (a
# CI runner, a second job) spinning threads starve each other. Measured here, ResNet-20 `lowrank --target-params
# 0.5` compress: idle 37.6 s by default, 38.1 s with 30,000 rounds; beside one busy 2-thread process 201 s by
# default, 123 s with 30,000 (OMP_WAIT_POLICY=PASSIVE: 55 s idle, 108 s loaded). libgomp reads this when
# torch is first imported, so it applies only if onnxadmm is imported first (the CLI always is); a value the
# user set wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from .config import CompressConfig, ValidateConfig  # noqa: E402


def __getattr__(name):  # keep `import onnxadmm` light: the API (and torch) load on first use
    if name in ("compress", "search", "validate", "check", "CompressResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["compress", "search", "validate", "check", "CompressResult", "CompressConfig", "ValidateConfig", "__version__"]
