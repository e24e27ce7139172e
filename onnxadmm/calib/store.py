"""Cached activations, one array per (tensor, batch), within a memory budget.

When the arrays in memory exceed the budget, the oldest are written to a temporary folder as .npy and
read back memory-mapped on access, so peak memory follows the setting, not the data set size. A disk that
cannot take them (full, read-only) is reported as such (``BadInputError``), naming the folder and the fix.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from ..onnxio import scratch


class TensorStore:
    def __init__(self, budget_bytes: int, spill_dir: str | None = None):
        self.budget_bytes = budget_bytes
        self._memory: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._disk: dict[tuple[str, int], Path] = {}
        self._bytes = 0
        self._spill_root = spill_dir
        self._folder: Path | None = None
        self.peak_bytes = 0
        self.spilled_bytes = 0
        self._files_written = 0

    def __contains__(self, name: str) -> bool:
        return any(key[0] == name for key in self._memory) or any(key[0] == name for key in self._disk)

    def put(self, name: str, batch: int, array: np.ndarray) -> None:
        self.drop_one(name, batch)
        self._memory[(name, batch)] = array
        self._bytes += array.nbytes
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        self._spill()

    def get(self, name: str, batch: int) -> np.ndarray:
        key = (name, batch)
        if key in self._memory:
            return self._memory[key]
        return np.load(self._disk[key], mmap_mode="r")

    def drop(self, name: str) -> None:
        for key in [k for k in self._memory if k[0] == name]:
            self._bytes -= self._memory.pop(key).nbytes
        for key in [k for k in self._disk if k[0] == name]:
            self._disk.pop(key).unlink(missing_ok=True)

    def drop_one(self, name: str, batch: int) -> None:
        key = (name, batch)
        if key in self._memory:
            self._bytes -= self._memory.pop(key).nbytes
        if key in self._disk:
            self._disk.pop(key).unlink(missing_ok=True)

    def names(self) -> set[str]:
        return {k[0] for k in self._memory} | {k[0] for k in self._disk}

    def _spill(self) -> None:
        while self._bytes > self.budget_bytes and len(self._memory) > 1:
            key, array = self._memory.popitem(last=False)
            if self._folder is None:
                self._make_folder()
            self._files_written += 1
            path = self._folder / f"{self._files_written}.npy"
            try:
                np.save(path, array)
            except OSError as exc:  # a full or read-only disk is the machine's, not a bug: say what to change
                path.unlink(missing_ok=True)
                raise BadInputError(
                    f"cannot spill cached activations to {self._folder}: {exc.strerror or exc} (after "
                    f"{self.spilled_bytes / 2**20:.0f} MB written there); free space on that disk, point TMPDIR "
                    "at a larger one, or raise --max-memory-mb so that less is spilled") from exc
            self._disk[key] = path
            self._bytes -= array.nbytes
            self.spilled_bytes += array.nbytes

    def _make_folder(self) -> None:
        """A registered scratch folder (named before it is created, so no interrupt point loses it)."""
        self._folder = scratch.new_folder("onnxadmm-spill-", self._spill_root)

    def close(self) -> None:
        self._memory.clear()
        self._disk.clear()
        self._bytes = 0
        if self._folder is not None:
            scratch.remove(self._folder)
            self._folder = None
