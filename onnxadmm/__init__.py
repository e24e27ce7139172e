"""onnxadmm: post-training compression of ONNX models by layer-wise ADMM, validated in onnxruntime.

    from onnxadmm import compress, CompressConfig
    result = compress("model.onnx", "calib.npz", CompressConfig(sparsity=0.8))
    result.save("model.sparse.onnx")
"""

__version__ = "0.1.0"

from .config import CompressConfig, ValidateConfig  # noqa: E402


def __getattr__(name):  # keep `import onnxadmm` light: the API (and torch) load on first use
    if name in ("compress", "validate", "check", "CompressResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["compress", "validate", "check", "CompressResult", "CompressConfig", "ValidateConfig", "__version__"]
