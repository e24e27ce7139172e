"""Run models in the official aarch64 onnxruntime wheel from an x86-64 machine (qemu user-mode emulation).

The recipe measured in ``../shared/ARM.md``: a static ``qemu-aarch64`` (Debian 13's qemu-user, extracted
with mmdebstrap, no binfmt, no chroot), an arm64 Debian sysroot with python3 unpacked by
``mmdebstrap --variant=extract`` (no aarch64 code runs while building it), and the aarch64 wheels of the
*same* onnxruntime and numpy versions installed into a target folder by the host's pip. Built once into
``$XDG_CACHE_HOME/onnxadmm/aarch64/`` (about 260 MB; needs root for mmdebstrap, and the package mirrors).

The emulated run only computes outputs: emulation says nothing about speed, so no latency is measured.
Comparison (fp32): aarch64 vs x86 of the same model within rtol 1e-4 (atol 1e-5 · max |output|), and
top-1 agreement of each model's aarch64 run with the x86 original.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PlatformError
from ..onnxio.scratch import cache_root, scratch_folder

QEMU_CPU = "neoverse-n1"  # a named core: `-cpu max` (SME) gave wrong results for quantized models
PLATFORM = f"linux-aarch64 (qemu user-mode, emulated core {QEMU_CPU})"
RTOL = 1e-4
ATOL_SCALE = 1e-5

RUNNER = r'''
import sys, numpy as np, onnxruntime as ort
data = np.load(sys.argv[1])
out = {}
for index, path in enumerate(sys.argv[3:]):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    results = [sess.run(None, {n: data[n][i:i + 1] for n in names}) for i in range(len(data[names[0]]))]
    for k in range(len(results[0])):
        out[f"m{index}_o{k}"] = np.concatenate([r[k] for r in results])
np.savez(sys.argv[2], machine=np.array(__import__("platform").machine()), ort=np.array(ort.__version__), **out)
'''


@dataclass
class Aarch64:
    root: Path

    @property
    def qemu(self) -> Path:
        return self.root / "qemu-aarch64"

    @property
    def sysroot(self) -> Path:
        return self.root / "rootfs"

    @property
    def site(self) -> Path:
        return self.root / "site"

    def ready(self) -> bool:
        return self.qemu.is_file() and (self.sysroot / "usr/bin/python3").exists() and \
            (self.site / "onnxruntime").is_dir()

    def run(self, models: list[Path], feed: dict[str, np.ndarray]) -> dict:
        """Outputs of each model on ``feed`` in aarch64 onnxruntime: {"machine", "ort", "outputs": [[...]]}."""
        env = {**os.environ, "QEMU_CPU": QEMU_CPU, "PYTHONPATH": str(self.site), "OMP_NUM_THREADS": "1"}
        return run_emulated([str(self.qemu), "-L", str(self.sysroot), str(self.sysroot / "usr/bin/python3")], env,
                            models, feed, "aarch64")


def run_emulated(prefix: list[str], env: dict, models: list[Path], feed: dict[str, np.ndarray], what: str) -> dict:
    """``RUNNER`` started by ``prefix`` (qemu and a python) on each model over ``feed``: {"machine", "ort",
    "outputs": [[output arrays] per model]}."""
    with scratch_folder("onnxadmm-emulated-") as folder:
        (folder / "runner.py").write_text(RUNNER)
        np.savez(folder / "in.npz", **feed)
        command = [*prefix, str(folder / "runner.py"), str(folder / "in.npz"), str(folder / "out.npz"),
                   *map(str, models)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise PlatformError(f"the {what} onnxruntime run failed (exit {proc.returncode}): "
                                f"{proc.stderr.strip()[-800:]}")
        data = np.load(folder / "out.npz")
        outputs = [[data[f"m{m}_o{k}"] for k in range(sum(1 for n in data.files if n.startswith(f"m{m}_o")))]
                   for m in range(len(models))]
        return {"machine": str(data["machine"]), "ort": str(data["ort"]), "outputs": outputs}


def default_root() -> Path:
    return cache_root() / "aarch64"


def prepare(root: Path | None = None, log=print) -> Aarch64:
    """Build the aarch64 environment once (ARM.md recipe); returns it ready to run."""
    import onnxruntime

    env = Aarch64(root or default_root())
    if env.ready():
        return env
    for tool in ("mmdebstrap",):
        if shutil.which(tool) is None:
            raise PlatformError(f"{tool} is not installed: run 'apt-get install --no-install-recommends "
                                f"{tool}' (as root), then retry")
    env.root.mkdir(parents=True, exist_ok=True)
    if not env.qemu.is_file():
        extract_qemu("qemu-aarch64", env.qemu, log)
    if not (env.sysroot / "usr/bin/python3").exists():
        log("unpacking an arm64 Debian 12 sysroot with python3")
        shutil.rmtree(env.sysroot, ignore_errors=True)
        _run(["mmdebstrap", "--variant=extract", "--arch=arm64", "--include=python3,libstdc++6", "bookworm",
              str(env.sysroot)])
    if not (env.site / "onnxruntime").is_dir():
        log(f"installing aarch64 wheels: onnxruntime=={onnxruntime.__version__}, numpy=={np.__version__}")
        platform = ["--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
                    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:"]
        wanted = [f"onnxruntime=={onnxruntime.__version__}", f"numpy=={np.__version__}"]
        with scratch_folder("onnxadmm-wheels-") as wheels:
            _run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), *platform, *wanted])
            _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), *platform,
                  "--target", str(env.site), *wanted])
    if not env.ready():
        raise PlatformError(f"the aarch64 environment in {env.root} is incomplete; delete it and retry")
    return env


def extract_qemu(binary: str, destination: Path, log=print) -> None:
    """Copy the static ``binary`` (e.g. qemu-aarch64) of Debian 13's qemu-user to ``destination``
    (mmdebstrap, root, the Debian mirrors)."""
    if shutil.which("mmdebstrap") is None:
        raise PlatformError("mmdebstrap is not installed: run 'apt-get install --no-install-recommends mmdebstrap' "
                            "(as root), then retry")
    log(f"extracting {binary} (Debian 13 qemu-user)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with scratch_folder("onnxadmm-qemu-") as tmp:
        _run(["mmdebstrap", "--variant=extract", "--arch=amd64", "--include=qemu-user", "trixie", str(tmp)])
        shutil.copy2(Path(tmp) / "usr/bin" / binary, destination)


def _run(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        hint = " (mmdebstrap needs root)" if command[0] == "mmdebstrap" and os.geteuid() != 0 else ""
        raise PlatformError(f"{' '.join(command[:4])} ... failed{hint}: {proc.stderr.strip()[-600:]}")


INT8_MIN_AGREEMENT = 0.99  # an int8 model: top-1 of the aarch64 run agrees with the x86 run on this share


def compare(x86: list[list[np.ndarray]], arm: list[list[np.ndarray]], names: list[str],
            quantized: list[bool] | None = None, platform: str = PLATFORM) -> dict:
    """Per model: max |aarch64 − x86| against the fp32 tolerance — or, for an int8 (QDQ) model, whose integer
    kernels legitimately differ between x86 and ARM (rounding of requantization), top-1 agreement of the two
    runs ≥ ``INT8_MIN_AGREEMENT``; and top-1 of each aarch64 run vs x86 model 0 (the original)."""
    quantized = quantized or [False] * len(names)
    rows, passed = [], True
    reference_top1 = np.argmax(x86[0][0].reshape(len(x86[0][0]), -1), axis=1)
    for name, a_outs, b_outs, is_int8 in zip(names, x86, arm, quantized):
        diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(a_outs, b_outs))
        scale = max(float(np.max(np.abs(a))) for a in a_outs)
        close = all(np.allclose(b, a, rtol=RTOL, atol=ATOL_SCALE * max(float(np.max(np.abs(a))), 1e-12))
                    for a, b in zip(a_outs, b_outs))
        top1 = np.argmax(b_outs[0].reshape(len(b_outs[0]), -1), axis=1)
        same_top1 = float(np.mean(top1 == np.argmax(a_outs[0].reshape(len(a_outs[0]), -1), axis=1)))
        ok = same_top1 >= INT8_MIN_AGREEMENT if is_int8 else close
        rows.append({"model": name, "max_abs_diff_vs_x86": diff, "max_abs_output": scale, "within_fp32_tolerance": close,
                     "int8": is_int8, "passed": ok, "top1_same_as_x86": same_top1,
                     "top1_agreement_with_original_x86": float(np.mean(top1 == reference_top1))})
        passed = passed and ok
    return {"platform": platform,
            "tolerance": {"rtol": RTOL, "atol": f"{ATOL_SCALE} x max |output|",
                          "int8_min_top1_agreement_with_x86": INT8_MIN_AGREEMENT}, "models": rows, "passed": passed,
            "note": "outputs only: latency under emulation is not a speed and is not measured"}
