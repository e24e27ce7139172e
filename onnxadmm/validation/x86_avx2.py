"""Run models in this machine's own onnxruntime on an emulated x86-64 CPU with AVX2 but no AVX-512 and no
VNNI (qemu user-mode, ``-cpu Haswell``), to see what an int8 model computes on such CPUs.

onnxruntime picks its kernels by CPUID. Without VNNI its uint8 × int8 products use ``vpmaddubsw``, which adds
two adjacent products into a signed 16-bit lane and saturates when they pass 32,767 (``docs/RUNTIME.md``):
an int8 model can then compute something else than on a VNNI x86 or an ARM core. fp32 kernels do not
saturate: the fp32 original must match this machine's run to the fp32 tolerance, which also checks the
emulation itself. Only the static ``qemu-x86_64`` is needed (extracted from Debian 13's qemu-user with
mmdebstrap, into ``$XDG_CACHE_HOME/onnxadmm/x86_64-avx2/``); Python, numpy and onnxruntime are this
environment's. Outputs only: emulation says nothing about speed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PlatformError
from ..onnxio.scratch import cache_root
from .aarch64 import extract_qemu, run_emulated

QEMU_CPU = "Haswell"  # AVX2 + FMA, no AVX-512, no VNNI
PLATFORM = f"linux-x86_64-avx2 (this onnxruntime under qemu user-mode, emulated CPU {QEMU_CPU}: AVX2, no VNNI)"


@dataclass
class X86Avx2:
    root: Path

    @property
    def qemu(self) -> Path:
        return self.root / "qemu-x86_64"

    def run(self, models: list[Path], feed: dict[str, np.ndarray]) -> dict:
        """Outputs of each model on ``feed`` in this onnxruntime on the emulated CPU (as ``Aarch64.run``)."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        result = run_emulated([str(self.qemu), "-cpu", QEMU_CPU, sys.executable], env, models, feed,
                              "emulated x86-64 (AVX2)")
        return {**result, "machine": f"{result['machine']} ({QEMU_CPU})"}


def prepare(root: Path | None = None, log=print) -> X86Avx2:
    """The emulator, extracted once."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        raise PlatformError(f"--platform linux-x86_64-avx2 runs this machine's onnxruntime under qemu-x86_64: it "
                            f"needs an x86-64 host, not {platform.machine()}")
    env = X86Avx2(root or cache_root() / "x86_64-avx2")
    if not env.qemu.is_file():
        extract_qemu("qemu-x86_64", env.qemu, log)
    return env
