"""Compression methods, one module per family, each registered by name (``base.register``)."""

from . import channels, elements, grouped, lowrank, none  # noqa: F401 (importing registers the methods)
from .base import REGISTRY, CompressionMethod, Context, Solved, run_method


def method_for(name: str) -> CompressionMethod:
    return REGISTRY[name]


__all__ = ["REGISTRY", "CompressionMethod", "Context", "Solved", "method_for", "run_method"]
