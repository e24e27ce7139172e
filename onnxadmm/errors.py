"""Error types. Each carries the process exit code the CLI maps it to.

Exit codes: 0 ok, 1 gate failed, 2 usage/config error, 3 unsupported model or bad input, 4 internal.
Messages say what failed, where (file, node, input name) and how to fix it.
"""

from __future__ import annotations


class OnnxAdmmError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 4


class ConfigError(OnnxAdmmError):
    """A setting is invalid (unknown key, value out of range, selector that matches nothing)."""

    exit_code = 2


class BadInputError(OnnxAdmmError):
    """An input file or path is unusable (missing, corrupt, wrong place)."""

    exit_code = 3


class UnsupportedModelError(BadInputError):
    """The model is valid ONNX but cannot be processed (opset range, cycle, nothing to compress)."""


class CalibrationError(BadInputError):
    """Calibration or evaluation data does not match the model (names, shapes, dtypes, NaN)."""


class ExportError(BadInputError):
    """The output cannot be written where asked (same as input, missing folder, read-only)."""


class GateFailed(OnnxAdmmError):
    """A validation gate (accuracy drop, agreement, speed-up) was missed."""

    exit_code = 1


class PlatformError(OnnxAdmmError):
    """A cross-platform check (``--platform``) cannot run on this machine: the message says what to install."""

    exit_code = 2
